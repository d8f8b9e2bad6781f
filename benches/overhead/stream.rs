//! Phases 3 and 3b: SSE streaming, with events 2 ms apart and with events sent back to back: time
//! to first event, time to the end, streams and events per second, and the proxies' CPU time per
//! stream and per event.
//!
//! `--stream-concurrency` connections (16) each stream one answer after another, closed loop.
//! A stream counts when it started after the warm-up; CPU is read from `/proc` when the warm-up
//! ends and once every stream is done, so the streams of the warm-up still running at that
//! moment (at most one per connection) add their last part to every row alike.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use bench_support::procfs::Procs;
use bench_support::stats::{added, median, percentile_ms};
use bench_support::table::{num, signed, verdict};
use http::StatusCode;

use crate::client::{connect, exchange, read_stream, Payload, REQUEST_TIMEOUT};
use crate::report::targets_against_nginx;
use crate::report::{interleaved, per_row, row_index, section, table, Check, Report};
use crate::rows::Row;
use crate::Bench;

const GOAL_ADDED_TTFE_MS: f64 = 0.2;
/// Issue 14: CPU per back-to-back stream at most this many times nginx's.
const TARGET_NGINX_RATIO: f64 = 2.0;

/// What one streaming phase sends.
pub struct Shape {
    /// The phase's number in the report.
    pub number: &'static str,
    /// Content events per stream (`x-mock-chunks`).
    pub chunks: usize,
    /// Between two events (`x-mock-chunk-delay-ms`); 0 sends them back to back.
    pub delay_ms: u64,
}

/// Events 2 ms apart: the time to first event and the added latency of a stream that trickles.
pub const SPACED: Shape = Shape {
    number: "3",
    chunks: 32,
    delay_ms: 2,
};

/// Events back to back: the per-event path at full speed (issue 14's workload).
pub const BACK_TO_BACK: Shape = Shape {
    number: "3b",
    chunks: 32,
    delay_ms: 0,
};

struct StreamRound {
    streams: usize,
    ttfe_p50: f64,
    ttfe_p99: f64,
    total_p50: f64,
    total_p99: f64,
    errors: usize,
    /// The proxy's CPU time per counted stream, µs.
    cpu_us: f64,
    /// Counted streams per second, from the end of the warm-up to the last stream's end.
    streams_per_s: f64,
}

async fn stream_round(
    bench: &Bench,
    row: &Row,
    payload: &Arc<Payload>,
) -> anyhow::Result<StreamRound> {
    let (plan, concurrency) = (&bench.plan, bench.opts.stream_concurrency);
    let begin = Instant::now();
    let measure_from = begin + plan.warmup;
    let stop_at = measure_from + plan.stream;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (ep, payload) = (row.ep.clone(), payload.clone());
        let mut sender = connect(ep.addr).await?;
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0;
            while Instant::now() < stop_at {
                let start = Instant::now();
                let request = ep.request(&payload);
                let result =
                    tokio::time::timeout(REQUEST_TIMEOUT, read_stream(&mut sender, request, None))
                        .await;
                let counted = start >= measure_from;
                match result {
                    Ok(Ok(stats)) if stats.complete => {
                        if let (true, Some(ttfe)) = (counted, stats.ttfe) {
                            samples.push((ttfe.as_nanos() as u64, stats.total.as_nanos() as u64));
                        }
                    }
                    _ => {
                        errors += usize::from(counted);
                        sender = connect(ep.addr).await?;
                    }
                }
            }
            anyhow::Ok((samples, errors))
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before = row.procs.as_ref().and_then(Procs::cpu_ticks);
    let mut ttfe = Vec::new();
    let mut total = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (samples, task_errors) = task.await??;
        errors += task_errors;
        for (first, all) in samples {
            ttfe.push(first);
            total.push(all);
        }
    }
    let cpu_after = row.procs.as_ref().and_then(Procs::cpu_ticks);
    let window = measure_from.elapsed().as_secs_f64();
    let cpu_us = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if !ttfe.is_empty() => {
            after.since(before).seconds(bench.clk_tck) * 1e6 / ttfe.len() as f64
        }
        _ => f64::NAN,
    };
    ttfe.sort_unstable();
    total.sort_unstable();
    Ok(StreamRound {
        streams: ttfe.len(),
        ttfe_p50: percentile_ms(&ttfe, 50.0),
        ttfe_p99: percentile_ms(&ttfe, 99.0),
        total_p50: percentile_ms(&total, 50.0),
        total_p99: percentile_ms(&total, 99.0),
        errors,
        cpu_us,
        streams_per_s: ttfe.len() as f64 / window,
    })
}

/// The `data:` events of one stream of `payload`, as the direct row's client sees them (every
/// row passes the same bytes through: see `report::warm_up_and_verify`).
async fn events_per_stream(direct: &Row, payload: &Payload) -> anyhow::Result<usize> {
    let mut sender = connect(direct.ep.addr).await?;
    let (status, body) = exchange(&mut sender, direct.ep.request(payload)).await?;
    if status != StatusCode::OK {
        bail!("direct stream answered {status}");
    }
    Ok(body
        .split(|&b| b == b'\n')
        .filter(|line| line.starts_with(b"data:"))
        .count())
}

pub async fn run(bench: &Bench, report: &mut Report, shape: &Shape) -> anyhow::Result<()> {
    let Bench {
        rows, opts, plan, ..
    } = bench;
    let Shape {
        number,
        chunks,
        delay_ms,
    } = *shape;
    let payload = Arc::new(Payload::stream(chunks, delay_ms));
    let events = events_per_stream(&rows[0], &payload).await?;
    let results = interleaved(bench, |row| stream_round(bench, row, &payload)).await?;

    let spacing = if delay_ms == 0 {
        "sent back to back".to_owned()
    } else {
        format!("{delay_ms} ms apart")
    };
    section(
        &format!(
            "{number}. Streaming: SSE, {chunks} content events {spacing}, {} concurrent streams in closed loop, {:.1} s x {} rounds",
            opts.stream_concurrency,
            plan.stream.as_secs_f64(),
            opts.rounds
        ),
        &[
            "TTFE = request written -> first `data:` bytes read; total = request written -> end of stream.".into(),
            "ms; median over rounds; added = median over rounds of (row - direct).".into(),
            "CPU us/stream = the proxy's CPU time (/proc/<pid>/stat) from the end of the warm-up to the last".into(),
            "stream's end / the streams started after the warm-up; streams/s over the same window.".into(),
            format!("A stream is {events} `data:` events (the content events, the first and last chunks, usage, [DONE]):"),
            "events/s = streams/s x that, CPU us/event = CPU us/stream / that.".into(),
        ],
    );
    let mut table = table(
        rows,
        &[
            "row",
            "streams",
            "streams/s",
            "events/s",
            "TTFE p50",
            "TTFE p99",
            "total p50",
            "total p99",
            "errors",
            "CPU us/stream",
            "us/event",
            "added TTFE p50",
            "",
            "added TTFE p99",
        ],
        &[10, 7, 9, 9, 8, 8, 9, 9, 6, 13, 8, 14, 6, 14],
    );
    let direct = &results[0];
    let events_f = events as f64;
    for (row, rounds) in rows.iter().zip(&results) {
        let ttfe50: Vec<f64> = rounds.iter().map(|r| r.ttfe_p50).collect();
        let ttfe99: Vec<f64> = rounds.iter().map(|r| r.ttfe_p99).collect();
        let streams_per_s = median(rounds.iter().map(|r| r.streams_per_s));
        let cpu = median(rounds.iter().map(|r| r.cpu_us));
        let mut cells = vec![
            row.name.to_owned(),
            rounds.iter().map(|r| r.streams).sum::<usize>().to_string(),
            num(streams_per_s, 0),
            num(streams_per_s * events_f, 0),
            num(median(ttfe50.iter().copied()), 3),
            num(median(ttfe99.iter().copied()), 3),
            num(median(rounds.iter().map(|r| r.total_p50)), 3),
            num(median(rounds.iter().map(|r| r.total_p99)), 3),
            rounds.iter().map(|r| r.errors).sum::<usize>().to_string(),
            num(cpu, 1),
            num(cpu / events_f, 2),
        ];
        if row.procs.is_some() {
            let direct50: Vec<f64> = direct.iter().map(|r| r.ttfe_p50).collect();
            let direct99: Vec<f64> = direct.iter().map(|r| r.ttfe_p99).collect();
            let add50 = added(&ttfe50, &direct50);
            let add99 = added(&ttfe99, &direct99);
            let met = add50 <= GOAL_ADDED_TTFE_MS;
            // The time to first event is the goal of the spaced streams only (issue 7's).
            let mark = if delay_ms > 0 { verdict(met) } else { "" };
            cells.extend([signed(add50, 3), mark.to_owned(), signed(add99, 3)]);
            if row.gateway && delay_ms > 0 {
                report.check(Check {
                    row: row.name,
                    what: format!("added TTFE p50 <= {GOAL_ADDED_TTFE_MS} ms"),
                    value: format!("{} ms", signed(add50, 3)),
                    met,
                });
            }
        }
        table.row(cells);
    }
    table.print();
    if delay_ms == 0 {
        back_to_back_targets(rows, &results, report);
    }
    let per_row = |f: fn(&StreamRound) -> f64| per_row(&results, f);
    report.keep(
        format!("{number}. CPU us/stream ({chunks} events {spacing})"),
        per_row(|r| r.cpu_us),
    );
    report.keep(format!("{number}. TTFE p50, ms"), per_row(|r| r.ttfe_p50));
    if delay_ms > 0 {
        println!("   goal: added time to first event (p50) <= {GOAL_ADDED_TTFE_MS} ms");
    }
    Ok(())
}

/// Issue 14: each gateway row's CPU per back-to-back stream against nginx's, medians of the run.
fn back_to_back_targets(rows: &[Row], results: &[Vec<StreamRound>], report: &mut Report) {
    let cpu =
        |name: &str| row_index(rows, name).map(|i| median(results[i].iter().map(|r| r.cpu_us)));
    if targets_against_nginx(
        report,
        cpu,
        "back-to-back streams: CPU/stream",
        TARGET_NGINX_RATIO,
        "us",
    ) {
        println!("   target (issue 14): CPU per stream <= {TARGET_NGINX_RATIO}x nginx's");
    }
}
