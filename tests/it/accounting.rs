//! Token accounting and quotas: every token counted once, no quota overrun, nothing lost on
//! restart.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::MockUpstream;
use serde_json::{json, Value};

use crate::common::{self, key_entry, ledger_path, read_ledger, TestGateway};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// One request of the mixed workload, and what the client must see.
struct Case {
    id: String,
    path: &'static str,
    body: Value,
    headers: Vec<(&'static str, String)>,
    /// Events to read before hanging up; `None` reads to the end.
    leave_after: Option<usize>,
}

fn messages(i: usize) -> Value {
    json!([
        {"role": "system", "content": "You count tokens carefully."},
        {"role": "user", "content": format!("request number {i} with a few words")}
    ])
}

/// Request `i` of the mix: JSON, streams with and without include_usage, completions, tools,
/// clients that leave early and upstreams that break off.
fn case(i: usize) -> Case {
    let id = format!("mix-{i}");
    let tokens = 3 + i % 7;
    let mut headers = vec![("x-request-id", id.clone())];
    let (path, body, leave_after) = match i % 8 {
        0 => (
            CHAT,
            json!({"model": "m", "messages": messages(i), "max_tokens": tokens}),
            None,
        ),
        1 => (
            CHAT,
            json!({"model": "m", "messages": messages(i), "max_tokens": tokens, "stream": true}),
            None,
        ),
        2 => (
            CHAT,
            json!({"model": "m", "messages": messages(i), "max_tokens": tokens, "stream": true, "stream_options": {"include_usage": true}}),
            None,
        ),
        3 => (
            COMPLETIONS,
            json!({"model": "m", "prompt": format!("prompt {i} words"), "max_tokens": tokens, "stream": true}),
            None,
        ),
        4 => {
            headers.push(("x-mock-tools", "1".into()));
            (
                CHAT,
                json!({"model": "m", "messages": messages(i), "max_tokens": tokens, "stream": true}),
                None,
            )
        }
        5 => {
            headers.push(("x-mock-chunk-delay-ms", "5".into()));
            (
                CHAT,
                json!({"model": "m", "messages": messages(i), "max_tokens": 40, "stream": true}),
                Some(1 + i % 5),
            )
        }
        6 => {
            headers.push(("x-mock-fault", format!("abort-after={}", 1 + i % 4)));
            (
                CHAT,
                json!({"model": "m", "messages": messages(i), "max_tokens": tokens, "stream": true}),
                None,
            )
        }
        _ => (
            COMPLETIONS,
            json!({"model": "m", "prompt": [format!("p {i}"), "second prompt"], "max_tokens": tokens}),
            None,
        ),
    };
    Case {
        id,
        path,
        body,
        headers,
        leave_after,
    }
}

/// Sends a case; returns the bytes the client got (`None` if it hung up or the stream broke).
async fn run(base: &str, case: &Case) -> Option<Vec<u8>> {
    let mut request = common::client()
        .post(format!("{base}{}", case.path))
        .header("content-type", "application/json")
        .body(case.body.to_string());
    for (name, value) in &case.headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.ok()?;
    let mut stream = response.bytes_stream();
    let mut got = Vec::new();
    let mut events = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.ok()?;
        events += chunk.windows(2).filter(|w| w == b"\n\n").count();
        got.extend_from_slice(&chunk);
        if case.leave_after.is_some_and(|n| events >= n) {
            return None;
        }
    }
    Some(got)
}

/// What the upstream reports for `case`: the same request answered directly, as JSON.
async fn reported_usage(upstream: &MockUpstream, case: &Case) -> (u64, u64) {
    let mut body = case.body.clone();
    body["stream"] = json!(false);
    body.as_object_mut().map(|b| b.remove("stream_options"));
    let headers: Vec<(&str, &str)> = case
        .headers
        .iter()
        .filter(|(name, _)| name.starts_with("x-mock-tools"))
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    let (_, _, bytes) = common::post(
        &format!("{}{}", upstream.url(), case.path),
        &body.to_string(),
        &headers,
    )
    .await;
    let answer: Value = serde_json::from_slice(&bytes).expect("JSON answer");
    (
        answer["usage"]["prompt_tokens"]
            .as_u64()
            .expect("prompt_tokens"),
        answer["usage"]["completion_tokens"]
            .as_u64()
            .expect("completion_tokens"),
    )
}

#[tokio::test]
async fn a_mixed_workload_is_charged_exactly_once_per_request_as_reported_or_estimated() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = ledger_path();
    let keys = key_entry(
        "acct",
        "tg-acct",
        "max_tokens = 100\nquotas = [{ tokens = 100000000, per = \"1d\" }]",
    );
    let tail = format!("{keys}\n[ledger]\npath = \"{}\"\n", ledger.display());
    let mut gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &tail)).await;
    let base = gateway.url();

    let cases: Vec<Case> = (0..240).map(case).collect();
    let mut seen: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    for batch in cases.chunks(16) {
        let results = futures_util::future::join_all(batch.iter().map(|c| {
            let base = base.clone();
            async move {
                let mut with_key = Case {
                    id: c.id.clone(),
                    path: c.path,
                    body: c.body.clone(),
                    headers: c.headers.clone(),
                    leave_after: c.leave_after,
                };
                with_key
                    .headers
                    .push(("authorization", "Bearer tg-acct".into()));
                (c.id.clone(), run(&base, &with_key).await)
            }
        }))
        .await;
        seen.extend(results);
    }

    // Client-visible bytes: what a direct request would have given (injected usage removed).
    for case in cases
        .iter()
        .filter(|c| c.leave_after.is_none() && !c.headers.iter().any(|(n, _)| *n == "x-mock-fault"))
    {
        let headers: Vec<(&str, &str)> =
            case.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let direct = common::post(
            &format!("{}{}", upstream.url(), case.path),
            &case.body.to_string(),
            &headers,
        )
        .await;
        let through = seen[&case.id].as_ref().expect("complete answer");
        assert_eq!(
            through,
            &direct.2.to_vec(),
            "{}: client bytes differ from direct",
            case.id
        );
    }

    // Every request settles before its in-flight slot is released; then the figures are final.
    assert!(
        gateway
            .wait_for_metric(
                "tollgate_inflight_requests{key=\"acct\"} 0",
                Duration::from_secs(10)
            )
            .await,
        "every request finished"
    );
    let metrics = gateway.metrics().await;
    gateway.begin_shutdown().await.expect("clean shutdown");
    let lines = read_ledger(&ledger);
    let by_id: HashMap<&str, &Value> = lines
        .iter()
        .map(|l| (l["request_id"].as_str().expect("id"), l))
        .collect();
    assert_eq!(lines.len(), cases.len(), "one ledger line per request");
    assert_eq!(by_id.len(), cases.len(), "no request charged twice");

    let (mut reported, mut estimated) = (0u64, 0u64);
    for case in &cases {
        let line = by_id[case.id.as_str()];
        let charged = line["prompt_tokens"].as_u64().expect("n")
            + line["completion_tokens"].as_u64().expect("n");
        let broke = case.headers.iter().any(|(n, _)| *n == "x-mock-fault");
        if case.leave_after.is_some() || broke {
            assert_eq!(
                line["source"], "estimated",
                "{}: no usage arrived: {line}",
                case.id
            );
            let prompt = tollgate::accounting::usage::estimate_prompt_tokens(
                case.body.to_string().as_bytes(),
            );
            assert!(
                charged >= prompt,
                "{}: at least the prompt estimate is charged: {line}",
                case.id
            );
            let outcome = if broke {
                "upstream_error"
            } else {
                "client_gone"
            };
            assert_eq!(line["outcome"], outcome, "{}", case.id);
            estimated += charged;
        } else {
            let (prompt, completion) = reported_usage(&upstream, case).await;
            assert_eq!(line["source"], "reported", "{}: {line}", case.id);
            assert_eq!(
                line["prompt_tokens"], prompt,
                "{}: prompt tokens as reported",
                case.id
            );
            assert_eq!(
                line["completion_tokens"], completion,
                "{}: completion tokens as reported",
                case.id
            );
            assert_eq!(line["status"], 200);
            assert_eq!(
                line["outcome"], "complete",
                "{}: delivered whole: {line}",
                case.id
            );
            reported += charged;
        }
        assert_eq!(line["key"], "acct");
    }
    assert!(estimated > 0 && reported > 0, "both kinds occurred");

    let total: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_tokens_total{") && l.contains("key=\"acct\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        total,
        reported + estimated,
        "metrics charge what the ledger says"
    );
    let window = format!(
        "tollgate_quota_used_tokens{{key=\"acct\",window=\"1d\"}} {}",
        reported + estimated
    );
    assert!(
        metrics.contains(&window),
        "the quota window holds the same sum: {window}\n{metrics}"
    );
}

#[tokio::test]
async fn two_hundred_concurrent_requests_never_charge_more_than_the_quota() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = ledger_path();
    let quota = 1500u64;
    let keys = key_entry(
        "small",
        "tg-small",
        &format!("max_tokens = 40\nquotas = [{{ tokens = {quota}, per = \"1h\" }}]"),
    );
    let tail = format!("{keys}\n[ledger]\npath = \"{}\"\n", ledger.display());
    let mut gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &tail)).await;
    let base = gateway.url();

    let statuses = futures_util::future::join_all((0..200).map(|i| {
        let base = base.clone();
        async move {
            let stream = i % 2 == 0;
            let response = common::client()
                .post(format!("{base}{CHAT}"))
                .header("authorization", "Bearer tg-small")
                .header("content-type", "application/json")
                .header("x-mock-chunk-delay-ms", "2")
                .body(json!({"model": "m", "messages": messages(i), "max_tokens": 20, "stream": stream}).to_string())
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").cloned();
            let _ = response.bytes().await;
            (status, retry_after)
        }
    }))
    .await;
    let admitted = statuses.iter().filter(|(s, _)| *s == 200).count();
    let refused = statuses.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(admitted + refused, 200, "only 200s and 429s: {statuses:?}");
    assert!(
        admitted > 10 && refused > 10,
        "the quota bound: {admitted} admitted, {refused} refused"
    );
    assert!(
        statuses
            .iter()
            .filter(|(s, _)| *s == 429)
            .all(|(_, r)| r.is_some()),
        "every 429 has Retry-After"
    );

    gateway.begin_shutdown().await.expect("clean shutdown");
    let charged: u64 = read_ledger(&ledger)
        .iter()
        .map(|l| {
            l["prompt_tokens"].as_u64().unwrap_or(0) + l["completion_tokens"].as_u64().unwrap_or(0)
        })
        .sum();
    assert!(charged <= quota, "charged {charged} > quota {quota}");
    assert!(
        charged > quota / 2,
        "the quota was actually used: {charged}"
    );
    assert_eq!(
        upstream.request_count(),
        admitted,
        "refused requests never reached the upstream"
    );
}

#[tokio::test]
async fn quota_refusals_carry_the_window_reset_and_token_headers() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry("q", "tg-q", "max_tokens = 50\nquotas = [{ tokens = 120, per = \"1m\" }, { tokens = 1000, per = \"1d\" }]");
    let gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &keys)).await;
    let send = |max_tokens: u64| {
        let url = format!("{}{CHAT}", gateway.url());
        async move {
            let response = common::client()
                .post(url)
                .header("authorization", "Bearer tg-q")
                .header("content-type", "application/json")
                .body(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}).to_string())
                .send()
                .await
                .expect("request");
            let headers = response.headers().clone();
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, headers, body)
        }
    };
    let (status, headers, _) = send(40).await;
    assert_eq!(status, 200);
    let header = |h: &reqwest::header::HeaderMap, name: &str| {
        h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    assert_eq!(
        header(&headers, "x-ratelimit-limit-tokens").as_deref(),
        Some("120"),
        "tightest window"
    );
    assert!(header(&headers, "x-ratelimit-remaining-tokens").is_some());
    let policies: Vec<_> = headers
        .get_all("ratelimit-policy")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(
        policies
            .iter()
            .any(|p| p.contains("\"tokens-1m\";q=120;w=60")),
        "{policies:?}"
    );
    assert!(
        policies
            .iter()
            .any(|p| p.contains("\"tokens-1d\";q=1000;w=86400")),
        "{policies:?}"
    );

    // The mock answered with 40 completion tokens (+1 prompt); 41 charged + the next request's
    // worst case (its prompt bound, 42, + 50) > 120.
    let (status, headers, body) = send(50).await;
    assert_eq!(status, 429, "{body}");
    let retry_after: u64 = header(&headers, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(
        (1..=60).contains(&retry_after),
        "the minute window resets within 60 s: {retry_after}"
    );
    assert_eq!(body["error"]["code"], "quota_exceeded");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("1m window")),
        "{body}"
    );
    assert_eq!(
        header(&headers, "x-ratelimit-limit-tokens").as_deref(),
        Some("120")
    );
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("tollgate_rejections_total{key=\"q\",reason=\"quota\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_upstream_that_ignores_max_tokens_is_counted_as_an_overrun() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry(
        "o",
        "tg-o",
        "max_tokens = 100\nquotas = [{ tokens = 100000, per = \"1d\" }]",
    );
    let gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &keys)).await;
    // Asks for 5 tokens; the upstream sends 60.
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
            .to_string();
    let reserved = tollgate::accounting::usage::prompt_token_bound(body.as_bytes()) + 5;
    let (status, _, _) = common::post(
        &format!("{}{CHAT}", gateway.url()),
        &body,
        &[("authorization", "Bearer tg-o"), ("x-mock-chunks", "60")],
    )
    .await;
    assert_eq!(status, 200);
    let metrics = gateway.metrics().await;
    let overrun = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_quota_overrun_tokens_total{key=\"o\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .expect("overrun counted");
    // The mock reports 1 prompt token ("hi") and 60 completion tokens.
    assert_eq!(overrun, 61 - reserved, "used beyond what was reserved");
}

#[tokio::test]
async fn usage_injection_asks_upstream_and_can_be_switched_off() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 4, "stream": true}).to_string();
    for inject in [true, false] {
        let ledger = ledger_path();
        let tail = format!("[ledger]\npath = \"{}\"\n", ledger.display());
        let extra = format!("inject_usage = {inject}");
        let mut gateway =
            TestGateway::start_toml(&common::config_toml(&upstream.url(), "", &extra, &tail)).await;
        let before = upstream.request_count();
        let (status, _, got) = common::post(&format!("{}{CHAT}", gateway.url()), &body, &[]).await;
        assert_eq!(status, 200);
        let direct = common::post(&format!("{}{CHAT}", upstream.url()), &body, &[]).await;
        assert_eq!(
            got, direct.2,
            "inject={inject}: the client sees the direct stream"
        );
        let sent = &upstream.requests()[before];
        let sent: Value = serde_json::from_slice(&sent.body).expect("JSON");
        assert_eq!(
            sent["stream_options"]["include_usage"].as_bool(),
            inject.then_some(true),
            "inject={inject}: what the upstream was asked"
        );
        gateway.begin_shutdown().await.expect("shutdown");
        let line = read_ledger(&ledger).pop().expect("a ledger line");
        assert_eq!(
            line["source"],
            if inject { "reported" } else { "estimated" },
            "{line}"
        );
        if inject {
            assert_eq!(line["completion_tokens"], 4, "exact usage: {line}");
        }
    }
}

#[tokio::test]
async fn charged_usage_survives_sigterm_and_sigkill_restarts() {
    use std::process::{Command, Stdio};
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let state = common::state_path();
    let port = common::closed_port();
    let admin_port = common::closed_port();
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        config.path(),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
             [upstream]\nurl = \"{}\"\n[state]\npath = \"{}\"\nflush_interval = \"200ms\"\n{}",
            upstream.url(),
            state.display(),
            key_entry(
                "r",
                "tg-r",
                "max_tokens = 100\nquotas = [{ tokens = 1000000, per = \"30d\" }]"
            )
        ),
    )
    .expect("write config");
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gateway")
    };
    let used = || async {
        let client = reqwest::Client::new();
        for _ in 0..100 {
            if let Ok(response) = client
                .get(format!("http://127.0.0.1:{admin_port}/metrics"))
                .send()
                .await
            {
                let text = response.text().await.unwrap_or_default();
                return text
                    .lines()
                    .find(|l| l.starts_with("tollgate_quota_used_tokens{key=\"r\",window=\"30d\"}"))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway did not come up");
    };
    let request = || async {
        let client = reqwest::Client::new();
        for _ in 0..100 {
            let sent = client
                .post(format!("http://127.0.0.1:{port}{CHAT}"))
                .header("authorization", "Bearer tg-r")
                .header("content-type", "application/json")
                .body(json!({"model": "m", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 10}).to_string())
                .send()
                .await;
            if let Ok(response) = sent {
                assert_eq!(response.status(), 200);
                let _ = response.bytes().await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway did not come up");
    };

    let child = start();
    for _ in 0..3 {
        request().await;
    }
    let charged = used().await;
    assert!(charged > 0, "usage charged");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("SIGTERM");
    let exit = tokio::task::spawn_blocking(move || {
        let mut c = child;
        c.wait()
    })
    .await
    .expect("join")
    .expect("exit");
    assert!(exit.success(), "clean exit on SIGTERM");

    let child = start();
    request().await; // also makes the gauge report the window
    let after_term = used().await;
    assert!(
        after_term > charged,
        "usage before SIGTERM kept: {charged} then {after_term}"
    );

    // SIGKILL: what was settled more than flush_interval ago is on disk.
    tokio::time::sleep(Duration::from_millis(600)).await;
    Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status()
        .expect("SIGKILL");
    let _ = tokio::task::spawn_blocking(move || {
        let mut c = child;
        c.wait()
    })
    .await;
    let child = start();
    request().await;
    let after_kill = used().await;
    assert!(
        after_kill > after_term,
        "usage before SIGKILL kept: {after_term} then {after_kill}"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("SIGTERM");
    let _ = tokio::task::spawn_blocking(move || {
        let mut c = child;
        c.wait()
    })
    .await;
}

#[tokio::test]
async fn a_stream_cut_at_the_shutdown_deadline_is_charged_once() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = ledger_path();
    let tail = format!("[ledger]\npath = \"{}\"\n", ledger.display());
    let mut gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "shutdown_timeout = \"300ms\"",
        "",
        &tail,
    ))
    .await;
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true});
    let response = common::client()
        .post(format!("{}{CHAT}", gateway.url()))
        .header("x-mock-chunks", "100")
        .header("x-mock-chunk-delay-ms", "100")
        .json(&body)
        .send()
        .await
        .expect("headers arrive");
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("a first event").expect("bytes");
    assert!(first.starts_with(b"data: "), "streaming has begun");

    let started = std::time::Instant::now();
    let done = gateway.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .expect("shutdown ends soon after its deadline, not with the 10 s stream")
        .expect("server task ends cleanly");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the stream had its shutdown_timeout to finish"
    );
    let mut rest = Vec::new();
    let mut broken = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => rest.extend_from_slice(&bytes),
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    assert!(
        broken || !String::from_utf8_lossy(&rest).contains("[DONE]"),
        "the client sees the stream cut, not a clean end"
    );
    let lines = read_ledger(&ledger);
    assert_eq!(lines.len(), 1, "the cut request is charged once: {lines:?}");
    assert_eq!(lines[0]["outcome"], "client_gone", "{}", lines[0]);
}
