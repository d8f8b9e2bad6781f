//! What 10 000 keys cost a gateway at start and in memory: the file's `[[keys]]`, and keys
//! managed through the admin API (in the file beside the state, and in Redis), against a gateway
//! with one key. For each row the real gateway process (release build) is started and timed from
//! spawn until it serves a request with the last key; then its RSS (and peak), one `POST
//! /admin/keys` and one `PATCH` with that many keys present, and (Redis) how long a key made on
//! this replica takes to be accepted by a second one.
//!
//! The 10 000 keys are written where the gateway keeps them, in its own format (the managed keys
//! file; the Redis hash with its change number), not made one call at a time.
//!
//! `cargo bench --bench keys` (about 30 s; `-- --keys N` for another count).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench_support::args::CargoBench;
use bench_support::ports::free_addr;
use bench_support::process::ChildGuard;
use bench_support::procfs;
use clap::Parser as _;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
const BODY: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;

#[derive(clap::Parser)]
#[command(
    name = "keys",
    override_usage = "cargo bench --bench keys [-- OPTIONS]"
)]
struct Args {
    /// Keys per row.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    keys: usize,
    #[command(flatten)]
    cargo: CargoBench,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Row {
    OneKey,
    FileKeys,
    ManagedLocal,
    ManagedRedis,
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::OneKey => "1 key in the file",
            Row::FileKeys => "N keys in the file",
            Row::ManagedLocal => "N managed keys, local",
            Row::ManagedRedis => "N managed keys, redis",
        }
    }
}

struct Figures {
    start_ms: f64,
    rss_mb: f64,
    peak_mb: f64,
    create_ms: Option<f64>,
    patch_ms: Option<f64>,
    replica_ms: Option<f64>,
}

fn token(i: usize) -> String {
    format!("tg-bench-{i:06}")
}

fn sha(token: &str) -> String {
    hex::encode(tollgate::keys::hash_token(token.as_bytes()))
}

/// A managed key record as the gateway stores it.
fn record(i: usize) -> Value {
    json!({
        "name": format!("key-{i:06}"),
        "fields": {"max_tokens": 512, "concurrency": 8,
                   "rate": {"requests": 600, "per": "1m"},
                   "quotas": [{"tokens": 1000000, "per": "1d"}]},
        "hashes": [{"sha256": sha(&token(i))}],
        "created_at": 1_800_000_000u64,
        "updated_at": 1_800_000_000u64,
    })
}

fn file_keys(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        out.push_str(&format!(
            "[[keys]]\nname = \"key-{i:06}\"\nsha256 = \"{}\"\nmax_tokens = 512\nconcurrency = 8\n\
             rate = {{ requests = 600, per = \"1m\" }}\nquotas = [{{ tokens = 1000000, per = \"1d\" }}]\n",
            sha(&token(i))
        ));
    }
    out
}

fn main() {
    let Args { keys, .. } = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(keys));
}

fn start_redis() -> Option<(ChildGuard, u16)> {
    let addr = free_addr().ok()?;
    let mut redis = ChildGuard::spawn(
        Command::new("redis-server")
            .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .ok()?;
    redis.wait_listening(addr, Duration::from_secs(5)).ok()?;
    Some((redis, addr.port()))
}

/// Puts `n` managed key records into the Redis at `port`, under `prefix`.
fn seed_redis(port: u16, prefix: &str, n: usize) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).expect("redis client");
    let mut conn = client.get_connection().expect("redis");
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.hset(
                format!("{prefix}managed_keys"),
                format!("key-{i:06}"),
                record(i).to_string(),
            );
        }
        pipe.query::<()>(&mut conn).expect("seed");
    }
    redis::cmd("SET")
        .arg(format!("{prefix}managed_keys:version"))
        .arg(n)
        .query::<()>(&mut conn)
        .expect("version");
}

async fn run(n: usize) {
    let upstream = mock_upstream::MockUpstream::start()
        .await
        .expect("mock upstream");
    upstream.set_recording(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = start_redis();
    if redis.is_none() {
        println!("redis-server not found: the redis row is skipped\n");
    }
    let client = reqwest::Client::builder()
        .http1_only()
        .build()
        .expect("client");
    let mut results = Vec::new();
    for row in [
        Row::OneKey,
        Row::FileKeys,
        Row::ManagedLocal,
        Row::ManagedRedis,
    ] {
        let Some(state) = state_for(row, dir.path(), redis.as_ref().map(|r| r.1), n) else {
            continue;
        };
        let keys = match row {
            Row::OneKey => file_keys(1),
            Row::FileKeys => file_keys(n),
            Row::ManagedLocal | Row::ManagedRedis => String::new(),
        };
        let last = token(if row == Row::OneKey { 0 } else { n - 1 });
        let figures = measure(
            row,
            &client,
            &upstream.url(),
            dir.path(),
            &state,
            &keys,
            &last,
        )
        .await;
        results.push((row, figures));
    }
    drop(redis);
    print(n, &results);
}

/// The `[state]` section of a row, with its keys already stored where it reads them.
fn state_for(row: Row, dir: &Path, redis: Option<u16>, n: usize) -> Option<String> {
    let state_path = dir.join(format!("state-{}.db", row as u8));
    match row {
        Row::ManagedRedis => {
            let port = redis?;
            seed_redis(port, "bench:", n);
            Some(format!(
                "[state]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}\"\nprefix = \"bench:\"\n"
            ))
        }
        Row::ManagedLocal => {
            let records: Vec<Value> = (0..n).map(record).collect();
            let file = json!({"version": 1, "keys": records});
            std::fs::write(state_path.with_extension("keys.json"), file.to_string())
                .expect("keys file");
            Some(format!("[state]\npath = \"{}\"\n", state_path.display()))
        }
        Row::OneKey | Row::FileKeys => {
            Some(format!("[state]\npath = \"{}\"\n", state_path.display()))
        }
    }
}

fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: &str,
    state: &str,
    keys: &str,
) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nadmin_token_env = \"BENCH_ADMIN_TOKEN\"\n\
         [upstream]\nurl = \"{upstream}\"\n{state}{keys}"
    )
}

fn spawn(dir: &Path, name: &str, text: &str) -> ChildGuard {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write config");
    ChildGuard::spawn(
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("BENCH_ADMIN_TOKEN", ADMIN_TOKEN)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("start tollgate")
}

/// Until a chat request with `token` at `url` is answered 200; the time it took.
async fn until_served(client: &reqwest::Client, url: &str, token: &str) -> Duration {
    let start = Instant::now();
    loop {
        let answer = client
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await;
        if matches!(&answer, Ok(r) if r.status() == 200) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not served within 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One admin call's time, checked for `want`.
async fn timed(request: reqwest::RequestBuilder, want: u16) -> f64 {
    let start = Instant::now();
    let response = request
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("admin call");
    assert_eq!(response.status().as_u16(), want, "admin call");
    let elapsed = start.elapsed();
    let _ = response.bytes().await;
    elapsed.as_secs_f64() * 1000.0
}

async fn measure(
    row: Row,
    client: &reqwest::Client,
    upstream: &str,
    dir: &Path,
    state: &str,
    keys: &str,
    last: &str,
) -> Figures {
    let (listen, admin) = (free_addr().expect("port"), free_addr().expect("port"));
    let text = config(listen, admin, upstream, state, keys);
    let chat = format!("http://{listen}/v1/chat/completions");
    let started = Instant::now();
    let child = spawn(dir, &format!("row-{}", row as u8), &text);
    until_served(client, &chat, last).await;
    let start_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rss_mb = procfs::rss_kb(child.pid()).unwrap_or(0) as f64 / 1024.0;
    let peak_mb = procfs::status_kb(child.pid(), "VmHWM").unwrap_or(0) as f64 / 1024.0;
    let mut figures = Figures {
        start_ms,
        rss_mb,
        peak_mb,
        create_ms: None,
        patch_ms: None,
        replica_ms: None,
    };
    if row == Row::OneKey || row == Row::FileKeys {
        return figures;
    }
    let base = format!("http://{admin}");
    let body = json!({"name": "bench-new", "max_tokens": 64});
    let create = client.post(format!("{base}/admin/keys")).json(&body);
    figures.create_ms = Some(timed(create, 201).await);
    let patch = client
        .patch(format!("{base}/admin/keys/key-000000"))
        .json(&json!({"max_tokens": 256}));
    figures.patch_ms = Some(timed(patch, 200).await);
    if row == Row::ManagedRedis {
        let (listen2, admin2) = (free_addr().expect("port"), free_addr().expect("port"));
        let second = spawn(
            dir,
            "replica",
            &config(listen2, admin2, upstream, state, keys),
        );
        let chat2 = format!("http://{listen2}/v1/chat/completions");
        until_served(client, &chat2, last).await;
        let made = client
            .post(format!("{base}/admin/keys"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"name": "bench-replica"}))
            .send()
            .await
            .expect("create");
        let made: Value = made.json().await.expect("JSON");
        let token = made["key"].as_str().expect("key").to_owned();
        figures.replica_ms =
            Some(until_served(client, &chat2, &token).await.as_secs_f64() * 1000.0);
        drop(second);
    }
    drop(child);
    figures
}

fn print(n: usize, results: &[(Row, Figures)]) {
    println!("## {n} keys: start-up and memory of the gateway process (release build)\n");
    println!("| row | start until the last key is served | RSS | peak RSS | POST /admin/keys | PATCH | seen by a 2nd replica |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let ms = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.1} ms"));
    for (row, f) in results {
        println!(
            "| {} | {:.0} ms | {:.1} MB | {:.1} MB | {} | {} | {} |",
            row.name().replace('N', &n.to_string()),
            f.start_ms,
            f.rss_mb,
            f.peak_mb,
            ms(f.create_ms),
            ms(f.patch_ms),
            ms(f.replica_ms),
        );
    }
    println!("\n(start-up is from spawn, including the process's own start; every key has a rate, a concurrency limit and a daily quota.)");
}
