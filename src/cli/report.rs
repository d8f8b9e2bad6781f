//! `tollgate usage`: a usage report over the ledger (`[ledger] path`), grouped by key, group,
//! model or UTC day, with each row's cost summed exactly (in nano-units, read from each line's
//! decimal text, never through a float) and printed with 9 decimals.
//!
//! The ledger is read once, line by line, into one reusable buffer; each line is deserialized
//! into a struct that borrows its strings from that buffer, folded into its group's figures, and
//! forgotten. Memory is O(groups), never O(lines): a group holds a few counters and two
//! [`Histogram`]s, whose pages are allocated only where samples land.
//!
//! Definitions (the README's "Usage report" section says the same for users):
//!
//! - a request is an **error** when its `status` is 400 or more (an upstream error status passed
//!   through) **or** its `outcome` is anything but `complete` (`client_gone`: the client left
//!   before the end; `upstream_error`: the upstream broke off or failed). Requests the gateway
//!   refused itself (401, 429, 400 from validation, 413…) never reach the ledger.
//! - **estimated %** is the share of tokens (prompt + completion) on lines whose `source` is
//!   `estimated`.
//! - **percentiles** are nearest-rank (the smallest sample with at least p% of the samples at or
//!   below it), read from a [`Histogram`]: the figure is that sample truncated to 3 significant
//!   digits of a microsecond count, so it is never above the true value and less than 1% below it.
//!   Time to first token counts only lines with a `ttft_ms` (streams).
//!
//! Edge cases: a line that is not a JSON object with the ledger's fields and types, has a `time`
//! that is not RFC 3339 UTC, or is longer than [`MAX_LINE`] bytes is skipped and counted (never a
//! panic); blank lines are ignored. `--since` keeps lines whose time is at or after `now - since`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, BufRead, Write};
use std::time::{Duration, SystemTime};

use serde::ser::SerializeMap;

use crate::accounting::cost;
use serde::{Deserialize, Serialize, Serializer};

/// Longest ledger line read; a longer one is skipped as malformed (its bytes are never held).
pub(crate) const MAX_LINE: usize = 1 << 20;

/// What the report's rows are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GroupBy {
    /// The client key's name.
    Key,
    /// The key's group (`[groups.NAME]`); `(none)` for keys in no group.
    Group,
    /// The model label.
    Model,
    /// The UTC date of the request's end (`YYYY-MM-DD`).
    Day,
}

impl GroupBy {
    /// The group column's name in every format.
    pub(crate) fn label(self) -> &'static str {
        match self {
            GroupBy::Key => "key",
            GroupBy::Group => "group",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
        }
    }
}

/// How the report is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns and a total row, for a terminal.
    Table,
    /// A header row, then one row per group (no total row).
    Csv,
    /// An array of objects, one per group (no total row).
    Json,
}

/// What to report.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    pub(crate) by: GroupBy,
    /// Keep only lines at or after `now - since`.
    pub(crate) since: Option<Duration>,
    /// "Now" for `since`: the clock, or a fixed time in tests.
    pub(crate) now: SystemTime,
}

/// One ledger line, borrowing its strings from the read buffer. Fields the report does not use
/// (`request_id`, `endpoint`) are skipped without being allocated.
#[derive(Deserialize)]
struct Line<'a> {
    time: &'a str,
    /// `Cow` so that a name with a JSON escape still parses (it is then the one allocation).
    #[serde(borrow)]
    key: Cow<'a, str>,
    /// Absent on lines written before groups.
    #[serde(borrow, default)]
    group: Option<Cow<'a, str>>,
    #[serde(borrow)]
    model: Cow<'a, str>,
    status: u16,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// The number's own text, read exactly; absent (older lines) or `null` is no cost.
    #[serde(borrow, default)]
    cost: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    source: Cow<'a, str>,
    duration_ms: f64,
    ttft_ms: Option<f64>,
    #[serde(borrow)]
    outcome: Cow<'a, str>,
}

/// Values below this many microseconds have a bucket each.
const EXACT_BELOW: u64 = 1_000;
/// Decades 10^3..10^DECADES µs have 900 buckets each (the 3 leading digits 100..=999).
const DECADES: u32 = 10;
/// Samples at or above this (10^10 µs ≈ 2.8 hours) share the last bucket, read back as the
/// group's exact maximum.
const OVERFLOW_AT: u64 = 10_u64.pow(DECADES);
const PER_DECADE: usize = 900;
const OVERFLOW: usize = EXACT_BELOW as usize + (DECADES as usize - 3) * PER_DECADE;
const BUCKETS: usize = OVERFLOW + 1;
/// Buckets per lazily allocated page: one leading digit of one decade.
const PAGE: usize = 100;
const PAGES: usize = BUCKETS.div_ceil(PAGE);

/// A log-linear histogram of durations with 3 significant decimal digits.
///
/// Kept by hand rather than `hdrhistogram`: measured on 1,000,000 samples in 1,000 groups,
/// hdrhistogram (3 significant figures, `lowest_equivalent` of `value_at_quantile`) took 2× the
/// time and 4× the memory (168 MB against 40 MB peak), because it allocates every bucket up front
/// where these pages are allocated only where samples land.
///
/// A sample is kept in microseconds; values below 1 ms have a bucket per microsecond, larger ones
/// a bucket per 3-digit prefix (`123_456 µs` → the bucket `[123_000, 124_000)`). A bucket is read
/// back as its lower bound, so a percentile is the true nearest-rank sample truncated to 3
/// significant digits: at most 0.9% low (`100_999` → `100_000`), never high. Samples of 2.8 hours
/// or more share one bucket that reads back as the exact maximum.
///
/// Size: 7,301 buckets of `u64`, in pages of 100 allocated on first use, so a group whose
/// durations span one decade holds under 8 KB; the worst case is about 59 KB.
#[derive(Debug, Clone)]
pub(crate) struct Histogram {
    pages: Vec<Option<Box<[u64; PAGE]>>>,
    count: u64,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    pub(crate) fn new() -> Histogram {
        Histogram {
            pages: Vec::new(),
            count: 0,
            max_us: 0,
        }
    }

    /// Adds a sample in milliseconds (rounded to the microsecond; negative counts as 0).
    pub(crate) fn record_ms(&mut self, ms: f64) {
        // `as` saturates: NaN and negatives become 0, huge values u64::MAX.
        self.record_us((ms * 1000.0).round() as u64);
    }

    /// Adds a sample in microseconds.
    pub(crate) fn record_us(&mut self, us: u64) {
        let index = bucket_of(us);
        if self.pages.is_empty() {
            self.pages.resize(PAGES, None);
        }
        if let Some(page) = self.pages.get_mut(index / PAGE) {
            let page = page.get_or_insert_with(|| Box::new([0; PAGE]));
            page[index % PAGE] += 1;
        }
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The nearest-rank percentile `per_mille / 10` in microseconds (truncated to 3 significant
    /// digits), or `None` without samples. `per_mille` is clamped to 1..=1000.
    pub(crate) fn percentile_us(&self, per_mille: u64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let per_mille = u128::from(per_mille.clamp(1, 1000));
        // ceil(count * p), at least 1; in u128 so that no count overflows.
        let rank = (u128::from(self.count) * per_mille).div_ceil(1000).max(1);
        let mut seen = 0u128;
        for (page_index, page) in self.pages.iter().enumerate() {
            let Some(page) = page else { continue };
            for (slot, &n) in page.iter().enumerate() {
                seen += u128::from(n);
                if seen >= rank {
                    let index = page_index * PAGE + slot;
                    return Some(if index == OVERFLOW {
                        self.max_us
                    } else {
                        lower_bound(index)
                    });
                }
            }
        }
        Some(self.max_us)
    }

    /// [`Histogram::percentile_us`] in milliseconds.
    #[cfg(test)]
    pub(crate) fn percentile_ms(&self, per_mille: u64) -> Option<f64> {
        self.percentile_us(per_mille).map(|us| us as f64 / 1000.0)
    }
}

/// The bucket holding `us`.
fn bucket_of(us: u64) -> usize {
    if us < EXACT_BELOW {
        return us as usize;
    }
    if us >= OVERFLOW_AT {
        return OVERFLOW;
    }
    let decade = us.ilog10(); // 3..DECADES
    let leading = us / 10_u64.pow(decade - 2); // 100..=999
    EXACT_BELOW as usize + (decade as usize - 3) * PER_DECADE + (leading as usize - 100)
}

/// The smallest value in bucket `index` (not the overflow bucket).
fn lower_bound(index: usize) -> u64 {
    if index < EXACT_BELOW as usize {
        return index as u64;
    }
    let offset = index - EXACT_BELOW as usize;
    let decade = (offset / PER_DECADE) as u32 + 3;
    let leading = (offset % PER_DECADE) as u64 + 100;
    leading * 10_u64.pow(decade - 2)
}

/// The figures of one group (or of all of them).
#[derive(Debug, Clone, Default)]
pub(crate) struct Stats {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// Prompt + completion tokens of lines whose source is `estimated`.
    pub(crate) estimated_tokens: u64,
    /// Nano-units of currency.
    pub(crate) cost: u128,
    pub(crate) duration: Histogram,
    /// Streams only (lines with a `ttft_ms`).
    pub(crate) ttft: Histogram,
}

impl Stats {
    fn add(&mut self, line: &Line<'_>, cost: u128) {
        self.requests += 1;
        self.cost = self.cost.saturating_add(cost);
        if line.status >= 400 || line.outcome != "complete" {
            self.errors += 1;
        }
        self.prompt_tokens = self.prompt_tokens.saturating_add(line.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(line.completion_tokens);
        if line.source == "estimated" {
            self.estimated_tokens = self
                .estimated_tokens
                .saturating_add(line.prompt_tokens.saturating_add(line.completion_tokens));
        }
        self.duration.record_ms(line.duration_ms);
        if let Some(ttft) = line.ttft_ms {
            self.ttft.record_ms(ttft);
        }
    }

    /// The figures a report shows.
    pub(crate) fn summary(&self) -> Summary {
        Summary::new(
            [
                self.requests,
                self.errors,
                self.prompt_tokens,
                self.completion_tokens,
                self.estimated_tokens,
            ],
            self.cost,
            [
                self.duration.percentile_us(500),
                self.duration.percentile_us(990),
                self.ttft.percentile_us(500),
                self.ttft.percentile_us(990),
            ],
        )
    }
}

/// A nearest-rank sample `us` as a [`Histogram`] of the same samples reads it back: truncated
/// to 3 significant digits, or the group's maximum `max_us` past the last bucket. What the report
/// from PostgreSQL applies to the exact percentiles the database computed.
pub(crate) fn as_histogram_reads(us: u64, max_us: u64) -> u64 {
    match bucket_of(us) {
        OVERFLOW => max_us,
        index => lower_bound(index),
    }
}

impl Summary {
    /// From the counts (requests, errors, prompt, completion, estimated tokens), the cost in
    /// nano-units and the percentiles in microseconds (p50, p99, ttft p50, ttft p99): the one
    /// place both the file and the PostgreSQL report make their figures.
    pub(crate) fn new(counts: [u64; 5], cost: u128, percentiles_us: [Option<u64>; 4]) -> Summary {
        let [requests, errors, prompt_tokens, completion_tokens, estimated_tokens] = counts;
        let tokens = prompt_tokens.saturating_add(completion_tokens);
        let ms = |us: Option<u64>| us.map(|us| us as f64 / 1000.0);
        Summary {
            requests,
            errors,
            error_pct: (requests > 0).then(|| errors as f64 * 100.0 / requests as f64),
            prompt_tokens,
            completion_tokens,
            cost,
            estimated_pct: (tokens > 0).then(|| estimated_tokens as f64 * 100.0 / tokens as f64),
            p50_ms: ms(percentiles_us[0]),
            p99_ms: ms(percentiles_us[1]),
            ttft_p50_ms: ms(percentiles_us[2]),
            ttft_p99_ms: ms(percentiles_us[3]),
        }
    }
}

/// One row of a report. `None` where a figure is undefined (no tokens, no streams).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Summary {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) error_pct: Option<f64>,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// Nano-units of currency.
    pub(crate) cost: u128,
    pub(crate) estimated_pct: Option<f64>,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) ttft_p50_ms: Option<f64>,
    pub(crate) ttft_p99_ms: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    pub(crate) by: GroupBy,
    /// Sorted by group name (so days are in order).
    pub(crate) groups: Vec<(String, Summary)>,
    pub(crate) total: Summary,
    /// Lines read, blank ones excepted.
    pub(crate) lines: u64,
    /// Malformed lines skipped.
    pub(crate) skipped: u64,
    /// The 1-based line number of the first malformed line.
    pub(crate) first_skipped: Option<u64>,
    /// Well-formed lines older than `since`.
    pub(crate) before_since: u64,
}

enum Read {
    Line,
    TooLong,
    End,
}

/// Reads the next line (without its `\n`) into `buf`, holding at most [`MAX_LINE`] bytes of it.
fn read_line<R: BufRead>(reader: &mut R, buf: &mut Vec<u8>) -> io::Result<Read> {
    buf.clear();
    let mut any = false;
    let mut too_long = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if available.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Read::End,
                (true, true) => Read::TooLong,
                (true, false) => Read::Line,
            });
        }
        any = true;
        let (used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (available.len(), false),
        };
        let chunk = &available[..used - usize::from(done)];
        if !too_long {
            if buf.len() + chunk.len() > MAX_LINE {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if done {
            return Ok(if too_long { Read::TooLong } else { Read::Line });
        }
    }
}

/// Folds every line of a ledger into a report. Fails only on a read error.
pub(crate) fn aggregate<R: BufRead>(mut reader: R, options: &Options) -> io::Result<Report> {
    let cutoff = options
        .since
        .and_then(|since| options.now.checked_sub(since));
    let mut groups: HashMap<Box<str>, Stats> = HashMap::new();
    let mut total = Stats::default();
    let mut report = Report {
        by: options.by,
        groups: Vec::new(),
        total: Summary::new([0; 5], 0, [None; 4]),
        lines: 0,
        skipped: 0,
        first_skipped: None,
        before_since: 0,
    };
    let mut number = 0u64;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let read = read_line(&mut reader, &mut buf)?;
        number += 1;
        let line = match read {
            Read::End => break,
            Read::TooLong => None,
            Read::Line if buf.iter().all(u8::is_ascii_whitespace) => continue,
            Read::Line => parse(&buf),
        };
        report.lines += 1;
        let Some((line, time, cost)) = line else {
            report.skipped += 1;
            report.first_skipped.get_or_insert(number);
            continue;
        };
        if cutoff.is_some_and(|cutoff| time < cutoff) {
            report.before_since += 1;
            continue;
        }
        let group: &str = match options.by {
            GroupBy::Key => &line.key,
            GroupBy::Group => line.group.as_deref().unwrap_or(NO_GROUP),
            GroupBy::Model => &line.model,
            // parse_rfc3339 checked that the first 10 bytes are the date.
            GroupBy::Day => line.time.get(..10).unwrap_or(line.time),
        };
        match groups.get_mut(group) {
            Some(stats) => stats.add(&line, cost),
            None => {
                let mut stats = Stats::default();
                stats.add(&line, cost);
                groups.insert(group.into(), stats);
            }
        }
        total.add(&line, cost);
    }
    report.total = total.summary();
    let mut groups: Vec<(String, Summary)> = groups
        .into_iter()
        .map(|(name, stats)| (name.into_string(), stats.summary()))
        .collect();
    groups.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    report.groups = groups;
    Ok(report)
}

/// The group column of lines whose key is in no group.
pub(crate) const NO_GROUP: &str = "(none)";

/// A well-formed line, its time and its cost in nano-units, or `None`.
fn parse(bytes: &[u8]) -> Option<(Line<'_>, SystemTime, u128)> {
    let line: Line<'_> = serde_json::from_slice(bytes).ok()?;
    let time = humantime::parse_rfc3339(line.time).ok()?;
    let cost = match line.cost.map(|raw| raw.get()) {
        None | Some("null") => 0,
        Some(text) => cost::parse(text)?,
    };
    Some((line, time, cost))
}

/// Writes `report` in `format`.
pub(crate) fn write(report: &Report, format: Format, out: &mut dyn Write) -> io::Result<()> {
    match format {
        Format::Table => write_table(report, out),
        Format::Csv => write_csv(report, out),
        Format::Json => write_json(report, out),
    }
}

/// The figure columns, after the group column, in every format.
pub(crate) const COLUMNS: [&str; 11] = [
    "requests",
    "errors",
    "error_pct",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "estimated_pct",
    "p50_ms",
    "p99_ms",
    "ttft_p50_ms",
    "ttft_p99_ms",
];

/// One figure of a row.
#[derive(Clone, Copy)]
enum Figure {
    Count(u64),
    /// Nano-units of currency, shown with 9 decimals (exact).
    Cost(u128),
    /// A percentage, shown to one decimal in text and 0.01 in JSON.
    Pct(Option<f64>),
    /// A percentile in milliseconds: at most 3 significant digits of microseconds, so `{}` shows
    /// it exactly.
    Ms(Option<f64>),
}

/// The figures of a row, in [`COLUMNS`] order: the one place that order is written.
fn figures(s: &Summary) -> [Figure; 11] {
    use Figure::{Cost, Count, Ms, Pct};
    [
        Count(s.requests),
        Count(s.errors),
        Pct(s.error_pct),
        Count(s.prompt_tokens),
        Count(s.completion_tokens),
        Cost(s.cost),
        Pct(s.estimated_pct),
        Ms(s.p50_ms),
        Ms(s.p99_ms),
        Ms(s.ttft_p50_ms),
        Ms(s.ttft_p99_ms),
    ]
}

/// The figures of a row as text; an undefined figure is `missing`.
fn cells(summary: &Summary, missing: &str) -> [String; 11] {
    figures(summary).map(|figure| match figure {
        Figure::Count(n) => n.to_string(),
        Figure::Cost(nano) => cost::fixed(nano),
        Figure::Pct(v) => v.map_or(missing.to_owned(), |v| format!("{v:.1}")),
        Figure::Ms(v) => v.map_or(missing.to_owned(), |v| format!("{v}")),
    })
}

fn write_table(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(report.groups.len() + 2);
    let mut header = vec![report.by.label().to_owned()];
    header.extend(COLUMNS.iter().map(|c| (*c).to_owned()));
    rows.push(header);
    for (name, stats) in &report.groups {
        let mut row = vec![name.clone()];
        row.extend(cells(stats, "-"));
        rows.push(row);
    }
    let mut total = vec!["total".to_owned()];
    total.extend(cells(&report.total, "-"));
    rows.push(total);

    let mut widths = vec![0; COLUMNS.len() + 1];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let rule = widths
        .iter()
        .map(|w| "-".repeat(*w))
        .collect::<Vec<_>>()
        .join("  ");
    let last = rows.len() - 1;
    for (i, row) in rows.iter().enumerate() {
        if i == last {
            writeln!(out, "{rule}")?;
        }
        let mut text = String::new();
        for (column, (cell, width)) in row.iter().zip(&widths).enumerate() {
            let pad = width.saturating_sub(cell.chars().count());
            if column == 0 {
                text.push_str(cell);
                text.push_str(&" ".repeat(pad));
            } else {
                text.push_str("  ");
                text.push_str(&" ".repeat(pad));
                text.push_str(cell);
            }
        }
        writeln!(out, "{}", text.trim_end())?;
        if i == 0 {
            writeln!(out, "{rule}")?;
        }
    }
    Ok(())
}

/// RFC 4180 CSV (a field is quoted when it holds a comma, a quote or a line break), by the csv
/// crate's writer.
fn write_csv(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    let mut writer = csv::Writer::from_writer(out);
    let header = std::iter::once(report.by.label()).chain(COLUMNS);
    writer.write_record(header)?;
    for (name, stats) in &report.groups {
        let cells = cells(stats, "");
        writer
            .write_record(std::iter::once(name.as_str()).chain(cells.iter().map(String::as_str)))?;
    }
    writer.flush()
}

/// A group as a JSON object, its fields in [`COLUMNS`] order after the group's.
struct JsonRow<'a> {
    by: GroupBy,
    name: &'a str,
    summary: Summary,
}

impl Serialize for JsonRow<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(COLUMNS.len() + 1))?;
        map.serialize_entry(self.by.label(), self.name)?;
        for (column, figure) in COLUMNS.iter().zip(figures(&self.summary)) {
            match figure {
                Figure::Count(n) => map.serialize_entry(column, &n)?,
                // A JSON number with 9 decimals, written from the integer.
                Figure::Cost(nano) => {
                    let raw = serde_json::value::RawValue::from_string(cost::fixed(nano))
                        .map_err(serde::ser::Error::custom)?;
                    map.serialize_entry(column, &raw)?
                }
                // Percentages to 0.01; the counts are there for exact sums.
                Figure::Pct(v) => {
                    map.serialize_entry(column, &v.map(|v| (v * 100.0).round() / 100.0))?
                }
                Figure::Ms(v) => map.serialize_entry(column, &v)?,
            }
        }
        map.end()
    }
}

fn write_json(report: &Report, out: &mut dyn Write) -> io::Result<()> {
    let rows: Vec<JsonRow<'_>> = report
        .groups
        .iter()
        .map(|(name, stats)| JsonRow {
            by: report.by,
            name,
            summary: stats.clone(),
        })
        .collect();
    serde_json::to_writer_pretty(&mut *out, &rows)?;
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of samples from 0 µs to about 3 hours, dense in every decade.
    fn samples() -> Vec<u64> {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        (0..200_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let decade = (state >> 60) % 11; // 0..=10
                let mantissa = (state >> 20) % 1_000_000;
                10_u64.pow(decade as u32) * mantissa / 100_000
            })
            .collect()
    }

    #[test]
    fn every_bucket_reads_back_as_its_own_lower_bound() {
        for index in 0..OVERFLOW {
            let low = lower_bound(index);
            assert_eq!(bucket_of(low), index, "bucket {index} starts at {low}");
            if index > 0 {
                assert_eq!(bucket_of(low - 1), index - 1, "buckets are contiguous");
            }
        }
        assert_eq!(bucket_of(OVERFLOW_AT - 1), OVERFLOW - 1);
        assert_eq!(bucket_of(OVERFLOW_AT), OVERFLOW);
        assert_eq!(bucket_of(u64::MAX), OVERFLOW);
    }

    #[test]
    fn percentiles_are_the_exact_sample_truncated_to_three_digits_under_one_percent_low() {
        let samples = samples();
        let mut histogram = Histogram::new();
        for &s in &samples {
            histogram.record_us(s);
        }
        let mut sorted = samples.clone();
        sorted.sort_unstable();
        let truncate = |v: u64| {
            if v < 1000 {
                v
            } else {
                let scale = 10_u64.pow(v.ilog10() - 2);
                v / scale * scale
            }
        };
        let mut worst = 0.0_f64;
        for per_mille in [1, 10, 100, 250, 500, 750, 900, 950, 990, 999, 1000] {
            let rank = (sorted.len() as u64 * per_mille).div_ceil(1000).max(1);
            let exact = sorted[rank as usize - 1];
            let got = histogram.percentile_us(per_mille).expect("samples");
            if exact >= OVERFLOW_AT {
                assert_eq!(
                    got,
                    *sorted.last().expect("samples"),
                    "overflow reads as the max"
                );
                continue;
            }
            assert_eq!(got, truncate(exact), "p{per_mille}‰ of {exact}");
            assert!(got <= exact, "never high");
            if exact > 0 {
                let error = (exact - got) as f64 / exact as f64;
                worst = worst.max(error);
                assert!(error < 0.01, "p{per_mille}‰: {got} vs {exact}: {error}");
            }
        }
        // Worst case over every possible value: 100_999 → 100_000.
        for v in [100_999_u64, 1_009_999, 999_999_999, 1_234_567] {
            let mut h = Histogram::new();
            h.record_us(v);
            let got = h.percentile_us(500).expect("one sample");
            let error = (v - got) as f64 / v as f64;
            assert!(error < 0.01, "{v} → {got}: {error}");
        }
        assert!(worst < 0.01, "{worst}");
    }

    #[test]
    fn memory_is_paged_and_bounded() {
        let mut h = Histogram::new();
        for ms in [120.0, 250.0, 900.0, 180.5] {
            h.record_ms(ms);
        }
        let allocated = h.pages.iter().filter(|p| p.is_some()).count();
        assert_eq!(
            allocated, 3,
            "one page per leading digit used: 1xx, 2xx, 9xx ms"
        );
        assert_eq!(
            h.percentile_ms(500),
            Some(180.0),
            "180.5 ms truncated to 180"
        );
        assert_eq!(h.percentile_ms(1000), Some(900.0));
        assert_eq!(Histogram::new().percentile_ms(500), None);
    }

    fn line(time: &str, key: &str, status: u16, outcome: &str, duration: f64) -> String {
        format!(
            r#"{{"time":"{time}","request_id":"r","key":"{key}","model":"m","endpoint":"chat_completions","status":{status},"prompt_tokens":10,"completion_tokens":5,"source":"reported","duration_ms":{duration},"ttft_ms":null,"outcome":"{outcome}"}}"#
        )
    }

    #[test]
    fn aggregate_filters_by_time_counts_malformed_lines_and_groups_by_day() {
        let now = humantime::parse_rfc3339("2025-06-10T12:00:00Z").expect("time");
        let input = [
            line("2025-06-10T11:00:00.000Z", "a", 200, "complete", 10.0),
            line("2025-06-09T23:59:59.999Z", "b", 502, "complete", 20.0),
            String::new(),
            "{not json".to_owned(),
            line("2025-05-01T00:00:00.000Z", "a", 200, "client_gone", 30.0),
            line("yesterday", "a", 200, "complete", 30.0),
            format!(
                "{}\r",
                line("2025-06-10T00:00:00Z", "a", 200, "complete", 40.0)
            ),
        ]
        .join("\n");
        let options = Options {
            by: GroupBy::Day,
            since: Some(Duration::from_secs(7 * 86_400)),
            now,
        };
        let report = aggregate(input.as_bytes(), &options).expect("in memory");
        assert_eq!(report.skipped, 2);
        assert_eq!(
            report.first_skipped,
            Some(4),
            "line numbers count blank lines"
        );
        assert_eq!(report.before_since, 1);
        let days: Vec<&str> = report.groups.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(days, ["2025-06-09", "2025-06-10"]);
        assert_eq!(report.total.requests, 3);
        assert_eq!(report.total.errors, 1, "the 502");
        assert_eq!(report.total.p99_ms, Some(40.0));
        assert_eq!(report.total.ttft_p50_ms, None);
    }

    #[test]
    fn csv_quotes_a_model_name_with_a_comma_or_a_quote() {
        let input = line("2025-06-10T11:00:00.000Z", "a", 200, "complete", 10.0)
            .replace(r#""model":"m""#, r#""model":"a,\"b\"""#);
        let options = Options {
            by: GroupBy::Model,
            since: None,
            now: SystemTime::UNIX_EPOCH,
        };
        let report = aggregate(input.as_bytes(), &options).expect("in memory");
        let mut out = Vec::new();
        write(&report, Format::Csv, &mut out).expect("in memory");
        let text = String::from_utf8(out).expect("utf-8");
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(rows.len(), 2, "a header and one row: {text}");
        assert!(
            rows[1].starts_with(r#""a,""b""",1,0,0.0,10,5,0.000000000,0.0,10,10,,"#),
            "the name is quoted and its quote doubled: {text}"
        );
    }

    #[test]
    fn an_overlong_line_is_skipped_without_being_held() {
        let long = format!("{{\"x\":\"{}\"}}", "a".repeat(MAX_LINE + 10));
        let input = format!(
            "{long}\n{}\n",
            line("2025-06-10T11:00:00.000Z", "a", 200, "complete", 10.0)
        );
        let options = Options {
            by: GroupBy::Key,
            since: None,
            now: SystemTime::UNIX_EPOCH,
        };
        // A small BufReader so that the long line arrives in many pieces.
        let reader = io::BufReader::with_capacity(1024, input.as_bytes());
        let report = aggregate(reader, &options).expect("in memory");
        assert_eq!((report.skipped, report.total.requests), (1, 1));
    }
}
