//! Quotas and caps that hold against an ordinary upstream: the key's cap sent upstream when a
//! request names none, `n` and vendor length fields in the reservation, a prompt bound that does
//! not run low for any script, and usage counts that cannot be read charged as estimates.

use serde_json::{json, Value};

use crate::common::{self, key_entry, ledger_path, read_ledger, TestGateway};
use mock_upstream::{MockOptions, MockUpstream};

const CHAT: &str = "/v1/chat/completions";

fn charged(lines: &[Value]) -> u64 {
    lines
        .iter()
        .map(|l| {
            l["prompt_tokens"].as_u64().unwrap_or(0) + l["completion_tokens"].as_u64().unwrap_or(0)
        })
        .sum()
}

/// An upstream that, like llama.cpp, generates far past any cap when a request names none.
async fn long_default_upstream() -> MockUpstream {
    MockUpstream::start_with(MockOptions {
        default_tokens: Some(40),
        ..MockOptions::default()
    })
    .await
    .expect("mock upstream")
}

/// The value of the metric line that starts with `series`, or 0 when it is not there.
fn metric(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// `body` with `members` inserted right after its opening brace.
fn with_members(body: &str, members: &str) -> String {
    let brace = body.find('{').expect("an object");
    format!("{}{members}{}", &body[..=brace], &body[brace + 1..])
}

/// A POST with `key` as the bearer token: status and body.
async fn post_as(url: &str, key: &str, body: &str) -> (u16, bytes::Bytes) {
    let auth = format!("Bearer {key}");
    let (status, _, bytes) = common::post(url, body, &[("authorization", &auth)]).await;
    (status, bytes)
}

#[tokio::test]
async fn a_request_without_max_tokens_is_sent_with_the_key_cap() {
    let upstream = long_default_upstream().await;
    let ledger = ledger_path();
    let quota = 300;
    let keys = key_entry(
        "capped",
        "tg-capped",
        &format!("max_tokens = 8\nquotas = [{{ tokens = {quota}, per = \"1h\" }}]"),
    );
    let tail = format!("{keys}\n[ledger]\npath = \"{}\"\n", ledger.display());
    let mut gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &tail)).await;

    // Odd spacing and member order, which must reach the upstream as sent.
    let body = |i: usize, stream: bool| {
        format!(
            "{{ \"model\" : \"m\",\n  \"messages\": [{{\"role\":\"user\", \"content\":\"request {i}\"}}], \"stream\": {stream} }}"
        )
    };
    let url = format!("{}{CHAT}", gateway.url());
    let answers = futures_util::future::join_all((0..15).map(|i| {
        let (url, body) = (url.clone(), body(i, i % 2 == 0));
        async move { (body.clone(), post_as(&url, "tg-capped", &body).await) }
    }))
    .await;

    let through_gateway = upstream.request_count();
    let sent: Vec<String> = upstream
        .requests()
        .iter()
        .map(|r| String::from_utf8(r.body.to_vec()).expect("UTF-8"))
        .collect();
    let mut admitted = 0;
    for (client_body, (status, got)) in &answers {
        if *status == 429 {
            continue;
        }
        assert_eq!(*status, 200, "{}", String::from_utf8_lossy(got));
        admitted += 1;
        let stream = client_body.contains("\"stream\": true");
        let capped = with_members(client_body, r#""max_tokens":8,"#);
        let expected_upstream = if stream {
            with_members(
                client_body,
                r#""stream_options":{"include_usage":true},"max_tokens":8,"#,
            )
        } else {
            capped.clone()
        };
        assert!(
            sent.contains(&expected_upstream),
            "the upstream got the client's bytes with the cap inserted:\n{expected_upstream}\nnot in\n{sent:#?}"
        );
        let direct = common::post(&format!("{}{CHAT}", upstream.url()), &capped, &[]).await;
        assert_eq!(
            got, &direct.2,
            "the client's answer is the upstream's answer to the capped request"
        );
    }
    assert!(admitted > 0, "some requests were admitted");
    assert_eq!(through_gateway, admitted, "refusals never went upstream");

    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_quota_overrun_tokens_total{key=\"capped\"}"
        ),
        0,
        "nothing generated past the reservation\n{metrics}"
    );
    gateway.begin_shutdown().await.expect("clean shutdown");
    let lines = read_ledger(&ledger);
    assert_eq!(lines.len(), admitted);
    assert!(
        lines.iter().all(|l| l["completion_tokens"] == 8),
        "every answer stopped at the cap: {lines:?}"
    );
    let total = charged(&lines);
    assert!(total <= quota, "charged {total} of a {quota}-token quota");
}

#[tokio::test]
async fn a_key_cap_without_quotas_binds_the_upstream_too() {
    let upstream = long_default_upstream().await;
    let keys = key_entry("cap-only", "tg-cap-only", "max_tokens = 5");
    let gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &keys)).await;
    let url = format!("{}{CHAT}", gateway.url());
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, got) = post_as(&url, "tg-cap-only", body).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&got).expect("JSON");
    assert_eq!(answer["usage"]["completion_tokens"], 5, "{answer}");

    // A request that names its own bound is sent as it is, whichever field it uses.
    for own in [
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":3}"#,
    ] {
        let before = upstream.request_count();
        let (status, _) = post_as(&url, "tg-cap-only", own).await;
        assert_eq!(status, 200);
        assert_eq!(&upstream.requests()[before].body[..], own.as_bytes());
    }
    // The key without a cap: nothing added.
    let before = upstream.request_count();
    let (status, _) = post_as(&url, common::TEST_KEY, body).await;
    assert_eq!(status, 200);
    assert_eq!(&upstream.requests()[before].body[..], body.as_bytes());
}

/// What a 429 says the request would have reserved ("… this request may need N; …").
fn needed(refusal: &Value) -> u64 {
    let detail = refusal["detail"].as_str().expect("a detail");
    detail
        .split("may need ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no need in {detail:?}"))
}

#[tokio::test]
async fn every_answer_a_request_asks_for_is_reserved() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry(
        "many",
        "tg-many",
        "max_tokens = 50\nquotas = [{ tokens = 100, per = \"1h\" }]",
    );
    let gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &keys)).await;
    let chat = format!("{}{CHAT}", gateway.url());
    let completions = format!("{}/v1/completions", gateway.url());
    let message = json!([{"role": "user", "content": "hi"}]);
    for (url, body, answers) in [
        (
            &chat,
            json!({"model": "m", "messages": message, "max_tokens": 8, "n": 200}),
            200,
        ),
        (
            &chat,
            json!({"model": "m", "messages": message, "max_tokens": 8, "n_cmpl": 20}),
            20,
        ),
        (
            &completions,
            json!({"model": "m", "prompt": "p", "max_tokens": 8, "n": 1, "best_of": 20}),
            20,
        ),
        (
            &completions,
            json!({"model": "m", "prompt": ["a", "b", "c"], "max_tokens": 20, "n": 2}),
            6,
        ),
    ] {
        let (status, got) = post_as(url, "tg-many", &body.to_string()).await;
        let refusal: Value = serde_json::from_slice(&got).expect("JSON");
        assert_eq!(status, 429, "{body}: {refusal}");
        assert_eq!(refusal["error"]["code"], "quota_exceeded");
        let completion = answers * body["max_tokens"].as_u64().expect("max_tokens");
        let need = needed(&refusal);
        assert!(
            need >= completion,
            "{body}: reserved {need} for {answers} answers of up to {} tokens",
            body["max_tokens"]
        );
    }
    assert_eq!(upstream.request_count(), 0, "refusals never went upstream");
    let body = json!({"model": "m", "messages": message, "max_tokens": 8});
    let (status, _) = post_as(&chat, "tg-many", &body.to_string()).await;
    assert_eq!(status, 200, "one answer fits");
}

#[tokio::test]
async fn max_n_caps_the_answers_a_key_may_ask_for() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry("few", "tg-few", "max_n = 2");
    let gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &keys)).await;
    let chat = format!("{}{CHAT}", gateway.url());
    let message = json!([{"role": "user", "content": "hi"}]);
    for (extra, param, code) in [
        (json!({"n": 3}), "n", "too_many_choices"),
        (json!({"n_cmpl": 3}), "n_cmpl", "too_many_choices"),
        (json!({"n": 1, "best_of": 3}), "best_of", "too_many_choices"),
        (json!({"n_cmpl": "3"}), "n_cmpl", "unbounded_field"),
        (json!({"n_cmpl": 2.5}), "n_cmpl", "unbounded_field"),
    ] {
        let mut body = json!({"model": "m", "messages": message});
        for (field, value) in extra.as_object().expect("object") {
            body[field] = value.clone();
        }
        let (status, got) = post_as(&chat, "tg-few", &body.to_string()).await;
        let refusal: Value = serde_json::from_slice(&got).expect("JSON");
        assert_eq!(status, 400, "{body}: {refusal}");
        assert_eq!(refusal["error"]["code"], code, "{refusal}");
        assert_eq!(refusal["error"]["type"], "invalid_request_error");
        assert_eq!(refusal["error"]["param"], param, "{refusal}");
        assert_eq!(refusal["status"], 400);
    }
    assert_eq!(upstream.request_count(), 0, "refusals never went upstream");
    let body = json!({"model": "m", "messages": message, "n": 2});
    let (status, _) = post_as(&chat, "tg-few", &body.to_string()).await;
    assert_eq!(status, 200);
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_rejections_total{key=\"few\",reason=\"too_many_choices\"}"
        ),
        3,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_prompt_in_any_script_is_reserved_in_full() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = ledger_path();
    let quota = 1000;
    let keys = key_entry(
        "cjk",
        "tg-cjk",
        &format!("max_tokens = 8\nquotas = [{{ tokens = {quota}, per = \"1h\" }}]"),
    );
    let tail = format!("{keys}\n[ledger]\npath = \"{}\"\n", ledger.display());
    let mut gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &tail)).await;
    // 300 CJK characters, which real tokenizers make about 300 tokens of (not 300 / 4).
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "漢".repeat(300)}], "max_tokens": 8})
        .to_string();
    let url = format!("{}{CHAT}", gateway.url());
    let statuses = futures_util::future::join_all((0..11).map(|_| {
        let (url, body) = (url.clone(), body.clone());
        async move {
            let (status, _, _) = common::post(
                &url,
                &body,
                &[
                    ("authorization", "Bearer tg-cjk"),
                    ("x-mock-prompt-tokens", "300"),
                ],
            )
            .await;
            status
        }
    }))
    .await;
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");

    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(&metrics, "tollgate_quota_overrun_tokens_total{key=\"cjk\"}"),
        0,
        "no request used more than it reserved\n{metrics}"
    );
    gateway.begin_shutdown().await.expect("clean shutdown");
    let lines = read_ledger(&ledger);
    assert!(
        lines.iter().all(|l| l["prompt_tokens"] == 300),
        "the upstream's count: {lines:?}"
    );
    let total = charged(&lines);
    assert!(total <= quota, "charged {total} of a {quota}-token quota");
}

#[tokio::test]
async fn vendor_length_fields_are_held_to_the_cap() {
    let upstream = long_default_upstream().await;
    let keys = key_entry(
        "vendor",
        "tg-vendor",
        "max_tokens = 8\nquotas = [{ tokens = 100000, per = \"1h\" }]",
    );
    let gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &keys)).await;
    let chat = format!("{}{CHAT}", gateway.url());
    let message = r#""messages":[{"role":"user","content":"hi"}]"#;
    for (fields, param, code) in [
        (
            r#""max_tokens":8,"n_predict":100000"#,
            "n_predict",
            "max_tokens_exceeded",
        ),
        (r#""n_predict":-1"#, "n_predict", "unbounded_field"),
        (
            r#""max_new_tokens":9"#,
            "max_new_tokens",
            "max_tokens_exceeded",
        ),
        (
            r#""options":{"num_predict":-2}"#,
            "options.num_predict",
            "unbounded_field",
        ),
        (
            r#""options":{"num_predict":50}"#,
            "options.num_predict",
            "max_tokens_exceeded",
        ),
    ] {
        let body = format!(r#"{{"model":"m",{message},{fields}}}"#);
        let (status, got) = post_as(&chat, "tg-vendor", &body).await;
        let refusal: Value = serde_json::from_slice(&got).expect("JSON");
        assert_eq!(status, 400, "{body}: {refusal}");
        assert_eq!(refusal["error"]["code"], code, "{body}: {refusal}");
        assert_eq!(refusal["error"]["param"], param, "{refusal}");
    }
    assert_eq!(upstream.request_count(), 0, "refusals never went upstream");

    // Within the cap, the request is sent with a max_tokens no larger than it asked for.
    for fields in [r#""n_predict":5"#, r#""options":{"num_predict":5}"#] {
        let body = format!(r#"{{"model":"m",{message},{fields}}}"#);
        let before = upstream.request_count();
        let (status, got) = post_as(&chat, "tg-vendor", &body).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&got));
        assert_eq!(
            String::from_utf8_lossy(&upstream.requests()[before].body),
            with_members(&body, r#""max_tokens":5,"#)
        );
    }
}

#[tokio::test]
async fn an_unreadable_usage_count_is_estimated_and_counted_never_zero() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let ledger = ledger_path();
    let tail = format!("[ledger]\npath = \"{}\"\n", ledger.display());
    let mut gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &tail)).await;
    let before = gateway.metrics().await;
    for kind in ["prompt", "completion"] {
        let series = format!("tollgate_usage_unreadable_counts_total{{kind=\"{kind}\"}} 0");
        assert!(
            before.contains(&series),
            "exported at 0 from the start: {series}"
        );
    }

    let counts = [r#""100""#, "-100", "100.5"];
    let url = format!("{}{CHAT}", gateway.url());
    for count in counts {
        let usage =
            format!(r#"{{"prompt_tokens":5,"completion_tokens":{count},"total_tokens":105}}"#);
        for stream in [false, true] {
            let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream})
                .to_string();
            let headers = [("x-mock-usage", usage.as_str())];
            let (status, _, got) = common::post(&url, &body, &headers).await;
            assert_eq!(status, 200);
            let direct = common::post(&format!("{}{CHAT}", upstream.url()), &body, &headers).await;
            assert_eq!(got, direct.2, "the client's answer is unchanged");
        }
    }
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "tollgate_usage_unreadable_counts_total{kind=\"completion\"}"
        ),
        2 * counts.len() as u64,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "tollgate_usage_unreadable_counts_total{kind=\"prompt\"}"
        ),
        0
    );
    gateway.begin_shutdown().await.expect("clean shutdown");
    // The mock's 8 tokens, "tok0 " … "tok7 ": 40 characters of text, ~4 a token.
    let estimate = tollgate::accounting::usage::estimate_tokens_from_chars(40);
    let lines = read_ledger(&ledger);
    assert_eq!(lines.len(), 2 * counts.len());
    for line in &lines {
        assert_eq!(
            line["prompt_tokens"], 5,
            "the readable count is kept: {line}"
        );
        assert_eq!(
            line["completion_tokens"], estimate,
            "the unreadable one estimated, never 0: {line}"
        );
        assert_eq!(line["source"], "estimated", "{line}");
    }
}
