//! What the bench prints around the phases' tables: the header (machine, rows, phase lengths),
//! the byte-for-byte check of every row, the goals, the comparison of this build with the
//! `--old-bin` binary, and the summary. Also what the phases share to print their own tables:
//! [`Report`] (goals, warnings, figures kept for the comparison), [`section`], [`table`] and
//! [`interleaved`] rounds.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use bench_support::stats::{max_of, median, min_of, ratios};
use bench_support::table::{num, verdict, versus, Table, Versus};
use bytes::Bytes;
use http::StatusCode;

use crate::client::{connect, exchange, Payload};
use crate::rows::Row;
use crate::targets::{FULL_ROW, NGINX_ROW, OLD_ROW, PLAIN_ROW};
use crate::Bench;

/// One goal checked on one row, for the summary.
pub struct Check {
    pub row: &'static str,
    pub what: String,
    pub value: String,
    pub met: bool,
}

impl Check {
    /// A goal on `measured` against `base` (another row's figure of the same run).
    pub fn versus(
        row: &'static str,
        what: String,
        (measured, base): (f64, f64),
        limit: (Versus, f64),
        unit: &str,
    ) -> Check {
        let (value, met) = versus(measured, base, limit, unit);
        Check {
            row,
            what,
            value,
            met,
        }
    }
}

/// Issue 14's targets that hold **tollgate** and **tollgate-full** to at most `limit` times
/// nginx's figure (`median_of` a row's figure over the run; `None` when the row did not run).
/// Returns whether nginx ran, so that the caller can print the target under its table.
pub fn targets_against_nginx(
    report: &mut Report,
    median_of: impl Fn(&str) -> Option<f64>,
    what: &str,
    limit: f64,
    unit: &str,
) -> bool {
    let Some(nginx) = median_of(NGINX_ROW) else {
        return false;
    };
    for name in [PLAIN_ROW, FULL_ROW] {
        if let Some(gateway) = median_of(name) {
            report.target(Check::versus(
                name,
                format!("{what} <= {limit}x nginx"),
                (gateway, nginx),
                (Versus::Ratio, limit),
                unit,
            ));
        }
    }
    true
}

/// A figure of every row, round by round, kept for the comparison with the old binary.
struct Kept {
    figure: String,
    /// `per_row[i][round]`, rows in table order.
    per_row: Vec<Vec<f64>>,
}

/// What the phases found, beside their tables.
#[derive(Default)]
pub struct Report {
    notes: Vec<String>,
    checks: Vec<Check>,
    /// Issue 14's targets: each gateway against nginx in the same run.
    targets: Vec<Check>,
    warnings: Vec<String>,
    kept: Vec<Kept>,
}

impl Report {
    /// A note printed under the header (a row skipped).
    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    pub fn check(&mut self, check: Check) {
        self.checks.push(check);
    }

    /// One of issue 14's targets, printed in a table of its own in the summary.
    pub fn target(&mut self, check: Check) {
        self.targets.push(check);
    }

    pub fn warn(&mut self, warning: String) {
        self.warnings.push(warning);
    }

    /// Keeps a per-round figure of every row (lower is better) for the comparison of this build
    /// with the old binary.
    pub fn keep(&mut self, figure: impl Into<String>, per_row: Vec<Vec<f64>>) {
        self.kept.push(Kept {
            figure: figure.into(),
            per_row,
        });
    }
}

/// One figure of per-row, per-round results, for [`Report::keep`].
pub fn per_row<T>(results: &[Vec<T>], figure: impl Fn(&T) -> f64) -> Vec<Vec<f64>> {
    results
        .iter()
        .map(|rounds| rounds.iter().map(&figure).collect())
        .collect()
}

/// Where the row named `name` is in the tables, if it runs.
pub fn row_index(rows: &[Row], name: &str) -> Option<usize> {
    rows.iter().position(|row| row.name == name)
}

/// A section title and the lines that explain its table.
pub fn section(title: &str, lines: &[String]) {
    println!();
    println!("== {title}");
    for line in lines {
        println!("   {line}");
    }
}

/// The width of the row-name column: the longest row's name, and at least `min`.
fn name_width(rows: &[Row], min: usize) -> usize {
    let longest = rows.iter().map(|row| row.name.len()).max().unwrap_or(0);
    (longest + 1).max(min)
}

/// A table whose first column holds the row names.
pub fn table(rows: &[Row], header: &[&str], widths: &[usize]) -> Table {
    let mut widths = widths.to_vec();
    if let Some(first) = widths.first_mut() {
        *first = name_width(rows, *first);
    }
    Table::new(header, &widths)
}

/// Runs `--rounds` rounds of `run` over all rows, the row order rotated each round (so that no
/// row always runs first, right after another row's load); returns each row's per-round results.
pub async fn interleaved<'a, T, F, Fut>(bench: &'a Bench, mut run: F) -> anyhow::Result<Vec<Vec<T>>>
where
    F: FnMut(&'a Row) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let rows = &bench.rows;
    let mut results: Vec<Vec<T>> = (0..rows.len()).map(|_| Vec::new()).collect();
    for round in 0..bench.opts.rounds {
        for k in 0..rows.len() {
            let i = (k + round) % rows.len();
            let result = run(&rows[i])
                .await
                .with_context(|| format!("row {}, round {}", rows[i].name, round + 1))?;
            results[i].push(result);
        }
    }
    Ok(results)
}

fn load_average() -> String {
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg: Vec<&str> = loadavg.split_whitespace().take(3).collect();
    loadavg.join(" ")
}

pub fn print_header(bench: &Bench, clk_assumed: bool, report: &Report) {
    let Bench {
        opts,
        plan,
        clk_tck,
        mock,
        rows,
    } = bench;
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "tollgate overhead bench (benches/overhead/){}: {} round(s) per phase, rows interleaved",
        if opts.quick { ", --quick" } else { "" },
        opts.rounds
    );
    println!(
        "machine: {cpus} CPUs, load average {} at start, CLK_TCK {clk_tck}{}",
        load_average(),
        if clk_assumed {
            " (assumed: getconf failed)"
        } else {
            ""
        }
    );
    println!(
        "mock upstream: in this process, own thread + current-thread tokio runtime, {}",
        mock.url
    );
    println!(
        "load generator: in this process, hyper HTTP/1.1 connections with TCP_NODELAY on a \
         current-thread runtime; open-loop sends timed by a dedicated thread"
    );
    println!(
        "phase lengths per row and round: latency {:.1} s, throughput {:.1} s, streaming {:.1} s \
         (each after {:.1} s of warm-up)",
        plan.latency.as_secs_f64(),
        plan.throughput.as_secs_f64(),
        plan.stream.as_secs_f64(),
        plan.warmup.as_secs_f64()
    );
    println!("rows:");
    let width = name_width(rows, 12);
    for row in rows {
        println!("  {:<width$}{}", row.name, row.describe);
    }
    for note in &report.notes {
        println!("note: {note}");
    }
}

/// Warms every row up (connections, the proxies' upstream pools) and checks that each proxy
/// passes the mock's answers through byte for byte (the mock's output is a pure function of the
/// request).
pub async fn warm_up_and_verify(rows: &[Row]) -> anyhow::Result<()> {
    let chat = Payload::chat();
    let stream = Payload::stream(8, 0);
    let mut expected: Option<(Bytes, Bytes)> = None;
    let mut mismatches = Vec::new();
    for row in rows {
        let mut sender = connect(row.ep.addr).await?;
        let (status, chat_body) = exchange(&mut sender, row.ep.request(&chat)).await?;
        if status != StatusCode::OK {
            bail!("row {}: chat completion answered {status}", row.name);
        }
        let (status, stream_body) = exchange(&mut sender, row.ep.request(&stream)).await?;
        if status != StatusCode::OK {
            bail!(
                "row {}: streamed chat completion answered {status}",
                row.name
            );
        }
        match &expected {
            None => expected = Some((chat_body, stream_body)),
            Some((chat_direct, stream_direct)) => {
                if *chat_direct != chat_body || *stream_direct != stream_body {
                    mismatches.push(row.name);
                }
            }
        }
        // A short closed loop on 8 connections.
        let payload = Arc::new(Payload::chat());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let ep = row.ep.clone();
                let payload = payload.clone();
                tokio::spawn(async move {
                    let mut sender = connect(ep.addr).await?;
                    for _ in 0..50 {
                        exchange(&mut sender, ep.request(&payload)).await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
    }
    println!();
    if mismatches.is_empty() {
        println!("check: every row returns the mock's answers byte for byte (JSON and SSE)");
    } else {
        println!(
            "WARNING: these rows change the mock's answers: {}",
            mismatches.join(", ")
        );
    }
    Ok(())
}

/// The goals (or targets) as a table, and how many were met.
fn print_checks(bench: &Bench, checks: &[Check]) {
    let mut table = Table::aligned(
        &["row", "goal", "measured", "verdict"],
        &[name_width(&bench.rows, 17), 50, 26, 7],
        &[0, 1],
    );
    for check in checks {
        table.row(vec![
            check.row.to_owned(),
            check.what.clone(),
            check.value.clone(),
            verdict(check.met).to_owned(),
        ]);
    }
    table.print();
    let missed = checks.iter().filter(|c| !c.met).count();
    println!("{} of {} met.", checks.len() - missed, checks.len());
}

/// With `--old-bin`: every kept figure of the `tollgate` row against the `tollgate-old` row,
/// as medians over rounds and the median of the per-round ratios (the two ran in the same
/// rounds, so a ratio holds when the machine's speed drifts between rounds).
pub fn print_old_comparison(bench: &Bench, report: &Report) {
    let index = |name: &str| row_index(&bench.rows, name);
    let (Some(new), Some(old)) = (index(PLAIN_ROW), index(OLD_ROW)) else {
        return;
    };
    section(
        &format!("This build against the old binary ({OLD_ROW})"),
        &[
            "Medians over rounds; new/old = median over rounds of (tollgate / tollgate-old) in the same round.".into(),
            "Every figure here is a cost: below 1.00 this build spends less. A wide min-max of the".into(),
            "per-round ratios says the machine was noisy.".into(),
        ],
    );
    let mut table = Table::aligned(
        &["figure", "old", "new", "new/old", "min", "max"],
        &[44, 9, 9, 7, 6, 6],
        &[0],
    );
    for kept in &report.kept {
        let (Some(new_rounds), Some(old_rounds)) = (kept.per_row.get(new), kept.per_row.get(old))
        else {
            continue;
        };
        let ratios = ratios(new_rounds, old_rounds);
        table.row(vec![
            kept.figure.clone(),
            num(median(old_rounds.iter().copied()), 2),
            num(median(new_rounds.iter().copied()), 2),
            num(median(ratios.iter().copied()), 3),
            num(min_of(ratios.iter().copied()), 2),
            num(max_of(ratios.iter().copied()), 2),
        ]);
    }
    table.print();
}

pub fn print_summary(bench: &Bench, report: &Report, elapsed: Duration) {
    println!();
    println!("== Goals (checked on the gateway rows)");
    print_checks(bench, &report.checks);
    if !report.targets.is_empty() {
        println!();
        println!("== Issue 14's targets (medians of this run, against the {NGINX_ROW} row)");
        print_checks(bench, &report.targets);
    } else if row_index(&bench.rows, NGINX_ROW).is_none() {
        println!();
        println!("Issue 14's targets are measured against {NGINX_ROW}, which did not run.");
    }
    for warning in &report.warnings {
        println!("WARNING: {warning}");
    }
    for row in &bench.rows {
        if let Some(log) = &row.log {
            let size = fs::metadata(log).map_or(0, |m| m.len());
            let lines = fs::read_to_string(log).map_or(0, |text| text.lines().count());
            println!(
                "{}: access log {} lines, {:.1} MB written during the run",
                row.name,
                lines,
                size as f64 / 1e6
            );
        }
    }
    println!(
        "total time {:.1} s; load average {} at the end",
        elapsed.as_secs_f64(),
        load_average()
    );
}
