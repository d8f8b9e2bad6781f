//! Keys and limits: every request is someone's, and no key can take more than its share.

use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use mock_upstream::MockUpstream;
use tollgate::state::clock::Clock;

use crate::common::{self, chat_body, key_entry, post, TestGateway};

const CHAT: &str = "/v1/chat/completions";

/// A config file the test can rewrite, and a gateway started from it with a manual clock.
struct FileGateway {
    file: tempfile::NamedTempFile,
    upstream_url: String,
    gateway: TestGateway,
    clock: Clock,
}

impl FileGateway {
    async fn start(upstream_url: &str, keys: &str) -> FileGateway {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        write_config(&mut file, upstream_url, keys);
        let clock = Clock::manual();
        let gateway = TestGateway::start_file(file.path(), clock.clone()).await;
        FileGateway {
            file,
            upstream_url: upstream_url.to_owned(),
            gateway,
            clock,
        }
    }

    fn write(&mut self, keys: &str) {
        write_config(&mut self.file, &self.upstream_url, keys);
    }

    fn url(&self) -> String {
        format!("{}{CHAT}", self.gateway.url())
    }
}

fn write_config(file: &mut tempfile::NamedTempFile, upstream_url: &str, keys: &str) {
    let text = common::config_toml(upstream_url, "", "", keys);
    let file = file.as_file_mut();
    file.set_len(0).expect("truncate");
    std::io::Seek::rewind(file).expect("rewind");
    file.write_all(text.as_bytes()).expect("write config");
    file.sync_all().expect("sync");
}

async fn post_with_key(
    url: &str,
    key: &str,
    body: &str,
) -> (u16, reqwest::header::HeaderMap, bytes::Bytes) {
    let auth = format!("Bearer {key}");
    post(url, body, &[("authorization", &auth)]).await
}

/// A stream of `chunks` chunks, 30 ms apart, started with `key` (its headers are in).
async fn start_stream(url: &str, key: &str, chunks: &str) -> reqwest::Response {
    common::client()
        .post(url)
        .header("authorization", format!("Bearer {key}"))
        .header("x-mock-chunks", chunks)
        .header("x-mock-chunk-delay-ms", "30")
        .header("content-type", "application/json")
        .body(chat_body(true, false))
        .send()
        .await
        .expect("stream starts")
}

fn header<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn requests_without_a_valid_key_get_401_and_never_reach_the_upstream() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let client = reqwest::Client::new();
    let url = format!("{}{CHAT}", gateway.url());
    // (what, the auth header sent, the error code expected)
    type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 6] = [
        ("missing", None, "missing_api_key"),
        (
            "basic scheme",
            Some(("authorization", "Basic dGVzdDp0ZXN0")),
            "malformed_api_key",
        ),
        (
            "empty bearer",
            Some(("authorization", "Bearer ")),
            "malformed_api_key",
        ),
        (
            "unknown bearer",
            Some(("authorization", "Bearer tg-not-a-key-at-all")),
            "invalid_api_key",
        ),
        (
            "unknown x-api-key",
            Some(("x-api-key", "tg-not-a-key-at-all")),
            "invalid_api_key",
        ),
        (
            "unknown api-key",
            Some(("api-key", "tg-not-a-key-at-all")),
            "invalid_api_key",
        ),
    ];
    for (what, auth, code) in cases {
        let mut request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(chat_body(false, false));
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), 401, "{what}");
        assert_eq!(
            header(response.headers(), "www-authenticate"),
            Some("Bearer"),
            "{what}"
        );
        let body = response.text().await.expect("body");
        assert!(
            !body.contains("tg-not-a-key"),
            "{what}: the key is never echoed: {body}"
        );
        let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(body["error"]["code"], code, "{what}");
        assert_eq!(body["error"]["type"], "authentication_error", "{what}");
    }
    assert_eq!(
        upstream.request_count(),
        0,
        "no refused request reached the upstream"
    );

    // The valid key works in each header clients use.
    for name in ["x-api-key", "api-key"] {
        let response = client
            .post(&url)
            .header(name, common::TEST_KEY)
            .header("content-type", "application/json")
            .body(chat_body(false, false))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{name}");
    }
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(
            "tollgate_rejections_total{key=\"unauthenticated\",reason=\"invalid_api_key\"} 3"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "tollgate_rejections_total{key=\"unauthenticated\",reason=\"missing_api_key\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_rate_limit_admits_exactly_the_burst_then_the_steady_rate() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry(
        "r",
        "tg-r",
        "rate = { requests = 60, per = \"1m\", burst = 3 }",
    );
    let gw = FileGateway::start(&upstream.url(), &keys).await;
    let body = chat_body(false, false);

    for remaining in ["2", "1", "0"] {
        let (status, headers, _) = post_with_key(&gw.url(), "tg-r", &body).await;
        assert_eq!(status, 200, "burst request admitted");
        assert_eq!(header(&headers, "x-ratelimit-limit-requests"), Some("60"));
        assert_eq!(
            header(&headers, "x-ratelimit-remaining-requests"),
            Some(remaining)
        );
        assert_eq!(
            header(&headers, "ratelimit-policy"),
            Some("\"requests\";q=60;w=60")
        );
    }
    let (status, headers, body_bytes) = post_with_key(&gw.url(), "tg-r", &body).await;
    assert_eq!(status, 429, "burst used up");
    assert_eq!(
        header(&headers, "retry-after"),
        Some("1"),
        "next cell in 1 s"
    );
    assert_eq!(
        header(&headers, "x-ratelimit-remaining-requests"),
        Some("0")
    );
    let error: serde_json::Value = serde_json::from_slice(&body_bytes).expect("JSON");
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    assert_eq!(error["error"]["type"], "rate_limit_error");

    // Steady rate: one request per second.
    gw.clock.advance(Duration::from_secs(1));
    assert_eq!(
        post_with_key(&gw.url(), "tg-r", &body).await.0,
        200,
        "one after 1 s"
    );
    assert_eq!(
        post_with_key(&gw.url(), "tg-r", &body).await.0,
        429,
        "only one"
    );

    // A long pause refills the burst, and no more than the burst.
    gw.clock.advance(Duration::from_secs(60));
    let url = gw.url();
    let statuses: Vec<u16> =
        futures_util::future::join_all((0..5).map(|_| post_with_key(&url, "tg-r", &body)))
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 429).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        upstream.request_count(),
        7,
        "refused requests never reached the upstream"
    );

    let metrics = gw.gateway.metrics().await;
    assert!(
        metrics.contains("tollgate_rejections_total{key=\"r\",reason=\"rate\"} 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn retry_after_is_the_wait_rounded_up_to_whole_seconds() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry(
        "slow",
        "tg-slow",
        "rate = { requests = 1, per = \"10s\", burst = 1 }",
    );
    let gw = FileGateway::start(&upstream.url(), &keys).await;
    let body = chat_body(false, false);

    assert_eq!(post_with_key(&gw.url(), "tg-slow", &body).await.0, 200);
    let (status, headers, _) = post_with_key(&gw.url(), "tg-slow", &body).await;
    assert_eq!(status, 429);
    assert_eq!(header(&headers, "retry-after"), Some("10"));
    assert_eq!(header(&headers, "x-ratelimit-reset-requests"), Some("10s"));

    gw.clock.advance(Duration::from_millis(4_500));
    let (status, headers, _) = post_with_key(&gw.url(), "tg-slow", &body).await;
    assert_eq!(status, 429);
    assert_eq!(
        header(&headers, "retry-after"),
        Some("6"),
        "5.5 s left, rounded up"
    );
    assert_eq!(header(&headers, "ratelimit"), Some("\"requests\";r=0;t=6"));

    gw.clock.advance(Duration::from_millis(5_500));
    assert_eq!(
        post_with_key(&gw.url(), "tg-slow", &body).await.0,
        200,
        "admitted after waiting Retry-After"
    );
}

#[tokio::test]
async fn concurrency_slots_are_released_on_end_disconnect_and_upstream_failure() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry("c", "tg-c", "concurrency = 2");
    let gw = FileGateway::start(&upstream.url(), &keys).await;
    let client = common::client();
    // `chunks` events 25 ms apart.
    let slow_stream = |chunks: &'static str| {
        client
            .post(gw.url())
            .header("authorization", "Bearer tg-c")
            .header("x-mock-chunks", chunks)
            .header("x-mock-chunk-delay-ms", "25")
            .header("content-type", "application/json")
            .body(chat_body(true, false))
            .send()
    };
    let first = slow_stream("8").await.expect("first stream");
    let second = slow_stream("400").await.expect("second stream");
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );

    let (status, headers, body) = post_with_key(&gw.url(), "tg-c", &chat_body(false, false)).await;
    assert_eq!(status, 429, "a third request while two stream");
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    let error: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(error["error"]["code"], "concurrency_limit_exceeded");

    // Normal end frees a slot.
    first.bytes().await.expect("first stream completes");
    assert_eq!(
        post_with_key(&gw.url(), "tg-c", &chat_body(false, false))
            .await
            .0,
        200,
        "slot freed by end of stream"
    );

    // A client that leaves mid-stream frees its slot too.
    let mut chunks = second.bytes_stream();
    chunks.next().await.expect("a chunk").expect("chunk");
    drop(chunks);
    assert!(
        upstream.wait_cancelled(1, Duration::from_secs(5)).await,
        "stream cancelled"
    );
    let third = slow_stream("400").await.expect("third stream");
    let fourth = slow_stream("400").await.expect("fourth stream");
    assert_eq!(
        (third.status().as_u16(), fourth.status().as_u16()),
        (200, 200),
        "both slots free after the disconnect"
    );
    drop((third, fourth));
    assert!(
        upstream.wait_cancelled(3, Duration::from_secs(5)).await,
        "streams cancelled"
    );

    // Upstream failures free their slots: broken streams, resets and errors.
    for fault in ["abort-after=2", "reset-before-headers", "stall-headers"] {
        let request = client
            .post(gw.url())
            .header("authorization", "Bearer tg-c")
            .header("x-mock-fault", fault)
            .timeout(Duration::from_millis(1500))
            .header("content-type", "application/json")
            .body(chat_body(true, false))
            .send()
            .await;
        if let Ok(response) = request {
            let _ = response.bytes().await;
        }
    }
    // The client gave up on the stalled request; the gateway notices the closed connection.
    assert!(
        gw.gateway
            .wait_for_metric(
                "tollgate_inflight_requests{key=\"c\"} 0",
                Duration::from_secs(5)
            )
            .await,
        "every slot released after the failures"
    );
    let (url, body) = (gw.url(), chat_body(false, false));
    let statuses: Vec<u16> =
        futures_util::future::join_all((0..2).map(|_| post_with_key(&url, "tg-c", &body)))
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
    assert_eq!(statuses, [200, 200], "no slot leaked by failures");

    let metrics = gw.gateway.metrics().await;
    assert!(
        metrics.contains("tollgate_inflight_requests{key=\"c\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_rejections_total{key=\"c\",reason=\"concurrency\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn reload_adds_removes_and_changes_keys_without_dropping_streams() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let before = format!(
        "{}{}",
        key_entry("a", "tg-a", "rate = { requests = 100, per = \"1m\" }"),
        key_entry("b", "tg-b", "")
    );
    let mut gw = FileGateway::start(&upstream.url(), &before).await;

    // Load across the reload: streams of a kept key and of the key about to be removed.
    let mut running = Vec::new();
    for token in ["tg-a", "tg-b"].repeat(6) {
        let response = start_stream(&gw.url(), token, "10").await;
        assert_eq!(response.status(), 200, "{token} admitted before the reload");
        running.push(response);
    }

    let after = format!(
        "{}{}",
        key_entry("a", "tg-a", "rate = { requests = 5, per = \"1m\" }"),
        key_entry("c", "tg-c", "")
    );
    gw.write(&after);
    let summary = gw.gateway.reload().expect("valid config reloads");
    assert_eq!(summary.added, ["c"]);
    assert_eq!(summary.removed, ["b"]);

    for response in running {
        let body = response
            .bytes()
            .await
            .expect("every stream runs to its end");
        assert!(
            String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"),
            "stream complete across the reload"
        );
    }

    assert_eq!(
        post_with_key(&gw.url(), "tg-b", &chat_body(false, false))
            .await
            .0,
        401,
        "revoked key refused"
    );
    assert_eq!(
        post_with_key(&gw.url(), "tg-c", &chat_body(false, false))
            .await
            .0,
        200,
        "new key admitted"
    );
    let (status, headers, _) = post_with_key(&gw.url(), "tg-a", &chat_body(false, false)).await;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "x-ratelimit-limit-requests"),
        Some("5"),
        "changed limit applies"
    );
}

#[tokio::test]
async fn a_key_removed_and_added_back_keeps_counting_its_streams_in_flight() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry("c", "tg-c", "concurrency = 2");
    let mut gw = FileGateway::start(&upstream.url(), &keys).await;
    let mut running = Vec::new();
    for _ in 0..2 {
        let response = start_stream(&gw.url(), "tg-c", "100").await;
        assert_eq!(response.status(), 200, "both slots taken");
        running.push(response);
    }

    gw.write("");
    assert_eq!(gw.gateway.reload().expect("reload").removed, ["c"]);
    gw.write(&keys);
    assert_eq!(gw.gateway.reload().expect("reload").added, ["c"]);

    assert_eq!(
        post_with_key(&gw.url(), "tg-c", &chat_body(false, false))
            .await
            .0,
        429,
        "the two streams still running hold both slots"
    );
    drop(running);
    let mut status = 0;
    for _ in 0..100 {
        status = post_with_key(&gw.url(), "tg-c", &chat_body(false, false))
            .await
            .0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "their slots come back when they end");
}

#[tokio::test]
async fn unchanged_keys_keep_their_limiter_state_and_a_bad_reload_changes_nothing() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry("r", "tg-r", "rate = { requests = 1, per = \"1h\" }");
    let mut gw = FileGateway::start(&upstream.url(), &keys).await;
    let body = chat_body(false, false);
    assert_eq!(post_with_key(&gw.url(), "tg-r", &body).await.0, 200);
    assert_eq!(post_with_key(&gw.url(), "tg-r", &body).await.0, 429);

    gw.write(&format!("{keys}{}", key_entry("n", "tg-n", "")));
    gw.gateway.reload().expect("reload");
    assert_eq!(
        post_with_key(&gw.url(), "tg-r", &body).await.0,
        429,
        "reload did not reset r's allowance"
    );

    for broken in [
        "[[keys]]\nname = \"x\"\n".to_owned(),
        format!("{keys}{}", key_entry("r", "tg-other", "")),
        "this is not toml [[[".to_owned(),
    ] {
        gw.write(&broken);
        assert!(
            gw.gateway.reload().is_err(),
            "invalid config refused: {broken}"
        );
        assert_eq!(
            post_with_key(&gw.url(), "tg-n", &body).await.0,
            200,
            "old config still in force"
        );
    }
}

#[tokio::test]
async fn a_changed_config_file_is_picked_up_without_a_signal() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let mut gw = FileGateway::start(&upstream.url(), "").await;
    let body = chat_body(false, false);
    assert_eq!(post_with_key(&gw.url(), "tg-late", &body).await.0, 401);
    gw.write(&key_entry("late", "tg-late", ""));
    // The watcher polls the file once a second; wait for its effect, bounded.
    let mut status = 0;
    for _ in 0..50 {
        status = post_with_key(&gw.url(), "tg-late", &body).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, 200,
        "the new key works once the file watcher saw the change"
    );
}

#[tokio::test]
async fn async_openai_surfaces_401_and_429_as_api_errors() {
    use async_openai::config::OpenAIConfig;
    use async_openai::error::OpenAIError;
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    };

    let upstream = MockUpstream::start().await.expect("mock upstream");
    // A 1 s window: async-openai honours Retry-After and tries three more times before giving up.
    let keys = key_entry("one", "tg-one", "rate = { requests = 1, per = \"1s\" }");
    let gw = FileGateway::start(&upstream.url(), &keys).await;
    let request = CreateChatCompletionRequestArgs::default()
        .model("mock-model")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hi")
            .build()
            .expect("message")
            .into()])
        .build()
        .expect("request");
    let client = |key: &str| {
        async_openai::Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}/openai/v1", gw.gateway.url()))
                .with_api_key(key),
        )
    };

    match client("tg-wrong").chat().create(request.clone()).await {
        Err(OpenAIError::ApiError(error)) => {
            assert_eq!(error.status_code.as_u16(), 401);
            assert_eq!(
                error.api_error.r#type.as_deref(),
                Some("authentication_error")
            );
            assert_eq!(error.api_error.code.as_deref(), Some("invalid_api_key"));
        }
        other => panic!("expected an authentication error, got {other:?}"),
    }
    client("tg-one")
        .chat()
        .create(request.clone())
        .await
        .expect("first request admitted");
    match client("tg-one").chat().create(request).await {
        Err(OpenAIError::ApiError(error)) => {
            assert_eq!(error.status_code.as_u16(), 429);
            assert_eq!(error.api_error.r#type.as_deref(), Some("rate_limit_error"));
            assert!(
                error.api_error.message.contains("retry in 1s"),
                "{}",
                error.api_error.message
            );
        }
        other => panic!("expected a rate-limit error, got {other:?}"),
    }
    let metrics = gw.gateway.metrics().await;
    assert!(
        metrics.contains("tollgate_rejections_total{key=\"one\",reason=\"rate\"} 4"),
        "the client retried after Retry-After three times: {metrics}"
    );
}

#[tokio::test]
async fn a_key_rotates_with_no_downtime_and_one_budget() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let hash = |token: &str| hex::encode(tollgate::keys::hash_token(token.as_bytes()));
    let entry = |hashes: &str| {
        format!("[[keys]]\nname = \"rot\"\nsha256 = {hashes}\nrate = {{ requests = 3, per = \"1h\" }}\n")
    };
    let mut gw =
        FileGateway::start(&upstream.url(), &entry(&format!("\"{}\"", hash("tg-old")))).await;
    let body = chat_body(false, false);
    assert_eq!(post_with_key(&gw.url(), "tg-old", &body).await.0, 200);

    // Step 1: the new key joins the same entry; both work, and they share one allowance.
    gw.write(&entry(&format!(
        "[\"{}\", \"{}\"]",
        hash("tg-old"),
        hash("tg-new")
    )));
    gw.gateway.reload().expect("reload with both hashes");
    assert_eq!(
        post_with_key(&gw.url(), "tg-new", &body).await.0,
        200,
        "new key works"
    );
    assert_eq!(
        post_with_key(&gw.url(), "tg-old", &body).await.0,
        200,
        "old key still works"
    );
    assert_eq!(
        post_with_key(&gw.url(), "tg-new", &body).await.0,
        429,
        "one budget for both: 3 per hour used"
    );

    // Step 2: the old hash goes; the old key is refused at once.
    gw.write(&entry(&format!("\"{}\"", hash("tg-new"))));
    gw.gateway.reload().expect("reload with the new hash only");
    assert_eq!(
        post_with_key(&gw.url(), "tg-old", &body).await.0,
        401,
        "old key revoked"
    );
    assert_eq!(
        post_with_key(&gw.url(), "tg-new", &body).await.0,
        429,
        "the allowance carried over the rotation"
    );
}
