//! Byte search eight bytes at a time (SWAR, in safe code) for what the stream readers spend their
//! time on: line breaks, string ends, and the `"usage"` key; and a UTF-8 character count.

/// The first `a` or `b` in `haystack`: the scans for line breaks and string ends, which are what
/// `observe` and `rewrite` spend their time on.
pub(super) fn find_either(haystack: &[u8], a: u8, b: u8) -> Option<usize> {
    let (splat_a, splat_b) = (splat(a), splat(b));
    swar_find(
        haystack,
        |word| zero_bytes(word ^ splat_a) | zero_bytes(word ^ splat_b),
        |x| x == a || x == b,
    )
}

/// The first `byte` in `haystack`.
pub(super) fn find_byte(haystack: &[u8], byte: u8) -> Option<usize> {
    let splat_byte = splat(byte);
    swar_find(
        haystack,
        |word| zero_bytes(word ^ splat_byte),
        |x| x == byte,
    )
}

const ONES: u64 = u64::from_le_bytes([0x01; 8]);

/// `byte` in each of a word's eight bytes.
fn splat(byte: u8) -> u64 {
    ONES * u64::from(byte)
}

/// The high bit of each zero byte of `word`. Bits above the lowest may be false positives (a
/// borrow runs upwards); the lowest is exact, and the lowest is all [`swar_find`] uses.
fn zero_bytes(word: u64) -> u64 {
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    word.wrapping_sub(ONES) & !word & HIGHS
}

/// Searches eight bytes at a time (SWAR, in safe code): `hits` marks matching bytes of a
/// little-endian word as [`zero_bytes`] does; `is` tests the bytes of the short tail.
fn swar_find(haystack: &[u8], hits: impl Fn(u64) -> u64, is: impl Fn(u8) -> bool) -> Option<usize> {
    let mut words = haystack.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let found = hits(u64::from_le_bytes(word.try_into().unwrap_or_default()));
        if found != 0 {
            return Some(offset + (found.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&x| is(x))
        .map(|i| offset + i)
}

/// Where the key `"usage"` (its opening quote) first occurs in `bytes`. Searches for its `g`,
/// rare in chunks (llama.cpp's have none besides this key's), eight bytes at a time: this beats
/// std's substring search on event-sized inputs, whose searcher is set up anew on every call.
pub(super) fn find_usage_key(bytes: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b"\"usage\"";
    let mut from = 4;
    while let Some(at) = bytes.get(from..).and_then(|rest| find_byte(rest, b'g')) {
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
        fn word_at_a_time_search_finds_the_first_match(
            bytes in prop::collection::vec(prop::sample::select(&b"usage\"\r\n\\gx\x80\xff"[..]), 0..80),
            start in 0usize..8,
        ) {
            let bytes = &bytes[start.min(bytes.len())..];
            let naive = |a: u8, b: u8| bytes.iter().position(|&x| x == a || x == b);
            prop_assert_eq!(find_either(bytes, b'\n', b'\r'), naive(b'\n', b'\r'), "line breaks in {:?}", bytes);
            prop_assert_eq!(find_either(bytes, b'"', b'\\'), naive(b'"', b'\\'), "string ends in {:?}", bytes);
            prop_assert_eq!(find_byte(bytes, b'\xff'), naive(b'\xff', b'\xff'), "0xff in {:?}", bytes);
            prop_assert_eq!(
                find_usage_key(bytes),
                bytes.windows(7).position(|w| w == b"\"usage\""),
                "the usage key in {:?}", bytes
            );
        }
    }
}
