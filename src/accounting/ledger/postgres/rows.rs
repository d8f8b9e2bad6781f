//! Ledger lines → one multi-row `INSERT … SELECT FROM unnest(arrays) ON CONFLICT (id) DO NOTHING`:
//! one array per column, one statement (prepared once per connection) per batch, whatever its
//! size. Idempotent: a line sent twice (a replay after a timeout that did commit) is one row.
//!
//! A request's row is built from its [`LedgerEntry`] (no JSON to parse); lines from the spool are
//! read straight from their JSON text into borrowed fields (no intermediate value per line).
//! Every field a line has is a column; `group` and `cost` (budgets) are filled when a line has
//! them, else NULL; `replica` is this gateway's.
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
use crate::accounting::cost::decimal as decimal_of;
use crate::accounting::ledger::LedgerEntry;

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
    id: uuid::Uuid,
    time: SystemTime,
    request_id: Cow<'a, str>,
    key: Cow<'a, str>,
    model: Cow<'a, str>,
    endpoint: Cow<'a, str>,
    upstream: Option<Cow<'a, str>>,
    status: i32,
    prompt_tokens: i64,
    completion_tokens: i64,
    source: Cow<'a, str>,
    duration_ms: f64,
    ttft_ms: Option<f64>,
    outcome: Cow<'a, str>,
    group: Option<Cow<'a, str>>,
    cost: Option<Cow<'a, str>>,
}

impl<'a> Row<'a> {
    /// A request's row, borrowed from its entry; `None` when PostgreSQL would not take it.
    fn of_entry(entry: &'a LedgerEntry) -> Option<Row<'a>> {
        Row {
            id: entry.id,
            time: humantime::parse_rfc3339(&entry.time).ok()?,
            request_id: Cow::Borrowed(&entry.request_id),
            key: Cow::Borrowed(&entry.key),
            model: Cow::Borrowed(&entry.model),
            endpoint: Cow::Borrowed(entry.endpoint),
            upstream: Some(Cow::Borrowed(&entry.upstream)),
            status: i32::from(entry.status),
            prompt_tokens: i64::try_from(entry.prompt_tokens).ok()?,
            completion_tokens: i64::try_from(entry.completion_tokens).ok()?,
            source: Cow::Borrowed(entry.source),
            duration_ms: entry.duration_ms,
            ttft_ms: entry.ttft_ms,
            outcome: Cow::Borrowed(entry.outcome),
            group: entry.group.as_deref().map(Cow::Borrowed),
            // The same digits the line prints.
            cost: entry
                .cost
                .map(|cost| Cow::Owned(decimal_of(u128::from(cost.0)))),
        }
        .checked()
    }

    /// Parses and checks one line; `None` when it is not a ledger line PostgreSQL would take.
    fn of_line(bytes: &'a [u8]) -> Option<Row<'a>> {
        let line: Line<'a> = serde_json::from_slice(bytes).ok()?;
        let cost = match line.cost {
            None => None,
            Some(raw) => Some(Cow::Borrowed(decimal(raw.get())?)),
        };
        Row {
            id: line.id,
            time: humantime::parse_rfc3339(line.time).ok()?,
            request_id: line.request_id,
            key: line.key,
            model: line.model,
            endpoint: line.endpoint,
            upstream: line.upstream,
            status: i32::from(line.status),
            prompt_tokens: i64::try_from(line.prompt_tokens).ok()?,
            completion_tokens: i64::try_from(line.completion_tokens).ok()?,
            source: line.source,
            duration_ms: line.duration_ms,
            ttft_ms: line.ttft_ms,
            outcome: line.outcome,
            group: line.group,
            cost,
        }
        .checked()
    }

    /// The row, unless a text holds a NUL (PostgreSQL's text cannot; the gateway never writes
    /// one) or its cost does not fit `numeric(30,9)`.
    fn checked(self) -> Option<Row<'a>> {
        let texts = [
            &*self.request_id,
            &self.key,
            &self.model,
            &self.endpoint,
            &self.source,
            &self.outcome,
        ];
        let nul = texts
            .iter()
            .copied()
            .chain(self.group.as_deref())
            .chain(self.upstream.as_deref())
            .any(|t| t.contains('\0'));
        let cost_fits = self.cost.as_deref().is_none_or(|c| decimal(c).is_some());
        (!nul && cost_fits).then_some(self)
    }
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
            columns.push(Row::of_line(bytes));
        }
        columns
    }

    /// The rows of requests' entries.
    pub(super) fn of_entries(entries: impl Iterator<Item = &'a LedgerEntry>) -> Columns<'a> {
        let mut columns = Columns::default();
        for entry in entries {
            columns.push(Row::of_entry(entry));
        }
        columns
    }

    fn push(&mut self, row: Option<Row<'a>>) {
        match row {
            Some(row) => self.rows.push(row),
            None => self.malformed += 1,
        }
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
        let text = |field: for<'r> fn(&'r Row<'a>) -> &'r str| -> Vec<&str> {
            rows.iter().map(field).collect()
        };
        let id: Vec<uuid::Uuid> = rows.iter().map(|r| r.id).collect();
        let time: Vec<SystemTime> = rows.iter().map(|r| r.time).collect();
        let request_id = text(|r| &r.request_id);
        let key = text(|r| &r.key);
        let model = text(|r| &r.model);
        let endpoint = text(|r| &r.endpoint);
        let status: Vec<i32> = rows.iter().map(|r| r.status).collect();
        let prompt: Vec<i64> = rows.iter().map(|r| r.prompt_tokens).collect();
        let completion: Vec<i64> = rows.iter().map(|r| r.completion_tokens).collect();
        let source = text(|r| &r.source);
        let duration: Vec<f64> = rows.iter().map(|r| r.duration_ms).collect();
        let ttft: Vec<Option<f64>> = rows.iter().map(|r| r.ttft_ms).collect();
        let outcome = text(|r| &r.outcome);
        let group: Vec<Option<&str>> = rows.iter().map(|r| r.group.as_deref()).collect();
        let cost: Vec<Option<&str>> = rows.iter().map(|r| r.cost.as_deref()).collect();
        let upstream: Vec<Option<&str>> = rows.iter().map(|r| r.upstream.as_deref()).collect();
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
        assert_eq!(columns.rows[1].group.as_deref(), Some("team-a"));
        assert_eq!(
            columns.rows[1].cost.as_deref(),
            Some("0.000123456"),
            "the number's own text"
        );
        assert_eq!(columns.rows[0].prompt_tokens, 7);
        assert_eq!(columns.rows[0].upstream.as_deref(), Some("default"));
    }

    /// Every column of a row, as text, for comparing two rows.
    fn columns_of(row: &Row<'_>) -> String {
        format!(
            "{} {:?} {} {} {} {} {:?} {} {} {} {} {} {:?} {} {:?} {:?}",
            row.id,
            row.time,
            row.request_id,
            row.key,
            row.model,
            row.endpoint,
            row.upstream,
            row.status,
            row.prompt_tokens,
            row.completion_tokens,
            row.source,
            row.duration_ms,
            row.ttft_ms,
            row.outcome,
            row.group,
            row.cost,
        )
    }

    #[test]
    fn a_row_from_the_entry_equals_the_row_from_its_line() {
        let plain = sample_entry(7);
        let mut budgeted = sample_entry(8);
        budgeted.group = Some("team-a".into());
        budgeted.cost = Some(crate::accounting::cost::Cost(123_456));
        budgeted.ttft_ms = Some(12.5);
        budgeted.key = "k \"quoted\" é".into();
        let entries = [plain, budgeted];
        let lines: Vec<bytes::Bytes> = entries.iter().map(LedgerEntry::to_line).collect();
        let from_entries = Columns::of_entries(entries.iter());
        let from_lines = Columns::parse(lines.iter().map(|l| &l[..]));
        assert_eq!(from_entries.rows.len(), 2);
        assert_eq!(from_lines.rows.len(), 2);
        for (a, b) in from_entries.rows.iter().zip(&from_lines.rows) {
            assert_eq!(columns_of(a), columns_of(b));
        }
        assert_eq!(from_entries.rows[1].cost.as_deref(), Some("0.000123456"));

        let mut bad = sample_entry(9);
        bad.request_id = "a\0b".into();
        let bad = [bad];
        let columns = Columns::of_entries(bad.iter());
        assert_eq!(
            (columns.rows.len(), columns.malformed),
            (0, 1),
            "a NUL is refused"
        );
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
