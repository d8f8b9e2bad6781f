//! The core proxy: bytes pass through unchanged, headers follow the rules, failures get the
//! documented statuses, streams are neither buffered nor left running when the client leaves.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mock_upstream::{MockOptions, MockUpstream};

use crate::common::{self, chat_body, completions_body, post, TestGateway};

const CHAT: &str = "/openai/v1/chat/completions";

#[tokio::test]
async fn json_and_sse_bytes_are_identical_direct_and_through_the_gateway() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;

    let cases = [
        ("/v1/chat/completions", chat_body(false, false), vec![]),
        ("/v1/chat/completions", chat_body(true, false), vec![]),
        ("/v1/chat/completions", chat_body(true, true), vec![]),
        (
            "/v1/chat/completions",
            chat_body(true, true),
            vec![("x-mock-tools", "1")],
        ),
        (
            "/v1/chat/completions",
            chat_body(false, false),
            vec![("x-mock-tools", "1")],
        ),
        ("/v1/completions", completions_body(false), vec![]),
        ("/v1/completions", completions_body(true), vec![]),
    ];
    for (path, body, headers) in cases {
        let direct = post(&format!("{}{path}", upstream.url()), &body, &headers).await;
        for prefix in ["", "/openai"] {
            let through = post(&format!("{}{prefix}{path}", gateway.url()), &body, &headers).await;
            assert_eq!(direct.0, 200, "direct status for {path}");
            assert_eq!(
                through.0, direct.0,
                "status through the gateway for {prefix}{path}"
            );
            assert_eq!(
                through.2, direct.2,
                "body bytes through {prefix}{path} {headers:?} differ from direct"
            );
            assert_eq!(
                through.1.get("content-type"),
                direct.1.get("content-type"),
                "content-type kept for {path}"
            );
        }
    }
}

#[tokio::test]
async fn request_reaches_the_upstream_byte_for_byte_under_the_configured_base_path() {
    let upstream = MockUpstream::start_with(MockOptions {
        prefix: "/openai".into(),
        ..MockOptions::default()
    })
    .await
    .expect("mock upstream");
    let gateway = TestGateway::start(&format!("{}/openai/", upstream.url())).await;
    // Odd spacing, escapes and non-ASCII: nothing may be re-serialised on the way.
    let body = "{ \"model\" : \"mock-model\",\n\t\"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9llo \u{1F600} \\\"q\\\"\"}] ,\"x_vendor\":{\"a\":[1,2.50,3e2]} }";
    for path in [
        "/v1/chat/completions?trace=1&x=%20y",
        "/openai/v1/chat/completions?trace=1&x=%20y",
    ] {
        let (status, _, _) = post(&format!("{}{path}", gateway.url()), body, &[]).await;
        assert_eq!(status, 200, "{path}");
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2, "each request reaches the upstream once");
    for request in seen {
        assert_eq!(
            request.body.as_ref(),
            body.as_bytes(),
            "request body changed on the way"
        );
        assert_eq!(
            request.path_and_query, "/openai/v1/chat/completions?trace=1&x=%20y",
            "path mapped under the base path, query kept"
        );
    }
}

#[tokio::test]
async fn headers_follow_the_rules_both_ways() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    std::env::set_var("TOLLGATE_TEST_UPSTREAM_KEY_HEADERS", "sk-upstream-secret");
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "",
        "api_key_env = \"TOLLGATE_TEST_UPSTREAM_KEY_HEADERS\"",
        "",
    ))
    .await;

    let response = common::client()
        .post(format!("{}{CHAT}", gateway.url()))
        .header("content-type", "application/json")
        .header("api-key", common::TEST_KEY)
        .header("x-api-key", common::TEST_KEY)
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic abc")
        .header("x-custom", "kept")
        .header("host", "evil.example")
        .header("content-type", "application/json")
        .body(chat_body(false, false))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let generated_id = response
        .headers()
        .get("x-request-id")
        .expect("x-request-id is generated and returned")
        .to_str()
        .expect("ascii")
        .to_owned();
    let uuid = uuid::Uuid::parse_str(&generated_id).expect("the generated id is a UUID");
    assert_eq!(uuid.get_version_num(), 4, "a random UUID: {generated_id}");
    assert_eq!(
        generated_id,
        uuid.hyphenated().to_string(),
        "lower-case, hyphenated"
    );
    assert!(
        response.headers().get("keep-alive").is_none(),
        "hop-by-hop from upstream dropped"
    );

    let seen = &upstream.requests()[0];
    let header = |name: &str| {
        seen.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("<bin>").to_owned())
    };
    assert_eq!(
        header("authorization").as_deref(),
        Some("Bearer sk-upstream-secret"),
        "gateway credential swapped in"
    );
    assert_eq!(header("api-key"), None, "client api-key removed");
    assert_eq!(header("x-api-key"), None, "client x-api-key removed");
    assert_eq!(header("x-hop"), None, "header named in Connection removed");
    assert_eq!(header("keep-alive"), None, "keep-alive removed");
    assert_eq!(
        header("proxy-authorization"),
        None,
        "proxy-authorization removed"
    );
    assert_eq!(
        header("x-custom").as_deref(),
        Some("kept"),
        "end-to-end header kept"
    );
    assert_eq!(
        header("host"),
        Some(upstream.addr().to_string()),
        "host is the upstream's"
    );
    assert_eq!(
        header("x-request-id"),
        Some(generated_id),
        "request id forwarded"
    );
    assert_eq!(
        header("accept-encoding").as_deref(),
        Some("identity"),
        "plain bytes asked for"
    );

    // A client-supplied request id is kept.
    let response = common::client()
        .post(format!("{}{CHAT}", gateway.url()))
        .header("x-request-id", "client-chosen-id")
        .header("content-type", "application/json")
        .body(chat_body(false, false))
        .send()
        .await
        .expect("request");
    assert_eq!(
        response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("client-chosen-id"),
        "client's request id returned"
    );
    assert_eq!(
        upstream.requests()[1]
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("client-chosen-id"),
        "client's request id forwarded"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_answered_without_reaching_the_upstream() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let client = common::client();
    for (method, path, status, allow) in [
        ("POST", "/v1/embeddings", 404, None),
        ("GET", "/", 404, None),
        ("POST", "/openai/v1/chat/completions/", 404, None),
        ("GET", "/v1/chat/completions", 405, Some("POST")),
        ("PUT", "/openai/v1/completions", 405, Some("POST")),
        ("POST", "/v1/models", 405, Some("GET")),
    ] {
        let response = client
            .request(
                method.parse().expect("method"),
                format!("{}{path}", gateway.url()),
            )
            .send()
            .await
            .expect("request");
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert_eq!(
            response
                .headers()
                .get("allow")
                .and_then(|v| v.to_str().ok()),
            allow,
            "Allow header for {method} {path}"
        );
        assert!(
            response.headers().contains_key("x-request-id"),
            "request id on errors too"
        );
        let body: serde_json::Value = response.json().await.expect("JSON error body");
        assert_eq!(body["status"], status, "problem status for {path}");
        assert!(
            body["error"]["message"].is_string(),
            "OpenAI-style error for {path}"
        );
    }
    assert_eq!(upstream.request_count(), 0, "nothing was forwarded");

    let models = client
        .get(format!("{}/openai/v1/models", gateway.url()))
        .send()
        .await
        .expect("models");
    assert_eq!(models.status(), 200);
    assert_eq!(upstream.requests()[0].path_and_query, "/v1/models");
}

#[tokio::test]
async fn upstream_failures_get_502_504_and_error_statuses_pass_through() {
    // Unreachable.
    let gateway = TestGateway::start(&format!("http://127.0.0.1:{}", common::closed_port())).await;
    let (status, _, body) = post(
        &format!("{}{CHAT}", gateway.url()),
        &chat_body(false, false),
        &[],
    )
    .await;
    assert_eq!(status, 502, "unreachable upstream");
    let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "no internals in a 5xx body: {body}"
    );

    // Too slow to send headers.
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "",
        "response_header_timeout = \"300ms\"",
        "",
    ))
    .await;
    let started = Instant::now();
    let (status, _, _) = post(
        &format!("{}{CHAT}", gateway.url()),
        &chat_body(false, false),
        &[("x-mock-header-delay-ms", "5000")],
    )
    .await;
    assert_eq!(status, 504, "header timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "504 came at the timeout, not after the upstream"
    );

    // Upstream error statuses come through as they were sent.
    for code in ["400", "429", "500", "503"] {
        let headers = [("x-mock-status", code)];
        let direct = post(
            &format!("{}/v1/chat/completions", upstream.url()),
            &chat_body(true, false),
            &headers,
        )
        .await;
        let through = post(
            &format!("{}{CHAT}", gateway.url()),
            &chat_body(true, false),
            &headers,
        )
        .await;
        assert_eq!(through.0.to_string(), code, "status {code} passed through");
        assert_eq!(
            through.2, direct.2,
            "error body {code} passed through unchanged"
        );
    }

    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("tollgate_upstream_errors_total{kind=\"timeout\",upstream=\"default\"} 1"),
        "timeout counted: {metrics}"
    );
}

#[tokio::test]
async fn reset_before_headers_is_a_502_and_the_request_is_not_sent_again() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let (status, _, _) = post(
        &format!("{}{CHAT}", gateway.url()),
        &chat_body(false, false),
        &[("x-mock-fault", "reset-before-headers")],
    )
    .await;
    assert_eq!(status, 502);
    assert_eq!(
        upstream.request_count(),
        1,
        "the upstream read the request: it may have acted on it, so it is not sent again"
    );
    let metrics = gateway.metrics().await;
    assert!(
        !metrics
            .contains("tollgate_upstream_errors_total{kind=\"retried\",upstream=\"default\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_upstream_errors_total{kind=\"broken\",upstream=\"default\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_upstream_that_closes_after_every_stream_never_fails_a_request() {
    // llama.cpp's server: closes the connection after each SSE response despite keep-alive.
    let upstream = MockUpstream::start_with(MockOptions {
        close_after_stream: true,
        ..MockOptions::default()
    })
    .await
    .expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let client = common::client();
    for i in 0..40 {
        let body = if i % 3 == 2 {
            chat_body(false, false)
        } else {
            chat_body(true, i % 2 == 0)
        };
        let response = client
            .post(format!("{}{CHAT}", gateway.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "request {i}");
        response.bytes().await.expect("whole body");
    }
    assert!(
        upstream.connections() > 10,
        "the upstream really closed connections"
    );
}

#[tokio::test]
async fn each_chunk_reaches_the_client_before_the_next_is_produced() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let response = common::client()
        .post(format!("{}{CHAT}", gateway.url()))
        .header("x-mock-chunks", "3")
        .header("x-mock-chunk-delay-ms", "700")
        .header("content-type", "application/json")
        .body(chat_body(true, false))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let headers_at = Instant::now();
    let mut stream = response.bytes_stream();
    let mut events = Vec::new();
    let mut seen = String::new();
    while let Some(chunk) = stream.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
        while let Some(end) = seen.find("\n\n") {
            events.push((headers_at.elapsed(), seen[..end].to_owned()));
            seen.drain(..end + 2);
        }
    }
    assert!(
        events.len() >= 5,
        "role, 3 content, finish, done: {events:?}"
    );
    // The upstream waits 700 ms between events; each must arrive before the next is produced.
    for pair in events.windows(2).take(4) {
        let gap = pair[1].0.saturating_sub(pair[0].0);
        assert!(
            gap > Duration::from_millis(400),
            "events arrived together (buffered): {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    assert!(
        events[0].0 < Duration::from_millis(400),
        "first event came late: {:?}",
        events[0].0
    );
}

#[tokio::test]
async fn events_already_there_leave_together_and_byte_for_byte() {
    // The mock writes its events back to back, many to a write; the gateway reads them many to
    // a read, and must hand on together what it read together (few HTTP chunks, each write many
    // events), with the bytes unchanged.
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let headers = [("x-mock-chunks", "32"), ("x-mock-chunk-delay-ms", "0")];
    for include_usage in [false, true] {
        let body = chat_body(true, include_usage);
        let direct = post(
            &format!("{}/v1/chat/completions", upstream.url()),
            &body,
            &headers,
        )
        .await;
        let direct = direct.2.to_vec();
        let events = direct.windows(2).filter(|w| w == b"\n\n").count();
        assert!(
            events > 32,
            "the stream has its 32 tokens and more: {events}"
        );
        let (chunks, bytes) = chunked_answer(gateway.addr, &body, &headers).await;
        assert!(
            bytes == direct,
            "the bytes, through the gateway (include_usage: {include_usage})"
        );
        assert!(
            chunks.len() * 4 <= events,
            "{events} events came in {} chunks of {:?} bytes: events already read were sent one by one",
            chunks.len(),
            chunks
        );
    }
}

/// POSTs `body` to the gateway's chat endpoint on a raw socket and reads the chunked answer:
/// the size of each HTTP chunk, and the body they make.
async fn chunked_answer(
    addr: std::net::SocketAddr,
    body: &str,
    headers: &[(&str, &str)],
) -> (Vec<usize>, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        common::TEST_KEY,
        body.len()
    );
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += "\r\n";
    request += body;
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    socket.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut answer))
        .await
        .expect("the answer ends")
        .expect("read");
    let line_end = |bytes: &[u8]| bytes.windows(2).position(|w| w == b"\r\n");
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&answer[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = &answer[head_end + 4..];
    let (mut chunks, mut bytes) = (Vec::new(), Vec::new());
    loop {
        let end = line_end(rest).expect("a chunk size line");
        let size = std::str::from_utf8(&rest[..end]).expect("ASCII");
        let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
        if size == 0 {
            break;
        }
        chunks.push(size);
        rest = &rest[end + 2..];
        bytes.extend_from_slice(&rest[..size]);
        rest = rest[size..]
            .strip_prefix(b"\r\n")
            .expect("the chunk's CRLF");
    }
    (chunks, bytes)
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_cancels_the_upstream_request() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let response = common::client()
        .post(format!("{}{CHAT}", gateway.url()))
        .header("x-mock-chunks", "100")
        .header("x-mock-chunk-delay-ms", "50")
        .header("content-type", "application/json")
        .body(chat_body(true, false))
        .send()
        .await
        .expect("request");
    let mut stream = response.bytes_stream();
    let first = stream.next().await.expect("a first chunk").expect("chunk");
    assert!(!first.is_empty());
    drop(stream);
    assert!(
        upstream.wait_cancelled(1, Duration::from_secs(5)).await,
        "the upstream stream was cancelled after the client left"
    );
    assert_eq!(
        upstream.completed_streams(),
        0,
        "the upstream did not run to the end"
    );
}

#[tokio::test]
async fn stalled_and_broken_streams_end_as_errors_for_the_client() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "",
        "idle_timeout = \"300ms\"",
        "",
    ))
    .await;
    for fault in ["stall-body", "abort-after=3"] {
        let response = common::client()
            .post(format!("{}{CHAT}", gateway.url()))
            .header("x-mock-fault", fault)
            .header("content-type", "application/json")
            .body(chat_body(true, false))
            .send()
            .await
            .expect("headers arrive");
        assert_eq!(response.status(), 200, "{fault}");
        let result = response.bytes().await;
        assert!(
            result.is_err(),
            "{fault}: the client must see a broken stream, not a clean end"
        );
    }
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("kind=\"body_idle_timeout\",upstream=\"default\"} 1"),
        "idle timeout counted: {metrics}"
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_a_running_stream_finish() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let mut gateway = TestGateway::start(&upstream.url()).await;
    let response = common::client()
        .post(format!("{}{CHAT}", gateway.url()))
        .header("x-mock-chunks", "10")
        .header("x-mock-chunk-delay-ms", "100")
        .header("content-type", "application/json")
        .body(chat_body(true, false))
        .send()
        .await
        .expect("request");
    let done = gateway.begin_shutdown();
    let body = response
        .bytes()
        .await
        .expect("the stream finishes despite the shutdown");
    assert!(
        String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"),
        "stream ran to its end"
    );
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .expect("shutdown completes once the stream is done")
        .expect("server task ends cleanly");
    let refused = reqwest::Client::new()
        .post(format!("{}{CHAT}", gateway.url()))
        .header("content-type", "application/json")
        .body(chat_body(false, false))
        .send()
        .await;
    assert!(refused.is_err(), "no new connections after shutdown");
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "authorization",
        reqwest::header::HeaderValue::from_static("Bearer tg-test-key"),
    );
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .default_headers(headers)
        .build()
        .expect("h2c client");
    for body in [chat_body(false, false), chat_body(true, true)] {
        let direct = post(
            &format!("{}/v1/chat/completions", upstream.url()),
            &body,
            &[],
        )
        .await;
        let response = client
            .post(format!("{}{CHAT}", gateway.url()))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("h2c request");
        assert_eq!(response.version(), reqwest::Version::HTTP_2, "spoke HTTP/2");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.bytes().await.expect("body"),
            direct.2,
            "same bytes over h2c"
        );
    }
}

#[tokio::test]
async fn metrics_and_health_are_on_the_admin_port_only() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    post(
        &format!("{}{CHAT}", gateway.url()),
        &chat_body(false, false),
        &[],
    )
    .await;
    post(
        &format!("{}{CHAT}", gateway.url()),
        &chat_body(true, false),
        &[],
    )
    .await;

    let metrics = gateway.metrics().await;
    for needle in [
        "tollgate_requests_total{endpoint=\"chat_completions\",key=\"test\",model=\"other\",status=\"200\"} 2",
        "tollgate_request_duration_seconds_count{endpoint=\"chat_completions\",key=\"test\",model=\"other\"} 2",
        "tollgate_overhead_seconds_count 2",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }

    let client = common::client();
    let health = client
        .get(format!("{}/healthz", gateway.admin_url()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = client
        .get(format!("{}/readyz", gateway.admin_url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "upstream is up");
    let on_client_port = client
        .get(format!("{}/metrics", gateway.url()))
        .send()
        .await
        .expect("request");
    assert_eq!(
        on_client_port.status(),
        404,
        "metrics are not served to clients"
    );

    drop(upstream);
    let ready = client
        .get(format!("{}/readyz", gateway.admin_url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503, "upstream gone → not ready");
}
