//! Phase 5: memory with 64 concurrent SSE streams open, each on its own connection: the proxies'
//! RSS before, sampled during, and their peak (VmHWM, reset just before the streams).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bench_support::procfs::Procs;
use bench_support::table::verdict;

use crate::client::{connect, read_stream, Payload, REQUEST_TIMEOUT};
use crate::report::{section, table, Check, Report};
use crate::rows::Row;
use crate::targets::FULL_ROW;
use crate::Bench;

const GOAL_RSS_MB: f64 = 30.0;
const RSS_STREAMS: usize = 64;
const RSS_CHUNKS: usize = 200;
const RSS_DELAY_MS: u64 = 5;

struct RssResult {
    idle_kb: Option<u64>,
    during_kb: Option<u64>,
    peak_kb: Option<u64>,
    peak_reset: bool,
    max_running: usize,
    complete: usize,
}

async fn rss_run(row: &Row, procs: &Procs, payload: &Arc<Payload>) -> anyhow::Result<RssResult> {
    let idle_kb = procs.status_kb("VmRSS");
    let peak_reset = procs.reset_peak();
    let running = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..RSS_STREAMS)
        .map(|_| {
            let (ep, payload, running) = (row.ep.clone(), payload.clone(), running.clone());
            tokio::spawn(async move {
                let mut sender = connect(ep.addr).await?;
                let request = ep.request(&payload);
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    read_stream(&mut sender, request, Some(&running)),
                )
                .await
                .context("stream timed out")?
            })
        })
        .collect();
    let mut during_kb: Option<u64> = None;
    let mut max_running = 0;
    while !tasks.iter().all(|task| task.is_finished()) {
        max_running = max_running.max(running.load(Ordering::SeqCst));
        if let Some(rss) = procs.status_kb("VmRSS") {
            during_kb = Some(during_kb.map_or(rss, |d| d.max(rss)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak_kb = procs.status_kb("VmHWM");
    let mut complete = 0;
    for task in tasks {
        if let Ok(Ok(stats)) = task.await {
            complete += usize::from(stats.complete);
        }
    }
    Ok(RssResult {
        idle_kb,
        during_kb,
        peak_kb,
        peak_reset,
        max_running,
        complete,
    })
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or("-".to_owned(), |kb| {
        format!("{:.1}", kb as f64 * 1024.0 / 1e6)
    })
}

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let rows = &bench.rows;
    let payload = Arc::new(Payload::stream(RSS_CHUNKS, RSS_DELAY_MS));
    let mut results = Vec::new();
    for row in rows {
        if let Some(procs) = &row.procs {
            results.push((row, procs.pids.len(), rss_run(row, procs, &payload).await?));
        }
    }

    section(
        &format!(
            "5. Memory: {RSS_STREAMS} concurrent SSE streams of {RSS_CHUNKS} events {RSS_DELAY_MS} ms apart, each on its own connection"
        ),
        &[
            "MB = 10^6 bytes, summed over the proxy's processes (nginx: master + workers; shared pages count once per process).".into(),
            "idle = VmRSS before; during = highest VmRSS sampled every 20 ms while the streams ran;".into(),
            "peak = VmHWM after the streams, reset just before them (clear_refs) so it is this phase's peak.".into(),
        ],
    );
    let mut table = table(
        rows,
        &[
            "row",
            "procs",
            "idle MB",
            "during MB",
            "peak MB",
            "streams open at once",
            "complete",
            "goal",
        ],
        &[10, 5, 7, 9, 7, 20, 8, 6],
    );
    for (row, procs, result) in &results {
        let peak_mb = result
            .peak_kb
            .map_or(f64::NAN, |kb| kb as f64 * 1024.0 / 1e6);
        let met = peak_mb <= GOAL_RSS_MB && result.max_running == RSS_STREAMS;
        table.row(vec![
            row.name.to_owned(),
            procs.to_string(),
            mb(result.idle_kb),
            mb(result.during_kb),
            format!(
                "{}{}",
                mb(result.peak_kb),
                if result.peak_reset { "" } else { "*" }
            ),
            result.max_running.to_string(),
            format!("{}/{RSS_STREAMS}", result.complete),
            verdict(met).to_owned(),
        ]);
        if row.gateway {
            let check = || Check {
                row: row.name,
                what: format!("peak RSS at {RSS_STREAMS} streams <= {GOAL_RSS_MB} MB"),
                value: format!("{} MB", mb(result.peak_kb)),
                met,
            };
            report.check(check());
            // Issue 14 asks it of the full policy.
            if row.name == FULL_ROW {
                report.target(check());
            }
        }
    }
    table.print();
    if results.iter().any(|(_, _, r)| !r.peak_reset) {
        println!(
            "   * the kernel refused to reset VmHWM: that peak is over the process's whole life"
        );
    }
    println!("   goal: peak RSS <= {GOAL_RSS_MB} MB with {RSS_STREAMS} streams open");
    Ok(())
}
