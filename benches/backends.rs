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

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RATE: u64 = 300;
const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0)
}

struct Row {
    name: &'static str,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
    errors: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn drive(
    client: reqwest::Client,
    url: String,
    seconds: u64,
    pid: u32,
) -> (Vec<f64>, u64, f64) {
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
    let cpu_before = cpu_seconds(pid);
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
    let cpu_us = (cpu_seconds(pid) - cpu_before) * 1e6 / total as f64;
    latencies.sort_by(f64::total_cmp);
    (latencies, errors, cpu_us)
}

fn start_gateway(config: &str, dir: &std::path::Path, name: &str) -> Child {
    let path = dir.join(format!("{name}.toml"));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(config.as_bytes()))
        .expect("write config");
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tollgate")
}

async fn wait_up(admin: u16) {
    for _ in 0..200 {
        if reqwest::get(format!("http://127.0.0.1:{admin}/healthz"))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("gateway did not come up");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(15);
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

    let redis_port = free_port();
    let mut redis = Command::new("redis-server")
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
        .stderr(Stdio::null())
        .spawn()
        .ok();
    if redis.is_none() {
        println!("redis-server not found: the redis row is skipped\n");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

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
        let (port, admin) = (free_port(), free_port());
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
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{tls}\
             [upstream]\nurl = \"{}\"\n{state}{key}",
            upstream.url()
        );
        let mut child = start_gateway(&config, dir.path(), name);
        wait_up(admin).await;
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
        let (latencies, errors, cpu_us) = drive(client, url, seconds, child.id()).await;
        rows.push(Row {
            name,
            p50_ms: percentile(&latencies, 0.5),
            p99_ms: percentile(&latencies, 0.99),
            cpu_us,
            errors,
        });
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    if let Some(redis) = redis.as_mut() {
        let _ = redis.kill();
        let _ = redis.wait();
    }

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
