//! What a request asks the model to generate, read once from its body: the fields that bound an
//! answer's length, how many answers it asks for and from how many prompts — and from these, the
//! most completion tokens the request can cost under a key's cap.
//!
//! Length fields: the API's `max_tokens` and `max_completion_tokens`, and the vendors' own, which
//! change an answer's length as much: llama.cpp's `n_predict` (it overrides `max_tokens` when both
//! are set), TGI's and SGLang's `max_new_tokens`, and Ollama's `options.num_predict`. Choice
//! fields: `n`, `best_of` (generated server-side and charged, though only the best comes back)
//! and llama.cpp's `n_cmpl` (its name for `n`, which overrides it). A completions request whose
//! `prompt` is a list of prompts gets answers for each of them.
//!
//! Edge cases: `null` reads as absent, as servers read it; a value that is not a whole number
//! (`-1`, which llama.cpp and Ollama read as "no limit", `2.5`, `"100"`) is kept as
//! [`Named::NotACount`], for the key policy to refuse on a capped key; every product saturates.

use serde_json::Value;

/// What a request holds in one field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Named {
    /// Not there, or `null`.
    Absent,
    /// A whole number, at least 0.
    Count(u64),
    /// There, but not a whole number a cap can bound.
    NotACount,
}

/// A field of the request body, by its path.
#[derive(Debug)]
pub(crate) struct Field {
    /// How error messages name it: `n_predict`, `options.num_predict`.
    pub(crate) name: &'static str,
    path: &'static [&'static str],
}

const fn field(name: &'static str, path: &'static [&'static str]) -> Field {
    Field { name, path }
}

/// The fields that bound an answer's length. The first two are the API's own: a request that
/// names neither gets the key's cap added as `max_tokens` (see [`Generation::max_tokens_to_add`]).
pub(crate) const LENGTH_FIELDS: [Field; 5] = [
    field("max_tokens", &["max_tokens"]),
    field("max_completion_tokens", &["max_completion_tokens"]),
    field("n_predict", &["n_predict"]),
    field("max_new_tokens", &["max_new_tokens"]),
    field("options.num_predict", &["options", "num_predict"]),
];

/// How many of [`LENGTH_FIELDS`] are the API's own.
const STANDARD_LENGTH_FIELDS: usize = 2;

/// The fields that multiply the answers generated for each prompt.
pub(crate) const CHOICE_FIELDS: [Field; 3] = [
    field("n", &["n"]),
    field("best_of", &["best_of"]),
    field("n_cmpl", &["n_cmpl"]),
];

/// The generation a request asks for, as its body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Generation {
    lengths: [Named; LENGTH_FIELDS.len()],
    choices: [Named; CHOICE_FIELDS.len()],
    /// Prompts answered: 1 for chat, the list's length for a completions list of prompts.
    prompts: u64,
}

impl Generation {
    /// Reads the fields from a request body (a JSON object).
    pub(crate) fn read(json: &Value) -> Generation {
        Generation {
            lengths: LENGTH_FIELDS.each_ref().map(|f| named(json, f)),
            choices: CHOICE_FIELDS.each_ref().map(|f| named(json, f)),
            prompts: prompts(json),
        }
    }

    /// The length fields the request names, with what each holds.
    pub(crate) fn lengths(&self) -> impl Iterator<Item = (&'static Field, Named)> + '_ {
        present(&LENGTH_FIELDS, &self.lengths)
    }

    /// The choice fields the request names, with what each holds.
    pub(crate) fn choices(&self) -> impl Iterator<Item = (&'static Field, Named)> + '_ {
        present(&CHOICE_FIELDS, &self.choices)
    }

    /// The larger of `max_tokens` and `max_completion_tokens`, when either is set.
    pub(crate) fn standard_max_tokens(&self) -> Option<u64> {
        counts(&self.lengths[..STANDARD_LENGTH_FIELDS]).max()
    }

    /// The `max_tokens` the gateway adds to the request it sends, so that a key's `cap` binds an
    /// upstream that would otherwise generate up to its own default: when the request names
    /// neither `max_tokens` nor `max_completion_tokens`. Its value is the cap, or the largest
    /// vendor length field the request names (within the cap), so that the request asks for no
    /// more than it said.
    pub(crate) fn max_tokens_to_add(&self, cap: Option<u64>) -> Option<u64> {
        let cap = cap?;
        if self.standard_max_tokens().is_some() {
            return None;
        }
        let vendor = counts(&self.lengths[STANDARD_LENGTH_FIELDS..]).max();
        Some(vendor.map_or(cap, |asked| asked.min(cap)))
    }

    /// Answers generated: the largest of `n`, `best_of` and `n_cmpl` (at least 1), for each
    /// prompt.
    pub(crate) fn answers(&self) -> u64 {
        let choices = counts(&self.choices).max().unwrap_or(1).max(1);
        choices.saturating_mul(self.prompts)
    }

    /// The most completion tokens the request can cost with the key's `cap`: the largest length
    /// it names or the gateway adds (0 when it names none and there is no cap: nothing bounds
    /// it), for each answer.
    pub(crate) fn completion_bound(&self, cap: Option<u64>) -> u64 {
        let per_answer = counts(&self.lengths)
            .chain(self.max_tokens_to_add(cap))
            .max()
            .unwrap_or(0);
        per_answer.saturating_mul(self.answers())
    }
}

/// The value at `field`'s path.
fn named(json: &Value, field: &Field) -> Named {
    let mut value = json;
    for key in field.path {
        match value.get(key) {
            Some(inner) => value = inner,
            None => return Named::Absent,
        }
    }
    match value {
        Value::Null => Named::Absent,
        other => other.as_u64().map_or(Named::NotACount, Named::Count),
    }
}

fn present<'a>(
    fields: &'static [Field],
    values: &'a [Named],
) -> impl Iterator<Item = (&'static Field, Named)> + 'a {
    fields
        .iter()
        .zip(values.iter().copied())
        .filter(|(_, value)| *value != Named::Absent)
}

fn counts(values: &[Named]) -> impl Iterator<Item = u64> + '_ {
    values.iter().filter_map(|value| match value {
        Named::Count(count) => Some(*count),
        _ => None,
    })
}

/// Prompts a request is answered for: a completions `prompt` that is a list of strings or of
/// token lists is one prompt per element (a list holding token ids is one prompt); anything else
/// is one.
fn prompts(json: &Value) -> u64 {
    if json.get("messages").is_some() {
        return 1;
    }
    match json.get("prompt") {
        Some(Value::Array(items)) if !items.iter().any(Value::is_number) => {
            (items.len() as u64).max(1)
        }
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read(json: Value) -> Generation {
        Generation::read(&json)
    }

    #[test]
    fn fields_read_as_absent_counts_or_not_counts() {
        let generation = read(json!({
            "max_tokens": 8, "max_completion_tokens": null, "n_predict": -1,
            "options": {"num_predict": "100"}, "n": 2, "best_of": 2.5
        }));
        let lengths: Vec<_> = generation.lengths().map(|(f, v)| (f.name, v)).collect();
        assert_eq!(
            lengths,
            [
                ("max_tokens", Named::Count(8)),
                ("n_predict", Named::NotACount),
                ("options.num_predict", Named::NotACount)
            ],
            "null is absent"
        );
        let choices: Vec<_> = generation.choices().map(|(f, v)| (f.name, v)).collect();
        assert_eq!(
            choices,
            [("n", Named::Count(2)), ("best_of", Named::NotACount)]
        );
        assert_eq!(
            read(json!({"options": 5})).lengths().count(),
            0,
            "options that is no object names nothing"
        );
    }

    #[test]
    fn the_cap_is_added_only_when_no_standard_field_is_named() {
        let cap = Some(100);
        assert_eq!(read(json!({})).max_tokens_to_add(cap), Some(100));
        assert_eq!(read(json!({})).max_tokens_to_add(None), None, "no cap");
        assert_eq!(read(json!({"max_tokens": 5})).max_tokens_to_add(cap), None);
        assert_eq!(
            read(json!({"max_completion_tokens": 5})).max_tokens_to_add(cap),
            None,
            "OpenAI refuses both fields at once"
        );
        assert_eq!(
            read(json!({"max_tokens": null})).max_tokens_to_add(cap),
            Some(100)
        );
        assert_eq!(
            read(json!({"n_predict": 30})).max_tokens_to_add(cap),
            Some(30),
            "no more than the vendor field asked"
        );
    }

    #[test]
    fn the_completion_bound_covers_every_length_and_every_answer() {
        let cap = Some(100);
        for (body, bound, why) in [
            (json!({}), 100, "the cap the gateway adds"),
            (json!({"max_tokens": 8}), 8, "the request's own"),
            (
                json!({"max_tokens": 8, "max_completion_tokens": 9}),
                9,
                "the larger",
            ),
            (
                json!({"max_tokens": 8, "n_predict": 50}),
                50,
                "n_predict overrides max_tokens on llama.cpp",
            ),
            (json!({"max_tokens": 8, "n": 200}), 1600, "n answers"),
            (
                json!({"max_tokens": 8, "n": 2, "best_of": 5}),
                40,
                "best_of generated",
            ),
            (json!({"max_tokens": 8, "n_cmpl": 3}), 24, "llama.cpp's n"),
            (
                json!({"max_tokens": 8, "prompt": ["a", "b", "c"], "n": 2}),
                48,
                "each prompt, each choice",
            ),
            (
                json!({"max_tokens": 8, "prompt": [[1, 2], [3]]}),
                16,
                "token lists",
            ),
            (
                json!({"max_tokens": 8, "prompt": [1, 2, 3]}),
                8,
                "one token list",
            ),
            (json!({"max_tokens": 8, "prompt": []}), 8, "an empty list"),
            (
                json!({"max_tokens": 8, "messages": [], "prompt": ["a", "b"]}),
                8,
                "chat answers its messages once",
            ),
            (
                json!({"max_tokens": u64::MAX, "n": 2}),
                u64::MAX,
                "saturates",
            ),
        ] {
            assert_eq!(
                read(body.clone()).completion_bound(cap),
                bound,
                "{why}: {body}"
            );
        }
        assert_eq!(
            read(json!({})).completion_bound(None),
            0,
            "nothing bounds it"
        );
    }
}
