//! Upstream pools: routing by model, `least_requests` in front of a slow replica, failover and
//! ejection while a replica is killed and restarted, health checks, the `/v1/models` union, one
//! ledger line and one charge for a retried request, and endpoints added and removed by a reload
//! under load. Counts and statuses are asserted, never timings.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use mock_upstream::{MockOptions, MockUpstream};
use serde_json::Value;
use tollgate::state::clock::Clock;

use crate::common::{self, key_entry, TestGateway};

const CHAT: &str = "/v1/chat/completions";
const TOKEN: &str = "pools-admin-token-0123456789";
const TOKEN_ENV: &str = "TOLLGATE_POOLS_TEST_ADMIN_TOKEN";

/// A config with the given `[[upstreams]]` text, the admin API on, the test key, and `tail`.
fn config(pools: &str, tail: &str) -> String {
    config_at(pools, &common::state_path(), tail)
}

/// [`config`] with its state file at `state`.
fn config_at(pools: &str, state: &std::path::Path, tail: &str) -> String {
    std::env::set_var(TOKEN_ENV, TOKEN);
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         admin_token_env = \"{TOKEN_ENV}\"\n{pools}\n[state]\npath = \"{}\"\n{}\n{tail}\n",
        state.display(),
        key_entry("test", common::TEST_KEY, ""),
    )
}

/// One `[[upstreams]]` entry.
fn pool(name: &str, models: &[&str], endpoints: &[String], extra: &str) -> String {
    let quoted = |items: &[String]| {
        items
            .iter()
            .map(|item| format!("{item:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let models: Vec<String> = models.iter().map(|m| (*m).to_owned()).collect();
    format!(
        "[[upstreams]]\nname = \"{name}\"\nmodels = [{}]\nendpoints = [{}]\n{extra}\n",
        quoted(&models),
        quoted(endpoints)
    )
}

async fn mocks(n: usize) -> Vec<MockUpstream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(MockUpstream::start().await.expect("mock upstream"));
    }
    out
}

fn urls(mocks: &[MockUpstream]) -> Vec<String> {
    mocks.iter().map(MockUpstream::url).collect()
}

/// Requests the mock answered, its health checks left out.
fn served(mock: &MockUpstream) -> usize {
    mock.requests()
        .iter()
        .filter(|r| r.path_and_query != "/health")
        .count()
}

async fn admin_json(gateway: &TestGateway, path: &str) -> Value {
    gateway.admin_json(TOKEN, path).await
}

/// Whether `/admin/upstreams` shows the endpoint `label` of the first pool as `up`.
async fn endpoint_up(gateway: &TestGateway, label: &str) -> Option<bool> {
    let upstreams = admin_json(gateway, "/admin/upstreams").await;
    upstreams["upstreams"][0]["endpoints"]
        .as_array()?
        .iter()
        .find(|e| e["endpoint"] == label)?["up"]
        .as_bool()
}

/// Polls until `/admin/upstreams` shows `label` as `up`; bounded (a guard against a hang).
async fn wait_until_up(gateway: &TestGateway, label: &str, up: bool) {
    for _ in 0..500 {
        if endpoint_up(gateway, label).await == Some(up) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{label} never became up={up}");
}

/// How a request ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Ok,
    /// A status other than 200.
    Status(u16),
    /// 200, then the body broke off.
    BrokenStream,
    /// No answer at all within the client's timeout.
    Hang,
}

/// One chat request, JSON or streamed; streams take a few milliseconds, so that some are in
/// flight when an endpoint dies.
async fn chat(client: &reqwest::Client, url: &str, model: &str, stream: bool) -> Seen {
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#
    );
    let sent = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-mock-chunk-delay-ms", if stream { "2" } else { "0" })
        .body(body)
        .send()
        .await;
    let response = match sent {
        Ok(response) => response,
        Err(error) if error.is_timeout() => return Seen::Hang,
        Err(_) => return Seen::Status(0),
    };
    let status = response.status().as_u16();
    match response.bytes().await {
        Ok(_) if status == 200 => Seen::Ok,
        Ok(_) => Seen::Status(status),
        Err(error) if error.is_timeout() => Seen::Hang,
        Err(_) => Seen::BrokenStream,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_endpoint_fails_only_its_own_requests_and_serves_again_after_its_health_check() {
    let mut upstreams = mocks(3).await;
    let extra = "health_check = { path = \"/health\", interval = \"100ms\", timeout = \"500ms\" }";
    let toml = config(&pool("chat", &["*"], &urls(&upstreams), extra), "");
    let gateway = TestGateway::start_toml(&toml).await;
    let url = format!("{}{CHAT}", gateway.url());
    let client = common::client();

    let done = Arc::new(AtomicUsize::new(0));
    let detected = Arc::new(AtomicBool::new(false));
    let total = 2_000;
    let load = {
        let (done, detected, url, client) = (done.clone(), detected.clone(), url.clone(), client);
        tokio::spawn(async move {
            stream::iter(0..total)
                .map(|i| {
                    let (done, detected, url, client) =
                        (done.clone(), detected.clone(), url.clone(), client.clone());
                    async move {
                        let after_detection = detected.load(Ordering::SeqCst);
                        let seen = chat(&client, &url, "mock-model", i % 2 == 0).await;
                        done.fetch_add(1, Ordering::SeqCst);
                        (after_detection, seen)
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<_>>()
                .await
        })
    };

    let wait_done = |n: usize| {
        let done = done.clone();
        async move {
            while done.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    wait_done(400).await;
    let killed = upstreams.remove(1);
    let addr = killed.addr();
    let label = addr.to_string();
    killed.stop().await;
    wait_until_up(&gateway, &label, false).await;
    detected.store(true, Ordering::SeqCst);

    wait_done(1_000).await;
    let restarted = MockUpstream::start_on(addr, MockOptions::default())
        .await
        .expect("the same port again");
    wait_until_up(&gateway, &label, true).await;
    let results = load.await.expect("load task");

    assert_eq!(results.len(), total);
    let hangs = results.iter().filter(|(_, s)| *s == Seen::Hang).count();
    assert_eq!(hangs, 0, "no request hangs");
    let late_failures: Vec<_> = results
        .iter()
        .filter(|(after, seen)| *after && *seen != Seen::Ok)
        .collect();
    assert!(
        late_failures.is_empty(),
        "every request started after the kill was detected succeeds: {late_failures:?}"
    );
    let failures: Vec<Seen> = results
        .iter()
        .map(|(_, seen)| *seen)
        .filter(|seen| *seen != Seen::Ok)
        .collect();
    assert!(
        failures.len() <= 16,
        "at most the requests in flight on the killed endpoint fail: {failures:?}"
    );
    assert!(
        failures
            .iter()
            .all(|seen| matches!(seen, Seen::BrokenStream | Seen::Status(502))),
        "failures are broken streams or 502: {failures:?}"
    );
    // The restarted endpoint is in the pool again: new requests reach it.
    let client = common::client();
    let again: Vec<Seen> = stream::iter(0..60)
        .map(|_| chat(&client, &url, "mock-model", false))
        .buffer_unordered(6)
        .collect()
        .await;
    assert!(again.iter().all(|seen| *seen == Seen::Ok), "{again:?}");
    assert!(
        served(&restarted) > 0,
        "the restarted endpoint serves again after its health check"
    );
    let metrics = gateway.metrics().await;
    let up = format!("tollgate_upstream_up{{endpoint=\"{label}\",upstream=\"chat\"}} 1");
    assert!(metrics.contains(&up), "{up} in:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_requests_sends_clearly_fewer_requests_to_a_slow_endpoint() {
    let mut upstreams = mocks(2).await;
    let slow = MockUpstream::start_with(MockOptions {
        delay: Some(Duration::from_millis(100)),
        ..MockOptions::default()
    })
    .await
    .expect("slow mock");
    upstreams.push(slow);
    let toml = config(&pool("chat", &["*"], &urls(&upstreams), ""), "");
    let gateway = TestGateway::start_toml(&toml).await;
    let url = format!("{}{CHAT}", gateway.url());
    let client = common::client();
    let results: Vec<Seen> = stream::iter(0..400)
        .map(|_| chat(&client, &url, "mock-model", false))
        .buffer_unordered(12)
        .collect()
        .await;
    assert!(results.iter().all(|seen| *seen == Seen::Ok));
    let counts: Vec<usize> = upstreams.iter().map(served).collect();
    assert_eq!(counts.iter().sum::<usize>(), 400, "{counts:?}");
    let fastest_least = counts[0].min(counts[1]);
    assert!(
        counts[2] * 2 < fastest_least,
        "the slow endpoint gets clearly fewer requests than each fast one: {counts:?}"
    );
}

#[tokio::test]
async fn requests_go_to_the_first_pool_whose_models_match_and_others_are_refused() {
    let upstreams = mocks(2).await;
    let pools = pool("chat", &["mock-model"], &[upstreams[0].url()], "")
        + &pool("small", &["smollm2*"], &[upstreams[1].url()], "")
        + &pool("rest", &["smollm2-1.7b"], &[upstreams[0].url()], "");
    let ledger = common::ledger_path();
    let tail = format!("[ledger]\npath = \"{}\"\n", ledger.display());
    let gateway = TestGateway::start_toml(&config(&pools, &tail)).await;
    let url = format!("{}{CHAT}", gateway.url());
    let client = common::client();

    assert_eq!(chat(&client, &url, "mock-model", false).await, Seen::Ok);
    for model in ["smollm2-135m", "smollm2-1.7b"] {
        assert_eq!(chat(&client, &url, model, true).await, Seen::Ok, "{model}");
    }
    assert_eq!(served(&upstreams[0]), 1, "mock-model went to chat");
    assert_eq!(
        served(&upstreams[1]),
        2,
        "both smollm2 models to small, the first pool that matches"
    );

    let response = client
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.expect("JSON error");
    assert_eq!(body["code"], "model-not-found", "{body}");
    assert_eq!(body["error"]["code"], "model_not_found", "{body}");
    assert_eq!(
        served(&upstreams[0]) + served(&upstreams[1]),
        3,
        "not forwarded"
    );

    assert!(
        gateway
            .wait_for_metrics(
                |m| m.contains(
                    "tollgate_rejections_total{key=\"test\",reason=\"model_not_found\"} 1"
                ),
                Duration::from_secs(5),
            )
            .await
    );
    let lines = common::ledger_lines(&ledger, 3).await;
    let mut upstream_names: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["upstream"].as_str())
        .collect();
    upstream_names.sort_unstable();
    assert_eq!(upstream_names, ["chat", "small", "small"], "{lines:?}");
}

#[tokio::test]
async fn models_is_the_union_of_the_pools_lists_filtered_by_patterns_and_key() {
    let listing = |models: &[&str]| MockOptions {
        models: models.iter().map(|m| (*m).to_owned()).collect(),
        ..MockOptions::default()
    };
    let a = MockUpstream::start_with(listing(&["mock-model", "not-routed-here"]))
        .await
        .expect("mock a");
    let b = MockUpstream::start_with(listing(&[
        "smollm2-135m",
        "smollm2-360m",
        "mock-model",
        "llama-3",
    ]))
    .await
    .expect("mock b");
    let pools = pool("chat", &["mock-model"], &[a.url()], "")
        + &pool("small", &["smollm2*", "mock-model"], &[b.url()], "");
    let narrow = key_entry(
        "narrow",
        "tg-narrow-key",
        "models = [\"mock-model\", \"smollm2-135m\"]",
    );
    let gateway = TestGateway::start_toml(&config(&pools, &narrow)).await;
    let ids = |list: Value| -> Vec<String> {
        assert_eq!(list["object"], "list", "{list}");
        list["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_owned())
            .collect()
    };
    let models = |key: &'static str| {
        let url = format!("{}/v1/models", gateway.url());
        async move {
            let response = common::client_with_key(key)
                .get(url)
                .send()
                .await
                .expect("models");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("JSON list")
        }
    };
    assert_eq!(
        ids(models(common::TEST_KEY).await),
        ["mock-model", "smollm2-135m", "smollm2-360m"],
        "each pool's models its patterns allow, once"
    );
    assert_eq!(
        ids(models("tg-narrow-key").await),
        ["mock-model", "smollm2-135m"],
        "and only those the key allows"
    );
    let asked = |mock: &MockUpstream| {
        mock.requests()
            .iter()
            .filter(|r| r.path_and_query == "/v1/models")
            .count()
    };
    assert_eq!((asked(&a), asked(&b)), (1, 1), "the lists are cached");
}

#[tokio::test]
async fn a_request_retried_on_another_endpoint_is_charged_once_with_one_ledger_line() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let dead = format!("http://127.0.0.1:{}", common::closed_port());
    // Round robin starts at the first endpoint: the dead one.
    let pools = pool(
        "chat",
        &["*"],
        &[dead, upstream.url()],
        "balance = \"round_robin\"",
    );
    let ledger = common::ledger_path();
    let tail = format!("[ledger]\npath = \"{}\"\n", ledger.display());
    let gateway = TestGateway::start_toml(&config(&pools, &tail)).await;
    let (status, _, body) = common::post(
        &format!("{}{CHAT}", gateway.url()),
        &common::chat_body(false, false),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).expect("JSON answer");
    let usage = &answer["usage"];
    assert_eq!(upstream.request_count(), 1);

    let metrics = gateway.metrics().await;
    for needle in [
        "tollgate_upstream_errors_total{kind=\"connect\",upstream=\"chat\"} 1",
        "tollgate_upstream_errors_total{kind=\"retried\",upstream=\"chat\"} 1",
        "tollgate_requests_total{endpoint=\"chat_completions\",key=\"test\",model=\"other\",status=\"200\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} in:\n{metrics}");
    }
    let lines = common::ledger_lines(&ledger, 1).await;
    assert_eq!(lines.len(), 1, "one ledger line: {lines:?}");
    assert_eq!(lines[0]["upstream"], "chat");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["prompt_tokens"], usage["prompt_tokens"]);
    assert_eq!(lines[0]["completion_tokens"], usage["completion_tokens"]);
    let charged = |kind: &str| {
        let prefix = format!("tollgate_tokens_total{{key=\"test\",kind=\"{kind}\",model=\"other\",source=\"reported\"}} ");
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(&prefix)?.parse::<u64>().ok())
    };
    assert_eq!(
        charged("prompt"),
        usage["prompt_tokens"].as_u64(),
        "charged once"
    );
    assert_eq!(charged("completion"), usage["completion_tokens"].as_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_endpoints_under_load_without_a_failed_request() {
    let upstreams = mocks(3).await;
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    let state = common::state_path();
    let write = |file: &mut tempfile::NamedTempFile, endpoints: &[String]| {
        let text = config_at(&pool("chat", &["*"], endpoints, ""), &state, "");
        let file = file.as_file_mut();
        file.set_len(0).expect("truncate");
        std::io::Seek::rewind(file).expect("rewind");
        file.write_all(text.as_bytes()).expect("write config");
        file.sync_all().expect("sync");
    };
    let all = urls(&upstreams);
    write(&mut file, &all[..2]);
    let gateway = TestGateway::start_file(file.path(), Clock::default()).await;
    let url = format!("{}{CHAT}", gateway.url());

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, url) = (stop.clone(), url.clone());
        tokio::spawn(async move {
            let client = common::client();
            let workers = (0..8).map(|i| {
                let (stop, url, client) = (stop.clone(), url.clone(), client.clone());
                async move {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        seen.push(chat(&client, &url, "mock-model", i % 2 == 0).await);
                    }
                    seen
                }
            });
            futures_util::future::join_all(workers).await.concat()
        })
    };
    wait_for_requests(&upstreams[1], 50).await;

    write(&mut file, &all);
    let summary = gateway.reload().expect("reload adds the third endpoint");
    assert_eq!(summary.upstreams, ["chat"]);
    wait_for_requests(&upstreams[2], 50).await;

    write(&mut file, &[all[0].clone(), all[2].clone()]);
    gateway.reload().expect("reload removes the second");
    // Requests that were in flight on it finish there; then none go to it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let removed_after = served(&upstreams[1]);
    wait_for_requests(&upstreams[0], 100).await;
    wait_for_requests(&upstreams[2], 100).await;
    stop.store(true, Ordering::SeqCst);
    let results = load.await.expect("load");
    assert_eq!(
        served(&upstreams[1]),
        removed_after,
        "no request reaches the removed endpoint"
    );
    let failed: Vec<&Seen> = results.iter().filter(|s| **s != Seen::Ok).collect();
    assert!(failed.is_empty(), "zero failed requests: {failed:?}");
    assert!(results.len() > 300, "load ran: {}", results.len());
    let upstreams_now = admin_json(&gateway, "/admin/upstreams").await;
    let endpoints: Vec<&str> = upstreams_now["upstreams"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter_map(|e| e["url"].as_str())
        .collect();
    assert_eq!(endpoints, [all[0].as_str(), all[2].as_str()]);
}

#[tokio::test]
async fn admin_upstreams_and_readyz_show_each_pool_and_its_endpoints() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let dead = format!("http://127.0.0.1:{}", common::closed_port());
    let pools = pool("chat", &["mock-model"], &[upstream.url()], "")
        + &pool(
            "gone",
            &["other*"],
            std::slice::from_ref(&dead),
            "eject_after = 1",
        );
    let gateway = TestGateway::start_toml(&config(&pools, "")).await;
    let listed = admin_json(&gateway, "/admin/upstreams").await;
    let chat = &listed["upstreams"][0];
    assert_eq!(chat["name"], "chat");
    assert_eq!(chat["models"], serde_json::json!(["mock-model"]));
    assert_eq!(chat["balance"], "least_requests");
    let endpoint = &chat["endpoints"][0];
    assert_eq!(endpoint["endpoint"], upstream.addr().to_string());
    assert_eq!(endpoint["url"], upstream.url());
    assert_eq!(endpoint["up"], true);
    assert_eq!(endpoint["inflight"], 0);
    assert_eq!(endpoint["failures"], 0);
    assert!(endpoint["ejected_until"].is_null());

    let ready = reqwest::get(format!("{}/readyz", gateway.admin_url()))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503, "the pool gone has no endpoint up");
    let body: Value = ready.json().await.expect("JSON");
    assert_eq!(
        body["upstreams_down"],
        serde_json::json!(["gone"]),
        "{body}"
    );

    let (status, _, _) = common::post(
        &format!("{}{CHAT}", gateway.url()),
        r#"{"model":"other-1","messages":[{"role":"user","content":"hi"}]}"#,
        &[],
    )
    .await;
    assert_eq!(status, 502);
    let gone = &admin_json(&gateway, "/admin/upstreams").await["upstreams"][1]["endpoints"][0];
    assert_eq!(gone["up"], false, "{gone}");
    assert_eq!(gone["failures"], 1);
    let until = gone["ejected_until"].as_str().expect("an RFC 3339 time");
    assert!(humantime::parse_rfc3339(until).is_ok(), "{until}");
    let metrics = gateway.metrics().await;
    for needle in [
        format!("tollgate_upstream_up{{endpoint=\"{}\",upstream=\"chat\"}} 1", upstream.addr()),
        format!("tollgate_upstream_inflight{{endpoint=\"{}\",upstream=\"chat\"}} 0", upstream.addr()),
        format!(
            "tollgate_upstream_requests_total{{endpoint=\"{}\",status=\"connect\",upstream=\"gone\"}} 1",
            dead.trim_start_matches("http://")
        ),
        "tollgate_upstream_errors_total{kind=\"connect\",upstream=\"gone\"} 1".to_owned(),
    ] {
        assert!(metrics.contains(&needle), "{needle} in:\n{metrics}");
    }
}

/// Waits until `mock` has served `n` more requests; bounded (a guard against a hang).
async fn wait_for_requests(mock: &MockUpstream, n: usize) {
    let start = served(mock);
    for _ in 0..1000 {
        if served(mock) >= start + n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the endpoint got no requests");
}
