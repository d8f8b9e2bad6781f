//! Byte search for what the stream readers spend their time on: line breaks, string ends, and
//! the `"usage"` key; and a UTF-8 character count.
//!
//! The scans are `memchr`'s (SIMD where the CPU has it). Measured on a llama.cpp-sized chunk, a
//! line-break scan, a string-end scan and the usage-key search took 424 instructions with memchr
//! against 886 with the word-at-a-time search this module had before (callgrind, x86_64).

/// The first `a` or `b` in `haystack`: the scans for line breaks and string ends, which are what
/// `observe` and `rewrite` spend their time on.
pub(super) fn find_either(haystack: &[u8], a: u8, b: u8) -> Option<usize> {
    memchr::memchr2(a, b, haystack)
}

/// Where the key `"usage"` (its opening quote) first occurs in `bytes`. Searches for its `g`,
/// rare in chunks (llama.cpp's have none besides this key's): this beats a substring searcher on
/// event-sized inputs, which would be set up anew on every call.
pub(super) fn find_usage_key(bytes: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b"\"usage\"";
    let mut from = 4;
    while let Some(at) = bytes
        .get(from..)
        .and_then(|rest| memchr::memchr(b'g', rest))
    {
        let start = from + at - 4;
        if bytes[start..].starts_with(KEY) {
            return Some(start);
        }
        from += at + 1;
    }
    None
}

/// Whether `json` may hold a `usage` object: `"usage"`, `:` and `{`, with optional whitespace
/// between, anywhere. A cheap test; the walk then decides whether it is a top-level member.
pub(super) fn may_hold_usage_object(json: &[u8]) -> bool {
    let mut rest = json;
    while let Some(at) = find_usage_key(rest) {
        rest = &rest[at + b"\"usage\"".len()..];
        if let Some(value) = rest.trim_ascii_start().strip_prefix(b":") {
            if value.trim_ascii_start().first() == Some(&b'{') {
                return true;
            }
        }
    }
    false
}

/// Characters in UTF-8 bytes: every byte that does not continue a character starts one.
pub(super) fn utf8_chars(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| (b & 0xC0) != 0x80).count() as u64
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn searches_find_the_first_match(
            bytes in prop::collection::vec(prop::sample::select(&b"usage\"\r\n\\gx\x80\xff"[..]), 0..80),
            start in 0usize..8,
        ) {
            let bytes = &bytes[start.min(bytes.len())..];
            let naive = |a: u8, b: u8| bytes.iter().position(|&x| x == a || x == b);
            prop_assert_eq!(find_either(bytes, b'\n', b'\r'), naive(b'\n', b'\r'), "line breaks in {:?}", bytes);
            prop_assert_eq!(find_either(bytes, b'"', b'\\'), naive(b'"', b'\\'), "string ends in {:?}", bytes);
            prop_assert_eq!(
                find_usage_key(bytes),
                bytes.windows(7).position(|w| w == b"\"usage\""),
                "the usage key in {:?}", bytes
            );
        }
    }
}
