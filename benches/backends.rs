//! What the state backend and TLS cost, through the real gateway process.
//!
//! Three runs of the same workload — non-streamed chat at a fixed rate (open loop: latency from
//! each request's scheduled time) with a key that has a rate limit, a concurrency limit and a
//! token quota, so every request touches the state: `local` (the default backend), `redis`
//! (a `redis-server` this bench starts on a free port), and `local+tls` (HTTPS on the client
//! listener, certificate made here). Prints p50/p99 and the gateway's CPU time per request
//! (`/proc/<pid>/stat`), with the differences to `local`.
//!
//! Then the ledger: the same gateway with no ledger, a ledger file, and a PostgreSQL ledger (a
//! database this bench makes on 127.0.0.1:5432 and drops), each run twice in turn, at a higher
//! rate so that the CPU clock's 10 ms ticks are under 1 µs per request; and the rows per second
//! the PostgreSQL writer inserts, timed on a spool of 200,000 lines that a gateway sends at start
//! (the writer's own insert path, through the process).
//!
//! `cargo bench --bench backends` (about 3 minutes; `-- --seconds N` per run, default 15).

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
/// The ledger rows' rate: 15,000 requests in 15 s, so one 10 ms tick is 0.7 µs per request.
const LEDGER_RATE: u64 = 1000;
/// Lines in the spool whose sending is timed.
const SPOOL_LINES: u64 = 200_000;
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
    rate: u64,
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
    let total = rate * seconds;
    let cpu_before = cpu_seconds(pid, clk_tck);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + Duration::from_micros(i * 1_000_000 / rate);
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
            .env(LEDGER_URL_ENV, ledger_url())
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
        let (latencies, errors, cpu_us) = drive(client, url, seconds, child.pid(), RATE).await;
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
    ledger_rows(&upstream, dir.path(), &key, &http, seconds).await;
}

/// The environment variable the gateways read the ledger's URL from.
const LEDGER_URL_ENV: &str = "TOLLGATE_BENCH_LEDGER_URL";
/// The bench's own database on the machine's PostgreSQL.
fn ledger_database() -> String {
    format!("tollgate_bench_{}", std::process::id())
}
fn ledger_url() -> String {
    format!(
        "postgres://postgres@127.0.0.1:5432/{}?sslmode=disable",
        ledger_database()
    )
}

/// A plain client to the machine's PostgreSQL (`database`), or `None`.
async fn postgres(database: &str) -> Option<tokio_postgres::Client> {
    let url = format!("postgres://postgres@127.0.0.1:5432/{database}?sslmode=disable");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(client)
}

/// Request CPU without a ledger, with a file, with PostgreSQL; then rows/s into PostgreSQL.
async fn ledger_rows(
    upstream: &mock_upstream::MockUpstream,
    dir: &std::path::Path,
    key: &str,
    http: &reqwest::Client,
    seconds: u64,
) {
    let Some(admin_db) = postgres("postgres").await else {
        println!("\nPostgreSQL is not on 127.0.0.1:5432: the ledger rows are skipped");
        return;
    };
    let database = ledger_database();
    if let Err(error) = admin_db
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
    {
        println!("\ncannot create the bench database ({error}): the ledger rows are skipped");
        return;
    }
    let ledgers = [
        ("off", String::new()),
        ("file", "[ledger]\npath = \"usage.jsonl\"\n".to_owned()),
        (
            "postgres",
            format!(
                "[ledger]\npostgres_url_env = \"{LEDGER_URL_ENV}\"\nspool_path = \"spool-bench\"\n"
            ),
        ),
    ];
    let mut rows = Vec::new();
    for round in 0..2 {
        for (name, ledger) in &ledgers {
            let (listen, admin) = (
                free_addr().expect("a free port"),
                free_addr().expect("a free port"),
            );
            let config = format!(
                "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n\
                 [upstream]\nurl = \"{}\"\n[state]\npath = \"state.db\"\n{ledger}{key}",
                upstream.url()
            );
            let child = start_gateway(&config, dir, &format!("ledger-{name}"), admin);
            let url = format!("http://127.0.0.1:{}/v1/chat/completions", listen.port());
            let (latencies, errors, cpu_us) =
                drive(http.clone(), url, seconds, child.pid(), LEDGER_RATE).await;
            rows.push((
                round,
                *name,
                percentile(&latencies, 50.0),
                percentile(&latencies, 99.0),
                cpu_us,
                errors,
            ));
            drop(child);
        }
    }
    println!("\n## the ledger, non-streamed chat at {LEDGER_RATE} req/s for {seconds} s, each row twice in turn\n");
    println!("| ledger | round | p50 | p99 | CPU/request | errors |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (round, name, p50, p99, cpu, errors) in &rows {
        println!(
            "| {name} | {} | {p50:.3} ms | {p99:.3} ms | {cpu:.1} µs | {errors} |",
            round + 1
        );
    }
    let mean = |name: &str| {
        let cpu: Vec<f64> = rows.iter().filter(|r| r.1 == name).map(|r| r.4).collect();
        cpu.iter().sum::<f64>() / cpu.len().max(1) as f64
    };
    let off = mean("off");
    println!(
        "\nadded CPU per request (mean of the two rounds): file {:+.1} µs, postgres {:+.1} µs (target: within 2 µs); the PostgreSQL server's own CPU is not counted",
        mean("file") - off,
        mean("postgres") - off
    );
    if let Some(ledger) = postgres(&database).await {
        let n: i64 = ledger
            .query_one("SELECT count(*) FROM tollgate_usage", &[])
            .await
            .map_or(0, |row| row.get(0));
        println!("rows in the table after the two postgres runs: {n}");
    }
    spool_rows_per_second(upstream, dir, key, &database).await;
    let _ = admin_db
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await;
}

/// A gateway started on a spool of [`SPOOL_LINES`] lines: the time until the spool is sent.
async fn spool_rows_per_second(
    upstream: &mock_upstream::MockUpstream,
    dir: &std::path::Path,
    key: &str,
    database: &str,
) {
    let spool = dir.join("spool-rows");
    let mut text = String::with_capacity(SPOOL_LINES as usize * 330);
    for n in 0..SPOOL_LINES {
        text.push_str(&format!(
            r#"{{"id":"{}","time":"2026-01-01T00:00:00.000Z","request_id":"{}","key":"bench","model":"m","endpoint":"chat_completions","status":200,"prompt_tokens":{},"completion_tokens":8,"source":"reported","duration_ms":1.25,"ttft_ms":null,"outcome":"complete"}}"#,
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            n % 100
        ));
        text.push('\n');
    }
    std::fs::write(&spool, text).expect("write the spool");
    let Some(ledger) = postgres(database).await else {
        return;
    };
    let before: i64 = ledger
        .query_one("SELECT count(*) FROM tollgate_usage", &[])
        .await
        .map_or(0, |row| row.get(0));
    let (listen, admin) = (
        free_addr().expect("a free port"),
        free_addr().expect("a free port"),
    );
    let config = format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n\
         [upstream]\nurl = \"{}\"\n[state]\npath = \"state.db\"\n\
         [ledger]\npostgres_url_env = \"{LEDGER_URL_ENV}\"\nspool_path = \"{}\"\n{key}",
        upstream.url(),
        spool.display()
    );
    let start = Instant::now();
    let child = start_gateway(&config, dir, "ledger-spool", admin);
    let deadline = start + Duration::from_secs(300);
    let mut sent = false;
    while Instant::now() < deadline {
        let n: i64 = ledger
            .query_one("SELECT count(*) FROM tollgate_usage", &[])
            .await
            .map_or(0, |row| row.get(0));
        if n - before >= SPOOL_LINES as i64 {
            sent = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(child);
    if sent {
        println!(
            "ledger rows into PostgreSQL: {SPOOL_LINES} spooled lines sent in {elapsed:.2} s from the gateway's start = {:.0} rows/s (chunks of 1 MiB ≈ 3,000 rows per insert, with the table's 5 indexes)",
            SPOOL_LINES as f64 / elapsed
        );
    } else {
        println!("ledger rows into PostgreSQL: the spool was not sent within 300 s");
    }
}
