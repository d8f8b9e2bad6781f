//! One ledger line: the fields of a finished request ([`LedgerEntry`]) and their JSON text, made
//! once per request and handed as the same bytes to every sink (the file, PostgreSQL, the spool).

use bytes::Bytes;
use serde::Serialize;

use crate::accounting::cost::{decimal, Cost};

/// One finished request.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LedgerEntry {
    /// A UUID the gateway makes for each request: unique, unlike `request_id`, which is the
    /// client's `x-request-id` when it sent one. The primary key of the PostgreSQL table.
    pub(crate) id: uuid::Uuid,
    /// RFC 3339, UTC, milliseconds.
    pub(crate) time: String,
    pub(crate) request_id: String,
    pub(crate) key: String,
    /// The key's group (`null` without one).
    pub(crate) group: Option<String>,
    pub(crate) model: String,
    pub(crate) endpoint: &'static str,
    /// The upstream pool's name (`none` for a request no pool served).
    pub(crate) upstream: String,
    pub(crate) status: u16,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// prompt × prompt price + completion × completion price, in currency units, printed exactly
    /// from nano-units (`0.000135`); `null` when the price table has no price for the model.
    pub(crate) cost: Option<Cost>,
    /// `reported` by the upstream, or `estimated` by the gateway.
    pub(crate) source: &'static str,
    pub(crate) duration_ms: f64,
    /// Time to the first byte of a streamed answer.
    pub(crate) ttft_ms: Option<f64>,
    /// `complete`, `client_gone`, `upstream_error`.
    pub(crate) outcome: &'static str,
}

impl LedgerEntry {
    /// The entry as one JSON line, `\n` included: the same bytes as serializing the struct
    /// (`Serialize`, which the console's API uses), written field by field. Why by hand: this
    /// is on every request, and the generic serializer escapes every string byte by byte — also
    /// the id, the time and the fixed words, which never hold a character to escape. Strings
    /// that might (names, the client's request id) and numbers go through `serde_json`.
    pub(crate) fn to_line(&self) -> Bytes {
        let mut out = Vec::with_capacity(384);
        let mut uuid = uuid::Uuid::encode_buffer();
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(self.id.hyphenated().encode_lower(&mut uuid).as_bytes());
        out.extend_from_slice(b"\",\"time\":");
        json_str(&mut out, &self.time);
        out.extend_from_slice(b",\"request_id\":");
        json_str(&mut out, &self.request_id);
        out.extend_from_slice(b",\"key\":");
        json_str(&mut out, &self.key);
        out.extend_from_slice(b",\"group\":");
        match &self.group {
            Some(group) => json_str(&mut out, group),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"model\":");
        json_str(&mut out, &self.model);
        out.extend_from_slice(b",\"endpoint\":");
        json_str(&mut out, self.endpoint);
        out.extend_from_slice(b",\"upstream\":");
        json_str(&mut out, &self.upstream);
        out.extend_from_slice(b",\"status\":");
        json_number(&mut out, self.status);
        out.extend_from_slice(b",\"prompt_tokens\":");
        json_number(&mut out, self.prompt_tokens);
        out.extend_from_slice(b",\"completion_tokens\":");
        json_number(&mut out, self.completion_tokens);
        out.extend_from_slice(b",\"cost\":");
        match self.cost {
            Some(cost) => out.extend_from_slice(decimal(u128::from(cost.0)).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"source\":");
        json_str(&mut out, self.source);
        out.extend_from_slice(b",\"duration_ms\":");
        json_number(&mut out, self.duration_ms);
        out.extend_from_slice(b",\"ttft_ms\":");
        match self.ttft_ms {
            Some(ttft) => json_number(&mut out, ttft),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"outcome\":");
        json_str(&mut out, self.outcome);
        out.extend_from_slice(b"}\n");
        Bytes::from(out)
    }
}

/// `text` as a JSON string: copied as it is when nothing in it needs an escape (the usual case),
/// else escaped by `serde_json`.
fn json_str(out: &mut Vec<u8>, text: &str) {
    let plain = text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    if plain {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, text).is_err() {
        // Writing into a Vec cannot fail.
        out.extend_from_slice(b"\"\"");
    }
}

/// A number as `serde_json` writes it (a float that is not finite as `null`).
fn json_number(out: &mut Vec<u8>, value: impl Serialize) {
    if serde_json::to_writer(&mut *out, &value).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// Now, as the ledger writes it.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A ledger line for tests: request `r{n}` with `n` prompt tokens.
#[cfg(test)]
pub(crate) fn sample_entry(n: u64) -> LedgerEntry {
    LedgerEntry {
        id: uuid::Uuid::new_v4(),
        time: now_rfc3339(),
        request_id: format!("r{n}"),
        key: "k".into(),
        group: None,
        model: "m".into(),
        endpoint: "chat_completions",
        upstream: "default".into(),
        status: 200,
        prompt_tokens: n,
        completion_tokens: 1,
        cost: None,
        source: "reported",
        duration_ms: 1.0,
        ttft_ms: None,
        outcome: "complete",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The line as readers (`tollgate usage`, the spool, users' scripts) know it: every field,
    /// in this order, with these spellings.
    #[test]
    fn a_line_is_byte_for_byte_the_known_format() {
        let mut entry = sample_entry(12);
        entry.id = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        entry.time = "2026-12-03T06:00:00.123Z".into();
        entry.request_id = "req \"1\"\n".into();
        entry.key = "team-é".into();
        entry.upstream = "chat".into();
        entry.completion_tokens = 34;
        entry.duration_ms = 1.5;
        let expected = concat!(
            r#"{"id":"01234567-89ab-cdef-0123-456789abcdef","time":"2026-12-03T06:00:00.123Z","#,
            r#""request_id":"req \"1\"\n","key":"team-é","group":null,"model":"m","#,
            r#""endpoint":"chat_completions","upstream":"chat","status":200,"prompt_tokens":12,"#,
            r#""completion_tokens":34,"cost":null,"source":"reported","duration_ms":1.5,"#,
            r#""ttft_ms":null,"outcome":"complete"}"#,
            "\n"
        );
        assert_eq!(std::str::from_utf8(&entry.to_line()), Ok(expected));

        entry.group = Some("team-a".into());
        entry.cost = Some(Cost(135_000));
        entry.ttft_ms = Some(0.25);
        let line = entry.to_line();
        let text = std::str::from_utf8(&line).expect("utf-8");
        assert!(text.contains(r#""group":"team-a","#), "{text}");
        assert!(text.contains(r#""cost":0.000135,"#), "{text}");
        assert!(text.contains(r#""ttft_ms":0.25,"#), "{text}");
    }

    /// The hand-written line is the derived serializer's, byte for byte, whatever the strings.
    #[test]
    fn a_line_is_what_the_serializer_writes() {
        let texts = [
            "",
            "plain",
            "quote \" backslash \\ slash /",
            "control \u{1} \u{1f} tab\t newline\n",
            "del \u{7f} é ✓ 🦀",
            "</script>",
        ];
        for (i, text) in texts.iter().enumerate() {
            let mut entry = sample_entry(i as u64);
            entry.request_id = (*text).into();
            entry.key = format!("k{text}");
            entry.model = (*text).into();
            entry.upstream = (*text).into();
            entry.group = (i % 2 == 0).then(|| (*text).to_owned());
            entry.cost = (i % 3 == 0).then_some(Cost(i as u64 * 1_234_567));
            entry.ttft_ms = (i % 2 == 1).then_some(i as f64 / 3.0);
            entry.duration_ms = [0.0, 1e-7, 123456.789, f64::NAN, 1e21, 2.5][i];
            entry.status = [200, 499, 502, 0, 65535, 404][i];
            entry.prompt_tokens = u64::MAX >> i;
            let mut expected = serde_json::to_vec(&entry).expect("serializes");
            expected.push(b'\n');
            assert_eq!(
                String::from_utf8_lossy(&entry.to_line()),
                String::from_utf8_lossy(&expected),
                "{text:?}"
            );
        }
    }
}
