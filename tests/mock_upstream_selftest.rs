//! Self-test of the mock upstream (the workspace's `mock-upstream` crate) over real
//! sockets, with a raw hyper client or a plain `TcpStream`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mock_upstream::{canned, Fault, MockOptions, MockUpstream, FAULT_HEADER};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// An HTTP/1.1 client connection and the task driving it.
struct H1 {
    sender: http1::SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
}

impl Drop for H1 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(mock: &MockUpstream) -> H1 {
    let tcp = TcpStream::connect(mock.addr())
        .await
        .expect("connect to mock");
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .expect("http1 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    H1 { sender, task }
}

fn request(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "mock");
    if !body.is_empty() {
        builder = builder.header("content-type", "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("build request")
}

fn post(path: &str, headers: &[(&str, &str)], body: &Value) -> Request<Full<Bytes>> {
    request(Method::POST, path, headers, &body.to_string())
}

struct Fetched {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Fetched {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("response body is JSON")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Sends `req` on a fresh connection and reads the whole response.
async fn fetch(mock: &MockUpstream, req: Request<Full<Bytes>>) -> Fetched {
    let mut conn = connect(mock).await;
    let resp = conn.sender.send_request(req).await.expect("send request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("read response body")
        .to_bytes();
    Fetched {
        status,
        headers,
        body,
    }
}

/// The `data:` payloads of an SSE body, checking the framing.
fn sse_events(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).expect("SSE body is UTF-8");
    assert!(
        text.ends_with("\n\n"),
        "SSE body must end with a blank line: {text:?}"
    );
    text.split_terminator("\n\n")
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: ` prefix: {event:?}"))
                .to_owned()
        })
        .collect()
}

fn parse(event: &str) -> Value {
    serde_json::from_str(event).unwrap_or_else(|e| panic!("event {event:?} is not JSON: {e}"))
}

fn chat_body(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"}]}
        ],
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

#[tokio::test]
async fn chat_json_is_openai_shaped_and_deterministic() {
    let mock = MockUpstream::start().await.expect("start mock");
    let first = fetch(&mock, post(CHAT, &[], &chat_body(false, false))).await;
    assert_eq!(first.status, StatusCode::OK, "status");
    assert_eq!(
        first.header("content-type"),
        "application/json",
        "content type"
    );
    let v = first.json();
    let id = v["id"].as_str().expect("id is a string");
    assert!(
        id.starts_with("chatcmpl-") && id.len() == 9 + 16,
        "id shape: {id}"
    );
    assert_eq!(v["object"], "chat.completion", "object");
    assert_eq!(v["created"], 1_700_000_000, "created");
    assert_eq!(v["model"], "gpt-test", "model echoed");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant", "role");
    assert_eq!(
        v["choices"][0]["message"]["content"], "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 ",
        "content"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "finish_reason");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}),
        "usage"
    );

    let second = fetch(&mock, post(CHAT, &[], &chat_body(false, false))).await;
    assert_eq!(
        first.body, second.body,
        "same request must give the same bytes"
    );

    let mut limited = chat_body(false, false);
    limited["max_tokens"] = json!(3);
    let v = fetch(&mock, post(CHAT, &[], &limited)).await.json();
    assert_eq!(
        v["choices"][0]["finish_reason"], "length",
        "max_tokens finish"
    );
    assert_eq!(v["usage"]["completion_tokens"], 3, "max_tokens count");
    assert_ne!(v["id"].as_str(), Some(id), "different body, different id");

    let v = fetch(&mock, post(CHAT, &[("x-mock-chunks", "2")], &limited))
        .await
        .json();
    assert_eq!(
        v["choices"][0]["message"]["content"], "tok0 tok1 ",
        "header wins"
    );
    assert_eq!(
        v["choices"][0]["finish_reason"], "stop",
        "header gives stop"
    );

    let requests = mock.requests();
    assert_eq!(requests.len(), 4, "all requests recorded");
    assert_eq!(mock.request_count(), 4, "request_count");
    assert_eq!(mock.connections(), 4, "one connection per fetch");
    let r = &requests[0];
    assert_eq!(r.method, Method::POST, "recorded method");
    assert_eq!(r.path_and_query, CHAT, "recorded path");
    assert_eq!(r.version, Version::HTTP_11, "recorded version");
    assert_eq!(
        r.headers.get("host").map(|v| v.as_bytes()),
        Some(&b"mock"[..]),
        "recorded headers"
    );
    assert_eq!(r.body, chat_body(false, false).to_string(), "recorded body");
}

#[tokio::test]
async fn chat_sse_event_sequence() {
    let mock = MockUpstream::start().await.expect("start mock");
    for include_usage in [false, true] {
        let req = || {
            post(
                CHAT,
                &[("x-mock-chunks", "3")],
                &chat_body(true, include_usage),
            )
        };
        let resp = fetch(&mock, req()).await;
        assert_eq!(resp.status, StatusCode::OK, "status");
        assert_eq!(
            resp.header("content-type"),
            "text/event-stream",
            "content type"
        );
        assert_eq!(resp.header("cache-control"), "no-cache", "cache-control");
        assert_eq!(resp.header("transfer-encoding"), "chunked", "chunked");
        let events = sse_events(&resp.body);
        let expected_len = if include_usage { 7 } else { 6 };
        assert_eq!(events.len(), expected_len, "event count: {events:?}");
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "ends with [DONE]"
        );

        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| parse(e))
            .collect();
        let id = &chunks[0]["id"];
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk", "object of {c}");
            assert_eq!(&c["id"], id, "same id in every chunk");
            assert_eq!(c["model"], "gpt-test", "model of {c}");
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""}),
            "role chunk"
        );
        for i in 0..3 {
            assert_eq!(
                chunks[1 + i]["choices"][0]["delta"],
                json!({"content": format!("tok{i} ")}),
                "content chunk {i}"
            );
            assert_eq!(
                chunks[1 + i]["choices"][0]["finish_reason"],
                Value::Null,
                "no finish yet"
            );
        }
        assert_eq!(chunks[4]["choices"][0]["delta"], json!({}), "finish delta");
        assert_eq!(
            chunks[4]["choices"][0]["finish_reason"], "stop",
            "finish reason"
        );
        if include_usage {
            assert_eq!(
                chunks[5]["choices"],
                json!([]),
                "usage chunk has no choices"
            );
            assert_eq!(
                chunks[5]["usage"],
                json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
                "usage chunk"
            );
        }

        let again = fetch(&mock, req()).await;
        assert_eq!(
            resp.body, again.body,
            "identical requests give identical SSE bytes"
        );
    }
    assert_eq!(mock.completed_streams(), 4, "completed streams");
    assert_eq!(mock.cancelled_streams(), 0, "no cancelled streams");
}

#[tokio::test]
async fn completions_json_and_sse() {
    let mock = MockUpstream::start().await.expect("start mock");
    let body = json!({"model": "m", "prompt": ["one two", [1, 2, 3]], "max_tokens": 2});
    let resp = fetch(&mock, post(COMPLETIONS, &[], &body)).await;
    assert_eq!(resp.status, StatusCode::OK, "status");
    let v = resp.json();
    assert!(
        v["id"].as_str().is_some_and(|id| id.starts_with("cmpl-")),
        "id: {v}"
    );
    assert_eq!(v["object"], "text_completion", "object");
    assert_eq!(
        v["choices"][0],
        json!({"text": "tok0 tok1 ", "index": 0, "logprobs": null, "finish_reason": "length"}),
        "choice"
    );
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
        "usage"
    );

    let body =
        json!({"prompt": "say hi", "stream": true, "stream_options": {"include_usage": true}});
    let resp = fetch(&mock, post(COMPLETIONS, &[("x-mock-chunks", "2")], &body)).await;
    assert_eq!(
        resp.header("content-type"),
        "text/event-stream",
        "content type"
    );
    let events = sse_events(&resp.body);
    assert_eq!(
        events.len(),
        5,
        "2 tokens, finish, usage, [DONE]: {events:?}"
    );
    let texts: Vec<Value> = events[..3]
        .iter()
        .map(|e| parse(e)["choices"][0]["text"].clone())
        .collect();
    assert_eq!(texts, [json!("tok0 "), json!("tok1 "), json!("")], "texts");
    assert_eq!(
        parse(&events[2])["choices"][0]["finish_reason"],
        "stop",
        "finish"
    );
    assert_eq!(parse(&events[3])["usage"]["total_tokens"], 4, "usage");
    assert_eq!(parse(&events[0])["model"], "mock-model", "default model");
    assert_eq!(events[4], "[DONE]", "done");
}

#[tokio::test]
async fn tool_calls_json_and_sse() {
    let mock = MockUpstream::start().await.expect("start mock");
    let tools = [("x-mock-tools", "1")];
    let v = fetch(&mock, post(CHAT, &tools, &chat_body(false, false)))
        .await
        .json();
    let message = &v["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null, "no content: {v}");
    assert_eq!(message["tool_calls"][0]["type"], "function", "tool type");
    assert_eq!(
        message["tool_calls"][0]["function"]["name"], "get_weather",
        "tool name"
    );
    assert_eq!(
        message["tool_calls"][0]["function"]["arguments"], "{\"city\": \"Paris\"}",
        "tool arguments"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "finish");

    let resp = fetch(&mock, post(CHAT, &tools, &chat_body(true, false))).await;
    let events = sse_events(&resp.body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| parse(e))
        .collect();
    let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(first["index"], 0, "index");
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_")),
        "id: {first}"
    );
    assert_eq!(first["function"]["name"], "get_weather", "name");
    assert_eq!(first["function"]["arguments"], "", "empty arguments first");
    let args: String = chunks[1..]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str())
        .collect();
    assert_eq!(args, "{\"city\": \"Paris\"}", "streamed arguments");
    assert!(
        chunks.len() >= 4,
        "arguments come in several pieces: {events:?}"
    );
    let last = chunks.last().expect("a finish chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls", "finish");
}

#[tokio::test]
async fn routes_prefix_auth_and_errors() {
    let mock = MockUpstream::start_with(MockOptions {
        prefix: "/openai".into(),
        require_key: Some("sk-test".into()),
        ..MockOptions::default()
    })
    .await
    .expect("start mock");
    let auth = [("authorization", "Bearer sk-test")];

    let models = fetch(&mock, request(Method::GET, "/openai/v1/models", &auth, "")).await;
    assert_eq!(models.status, StatusCode::OK, "models status");
    assert_eq!(models.json()["data"][0]["id"], "mock-model", "models body");

    let unprefixed = fetch(&mock, request(Method::GET, "/v1/models", &auth, "")).await;
    assert_eq!(
        unprefixed.status,
        StatusCode::NOT_FOUND,
        "route outside prefix"
    );
    assert_eq!(
        unprefixed.json(),
        json!({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}),
        "404 body"
    );

    let no_key = fetch(&mock, request(Method::GET, "/openai/v1/models", &[], "")).await;
    assert_eq!(no_key.status, StatusCode::UNAUTHORIZED, "missing key");
    assert_eq!(
        no_key.json()["error"]["code"],
        "invalid_api_key",
        "401 body"
    );
    let wrong = fetch(
        &mock,
        request(
            Method::GET,
            "/openai/v1/models",
            &[("authorization", "Bearer x")],
            "",
        ),
    )
    .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "wrong key");

    let bad = fetch(
        &mock,
        request(
            Method::POST,
            "/openai/v1/chat/completions",
            &auth,
            "{not json",
        ),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "bad JSON");
    let v = bad.json();
    assert_eq!(v["error"]["code"], 400, "400 code");
    assert_eq!(v["error"]["type"], "invalid_request_error", "400 type");

    let status = fetch(
        &mock,
        post(
            "/openai/v1/chat/completions",
            &[auth[0], ("x-mock-status", "503")],
            &chat_body(true, true),
        ),
    )
    .await;
    assert_eq!(
        status.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "x-mock-status"
    );
    assert_eq!(
        status.header("content-type"),
        "application/json",
        "error is JSON, not SSE"
    );
    assert_eq!(
        status.json(),
        json!({"error": {"message": "mock error", "type": "server_error", "code": 503}}),
        "503 body"
    );
    let status = fetch(
        &mock,
        post(
            "/openai/v1/completions",
            &[auth[0], ("x-mock-status", "429")],
            &json!({}),
        ),
    )
    .await;
    assert_eq!(status.status, StatusCode::TOO_MANY_REQUESTS, "429");
    assert_eq!(
        status.json()["error"]["type"],
        "invalid_request_error",
        "4xx type"
    );

    let not_json = fetch(
        &mock,
        post(
            "/openai/v1/chat/completions",
            &[auth[0], ("x-mock-fault", "not-json")],
            &json!({}),
        ),
    )
    .await;
    assert_eq!(not_json.status, StatusCode::OK, "not-json status");
    assert_eq!(
        not_json.header("content-type"),
        "application/json",
        "not-json content type"
    );
    assert_eq!(&not_json.body[..], b"this is not json", "not-json body");
    assert_eq!(mock.request_count(), 8, "all requests counted");
}

#[tokio::test]
async fn abort_after_breaks_the_body() {
    let mock = MockUpstream::start().await.expect("start mock");
    let mut conn = connect(&mock).await;
    let req = post(
        CHAT,
        &[("x-mock-fault", "abort-after=2")],
        &chat_body(true, false),
    );
    let resp = conn.sender.send_request(req).await.expect("headers arrive");
    assert_eq!(resp.status(), StatusCode::OK, "status before the abort");
    let mut body = resp.into_body();
    let mut received = Vec::new();
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                received.extend_from_slice(frame.data_ref().map_or(&b""[..], |d| &d[..]))
            }
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert!(error.is_some(), "an aborted body must end with an error");
    assert_eq!(
        sse_events(&received).len(),
        2,
        "exactly 2 events before the abort"
    );
    assert_eq!(mock.completed_streams(), 0, "not completed");
    assert_eq!(
        mock.cancelled_streams(),
        0,
        "an abort is not a cancellation"
    );
}

#[tokio::test]
async fn canned_answers_come_whole_whatever_the_request() {
    let mock = MockUpstream::start().await.expect("start mock");
    let garbage_sse: Vec<u8> = canned::garbage_sse().concat();
    let cases: [(Fault, Value, &str, &[u8]); 3] = [
        (
            Fault::GarbageSse,
            chat_body(false, false),
            "text/event-stream",
            &garbage_sse,
        ),
        (
            Fault::GarbageJson,
            chat_body(true, true),
            "application/json",
            &canned::garbage_json(),
        ),
        (
            Fault::AbsurdUsage,
            chat_body(true, false),
            "application/json",
            canned::ABSURD_USAGE.as_bytes(),
        ),
    ];
    let mut sent = 0;
    for (fault, body, content_type, expected) in cases {
        let value = fault.to_string();
        let got = fetch(&mock, post(CHAT, &[(FAULT_HEADER, &value)], &body)).await;
        assert_eq!(got.status, StatusCode::OK, "{fault} status");
        assert_eq!(got.header("content-type"), content_type, "{fault} type");
        assert!(
            got.body[..] == *expected,
            "{fault}: {} bytes, expected {}",
            got.body.len(),
            expected.len()
        );
        sent += expected.len() as u64;
    }
    assert_eq!(mock.body_bytes_sent(), sent, "every body byte counted");
    assert_eq!(mock.completed_streams(), 1, "garbage-sse is a stream");
}

#[tokio::test]
async fn a_flood_sends_its_bytes_only_as_fast_as_they_are_read() {
    let mock = MockUpstream::start().await.expect("start mock");
    // Whole: every byte, in frames of whole events.
    let total = 1_000_000;
    let flood = Fault::Flood(total).to_string();
    let got = fetch(
        &mock,
        post(CHAT, &[(FAULT_HEADER, &flood)], &chat_body(true, false)),
    )
    .await;
    assert_eq!(got.status, StatusCode::OK, "flood status");
    assert_eq!(got.body.len() as u64, total, "flood length");
    assert!(
        got.body.starts_with(canned::FLOOD_EVENT),
        "flood starts with its event"
    );
    assert_eq!(mock.completed_streams(), 1, "a whole flood completes");

    // Read once, then left: the mock made little more than was read, and counts a cancel.
    let mut conn = connect(&mock).await;
    let huge = Fault::Flood(u64::MAX).to_string();
    let req = post(CHAT, &[(FAULT_HEADER, &huge)], &chat_body(true, false));
    let resp = conn.sender.send_request(req).await.expect("headers arrive");
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame").expect("no error");
    assert!(first.is_data(), "a data frame first");
    drop(body);
    drop(conn);
    assert!(
        mock.wait_cancelled(1, Duration::from_secs(5)).await,
        "the unread flood is cancelled"
    );
    let made = mock.body_bytes_sent() - total;
    assert!(
        made < 64 * 1024 * 1024,
        "the mock makes frames only as they are taken: {made} bytes"
    );
}

#[test]
fn fault_header_values_round_trip() {
    for value in [
        "reset-before-headers",
        "stall-headers",
        "stall-body",
        "abort-after=3",
        "not-json",
        "garbage-json",
        "garbage-sse",
        "absurd-usage",
        "flood=1048576",
    ] {
        let fault: Fault = value.parse().expect("a known fault");
        assert_eq!(fault.to_string(), value, "{value} round-trips");
    }
    assert!("abort-after=x".parse::<Fault>().is_err(), "a bad count");
    assert!("flood".parse::<Fault>().is_err(), "a flood needs its size");
}

#[tokio::test]
async fn reset_before_headers_gives_no_response() {
    let mock = MockUpstream::start().await.expect("start mock");
    let mut conn = connect(&mock).await;
    let req = post(
        CHAT,
        &[("x-mock-fault", "reset-before-headers")],
        &chat_body(false, false),
    );
    let result = conn.sender.send_request(req).await;
    assert!(
        result.is_err(),
        "expected a connection error, got {result:?}"
    );
    assert_eq!(mock.request_count(), 1, "the request was read");
}

#[tokio::test]
async fn dropped_receiver_counts_as_cancelled() {
    let mock = MockUpstream::start().await.expect("start mock");

    // A slow stream whose client goes away after the first event.
    let mut conn = connect(&mock).await;
    let headers = [("x-mock-chunks", "100"), ("x-mock-chunk-delay-ms", "20")];
    let resp = conn
        .sender
        .send_request(post(CHAT, &headers, &chat_body(true, false)))
        .await
        .expect("send");
    let mut body = resp.into_body();
    let first = body
        .frame()
        .await
        .expect("a first frame")
        .expect("frame ok");
    assert!(first.is_data(), "first frame is data");
    drop(body);
    drop(conn);
    assert!(
        mock.wait_cancelled(1, Duration::from_secs(2)).await,
        "cancellation of a slow stream not seen"
    );

    // A stalled stream: 2 events, then nothing until the client leaves.
    let mut conn = connect(&mock).await;
    let resp = conn
        .sender
        .send_request(post(
            CHAT,
            &[("x-mock-fault", "stall-body")],
            &chat_body(true, false),
        ))
        .await
        .expect("send");
    let mut body = resp.into_body();
    let mut received = Vec::new();
    while sse_events_prefix(&received) < 2 {
        let frame = body.frame().await.expect("frame").expect("frame ok");
        received.extend_from_slice(frame.data_ref().expect("data frame"));
    }
    let stalled = tokio::time::timeout(Duration::from_millis(100), body.frame()).await;
    assert!(
        stalled.is_err(),
        "stall-body must not send more than 2 events"
    );
    drop(body);
    drop(conn);
    assert!(
        mock.wait_cancelled(2, Duration::from_secs(2)).await,
        "cancellation of a stalled stream not seen"
    );
    assert_eq!(mock.completed_streams(), 0, "nothing completed");
}

/// Number of complete events in a partial SSE body.
fn sse_events_prefix(body: &[u8]) -> usize {
    body.windows(2).filter(|w| w == b"\n\n").count()
}

#[tokio::test]
async fn delays_and_stalled_headers() {
    let mock = MockUpstream::start().await.expect("start mock");

    let start = Instant::now();
    let resp = fetch(
        &mock,
        request(
            Method::GET,
            "/v1/models",
            &[("x-mock-header-delay-ms", "150")],
            "",
        ),
    )
    .await;
    assert_eq!(resp.status, StatusCode::OK, "delayed status");
    assert!(
        start.elapsed() >= Duration::from_millis(150),
        "header delay: {:?}",
        start.elapsed()
    );

    // role, 2 tokens, finish, [DONE]: 4 gaps of 40 ms.
    let start = Instant::now();
    let headers = [("x-mock-chunks", "2"), ("x-mock-chunk-delay-ms", "40")];
    let resp = fetch(&mock, post(CHAT, &headers, &chat_body(true, false))).await;
    assert_eq!(sse_events(&resp.body).len(), 5, "event count");
    assert!(
        start.elapsed() >= Duration::from_millis(160),
        "chunk delay: {:?}",
        start.elapsed()
    );

    let mut conn = connect(&mock).await;
    let req = post(
        CHAT,
        &[("x-mock-fault", "stall-headers")],
        &chat_body(false, false),
    );
    let result =
        tokio::time::timeout(Duration::from_millis(200), conn.sender.send_request(req)).await;
    assert!(result.is_err(), "stall-headers must not answer");
}

/// Reads from `tcp` until `buf` ends with `needle`.
async fn read_until(tcp: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    let mut chunk = [0u8; 4096];
    while !buf.ends_with(needle) {
        let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut chunk))
            .await
            .expect("read timed out")
            .expect("read");
        assert!(
            n > 0,
            "connection closed early; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn raw_request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn close_after_stream_closes_a_keep_alive_connection() {
    let mock = MockUpstream::start_with(MockOptions {
        close_after_stream: true,
        ..MockOptions::default()
    })
    .await
    .expect("start mock");
    let mut tcp = TcpStream::connect(mock.addr()).await.expect("connect");

    // A JSON response keeps the connection open...
    let body = json!({"prompt": "x"}).to_string();
    tcp.write_all(&raw_request(COMPLETIONS, &body))
        .await
        .expect("write");
    let mut buf = Vec::new();
    read_until(&mut tcp, &mut buf, b"}}").await;
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "JSON response: {:?}",
        String::from_utf8_lossy(&buf)
    );

    // ...an SSE response on the same connection is followed by a close...
    let body = json!({"prompt": "x", "stream": true}).to_string();
    tcp.write_all(&raw_request(COMPLETIONS, &body))
        .await
        .expect("write");
    let mut buf = Vec::new();
    read_until(&mut tcp, &mut buf, b"data: [DONE]\n\n\r\n0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "SSE response: {text}");
    assert!(
        !text.contains("connection: close"),
        "the quirk is an unannounced close: {text}"
    );
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut rest))
        .await
        .expect("the server must close the connection after the stream");
    assert!(matches!(n, Ok(0) | Err(_)), "expected EOF, got {n:?}");
    assert_eq!(mock.completed_streams(), 1, "the stream completed");

    // ...so a keep-alive client needs a new connection for the next request.
    let resp = fetch(&mock, post(COMPLETIONS, &[], &json!({"prompt": "x"}))).await;
    assert_eq!(resp.status, StatusCode::OK, "new connection works");
    assert_eq!(mock.connections(), 2, "connections");
}

#[tokio::test]
async fn keep_alive_connection_serves_several_streams() {
    let mock = MockUpstream::start().await.expect("start mock");
    let mut conn = connect(&mock).await;
    for _ in 0..3 {
        let req = post(CHAT, &[("x-mock-chunks", "2")], &chat_body(true, false));
        let resp = conn.sender.send_request(req).await.expect("send");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(sse_events(&body).len(), 5, "events");
        conn.sender.ready().await.expect("connection stays usable");
    }
    assert_eq!(mock.connections(), 1, "one connection reused");
    assert_eq!(mock.completed_streams(), 3, "completed");
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let mock = MockUpstream::start().await.expect("start mock");
    let tcp = TcpStream::connect(mock.addr()).await.expect("connect");
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    let uri = format!("{}{CHAT}", mock.url());
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .body(Full::new(Bytes::from(chat_body(true, true).to_string())))
        .expect("request");
    let resp: http::Response<Incoming> = sender.send_request(req).await.expect("h2 send");
    assert_eq!(resp.version(), Version::HTTP_2, "h2 response");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        sse_events(&body).len(),
        12,
        "role, 8 tokens, finish, usage, [DONE]"
    );
    let h1 = fetch(&mock, post(CHAT, &[], &chat_body(true, true))).await;
    assert_eq!(body, h1.body, "h2 and h1 give the same bytes");
    assert_eq!(
        mock.requests()[0].version,
        Version::HTTP_2,
        "recorded version"
    );

    // abort-after over h2: the events before the abort still arrive.
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}{CHAT}", mock.url()))
        .header("x-mock-fault", "abort-after=2")
        .body(Full::new(Bytes::from(chat_body(true, false).to_string())))
        .expect("request");
    let resp = sender.send_request(req).await.expect("h2 send");
    let mut body = resp.into_body();
    let mut received = Vec::new();
    let error = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                received.extend_from_slice(frame.data_ref().map_or(&b""[..], |d| &d[..]))
            }
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    assert!(error.is_some(), "an aborted h2 body must end with an error");
    assert_eq!(
        sse_events(&received).len(),
        2,
        "2 events before the h2 abort"
    );
    task.abort();
}

#[tokio::test]
async fn otlp_trace_exports_are_taken_and_discarded() {
    let mock = MockUpstream::start().await.expect("start mock");
    let export = fetch(
        &mock,
        request(
            Method::POST,
            "/v1/traces",
            &[("content-type", "application/x-protobuf")],
            "\n\0",
        ),
    )
    .await;
    assert_eq!(export.status, StatusCode::OK, "an export is taken");
    assert!(
        export.body.is_empty(),
        "answered with an empty response message"
    );
    assert_eq!(
        export.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/x-protobuf"[..])
    );
    let elsewhere = fetch(&mock, request(Method::GET, "/v1/traces", &[], "")).await;
    assert_eq!(
        elsewhere.status,
        StatusCode::NOT_FOUND,
        "only POST is a sink"
    );
}
