//! `cargo bench --bench overhead [-- OPTIONS]`: what tollgate adds to a request, measured against
//! the model endpoint reached directly, with nginx (a plain reverse proxy) as a reference row.
//!
//! One run starts, on this machine:
//! - the mock upstream (the `mock-upstream` crate) inside this process, on its own thread and its
//!   own tokio runtime (see [`start_mock`] for why in-process);
//! - one `tollgate serve --config <tmp>/…toml` child per gateway row of [`TARGETS`];
//! - nginx with `bench/nginx.conf` when it is installed (otherwise that row is skipped, with a
//!   note);
//!
//! and drives them with the load generator below, phase by phase: latency at a fixed open-loop
//! rate, closed-loop throughput with CPU per request, SSE streaming, one burst stream, and memory
//! with 64 streams open. Every phase runs the rows interleaved, round after round, so that the
//! noise of a shared machine falls on all of them alike; figures are medians over rounds, and
//! "added" figures are medians of the per-round differences to the direct row.
//!
//! `bench/README.md` explains how to run it and what every figure means.

use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use mock_upstream::{MockOptions, MockUpstream};

// ================================================================================================
// Rows: what is measured
// ================================================================================================

/// One row of every table: a way to reach the mock upstream.
struct Target {
    name: &'static str,
    kind: Kind,
    /// Headers this row's client adds to every request (e.g. the gateway key).
    headers: &'static [(&'static str, &'static str)],
    /// Runs without `--only`; the others run only when named (`--only tollgate-10k-keys`).
    by_default: bool,
}

enum Kind {
    /// The mock upstream itself: the baseline of every "added" figure.
    Direct,
    /// A tollgate process: the bench's config (free ports, the mock as upstream, everything else
    /// at its default) plus the variant's additions.
    Tollgate(Variant),
    /// nginx as a plain reverse proxy (`bench/nginx.conf`), when installed.
    Nginx,
}

/// A gateway config variant. To measure another configuration, add a [`Target`] with
/// `Kind::Tollgate(Variant { .. })`: its TOML goes into the places below, and the client sends
/// the row's [`Target::headers`].
struct Variant {
    /// Lines added inside `[server]`.
    server: &'static str,
    /// Lines added inside `[upstream]`.
    upstream: &'static str,
    /// Tables appended after `[upstream]` (`[[keys]]`, `[policies.x]`, …): a function, so that a
    /// variant can generate many. Relative paths land in the row's own directory (tollgate runs
    /// with it as its working directory).
    tables: fn() -> String,
}

/// The client key every row sends (the direct and nginx rows send it too, so that every row's
/// requests are the same bytes; nginx replaces it with the upstream credential, the mock ignores
/// it). Its SHA-256 (`printf %s KEY | sha256sum`) is what the gateway rows configure.
const CLIENT_KEY_HEADER: (&str, &str) = (
    "authorization",
    "Bearer tg-0123456789abcdef0123456789abcdef0123456789abcdef",
);
const CLIENT_KEY_SHA256: &str = "3afc714881401d7d9a57454c7e41f3583337c49a0258b640b031d09e4a83c0bd";

/// The bench key, as operators configure one: no limits.
fn one_key() -> String {
    format!("[[keys]]\nname = \"bench\"\nsha256 = \"{CLIENT_KEY_SHA256}\"\n")
}

/// The bench key with a concurrency and a rate limit it never reaches: the cost of the limiter.
fn one_key_with_limits() -> String {
    format!(
        "[[keys]]\nname = \"bench\"\nsha256 = \"{CLIENT_KEY_SHA256}\"\nconcurrency = 100000\n\
         rate = {{ requests = 1000000000, per = \"1s\" }}\n"
    )
}

/// 10 000 other keys besides the bench key: lookups must not grow with the table.
fn ten_thousand_keys() -> String {
    let mut tables = one_key();
    for i in 1..=10_000u32 {
        let _ = write!(
            tables,
            "[[keys]]\nname = \"k{i:05}\"\nsha256 = \"{i:064x}\"\n"
        );
    }
    tables
}

/// The rows, in table order. `direct` must stay first: it is the baseline.
const TARGETS: &[Target] = &[
    Target {
        name: "direct",
        kind: Kind::Direct,
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: "tollgate",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            tables: one_key,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: "nginx",
        kind: Kind::Nginx,
        headers: &[CLIENT_KEY_HEADER],
        by_default: true,
    },
    Target {
        name: "tollgate+limits",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            tables: one_key_with_limits,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
    Target {
        name: "tollgate-no-inject",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "inject_usage = false",
            tables: one_key,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
    Target {
        name: "tollgate-10k-keys",
        kind: Kind::Tollgate(Variant {
            server: "",
            upstream: "",
            tables: ten_thousand_keys,
        }),
        headers: &[CLIENT_KEY_HEADER],
        by_default: false,
    },
];

/// The credential both proxies send upstream (the mock does not check it).
const UPSTREAM_KEY_ENV: &str = "TOLLGATE_BENCH_UPSTREAM_KEY";
const UPSTREAM_KEY: &str = "bench-upstream-key";

const NGINX_TEMPLATE: &str = include_str!("../bench/nginx.conf");

const CHAT_PATH: &str = "/v1/chat/completions";
const CHAT_BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM_BODY: &str =
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

// ================================================================================================
// Targets (the goals), checked on the gateway rows
// ================================================================================================

const GOAL_ADDED_P50_MS: f64 = 0.1;
const GOAL_ADDED_P99_MS: f64 = 0.5;
const GOAL_CPU_US: f64 = 25.0;
const GOAL_ADDED_TTFE_MS: f64 = 0.2;
const GOAL_RSS_MB: f64 = 30.0;
/// The generator's own p99 delay, and the direct row's p99 latency (the mock answers from memory
/// over loopback), above which the machine counts as too busy to trust the tails.
const NOISY_LAG_MS: f64 = 0.5;
const NOISY_DIRECT_P99_MS: f64 = 1.0;
/// A gap this long between two reads of a burst stream is a Nagle / delayed-ACK stall (~40 ms).
const STALL_MS: f64 = 30.0;

// ================================================================================================
// Options and plan
// ================================================================================================

const USAGE: &str = "\
usage: cargo bench --bench overhead [-- OPTIONS]

  --quick               short phases (about 40 s in all instead of about 3 min)
  --only NAMES          comma-separated rows to run (direct always runs: it is the baseline);
                        also runs the rows that are off by default (see --list)
  --phases LIST         comma-separated subset of: latency,throughput,stream,burst,rss
  --rounds N            rounds per phase (default 3); figures are medians over rounds
  --rate N              open-loop request rate of the latency phase (default 500 req/s)
  --stream-concurrency N  concurrent streams of the streaming phase (default 16)
  --nginx-workers N     nginx worker_processes (default auto: one per core)
  --no-access-log       tollgate at RUST_LOG=warn and nginx access_log off (default: both log)
  --list                print the rows and exit";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Latency,
    Throughput,
    Stream,
    Burst,
    Rss,
}

const ALL_PHASES: [Phase; 5] = [
    Phase::Latency,
    Phase::Throughput,
    Phase::Stream,
    Phase::Burst,
    Phase::Rss,
];

struct Options {
    quick: bool,
    only: Option<Vec<String>>,
    phases: Vec<Phase>,
    rounds: usize,
    rate: f64,
    stream_concurrency: usize,
    nginx_workers: String,
    access_log: bool,
    list: bool,
}

impl Options {
    /// `Ok(None)`: help was asked for.
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Option<Options>> {
        let mut opts = Options {
            quick: false,
            only: None,
            phases: ALL_PHASES.to_vec(),
            rounds: 3,
            rate: 500.0,
            stream_concurrency: STREAM_CONCURRENCY,
            nginx_workers: "auto".to_owned(),
            access_log: true,
            list: false,
        };
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg, None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| anyhow!("{flag} needs a value"))
            };
            match flag.as_str() {
                // cargo passes `--bench` to every bench binary.
                "--bench" => {}
                "--quick" => opts.quick = true,
                "--no-access-log" => opts.access_log = false,
                "--list" => opts.list = true,
                "--only" => {
                    let names = value()?;
                    opts.only = Some(names.split(',').map(|s| s.trim().to_owned()).collect());
                }
                "--phases" => {
                    let list = value()?;
                    opts.phases = list
                        .split(',')
                        .map(|name| match name.trim() {
                            "latency" => Ok(Phase::Latency),
                            "throughput" => Ok(Phase::Throughput),
                            "stream" => Ok(Phase::Stream),
                            "burst" => Ok(Phase::Burst),
                            "rss" => Ok(Phase::Rss),
                            other => Err(anyhow!("unknown phase {other:?}")),
                        })
                        .collect::<anyhow::Result<_>>()?;
                }
                "--rounds" => {
                    opts.rounds = value()?.parse().context("--rounds")?;
                    if opts.rounds == 0 {
                        bail!("--rounds must be at least 1");
                    }
                }
                "--rate" => {
                    opts.rate = value()?.parse().context("--rate")?;
                    if opts.rate.is_nan() || opts.rate < 1.0 {
                        bail!("--rate must be at least 1");
                    }
                }
                "--stream-concurrency" => {
                    opts.stream_concurrency = value()?.parse().context("--stream-concurrency")?;
                    if opts.stream_concurrency == 0 {
                        bail!("--stream-concurrency must be at least 1");
                    }
                }
                "--nginx-workers" => opts.nginx_workers = value()?,
                "-h" | "--help" => return Ok(None),
                other => bail!("unknown argument {other:?}"),
            }
        }
        if let Some(only) = &opts.only {
            for name in only {
                if !TARGETS.iter().any(|t| t.name == name) {
                    bail!("--only: no row named {name:?} (see --list)");
                }
            }
        }
        Ok(Some(opts))
    }

    fn wants(&self, phase: Phase) -> bool {
        self.phases.contains(&phase)
    }
}

/// How long each phase runs, per row and round.
struct Plan {
    latency: Duration,
    throughput: Duration,
    stream: Duration,
    /// Before each measured round: same load, not counted.
    warmup: Duration,
    burst_runs: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                latency: Duration::from_millis(1200),
                throughput: Duration::from_millis(700),
                stream: Duration::from_millis(700),
                warmup: Duration::from_millis(200),
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

/// Closed-loop connections of the throughput phase.
const THROUGHPUT_CONNS: usize = 64;
/// Concurrent streams of the streaming phase.
const STREAM_CONCURRENCY: usize = 16;
const STREAM_CHUNKS: usize = 32;
const STREAM_DELAY_MS: u64 = 2;
const BURST_CHUNKS: usize = 2000;
const RSS_STREAMS: usize = 64;
const RSS_CHUNKS: usize = 200;
const RSS_DELAY_MS: u64 = 5;
/// Connections the open-loop pool opens before a round; more are opened if ever needed.
const OPEN_LOOP_PREFILL: usize = 16;
/// No single request may hang the bench.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

// ================================================================================================
// main
// ================================================================================================

fn main() -> ExitCode {
    let opts = match Options::parse(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("overhead: {error}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if opts.list {
        for target in TARGETS {
            let note = if target.by_default {
                ""
            } else {
                "  (only with --only)"
            };
            println!("{}{note}", target.name);
        }
        return ExitCode::SUCCESS;
    }
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("overhead: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(opts: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let plan = Plan::new(opts.quick);
    let clk_tck = clk_tck();
    let mock = start_mock()?;
    let dir = tempfile::Builder::new()
        .prefix("tollgate-bench-")
        .tempdir()
        .context("temp dir")?;
    // nginx's workers drop root privileges; they must still reach their files in here.
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let mut notes = Vec::new();
    let rows = runtime.block_on(start_rows(opts, &mock, dir.path(), &mut notes))?;
    let longest = rows.iter().map(|row| row.name.len()).max().unwrap_or(0);
    ROW_NAME_WIDTH.store(longest + 1, Ordering::Relaxed);

    print_header(opts, &plan, clk_tck.0, &mock, &rows, &notes, clk_tck.1);
    let mut checks = Vec::new();
    let mut warnings = Vec::new();
    runtime.block_on(async {
        warm_up_and_verify(&rows).await?;
        if opts.wants(Phase::Latency) {
            phase_latency(&rows, opts, &plan, clk_tck.0, &mut checks, &mut warnings).await?;
        }
        if opts.wants(Phase::Throughput) {
            phase_throughput(&rows, opts, &plan, clk_tck.0, &mock, &mut checks).await?;
        }
        if opts.wants(Phase::Stream) {
            phase_stream(&rows, opts, &plan, &mut checks).await?;
        }
        if opts.wants(Phase::Burst) {
            phase_burst(&rows, &plan, &mut checks).await?;
        }
        if opts.wants(Phase::Rss) {
            phase_rss(&rows, &mut checks).await?;
        }
        anyhow::Ok(())
    })?;

    print_summary(&rows, &checks, &warnings, started.elapsed());
    // Rows (and their children) go before the temp dir holding their files.
    drop(rows);
    drop(dir);
    Ok(())
}

// ================================================================================================
// The mock upstream
// ================================================================================================

struct Mock {
    addr: SocketAddr,
    url: String,
    /// The mock's thread, for its CPU time.
    cpu: ThreadCpu,
}

/// Starts the mock upstream in this process, on its own OS thread with its own current-thread
/// tokio runtime.
///
/// Why in-process rather than the `mock_upstream` example binary as a child: `cargo bench` builds
/// no examples, so a child would need a build step of its own; in-process there is no process to
/// manage or leak. Its own thread and runtime keep it from sharing an event loop with the load
/// generator (their tasks never delay each other's polls), and its CPU time is still its own to
/// read (`/proc/self/task/<tid>/stat`). It shares the machine's cores with everything else, as a
/// separate process would.
fn start_mock() -> anyhow::Result<Mock> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("mock-upstream".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    let _ = tx.send(Err(anyhow::Error::from(error)));
                    return;
                }
            };
            runtime.block_on(async move {
                let tid = current_tid();
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
                match MockUpstream::start_on(addr, MockOptions::default()).await {
                    Ok(mock) => {
                        // Benchmarks must not keep every request in memory.
                        mock.set_recording(false);
                        let _ = tx.send(Ok((mock.addr(), mock.url(), tid)));
                        // Serve until the process ends.
                        std::future::pending::<()>().await;
                    }
                    Err(error) => {
                        let _ = tx.send(Err(anyhow::Error::from(error).context("mock upstream")));
                    }
                }
            });
        })?;
    let (addr, url, tid) = rx.recv().context("mock upstream thread died")??;
    Ok(Mock {
        addr,
        url,
        cpu: ThreadCpu { tid },
    })
}

/// This thread's kernel id, from `/proc/thread-self` (`<pid>/task/<tid>`).
fn current_tid() -> Option<u32> {
    fs::read_link("/proc/thread-self")
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

struct ThreadCpu {
    tid: Option<u32>,
}

impl ThreadCpu {
    fn ticks(&self) -> Option<Ticks> {
        let tid = self.tid?;
        stat_cpu_ticks(&format!("/proc/self/task/{tid}/stat"))
    }
}

// ================================================================================================
// /proc
// ================================================================================================

/// Clock ticks per second of `/proc/*/stat` times, from `getconf CLK_TCK`; 100 (the value on
/// every common Linux build) when getconf is missing. The flag says whether it was assumed.
fn clk_tck() -> (f64, bool) {
    let read = Command::new("getconf")
        .arg("CLK_TCK")
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&hz| hz > 0.0);
    match read {
        Some(hz) => (hz, false),
        None => (100.0, true),
    }
}

/// CPU time in clock ticks.
#[derive(Clone, Copy, Default)]
struct Ticks {
    user: u64,
    system: u64,
}

impl Ticks {
    fn total(self) -> u64 {
        self.user + self.system
    }

    fn since(self, before: Ticks) -> Ticks {
        Ticks {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }
}

/// utime and stime of a `/proc/…/stat` file: of the whole process for `/proc/<pid>/stat` (all its
/// threads, dead ones included), of one thread for `/proc/<pid>/task/<tid>/stat`.
fn stat_cpu_ticks(path: &str) -> Option<Ticks> {
    let stat = fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Ticks {
        user: utime,
        system: stime,
    })
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in kB.
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The processes whose parent is `parent` (nginx's workers).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat.get(stat.rfind(')')? + 1..)?.to_owned();
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect();
    children.sort_unstable();
    children
}

/// The processes of one proxy: tollgate's one, or nginx's master and workers.
struct Procs {
    pids: Vec<u32>,
}

impl Procs {
    fn cpu_ticks(&self) -> Option<Ticks> {
        self.pids.iter().try_fold(Ticks::default(), |sum, pid| {
            let ticks = stat_cpu_ticks(&format!("/proc/{pid}/stat"))?;
            Some(Ticks {
                user: sum.user + ticks.user,
                system: sum.system + ticks.system,
            })
        })
    }

    /// Summed over the processes (for nginx this counts shared pages once per process).
    fn status_kb(&self, field: &str) -> Option<u64> {
        self.pids.iter().map(|&pid| status_kb(pid, field)).sum()
    }

    /// Resets VmHWM to the current RSS (`echo 5 > /proc/<pid>/clear_refs`, Linux ≥ 4.0), so that
    /// a later VmHWM is the peak of what happened since. False if the kernel refused.
    fn reset_peak(&self) -> bool {
        self.pids
            .iter()
            .all(|pid| fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
    }
}

// ================================================================================================
// Child processes
// ================================================================================================

/// A child process that is stopped when dropped: SIGTERM (nginx's master then stops its workers;
/// tollgate drains, with nothing in flight), SIGKILL after 5 s.
struct ChildGuard {
    child: std::process::Child,
}

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago (bound and released; the race is accepted).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// A running row.
struct Row {
    name: &'static str,
    /// A tollgate row: the goals are checked on it.
    gateway: bool,
    ep: Arc<Endpoint>,
    /// The proxy's processes; `None` for the direct row.
    procs: Option<Procs>,
    describe: String,
    /// Where the proxy's access log goes.
    log: Option<PathBuf>,
    _child: Option<ChildGuard>,
}

async fn start_rows(
    opts: &Options,
    mock: &Mock,
    dir: &Path,
    notes: &mut Vec<String>,
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for target in TARGETS {
        let wanted = match (&target.kind, &opts.only) {
            (Kind::Direct, _) => true,
            (_, None) => target.by_default,
            (_, Some(only)) => only.iter().any(|name| name == target.name),
        };
        if !wanted {
            continue;
        }
        let headers = target
            .headers
            .iter()
            .map(|(name, value)| {
                Ok((
                    HeaderName::from_bytes(name.as_bytes())?,
                    HeaderValue::from_str(value)?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("row {}: headers", target.name))?;
        match &target.kind {
            Kind::Direct => rows.push(Row {
                name: target.name,
                gateway: false,
                ep: Arc::new(Endpoint::new(mock.addr, headers)),
                procs: None,
                describe: format!("{}  the mock upstream itself (baseline)", mock.addr),
                log: None,
                _child: None,
            }),
            Kind::Tollgate(variant) => {
                let row = start_tollgate(target.name, variant, headers, opts, mock, dir)
                    .await
                    .with_context(|| format!("row {}", target.name))?;
                rows.push(row);
            }
            Kind::Nginx => match find_nginx() {
                None => notes.push(format!(
                    "row {}: nginx is not installed (e.g. `apt-get install -y nginx`): skipped",
                    target.name
                )),
                Some(bin) => match start_nginx(target.name, &bin, headers, opts, mock, dir).await {
                    Ok(row) => rows.push(row),
                    Err(error) => {
                        notes.push(format!(
                            "row {}: nginx did not start: {error:#}: skipped",
                            target.name
                        ));
                    }
                },
            },
        }
    }
    Ok(rows)
}

fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn start_tollgate(
    name: &'static str,
    variant: &Variant,
    headers: Vec<(HeaderName, HeaderValue)>,
    opts: &Options,
    mock: &Mock,
    dir: &Path,
) -> anyhow::Result<Row> {
    let home = dir.join(safe_name(name));
    fs::create_dir_all(&home)?;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let config = format!(
        "# Written by benches/overhead.rs for row {name:?}.\n\
         [server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n{server}\n\
         [upstream]\nurl = \"{url}\"\napi_key_env = \"{UPSTREAM_KEY_ENV}\"\n{upstream}\n\
         {tables}",
        server = variant.server,
        url = mock.url,
        upstream = variant.upstream,
        tables = (variant.tables)(),
    );
    let config_path = home.join("tollgate.toml");
    fs::write(&config_path, config)?;
    let log = home.join("tollgate.log");
    let out = fs::File::create(&log)?;
    // RUST_LOG is set either way, so that the caller's environment cannot change what is measured.
    let rust_log = if opts.access_log { "info" } else { "warn" };
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .current_dir(&home)
        .env("RUST_LOG", rust_log)
        .env(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("cannot start tollgate")?;
    let mut child = ChildGuard { child };
    let ep = Arc::new(Endpoint::new(listen, headers));
    if let Err(error) = wait_ready(&ep, &mut child).await {
        let tail = file_tail(&log, 20);
        bail!(
            "tollgate did not come up: {error:#}\n--- {} ---\n{tail}",
            log.display()
        );
    }
    let pid = child.pid();
    Ok(Row {
        name,
        gateway: true,
        ep,
        procs: Some(Procs { pids: vec![pid] }),
        describe: format!(
            "{listen}  pid {pid}, tokio default runtime ({} threads), RUST_LOG={rust_log}: {}",
            status_kb(pid, "Threads").map_or("?".to_owned(), |n| n.to_string()),
            if opts.access_log {
                "access log ON, one line per request to a file"
            } else {
                "access log off"
            }
        ),
        log: Some(log),
        _child: Some(child),
    })
}

fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

async fn start_nginx(
    name: &'static str,
    bin: &Path,
    headers: Vec<(HeaderName, HeaderValue)>,
    opts: &Options,
    mock: &Mock,
    dir: &Path,
) -> anyhow::Result<Row> {
    let home = dir.join(safe_name(name));
    fs::create_dir_all(&home)?;
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let log = home.join("access.log");
    let access_log = if opts.access_log {
        format!("{} combined", log.display())
    } else {
        "off".to_owned()
    };
    let config = NGINX_TEMPLATE
        .replace("@WORKERS@", &opts.nginx_workers)
        .replace("@DIR@", &home.display().to_string())
        .replace("@ACCESS_LOG@", &access_log)
        .replace("@UPSTREAM@", &mock.addr.to_string())
        .replace("@LISTEN@", &listen.to_string())
        .replace("@UPSTREAM_KEY@", UPSTREAM_KEY);
    let config_path = home.join("nginx.conf");
    fs::write(&config_path, config)?;
    let stderr_path = home.join("stderr.log");
    let child = Command::new(bin)
        .arg("-p")
        .arg(&home)
        .arg("-e")
        .arg(home.join("error.log"))
        .arg("-c")
        .arg(&config_path)
        .args(["-g", "daemon off;"])
        .current_dir(&home)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path)?)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let mut child = ChildGuard { child };
    if let Err(error) = wait_ready(&Endpoint::new(listen, Vec::new()), &mut child).await {
        let errors = format!(
            "{}{}",
            file_tail(&stderr_path, 10),
            file_tail(&home.join("error.log"), 10)
        );
        bail!("{error:#}\n{errors}");
    }
    let master = child.pid();
    let workers = children_of(master);
    let version = Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stderr).trim().to_owned())
        .and_then(|v| v.rsplit(' ').next().map(str::to_owned))
        .unwrap_or_else(|| "nginx".to_owned());
    let describe = format!(
        "{listen}  {version}, master pid {master} + {} worker(s) {:?} (worker_processes {}), {}",
        workers.len(),
        workers,
        opts.nginx_workers,
        if opts.access_log {
            "access_log ON (combined) to a file"
        } else {
            "access_log off"
        }
    );
    let mut pids = vec![master];
    pids.extend(workers);
    Ok(Row {
        name,
        gateway: false,
        ep: Arc::new(Endpoint::new(listen, headers)),
        procs: Some(Procs { pids }),
        describe,
        log: opts.access_log.then_some(log),
        _child: Some(child),
    })
}

fn file_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Until `GET /v1/models` through the row answers 200, the child exits, or 15 s pass.
async fn wait_ready(ep: &Endpoint, child: &mut ChildGuard) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last_error = anyhow!("no answer yet");
    while Instant::now() < deadline {
        if let Some(status) = child.exited() {
            bail!("exited with {status}");
        }
        let attempt = async {
            let mut sender = connect(ep.addr).await?;
            let (status, _) = exchange(&mut sender, ep.get_models()).await?;
            anyhow::Ok(status)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(StatusCode::OK)) => return Ok(()),
            Ok(Ok(status)) => last_error = anyhow!("GET /v1/models answered {status}"),
            Ok(Err(error)) => last_error = error,
            Err(_) => last_error = anyhow!("GET /v1/models timed out"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last_error)
}

// ================================================================================================
// The load generator's client: raw hyper HTTP/1.1 connections, TCP_NODELAY
// ================================================================================================

type Sender = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        // A broken connection shows as an error of the request on it.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Where a row's requests go, and the headers its client always sends.
struct Endpoint {
    addr: SocketAddr,
    host: HeaderValue,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// A request body and its `x-mock-*` headers.
struct Payload {
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Payload {
    fn chat() -> Payload {
        Payload {
            body: Bytes::from_static(CHAT_BODY.as_bytes()),
            headers: Vec::new(),
        }
    }

    fn stream(chunks: usize, delay_ms: u64) -> Payload {
        Payload {
            body: Bytes::from_static(STREAM_BODY.as_bytes()),
            headers: vec![
                (
                    HeaderName::from_static("x-mock-chunks"),
                    HeaderValue::from(chunks),
                ),
                (
                    HeaderName::from_static("x-mock-chunk-delay-ms"),
                    HeaderValue::from(delay_ms),
                ),
            ],
        }
    }
}

impl Endpoint {
    fn new(addr: SocketAddr, headers: Vec<(HeaderName, HeaderValue)>) -> Endpoint {
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or(HeaderValue::from_static("localhost"));
        Endpoint {
            addr,
            host,
            headers,
        }
    }

    fn request(&self, payload: &Payload) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(payload.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(CHAT_PATH);
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in self.headers.iter().chain(&payload.headers) {
            headers.insert(name.clone(), value.clone());
        }
        request
    }

    fn get_models(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = Uri::from_static("/v1/models");
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        request
    }
}

/// Sends one request and reads the whole answer; returns its status and body.
async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// What one SSE stream looked like from the client.
struct StreamStats {
    /// From just before the request was written to the first `data:` bytes.
    ttfe: Option<Duration>,
    /// From just before the request was written to the end of the body.
    total: Duration,
    /// Longest time between two reads (the first: between the headers and the first read).
    max_gap: Duration,
    /// Ended with `data: [DONE]`.
    complete: bool,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Streams one SSE answer. `running` counts the streams between their first event and their end.
async fn read_stream(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
    running: Option<&AtomicUsize>,
) -> anyhow::Result<StreamStats> {
    struct Running<'a>(Option<&'a AtomicUsize>);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            if let Some(counter) = self.0 {
                counter.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    sender.ready().await?;
    let start = Instant::now();
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        bail!("status {}", response.status());
    }
    let mut body = response.into_body();
    let mut ttfe = None;
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    let mut tail: Vec<u8> = Vec::with_capacity(2 * DONE.len());
    let mut counted = Running(None);
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        max_gap = max_gap.max(now - last);
        last = now;
        if ttfe.is_none() {
            let mut window = tail.clone();
            window.extend_from_slice(data);
            if window.windows(5).any(|w| w == b"data:") {
                ttfe = Some(now - start);
                if let Some(counter) = running {
                    counter.fetch_add(1, Ordering::SeqCst);
                    counted = Running(Some(counter));
                }
            }
        }
        tail.extend_from_slice(&data[data.len().saturating_sub(DONE.len())..]);
        let excess = tail.len().saturating_sub(DONE.len());
        tail.drain(..excess);
    }
    let total = start.elapsed();
    drop(counted);
    Ok(StreamStats {
        ttfe,
        total,
        max_gap,
        complete: tail == DONE,
    })
}

// ================================================================================================
// Statistics and tables
// ================================================================================================

/// Nearest-rank percentile of sorted nanoseconds, in ms.
fn pct_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn max_of(values: impl IntoIterator<Item = f64>) -> f64 {
    values
        .into_iter()
        .filter(|v| !v.is_nan())
        .fold(f64::NAN, f64::max)
}

/// Median over rounds of `row − direct`, round by round.
fn added(row: &[f64], direct: &[f64]) -> f64 {
    median(row.iter().zip(direct).map(|(r, d)| r - d))
}

fn num(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "-".to_owned()
    } else {
        format!("{value:.decimals$}")
    }
}

fn signed(value: f64, decimals: usize) -> String {
    if value.is_nan() {
        "-".to_owned()
    } else {
        format!("{value:+.decimals$}")
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// The width of the row-name column: the longest running row's name (set once, at start).
static ROW_NAME_WIDTH: AtomicUsize = AtomicUsize::new(10);

/// A fixed-width table: the first column left-aligned, the others right-aligned.
struct Table {
    widths: Vec<usize>,
    /// Columns aligned left.
    left: Vec<usize>,
    out: String,
}

impl Table {
    fn new(header: &[&str], widths: &[usize]) -> Table {
        Table::aligned(header, widths, &[0])
    }

    /// A table whose columns `left` are aligned left.
    fn aligned(header: &[&str], widths: &[usize], left: &[usize]) -> Table {
        let mut widths = widths.to_vec();
        if let Some(first) = widths.first_mut() {
            *first = (*first).max(ROW_NAME_WIDTH.load(Ordering::Relaxed));
        }
        let mut table = Table {
            widths: widths.clone(),
            left: left.to_vec(),
            out: String::new(),
        };
        table.row(header.iter().map(|s| (*s).to_owned()).collect());
        let rule: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
        table.out.push_str(&"-".repeat(rule));
        table.out.push('\n');
        table
    }

    fn row(&mut self, cells: Vec<String>) {
        for (i, cell) in cells.iter().enumerate() {
            let width = self.widths.get(i).copied().unwrap_or(10);
            let gap = if i == 0 { "" } else { "  " };
            if self.left.contains(&i) {
                let _ = write!(self.out, "{gap}{cell:<width$}");
            } else {
                let _ = write!(self.out, "{gap}{cell:>width$}");
            }
        }
        self.out.push('\n');
    }

    fn print(&self) {
        print!("{}", self.out);
    }
}

/// One goal checked on one row, for the summary.
struct Check {
    row: &'static str,
    what: String,
    value: String,
    met: bool,
}

fn section(title: &str, lines: &[String]) {
    println!();
    println!("== {title}");
    for line in lines {
        println!("   {line}");
    }
}

/// Runs `rounds` rounds over all rows, the row order rotated each round (so that no row always
/// runs first, right after another row's load); returns each row's per-round results.
async fn interleaved<T, F, Fut>(
    rows: &[Row],
    rounds: usize,
    mut run: F,
) -> anyhow::Result<Vec<Vec<T>>>
where
    F: FnMut(usize, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut results: Vec<Vec<T>> = (0..rows.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..rows.len() {
            let i = (k + round) % rows.len();
            let result = run(i, round)
                .await
                .with_context(|| format!("row {}, round {}", rows[i].name, round + 1))?;
            results[i].push(result);
        }
    }
    Ok(results)
}

// ================================================================================================
// Header, warm-up, summary
// ================================================================================================

fn print_header(
    opts: &Options,
    plan: &Plan,
    clk_tck: f64,
    mock: &Mock,
    rows: &[Row],
    notes: &[String],
    clk_assumed: bool,
) {
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg: Vec<&str> = loadavg.split_whitespace().take(3).collect();
    println!(
        "tollgate overhead bench (benches/overhead.rs){}: {} round(s) per phase, rows interleaved",
        if opts.quick { ", --quick" } else { "" },
        opts.rounds
    );
    println!(
        "machine: {cpus} CPUs, load average {} at start, CLK_TCK {clk_tck}{}",
        loadavg.join(" "),
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
    for row in rows {
        let width = ROW_NAME_WIDTH.load(Ordering::Relaxed).max(12);
        println!("  {:<width$}{}", row.name, row.describe);
    }
    for note in notes {
        println!("note: {note}");
    }
}

/// Warms every row up (connections, the proxies' upstream pools) and checks that each proxy
/// passes the mock's answers through byte for byte (the mock's output is a pure function of the
/// request).
async fn warm_up_and_verify(rows: &[Row]) -> anyhow::Result<()> {
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

fn print_summary(rows: &[Row], checks: &[Check], warnings: &[String], elapsed: Duration) {
    println!();
    println!("== Goals (checked on the gateway rows)");
    let mut table = Table::aligned(
        &["row", "goal", "measured", "verdict"],
        &[17, 42, 12, 7],
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
    println!("{} of {} goals met.", checks.len() - missed, checks.len());
    for warning in warnings {
        println!("WARNING: {warning}");
    }
    for row in rows {
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
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loadavg: Vec<&str> = loadavg.split_whitespace().take(3).collect();
    println!(
        "total time {:.1} s; load average {} at the end",
        elapsed.as_secs_f64(),
        loadavg.join(" ")
    );
}

// ================================================================================================
// Phase 1: non-streaming latency at a fixed open-loop rate
// ================================================================================================

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
    row: &Row,
    payload: &Arc<Payload>,
    rate: f64,
    plan: &Plan,
    clk_tck: f64,
) -> anyhow::Result<LatencyRound> {
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
            after.since(before).total() as f64 / clk_tck * 1e6 / samples.len() as f64
        }
        _ => f64::NAN,
    };
    Ok(LatencyRound {
        pcts: [
            pct_ms(&latency, 50.0),
            pct_ms(&latency, 90.0),
            pct_ms(&latency, 99.0),
            pct_ms(&latency, 99.9),
            pct_ms(&latency, 100.0),
        ],
        errors: samples.iter().filter(|s| !s.ok).count(),
        conns: pool.opened.load(Ordering::Relaxed),
        lag_p50: pct_ms(&lag, 50.0),
        lag_p99: pct_ms(&lag, 99.0),
        cpu_us,
    })
}

async fn phase_latency(
    rows: &[Row],
    opts: &Options,
    plan: &Plan,
    clk_tck: f64,
    checks: &mut Vec<Check>,
    warnings: &mut Vec<String>,
) -> anyhow::Result<()> {
    let payload = Arc::new(Payload::chat());
    let results = interleaved(rows, opts.rounds, |i, _| {
        latency_round(&rows[i], &payload, opts.rate, plan, clk_tck)
    })
    .await?;

    section(
        &format!(
            "1. Non-streaming latency: open loop at {} req/s, {:.1} s x {} rounds (chat completion, 8 tokens, JSON)",
            opts.rate,
            plan.latency.as_secs_f64(),
            opts.rounds
        ),
        &[
            "latency = end of the response body - the request's SCHEDULED send time (t0 + i/rate):".into(),
            "no coordinated omission. ms; median over rounds, except max (the worst of all rounds).".into(),
            "added = median over rounds of (row - direct) in the same round.".into(),
        ],
    );
    let mut table = Table::new(
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
    for (row, rounds) in rows.iter().zip(&results) {
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
        if row.procs.is_some() {
            let direct_figure = |k: usize| direct.iter().map(|r| r.pcts[k]).collect::<Vec<_>>();
            let add50 = added(&figure(0), &direct_figure(0));
            let add99 = added(&figure(2), &direct_figure(2));
            let met50 = add50 <= GOAL_ADDED_P50_MS;
            let met99 = add99 <= GOAL_ADDED_P99_MS;
            cells.extend([
                signed(add50, 3),
                verdict(met50).to_owned(),
                signed(add99, 3),
                verdict(met99).to_owned(),
            ]);
            if row.gateway {
                checks.push(Check {
                    row: row.name,
                    what: format!("added p50 at {} req/s <= {GOAL_ADDED_P50_MS} ms", opts.rate),
                    value: format!("{} ms", signed(add50, 3)),
                    met: met50,
                });
                checks.push(Check {
                    row: row.name,
                    what: format!("added p99 at {} req/s <= {GOAL_ADDED_P99_MS} ms", opts.rate),
                    value: format!("{} ms", signed(add99, 3)),
                    met: met99,
                });
            }
        }
        table.row(cells);
    }
    table.print();
    let lag50 = median(results.iter().flatten().map(|r| r.lag_p50));
    let lag99 = median(results.iter().flatten().map(|r| r.lag_p99));
    println!(
        "   goals: added p50 <= {GOAL_ADDED_P50_MS} ms, added p99 <= {GOAL_ADDED_P99_MS} ms. \
         CPU us/req = the proxy's CPU time / requests at this rate (10 ms ticks: approximate)."
    );
    println!(
        "   generator's own delay (task start - scheduled time), median over all runs: p50 {} ms, p99 {} ms",
        num(lag50, 3),
        num(lag99, 3)
    );
    let direct99 = median(results[0].iter().map(|r| r.pcts[2]));
    if lag99 > NOISY_LAG_MS || direct99 > NOISY_DIRECT_P99_MS {
        let warning = format!(
            "the machine was busy with something else (generator's own delay p99 {} ms, limit \
             {NOISY_LAG_MS}; direct p99 {} ms, limit {NOISY_DIRECT_P99_MS}): p99 and beyond, and \
             every goal near its limit, are noise in this run; run again on a quieter machine",
            num(lag99, 3),
            num(direct99, 3)
        );
        println!("   WARNING: {warning}");
        warnings.push(warning);
    }
    Ok(())
}

// ================================================================================================
// Phase 2: closed-loop throughput and CPU per request
// ================================================================================================

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
    row: &Row,
    payload: &Arc<Payload>,
    plan: &Plan,
    clk_tck: f64,
    mock: &Mock,
) -> anyhow::Result<ThroughputRound> {
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

async fn phase_throughput(
    rows: &[Row],
    opts: &Options,
    plan: &Plan,
    clk_tck: f64,
    mock: &Mock,
    checks: &mut Vec<Check>,
) -> anyhow::Result<()> {
    let payload = Arc::new(Payload::chat());
    let results = interleaved(rows, opts.rounds, |i, _| {
        throughput_round(&rows[i], &payload, plan, clk_tck, mock)
    })
    .await?;

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
    let mut table = Table::new(
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
                checks.push(Check {
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
    println!("   goal: proxy CPU <= {GOAL_CPU_US} us per request");
    Ok(())
}

// ================================================================================================
// Phase 3: streaming, time to first event
// ================================================================================================

struct StreamRound {
    streams: usize,
    ttfe_p50: f64,
    ttfe_p99: f64,
    total_p50: f64,
    total_p99: f64,
    errors: usize,
}

async fn stream_round(
    row: &Row,
    payload: &Arc<Payload>,
    plan: &Plan,
    concurrency: usize,
) -> anyhow::Result<StreamRound> {
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
    ttfe.sort_unstable();
    total.sort_unstable();
    Ok(StreamRound {
        streams: ttfe.len(),
        ttfe_p50: pct_ms(&ttfe, 50.0),
        ttfe_p99: pct_ms(&ttfe, 99.0),
        total_p50: pct_ms(&total, 50.0),
        total_p99: pct_ms(&total, 99.0),
        errors,
    })
}

async fn phase_stream(
    rows: &[Row],
    opts: &Options,
    plan: &Plan,
    checks: &mut Vec<Check>,
) -> anyhow::Result<()> {
    let payload = Arc::new(Payload::stream(STREAM_CHUNKS, STREAM_DELAY_MS));
    let results = interleaved(rows, opts.rounds, |i, _| {
        stream_round(&rows[i], &payload, plan, opts.stream_concurrency)
    })
    .await?;

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
        ],
    );
    let mut table = Table::new(
        &[
            "row",
            "streams",
            "TTFE p50",
            "TTFE p99",
            "total p50",
            "total p99",
            "errors",
            "added TTFE p50",
            "",
            "added TTFE p99",
        ],
        &[10, 7, 8, 8, 9, 9, 6, 14, 6, 14],
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
        ];
        if row.procs.is_some() {
            let direct50: Vec<f64> = direct.iter().map(|r| r.ttfe_p50).collect();
            let direct99: Vec<f64> = direct.iter().map(|r| r.ttfe_p99).collect();
            let add50 = added(&ttfe50, &direct50);
            let add99 = added(&ttfe99, &direct99);
            let met = add50 <= GOAL_ADDED_TTFE_MS;
            cells.extend([signed(add50, 3), verdict(met).to_owned(), signed(add99, 3)]);
            if row.gateway {
                checks.push(Check {
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
    println!("   goal: added time to first event (p50) <= {GOAL_ADDED_TTFE_MS} ms");
    Ok(())
}

// ================================================================================================
// Phase 4: one burst stream, no Nagle / delayed-ACK stall
// ================================================================================================

struct BurstRun {
    total_ms: f64,
    gap_ms: f64,
    complete: bool,
}

async fn phase_burst(rows: &[Row], plan: &Plan, checks: &mut Vec<Check>) -> anyhow::Result<()> {
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
    let mut table = Table::new(
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
            num(
                runs.iter()
                    .map(|r| r.total_ms)
                    .fold(f64::INFINITY, f64::min),
                2,
            ),
            num(max_of(runs.iter().map(|r| r.total_ms)), 2),
            num(total * 1e3 / BURST_CHUNKS as f64, 2),
            num(gap, 2),
            num(worst_gap, 2),
            format!("{complete}/{}", runs.len()),
            if stall { "STALL" } else { "no" }.to_owned(),
        ]);
        if row.gateway {
            checks.push(Check {
                row: row.name,
                what: "burst stream: no Nagle/delayed-ACK stall".into(),
                value: format!("gap {} ms", num(gap, 2)),
                met: !stall && complete == runs.len(),
            });
        }
    }
    table.print();
    Ok(())
}

// ================================================================================================
// Phase 5: memory with 64 streams open
// ================================================================================================

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

async fn phase_rss(rows: &[Row], checks: &mut Vec<Check>) -> anyhow::Result<()> {
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
    let mut table = Table::new(
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
            checks.push(Check {
                row: row.name,
                what: format!("peak RSS at {RSS_STREAMS} streams <= {GOAL_RSS_MB} MB"),
                value: format!("{} MB", mb(result.peak_kb)),
                met,
            });
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
