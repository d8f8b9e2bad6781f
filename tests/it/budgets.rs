//! Budgets as teams are given them: money from a price table, groups of keys sharing limits,
//! calendar months and ISO weeks — exact to the nano-unit in the ledger, the report, the admin
//! API and the windows, and never passed by any interleaving, on one replica or two.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use mock_upstream::MockUpstream;
use serde_json::{json, Value};
use tollgate::config::Period;
use tollgate::state::clock::Clock;

use crate::common::redis_server::RedisServer;
use crate::common::{self, key_entry, TestGateway};

const CHAT: &str = "/v1/chat/completions";
const TOKEN: &str = "budgets-admin-token-0123456789";
const TOKEN_ENV: &str = "TOLLGATE_BUDGETS_TEST_ADMIN_TOKEN";
const NANO: u128 = 1_000_000_000;

/// The issue's price table: 3.00 / 15.00 for poolside-malibu*, 0.1 / 1.5 for everything else (a
/// price that a float cannot hold exactly).
const PRICING: &str = r#"
[pricing]
currency = "USD"
models = [
  { model = "poolside-malibu*", prompt = 3.00, completion = 15.00 },
  { model = "*", prompt = 0.1, completion = 1.5 },
]
"#;

/// Nano-units per token of `model` at [`PRICING`].
fn price(model: &str) -> (u128, u128) {
    if model.starts_with("poolside-malibu") {
        (3_000, 15_000)
    } else {
        (100, 1_500)
    }
}

/// A config with the admin token, `state` as its `[state]` section (the test helper's local one
/// when empty), `ledger`, and `tail` (pricing, groups, keys).
fn config(upstream: &str, state: &str, ledger: &Path, tail: &str) -> String {
    std::env::set_var(TOKEN_ENV, TOKEN);
    let toml = common::config_toml(
        upstream,
        &format!("admin_token_env = \"{TOKEN_ENV}\""),
        "",
        &format!("{tail}\n[ledger]\npath = \"{}\"\n", ledger.display()),
    );
    if state.is_empty() {
        return toml;
    }
    // Replace the helper's local `[state]` section by `state`.
    let start = toml.find("[state]").expect("a state section");
    let end = start + toml[start..].find("\n[[keys]]").expect("keys follow");
    format!("{}{state}{}", &toml[..start], &toml[end..])
}

async fn admin_json(gateway: &TestGateway, path: &str) -> Value {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", gateway.admin_url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("admin request");
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.expect("JSON")
}

/// POSTs `body` as `key`: status, headers, body text.
async fn chat(
    gateway: &TestGateway,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let auth = format!("Bearer {key}");
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    let (status, headers, bytes) =
        common::post(&format!("{}{CHAT}", gateway.url()), &body.to_string(), &all).await;
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// The `usage` the upstream reported in an answer (JSON, or the last SSE event with one).
fn reported_usage(body: &str) -> (u128, u128) {
    let usage = if body.trim_start().starts_with('{') {
        serde_json::from_str::<Value>(body).expect("JSON answer")["usage"].clone()
    } else {
        body.lines()
            .rev()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find(|v| v["usage"].is_object())
            .expect("a usage event")["usage"]
            .clone()
    };
    let count = |k: &str| u128::from(usage[k].as_u64().expect("a count"));
    (count("prompt_tokens"), count("completion_tokens"))
}

/// Each ledger line's text: its `cost` is read from the text, exactly.
fn ledger_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The `cost` of a ledger line in nano-units, read from its decimal text.
fn line_cost(line: &str) -> u128 {
    let text = line
        .split("\"cost\":")
        .nth(1)
        .expect("a cost field")
        .split([',', '}'])
        .next()
        .expect("a value");
    decimal_nano(text)
}

/// `12.5` → 12_500_000_000; a decimal with at most 9 decimals, exactly.
fn decimal_nano(text: &str) -> u128 {
    let (whole, fraction) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    assert!(fraction.len() <= 9, "at most 9 decimals: {text}");
    let whole: u128 = whole.parse().expect("digits");
    let fraction: u128 = format!("{fraction:0<9}").parse().expect("digits");
    whole * NANO + fraction
}

/// An admin API cost figure (currency units) in nano-units.
fn admin_nano(value: &Value) -> u128 {
    let units = value.as_f64().expect("a number");
    (units * 1e9).round() as u128
}

/// The window of `unit` over `window` in an admin entry.
fn window<'a>(entry: &'a Value, window: &str, unit: &str) -> &'a Value {
    entry["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .find(|w| w["window"] == window && w["unit"] == unit)
        .unwrap_or_else(|| panic!("no {unit} window {window} in {entry}"))
}

fn field<'a>(line: &'a Value, name: &str) -> &'a str {
    line[name].as_str().unwrap_or("")
}

#[tokio::test]
async fn costs_are_tokens_times_prices_exactly_in_the_ledger_report_admin_api_and_windows() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = common::ledger_path();
    let keys = [
        key_entry(
            "alice",
            "tg-alice",
            "group = \"team-a\"\nmax_tokens = 50\nquotas = [ { cost = 20.0, per = \"month\" }, { tokens = 100000, per = \"1h\" } ]",
        ),
        key_entry("bob", "tg-bob", "policy = \"dev\""),
        key_entry("carol", "tg-carol", "max_tokens = 50"),
    ]
    .concat();
    let tail = format!(
        "{PRICING}\n[policies.dev]\ngroup = \"team-a\"\nmax_tokens = 50\n\n\
         [groups.team-a]\nquotas = [ {{ cost = 500.0, per = \"month\" }}, {{ tokens = 50000000, per = \"1d\" }} ]\n\
         concurrency = 64\nrate = {{ requests = 6000, per = \"1m\" }}\n\n{keys}"
    );
    let mut gateway = TestGateway::start_toml(&config(&upstream.url(), "", &ledger, &tail)).await;

    let mut expected: Vec<(String, &str, u128)> = Vec::new();
    for i in 0..40 {
        let (key, model) = match i % 4 {
            0 => ("alice", "poolside-malibu-2"),
            1 => ("bob", "m"),
            2 => ("carol", "m"),
            _ => ("alice", "poolside-malibu"),
        };
        let stream = i % 2 == 1;
        let mut body = json!({"model": model, "max_tokens": 5 + i % 11, "stream": stream,
            "messages": [{"role": "user", "content": format!("count to {i} please")}]});
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        let id = format!("cost-{i}");
        let prompt = (7 + i * 13 % 300).to_string();
        let (status, _, text) = chat(
            &gateway,
            &format!("tg-{key}"),
            &body,
            &[("x-request-id", &id), ("x-mock-prompt-tokens", &prompt)],
        )
        .await;
        assert_eq!(status, 200, "{text}");
        let (p, c) = reported_usage(&text);
        let (pp, cp) = price(model);
        expected.push((id, key, p * pp + c * cp));
    }
    // Every request settled: nothing reserved in the group's window.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let group = loop {
        let group = admin_json(&gateway, "/admin/groups/team-a").await;
        if window(&group, "month", "cost")["reserved"] == 0.0
            || std::time::Instant::now() > deadline
        {
            break group;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let alice = admin_json(&gateway, "/admin/keys/alice").await;
    let metrics = gateway.metrics().await;
    gateway.begin_shutdown().await.expect("shutdown");

    let lines = ledger_lines(&ledger);
    assert_eq!(lines.len(), 40, "one line per request");
    let mut by_key = std::collections::HashMap::<&str, u128>::new();
    for line in &lines {
        let parsed: Value = serde_json::from_str(line).expect("JSON line");
        let (_, key, cost) = expected
            .iter()
            .find(|(id, _, _)| id == field(&parsed, "request_id"))
            .expect("a line for each request");
        assert_eq!(line_cost(line), *cost, "tokens × prices: {line}");
        let group = if *key == "carol" {
            Value::Null
        } else {
            json!("team-a")
        };
        assert_eq!(parsed["group"], group, "{line}");
        *by_key.entry(key).or_default() += cost;
    }
    let team = by_key["alice"] + by_key["bob"];
    assert_eq!(admin_nano(&window(&group, "month", "cost")["used"]), team);
    assert_eq!(
        admin_nano(&window(&group, "month", "cost")["remaining"]),
        500 * NANO - team
    );
    assert_eq!(window(&group, "month", "cost")["limit"], 500.0);
    assert_eq!(
        group["members"],
        json!(["alice", "bob"]),
        "the group's keys, by its own and by policy"
    );
    assert_eq!(alice["group"], "team-a");
    assert_eq!(
        admin_nano(&window(&alice, "month", "cost")["used"]),
        by_key["alice"]
    );
    assert_eq!(window(&alice, "1h", "tokens")["limit"], 100_000);
    let metric = metrics
        .lines()
        .find(|l| {
            l.starts_with("tollgate_group_quota_used_cost{group=\"team-a\",window=\"month\"}")
        })
        .expect("the group's cost gauge");
    let gauge: f64 = metric
        .rsplit(' ')
        .next()
        .unwrap_or("")
        .parse()
        .expect("a value");
    assert!(
        (gauge * 1e9 - team as f64).abs() < 1.0,
        "{metric} vs {team}"
    );
    assert!(
        metrics.contains("tollgate_cost_total{key=\"carol\",model=\"other\"}"),
        "cost counted per key and model"
    );

    // The report, summed exactly, with 9 decimals.
    let report = usage_report(&ledger, "group");
    let total: u128 = by_key.values().sum();
    assert_eq!(report["team-a"], team, "{report:?}");
    assert_eq!(report["(none)"], by_key["carol"], "{report:?}");
    assert_eq!(report["team-a"] + report["(none)"], total);
}

/// `tollgate usage --by BY --format csv` on `ledger`: each row's `cost` in nano-units, read from
/// its text (which has 9 decimals).
fn usage_report(ledger: &Path, by: &str) -> std::collections::HashMap<String, u128> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["usage", "--by", by, "--format", "csv", "--ledger"])
        .arg(ledger)
        .output()
        .expect("tollgate usage runs");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let mut rows = text.lines();
    let header: Vec<&str> = rows.next().expect("a header").split(',').collect();
    assert_eq!(header[0], by);
    let column = header
        .iter()
        .position(|h| *h == "cost")
        .expect("a cost column");
    rows.map(|row| {
        let cells: Vec<&str> = row.split(',').collect();
        let cost = cells[column];
        assert_eq!(cost.split('.').nth(1).map(str::len), Some(9), "{row}");
        (cells[0].to_owned(), decimal_nano(cost))
    })
    .collect()
}

/// Three keys of one group, round robin; the group's cost budget is what binds.
fn race_tail(budget: &str) -> String {
    let keys: String = ["alice", "bob", "carol"]
        .iter()
        .map(|k| {
            key_entry(
                k,
                &format!("tg-{k}"),
                "group = \"team-a\"\nmax_tokens = 100",
            )
        })
        .collect();
    format!(
        "[pricing]\nmodels = [ {{ model = \"*\", prompt = 1.0, completion = 2.0 }} ]\n\
         [groups.team-a]\nquotas = [ {{ cost = {budget}, per = \"month\" }} ]\n{keys}"
    )
}

/// 200 requests over three keys of one group, on each of `gateways` in turn, 64 at a time (as
/// many as a loaded 2-core machine accepts without dropping connections; every one of them
/// interleaves with the others' reservations and settlements).
async fn race(gateways: &[TestGateway]) -> Vec<u16> {
    let bodies: Vec<Value> = (0..200)
        .map(|i| json!({"model": "m", "messages": [{"role": "user", "content": format!("hi {i}")}], "max_tokens": 100, "stream": i % 2 == 0}))
        .collect();
    let results: Vec<_> = futures_util::stream::iter(bodies.iter().enumerate().map(|(i, body)| {
        let key = ["tg-alice", "tg-bob", "tg-carol"][i % 3];
        chat(
            &gateways[i % gateways.len()],
            key,
            body,
            &[("x-mock-chunk-delay-ms", "2")],
        )
    }))
    .buffer_unordered(64)
    .collect()
    .await;
    for (status, _, body) in &results {
        assert!(
            *status == 200 || (*status == 429 && body.contains("group team-a")),
            "only 200s and the group's 429s: {status} {body}"
        );
    }
    results.into_iter().map(|r| r.0).collect()
}

/// The group's month cost window on `gateway` once nothing is reserved: `used`, in nano-units.
async fn settled_group_cost(gateway: &TestGateway) -> u128 {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let group = admin_json(gateway, "/admin/groups/team-a").await;
        let month = window(&group, "month", "cost");
        if month["reserved"] == 0.0 || std::time::Instant::now() > deadline {
            assert_eq!(month["reserved"], 0.0, "every request settled: {month}");
            return admin_nano(&month["used"]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ledger_cost(ledgers: &[PathBuf]) -> u128 {
    ledgers
        .iter()
        .flat_map(|l| ledger_lines(l))
        .map(|line| line_cost(&line))
        .sum()
}

/// 0.01 USD: at 1.0 / 2.0 per million tokens, about 45 requests' worth.
const RACE_BUDGET: u128 = 10_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_request_race_over_three_keys_never_passes_their_groups_cost_budget_locally() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = common::ledger_path();
    let toml = config(&upstream.url(), "", &ledger, &race_tail("0.01"));
    let mut gateway = TestGateway::start_toml(&toml).await;
    let statuses = race(std::slice::from_ref(&gateway)).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let used = settled_group_cost(&gateway).await;
    gateway.begin_shutdown().await.expect("shutdown");
    let charged = ledger_cost(&[ledger]);
    assert!(
        charged <= RACE_BUDGET,
        "charged {charged} > budget ({admitted} admitted)"
    );
    assert!(charged > RACE_BUDGET / 2, "the budget was used: {charged}");
    assert!(admitted < 200, "the budget refused some");
    assert_eq!(
        used, charged,
        "the admin API's window is what the ledger charged"
    );
}

// Two threads: the replicas' Redis connections are driven on the test's runtime, beside the
// 200 clients; on one thread a loaded machine delays their answers past the 1 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_request_race_over_three_keys_on_two_replicas_never_passes_the_groups_budget() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let state = format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nprefix = \"b1:\"\n",
        redis.url()
    );
    let ledgers = [common::ledger_path(), common::ledger_path()];
    let mut gateways = Vec::new();
    for ledger in &ledgers {
        let toml = config(&upstream.url(), &state, ledger, &race_tail("0.01"));
        gateways.push(TestGateway::start_toml(&toml).await);
    }
    let statuses = race(&gateways).await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let seen = [
        settled_group_cost(&gateways[0]).await,
        settled_group_cost(&gateways[1]).await,
    ];
    for gateway in &mut gateways {
        gateway.begin_shutdown().await.expect("shutdown");
    }
    let charged = ledger_cost(&ledgers);
    assert!(
        charged <= RACE_BUDGET,
        "charged {charged} > budget ({admitted} admitted)"
    );
    assert!(charged > RACE_BUDGET / 2, "the budget was used: {charged}");
    let mut conn = redis.client().get_connection().expect("redis");
    let in_redis: u64 = redis::cmd("HGET")
        .arg("b1:group-cost:team-a:month")
        .arg("used")
        .query(&mut conn)
        .expect("the group's window in Redis");
    assert_eq!(
        u128::from(in_redis),
        charged,
        "Redis holds what the ledgers charged"
    );
    assert_eq!(seen, [charged, charged], "both replicas' admin APIs agree");
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs()
}

/// `Retry-After` is the time from the refusal to the end of its `period` window: between the
/// time left when the request was sent and the time left now (plus the rounding up).
fn assert_resets_at(
    headers: &reqwest::header::HeaderMap,
    period: Period,
    sent_at: u64,
    what: &str,
) {
    let now = unix_now();
    let (_, end) = tollgate::state::window::bounds(period, sent_at);
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("secs");
    assert!(
        (end.saturating_sub(now)..=end - sent_at + 1).contains(&retry),
        "Retry-After {retry} at {what}: {} to {} s away",
        end.saturating_sub(now),
        end - sent_at
    );
}

#[tokio::test]
async fn a_key_over_its_own_budget_is_refused_while_its_group_has_room_and_the_other_way_round() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = common::ledger_path();
    let keys = [
        // Its own 0.0001 USD: about one request at 1.0 / 2.0 per million.
        key_entry(
            "alice",
            "tg-alice",
            "group = \"team-a\"\nmax_tokens = 20\nquotas = [ { cost = 0.0001, per = \"month\" } ]",
        ),
        key_entry("bob", "tg-bob", "group = \"team-a\"\nmax_tokens = 20"),
        key_entry("dave", "tg-dave", "group = \"team-b\"\nmax_tokens = 20"),
        key_entry(
            "erin",
            "tg-erin",
            "group = \"team-b\"\nmax_tokens = 20\nquotas = [ { tokens = 100000, per = \"1d\" } ]",
        ),
        key_entry("frank", "tg-frank", "group = \"team-c\""),
        key_entry("gina", "tg-gina", "group = \"team-c\""),
    ]
    .concat();
    let tail = format!(
        "[pricing]\nmodels = [ {{ model = \"*\", prompt = 1.0, completion = 2.0 }} ]\n\
         [groups.team-a]\nquotas = [ {{ cost = 100.0, per = \"month\" }} ]\n\
         [groups.team-b]\nquotas = [ {{ tokens = 150, per = \"week\" }} ]\n\
         [groups.team-c]\nconcurrency = 1\n{keys}"
    );
    let gateway = TestGateway::start_toml(&config(&upstream.url(), "", &ledger, &tail)).await;
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20});

    // alice runs out of her own budget; bob, in the same group, goes on.
    let mut refusal = None;
    let mut sent_at = unix_now();
    for _ in 0..20 {
        sent_at = unix_now();
        let (status, headers, text) = chat(&gateway, "tg-alice", &body, &[]).await;
        if status == 429 {
            refusal = Some((headers, text));
            break;
        }
        assert_eq!(status, 200, "{text}");
    }
    let (headers, text) = refusal.expect("alice's own budget refuses her");
    let detail: Value = serde_json::from_str(&text).expect("JSON");
    let detail = detail["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("cost quota exceeded: the month window of key alice has ")
            && detail.contains(" of 0.0001 USD in use"),
        "{detail}"
    );
    assert_resets_at(&headers, Period::Month, sent_at, "the 1st of next month");
    let policy: Vec<&str> = headers
        .get_all("ratelimit-policy")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(
        policy
            .iter()
            .any(|p| p.starts_with("\"cost-month\";q=0;w=")),
        "the cost window in RateLimit-Policy: {policy:?}"
    );
    assert_eq!(
        chat(&gateway, "tg-bob", &body, &[]).await.0,
        200,
        "the group has room"
    );

    // team-b's weekly 150 tokens run out across dave and erin, though erin has room of her own.
    let mut refused = None;
    for i in 0..20 {
        let key = ["tg-dave", "tg-erin"][i % 2];
        sent_at = unix_now();
        let (status, headers, text) = chat(&gateway, key, &body, &[]).await;
        if status == 429 {
            refused = Some((key, headers, text));
            break;
        }
        assert_eq!(status, 200, "{text}");
    }
    let (_, headers, text) = refused.expect("the group's budget refuses");
    let detail: Value = serde_json::from_str(&text).expect("JSON");
    let detail = detail["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("token quota exceeded: the week window of group team-b has ")
            && detail.contains(" of 150 tokens in use"),
        "{detail}"
    );
    assert_resets_at(&headers, Period::Week, sent_at, "Monday 00:00 UTC");
    let erin = admin_json(&gateway, "/admin/keys/erin").await;
    assert!(
        window(&erin, "1d", "tokens")["remaining"].as_u64() > Some(90_000),
        "erin's own window has room: {erin}"
    );

    // team-c's concurrency of 1 holds across its keys: frank's stream keeps gina out.
    let stream = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": true});
    let held = common::client_with_key("tg-frank")
        .post(format!("{}{CHAT}", gateway.url()))
        .header("content-type", "application/json")
        .header("x-mock-chunks", "200")
        .header("x-mock-chunk-delay-ms", "50")
        .body(stream.to_string())
        .send()
        .await
        .expect("frank's stream");
    assert_eq!(held.status(), 200);
    let (status, headers, text) = chat(&gateway, "tg-gina", &body, &[]).await;
    assert_eq!(status, 429, "{text}");
    assert!(
        text.contains("too many requests in flight for the group team-c (limit 1)"),
        "{text}"
    );
    assert_eq!(headers["retry-after"], "1");
    drop(held);
}

#[tokio::test]
async fn month_windows_reset_on_the_first_in_february_of_a_leap_year_and_of_a_common_one() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    for (start, retry_after, label) in [
        (
            "2024-02-29T23:59:00Z",
            60,
            "leap year: February has 29 days",
        ),
        (
            "2024-02-28T23:59:30Z",
            86_400 + 30,
            "leap year: the 28th is not the last",
        ),
        (
            "2023-02-28T23:59:30Z",
            30,
            "common year: February has 28 days",
        ),
    ] {
        let wall = humantime::parse_rfc3339(start).expect("a time");
        let clock = Clock::manual_at(wall);
        let keys = key_entry(
            "m",
            "tg-m",
            "max_tokens = 10\nquotas = [ { tokens = 120, per = \"month\" }, { cost = 1.0, per = \"month\" } ]",
        );
        let tail = format!(
            "[pricing]\nmodels = [ {{ model = \"*\", prompt = 1.0, completion = 1.0 }} ]\n{keys}"
        );
        let file = tempfile::NamedTempFile::new().expect("config file");
        std::fs::write(
            file.path(),
            config(&upstream.url(), "", &common::ledger_path(), &tail),
        )
        .expect("write config");
        let gateway = TestGateway::start_file(file.path(), clock.clone()).await;
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10});
        let mut refused = None;
        for _ in 0..20 {
            let (status, headers, text) = chat(&gateway, "tg-m", &body, &[]).await;
            if status == 429 {
                refused = Some(headers);
                break;
            }
            assert_eq!(status, 200, "{text}");
        }
        let headers = refused.expect("the month's tokens run out");
        assert_eq!(
            headers["retry-after"],
            retry_after.to_string().as_str(),
            "{label}"
        );
        let key = admin_json(&gateway, "/admin/keys/m").await;
        assert_eq!(
            window(&key, "month", "tokens")["reset_seconds"],
            retry_after,
            "{label}"
        );
        clock.advance(Duration::from_secs(retry_after - 1));
        assert_eq!(
            chat(&gateway, "tg-m", &body, &[]).await.0,
            429,
            "{label}: not yet"
        );
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            chat(&gateway, "tg-m", &body, &[]).await.0,
            200,
            "{label}: a new month"
        );
        let key = admin_json(&gateway, "/admin/keys/m").await;
        let march = window(&key, "month", "tokens")["reset_seconds"].as_u64();
        assert_eq!(march, Some(31 * 86_400), "{label}: March has 31 days");
    }
}

#[tokio::test]
async fn a_reload_applies_new_prices_and_groups_to_new_requests_and_keeps_the_usage() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = common::ledger_path();
    let file = tempfile::NamedTempFile::new().expect("config file");
    let write = |prompt: &str, completion: &str, group: &str| {
        let keys = key_entry(
            "r",
            "tg-r",
            &format!("{group}max_tokens = 20\nquotas = [ {{ cost = 5.0, per = \"month\" }} ]"),
        );
        let tail = format!(
            "[pricing]\nmodels = [ {{ model = \"*\", prompt = {prompt}, completion = {completion} }} ]\n\
             [groups.g]\nquotas = [ {{ cost = 7.0, per = \"week\" }} ]\n{keys}"
        );
        std::fs::write(file.path(), config(&upstream.url(), "", &ledger, &tail)).expect("write");
    };
    write("1.0", "2.0", "");
    let gateway = TestGateway::start_file(file.path(), Clock::real()).await;
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20});
    let (status, _, first) = chat(&gateway, "tg-r", &body, &[]).await;
    assert_eq!(status, 200);
    write("0.125", "7.5", "group = \"g\"\n");
    gateway.reload().expect("reload");
    let (status, _, second) = chat(&gateway, "tg-r", &body, &[]).await;
    assert_eq!(status, 200);
    let (p1, c1) = reported_usage(&first);
    let (p2, c2) = reported_usage(&second);
    let cost1 = p1 * 1_000 + c1 * 2_000;
    let cost2 = p2 * 125 + c2 * 7_500;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ledger_lines(&ledger).len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let costs: Vec<u128> = ledger_lines(&ledger).iter().map(|l| line_cost(l)).collect();
    assert_eq!(
        costs,
        [cost1, cost2],
        "each request at the prices it was admitted at"
    );
    let key = admin_json(&gateway, "/admin/keys/r").await;
    assert_eq!(key["group"], "g", "the reload moved the key into the group");
    assert_eq!(
        admin_nano(&window(&key, "month", "cost")["used"]),
        cost1 + cost2,
        "the key's window kept its usage across the reload"
    );
    let group = admin_json(&gateway, "/admin/groups/g").await;
    assert_eq!(admin_nano(&window(&group, "week", "cost")["used"]), cost2);
    let groups = admin_json(&gateway, "/admin/groups").await;
    assert_eq!(groups["groups"][0]["name"], "g");
    assert_eq!(groups["groups"][0]["members"], json!(["r"]));
    let sections = admin_json(&gateway, "/admin/sections").await;
    let ids: Vec<&str> = sections["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(
        ids,
        ["overview", "keys", "groups", "upstreams", "requests"],
        "the console's Groups page"
    );
}

#[tokio::test]
async fn the_redis_scripts_place_weeks_and_months_where_the_gateway_does() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut conn = redis.client().get_connection().expect("redis");
    let script = redis::Script::new(&format!(
        "{}\nlocal s, e = bounds(ARGV[1], tonumber(ARGV[2]))\nreturn {{s, e}}",
        tollgate::state::window::LUA_BOUNDS
    ));
    let mut now = humantime::parse_rfc3339("1999-12-25T00:00:00Z")
        .expect("time")
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs();
    let mut checked = 0;
    while checked < 3_000 {
        for (period, id) in [(Period::Month, "month"), (Period::Week, "week")] {
            let lua: (u64, u64) = script.arg(id).arg(now).invoke(&mut conn).expect("EVAL");
            assert_eq!(
                lua,
                tollgate::state::window::bounds(period, now),
                "{id} at {now}"
            );
        }
        // Steps of a little over 9 days, over about 75 years: every month and weekday.
        now += 9 * 86_400 + 7_919;
        checked += 1;
    }
}
