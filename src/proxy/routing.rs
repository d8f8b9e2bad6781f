//! Model patterns, as keys' allow-lists and pools' `models` write them: an exact name, a
//! `prefix*`, or `*` for any model. A pool serves a request when one of its patterns matches the
//! request's `model`; the first pool in file order that does wins.

/// Whether `pattern` (exact, `prefix*` or `*`) matches `model`.
pub(crate) fn matches(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn exact_prefix_and_any() {
        assert!(matches("mock-model", "mock-model"));
        assert!(!matches("mock-model", "mock-model-2"));
        assert!(matches("smollm2*", "smollm2-135m"));
        assert!(!matches("smollm2*", "llama"));
        assert!(matches("*", "anything"));
    }
}
