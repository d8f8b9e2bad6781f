//! The bench's arguments (clap) and how long each phase runs.

use std::path::PathBuf;
use std::time::Duration;

use bench_support::args::CargoBench;

use crate::targets::{self, TARGETS};

/// Concurrent streams of the streaming phase, unless `--stream-concurrency` says otherwise.
const STREAM_CONCURRENCY: usize = 16;

/// What tollgate adds to a request, against the mock upstream reached directly, with nginx as a
/// reference (bench/README.md explains every figure).
#[derive(clap::Parser, Debug)]
#[command(
    name = "overhead",
    override_usage = "cargo bench --bench overhead [-- OPTIONS]"
)]
pub struct Options {
    /// Short phases (about 80 s in all instead of about 7 min).
    #[arg(long)]
    pub quick: bool,
    /// Comma-separated rows to run (direct always runs: it is the baseline); also runs the rows
    /// that are off by default (see --list).
    #[arg(long, value_name = "NAMES", value_delimiter = ',', value_parser = row_name)]
    pub only: Option<Vec<String>>,
    /// Comma-separated subset of the phases (they run in this order whatever the list's).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "latency,throughput,stream,stream-b2b,burst,rss"
    )]
    pub phases: Vec<Phase>,
    /// Rounds per phase; figures are medians over rounds.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = at_least_one)]
    pub rounds: usize,
    /// Open-loop request rates of the latency phase, requests per second, comma-separated: one
    /// table per rate (the first rate's table carries the absolute latency goals).
    #[arg(
        long,
        alias = "rate",
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "500,50",
        value_parser = rate
    )]
    pub rates: Vec<f64>,
    /// Concurrent streams of the streaming phase.
    #[arg(long, value_name = "N", default_value_t = STREAM_CONCURRENCY, value_parser = at_least_one)]
    pub stream_concurrency: usize,
    /// nginx worker_processes (auto: one per core).
    #[arg(long, value_name = "N", default_value = "auto")]
    pub nginx_workers: String,
    /// tollgate at RUST_LOG=warn and nginx access_log off (default: both log).
    #[arg(long)]
    pub no_access_log: bool,
    /// Also run this tollgate binary (an older build) as the row `tollgate-old`, with the
    /// `tollgate` row's config, and compare the two round by round.
    #[arg(long, value_name = "PATH")]
    pub old_bin: Option<PathBuf>,
    /// Print the rows and exit.
    #[arg(long)]
    pub list: bool,
    #[command(flatten)]
    pub cargo: CargoBench,
}

impl Options {
    pub fn wants(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }

    pub fn access_log(&self) -> bool {
        !self.no_access_log
    }
}

/// A known row name, for `--only`.
fn row_name(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name == targets::OLD_ROW {
        return Err(format!(
            "{name:?} is the row of --old-bin PATH, which runs it"
        ));
    }
    if TARGETS.iter().any(|t| t.name == name) {
        Ok(name.to_owned())
    } else {
        Err(format!("no row named {name:?} (see --list)"))
    }
}

fn at_least_one(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(error) => Err(error.to_string()),
    }
}

fn rate(value: &str) -> Result<f64, String> {
    let rate: f64 = value.parse().map_err(|e| format!("{e}"))?;
    // NaN fails this too.
    if rate >= 1.0 {
        Ok(rate)
    } else {
        Err("must be at least 1".to_owned())
    }
}

/// The phases, in the order they run.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Phase {
    Latency,
    Throughput,
    /// Streams of events 2 ms apart.
    Stream,
    /// Streams of events sent back to back (no delay).
    #[value(name = "stream-b2b")]
    StreamB2b,
    Burst,
    Rss,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Phase::Latency,
        Phase::Throughput,
        Phase::Stream,
        Phase::StreamB2b,
        Phase::Burst,
        Phase::Rss,
    ];
}

/// How long each phase runs, per row and round.
pub struct Plan {
    pub latency: Duration,
    pub throughput: Duration,
    pub stream: Duration,
    /// Before each measured round: same load, not counted.
    pub warmup: Duration,
    pub burst_runs: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                latency: Duration::from_millis(800),
                throughput: Duration::from_millis(500),
                stream: Duration::from_millis(500),
                warmup: Duration::from_millis(150),
                burst_runs: 3,
            }
        } else {
            Plan {
                latency: Duration::from_secs(5),
                throughput: Duration::from_secs(3),
                stream: Duration::from_secs(3),
                warmup: Duration::from_millis(500),
                burst_runs: 5,
            }
        }
    }
}
