//! Phase 3: SSE streaming: time to first event, time to the end, and the proxies' CPU time per
//! stream.
//!
//! `--stream-concurrency` connections (16) each stream one answer after another, closed loop.
//! A stream counts when it started after the warm-up; CPU is read from `/proc` when the warm-up
//! ends and once every stream is done, so the streams of the warm-up still running at that
//! moment (at most one per connection) add their last part to every row alike.

use std::sync::Arc;
use std::time::Instant;

use bench_support::procfs::Procs;
use bench_support::stats::{added, median, percentile_ms};
use bench_support::table::{num, signed, verdict};

use crate::client::{connect, read_stream, Payload, REQUEST_TIMEOUT};
use crate::report::{interleaved, per_row, section, table, Check, Report};
use crate::rows::Row;
use crate::Bench;

const GOAL_ADDED_TTFE_MS: f64 = 0.2;
const STREAM_CHUNKS: usize = 32;
const STREAM_DELAY_MS: u64 = 2;

struct StreamRound {
    streams: usize,
    ttfe_p50: f64,
    ttfe_p99: f64,
    total_p50: f64,
    total_p99: f64,
    errors: usize,
    /// The proxy's CPU time per counted stream, µs.
    cpu_us: f64,
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
    })
}

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let Bench {
        rows, opts, plan, ..
    } = bench;
    let payload = Arc::new(Payload::stream(STREAM_CHUNKS, STREAM_DELAY_MS));
    let results = interleaved(bench, |row| stream_round(bench, row, &payload)).await?;

    section(
        &format!(
            "3. Streaming: SSE, {STREAM_CHUNKS} content events {STREAM_DELAY_MS} ms apart, {} concurrent streams in closed loop, {:.1} s x {} rounds",
            opts.stream_concurrency,
            plan.stream.as_secs_f64(),
            opts.rounds
        ),
        &[
            "TTFE = request written -> first `data:` bytes read; total = request written -> end of stream.".into(),
            "ms; median over rounds; added = median over rounds of (row - direct).".into(),
            "CPU us/stream = the proxy's CPU time (/proc/<pid>/stat) from the end of the warm-up to the last".into(),
            "stream's end / the streams started after the warm-up.".into(),
        ],
    );
    let mut table = table(
        rows,
        &[
            "row",
            "streams",
            "TTFE p50",
            "TTFE p99",
            "total p50",
            "total p99",
            "errors",
            "CPU us/stream",
            "added TTFE p50",
            "",
            "added TTFE p99",
        ],
        &[10, 7, 8, 8, 9, 9, 6, 13, 14, 6, 14],
    );
    let direct = &results[0];
    for (row, rounds) in rows.iter().zip(&results) {
        let ttfe50: Vec<f64> = rounds.iter().map(|r| r.ttfe_p50).collect();
        let ttfe99: Vec<f64> = rounds.iter().map(|r| r.ttfe_p99).collect();
        let mut cells = vec![
            row.name.to_owned(),
            rounds.iter().map(|r| r.streams).sum::<usize>().to_string(),
            num(median(ttfe50.iter().copied()), 3),
            num(median(ttfe99.iter().copied()), 3),
            num(median(rounds.iter().map(|r| r.total_p50)), 3),
            num(median(rounds.iter().map(|r| r.total_p99)), 3),
            rounds.iter().map(|r| r.errors).sum::<usize>().to_string(),
            num(median(rounds.iter().map(|r| r.cpu_us)), 1),
        ];
        if row.procs.is_some() {
            let direct50: Vec<f64> = direct.iter().map(|r| r.ttfe_p50).collect();
            let direct99: Vec<f64> = direct.iter().map(|r| r.ttfe_p99).collect();
            let add50 = added(&ttfe50, &direct50);
            let add99 = added(&ttfe99, &direct99);
            let met = add50 <= GOAL_ADDED_TTFE_MS;
            cells.extend([signed(add50, 3), verdict(met).to_owned(), signed(add99, 3)]);
            if row.gateway {
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
    let per_row = |f: fn(&StreamRound) -> f64| per_row(&results, f);
    report.keep(
        format!("3. CPU us/stream ({STREAM_CHUNKS} events)"),
        per_row(|r| r.cpu_us),
    );
    report.keep("3. TTFE p50, ms", per_row(|r| r.ttfe_p50));
    println!("   goal: added time to first event (p50) <= {GOAL_ADDED_TTFE_MS} ms");
    Ok(())
}
