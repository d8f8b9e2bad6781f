//! Soak: a mixed load through the gateway for a long time, watching that it keeps serving and
//! that its memory stays flat.
//!
//! `cargo bench --bench soak` runs 10 minutes; `cargo bench --bench soak -- --seconds 120` less.
//! The gateway runs as its own process (release build, default access log on), in front of the
//! in-process mock upstream. Workers send JSON and streamed chats and completions, tool calls,
//! requests that the upstream fails (503, broken streams), invalid bodies, unknown keys, and
//! clients that hang up mid-stream. Every 10 s the gateway's RSS is sampled; at the end the table
//! shows requests served, errors by kind, and RSS after warm-up against RSS at the end
//! (target: within 10 %).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_support::args::CargoBench;
use bench_support::ports::free_addr;
use bench_support::process::ChildGuard;
use bench_support::procfs::rss_kb;
use clap::Parser as _;
use futures_util::StreamExt;

const WORKERS: usize = 24;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// A mixed load through the gateway for a long time, watching its memory.
#[derive(clap::Parser)]
#[command(
    name = "soak",
    override_usage = "cargo bench --bench soak [-- OPTIONS]"
)]
struct Args {
    /// How long the load runs, in seconds.
    #[arg(long, value_name = "N", default_value_t = 600)]
    seconds: u64,
    #[command(flatten)]
    cargo: CargoBench,
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    expected_errors: AtomicU64,
    unexpected: AtomicU64,
    hangups: AtomicU64,
}

/// One request of the mix; returns whether its outcome was the expected one.
async fn one(client: &reqwest::Client, base: &str, i: u64, counts: &Counts) {
    let stream = !i.is_multiple_of(3);
    let (path, body) = if i % 5 == 4 {
        (
            "/v1/completions",
            format!(r#"{{"model":"m","prompt":"soak {i}","max_tokens":16,"stream":{stream}}}"#),
        )
    } else {
        (
            "/v1/chat/completions",
            format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"soak {i}"}}],"max_tokens":16,"stream":{stream}}}"#
            ),
        )
    };
    let key = if i % 20 == 13 {
        "tg-unknown"
    } else {
        "tg-soak"
    };
    let mut request = client
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .header("x-mock-chunk-delay-ms", "1");
    let mut expect = 200u16;
    match i % 20 {
        3 => {
            request = request.header("x-mock-status", "503");
            expect = 503;
        }
        7 => request = request.header("x-mock-tools", "1"),
        11 => {
            request = request.body("{\"model\": 5}");
            expect = 400;
        }
        13 => expect = 401,
        17 if stream => request = request.header("x-mock-fault", "abort-after=3"),
        _ => {}
    }
    if i % 20 != 11 {
        request = request.body(body);
    }
    let Ok(response) = request.send().await else {
        counts.unexpected.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let status = response.status().as_u16();
    if status != expect {
        if counts.unexpected.fetch_add(1, Ordering::Relaxed) < 3 {
            eprintln!(
                "request {i} (class {}): expected {expect}, got {status}",
                i % 20
            );
        }
        return;
    }
    let mut body = response.bytes_stream();
    let mut chunks = 0;
    let hang_up = i % 20 == 19 && stream;
    while let Some(chunk) = body.next().await {
        if chunk.is_err() {
            // abort-after: the upstream broke the stream on purpose.
            break;
        }
        chunks += 1;
        if hang_up && chunks == 2 {
            counts.hangups.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    if expect == 200 {
        counts.ok.fetch_add(1, Ordering::Relaxed);
    } else {
        counts.expected_errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() {
    let Args { seconds, .. } = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(soak(Duration::from_secs(seconds)));
}

async fn soak(duration: Duration) {
    let upstream = mock_upstream::MockUpstream::start()
        .await
        .expect("mock upstream");
    upstream.set_recording(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let (listen, admin) = (
        free_addr().expect("a free port"),
        free_addr().expect("a free port"),
    );
    let sha = hex::encode(tollgate::keys::hash_token(b"tg-soak"));
    let config = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n\
         [upstream]\nurl = \"{}\"\n[state]\npath = \"{}/state.db\"\n[ledger]\npath = \"{}/usage.jsonl\"\n\
         [[keys]]\nname = \"soak\"\nsha256 = \"{sha}\"\nmax_tokens = 64\nconcurrency = 64\n\
         rate = {{ requests = 1000000, per = \"1s\" }}\nquotas = [{{ tokens = 100000000000, per = \"1d\" }}]\n",
        upstream.url(),
        dir.path().display(),
        dir.path().display()
    );
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, config).expect("write config");
    let mut gateway = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("start the gateway");
    let pid = gateway.pid();
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(WORKERS)
        .build()
        .expect("client");
    // As before: a gateway that is slow to start is given 5 s, then the load starts anyway.
    let _ = gateway.wait_listening(admin, Duration::from_secs(5));

    println!(
        "soak: {WORKERS} workers for {:?} through tollgate (pid {pid})\n",
        duration
    );
    let counts = Arc::new(Counts::default());
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (client, base, counts, next) =
            (client.clone(), base.clone(), counts.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while start.elapsed() < duration {
                let i = next.fetch_add(1, Ordering::Relaxed);
                one(&client, &base, i, &counts).await;
            }
        }));
    }

    println!("| time | requests | req/s | RSS |");
    println!("|---:|---:|---:|---:|");
    let mut samples = Vec::new();
    let mut last = (Instant::now(), 0u64);
    while start.elapsed() < duration {
        tokio::time::sleep(
            SAMPLE_EVERY.min(duration.saturating_sub(start.elapsed()) + Duration::from_millis(10)),
        )
        .await;
        let done = next.load(Ordering::Relaxed);
        let rate = (done - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), done);
        let rss = rss_kb(pid).unwrap_or(0);
        samples.push(rss);
        println!(
            "| {:>4.0} s | {done} | {rate:.0} | {:.1} MB |",
            start.elapsed().as_secs_f64(),
            rss as f64 / 1024.0
        );
    }
    for worker in workers {
        let _ = worker.await;
    }
    // Warm-up: the first 20 % of the run (at least one sample).
    let warm_index = (samples.len() / 5)
        .max(1)
        .min(samples.len().saturating_sub(1));
    let (warm, end) = (
        samples.get(warm_index).copied().unwrap_or(0),
        samples.last().copied().unwrap_or(0),
    );
    let growth = if warm > 0 {
        (end as f64 - warm as f64) / warm as f64 * 100.0
    } else {
        0.0
    };
    println!("\n| figure | value |");
    println!("|---|---:|");
    println!("| requests sent | {} |", next.load(Ordering::Relaxed));
    println!(
        "| answered as expected (200) | {} |",
        counts.ok.load(Ordering::Relaxed)
    );
    println!(
        "| answered with the expected error (400/401/503) | {} |",
        counts.expected_errors.load(Ordering::Relaxed)
    );
    println!(
        "| client hang-ups mid-stream | {} |",
        counts.hangups.load(Ordering::Relaxed)
    );
    println!(
        "| unexpected answers or failures | {} |",
        counts.unexpected.load(Ordering::Relaxed)
    );
    println!("| RSS after warm-up | {:.1} MB |", warm as f64 / 1024.0);
    println!("| RSS at the end | {:.1} MB |", end as f64 / 1024.0);
    println!(
        "| growth | {growth:+.1} % (target within ±10 %: {}) |",
        if growth.abs() <= 10.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    // SIGTERM, and waits for it to exit.
    drop(gateway);
}
