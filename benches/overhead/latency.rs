//! Phase 1: non-streaming latency at fixed open-loop rates (500 and 50 req/s unless `--rates`
//! says otherwise), and the proxies' CPU per request at each rate.
//!
//! Request `i` is due at `t0 + i/rate`, sent by a dedicated OS thread whatever the earlier
//! answers do, and its latency counts from that scheduled time: a slow answer cannot hide the
//! queue behind it (no coordinated omission).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bench_support::procfs::Procs;
use bench_support::stats::{added, max_of, median, percentile_ms};
use bench_support::table::{num, signed, verdict};
use http::StatusCode;

use crate::client::{connect, exchange, Endpoint, Payload, Sender, REQUEST_TIMEOUT};
use crate::report::{interleaved, per_row, row_index, section, table, Check, Report};
use crate::rows::Row;
use crate::targets::{FULL_ROW, NGINX_ROW, PLAIN_ROW};
use crate::Bench;

/// Issue 7's goals, checked at the first rate.
const GOAL_ADDED_P50_MS: f64 = 0.1;
const GOAL_ADDED_P99_MS: f64 = 0.5;
/// Issue 14: at these rates (req/s), a gateway's added p99 at most nginx's plus this many ms.
const TARGET_P99_OVER_NGINX_MS: [(f64, f64); 2] = [(500.0, 0.2), (50.0, 0.5)];
/// The generator's own p99 delay, and the direct row's p99 latency (the mock answers from memory
/// over loopback), above which the machine counts as too busy to trust the tails.
const NOISY_LAG_MS: f64 = 0.5;
const NOISY_DIRECT_P99_MS: f64 = 1.0;
/// Connections the open-loop pool opens before a round; more are opened if ever needed.
const OPEN_LOOP_PREFILL: usize = 16;

/// Idle client connections of one row, shared by the open-loop requests.
struct Pool {
    ep: Arc<Endpoint>,
    idle: Mutex<Vec<Sender>>,
    opened: AtomicUsize,
}

impl Pool {
    async fn new(ep: Arc<Endpoint>, prefill: usize) -> anyhow::Result<Arc<Pool>> {
        let mut idle = Vec::with_capacity(prefill);
        for _ in 0..prefill {
            idle.push(connect(ep.addr).await?);
        }
        Ok(Arc::new(Pool {
            ep,
            idle: Mutex::new(idle),
            opened: AtomicUsize::new(prefill),
        }))
    }

    /// An idle connection, or a new one when all are busy (the time that takes is part of the
    /// request's latency, as it would be for a real client).
    async fn get(&self) -> anyhow::Result<Sender> {
        loop {
            let popped = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            match popped {
                Some(sender) if !sender.is_closed() => return Ok(sender),
                Some(_closed) => continue,
                None => break,
            }
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        connect(self.ep.addr).await
    }

    fn put(&self, sender: Sender) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sender);
    }
}

struct Sample {
    /// From the scheduled send time to the end of the response body.
    latency: Duration,
    /// From the scheduled send time to the request's task starting (the generator's own delay).
    lag: Duration,
    ok: bool,
}

/// Sleeps until `at` on this OS thread: nanosleep to within 80 µs, then spins (nanosleep alone
/// wakes 50–60 µs late with the default timer slack).
fn sleep_until_precise(at: Instant) {
    const SPIN: Duration = Duration::from_micros(80);
    loop {
        let now = Instant::now();
        if now >= at {
            return;
        }
        let left = at - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Sends requests at t0 + i/rate for `length`, each on its own task, whatever the answers do
/// (open loop): a slow answer cannot delay the requests after it, and each latency counts from
/// the request's scheduled time, so a queue behind a slow answer is measured, not hidden
/// (no coordinated omission). The schedule is kept by a dedicated OS thread, not by a tokio timer
/// (1 ms granularity).
async fn open_loop(
    pool: &Arc<Pool>,
    payload: &Arc<Payload>,
    rate: f64,
    length: Duration,
) -> anyhow::Result<Vec<Sample>> {
    let count = (rate * length.as_secs_f64()).round() as u64;
    let period_ns = 1e9 / rate;
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let pool = pool.clone();
    let payload = payload.clone();
    std::thread::Builder::new()
        .name("open-loop".into())
        .spawn(move || {
            let t0 = Instant::now() + Duration::from_millis(2);
            let mut tasks = Vec::with_capacity(count as usize);
            for i in 0..count {
                let at = t0 + Duration::from_nanos((i as f64 * period_ns) as u64);
                sleep_until_precise(at);
                let pool = pool.clone();
                let payload = payload.clone();
                tasks.push(handle.spawn(async move {
                    let lag = at.elapsed();
                    let ok = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        let mut sender = pool.get().await?;
                        let (status, _) = exchange(&mut sender, pool.ep.request(&payload)).await?;
                        pool.put(sender);
                        anyhow::Ok(status == StatusCode::OK)
                    })
                    .await;
                    Sample {
                        latency: at.elapsed(),
                        lag,
                        ok: matches!(ok, Ok(Ok(true))),
                    }
                }));
            }
            let _ = tx.send(tasks);
        })?;
    let tasks = rx.await.context("open-loop thread died")?;
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        samples.push(task.await?);
    }
    Ok(samples)
}

struct LatencyRound {
    /// p50, p90, p99, p99.9, max in ms.
    pcts: [f64; 5],
    errors: usize,
    conns: usize,
    lag_p50: f64,
    lag_p99: f64,
    /// The proxy's CPU time per request at this rate, in µs.
    cpu_us: f64,
}

async fn latency_round(
    bench: &Bench,
    row: &Row,
    payload: &Arc<Payload>,
    rate: f64,
) -> anyhow::Result<LatencyRound> {
    let plan = &bench.plan;
    let pool = Pool::new(row.ep.clone(), OPEN_LOOP_PREFILL).await?;
    open_loop(&pool, payload, rate, plan.warmup).await?;
    let cpu_before = row.procs.as_ref().and_then(Procs::cpu_ticks);
    let samples = open_loop(&pool, payload, rate, plan.latency).await?;
    let cpu_after = row.procs.as_ref().and_then(Procs::cpu_ticks);

    let mut latency: Vec<u64> = samples
        .iter()
        .map(|s| s.latency.as_nanos() as u64)
        .collect();
    let mut lag: Vec<u64> = samples.iter().map(|s| s.lag.as_nanos() as u64).collect();
    latency.sort_unstable();
    lag.sort_unstable();
    let cpu_us = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if !samples.is_empty() => {
            after.since(before).seconds(bench.clk_tck) * 1e6 / samples.len() as f64
        }
        _ => f64::NAN,
    };
    Ok(LatencyRound {
        pcts: [
            percentile_ms(&latency, 50.0),
            percentile_ms(&latency, 90.0),
            percentile_ms(&latency, 99.0),
            percentile_ms(&latency, 99.9),
            percentile_ms(&latency, 100.0),
        ],
        errors: samples.iter().filter(|s| !s.ok).count(),
        conns: pool.opened.load(Ordering::Relaxed),
        lag_p50: percentile_ms(&lag, 50.0),
        lag_p99: percentile_ms(&lag, 99.0),
        cpu_us,
    })
}

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let payload = Arc::new(Payload::chat());
    let mut all = Vec::new();
    // The direct row's p99 at the first rate, round by round.
    let mut direct99 = Vec::new();
    for (index, &rate) in bench.opts.rates.iter().enumerate() {
        let results = interleaved(bench, |row| latency_round(bench, row, &payload, rate)).await?;
        print_rate(bench, report, &results, rate, index);
        if index == 0 {
            direct99 = results[0].iter().map(|r| r.pcts[2]).collect();
        }
        all.extend(results.into_iter().flatten());
    }
    noise_warning(report, &all, median(direct99));
    Ok(())
}

/// The table of one rate, its goals (issue 7's at the first rate) and issue 14's targets.
fn print_rate(
    bench: &Bench,
    report: &mut Report,
    results: &[Vec<LatencyRound>],
    rate: f64,
    index: usize,
) {
    let Bench {
        rows, opts, plan, ..
    } = bench;
    let goals = index == 0;
    section(
        &format!(
            "1{}. Non-streaming latency: open loop at {rate} req/s, {:.1} s x {} rounds (chat completion, 8 tokens, JSON)",
            char::from(b'a' + (index % 26) as u8),
            plan.latency.as_secs_f64(),
            opts.rounds
        ),
        &[
            "latency = end of the response body - the request's SCHEDULED send time (t0 + i/rate):".into(),
            "no coordinated omission. ms; median over rounds, except max (the worst of all rounds).".into(),
            "added = median over rounds of (row - direct) in the same round.".into(),
        ],
    );
    let mut table = table(
        rows,
        &[
            "row",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "conns",
            "errors",
            "CPU us/req",
            "added p50",
            "",
            "added p99",
            "",
        ],
        &[10, 7, 7, 7, 7, 7, 5, 6, 10, 9, 6, 9, 6],
    );
    let direct = &results[0];
    let mut added99 = Vec::with_capacity(rows.len());
    for (row, rounds) in rows.iter().zip(results) {
        let figure = |k: usize| rounds.iter().map(|r| r.pcts[k]).collect::<Vec<_>>();
        let mut cells = vec![
            row.name.to_owned(),
            num(median(figure(0)), 3),
            num(median(figure(1)), 3),
            num(median(figure(2)), 3),
            num(median(figure(3)), 3),
            num(max_of(figure(4)), 3),
            rounds
                .iter()
                .map(|r| r.conns)
                .max()
                .unwrap_or(0)
                .to_string(),
            rounds.iter().map(|r| r.errors).sum::<usize>().to_string(),
            num(median(rounds.iter().map(|r| r.cpu_us)), 1),
        ];
        let direct_figure = |k: usize| direct.iter().map(|r| r.pcts[k]).collect::<Vec<_>>();
        let add99 = added(&figure(2), &direct_figure(2));
        added99.push(add99);
        if row.procs.is_some() {
            let add50 = added(&figure(0), &direct_figure(0));
            let met50 = add50 <= GOAL_ADDED_P50_MS;
            let met99 = add99 <= GOAL_ADDED_P99_MS;
            let marks = |met: bool| if goals { verdict(met) } else { "" }.to_owned();
            cells.extend([
                signed(add50, 3),
                marks(met50),
                signed(add99, 3),
                marks(met99),
            ]);
            if row.gateway && goals {
                report.check(Check {
                    row: row.name,
                    what: format!("added p50 at {rate} req/s <= {GOAL_ADDED_P50_MS} ms"),
                    value: format!("{} ms", signed(add50, 3)),
                    met: met50,
                });
                report.check(Check {
                    row: row.name,
                    what: format!("added p99 at {rate} req/s <= {GOAL_ADDED_P99_MS} ms"),
                    value: format!("{} ms", signed(add99, 3)),
                    met: met99,
                });
            }
        }
        table.row(cells);
    }
    table.print();
    let allowance = TARGET_P99_OVER_NGINX_MS
        .iter()
        .find(|(at, _)| *at == rate)
        .map(|&(_, ms)| ms);
    if let (Some(allowance), Some(nginx)) = (allowance, row_index(rows, NGINX_ROW)) {
        for name in [PLAIN_ROW, FULL_ROW] {
            if let Some(i) = row_index(rows, name) {
                let over = added99[i] - added99[nginx];
                report.target(Check {
                    row: name,
                    what: format!("added p99 at {rate} req/s <= nginx's + {allowance} ms"),
                    value: format!("{} ms", signed(over, 3)),
                    met: over <= allowance,
                });
            }
        }
        println!("   target (issue 14): added p99 <= nginx's added p99 + {allowance} ms");
    }
    let per_row = |f: fn(&LatencyRound) -> f64| per_row(results, f);
    report.keep(
        format!("1. CPU us/req at {rate} req/s"),
        per_row(|r| r.cpu_us),
    );
    report.keep(
        format!("1. latency p50 at {rate} req/s, ms"),
        per_row(|r| r.pcts[0]),
    );
    report.keep(
        format!("1. latency p99 at {rate} req/s, ms"),
        per_row(|r| r.pcts[2]),
    );
    if goals {
        println!(
            "   goals: added p50 <= {GOAL_ADDED_P50_MS} ms, added p99 <= {GOAL_ADDED_P99_MS} ms. \
             CPU us/req = the proxy's CPU time / requests at this rate (10 ms ticks: approximate)."
        );
    }
}

/// The generator's own delay over every rate and round, and a warning when it (or the direct
/// row's p99) says the machine was too busy to trust the tails.
fn noise_warning(report: &mut Report, all: &[LatencyRound], direct99: f64) {
    let lag50 = median(all.iter().map(|r| r.lag_p50));
    let lag99 = median(all.iter().map(|r| r.lag_p99));
    println!();
    println!(
        "   generator's own delay (task start - scheduled time), median over all runs: p50 {} ms, p99 {} ms",
        num(lag50, 3),
        num(lag99, 3)
    );
    if lag99 > NOISY_LAG_MS || direct99 > NOISY_DIRECT_P99_MS {
        let warning = format!(
            "the machine was busy with something else (generator's own delay p99 {} ms, limit \
             {NOISY_LAG_MS}; direct p99 {} ms, limit {NOISY_DIRECT_P99_MS}): p99 and beyond, and \
             every goal near its limit, are noise in this run; run again on a quieter machine",
            num(lag99, 3),
            num(direct99, 3)
        );
        println!("   WARNING: {warning}");
        report.warn(warning);
    }
}
