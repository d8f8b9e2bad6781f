//! One ledger line: the fields of a finished request ([`LedgerEntry`]) and their JSON text, made
//! once per request and handed as the same bytes to every sink (the file, PostgreSQL, the spool).

use bytes::Bytes;
use serde::Serialize;

use crate::accounting::cost::Cost;

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
    /// The entry as one JSON line, `\n` included.
    pub(crate) fn to_line(&self) -> Bytes {
        let mut line = Vec::with_capacity(384);
        // Serializing plain fields into a Vec cannot fail.
        if serde_json::to_writer(&mut line, self).is_err() {
            line.clear();
        }
        line.push(b'\n');
        Bytes::from(line)
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
}
