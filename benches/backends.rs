//! What the state backend and TLS cost, through the real gateway process.
//!
//! Three runs of the same workload — non-streamed chat at a fixed rate (open loop: latency from
//! each request's scheduled time) with a key that has a rate limit, a concurrency limit and a
//! token quota, so every request touches the state: `local` (the default backend), `redis`
//! (a `redis-server` this bench starts on a free port), and `local+tls` (HTTPS on the client
//! listener, certificate made here). Prints p50/p99 and the gateway's CPU time per request
//! (`/proc/<pid>/stat`), with the differences to `local`.
//!
//! `cargo bench --bench backends` (about 1 minute; `-- --seconds N` per run, default 15).

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_support::args::CargoBench;
use bench_support::ports::free_addr;
use bench_support::process::ChildGuard;
use bench_support::procfs::{self, process_ticks};
use bench_support::stats::percentile;
use clap::Parser as _;

const RATE: u64 = 300;
const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;

/// What the state backend and TLS cost, through the real gateway process.
#[derive(clap::Parser)]
#[command(
    name = "backends",
    override_usage = "cargo bench --bench backends [-- OPTIONS]"
)]
struct Args {
    /// Seconds of load per row.
    #[arg(long, value_name = "N", default_value_t = 15)]
    seconds: u64,
    #[command(flatten)]
    cargo: CargoBench,
}

/// utime + stime of a process, in seconds; 0 if it cannot be read.
fn cpu_seconds(pid: u32, clk_tck: f64) -> f64 {
    process_ticks(pid).map_or(0.0, |ticks| ticks.seconds(clk_tck))
}

struct Row {
    name: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
    errors: u64,
}

async fn drive(
    client: reqwest::Client,
    url: String,
    seconds: u64,
    pid: u32,
) -> (Vec<f64>, u64, f64) {
    let (clk_tck, _) = procfs::clk_tck();
    // Warm the pool and the gateway.
    for _ in 0..200 {
        let _ = client
            .post(&url)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .map(|r| r.bytes());
    }
    let total = RATE * seconds;
    let cpu_before = cpu_seconds(pid, clk_tck);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + Duration::from_micros(i * 1_000_000 / RATE);
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let response = client
                .post(&url)
                .header("content-type", "application/json")
                .body(BODY)
                .send()
                .await;
            let ok = match response {
                Ok(r) => r.status() == 200 && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            (scheduled.elapsed().as_secs_f64() * 1000.0, ok)
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for task in tasks {
        match task.await {
            Ok((ms, true)) => latencies.push(ms),
            _ => errors += 1,
        }
    }
    let cpu_us = (cpu_seconds(pid, clk_tck) - cpu_before) * 1e6 / total as f64;
    latencies.sort_by(f64::total_cmp);
    (latencies, errors, cpu_us)
}

/// A gateway on `config`, listening (its admin port `admin` accepts connections) when this
/// returns.
fn start_gateway(config: &str, dir: &std::path::Path, name: &str, admin: SocketAddr) -> ChildGuard {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("write config");
    let mut child = ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&path)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("start tollgate");
    child
        .wait_listening(admin, Duration::from_secs(5))
        .expect("gateway comes up");
    child
}

fn main() {
    let Args { seconds, .. } = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(seconds));
}

async fn run(seconds: u64) {
    let upstream = Arc::new(
        mock_upstream::MockUpstream::start()
            .await
            .expect("mock upstream"),
    );
    upstream.set_recording(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let sha = hex::encode(tollgate::keys::hash_token(b"tg-bench"));
    let key = format!(
        "[[keys]]\nname = \"bench\"\nsha256 = \"{sha}\"\nmax_tokens = 64\nconcurrency = 100000\n\
         rate = {{ requests = 1000000000, per = \"1s\" }}\nquotas = [{{ tokens = 1000000000000, per = \"1d\" }}]\n"
    );
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    std::fs::write(dir.path().join("cert.pem"), made.cert.pem()).expect("cert");
    std::fs::write(dir.path().join("key.pem"), made.signing_key.serialize_pem()).expect("key");

    let redis_addr = free_addr().expect("a free port");
    let redis_port = redis_addr.port();
    let redis = match ChildGuard::spawn(
        Command::new("redis-server")
            .args([
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    ) {
        Err(_) => {
            println!("redis-server not found: the redis row is skipped\n");
            None
        }
        Ok(mut redis) => match redis.wait_listening(redis_addr, Duration::from_secs(5)) {
            Ok(()) => Some(redis),
            Err(error) => {
                println!("redis-server did not start ({error}): the redis row is skipped\n");
                None
            }
        },
    };

    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "authorization",
        reqwest::header::HeaderValue::from_static("Bearer tg-bench"),
    );
    let http = reqwest::Client::builder()
        .default_headers(headers.clone())
        .http1_only()
        .build()
        .expect("client");
    let https = reqwest::Client::builder()
        .default_headers(headers)
        .http1_only()
        .add_root_certificate(
            reqwest::Certificate::from_pem(made.cert.pem().as_bytes()).expect("PEM"),
        )
        .build()
        .expect("https client");

    let mut rows = Vec::new();
    for name in ["local", "redis", "local+tls"] {
        if name == "redis" && redis.is_none() {
            continue;
        }
        let (listen, admin) = (
            free_addr().expect("a free port"),
            free_addr().expect("a free port"),
        );
        let port = listen.port();
        let state = if name == "redis" {
            format!(
                "[state]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{redis_port}\"\n"
            )
        } else {
            "[state]\npath = \"state.db\"\n".to_owned()
        };
        let tls = if name == "local+tls" {
            "tls = { cert = \"cert.pem\", key = \"key.pem\" }\n"
        } else {
            ""
        };
        let config = format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n{tls}\
             [upstream]\nurl = \"{}\"\n{state}{key}",
            upstream.url()
        );
        let child = start_gateway(&config, dir.path(), name, admin);
        let (client, url) = if name == "local+tls" {
            (
                https.clone(),
                format!("https://localhost:{port}/v1/chat/completions"),
            )
        } else {
            (
                http.clone(),
                format!("http://127.0.0.1:{port}/v1/chat/completions"),
            )
        };
        let (latencies, errors, cpu_us) = drive(client, url, seconds, child.pid()).await;
        rows.push(Row {
            name,
            p50_ms: percentile(&latencies, 50.0),
            p99_ms: percentile(&latencies, 99.0),
            cpu_us,
            errors,
        });
        // SIGTERM, and waits for it to exit.
        drop(child);
    }
    drop(redis);

    println!(
        "## state backend and TLS, non-streamed chat at {RATE} req/s for {seconds} s (quota key)\n"
    );
    println!("| row | p50 | p99 | CPU/request | added p50 | added p99 | added CPU | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let base = rows
        .first()
        .map(|r| (r.p50_ms, r.p99_ms, r.cpu_us))
        .unwrap_or_default();
    for row in &rows {
        println!(
            "| {} | {:.3} ms | {:.3} ms | {:.1} µs | {:+.3} ms | {:+.3} ms | {:+.1} µs | {} |",
            row.name,
            row.p50_ms,
            row.p99_ms,
            row.cpu_us,
            row.p50_ms - base.0,
            row.p99_ms - base.1,
            row.cpu_us - base.2,
            row.errors
        );
    }
    println!("\n(TLS: a new client pool; requests reuse kept-alive connections, so handshakes are amortised.)");
}
