//! A forward-only JSON cursor: reads what its caller asks for and skips the rest lexically,
//! without validating or allocating, and counts the characters a JSON string stands for.
//!
//! Edge cases: an escape counts as the one character it stands for, a `\uD83D\uDE00` surrogate
//! pair as one; nesting it descends into is fixed by its callers, and `skip_value` is a loop, so no
//! input can make it recurse deeply.

use super::search::{find_either, utf8_chars};

/// Characters a JSON string's text (as written, between its quotes) stands for: each escape is
/// one character, and a `\uD83D\uDE00` surrogate pair one character in all.
pub(super) fn escaped_chars(raw: &[u8]) -> u64 {
    let mut chars = utf8_chars(raw);
    let mut i = 0;
    while let Some(at) = raw
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\\'))
    {
        let escape = i + at;
        if raw.get(escape + 1) == Some(&b'u') {
            // Six bytes for one character; a low surrogate belongs to the high one before it.
            let low_surrogate = matches!(
                raw.get(escape + 2..escape + 4),
                Some([b'd' | b'D', b'c'..=b'f' | b'C'..=b'F'])
            );
            chars = chars.saturating_sub(if low_surrogate { 6 } else { 5 });
            i = escape + 6;
        } else {
            chars = chars.saturating_sub(1);
            i = escape + 2;
        }
    }
    chars
}

/// A forward-only reader of JSON text that looks at what it is asked for and skips the rest
/// lexically, without validating or allocating. Nesting it descends into is fixed by its callers;
/// `skip_value` is a loop, so no input can make it recurse deeply.
pub(super) struct Cursor<'a> {
    json: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(json: &'a [u8]) -> Self {
        let mut cursor = Cursor { json, pos: 0 };
        cursor.skip_ws();
        cursor
    }

    /// The offset in the JSON text the cursor has reached.
    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    fn skip_ws(&mut self) {
        while matches!(self.json.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.json.get(self.pos).copied()
    }

    /// Whether only whitespace is left.
    pub(super) fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.pos == self.json.len()
    }

    /// Reads the string at the cursor: its bytes between the quotes, escapes as written.
    pub(super) fn string(&mut self) -> Option<&'a [u8]> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.pos + 1;
        let mut i = start;
        loop {
            i += find_either(self.json.get(i..)?, b'"', b'\\')?;
            if self.json[i] == b'"' {
                self.pos = i + 1;
                return Some(&self.json[start..i]);
            }
            i += 2; // a backslash and the byte it escapes
        }
    }

    /// Skips the value at the cursor and the whitespace after it.
    pub(super) fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                let rest = &self.json[self.pos..];
                let len = rest
                    .iter()
                    .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                    .unwrap_or(rest.len());
                if len == 0 {
                    return None;
                }
                self.pos += len;
            }
        }
        self.skip_ws();
        Some(())
    }

    /// Reads the object at the cursor member by member: `member` gets each key (as written), where
    /// the key's opening quote is, and the cursor at the value, and must skip or read the value.
    pub(super) fn object(
        &mut self,
        member: impl FnMut(&'a [u8], usize, &mut Self) -> Option<()>,
    ) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            self.skip_ws();
            return Some(());
        }
        self.members(member)
    }

    /// A cursor at `pos` of `json`, where an earlier walk of the same bytes stood.
    pub(super) fn resume(json: &'a [u8], pos: usize) -> Self {
        Cursor { json, pos }
    }

    /// The rest of an object read by [`Cursor::object`], from the key at the cursor on: where a
    /// walk resumes in the middle of an object.
    pub(super) fn members(
        &mut self,
        mut member: impl FnMut(&'a [u8], usize, &mut Self) -> Option<()>,
    ) -> Option<()> {
        loop {
            let key_start = self.pos;
            let key = self.string()?;
            self.skip_ws();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            self.skip_ws();
            member(key, key_start, self)?;
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_ws();
                }
                b'}' => {
                    self.pos += 1;
                    self.skip_ws();
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Reads the array at the cursor element by element: `element` gets the cursor at each one.
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        if self.peek()? != b'[' {
            return None;
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek()? == b']' {
            self.pos += 1;
            self.skip_ws();
            return Some(());
        }
        loop {
            element(self)?;
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_ws();
                }
                b']' => {
                    self.pos += 1;
                    self.skip_ws();
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// [`Cursor::object`] if the value is an object; any other value is skipped.
    pub(super) fn each_member(
        &mut self,
        member: impl FnMut(&'a [u8], usize, &mut Self) -> Option<()>,
    ) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(member),
            _ => self.skip_value(),
        }
    }

    /// [`Cursor::array`] if the value is an array; any other value is skipped.
    pub(super) fn each_element(
        &mut self,
        element: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        match self.peek()? {
            b'[' => self.array(element),
            _ => self.skip_value(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// `text` written with every non-ASCII character as `\uXXXX` (surrogate pairs beyond the
    /// BMP), in either case, as some servers write JSON.
    fn ascii_escaped(text: &str, upper: bool) -> String {
        let mut out = String::from("\"");
        for c in text.chars() {
            match c {
                '"' => out += "\\\"",
                '\\' => out += "\\\\",
                c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
                c => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        out += &if upper {
                            format!("\\u{unit:04X}")
                        } else {
                            format!("\\u{unit:04x}")
                        };
                    }
                }
            }
        }
        out + "\""
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn escapes_count_as_the_characters_they_stand_for(text in any::<String>(), upper in any::<bool>()) {
            let serde_written = serde_json::to_string(&text).expect("a string serializes");
            let ascii_written = ascii_escaped(&text, upper);
            let parsed: String = serde_json::from_str(&ascii_written).expect("the test's escaping is JSON");
            prop_assert_eq!(&parsed, &text, "the test's escaping round-trips");
            for written in [serde_written, ascii_written] {
                let raw = &written.as_bytes()[1..written.len() - 1];
                prop_assert_eq!(escaped_chars(raw), text.chars().count() as u64, "{}", written);
            }
        }
    }

    #[test]
    fn escapes_in_generated_text() {
        for (raw, chars) in [
            (r#"plain"#, 5),
            (r#"a\"b\\c\n"#, 6),
            (r#"\u00e9\u00E9"#, 2),
            (r#"\ud83d\ude00 \uD83D\uDE00"#, 3),
            ("é😀", 2),
            (r#"\\u0041"#, 6),
        ] {
            assert_eq!(escaped_chars(raw.as_bytes()), chars, "{raw}");
        }
    }
}
