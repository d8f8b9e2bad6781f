//! OpenTelemetry traces: the spans the gateway exports, as an OTLP/HTTP receiver in the test
//! decodes them — a JSON request, a stream, refusals (401, 429, 400) and an upstream failure,
//! with their GenAI attributes and token counts equal to the mock upstream's usage; a client's
//! `traceparent` continued and the gateway's reaching the upstream; sampling at 0.0; and a dead
//! or hanging collector that changes no answer while the dropped-span count rises; a failover
//! that is a second attempt span.

use std::time::Duration;

use mock_upstream::MockUpstream;
use serde_json::Value;

use crate::common::otlp::{OtlpReceiver, Received, CLIENT, SERVER};
use crate::common::{self, key_entry, TestGateway, TEST_KEY};

const CHAT: &str = "/v1/chat/completions";
const WAIT: Duration = Duration::from_secs(20);
const LIMITED_KEY: &str = "tg-limited-key";
/// A client's trace: sampled (flags 01).
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A gateway in front of `upstream` exporting to `collector`, with `telemetry` lines added to
/// `[telemetry]`, the key `test` and the key `limited` (1 request an hour, `max_tokens` ≤ 10).
async fn gateway(upstream: &str, collector: &str, telemetry: &str) -> TestGateway {
    let limited = key_entry(
        "limited",
        LIMITED_KEY,
        "max_tokens = 10\nrate = { requests = 1, per = \"1h\" }",
    );
    let tail = format!(
        "{limited}\n[telemetry]\notlp_endpoint = \"{collector}\"\nservice_name = \"gw-under-test\"\n\
         batch_delay = \"20ms\"\n{telemetry}\n"
    );
    TestGateway::start_toml(&common::config_toml(upstream, "", "", &tail)).await
}

/// A mock upstream, a receiver, and a gateway between them.
async fn traced(telemetry: &str) -> (MockUpstream, OtlpReceiver, TestGateway) {
    let mock = MockUpstream::start().await.expect("mock");
    let receiver = OtlpReceiver::start().await;
    let gateway = gateway(&mock.url(), &receiver.url(), telemetry).await;
    (mock, receiver, gateway)
}

fn chat_json(max_tokens: u32) -> String {
    format!(
        r#"{{"model":"mock-model","messages":[{{"role":"user","content":"Say hello to the gateway"}}],"max_tokens":{max_tokens}}}"#
    )
}

/// The spans of the trace `trace_id`, once `n` of them have come.
async fn trace_of(
    receiver: &OtlpReceiver,
    n: usize,
    pick: impl Fn(&Received) -> bool,
) -> Vec<Received> {
    let spans = receiver
        .wait_for(|spans| spans.iter().filter(|s| pick(s)).count() >= n, WAIT)
        .await;
    let picked: Vec<Received> = spans.into_iter().filter(|s| pick(s)).collect();
    assert!(picked.len() >= n, "{n} spans expected, got {picked:#?}");
    picked
}

fn one(spans: &[Received], kind: i32) -> &Received {
    let found: Vec<&Received> = spans.iter().filter(|s| s.kind() == kind).collect();
    assert_eq!(found.len(), 1, "one span of kind {kind}: {spans:#?}");
    found[0]
}

fn attr(span: &Received, key: &str) -> String {
    span.attr(key)
        .unwrap_or_else(|| panic!("{key} missing from {:?}: {:#?}", span.name(), span.attrs()))
}

/// No attribute holds a key, the prompt or the answer.
fn nothing_secret(spans: &[Received]) {
    for span in spans {
        for (key, value) in span.attrs() {
            for secret in [TEST_KEY, LIMITED_KEY, "Say hello", "Bearer"] {
                assert!(!value.contains(secret), "{key}={value} leaks {secret}");
            }
        }
    }
}

/// The `traceparent` the mock's `i`th request came with.
fn upstream_traceparent(mock: &MockUpstream, i: usize) -> String {
    let requests = mock.requests();
    let request = requests.get(i).expect("the upstream got the request");
    request
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no traceparent upstream: {:?}", request.headers))
        .to_owned()
}

#[tokio::test]
async fn a_json_request_has_a_server_and_a_client_span_with_the_genai_attributes() {
    let (mock, receiver, gateway) = traced("").await;
    let (status, _, body) =
        common::post(&format!("{}{CHAT}", gateway.url()), &chat_json(7), &[]).await;
    assert_eq!(status, 200, "{body:?}");
    let spans = trace_of(&receiver, 2, |_| true).await;
    let server = one(&spans, SERVER);
    let client = one(&spans, CLIENT);
    let (prompt, completion) = mock.reported_tokens();
    assert!(prompt > 0 && completion > 0, "the mock reported usage");

    assert_eq!(server.service, "gw-under-test", "service.name");
    assert_eq!(server.name(), "chat mock-model");
    for (key, value) in [
        ("gen_ai.operation.name", "chat".to_owned()),
        ("gen_ai.request.model", "mock-model".to_owned()),
        ("gen_ai.request.max_tokens", "7".to_owned()),
        ("gen_ai.response.model", "mock-model".to_owned()),
        ("gen_ai.response.finish_reasons", "length".to_owned()),
        ("gen_ai.usage.input_tokens", prompt.to_string()),
        ("gen_ai.usage.output_tokens", completion.to_string()),
        ("tollgate.usage.source", "reported".to_owned()),
        ("http.request.method", "POST".to_owned()),
        ("http.response.status_code", "200".to_owned()),
        ("tollgate.key", "test".to_owned()),
        ("tollgate.upstream", "default".to_owned()),
    ] {
        assert_eq!(attr(server, key), value, "server span's {key}");
    }
    assert_eq!(server.attr("error.type"), None, "no error");
    assert!(server.parent_id().is_empty(), "a trace that starts here");

    assert_eq!(client.trace_id(), server.trace_id(), "one trace");
    assert_eq!(
        client.parent_id(),
        server.span_id(),
        "the attempt is the request's child"
    );
    assert_eq!(attr(client, "server.address"), "127.0.0.1");
    assert_eq!(attr(client, "server.port"), mock.addr().port().to_string());
    assert_eq!(attr(client, "http.response.status_code"), "200");
    assert_eq!(
        upstream_traceparent(&mock, 0),
        format!("00-{}-{}-01", client.trace_id(), client.span_id()),
        "the upstream joins the trace under the attempt"
    );
    nothing_secret(&spans);
}

#[tokio::test]
async fn a_stream_marks_its_first_token_and_counts_the_streamed_usage() {
    let (mock, receiver, gateway) = traced("").await;
    let url = format!("{}{CHAT}", gateway.url());
    let (status, _, body) = common::post(&url, &common::chat_body(true, true), &[]).await;
    assert_eq!(status, 200);
    assert!(body.ends_with(b"data: [DONE]\n\n"), "the whole stream came");
    let spans = trace_of(&receiver, 2, |_| true).await;
    let server = one(&spans, SERVER);
    let (prompt, completion) = mock.reported_tokens();
    assert_eq!(
        attr(server, "gen_ai.usage.input_tokens"),
        prompt.to_string()
    );
    assert_eq!(
        attr(server, "gen_ai.usage.output_tokens"),
        completion.to_string()
    );
    assert_eq!(attr(server, "tollgate.usage.source"), "reported");
    assert_eq!(attr(server, "gen_ai.response.model"), "mock-model");
    assert_eq!(attr(server, "gen_ai.response.finish_reasons"), "stop");
    let events: Vec<&str> = server.span.events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        events,
        ["gen_ai.first_token"],
        "the first streamed byte is marked"
    );
    let first = server.span.events[0].time_unix_nano;
    assert!(
        (server.span.start_time_unix_nano..=server.span.end_time_unix_nano).contains(&first),
        "the first token comes within the request"
    );

    // The legacy endpoint is a text completion.
    let completions = format!("{}/v1/completions", gateway.url());
    let (status, _, _) = common::post(&completions, &common::completions_body(false), &[]).await;
    assert_eq!(status, 200);
    let spans = trace_of(&receiver, 1, |s| s.name().starts_with("text_completion")).await;
    let server = one(&spans, SERVER);
    assert_eq!(server.name(), "text_completion mock-model");
    assert_eq!(attr(server, "gen_ai.operation.name"), "text_completion");
    assert_eq!(attr(server, "gen_ai.request.max_tokens"), "5");
}

#[tokio::test]
async fn refusals_are_spans_with_their_reason() {
    let (mock, receiver, gateway) = traced("").await;
    let url = format!("{}{CHAT}", gateway.url());
    let bad_key = [("authorization", "Bearer tg-not-a-key")];
    let (status, _, _) = common::post(&url, &chat_json(5), &bad_key).await;
    assert_eq!(status, 401);
    let limited = format!("Bearer {LIMITED_KEY}");
    let limited = [("authorization", limited.as_str())];
    let (status, _, _) = common::post(&url, &chat_json(100), &limited).await;
    assert_eq!(status, 400, "over the key's max_tokens");
    let (status, _, _) = common::post(&url, &chat_json(5), &limited).await;
    assert_eq!(status, 429, "past the key's rate");

    let spans = trace_of(&receiver, 3, |s| s.kind() == SERVER).await;
    assert_eq!(mock.request_count(), 0, "nothing reached the upstream");
    assert!(
        spans.iter().all(|s| s.kind() == SERVER),
        "no attempt span for a refusal"
    );
    let by_status = |code: &str| {
        spans
            .iter()
            .find(|s| s.attr("http.response.status_code").as_deref() == Some(code))
            .unwrap_or_else(|| panic!("a {code} span in {spans:#?}"))
    };
    let unauthorized = by_status("401");
    assert_eq!(attr(unauthorized, "error.type"), "invalid_api_key");
    assert_eq!(unauthorized.attr("tollgate.key"), None, "no key is known");
    let too_long = by_status("400");
    assert_eq!(attr(too_long, "error.type"), "max_tokens_exceeded");
    assert_eq!(attr(too_long, "tollgate.key"), "limited");
    assert_eq!(attr(too_long, "gen_ai.request.max_tokens"), "100");
    assert_eq!(
        too_long.attr("gen_ai.usage.input_tokens"),
        None,
        "nothing charged"
    );
    let limited = by_status("429");
    assert_eq!(attr(limited, "error.type"), "rate_limit_exceeded");
    assert_eq!(attr(limited, "tollgate.key"), "limited");
    nothing_secret(&spans);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_failed_attempt_and_a_502_span() {
    let receiver = OtlpReceiver::start().await;
    let dead = format!("http://127.0.0.1:{}", common::closed_port());
    let gateway = gateway(&dead, &receiver.url(), "").await;
    let (status, _, _) =
        common::post(&format!("{}{CHAT}", gateway.url()), &chat_json(5), &[]).await;
    assert_eq!(status, 502);
    let spans = trace_of(&receiver, 2, |_| true).await;
    let server = one(&spans, SERVER);
    let client = one(&spans, CLIENT);
    assert_eq!(attr(server, "http.response.status_code"), "502");
    assert_eq!(attr(server, "error.type"), "upstream_unreachable");
    assert_eq!(
        server.span.status.as_ref().map(|s| s.code),
        Some(2),
        "status ERROR"
    );
    assert_eq!(attr(client, "error.type"), "connect");
    assert_eq!(client.parent_id(), server.span_id());
}

#[tokio::test]
async fn a_client_trace_is_continued_and_reaches_the_upstream() {
    let (mock, receiver, gateway) = traced("").await;
    let parent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let headers = [
        ("traceparent", parent.as_str()),
        ("tracestate", "vendor=abc"),
    ];
    let (status, _, _) =
        common::post(&format!("{}{CHAT}", gateway.url()), &chat_json(5), &headers).await;
    assert_eq!(status, 200);
    let spans = trace_of(&receiver, 2, |_| true).await;
    let server = one(&spans, SERVER);
    let client = one(&spans, CLIENT);
    assert_eq!(server.trace_id(), CLIENT_TRACE, "the client's trace");
    assert_eq!(server.parent_id(), CLIENT_SPAN, "under the client's span");
    assert_eq!(server.span.trace_state, "vendor=abc");
    let upstream = &mock.requests()[0];
    assert_eq!(
        upstream_traceparent(&mock, 0),
        format!("00-{CLIENT_TRACE}-{}-01", client.span_id()),
        "the gateway's attempt, not the client's span, is the upstream's parent"
    );
    assert_eq!(upstream.headers["tracestate"], "vendor=abc");
}

#[tokio::test]
async fn sampling_at_zero_exports_nothing_but_a_sampled_client_trace() {
    let (mock, receiver, gateway) = traced("sample_ratio = 0.0").await;
    let url = format!("{}{CHAT}", gateway.url());
    for _ in 0..5 {
        let (status, _, _) = common::post(&url, &chat_json(5), &[]).await;
        assert_eq!(status, 200);
    }
    // Unsampled traces still reach the upstream as one trace, flagged not sampled.
    for i in 0..5 {
        let parent = upstream_traceparent(&mock, i);
        assert!(
            parent.starts_with("00-") && parent.ends_with("-00"),
            "{parent}"
        );
    }
    // Parent-based: a client's sampled trace is kept. It comes after the five, so once it is
    // here, anything of theirs would be too.
    let parent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let (status, _, _) = common::post(&url, &chat_json(5), &[("traceparent", &parent)]).await;
    assert_eq!(status, 200);
    let spans = receiver.wait_for(|spans| spans.len() >= 2, WAIT).await;
    assert_eq!(
        spans.len(),
        2,
        "only the sampled request's two spans: {spans:#?}"
    );
    assert!(spans.iter().all(|s| s.trace_id() == CLIENT_TRACE));
}

/// A collector that takes connections and never answers.
async fn hanging_collector() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (url, task)
}

/// The count of `tollgate_trace_spans_dropped_total{reason}` in `metrics`.
fn dropped(metrics: &str, reason: &str) -> u64 {
    let series = format!("tollgate_trace_spans_dropped_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not exported"))
}

#[tokio::test]
async fn a_dead_or_hanging_collector_changes_no_answer_and_the_dropped_spans_are_counted() {
    // Dead: nothing listens. The batches fail, and their spans are counted.
    let mock = MockUpstream::start().await.expect("mock");
    let dead = format!("http://127.0.0.1:{}", common::closed_port());
    let gateway = gateway(&mock.url(), &dead, "").await;
    let metrics = gateway.metrics().await;
    for reason in ["queue_full", "export_failed", "closed"] {
        assert_eq!(
            dropped(&metrics, reason),
            0,
            "{reason} exported at 0 from the start"
        );
    }
    let url = format!("{}{CHAT}", gateway.url());
    for _ in 0..3 {
        let (status, _, body) = common::post(&url, &chat_json(5), &[]).await;
        assert_eq!(status, 200);
        let json: Value = serde_json::from_slice(&body).expect("JSON");
        assert!(json["usage"]["total_tokens"].as_u64() > Some(0), "{json}");
    }
    assert!(
        gateway
            .wait_for_metrics(|m| dropped(m, "export_failed") >= 6, WAIT)
            .await,
        "the 6 spans of 3 requests are counted as lost"
    );

    // Hanging: the first batch waits on the collector; the queue of 2 fills and the rest are
    // dropped, while every request is answered.
    let (hanging, _collector) = hanging_collector().await;
    let gateway = gateway_with_queue(&mock.url(), &hanging).await;
    let url = format!("{}{CHAT}", gateway.url());
    for _ in 0..10 {
        let (status, _, _) = common::post(&url, &common::chat_body(true, true), &[]).await;
        assert_eq!(status, 200);
    }
    assert!(
        gateway
            .wait_for_metrics(|m| dropped(m, "queue_full") > 0, WAIT)
            .await,
        "a full queue drops spans and counts them"
    );
}

async fn gateway_with_queue(upstream: &str, collector: &str) -> TestGateway {
    gateway(upstream, collector, "queue_size = 2").await
}

#[tokio::test]
async fn a_failover_is_a_second_attempt_span_in_the_same_trace() {
    let mock = MockUpstream::start().await.expect("mock");
    let receiver = OtlpReceiver::start().await;
    let dead = format!("http://127.0.0.1:{}", common::closed_port());
    // Round robin over a dead and a live endpoint: of two requests, one starts at the dead one.
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [[upstreams]]\nname = \"pair\"\nmodels = [\"*\"]\nendpoints = [\"{dead}\", \"{}\"]\n\
         balance = \"round_robin\"\n[state]\npath = \"{}\"\n{}\n\
         [telemetry]\notlp_endpoint = \"{}\"\nbatch_delay = \"20ms\"\n",
        mock.url(),
        common::state_path().display(),
        key_entry("test", TEST_KEY, ""),
        receiver.url(),
    );
    let gateway = TestGateway::start_toml(&toml).await;
    for _ in 0..2 {
        let (status, _, _) =
            common::post(&format!("{}{CHAT}", gateway.url()), &chat_json(5), &[]).await;
        assert_eq!(
            status, 200,
            "delivered, on the second endpoint if not the first"
        );
    }
    let spans = receiver.wait_for(|spans| spans.len() >= 5, WAIT).await;
    let server = spans
        .iter()
        .find(|s| {
            s.kind() == SERVER
                && spans
                    .iter()
                    .filter(|c| c.kind() == CLIENT && c.parent_id() == s.span_id())
                    .count()
                    == 2
        })
        .unwrap_or_else(|| panic!("a request with two attempts: {spans:#?}"));
    let attempts: Vec<&Received> = spans
        .iter()
        .filter(|c| c.parent_id() == server.span_id())
        .collect();
    let failed = attempts
        .iter()
        .find(|a| a.attr("error.type").as_deref() == Some("connect"))
        .expect("the attempt at the dead endpoint failed to connect");
    let answered = attempts
        .iter()
        .find(|a| a.attr("http.response.status_code").as_deref() == Some("200"))
        .expect("the retry was answered");
    assert_ne!(failed.span_id(), answered.span_id());
    assert_eq!(
        attr(answered, "server.port"),
        mock.addr().port().to_string()
    );
    assert_eq!(attr(server, "tollgate.upstream"), "pair");
    let parents: Vec<String> = (0..2).map(|i| upstream_traceparent(&mock, i)).collect();
    assert!(
        parents.contains(&format!(
            "00-{}-{}-01",
            server.trace_id(),
            answered.span_id()
        )),
        "the upstream got the answered attempt's traceparent: {parents:?}"
    );
}
