//! Phase 4: one stream of 2000 events with no delay, run a few times per row: a proxy that lets
//! Nagle's algorithm meet delayed ACKs stalls for ~40 ms at a time, run after run.

use anyhow::Context as _;
use bench_support::stats::{max_of, median, min_of};
use bench_support::table::num;

use crate::client::{connect, read_stream, Payload, REQUEST_TIMEOUT};
use crate::report::targets_against_nginx;
use crate::report::{per_row, row_index, section, table, Check, Report};
use crate::Bench;

const BURST_CHUNKS: usize = 2000;
/// A gap this long between two reads of a burst stream is a Nagle / delayed-ACK stall (~40 ms).
const STALL_MS: f64 = 30.0;
/// Issue 14: a gateway's median total at most this many times nginx's.
const TARGET_NGINX_RATIO: f64 = 2.0;

struct BurstRun {
    total_ms: f64,
    gap_ms: f64,
    complete: bool,
}

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let Bench { rows, plan, .. } = bench;
    let payload = Payload::stream(BURST_CHUNKS, 0);
    let mut senders = Vec::with_capacity(rows.len());
    for row in rows {
        let mut sender = connect(row.ep.addr).await?;
        // One unmeasured run: the mock builds the answer, the proxies open their upstream side.
        read_stream(&mut sender, row.ep.request(&payload), None).await?;
        senders.push(sender);
    }
    let mut runs: Vec<Vec<BurstRun>> = (0..rows.len()).map(|_| Vec::new()).collect();
    for _ in 0..plan.burst_runs {
        for (i, row) in rows.iter().enumerate() {
            let request = row.ep.request(&payload);
            let stats =
                tokio::time::timeout(REQUEST_TIMEOUT, read_stream(&mut senders[i], request, None))
                    .await
                    .context("burst stream timed out")??;
            runs[i].push(BurstRun {
                total_ms: stats.total.as_secs_f64() * 1e3,
                gap_ms: stats.max_gap.as_secs_f64() * 1e3,
                complete: stats.complete,
            });
        }
    }

    section(
        &format!(
            "4. Burst: one SSE stream of {BURST_CHUNKS} events with no delay, {} runs per row",
            plan.burst_runs
        ),
        &[
            "A Nagle / delayed-ACK stall shows as a gap of ~40 ms between two reads, in most runs: STALL when".into(),
            format!("the median run's longest gap reaches {STALL_MS} ms, or its total exceeds direct's median by {STALL_MS} ms."),
            "A single slow run is more likely the machine (preemption): see the worst gap. ms; total = request -> end.".into(),
        ],
    );
    let mut table = table(
        rows,
        &[
            "row",
            "total median",
            "total min",
            "total max",
            "us/event",
            "longest gap: median",
            "worst",
            "complete",
            "stall?",
        ],
        &[10, 12, 9, 9, 8, 19, 6, 8, 6],
    );
    let direct_total = median(runs[0].iter().map(|r| r.total_ms));
    for (row, runs) in rows.iter().zip(&runs) {
        let total = median(runs.iter().map(|r| r.total_ms));
        let gap = median(runs.iter().map(|r| r.gap_ms));
        let worst_gap = max_of(runs.iter().map(|r| r.gap_ms));
        let complete = runs.iter().filter(|r| r.complete).count();
        let stall = gap >= STALL_MS || total >= direct_total + STALL_MS;
        table.row(vec![
            row.name.to_owned(),
            num(total, 2),
            num(min_of(runs.iter().map(|r| r.total_ms)), 2),
            num(max_of(runs.iter().map(|r| r.total_ms)), 2),
            num(total * 1e3 / BURST_CHUNKS as f64, 2),
            num(gap, 2),
            num(worst_gap, 2),
            format!("{complete}/{}", runs.len()),
            if stall { "STALL" } else { "no" }.to_owned(),
        ]);
        if row.gateway {
            report.check(Check {
                row: row.name,
                what: "burst stream: no Nagle/delayed-ACK stall".into(),
                value: format!("gap {} ms", num(gap, 2)),
                met: !stall && complete == runs.len(),
            });
        }
    }
    table.print();
    let total =
        |name: &str| row_index(rows, name).map(|i| median(runs[i].iter().map(|r| r.total_ms)));
    let what = format!("burst of {BURST_CHUNKS}: total time");
    if targets_against_nginx(report, total, &what, TARGET_NGINX_RATIO, "ms") {
        println!("   target (issue 14): total time <= {TARGET_NGINX_RATIO}x nginx's");
    }
    report.keep(
        format!("4. burst of {BURST_CHUNKS} events, total ms"),
        per_row(&runs, |r| r.total_ms),
    );
    Ok(())
}
