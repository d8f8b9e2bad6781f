//! Phase 2: closed-loop throughput, and the proxies' CPU time per request at saturation.
//!
//! 64 tasks, each on its own keep-alive connection, send the same request back to back; a
//! connection that breaks is replaced. CPU is read from `/proc` at the start and the end of the
//! measured window, so the warm-up before it is not counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_support::procfs::{Procs, Ticks};
use bench_support::stats::median;
use bench_support::table::{num, verdict, Versus};
use http::StatusCode;

use crate::client::{connect, exchange, Payload, REQUEST_TIMEOUT};
use crate::report::{interleaved, per_row, row_index, section, table, Check, Report};
use crate::rows::Row;
use crate::targets::{FULL_ROW, NGINX_ROW, PLAIN_ROW};
use crate::Bench;

const GOAL_CPU_US: f64 = 25.0;
/// Issue 15: one endpoint's CPU per request against nginx's, and three endpoints' against one's.
const GOAL_NGINX_RATIO: f64 = 1.5;
const GOAL_POOL_US: f64 = 2.0;
/// Issue 14: the full-policy row's CPU per request against nginx's, and against the no-limits
/// row's.
const TARGET_FULL_NGINX_RATIO: f64 = 2.0;
const TARGET_FULL_OVER_PLAIN_US: f64 = 5.0;
/// Closed-loop connections.
const THROUGHPUT_CONNS: usize = 64;

struct ThroughputRound {
    rps: f64,
    /// The proxy's CPU time per request, µs: all, in user space, in the kernel.
    cpu_us: f64,
    user_us: f64,
    system_us: f64,
    /// The proxy's CPU time / wall time.
    cores: f64,
    /// The mock's CPU time per request, µs.
    mock_us: f64,
    errors: u64,
}

async fn throughput_round(
    bench: &Bench,
    row: &Row,
    payload: &Arc<Payload>,
) -> anyhow::Result<ThroughputRound> {
    let Bench {
        plan,
        clk_tck,
        mock,
        ..
    } = bench;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::with_capacity(THROUGHPUT_CONNS);
    for _ in 0..THROUGHPUT_CONNS {
        senders.push(connect(row.ep.addr).await?);
    }
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|sender| {
            let (ep, payload) = (row.ep.clone(), payload.clone());
            let (stop, ok, errors) = (stop.clone(), ok.clone(), errors.clone());
            tokio::spawn(async move {
                let mut sender = Some(sender);
                while !stop.load(Ordering::Relaxed) {
                    let mut current = match sender.take() {
                        Some(current) => current,
                        None => match connect(ep.addr).await {
                            Ok(fresh) => fresh,
                            Err(_) => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let request = ep.request(&payload);
                    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut current, request))
                        .await
                    {
                        Ok(Ok((StatusCode::OK, _))) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            sender = Some(current);
                        }
                        Ok(Ok(_)) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            sender = Some(current);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    tokio::time::sleep(plan.warmup).await;
    let (t0, n0, e0) = (
        Instant::now(),
        ok.load(Ordering::SeqCst),
        errors.load(Ordering::SeqCst),
    );
    let cpu0 = row.procs.as_ref().and_then(Procs::cpu_ticks);
    let mock0 = mock.cpu.ticks();
    tokio::time::sleep(plan.throughput).await;
    let (t1, n1, e1) = (
        Instant::now(),
        ok.load(Ordering::SeqCst),
        errors.load(Ordering::SeqCst),
    );
    let cpu1 = row.procs.as_ref().and_then(Procs::cpu_ticks);
    let mock1 = mock.cpu.ticks();
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await?;
    }

    let requests = (n1 - n0) as f64;
    let wall = (t1 - t0).as_secs_f64();
    let spent = |before: Option<Ticks>, after: Option<Ticks>| match (before, after) {
        (Some(b), Some(a)) => Some(a.since(b)),
        _ => None,
    };
    let us_per_request = |ticks: Option<u64>| match ticks {
        Some(ticks) if requests > 0.0 => ticks as f64 / clk_tck * 1e6 / requests,
        _ => f64::NAN,
    };
    let proxy = spent(cpu0, cpu1);
    Ok(ThroughputRound {
        rps: requests / wall,
        cpu_us: us_per_request(proxy.map(Ticks::total)),
        user_us: us_per_request(proxy.map(|t| t.user)),
        system_us: us_per_request(proxy.map(|t| t.system)),
        cores: proxy.map_or(f64::NAN, |t| t.total() as f64 / clk_tck / wall),
        mock_us: us_per_request(spent(mock0, mock1).map(Ticks::total)),
        errors: e1 - e0,
    })
}

pub async fn run(bench: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let Bench {
        rows, opts, plan, ..
    } = bench;
    let payload = Arc::new(Payload::chat());
    let results = interleaved(bench, |row| throughput_round(bench, row, &payload)).await?;

    section(
        &format!(
            "2. Throughput: {THROUGHPUT_CONNS} connections in closed loop, {:.1} s x {} rounds (same request)",
            plan.throughput.as_secs_f64(),
            opts.rounds
        ),
        &[
            "proxy CPU = utime+stime of the proxy's processes (/proc/<pid>/stat) over the phase / requests".into(),
            "(user = utime, kernel = stime: syscalls and the loopback TCP stack, which both proxies share);".into(),
            "cores = that CPU time / wall time. mock CPU = the mock upstream thread's, for scale.".into(),
            "All of it on one shared machine: req/s is bounded by the load generator and the mock too.".into(),
        ],
    );
    let mut table = table(
        rows,
        &[
            "row",
            "req/s",
            "proxy CPU us/req",
            "user",
            "kernel",
            "cores",
            "mock CPU us/req",
            "errors",
            "goal",
        ],
        &[10, 8, 16, 6, 6, 6, 15, 6, 6],
    );
    for (row, rounds) in rows.iter().zip(&results) {
        let cpu = median(rounds.iter().map(|r| r.cpu_us));
        let mut cells = vec![
            row.name.to_owned(),
            num(median(rounds.iter().map(|r| r.rps)), 0),
            num(cpu, 1),
            num(median(rounds.iter().map(|r| r.user_us)), 1),
            num(median(rounds.iter().map(|r| r.system_us)), 1),
            num(median(rounds.iter().map(|r| r.cores)), 2),
            num(median(rounds.iter().map(|r| r.mock_us)), 1),
            rounds.iter().map(|r| r.errors).sum::<u64>().to_string(),
        ];
        if row.procs.is_some() {
            let met = cpu <= GOAL_CPU_US;
            cells.push(verdict(met).to_owned());
            if row.gateway {
                report.check(Check {
                    row: row.name,
                    what: format!("CPU per request <= {GOAL_CPU_US} us"),
                    value: format!("{} us", num(cpu, 1)),
                    met,
                });
            }
        }
        table.row(cells);
    }
    table.print();
    pool_goals(rows, &results, report);
    full_policy_targets(rows, &results, report);
    let per_row = |f: fn(&ThroughputRound) -> f64| per_row(&results, f);
    report.keep(
        format!("2. CPU us/req at {THROUGHPUT_CONNS} conns"),
        per_row(|r| r.cpu_us),
    );
    report.keep("2.   of which user", per_row(|r| r.user_us));
    report.keep("2.   of which kernel", per_row(|r| r.system_us));
    report.keep(
        "2. time per request (1 / req/s), us",
        per_row(|r| 1e6 / r.rps),
    );
    println!("   goal: proxy CPU <= {GOAL_CPU_US} us per request");
    println!(
        "   goals: tollgate <= {GOAL_NGINX_RATIO}x nginx's CPU per request; tollgate-3 within {GOAL_POOL_US} us of tollgate"
    );
    println!(
        "   targets (issue 14): {FULL_ROW} <= {TARGET_FULL_NGINX_RATIO}x nginx's CPU per request, and within {TARGET_FULL_OVER_PLAIN_US} us of {PLAIN_ROW}'s"
    );
    Ok(())
}

/// The pools' goals, each on the medians of the same run: one endpoint's CPU per request against
/// nginx's, three endpoints' against one's.
/// A row's median CPU per request, if it ran.
fn median_cpu(rows: &[Row], results: &[Vec<ThroughputRound>], name: &str) -> Option<f64> {
    row_index(rows, name).map(|i| median(results[i].iter().map(|r| r.cpu_us)))
}

fn pool_goals(rows: &[Row], results: &[Vec<ThroughputRound>], report: &mut Report) {
    let cpu = |name: &str| median_cpu(rows, results, name);
    if let (Some(one), Some(nginx)) = (cpu(PLAIN_ROW), cpu(NGINX_ROW)) {
        report.check(Check::versus(
            PLAIN_ROW,
            format!("CPU per request <= {GOAL_NGINX_RATIO}x nginx's"),
            (one, nginx),
            (Versus::Ratio, GOAL_NGINX_RATIO),
            "us",
        ));
    }
    if let (Some(one), Some(three)) = (cpu(PLAIN_ROW), cpu("tollgate-3")) {
        report.check(Check::versus(
            "tollgate-3",
            format!("CPU per request within {GOAL_POOL_US} us of one endpoint's"),
            (three, one),
            (Versus::Difference, GOAL_POOL_US),
            "us",
        ));
    }
}

/// Issue 14's full-policy targets, on the medians of the same run: the deployed key's CPU per
/// request against nginx's, and what the policy adds over the key with no limits.
fn full_policy_targets(rows: &[Row], results: &[Vec<ThroughputRound>], report: &mut Report) {
    let cpu = |name: &str| median_cpu(rows, results, name);
    let Some(full) = cpu(FULL_ROW) else {
        return;
    };
    if let Some(nginx) = cpu(NGINX_ROW) {
        report.target(Check::versus(
            FULL_ROW,
            format!("full policy: CPU/request <= {TARGET_FULL_NGINX_RATIO}x nginx"),
            (full, nginx),
            (Versus::Ratio, TARGET_FULL_NGINX_RATIO),
            "us",
        ));
    }
    if let Some(plain) = cpu(PLAIN_ROW) {
        report.target(Check::versus(
            FULL_ROW,
            format!(
                "full policy: CPU/request within {TARGET_FULL_OVER_PLAIN_US} us of {PLAIN_ROW}"
            ),
            (full, plain),
            (Versus::Difference, TARGET_FULL_OVER_PLAIN_US),
            "us",
        ));
    }
}
