//! Ledger lines → one multi-row `INSERT … SELECT FROM unnest(arrays) ON CONFLICT (id) DO NOTHING`:
//! one array per column, one statement (prepared once per connection) per batch, whatever its
//! size. Idempotent: a line sent twice (a replay after a timeout that did commit) is one row.
//!
//! Lines are read straight from their JSON text into borrowed fields (no intermediate value per
//! line). Every field a line has is a column; `group` and `cost` (budgets) are filled when a line
//! has them, else NULL; `replica` is this gateway's.
//!
//! Edge cases: a line that is not a ledger line (a spool damaged by hand) is skipped and counted,
//! never sent, so that one bad line cannot stop the writer behind it; so is a `cost` that is not
//! a decimal number that fits `numeric(30,9)`.

use std::borrow::Cow;
use std::time::SystemTime;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};

use super::schema::quoted;

/// One ledger line, its strings borrowed from the line's bytes (`Cow` for a string with an
/// escape). Unknown fields are ignored: a newer gateway's line still loads.
#[derive(Deserialize)]
struct Line<'a> {
    id: uuid::Uuid,
    time: &'a str,
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    #[serde(borrow)]
    key: Cow<'a, str>,
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(borrow)]
    endpoint: Cow<'a, str>,
    /// The upstream pool; lines written before pools had none.
    #[serde(default, borrow)]
    upstream: Option<Cow<'a, str>>,
    status: u16,
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(borrow)]
    source: Cow<'a, str>,
    duration_ms: f64,
    ttft_ms: Option<f64>,
    #[serde(borrow)]
    outcome: Cow<'a, str>,
    #[serde(default, borrow)]
    group: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    cost: Option<&'a RawValue>,
}

/// A line's values in column types, checked so that PostgreSQL takes them.
struct Row<'a> {
    line: Line<'a>,
    time: SystemTime,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost: Option<&'a str>,
}

/// Parses and checks one line; `None` when it is not a ledger line PostgreSQL would take.
fn row(bytes: &[u8]) -> Option<Row<'_>> {
    let line: Line<'_> = serde_json::from_slice(bytes).ok()?;
    let time = humantime::parse_rfc3339(line.time).ok()?;
    let prompt_tokens = i64::try_from(line.prompt_tokens).ok()?;
    let completion_tokens = i64::try_from(line.completion_tokens).ok()?;
    let cost = match line.cost {
        None => None,
        Some(raw) => Some(decimal(raw.get())?),
    };
    let texts = [
        &*line.request_id,
        &line.key,
        &line.model,
        &line.endpoint,
        &line.source,
        &line.outcome,
    ];
    // PostgreSQL's text cannot hold a NUL; the gateway never writes one.
    if texts
        .iter()
        .chain(line.group.as_deref().as_ref())
        .chain(line.upstream.as_deref().as_ref())
        .any(|t| t.contains('\0'))
    {
        return None;
    }
    Some(Row {
        time,
        prompt_tokens,
        completion_tokens,
        cost,
        line,
    })
}

/// A JSON number's text that fits `numeric(30,9)`: at most 21 digits before the point.
fn decimal(text: &str) -> Option<&str> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let integer = digits.split(['.', 'e', 'E']).next().unwrap_or("");
    let plain = digits.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    (plain && !integer.is_empty() && integer.len() <= 21).then_some(text)
}

/// The insert statement for `table`: `$1`…`$16` are the column arrays, `$17` the replica.
pub(super) fn insert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {} (id, time, request_id, replica, key, model, endpoint, status, \
         prompt_tokens, completion_tokens, source, duration_ms, ttft_ms, outcome, \"group\", cost, \
         upstream) \
         SELECT u.id, u.time, u.request_id, $17, u.key, u.model, u.endpoint, u.status, \
         u.prompt_tokens, u.completion_tokens, u.source, u.duration_ms, u.ttft_ms, u.outcome, \
         u.grp, u.cost::numeric(30,9), u.upstream \
         FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::int4[], $8::int8[], $9::int8[], $10::text[], $11::float8[], \
         $12::float8[], $13::text[], $14::text[], $15::text[], $16::text[]) \
         AS u(id, time, request_id, key, model, endpoint, status, prompt_tokens, \
         completion_tokens, source, duration_ms, ttft_ms, outcome, grp, cost, upstream) \
         ON CONFLICT (id) DO NOTHING",
        quoted(table)
    )
}

/// The lines of a batch as column arrays.
#[derive(Default)]
pub(super) struct Columns<'a> {
    rows: Vec<Row<'a>>,
    /// Lines that were not ledger lines.
    pub(super) malformed: u64,
}

impl<'a> Columns<'a> {
    /// Parses every line (`\n` or not at its end).
    pub(super) fn parse(lines: impl Iterator<Item = &'a [u8]>) -> Columns<'a> {
        let mut columns = Columns::default();
        for bytes in lines {
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match row(bytes) {
                Some(row) => columns.rows.push(row),
                None => columns.malformed += 1,
            }
        }
        columns
    }

    /// Inserts every row with `statement` (from [`insert_sql`]); returns the rows that were new.
    pub(super) async fn insert(
        &self,
        client: &Client,
        statement: &Statement,
        replica: &str,
    ) -> Result<u64, tokio_postgres::Error> {
        if self.rows.is_empty() {
            return Ok(0);
        }
        let rows = &self.rows;
        let text = |field: for<'r> fn(&'r Line<'a>) -> &'r str| -> Vec<&str> {
            rows.iter().map(|row| field(&row.line)).collect()
        };
        let id: Vec<uuid::Uuid> = rows.iter().map(|r| r.line.id).collect();
        let time: Vec<SystemTime> = rows.iter().map(|r| r.time).collect();
        let request_id = text(|l| &l.request_id);
        let key = text(|l| &l.key);
        let model = text(|l| &l.model);
        let endpoint = text(|l| &l.endpoint);
        let status: Vec<i32> = rows.iter().map(|r| i32::from(r.line.status)).collect();
        let prompt: Vec<i64> = rows.iter().map(|r| r.prompt_tokens).collect();
        let completion: Vec<i64> = rows.iter().map(|r| r.completion_tokens).collect();
        let source = text(|l| &l.source);
        let duration: Vec<f64> = rows.iter().map(|r| r.line.duration_ms).collect();
        let ttft: Vec<Option<f64>> = rows.iter().map(|r| r.line.ttft_ms).collect();
        let outcome = text(|l| &l.outcome);
        let group: Vec<Option<&str>> = rows.iter().map(|r| r.line.group.as_deref()).collect();
        let cost: Vec<Option<&str>> = rows.iter().map(|r| r.cost).collect();
        let upstream: Vec<Option<&str>> = rows.iter().map(|r| r.line.upstream.as_deref()).collect();
        let params: [&(dyn ToSql + Sync); 17] = [
            &id,
            &time,
            &request_id,
            &key,
            &model,
            &endpoint,
            &status,
            &prompt,
            &completion,
            &source,
            &duration,
            &ttft,
            &outcome,
            &group,
            &cost,
            &upstream,
            &replica,
        ];
        client.execute(statement, &params).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::ledger::sample_entry;

    #[test]
    fn a_gateway_line_parses_and_damaged_lines_are_counted_not_sent() {
        let entry = sample_entry(7);
        let text = String::from_utf8(entry.to_line().to_vec()).expect("utf-8");
        let with_budget = text
            .replace("\"group\":null", "\"group\":\"team-a\"")
            .replace("\"cost\":null", "\"cost\":0.000123456");
        let bad_time = text.replace(&entry.time, "yesterday");
        let huge_cost = text.replace("\"cost\":null", "\"cost\":1e30");
        let lines = [
            text.as_bytes(),
            with_budget.as_bytes(),
            b"\n",
            b"{\"not\":\"a line\"}",
            bad_time.as_bytes(),
            huge_cost.as_bytes(),
            &text.as_bytes()[..40],
        ];
        let columns = Columns::parse(lines.into_iter());
        assert_eq!(columns.rows.len(), 2, "the two ledger lines");
        assert_eq!(columns.malformed, 4, "the blank line is not counted");
        assert_eq!(columns.rows[1].line.group.as_deref(), Some("team-a"));
        assert_eq!(
            columns.rows[1].cost,
            Some("0.000123456"),
            "the number's own text"
        );
        assert_eq!(columns.rows[0].prompt_tokens, 7);
        assert_eq!(columns.rows[0].line.upstream.as_deref(), Some("default"));
    }

    #[test]
    fn decimals_that_fit_numeric_30_9() {
        assert_eq!(decimal("12.5"), Some("12.5"));
        assert_eq!(decimal("-0.000000001"), Some("-0.000000001"));
        assert_eq!(
            decimal("123456789012345678901.5"),
            Some("123456789012345678901.5")
        );
        assert_eq!(decimal("1234567890123456789012"), None, "22 digits");
        assert_eq!(
            decimal("1e3"),
            None,
            "exponents are not written by the gateway"
        );
        assert_eq!(decimal("\"1.5\""), None, "a string");
    }
}
