//! Hardening: "a gateway sits on the one path to the model: when it fails, everyone fails."
//!
//! Upstream faults, client faults, hostile input, secrets and state faults. Each test fails if
//! the gateway misbehaves: an answer that is not well formed (or a broken stream that looks
//! complete), a concurrency slot that is not given back, usage charged twice or not at all, a
//! panic (it would show as a 500 `internal error`), a request forwarded that must not be, memory
//! that grows with what a client does not read, or a key or credential written anywhere.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use mock_upstream::{canned, Fault, MockOptions, MockUpstream, FAULT_HEADER};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{self, chat_body, key_entry, TestGateway};

const CHAT: &str = "/v1/chat/completions";
const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
/// The client key of the key `h` every rig here has (with the limits each test gives it).
const KEY: &str = "tg-hardening-key";
const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A mock upstream and a gateway in front of it, writing a ledger.
struct Rig {
    upstream: MockUpstream,
    gateway: TestGateway,
    ledger: PathBuf,
}

impl Rig {
    /// `server` and `upstream` lines go into those sections; `key` lines into the key `h`.
    async fn start(server: &str, upstream: &str, key: &str) -> Rig {
        let mock = MockUpstream::start().await.expect("mock upstream");
        let (gateway, ledger) = gateway_with_ledger(&mock.url(), server, upstream, key).await;
        Rig {
            upstream: mock,
            gateway,
            ledger,
        }
    }

    fn url(&self) -> String {
        format!("{}{CHAT}", self.gateway.url())
    }
}

async fn gateway_with_ledger(
    upstream_url: &str,
    server: &str,
    upstream: &str,
    key: &str,
) -> (TestGateway, PathBuf) {
    let ledger = common::state_path().with_file_name("usage.jsonl");
    let tail = format!(
        "{}\n[ledger]\npath = \"{}\"\n",
        key_entry("h", KEY, key),
        ledger.display()
    );
    let toml = common::config_toml(upstream_url, server, upstream, &tail);
    (TestGateway::start_toml(&toml).await, ledger)
}

/// A client that sends this file's key.
fn client() -> reqwest::Client {
    common::client_with_key("tg-hardening-key")
}

fn lossy(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.chars().count() > 600 {
        format!(
            "{}… ({} bytes)",
            text.chars().take(600).collect::<String>(),
            bytes.len()
        )
    } else {
        text.into_owned()
    }
}

/// The gateway's own errors: JSON with `status` and `error.message`, and never a 500 (which is
/// what a panic in a handler turns into).
fn assert_error_shape(what: &str, status: u16, body: &[u8]) {
    assert_ne!(
        status,
        500,
        "{what}: a 500 is a panic or an internal error: {}",
        lossy(body)
    );
    let answer: Value = serde_json::from_slice(body).unwrap_or_else(|error| {
        panic!(
            "{what}: the error body is not JSON ({error}): {}",
            lossy(body)
        )
    });
    assert_eq!(answer["status"], status, "{what}: `status` in {answer}");
    assert!(
        answer["error"]["message"].is_string(),
        "{what}: `error.message` in {answer}"
    );
}

fn ledger_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every ledger line is JSON"))
        .collect()
}

fn by_request_id(lines: Vec<Value>) -> HashMap<String, Vec<Value>> {
    let mut by_id: HashMap<String, Vec<Value>> = HashMap::new();
    for line in lines {
        let id = line["request_id"].as_str().unwrap_or("-").to_owned();
        by_id.entry(id).or_default().push(line);
    }
    by_id
}

/// Each request id's ledger lines, once every id in `ids` has one (bounded), and a moment later:
/// a second charge would follow the first at once.
async fn charged(path: &Path, ids: &[String]) -> HashMap<String, Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let by_id = by_request_id(ledger_lines(path));
        if ids.iter().all(|id| by_id.contains_key(id)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    by_request_id(ledger_lines(path))
}

/// The one ledger line of `id`.
fn charged_once<'a>(lines: &'a HashMap<String, Vec<Value>>, id: &str) -> &'a Value {
    let got = lines.get(id).map_or(&[][..], Vec::as_slice);
    assert_eq!(got.len(), 1, "{id}: exactly one ledger line, got {got:?}");
    &got[0]
}

fn tokens(line: &Value) -> u64 {
    line["prompt_tokens"].as_u64().unwrap_or(0) + line["completion_tokens"].as_u64().unwrap_or(0)
}

async fn assert_slots_released(gateway: &TestGateway, key: &str) {
    let needle = format!("tollgate_inflight_requests{{key=\"{key}\"}} 0");
    assert!(
        gateway
            .wait_for_metric(&needle, Duration::from_secs(5))
            .await,
        "every concurrency slot given back ({needle}):\n{}",
        gateway.metrics().await
    );
}

/// The value of the metric line that starts with `series` (labels included).
fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// What came back on a raw socket, and whether the gateway closed it.
struct RawAnswer {
    bytes: Vec<u8>,
    closed: bool,
}

impl RawAnswer {
    fn status(&self) -> Option<u16> {
        let text = std::str::from_utf8(self.bytes.get(..12)?).ok()?;
        text.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    fn head(&self) -> String {
        let end = find(&self.bytes, b"\r\n\r\n").unwrap_or(self.bytes.len());
        String::from_utf8_lossy(&self.bytes[..end]).into_owned()
    }

    /// The body of a response with a Content-Length (all the gateway's own errors have one).
    fn body(&self) -> &[u8] {
        find(&self.bytes, b"\r\n\r\n").map_or(&[][..], |end| &self.bytes[end + 4..])
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn read_until_closed(socket: &mut TcpStream, wait: Duration) -> RawAnswer {
    let deadline = tokio::time::Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => {
                return RawAnswer {
                    bytes,
                    closed: false,
                }
            }
            Ok(Ok(0) | Err(_)) => {
                return RawAnswer {
                    bytes,
                    closed: true,
                }
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `request` on a new connection and reads until the gateway closes it (or `wait` passes).
async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> RawAnswer {
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    // The gateway may refuse and close before it has read everything: that is an answer too.
    let _ = socket.write_all(request).await;
    read_until_closed(&mut socket, wait).await
}

/// A refused request: a 4xx in the error shape, hyper's own bodiless 4xx on a closed
/// connection, or no answer on a closed connection. Never a 2xx, never a 5xx.
fn assert_refused(what: &str, answer: &RawAnswer) {
    match answer.status() {
        None => assert!(
            answer.closed && answer.bytes.is_empty(),
            "{what}: neither an answer nor a closed connection: {}",
            lossy(&answer.bytes)
        ),
        Some(status) => {
            assert!(
                (400..500).contains(&status),
                "{what}: expected a 4xx or a close, got {}",
                answer.head()
            );
            if answer.body().is_empty() {
                assert!(
                    answer.closed,
                    "{what}: hyper's bodiless {status} then a close"
                );
            } else {
                assert_error_shape(what, status, answer.body());
            }
        }
    }
}

/// A raw HTTP/1.1 POST of `body` to `path` with the key `h` and `extra` header lines.
fn raw_post(path: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {KEY}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The process's resident memory (the gateway runs in this process).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// The size of the mock's `flood` answer (`x-mock-fault: flood=BYTES`).
const FLOOD_BYTES: u64 = 200 * MIB;

// ---------------------------------------------------------------------------------------------
// Upstream faults
// ---------------------------------------------------------------------------------------------

/// What the client must see for one fault.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The gateway's own error, in the error shape.
    GatewayError(u16),
    /// Headers, then a body that fails: visibly broken, never a clean end.
    Broken,
    /// The upstream's answer, passed through as it came.
    PassThrough(u16, &'static str),
}

#[tokio::test]
async fn upstream_faults_get_clean_answers_release_slots_and_are_charged_once() {
    let rig = Rig::start(
        "",
        "response_header_timeout = \"400ms\"\nidle_timeout = \"300ms\"",
        "concurrency = 50",
    )
    .await;
    // (request id, streamed, request headers, what the client must see)
    type Case<'a> = (&'a str, bool, Vec<(&'a str, &'a str)>, Expect);
    let cases: Vec<Case> = vec![
        (
            "reset-json",
            false,
            vec![("x-mock-fault", "reset-before-headers")],
            Expect::GatewayError(502),
        ),
        (
            "reset-sse",
            true,
            vec![("x-mock-fault", "reset-before-headers")],
            Expect::GatewayError(502),
        ),
        (
            "stall-headers",
            true,
            vec![("x-mock-fault", "stall-headers")],
            Expect::GatewayError(504),
        ),
        (
            "slow-headers-json",
            false,
            vec![("x-mock-header-delay-ms", "3000")],
            Expect::GatewayError(504),
        ),
        (
            "abort-sse-0",
            true,
            vec![("x-mock-fault", "abort-after=0")],
            Expect::Broken,
        ),
        (
            "abort-sse-3",
            true,
            vec![("x-mock-fault", "abort-after=3")],
            Expect::Broken,
        ),
        (
            "abort-json",
            false,
            vec![("x-mock-fault", "abort-after=1")],
            Expect::Broken,
        ),
        (
            "stall-sse",
            true,
            vec![("x-mock-fault", "stall-body")],
            Expect::Broken,
        ),
        (
            "stall-json",
            false,
            vec![("x-mock-fault", "stall-body")],
            Expect::Broken,
        ),
        (
            "not-json",
            false,
            vec![("x-mock-fault", "not-json")],
            Expect::PassThrough(200, "this is not json"),
        ),
        (
            "not-json-for-a-stream",
            true,
            vec![("x-mock-fault", "not-json")],
            Expect::PassThrough(200, "this is not json"),
        ),
        (
            "status-503-sse",
            true,
            vec![("x-mock-status", "503")],
            Expect::PassThrough(503, "mock error"),
        ),
    ];
    let url = rig.url();
    let started = Instant::now();
    let outcomes = join_all(cases.iter().map(|(id, stream, headers, _)| {
        let mut request = client()
            .post(&url)
            .header("content-type", "application/json")
            .header("x-request-id", *id)
            .body(chat_body(*stream, false));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move {
            let response = request.send().await.expect("the gateway answers");
            let status = response.status().as_u16();
            (status, response.bytes().await)
        }
    }))
    .await;
    for ((id, _, _, expect), (status, body)) in cases.iter().zip(outcomes) {
        match *expect {
            Expect::GatewayError(code) => {
                assert_eq!(status, code, "{id}");
                let body = body.expect("an error body arrives whole");
                assert_error_shape(id, status, &body);
                assert!(
                    !lossy(&body).contains("127.0.0.1"),
                    "{id}: no internals in a 5xx: {}",
                    lossy(&body)
                );
            }
            Expect::Broken => {
                assert_eq!(status, 200, "{id}: the headers had come");
                assert!(
                    body.is_err(),
                    "{id}: a broken answer must look broken, not complete: {:?}",
                    body.map(|b| lossy(&b))
                );
            }
            Expect::PassThrough(code, text) => {
                assert_eq!(status, code, "{id}");
                let body = body.expect("whole body");
                assert!(lossy(&body).contains(text), "{id}: {}", lossy(&body));
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "every fault was answered at its timeout, not later: {:?}",
        started.elapsed()
    );
    assert_slots_released(&rig.gateway, "h").await;

    let ids: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    let lines = charged(&rig.ledger, &ids).await;
    for (id, _, _, expect) in &cases {
        let line = charged_once(&lines, id);
        match expect {
            Expect::GatewayError(code) => {
                assert_eq!(line["status"], *code, "{id}: {line}");
                assert_eq!(tokens(line), 0, "{id}: no answer, no charge: {line}");
            }
            Expect::Broken => {
                assert_eq!(line["outcome"], "upstream_error", "{id}: {line}");
                assert_eq!(line["source"], "estimated", "{id}: {line}");
            }
            Expect::PassThrough(code, _) => {
                assert_eq!(line["status"], *code, "{id}: {line}");
                assert_eq!(line["outcome"], "complete", "{id}: {line}");
            }
        }
    }

    // Connection refused: a gateway whose upstream is not there.
    let closed = format!("http://127.0.0.1:{}", common::closed_port());
    let (gateway, ledger) = gateway_with_ledger(&closed, "", "", "concurrency = 5").await;
    for (id, stream) in [("refused-json", false), ("refused-sse", true)] {
        let response = client()
            .post(format!("{}{CHAT}", gateway.url()))
            .header("content-type", "application/json")
            .header("x-request-id", id)
            .body(chat_body(stream, false))
            .send()
            .await
            .expect("the gateway answers");
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("whole body");
        assert_eq!(status, 502, "{id}");
        assert_error_shape(id, status, &body);
    }
    assert_slots_released(&gateway, "h").await;
    let ids = ["refused-json".to_owned(), "refused-sse".to_owned()];
    let lines = charged(&ledger, &ids).await;
    for id in &ids {
        let line = charged_once(&lines, id);
        assert_eq!(
            (line["status"].as_u64(), tokens(line)),
            (Some(502), 0),
            "{id}: {line}"
        );
    }
}

#[tokio::test]
async fn a_storm_of_upstream_429s_and_5xx_passes_through_and_leaks_nothing() {
    let rig = Rig::start("", "", "concurrency = 500").await;
    let url = rig.url();
    let statuses = ["429", "500", "502", "503", "504", "200"];
    let requests = (0..150).map(|i| {
        let code = statuses[i % statuses.len()];
        let mut request = client()
            .post(&url)
            .header("content-type", "application/json")
            .header("x-request-id", format!("storm-{i}"))
            .body(chat_body(i % 2 == 0, false));
        if code != "200" {
            request = request.header("x-mock-status", code);
        }
        async move {
            let response = request.send().await.expect("the gateway answers");
            let status = response.status().as_u16();
            let body = response.bytes().await.expect("whole body");
            (code, status, body)
        }
    });
    for (i, (code, status, body)) in join_all(requests).await.into_iter().enumerate() {
        assert_eq!(status.to_string(), code, "storm-{i}: the upstream's status");
        if code != "200" {
            let body: Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(
                body["error"]["message"], "mock error",
                "storm-{i}: the upstream's own error body, not the gateway's: {body}"
            );
        }
    }
    assert_slots_released(&rig.gateway, "h").await;
    let ids: Vec<String> = (0..150).map(|i| format!("storm-{i}")).collect();
    let lines = charged(&rig.ledger, &ids).await;
    for (i, id) in ids.iter().enumerate() {
        let line = charged_once(&lines, id);
        if statuses[i % statuses.len()] != "200" {
            assert_eq!(
                tokens(line),
                0,
                "{id}: an error status without usage is free: {line}"
            );
        } else {
            assert!(tokens(line) > 0, "{id}: {line}");
        }
    }
    assert_eq!(lines.len(), 150, "no line for anything else");
    let metrics = rig.gateway.metrics().await;
    assert!(
        !common::counted(&metrics, "tollgate_upstream_errors_total{"),
        "error statuses are answers, not upstream failures:\n{metrics}"
    );
}

#[tokio::test]
async fn an_upstream_that_ignores_max_tokens_is_charged_for_what_it_sent() {
    let rig = Rig::start(
        "",
        "",
        "max_tokens = 50\nconcurrency = 4\nquotas = [{ tokens = 1000000, per = \"1d\" }]",
    )
    .await;
    let body = |stream: bool| {
        format!(
            r#"{{"model":"mock-model","messages":[{{"role":"user","content":"count"}}],"max_tokens":5,"stream":{stream}}}"#
        )
    };
    let mut ids = Vec::new();
    for (id, stream) in [("overrun-sse", true), ("overrun-json", false)] {
        let response = client()
            .post(rig.url())
            .header("content-type", "application/json")
            .header("x-request-id", id)
            .header("x-mock-chunks", "3000")
            .body(body(stream))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{id}");
        let text = response.text().await.expect("the whole answer");
        assert!(
            text.contains("tok2999 "),
            "{id}: the client gets all the upstream sent"
        );
        if stream {
            assert!(text.ends_with("data: [DONE]\n\n"), "{id}: a clean end");
            assert!(
                !text.contains("\"usage\""),
                "{id}: the usage chunk the gateway asked for is not shown"
            );
        }
        ids.push(id.to_owned());
    }
    assert_slots_released(&rig.gateway, "h").await;
    let lines = charged(&rig.ledger, &ids).await;
    let mut total = 0;
    for id in &ids {
        let line = charged_once(&lines, id);
        assert_eq!(line["completion_tokens"], 3000, "{id}: {line}");
        assert_eq!(line["source"], "reported", "{id}: {line}");
        total += tokens(line);
    }
    let metrics = rig.gateway.metrics().await;
    let overrun = metric_value(&metrics, "tollgate_quota_overrun_tokens_total{key=\"h\"}")
        .expect("the overrun is counted");
    assert!(overrun >= 2.0 * 2500.0, "{overrun}");
    assert_eq!(
        metric_value(
            &metrics,
            "tollgate_quota_used_tokens{key=\"h\",window=\"1d\"}"
        ),
        Some(total as f64),
        "the window holds exactly what was charged:\n{metrics}"
    );
}

#[tokio::test]
async fn garbage_from_the_upstream_passes_through_untouched_and_is_charged_once() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let (gateway, ledger) = gateway_with_ledger(&upstream.url(), "", "", "concurrency = 5").await;
    let sse: Vec<u8> = canned::garbage_sse().concat();
    let cases = [
        (
            "garbage-sse-stripped",
            Fault::GarbageSse,
            chat_body(true, false),
            &sse[..],
        ),
        (
            "garbage-sse-plain",
            Fault::GarbageSse,
            chat_body(true, true),
            &sse[..],
        ),
        (
            "garbage-json",
            Fault::GarbageJson,
            chat_body(false, false),
            &canned::garbage_json()[..],
        ),
    ];
    for (id, which, body, expected) in &cases {
        let response = client()
            .post(format!("{}{CHAT}", gateway.url()))
            .header("content-type", "application/json")
            .header("x-request-id", *id)
            .header(FAULT_HEADER, which.to_string())
            .body(body.clone())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{id}");
        let got = response.bytes().await.expect("a clean end");
        assert!(
            got[..] == expected[..],
            "{id}: bytes changed on the way ({} sent, {} received)",
            expected.len(),
            got.len()
        );
    }
    assert_slots_released(&gateway, "h").await;
    let ids: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
    let lines = charged(&ledger, &ids).await;
    for id in &ids {
        let line = charged_once(&lines, id);
        assert_eq!(
            line["source"], "estimated",
            "{id}: no usable usage came: {line}"
        );
        assert_eq!(line["outcome"], "complete", "{id}: {line}");
    }
}

#[tokio::test]
async fn absurd_usage_from_the_upstream_neither_breaks_the_answer_nor_frees_the_quota() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let (gateway, ledger) = gateway_with_ledger(
        &upstream.url(),
        "",
        "",
        "max_tokens = 10\nconcurrency = 10\nquotas = [{ tokens = 100000, per = \"1d\" }]",
    )
    .await;
    let url = format!("{}{CHAT}", gateway.url());
    // `slow`: a small answer after 800 ms; `absurd`: usage of u64::MAX tokens.
    let slow_answer = ("x-mock-header-delay-ms", "800".to_owned());
    let absurd_answer = (FAULT_HEADER, Fault::AbsurdUsage.to_string());
    let send = |id: &str, (name, value): &(&str, String)| {
        client()
            .post(&url)
            .header("content-type", "application/json")
            .header("x-request-id", id)
            .header(*name, value)
            .body(chat_body(false, false))
            .send()
    };
    // A request in flight holds a reservation while the absurd usage is settled.
    let slow = tokio::spawn(send("slow", &slow_answer));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let response = send("absurd", &absurd_answer).await.expect("answered");
    assert_eq!(response.status(), 200, "the upstream's answer");
    let body = response.bytes().await;
    assert!(
        body.as_ref()
            .is_ok_and(|b| b[..] == *canned::ABSURD_USAGE.as_bytes()),
        "the answer arrives whole and unchanged: {body:?}"
    );
    let response = send("after", &slow_answer).await.expect("answered");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("whole body");
    assert_eq!(status, 429, "the window is spent: {}", lossy(&body));
    assert_error_shape("after the absurd usage", status, &body);
    let slow = slow.await.expect("join").expect("answered");
    assert_eq!(slow.status(), 200, "the request in flight finishes");
    assert!(slow.bytes().await.is_ok(), "its answer arrives whole");

    assert_slots_released(&gateway, "h").await;
    let ids = ["slow".to_owned(), "absurd".to_owned()];
    let lines = charged(&ledger, &ids).await;
    charged_once(&lines, "slow");
    let absurd = charged_once(&lines, "absurd");
    assert_eq!(absurd["source"], "reported", "{absurd}");
    let metrics = gateway.metrics().await;
    let used = metric_value(
        &metrics,
        "tollgate_quota_used_tokens{key=\"h\",window=\"1d\"}",
    )
    .expect("quota gauge");
    assert!(
        (100_000.0..9.2e18).contains(&used),
        "the window stays spent and the gauge sane: {used}"
    );
    assert!(
        !metrics.contains("status=\"500\""),
        "no panic anywhere:\n{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// Client faults
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn clients_that_leave_at_any_point_free_their_slot_and_are_charged_once() {
    let rig = Rig::start(
        "",
        "",
        "max_tokens = 100\nconcurrency = 3\nquotas = [{ tokens = 1000000, per = \"1d\" }]",
    )
    .await;
    let addr = rig.gateway.addr;

    // 1. Gone while sending the body: never forwarded, nothing to charge.
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {KEY}\r\nx-request-id: gone-in-body\r\n\
         content-type: application/json\r\ncontent-length: 500\r\n\r\n{{\"model\":\"mock-model\","
    );
    socket.write_all(head.as_bytes()).await.expect("send part");
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(socket);

    // 2. Gone before the response headers: the upstream had the request.
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    let request = raw_post(
        CHAT,
        "x-request-id: gone-before-headers\r\nx-mock-header-delay-ms: 1500\r\n",
        &chat_body(false, false),
    );
    socket.write_all(&request).await.expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.upstream.request_count() < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        rig.upstream.request_count(),
        1,
        "the request reached the upstream"
    );
    drop(socket);

    // 3. Gone mid-stream: the upstream generation is cancelled.
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    let request = raw_post(
        CHAT,
        "x-request-id: gone-mid-stream\r\nx-mock-chunks: 500\r\nx-mock-chunk-delay-ms: 20\r\n",
        &chat_body(true, false),
    );
    socket.write_all(&request).await.expect("send");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&seen, b"tok2 ").is_none() {
        let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
            .await
            .expect("the stream flows")
            .expect("read");
        assert!(n > 0, "the stream ended early: {}", lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    drop(socket);
    assert!(
        rig.upstream.wait_cancelled(1, Duration::from_secs(5)).await,
        "the upstream stream was cancelled"
    );

    assert_slots_released(&rig.gateway, "h").await;
    let ids = [
        "gone-before-headers".to_owned(),
        "gone-mid-stream".to_owned(),
    ];
    let lines = charged(&rig.ledger, &ids).await;
    assert!(
        !lines.contains_key("gone-in-body"),
        "a request whose body never came was neither forwarded nor charged"
    );
    assert_eq!(
        rig.upstream.request_count(),
        2,
        "the half-sent body was never forwarded"
    );
    let mut total = 0;
    for id in &ids {
        let line = charged_once(&lines, id);
        assert_eq!(line["outcome"], "client_gone", "{id}: {line}");
        assert!(
            tokens(line) > 0,
            "{id}: the upstream had the prompt: {line}"
        );
        total += tokens(line);
    }
    let metrics = rig.gateway.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "tollgate_quota_used_tokens{key=\"h\",window=\"1d\"}"
        ),
        Some(total as f64),
        "every reservation settled to what was charged (none left held):\n{metrics}"
    );
    assert!(
        metrics.contains("status=\"499\"} 1"),
        "the request whose client left before the headers is counted (499):\n{metrics}"
    );
}

#[tokio::test]
async fn slowloris_headers_are_cut() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "header_read_timeout = \"300ms\"",
        "",
        "",
    ))
    .await;

    // Headers trickled a byte every 50 ms never complete within the 300 ms allowed.
    let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
    let started = Instant::now();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\nx-slow: {}\r\n\r\n",
        common::TEST_KEY,
        "a".repeat(200)
    );
    socket.write_all(&head.as_bytes()[..8]).await.expect("send");
    let mut cut = None;
    let mut answer = Vec::new();
    for &byte in &head.as_bytes()[8..] {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(1), socket.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                cut = Some(started.elapsed());
                break;
            }
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if socket.write_all(&[byte]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
    }
    let cut = cut.unwrap_or_else(|| panic!("a trickled head was never cut: {}", lossy(&answer)));
    assert!(
        cut < Duration::from_secs(2),
        "cut at the header timeout: {cut:?}"
    );
    let answer = RawAnswer {
        bytes: answer,
        closed: true,
    };
    if answer.status().is_some() {
        assert_refused("trickled head", &answer);
    }

    // A request line, and then nothing more.
    let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
    socket
        .write_all(b"POST / HTTP/1.1\r\n")
        .await
        .expect("send");
    let answer = read_until_closed(&mut socket, Duration::from_secs(2)).await;
    assert!(answer.closed, "a head that never ends is cut");
    assert_eq!(upstream.request_count(), 0, "nothing forwarded");
    let (status, _, _) = common::post(
        &format!("{}{CHAT}", gateway.url()),
        &chat_body(false, false),
        &[],
    )
    .await;
    assert_eq!(status, 200, "the gateway still serves");
}

/// hyper's `header_read_timeout` starts once hyper-util's `auto` builder has seen enough bytes
/// to tell HTTP/1.1 from h2c; until then nothing times out, so a connection that sends nothing
/// (or one byte, or part of the h2 preface) is held open forever: a slowloris that costs the
/// attacker one socket per connection and no bytes. The fix belongs in src/server/: see the
/// report of the hardening work.
#[tokio::test]
async fn connections_that_never_send_a_request_head_are_cut() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "header_read_timeout = \"300ms\"",
        "",
        "",
    ))
    .await;
    // A connection that sends nothing at all, or only the first bytes of a request.
    let cases = [
        ("silent", &b""[..]),
        ("one byte", &b"P"[..]),
        ("an HTTP/2 preface cut short", &b"PRI * HTTP/2.0\r\n"[..]),
        ("a request line", &b"POST / HTTP/1.1\r\n"[..]),
    ];
    let left_open: Vec<&str> = join_all(cases.iter().map(|(what, first)| async move {
        let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
        socket.write_all(first).await.expect("send");
        let answer = read_until_closed(&mut socket, Duration::from_secs(2)).await;
        (!answer.closed).then_some(*what)
    }))
    .await
    .into_iter()
    .flatten()
    .collect();
    assert!(
        left_open.is_empty(),
        "connections that never finish their head are closed (header_read_timeout), \
         these were still open after 2 s: {left_open:?}"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_holds_neither_memory_nor_the_upstream() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let (gateway, _ledger) = gateway_with_ledger(&upstream.url(), "", "", "concurrency = 2").await;
    let before = rss_bytes();
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(16 * 1024)
        .expect("small receive buffer");
    let mut socket = socket.connect(gateway.addr).await.expect("connect");
    let flood = format!("{FAULT_HEADER}: {}\r\n", Fault::Flood(FLOOD_BYTES));
    let request = raw_post(CHAT, &flood, &chat_body(true, true));
    socket.write_all(&request).await.expect("send");
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf))
        .await
        .expect("the stream starts")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        lossy(&buf[..n])
    );

    // The client reads no more. The upstream must stop being read too, soon.
    let mut last = 0;
    let mut still = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while still < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = upstream.body_bytes_sent();
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    assert!(
        upstream.completed_streams() == 0,
        "the upstream's stream ran to its end while the client read nothing"
    );
    assert!(
        still >= 5 && last < 64 * MIB,
        "backpressure reaches the upstream: it made {} MiB of {} MiB and {}",
        last / MIB,
        FLOOD_BYTES / MIB,
        if still >= 5 { "stopped" } else { "kept going" }
    );
    let grown = rss_bytes().saturating_sub(before);
    eprintln!(
        "stopped reader: upstream made {} KiB of {} MiB; RSS +{} KiB",
        last / 1024,
        FLOOD_BYTES / MIB,
        grown / 1024
    );
    assert!(
        grown < 100 * MIB,
        "memory stays bounded: +{} MiB while the client read nothing",
        grown / MIB
    );

    drop(socket);
    assert!(
        upstream.wait_cancelled(1, Duration::from_secs(5)).await,
        "the client left: the upstream stream is cancelled"
    );
    assert_slots_released(&gateway, "h").await;
}

// ---------------------------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_bodies_get_a_4xx_in_the_error_shape_and_are_never_forwarded() {
    let rig = Rig::start("", "", "max_tokens = 100\nmodels = [\"mock-model\"]").await;
    let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
    let with = |rest: &str| format!(r#"{{"model":"mock-model",{msgs},{rest}}}"#).into_bytes();
    let json = "application/json";
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        ("deep arrays", json, with(&format!("\"x\":{}{}", "[".repeat(100_000), "]".repeat(100_000))), 400),
        ("deep objects", json, with(&format!("\"x\":{}1{}", "{\"a\":".repeat(50_000), "}".repeat(50_000))), 400),
        ("a huge string where an array goes", json, format!(r#"{{"model":"mock-model","messages":"{}"}}"#, "x".repeat(3_000_000)).into_bytes(), 400),
        ("a string past the body cap", json, with(&format!("\"x\":\"{}\"", "x".repeat(5 * 1024 * 1024))), 413),
        ("a number past f64", json, with("\"max_tokens\":1e400"), 400),
        ("max_tokens past u64", json, with("\"max_tokens\":100000000000000000000000"), 400),
        ("max_tokens as an exponent", json, with("\"max_tokens\":1e9"), 400),
        ("max_tokens as a decimal", json, with("\"max_tokens\":100000.0"), 400),
        ("max_completion_tokens as an exponent", json, with("\"max_completion_tokens\":1E6"), 400),
        ("a huge seed", json, with(&format!("\"seed\":{}", "9".repeat(100_000))), 400),
        ("invalid UTF-8", json, b"{\"model\":\"mock-model\",\"messages\":[{\"role\":\"user\",\"content\":\"\xed\xa0\x80\"}]}".to_vec(), 400),
        ("a lone surrogate", json, with(r#""user":"\ud800""#), 400),
        ("a NUL byte", json, b"{\"model\":\"mock-model\",\x00\"messages\":[]}".to_vec(), 400),
        ("a byte-order mark", json, format!("\u{feff}{}", String::from_utf8_lossy(&with("\"n\":1"))).into_bytes(), 400),
        ("trailing data", json, [with("\"n\":1"), b"{}".to_vec()].concat(), 400),
        ("duplicate max_tokens", json, with("\"max_tokens\":100000,\"max_tokens\":5"), 400),
        ("duplicate model", json, format!(r#"{{"model":"other-model","model":"mock-model",{msgs}}}"#).into_bytes(), 400),
        ("duplicate nested key", json, br#"{"model":"mock-model","messages":[{"role":"system","role":"user","content":"hi"}]}"#.to_vec(), 400),
        ("JSON sequence", "application/json-seq", with("\"n\":1"), 400),
        ("NDJSON", "application/x-ndjson", with("\"n\":1"), 400),
        ("multipart", "multipart/form-data; boundary=x", with("\"n\":1"), 400),
        ("JSON as text", "text/json", with("\"n\":1"), 400),
    ];
    let client = client();
    for (what, content_type, body, expected) in cases {
        let oversized = body.len() > 4 * 1024 * 1024;
        let response = match client
            .post(rig.url())
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
        {
            Ok(response) => response,
            // Refused before it was read whole: the connection may close under the sender.
            Err(error) if oversized => {
                eprintln!("{what}: connection closed while sending ({error})");
                continue;
            }
            Err(error) => panic!("{what}: no answer: {error}"),
        };
        let status = response.status().as_u16();
        let answer = response.bytes().await.expect("whole body");
        assert_eq!(status, expected, "{what}: {}", lossy(&answer));
        assert_error_shape(what, status, &answer);
        assert!(
            answer.len() < 8 * 1024,
            "{what}: the error does not echo the input back ({} bytes)",
            answer.len()
        );
    }
    assert_eq!(
        rig.upstream.request_count(),
        0,
        "no hostile body was forwarded"
    );
    let (status, _, _) = common::post(
        &rig.url(),
        &chat_body(false, false),
        &[("authorization", "Bearer tg-hardening-key")],
    )
    .await;
    assert_eq!(status, 200, "and the gateway still serves");
}

#[tokio::test]
async fn oversized_headers_get_431_or_a_closed_connection() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let body = chat_body(false, false);
    let many: String = (0..200).map(|i| format!("x-h-{i}: v\r\n")).collect();
    let huge = format!("x-huge: {}\r\n", "v".repeat(1024 * 1024));
    let long_uri = format!("{CHAT}?q={}", "a".repeat(1024 * 1024));
    let cases = [
        ("200 headers", raw_post(CHAT, &many, &body)),
        ("a 1 MiB header", raw_post(CHAT, &huge, &body)),
        ("a 1 MiB URI", raw_post(&long_uri, "", &body)),
    ];
    for (what, request) in cases {
        let answer = raw_exchange(gateway.addr, &request, Duration::from_secs(5)).await;
        assert!(answer.closed, "{what}: the connection is closed");
        assert_refused(what, &answer);
        if let Some(status) = answer.status() {
            assert!(
                status == 431 || status == 414 || status == 400,
                "{what}: {}",
                answer.head()
            );
        }
    }
    assert_eq!(upstream.request_count(), 0, "nothing forwarded");
    let (status, _, _) = common::post(&format!("{}{CHAT}", gateway.url()), &body, &[]).await;
    assert_eq!(status, 200, "the gateway still serves");
}

#[tokio::test]
async fn ambiguous_framing_is_refused_or_closed_never_forwarded() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let body = chat_body(false, false);
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let head = |framing: &str| {
        format!(
            "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\n{framing}\r\n",
            common::TEST_KEY
        )
    };
    let smuggled = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        common::TEST_KEY,
        body.len()
    );
    let cases: Vec<(&str, String)> = vec![
        (
            "TE chunked, then a CL that frames the body differently",
            format!(
                "{}{}{smuggled}",
                head("transfer-encoding: chunked\r\ncontent-length: 4\r\n"),
                "0\r\n\r\n"
            ),
        ),
        (
            "CL first, then TE chunked, body framed by CL",
            format!(
                "{}{body}",
                head(&format!(
                    "content-length: {}\r\ntransfer-encoding: chunked\r\n",
                    body.len()
                ))
            ),
        ),
        (
            "TE not chunked last, with CL",
            format!(
                "{}{body}",
                head(&format!(
                    "transfer-encoding: chunked, identity\r\ncontent-length: {}\r\n",
                    body.len()
                ))
            ),
        ),
        (
            "TE unknown",
            format!("{}{chunked}", head("transfer-encoding: xchunked\r\n")),
        ),
        (
            "two different CLs",
            format!(
                "{}{body}",
                head(&format!(
                    "content-length: {}\r\ncontent-length: 5\r\n",
                    body.len()
                ))
            ),
        ),
        (
            "a CL list",
            format!(
                "{}{body}",
                head(&format!("content-length: {0}, {0}0\r\n", body.len()))
            ),
        ),
        (
            "a signed CL",
            format!(
                "{}{body}",
                head(&format!("content-length: +{}\r\n", body.len()))
            ),
        ),
        (
            "space before the colon",
            format!("{}{chunked}", head("transfer-encoding : chunked\r\n")),
        ),
        (
            "HTTP/1.0 with TE",
            format!(
                "{}{chunked}",
                head("transfer-encoding: chunked\r\n").replacen("HTTP/1.1", "HTTP/1.0", 1)
            ),
        ),
    ];
    for (what, request) in &cases {
        let answer = raw_exchange(gateway.addr, request.as_bytes(), Duration::from_secs(3)).await;
        assert_refused(what, &answer);
        assert_eq!(upstream.request_count(), 0, "{what}: never forwarded");
    }
}

/// RFC 9112 §6.1: a request with both Content-Length and Transfer-Encoding "ought to be handled
/// as an error". hyper processes it by Transfer-Encoding (and closes the connection after), and
/// removes the Content-Length before the gateway's layers see the request, so refusing it needs
/// the listener (src/server/): see the report of the hardening work.
#[tokio::test]
#[ignore = "needs a change in src/server/: hyper forwards CL+TE requests framed by TE"]
async fn a_request_with_both_content_length_and_transfer_encoding_is_never_forwarded() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let body = chat_body(false, false);
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\n\
         content-length: 3\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        common::TEST_KEY,
        body.len()
    );
    let answer = raw_exchange(gateway.addr, request.as_bytes(), Duration::from_secs(3)).await;
    assert_refused("CL and TE", &answer);
    assert_eq!(upstream.request_count(), 0, "never forwarded");
}

#[tokio::test]
async fn absolute_form_uris_and_host_tricks_never_change_the_upstream() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let body = chat_body(false, false);
    let request = |target: &str, host: &str| {
        format!(
            "POST {target} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\n\
             x-forwarded-host: evil.example\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            common::TEST_KEY,
            body.len()
        )
    };
    let forwarded = [
        (
            "absolute form",
            request("http://evil.example/v1/chat/completions", "evil"),
            "/v1/chat/completions",
        ),
        (
            "absolute https form",
            request(
                "https://evil.example:8443/openai/v1/chat/completions?x=1",
                "evil.example",
            ),
            "/v1/chat/completions?x=1",
        ),
        (
            "Host with a port and userinfo",
            request(CHAT, "user@evil.example:1"),
            "/v1/chat/completions",
        ),
    ];
    for (what, raw, path) in &forwarded {
        let answer = raw_exchange(gateway.addr, raw.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(answer.status(), Some(200), "{what}: {}", answer.head());
        let seen = upstream.requests().pop().expect("forwarded");
        assert_eq!(
            seen.headers.get("host").and_then(|v| v.to_str().ok()),
            Some(upstream.addr().to_string().as_str()),
            "{what}: the upstream is the configured one"
        );
        assert_eq!(
            seen.path_and_query, *path,
            "{what}: only the route's own path"
        );
    }
    let count = upstream.request_count();
    let refused = [
        ("scheme-relative", request("//evil.example/v1/chat/completions", "g")),
        ("dot segments", request("/v1/chat/completions/../../v1/chat/completions", "g")),
        ("asterisk form", request("*", "g")),
        ("authority form", format!("CONNECT evil.example:443 HTTP/1.1\r\nhost: evil.example:443\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n", common::TEST_KEY)),
        ("absolute form elsewhere", request("http://evil.example/v1/embeddings", "g")),
    ];
    for (what, raw) in &refused {
        let answer = raw_exchange(gateway.addr, raw.as_bytes(), Duration::from_secs(3)).await;
        assert_refused(what, &answer);
    }
    assert_eq!(
        upstream.request_count(),
        count,
        "none of those was forwarded"
    );
}

#[tokio::test]
async fn control_characters_in_header_values_are_refused() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let body = chat_body(false, false);
    for (what, header) in [
        ("NUL", &b"x-a: a\x00b\r\n"[..]),
        ("SOH", b"x-a: a\x01b\r\n"),
        ("ESC", b"x-a: \x1b[31mred\r\n"),
        ("DEL", b"x-a: a\x7fb\r\n"),
        ("bare CR", b"x-a: a\rb\r\n"),
        ("obsolete line folding", b"x-a: a\r\n b\r\n"),
        (
            "a key with a control character",
            b"x-api-key: tg-test-key\x01\r\n",
        ),
    ] {
        let mut request = format!(
            "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            common::TEST_KEY,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(header);
        request.extend_from_slice(b"connection: close\r\n\r\n");
        request.extend_from_slice(body.as_bytes());
        let answer = raw_exchange(gateway.addr, &request, Duration::from_secs(3)).await;
        assert_refused(what, &answer);
    }
    assert_eq!(upstream.request_count(), 0, "none was forwarded");
}

#[tokio::test]
async fn h2c_floods_and_rapid_resets_leave_the_gateway_serving_others() {
    let rig = Rig::start("", "", "concurrency = 10000").await;
    let url = rig.url();
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_static("Bearer tg-hardening-key"),
    );
    let h2 = || {
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .default_headers(headers.clone())
            .timeout(Duration::from_secs(20))
            .build()
            .expect("h2c client")
    };

    // Many concurrent streams on one connection: each gets its answer.
    let flood = h2();
    let answers = join_all((0..400).map(|i| {
        let request = flood
            .post(&url)
            .header("content-type", "application/json")
            .header("x-mock-chunks", "3")
            .body(chat_body(i % 2 == 0, false))
            .send();
        async move {
            match request.await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    (status, response.bytes().await.is_ok())
                }
                Err(_) => (0, false),
            }
        }
    }))
    .await;
    let served = answers.iter().filter(|a| **a == (200, true)).count();
    assert_eq!(
        served,
        400,
        "every stream was served: {:?}",
        answers
            .iter()
            .filter(|a| **a != (200, true))
            .take(5)
            .collect::<Vec<_>>()
    );

    // Rapid reset: streams opened and cancelled at once, round after round, on one connection.
    let resetter = h2();
    for _ in 0..5 {
        join_all((0..200).map(|_| {
            let request = resetter
                .post(&url)
                .header("content-type", "application/json")
                .header("x-mock-header-delay-ms", "300")
                .body(chat_body(false, false))
                .send();
            tokio::time::timeout(Duration::from_millis(5), request)
        }))
        .await;
    }

    // Others are still served, over HTTP/1.1 and HTTP/2.
    let (status, _, _) = common::post(
        &url,
        &chat_body(false, false),
        &[("authorization", "Bearer tg-hardening-key")],
    )
    .await;
    assert_eq!(status, 200, "HTTP/1.1 still served");
    let response = h2()
        .post(&url)
        .header("content-type", "application/json")
        .body(chat_body(true, false))
        .send()
        .await
        .expect("a new h2c connection");
    assert_eq!(response.status(), 200, "HTTP/2 still served");
    assert!(response.bytes().await.is_ok(), "its stream completes");
    assert_slots_released(&rig.gateway, "h").await;
    let metrics = rig.gateway.metrics().await;
    assert!(
        !metrics.contains("status=\"500\""),
        "no panic anywhere:\n{metrics}"
    );
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Everything one gateway process wrote or answered.
struct Collected {
    log: String,
    metrics: String,
    ledger: String,
    state: String,
    answers: Vec<String>,
}

async fn run_and_collect(
    format: &str,
    upstream: &MockUpstream,
    credential: &str,
    alpha: &str,
    beta: &str,
    unknown: &str,
) -> Collected {
    const CREDENTIAL_ENV: &str = "TOLLGATE_HARDENING_UPSTREAM_CREDENTIAL";
    let port = common::closed_port();
    let admin_port = common::closed_port();
    let state = common::state_path();
    let ledger = state.with_file_name("usage.jsonl");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nmax_body_bytes = 4000\n\
         [upstream]\nurl = \"{}\"\napi_key_env = \"{CREDENTIAL_ENV}\"\n[state]\npath = \"{}\"\n{}{}\
         [ledger]\npath = \"{}\"\n",
        upstream.url(),
        state.display(),
        key_entry(
            "alpha",
            alpha,
            "max_tokens = 1000\nquotas = [{ tokens = 1000000, per = \"1d\" }]"
        ),
        key_entry("beta", beta, "rate = { requests = 2, per = \"1m\" }"),
        ledger.display()
    );
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(&mut file, config.as_bytes()).expect("write config");
    let child = Command::new(BIN)
        .args(["--log-format", format, "serve", "--config"])
        .arg(file.path())
        .env("RUST_LOG", "debug")
        .env(CREDENTIAL_ENV, credential)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut up = false;
    for _ in 0..200 {
        if client
            .get(format!("http://127.0.0.1:{admin_port}/healthz"))
            .send()
            .await
            .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(up, "{format}: the gateway came up");

    let base = format!("http://127.0.0.1:{port}");
    let chat = format!("{base}{CHAT}");
    let bearer = |key: &str| format!("Bearer {key}");
    let json = chat_body(false, false);
    let stream = chat_body(true, false);
    let big = format!(r#"{{"model":"m","prompt":"{}"}}"#, "x".repeat(5000));
    // (method, url, headers, body)
    type Request<'a> = (&'a str, String, Vec<(&'a str, String)>, String);
    let workload: Vec<Request> = vec![
        (
            "POST",
            chat.clone(),
            vec![("authorization", bearer(alpha))],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("x-api-key", beta.to_owned())],
            stream.clone(),
        ),
        (
            "POST",
            format!("{base}/openai/v1/completions"),
            vec![("api-key", alpha.to_owned())],
            common::completions_body(true),
        ),
        (
            "GET",
            format!("{base}/v1/models"),
            vec![("authorization", bearer(alpha))],
            String::new(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("authorization", bearer(unknown))],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("x-api-key", unknown.to_owned())],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("authorization", format!("Basic {alpha}"))],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("authorization", alpha.to_owned())],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("authorization", format!("Bearer {unknown} {alpha}"))],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![
                ("authorization", bearer(alpha)),
                ("x-api-key", beta.to_owned()),
            ],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("authorization", bearer(alpha))],
            "{\"model\":".to_owned(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("authorization", bearer(alpha))],
            r#"{"model":"m","messages":[{"role":"robot"}]}"#.to_owned(),
        ),
        (
            "POST",
            format!("{base}/v1/completions"),
            vec![("authorization", bearer(alpha))],
            big,
        ),
        (
            "POST",
            chat.clone(),
            vec![
                ("authorization", bearer(alpha)),
                ("x-mock-fault", "abort-after=2".to_owned()),
            ],
            stream.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![
                ("authorization", bearer(alpha)),
                ("x-mock-fault", "reset-before-headers".to_owned()),
            ],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![
                ("authorization", bearer(alpha)),
                ("x-mock-status", "500".to_owned()),
            ],
            json.clone(),
        ),
        (
            "POST",
            format!("{base}/v1/embeddings"),
            vec![("authorization", bearer(alpha))],
            json.clone(),
        ),
        (
            "GET",
            chat.clone(),
            vec![("authorization", bearer(alpha))],
            String::new(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("x-api-key", beta.to_owned())],
            json.clone(),
        ),
        (
            "POST",
            chat.clone(),
            vec![("x-api-key", beta.to_owned())],
            json.clone(),
        ),
    ];
    let mut answers = Vec::new();
    let mut statuses = Vec::new();
    for (method, url, headers, body) in workload {
        let mut request = client
            .request(method.parse().expect("method"), url)
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("the gateway answers");
        statuses.push(response.status().as_u16());
        let mut text = format!("{:?}\n", response.headers());
        match response.bytes().await {
            Ok(body) => text.push_str(&String::from_utf8_lossy(&body)),
            Err(error) => text.push_str(&format!("<broken: {error}>")),
        }
        answers.push(text);
    }
    for expected in [200, 401, 400, 413, 502, 500, 404, 405, 429] {
        assert!(
            statuses.contains(&expected),
            "{format}: the workload got a {expected}: {statuses:?}"
        );
    }
    let metrics = client
        .get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(killed.success(), "SIGTERM sent");
    let output = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("the gateway exits");
    assert!(
        output.status.success(),
        "{format}: a clean exit: {:?}",
        output.status
    );
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Collected {
        log,
        metrics,
        ledger: std::fs::read_to_string(&ledger).unwrap_or_default(),
        state: std::fs::read_to_string(&state).unwrap_or_default(),
        answers,
    }
}

#[tokio::test]
async fn no_key_or_credential_appears_in_anything_the_gateway_writes() {
    let unique = || uuid::Uuid::new_v4().simple().to_string();
    let credential = format!("sk-upstream-{}", unique());
    let (alpha, beta, unknown) = (
        format!("tg-{}", unique()),
        format!("tg-{}", unique()),
        format!("tg-{}", unique()),
    );
    let upstream = MockUpstream::start_with(MockOptions {
        require_key: Some(credential.clone()),
        ..MockOptions::default()
    })
    .await
    .expect("mock upstream");
    let (json, text) = tokio::join!(
        run_and_collect("json", &upstream, &credential, &alpha, &beta, &unknown),
        run_and_collect("text", &upstream, &credential, &alpha, &beta, &unknown),
    );
    assert!(
        upstream.requests().iter().any(|r| {
            r.headers.get("authorization").and_then(|v| v.to_str().ok())
                == Some(format!("Bearer {credential}").as_str())
        }),
        "the credential was really used"
    );
    assert!(
        json.log.contains("\"target\":\"tollgate::access\"") && json.log.contains("DEBUG"),
        "the JSON log is the real thing, at debug: {}",
        json.log
    );
    assert!(
        text.log.contains("tollgate::access") && text.log.contains("DEBUG"),
        "the text log is the real thing, at debug: {}",
        text.log
    );
    // The random part alone, so that a key logged without its `tg-` prefix is caught too.
    let secrets = [
        (
            "the upstream credential",
            credential.trim_start_matches("sk-upstream-"),
        ),
        ("a client key", alpha.trim_start_matches("tg-")),
        ("a rate-limited client key", beta.trim_start_matches("tg-")),
        ("an unknown client key", unknown.trim_start_matches("tg-")),
    ];
    for (run, collected) in [("json", &json), ("text", &text)] {
        assert!(
            !collected.ledger.is_empty(),
            "{run}: the ledger was written"
        );
        assert!(
            collected.state.contains("alpha"),
            "{run}: the state file was written: {}",
            collected.state
        );
        let mut outputs = vec![
            ("log", collected.log.clone()),
            ("metrics", collected.metrics.clone()),
            ("ledger", collected.ledger.clone()),
            ("state file", collected.state.clone()),
        ];
        for (i, answer) in collected.answers.iter().enumerate() {
            outputs.push(("answer", format!("#{i}: {answer}")));
        }
        for (what, output) in &outputs {
            for (name, secret) in secrets {
                assert!(
                    !output.contains(secret),
                    "{run} {what} contains {name}: {}",
                    output
                        .lines()
                        .filter(|l| l.contains(secret))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// State faults
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_full_ledger_disk_loses_lines_not_requests() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "",
        "",
        "[ledger]\npath = \"/dev/full\"\n",
    ))
    .await;
    for i in 0..6 {
        let (status, _, body) = common::post(
            &format!("{}{CHAT}", gateway.url()),
            &chat_body(i % 2 == 0, false),
            &[],
        )
        .await;
        assert_eq!(
            status, 200,
            "request {i} succeeds with the ledger disk full"
        );
        assert!(!body.is_empty(), "request {i} has its answer");
    }
    assert!(
        gateway
            .wait_for_metric(
                "tollgate_ledger_errors_total{reason=\"write\"} 6",
                Duration::from_secs(5)
            )
            .await,
        "every lost line is counted:\n{}",
        gateway.metrics().await
    );
}

/// Runs `tollgate serve` on a config whose state file is `state`; returns its exit status and
/// stderr + stdout, killing it if it is still running after 10 s (a silent start).
fn serve_with_state(state: &Path) -> (Option<std::process::ExitStatus>, String) {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
         [state]\npath = \"{}\"\n{}",
        state.display(),
        key_entry("q", "tg-q", "max_tokens = 10\nquotas = [{ tokens = 100, per = \"1d\" }]")
    );
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(&mut file, config.as_bytes()).expect("write config");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(file.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = None;
    while Instant::now() < deadline {
        if let Ok(Some(exit)) = child.try_wait() {
            status = Some(exit);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if status.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    (status, text)
}

#[test]
fn a_corrupt_or_unwritable_state_stops_the_start_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let corrupt: [(&str, &[u8]); 5] = [
        ("garbage", b"\x00\x01 this is not a state file {{{"),
        (
            "truncated",
            b"{\"version\":1,\"windows\":[{\"key\":\"q\",\"per_secs\":86400,",
        ),
        ("empty", b""),
        ("not a snapshot", b"{\"hello\":\"world\"}"),
        ("a future version", b"{\"version\":99,\"windows\":[]}"),
    ];
    for (what, content) in corrupt {
        let path = dir.path().join(what.replace(' ', "-")).join("state.db");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, content).expect("write state");
        let (status, output) = serve_with_state(&path);
        let status = status.unwrap_or_else(|| panic!("{what}: started silently: {output}"));
        assert!(!status.success(), "{what}: a non-zero exit: {output}");
        assert!(
            output.contains(&path.display().to_string()),
            "{what}: the message names the file: {output}"
        );
        assert_eq!(
            std::fs::read(&path).expect("still there"),
            content,
            "{what}: the state file is left as it was, for the operator"
        );
    }

    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    for (what, path) in [
        ("a parent that is a file", file.join("state.db")),
        (
            "a directory no one may write",
            PathBuf::from("/proc/self/tollgate-state.db"),
        ),
    ] {
        let (status, output) = serve_with_state(&path);
        let status = status.unwrap_or_else(|| panic!("{what}: started silently: {output}"));
        assert!(!status.success(), "{what}: a non-zero exit: {output}");
        let named = path.parent().expect("parent").display().to_string();
        assert!(
            output.contains(&named),
            "{what}: the message names {named}: {output}"
        );
    }
}

#[tokio::test]
async fn a_state_directory_that_vanishes_at_runtime_costs_no_request_and_no_usage() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let state = common::state_path();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\n\
         [state]\npath = \"{}\"\nflush_interval = \"100ms\"\n{}",
        upstream.url(),
        state.display(),
        key_entry("h", KEY, "max_tokens = 100\nquotas = [{ tokens = 1000000, per = \"1d\" }]")
    );
    let gateway = TestGateway::start_toml(&toml).await;
    let url = format!("{}{CHAT}", gateway.url());
    let auth = [("authorization", "Bearer tg-hardening-key")];
    assert_eq!(
        common::post(&url, &chat_body(false, false), &auth).await.0,
        200
    );
    let dir = state.parent().expect("state dir").to_owned();
    std::fs::remove_dir_all(&dir).expect("remove the state directory");
    for _ in 0..3 {
        assert_eq!(
            common::post(&url, &chat_body(true, false), &auth).await.0,
            200,
            "requests go on without a state directory"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let used = metric_value(
        &gateway.metrics().await,
        "tollgate_quota_used_tokens{key=\"h\",window=\"1d\"}",
    )
    .expect("usage counted");
    std::fs::create_dir_all(&dir).expect("recreate");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut saved = 0;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&state) {
            let snapshot: Value = serde_json::from_str(&text).expect("a whole snapshot");
            saved = snapshot["windows"]
                .as_array()
                .map_or(0, |w| w.iter().filter_map(|w| w["used"].as_u64()).sum());
            if saved as f64 >= used {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        saved as f64, used,
        "the usage kept in memory is written once the directory is back"
    );
}
