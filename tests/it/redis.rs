//! Replicas sharing limits and quotas through a real Redis: one limit for all of them, and the
//! documented behaviour when Redis goes away and comes back.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::MockUpstream;
use serde_json::{json, Value};

use crate::common::redis_server::{RedisServer, SlowProxy};
use crate::common::{self, key_entry, TestGateway};

const CHAT: &str = "/v1/chat/completions";

fn state_section(redis: &RedisServer, prefix: &str, extra: &str) -> String {
    format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nprefix = \"{prefix}\"\n{extra}\n",
        redis.url()
    )
}

/// A config whose `[state]` is Redis (the shared helper's local state section is replaced).
fn config(
    upstream: &str,
    redis: &RedisServer,
    prefix: &str,
    state_extra: &str,
    keys: &str,
    ledger: Option<&PathBuf>,
) -> String {
    let ledger = ledger.map_or(String::new(), |p| {
        format!("[ledger]\npath = \"{}\"\n", p.display())
    });
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{upstream}\"\n{}{keys}\n{ledger}",
        state_section(redis, prefix, state_extra)
    )
}

/// A replica in its own process, so that the test can SIGKILL it; killed when dropped.
struct ChildReplica {
    child: Child,
    port: u16,
    _config: tempfile::NamedTempFile,
}

impl ChildReplica {
    /// Runs `tollgate serve` on `toml` with both listeners on fixed free ports.
    fn start(toml: &str) -> ChildReplica {
        let port = common::closed_port();
        let admin = common::closed_port();
        let config = tempfile::NamedTempFile::new().expect("config file");
        let toml = toml
            .replace(
                "admin_listen = \"127.0.0.1:0\"",
                &format!("admin_listen = \"127.0.0.1:{admin}\""),
            )
            .replace(
                "\nlisten = \"127.0.0.1:0\"",
                &format!("\nlisten = \"127.0.0.1:{port}\""),
            );
        std::fs::write(config.path(), toml).expect("write config");
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start replica");
        ChildReplica {
            child,
            port,
            _config: config,
        }
    }

    /// Starts up to `n` long streams of `body` (retrying while the replica starts), each read
    /// up to its first chunk and then left running.
    async fn hold_streams(
        &self,
        key: &str,
        body: Value,
        n: usize,
    ) -> Vec<impl futures_util::Stream + use<>> {
        let client = common::client();
        let mut held = Vec::new();
        for _ in 0..100 {
            if held.len() == n {
                break;
            }
            let sent = client
                .post(format!("http://127.0.0.1:{}{CHAT}", self.port))
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .header("x-mock-chunks", "1000")
                .header("x-mock-chunk-delay-ms", "50")
                .body(body.to_string())
                .send()
                .await;
            match sent {
                Ok(response) if response.status() == 200 => {
                    let mut body = response.bytes_stream();
                    let _ = body.next().await;
                    held.push(body);
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        held
    }

    /// SIGKILL: no settlement, no release, no goodbye to Redis.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildReplica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn replicas(n: usize, toml: &str) -> Vec<TestGateway> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestGateway::start_toml(toml).await);
    }
    out
}

async fn chat(
    gateway: &TestGateway,
    key: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let auth = format!("Bearer {key}");
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    let (status, headers, bytes) =
        common::post(&format!("{}{CHAT}", gateway.url()), &body.to_string(), &all).await;
    (status, headers, bytes.to_vec())
}

fn small_chat(i: usize) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": format!("hello {i}")}], "max_tokens": 20})
}

#[tokio::test]
async fn three_replicas_admit_exactly_the_burst_of_one_shared_rate() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry(
        "r",
        "tg-r",
        "rate = { requests = 1, per = \"1h\", burst = 5 }",
    );
    let gateways = replicas(3, &config(&upstream.url(), &redis, "t1:", "", &keys, None)).await;
    let results = futures_util::future::join_all(
        (0..30).map(|i| chat(&gateways[i % 3], "tg-r", small_chat(i), &[])),
    )
    .await;
    let admitted = results.iter().filter(|r| r.0 == 200).count();
    let limited = results.iter().filter(|r| r.0 == 429).count();
    assert_eq!(
        admitted,
        5,
        "exactly the burst across three replicas: {:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert_eq!(limited, 25);
    assert_eq!(upstream.request_count(), 5);
    let retry: u64 = results
        .iter()
        .find(|r| r.0 == 429)
        .and_then(|r| r.1.get("retry-after")?.to_str().ok()?.parse().ok())
        .expect("Retry-After on a shared-rate 429");
    // GCRA: one request's worth every hour; with the burst used, the next comes in an hour.
    assert!(
        (3599..=3600).contains(&retry),
        "next cell in one emission interval, got {retry}s"
    );
}

#[tokio::test]
async fn a_token_quota_holds_across_replicas_under_a_200_request_race() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let quota = 1500u64;
    let keys = key_entry(
        "q",
        "tg-q",
        &format!("max_tokens = 100\nquotas = [{{ tokens = {quota}, per = \"1h\" }}]"),
    );
    let ledgers: Vec<PathBuf> = (0..3)
        .map(|_| common::state_path().with_file_name("usage.jsonl"))
        .collect();
    let mut gateways = Vec::new();
    for ledger in &ledgers {
        gateways.push(
            TestGateway::start_toml(&config(
                &upstream.url(),
                &redis,
                "t2:",
                "",
                &keys,
                Some(ledger),
            ))
            .await,
        );
    }
    let results = futures_util::future::join_all((0..200).map(|i| {
        // Answers long beside the prompt's bound (~45 tokens reserved for "hi {i}"), so that a
        // burst that fills the quota with reservations charges most of it.
        let body = json!({"model": "m", "messages": [{"role": "user", "content": format!("hi {i}")}], "max_tokens": 100, "stream": i % 2 == 0});
        chat(&gateways[i % 3], "tg-q", body, &[("x-mock-chunk-delay-ms", "2")])
    }))
    .await;
    let admitted = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(
        results.iter().filter(|r| r.0 == 429).count() + admitted,
        200,
        "only 200s and 429s"
    );
    for gateway in &mut gateways {
        gateway.begin_shutdown().await.expect("shutdown");
    }
    let charged: u64 = ledgers
        .iter()
        .flat_map(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .map(|line| {
            let v: Value = serde_json::from_str(&line).expect("JSON line");
            v["prompt_tokens"].as_u64().unwrap_or(0) + v["completion_tokens"].as_u64().unwrap_or(0)
        })
        .sum();
    assert!(
        charged <= quota,
        "charged {charged} > quota {quota} across replicas"
    );
    assert!(
        charged > quota / 2,
        "the quota was used: {charged} ({admitted} admitted)"
    );
    let mut conn = redis.client().get_connection().expect("redis");
    let used: u64 = redis::cmd("HGET")
        .arg("t2:quota:q:3600")
        .arg("used")
        .query(&mut conn)
        .expect("window in Redis");
    assert_eq!(
        used, charged,
        "Redis holds exactly what the ledgers charged"
    );
}

#[tokio::test]
async fn concurrency_is_one_limit_across_replicas_and_a_killed_replicas_slots_come_back() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry("c", "tg-c", "concurrency = 2");
    let toml = config(
        &upstream.url(),
        &redis,
        "t3:",
        "lease = \"2s\"",
        &keys,
        None,
    );
    let gateways = replicas(2, &toml).await;
    let stream = |gateway: &TestGateway, chunks: &'static str| {
        common::client()
            .post(format!("{}{CHAT}", gateway.url()))
            .header("authorization", "Bearer tg-c")
            .header("content-type", "application/json")
            .header("x-mock-chunks", chunks)
            .header("x-mock-chunk-delay-ms", "20")
            .body(json!({"model": "m", "messages": [{"role": "user", "content": "s"}], "stream": true}).to_string())
            .send()
    };
    let a = stream(&gateways[0], "10").await.expect("a");
    let b = stream(&gateways[1], "200").await.expect("b");
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    assert_eq!(
        chat(&gateways[0], "tg-c", small_chat(0), &[]).await.0,
        429,
        "two in flight across replicas"
    );
    assert_eq!(
        chat(&gateways[1], "tg-c", small_chat(1), &[]).await.0,
        429,
        "on either replica"
    );
    a.bytes().await.expect("a finishes");
    // Its lease is released in the background right after the stream ends.
    let mut admitted = 0;
    for _ in 0..50 {
        admitted = chat(&gateways[1], "tg-c", small_chat(2), &[]).await.0;
        if admitted == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        admitted, 200,
        "a finished stream frees its slot for every replica"
    );
    drop(b);

    // A replica that dies holding slots: they come back when its leases expire.
    let mut doomed = ChildReplica::start(&toml);
    let held = doomed
        .hold_streams(
            "tg-c",
            json!({"model": "m", "messages": [{"role": "user", "content": "s"}], "stream": true}),
            2,
        )
        .await;
    assert_eq!(held.len(), 2, "the doomed replica holds both slots");
    assert_eq!(
        chat(&gateways[0], "tg-c", small_chat(3), &[]).await.0,
        429,
        "slots held"
    );
    doomed.kill();
    drop(held);
    let started = std::time::Instant::now();
    let mut status = 0;
    while started.elapsed() < Duration::from_secs(6) {
        status = chat(&gateways[0], "tg-c", small_chat(4), &[]).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the dead replica's slots came back");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within the 2 s lease (plus a poll): {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn fail_closed_refuses_while_redis_is_away_and_recovers_by_itself() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry("f", "tg-f", "rate = { requests = 1000, per = \"1m\" }");
    let gateway = TestGateway::start_toml(&config(
        &upstream.url(),
        &redis,
        "t4:",
        "on_error = \"fail_closed\"",
        &keys,
        None,
    ))
    .await;
    assert_eq!(chat(&gateway, "tg-f", small_chat(0), &[]).await.0, 200);

    redis.kill();
    let (status, headers, body) = chat(&gateway, "tg-f", small_chat(1), &[]).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(
        headers.get("retry-after").is_some(),
        "503 says when to retry"
    );
    let error: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(error["status"], 503);
    assert!(
        !error.to_string().contains("127.0.0.1"),
        "no internals in the body: {error}"
    );
    let ready = reqwest::get(format!("{}/readyz", gateway.admin_url()))
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        503,
        "not ready under fail_closed while Redis is away"
    );
    assert!(
        common::counted(
            &gateway.metrics().await,
            "tollgate_state_errors_total{op=\"admit\"}"
        ),
        "outage counted"
    );

    redis.restart();
    let mut status = 0;
    for _ in 0..100 {
        status = chat(&gateway, "tg-f", small_chat(2), &[]).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "recovered without a restart");
    let ready = reqwest::get(format!("{}/readyz", gateway.admin_url()))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.expect("JSON");
    assert_eq!(ready["state"], "redis: up");
}

#[tokio::test]
async fn fail_open_admits_on_local_limits_and_applies_the_usage_when_redis_returns() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = common::state_path().with_file_name("usage.jsonl");
    let keys = key_entry(
        "o",
        "tg-o",
        "max_tokens = 50\nrate = { requests = 1, per = \"1h\", burst = 3 }\nquotas = [{ tokens = 100000, per = \"1d\" }]",
    );
    let mut gateway = TestGateway::start_toml(&config(
        &upstream.url(),
        &redis,
        "t5:",
        "on_error = \"fail_open\"",
        &keys,
        Some(&ledger),
    ))
    .await;
    assert_eq!(
        chat(&gateway, "tg-o", small_chat(0), &[]).await.0,
        200,
        "one request while Redis is up"
    );
    // Its settlement runs in the background: let it land before Redis goes.
    let mut before = redis.client().get_connection().expect("redis");
    for _ in 0..100 {
        let used: u64 = redis::cmd("HGET")
            .arg("t5:quota:o:86400")
            .arg("used")
            .query(&mut before)
            .unwrap_or(0);
        if used == 22 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    redis.kill();
    // This replica's own limiter stands in: burst 3.
    let statuses: Vec<u16> = {
        let mut out = Vec::new();
        for i in 1..6 {
            out.push(chat(&gateway, "tg-o", small_chat(i), &[]).await.0);
        }
        out
    };
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "local limits while Redis is away"
    );
    let ready = reqwest::get(format!("{}/readyz", gateway.admin_url()))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "ready under fail_open");

    redis.restart();
    // The readiness probe sees Redis back, which ends the outage; the pending usage follows.
    let mut conn = redis.client().get_connection().expect("redis");
    let per_request = 2 + 20; // "hello N" is 2 prompt tokens; max_tokens 20 are generated
    let mut used: u64 = 0;
    for _ in 0..100 {
        let ready: Value = reqwest::get(format!("{}/readyz", gateway.admin_url()))
            .await
            .expect("readyz")
            .json()
            .await
            .expect("JSON");
        if ready["state"] == "redis: up" {
            used = redis::cmd("HGET")
                .arg("t5:quota:o:86400")
                .arg("used")
                .query(&mut conn)
                .unwrap_or(0);
            if used > 0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        used,
        3 * per_request,
        "exactly the usage charged during the outage reached Redis"
    );
    assert_eq!(
        chat(&gateway, "tg-o", small_chat(7), &[]).await.0,
        200,
        "shared limits again"
    );

    gateway.begin_shutdown().await.expect("shutdown");
    let lines = std::fs::read_to_string(&ledger).expect("ledger");
    assert_eq!(
        lines.lines().count(),
        1 + 3 + 1,
        "the ledger has every admitted request: {lines}"
    );
}

#[tokio::test]
async fn redis_keys_are_namespaced_expire_and_hold_no_secrets() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry(
        "team-x",
        "tg-secret-token-value",
        "max_tokens = 50\nconcurrency = 4\nrate = { requests = 100, per = \"1m\" }\nquotas = [{ tokens = 100000, per = \"1d\" }]",
    );
    let gateway = TestGateway::start_toml(&config(
        &upstream.url(),
        &redis,
        "acme:tg:",
        "",
        &keys,
        None,
    ))
    .await;
    assert_eq!(
        chat(&gateway, "tg-secret-token-value", small_chat(0), &[])
            .await
            .0,
        200
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut conn = redis.client().get_connection().expect("redis");
    let stored: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).expect("keys");
    assert!(!stored.is_empty(), "something was stored");
    for key in &stored {
        assert!(key.starts_with("acme:tg:"), "namespaced: {key}");
        assert!(key.contains("team-x"), "by key name: {key}");
        assert!(!key.contains("secret"), "no token in a key name: {key}");
        let ttl: i64 = redis::cmd("PTTL").arg(key).query(&mut conn).expect("ttl");
        assert!(ttl > 0, "{key} expires (ttl {ttl})");
        let dump: String = match redis::cmd("TYPE")
            .arg(key)
            .query::<String>(&mut conn)
            .expect("type")
            .as_str()
        {
            "hash" => format!(
                "{:?}",
                redis::cmd("HGETALL")
                    .arg(key)
                    .query::<Vec<String>>(&mut conn)
                    .expect("hash")
            ),
            "zset" => format!(
                "{:?}",
                redis::cmd("ZRANGE")
                    .arg(key)
                    .arg(0)
                    .arg(-1)
                    .query::<Vec<String>>(&mut conn)
                    .expect("zset")
            ),
            _ => redis::cmd("GET")
                .arg(key)
                .query::<String>(&mut conn)
                .unwrap_or_default(),
        };
        assert!(!dump.contains("secret"), "no token in a value: {dump}");
    }
}

/// `field` of the hash `key`, 0 when either is missing.
fn hget(redis: &RedisServer, key: &str, field: &str) -> u64 {
    let mut conn = redis.client().get_connection().expect("redis");
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query::<Option<u64>>(&mut conn)
        .expect("HGET")
        .unwrap_or(0)
}

/// Polls `probe` every 50 ms until it returns `want` or `timeout` passes; returns the last value.
async fn poll_until<T: PartialEq + Copy>(
    timeout: Duration,
    want: T,
    mut probe: impl FnMut() -> T,
) -> T {
    let started = std::time::Instant::now();
    loop {
        let value = probe();
        if value == want || started.elapsed() > timeout {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_killed_replicas_reservations_are_renewed_while_it_lives_and_expire_after_it_dies() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry(
        "k",
        "tg-k",
        "max_tokens = 400\nquotas = [{ tokens = 1000, per = \"30d\" }]",
    );
    let toml = config(
        &upstream.url(),
        &redis,
        "t7:",
        "lease = \"2s\"",
        &keys,
        None,
    );
    let gateway = TestGateway::start_toml(&toml).await;
    let mut doomed = ChildReplica::start(&toml);
    let big = json!({"model": "m", "messages": [{"role": "user", "content": "s"}], "max_tokens": 400, "stream": true});
    let held = doomed.hold_streams("tg-k", big.clone(), 2).await;
    assert_eq!(held.len(), 2, "two streams run on the doomed replica");
    let window = "t7:quota:k:2592000";
    let reserved = hget(&redis, window, "reserved");
    assert!(
        reserved > 800,
        "both streams' worst case is reserved: {reserved}"
    );

    // Longer than the lease: the living replica renews what its streams hold.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        chat(&gateway, "tg-k", big.clone(), &[]).await.0,
        429,
        "running requests keep their reservations past the lease"
    );

    doomed.kill();
    drop(held);
    let started = std::time::Instant::now();
    let mut status = 0;
    while started.elapsed() < Duration::from_secs(8) {
        status = chat(&gateway, "tg-k", big.clone(), &[]).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the dead replica's reservations came back");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within the 2 s lease (plus a poll): {:?}",
        started.elapsed()
    );
    let left = poll_until(Duration::from_secs(3), 0, || {
        hget(&redis, window, "reserved")
    })
    .await;
    assert_eq!(
        left, 0,
        "nothing stays reserved once the last request settled"
    );
    assert!(
        hget(&redis, window, "used") > 0,
        "the settled request is charged"
    );
}

/// A gateway whose Redis answers every call half a second late (commands reach Redis at once),
/// with `keys`, in front of a fresh mock upstream. The first, patient request loads the scripts
/// into Redis (three slow round trips), so that each later request's call runs at once.
async fn slow_redis_gateway(
    redis: &RedisServer,
    prefix: &str,
    keys: &str,
    key: &str,
) -> (SlowProxy, MockUpstream, TestGateway) {
    let slow = SlowProxy::start(redis.port, Duration::from_millis(500)).await;
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let toml =
        config(&upstream.url(), redis, prefix, "", keys, None).replace(&redis.url(), &slow.url());
    let gateway = TestGateway::start_toml(&toml).await;
    assert_eq!(chat(&gateway, key, small_chat(99), &[]).await.0, 200);
    (slow, upstream, gateway)
}

/// A request whose client gives up after 250 ms, while the gateway still waits for Redis.
async fn hang_up_during_redis_call(gateway: &TestGateway, key: &str, i: usize) {
    let sent = reqwest::Client::builder()
        .timeout(Duration::from_millis(250))
        .build()
        .expect("client")
        .post(format!("{}{CHAT}", gateway.url()))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(small_chat(i).to_string())
        .send()
        .await;
    assert!(
        sent.is_err(),
        "the client hung up before Redis answered: {sent:?}"
    );
}

#[tokio::test]
async fn a_client_leaving_during_a_slow_reservation_leaves_nothing_reserved() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // Quotas only: the reservation is the one round trip to Redis.
    let keys = key_entry(
        "s",
        "tg-s",
        "max_tokens = 100\nquotas = [{ tokens = 100000, per = \"30d\" }]",
    );
    let (_slow, upstream, gateway) = slow_redis_gateway(&redis, "t8:", &keys, "tg-s").await;
    let window = "t8:quota:s:2592000";
    let settled = poll_until(Duration::from_secs(5), 0, || {
        hget(&redis, window, "reserved")
    })
    .await;
    assert_eq!(settled, 0, "the first request settled");
    for i in 0..3 {
        hang_up_during_redis_call(&gateway, "tg-s", i).await;
    }
    let reserved = poll_until(Duration::from_secs(3), 0, || {
        hget(&redis, window, "reserved")
    })
    .await;
    assert_eq!(
        reserved, 0,
        "what the lost round trips reserved is given back"
    );
    assert_eq!(
        upstream.request_count(),
        1,
        "only the first request was forwarded"
    );
}

#[tokio::test]
async fn a_client_leaving_during_a_slow_admission_leaves_no_slot_taken() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // Concurrency only: admission is the one round trip to Redis.
    let keys = key_entry("a", "tg-a", "concurrency = 5");
    let (_slow, _upstream, gateway) = slow_redis_gateway(&redis, "t9:", &keys, "tg-a").await;
    hang_up_during_redis_call(&gateway, "tg-a", 0).await;
    let mut conn = redis.client().get_connection().expect("redis");
    // The lease (30 s by default) would keep it far longer than this.
    let slots = poll_until(Duration::from_secs(3), 0, || {
        redis::cmd("ZCARD")
            .arg("t9:inflight:a")
            .query::<u64>(&mut conn)
            .expect("ZCARD")
    })
    .await;
    assert_eq!(slots, 0, "the slot the lost round trip took is given back");
}

#[tokio::test]
async fn a_reservation_is_given_back_once_whether_it_lapsed_settled_or_was_dropped() {
    use std::sync::Arc;
    use tollgate::state::redis::RedisState;
    use tollgate::state::{Amounts, Scope, Window};
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let keys = key_entry(
        "l",
        "tg-l",
        "max_tokens = 600\nquotas = [{ tokens = 1000, per = \"1h\" }]",
    );
    let toml = config(
        "http://127.0.0.1:9",
        &redis,
        "t10:",
        "lease = \"1s\"",
        &keys,
        None,
    );
    let config = tollgate::Config::parse(&toml, "test.toml").expect("config");
    let redis_config = config.state.redis.as_ref().expect("redis state");
    let metrics = Arc::new(tollgate::observability::metrics::Metrics::new());
    // No renewer runs: every lease lapses after 1 s, as a dead replica's would.
    let state = Arc::new(RedisState::connect(redis_config, metrics).expect("client"));
    let name: Arc<str> = Arc::from("l");
    let windows = &Window::of(Scope::Key, &name, &config.keys[0].limits.quotas);
    let reserve = |tokens| {
        let state = state.clone();
        async move {
            state
                .reserve(windows, Amounts { tokens, cost: 0 })
                .await
                .expect("Redis answers")
        }
    };
    let lapsed = reserve(600).await.expect("600 of 1000");
    assert!(reserve(600).await.is_err(), "1200 > 1000 while it holds");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = reserve(600)
        .await
        .expect("the first lapsed: its 600 came back");
    let window = "t10:quota:l:3600";
    assert_eq!(hget(&redis, window, "reserved"), 600);

    // Settling the lapsed one charges its usage and gives back nothing more.
    let member = lapsed.lease.into_settled();
    state
        .settle(
            &lapsed.reservation,
            Some(&member),
            Amounts {
                tokens: 50,
                cost: 0,
            },
        )
        .await
        .expect("settled");
    assert_eq!(hget(&redis, window, "used"), 50, "its usage is charged");
    assert_eq!(
        hget(&redis, window, "reserved"),
        600,
        "the second reservation is still whole"
    );
    drop(second);
    let left = poll_until(Duration::from_secs(2), 0, || {
        hget(&redis, window, "reserved")
    })
    .await;
    assert_eq!(left, 0, "a reservation dropped unsettled is given back");
}
