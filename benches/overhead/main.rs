//! `cargo bench --bench overhead [-- OPTIONS]`: what tollgate adds to a request, measured against
//! the model endpoint reached directly, with nginx (a plain reverse proxy) as a reference row.
//!
//! One run starts, on this machine:
//! - the mock upstream (the `mock-upstream` crate) inside this process, on its own thread and its
//!   own tokio runtime (see [`mock::start`] for why in-process);
//! - one `tollgate serve --config <tmp>/…toml` child per gateway row of [`targets::TARGETS`], and
//!   one more of an older tollgate binary with `--old-bin`;
//! - nginx with `bench/nginx.conf` when it is installed (otherwise that row is skipped, with a
//!   note);
//!
//! and drives them with the load generator ([`client`]), phase by phase: latency at fixed
//! open-loop rates (500 and 50 req/s), closed-loop throughput with CPU per request, SSE streaming
//! with CPU per stream and per event (events 2 ms apart, then back to back), one burst stream,
//! and memory with 64 streams open. Every phase runs the rows
//! interleaved, round after round, so that the noise of a shared machine falls on all of them
//! alike; figures are medians over rounds, and "added" figures are medians of the per-round
//! differences to the direct row.
//!
//! The files: `options` (arguments and phase lengths), `targets` (the rows, as data), `rows`
//! (starting them), `mock`, `client`, `report` (header, tables, goals, the comparison with the
//! old binary, summary), and one file per phase: `latency`, `throughput`, `stream`, `burst`, `rss`.
//!
//! `bench/README.md` explains how to run it and what every figure means.

mod burst;
mod client;
mod latency;
mod mock;
mod options;
mod report;
mod rows;
mod rss;
mod stream;
mod targets;
mod throughput;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use bench_support::procfs;
use clap::Parser as _;

use crate::mock::Mock;
use crate::options::{Options, Phase, Plan};
use crate::report::Report;
use crate::rows::Row;

/// What every phase measures with: the running rows and how long to run.
struct Bench {
    rows: Vec<Row>,
    opts: Options,
    plan: Plan,
    /// Clock ticks per second of `/proc` CPU times.
    clk_tck: f64,
    mock: Mock,
}

fn main() -> ExitCode {
    let opts = Options::parse();
    if opts.list {
        targets::print_list();
        return ExitCode::SUCCESS;
    }
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("overhead: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::new(opts.quick);
    let (clk_tck, clk_assumed) = procfs::clk_tck();
    let mock = mock::start()?;
    let dir = tempfile::Builder::new()
        .prefix("tollgate-bench-")
        .tempdir()
        .context("temp dir")?;
    // nginx's workers drop root privileges; they must still reach their files in here.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let mut report = Report::default();
    let (rows, skipped) = runtime.block_on(rows::start_all(&opts, &mock, dir.path()))?;
    for note in skipped {
        report.note(note);
    }
    let bench = Bench {
        rows,
        opts,
        plan,
        clk_tck,
        mock,
    };
    report::print_header(&bench, clk_assumed, &report);
    runtime.block_on(async {
        report::warm_up_and_verify(&bench.rows).await?;
        // In this order, whatever the order of `--phases`.
        for phase in Phase::ALL.into_iter().filter(|&p| bench.opts.wants(p)) {
            match phase {
                Phase::Latency => latency::run(&bench, &mut report).await?,
                Phase::Throughput => throughput::run(&bench, &mut report).await?,
                Phase::Stream => stream::run(&bench, &mut report, &stream::SPACED).await?,
                Phase::StreamB2b => stream::run(&bench, &mut report, &stream::BACK_TO_BACK).await?,
                Phase::Burst => burst::run(&bench, &mut report).await?,
                Phase::Rss => rss::run(&bench, &mut report).await?,
            }
        }
        anyhow::Ok(())
    })?;

    report::print_old_comparison(&bench, &report);
    report::print_summary(&bench, &report, started.elapsed());
    // Rows (and their children) go before the temp dir holding their files.
    drop(bench);
    drop(dir);
    Ok(())
}
