//! `tollgate usage --postgres-url-env VAR [--table T]`: the same report as from a ledger file,
//! computed by PostgreSQL over the ledger table — one `GROUP BY` with a grouping set for the
//! total row, so the rows never leave the database and the time index serves `--since`.
//!
//! The figures are the file report's to the digit:
//! - durations become microseconds as the file report rounds them (half away from zero, below 0
//!   is 0), written out in SQL because PostgreSQL's `round(float8)` rounds half to even;
//! - percentiles are nearest-rank (`percentile_disc`), asked for at `p − 1e-12` because
//!   PostgreSQL takes the row `ceil(p × n)` in floating point, where `0.99 × n` may land a hair
//!   above an integer; the shift is exact up to 10⁹ rows per group;
//! - they are then read as the file report's histogram reads them ([`as_histogram_reads`]):
//!   3 significant digits, or the group's maximum past 2.8 hours;
//! - `--since` keeps rows at or after `now − since`, rounded up to PostgreSQL's microsecond;
//! - cost is summed as `numeric` (exact) and read as nano-units, as the file report adds them.

use std::time::{Duration, SystemTime};

use tokio_postgres::Row;

use super::report::{as_histogram_reads, GroupBy, Report, Summary, NO_GROUP};
use crate::accounting::ledger::postgres::schema::{quoted, valid_table_name};
use crate::accounting::ledger::postgres::{connect, describe, parse_url, tls};

/// Where the report reads from.
pub(crate) struct Table<'a> {
    /// The environment variable that holds the URL.
    pub(crate) url_env: &'a str,
    pub(crate) table: &'a str,
}

/// The report over the table, or the message for the user.
pub(crate) async fn aggregate(
    source: &Table<'_>,
    by: GroupBy,
    since: Option<Duration>,
    now: SystemTime,
) -> Result<Report, String> {
    if !valid_table_name(source.table) {
        return Err(format!(
            "--table {:?} is not a plain table name (lower-case letters, digits and _)",
            source.table
        ));
    }
    let url = std::env::var(source.url_env)
        .map_err(|_| format!("environment variable {} is not set", source.url_env))?;
    let config = parse_url(url.trim()).ok_or_else(|| {
        format!(
            "environment variable {} does not hold a postgres:// URL",
            source.url_env
        )
    })?;
    let tls = tls().map_err(|e| format!("cannot set up TLS: {e}"))?;
    let client = connect(&config, &tls)
        .await
        .map_err(|e| format!("cannot connect to PostgreSQL: {}", describe(&e)))?;
    let cutoff = since.map(|since| cutoff_micros(now, since));
    let rows = client
        .query(&query(source.table, by, cutoff.is_some()), &params(&cutoff))
        .await
        .map_err(|e| format!("cannot read the table {}: {}", source.table, describe(&e)))?;
    let mut report = Report {
        by,
        groups: Vec::with_capacity(rows.len()),
        total: Summary::new([0; 5], 0, [None; 4]),
        lines: 0,
        skipped: 0,
        first_skipped: None,
        before_since: 0,
    };
    for row in &rows {
        let summary = summary(row)?;
        match row.get::<_, Option<String>>("g") {
            Some(name) if row.get::<_, i32>("is_total") == 0 => report.groups.push((name, summary)),
            _ => report.total = summary,
        }
    }
    report.groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    report.lines = report.total.requests;
    Ok(report)
}

fn params(cutoff: &Option<SystemTime>) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    match cutoff {
        Some(cutoff) => vec![cutoff],
        None => Vec::new(),
    }
}

/// `now − since`, rounded up to the microsecond (PostgreSQL's precision): a row (whole
/// milliseconds) is kept exactly when the file report keeps its line.
fn cutoff_micros(now: SystemTime, since: Duration) -> SystemTime {
    let cutoff = now
        .checked_sub(since)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let micros = u64::try_from(cutoff.as_nanos().div_ceil(1000)).unwrap_or(u64::MAX);
    SystemTime::UNIX_EPOCH + Duration::from_micros(micros)
}

/// The report's query for `table` grouped `by`, with `$1` the cutoff when `since`.
fn query(table: &str, by: GroupBy, since: bool) -> String {
    let no_group = format!("coalesce(\"group\", '{NO_GROUP}')");
    let group = match by {
        GroupBy::Key => "key",
        GroupBy::Group => &no_group,
        GroupBy::Model => "model",
        GroupBy::Day => "to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    };
    let filter = if since {
        "WHERE time >= $1::timestamptz"
    } else {
        ""
    };
    // Microseconds as the file report makes them: round half away from zero, at least 0; NULL
    // stays NULL (`greatest` and `least` would skip it).
    let micros = |ms: &str| {
        format!(
            "CASE WHEN {ms} IS NOT NULL THEN greatest(0, least(9e18, \
             CASE WHEN {ms} * 1000 - trunc({ms} * 1000) >= 0.5 \
             THEN trunc({ms} * 1000) + 1 ELSE trunc({ms} * 1000) END))::int8 END"
        )
    };
    format!(
        "WITH r AS (
            SELECT {group} AS g, status, outcome, source, prompt_tokens, completion_tokens,
                   cost, {duration} AS us, {ttft} AS ttft_us
            FROM {table} {filter}
        )
        SELECT g, grouping(g) AS is_total,
            count(*)::int8 AS requests,
            count(*) FILTER (WHERE status >= 400 OR outcome <> 'complete')::int8 AS errors,
            {prompt} AS prompt, {completion} AS completion, {estimated} AS estimated,
            (coalesce(sum(cost), 0) * 1000000000)::numeric(40, 0)::text AS cost_nano,
            percentile_disc(0.5 - 1e-12) WITHIN GROUP (ORDER BY us) AS p50,
            percentile_disc(0.99 - 1e-12) WITHIN GROUP (ORDER BY us) AS p99,
            max(us) AS max,
            percentile_disc(0.5 - 1e-12) WITHIN GROUP (ORDER BY ttft_us) AS ttft_p50,
            percentile_disc(0.99 - 1e-12) WITHIN GROUP (ORDER BY ttft_us) AS ttft_p99,
            max(ttft_us) AS ttft_max
        FROM r GROUP BY GROUPING SETS ((g), ())",
        duration = micros("duration_ms"),
        ttft = micros("ttft_ms"),
        table = quoted(table),
        prompt = capped_sum("prompt_tokens", ""),
        completion = capped_sum("completion_tokens", ""),
        estimated = capped_sum(
            "prompt_tokens + completion_tokens",
            " FILTER (WHERE source = 'estimated')"
        ),
    )
}

/// A sum as an `int8` (0 without rows), at most `i64::MAX` where the file report saturates.
fn capped_sum(expression: &str, filter: &str) -> String {
    format!("least(coalesce(sum({expression}){filter}, 0), 9223372036854775807)::int8")
}

/// One result row as the report's figures.
fn summary(row: &Row) -> Result<Summary, String> {
    let count = |name: &str| u64::try_from(row.get::<_, i64>(name)).unwrap_or(0);
    let micros = |name: &str| {
        row.get::<_, Option<i64>>(name)
            .map(|us| u64::try_from(us).unwrap_or(0))
    };
    let read = |value: Option<u64>, max: Option<u64>| {
        value.map(|us| as_histogram_reads(us, max.unwrap_or(us)))
    };
    let (max, ttft_max) = (micros("max"), micros("ttft_max"));
    // The exact sum, in nano-units as the file report adds them (numeric(30,9) holds them); a
    // sum that does not read is an error, never a cost of 0.
    let cost_nano = row.get::<_, String>("cost_nano");
    let cost = cost_nano.parse().map_err(|_| {
        format!("the table's cost sum {cost_nano:?} is not a whole number of nano-units")
    })?;
    Ok(Summary::new(
        [
            count("requests"),
            count("errors"),
            count("prompt"),
            count("completion"),
            count("estimated"),
        ],
        cost,
        [
            read(micros("p50"), max),
            read(micros("p99"), max),
            read(micros("ttft_p50"), ttft_max),
            read(micros("ttft_p99"), ttft_max),
        ],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_rounds_up_to_the_microsecond() {
        let at = |nanos| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
        let second = Duration::from_secs(1);
        assert_eq!(cutoff_micros(at(10_000_000_400), second), at(9_000_001_000));
        assert_eq!(cutoff_micros(at(10_000_000_000), second), at(9_000_000_000));
    }
}
