//! Validation: every valid request passes byte for byte, every invalid one is refused with an
//! error that points at the problem, and no input breaks the gateway.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mock_upstream::MockUpstream;
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::common::{self, key_entry, TestGateway};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");

fn path_for(endpoint: &str) -> &'static str {
    if endpoint.starts_with("completions") {
        "/v1/completions"
    } else {
        "/v1/chat/completions"
    }
}

async fn send_raw(
    gateway: &TestGateway,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut request = common::client()
        .post(format!("{}{path}", gateway.url()))
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// The seeds' `V1PromptModelError`, compiled from the project's document.
fn error_schema() -> jsonschema::Validator {
    let document: Value =
        serde_json::from_str(tollgate::layers::validate::OPENAPI_DOCUMENT).expect("JSON");
    jsonschema::options()
        .with_resource(
            "urn:test:doc",
            jsonschema::Resource::from_contents(document),
        )
        .build(&json!({"$ref": "urn:test:doc#/components/schemas/V1PromptModelError"}))
        .expect("error schema compiles")
}

fn corpus(kind: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(Path::new(CORPUS).join(kind))
        .expect("corpus folder")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("read corpus file"))
        })
        .collect()
}

#[tokio::test]
async fn every_valid_request_in_the_corpus_passes_byte_for_byte() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    // Usage injection changes streamed requests by design (tested in accounting); off here.
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "",
        "inject_usage = false",
        "",
    ))
    .await;
    let valid = corpus("valid");
    assert!(
        valid.len() >= 25,
        "the corpus has {} valid requests",
        valid.len()
    );
    for (name, body) in &valid {
        let (status, answer) = send_raw(
            &gateway,
            path_for(name),
            Some("application/json"),
            body.clone(),
        )
        .await;
        assert_eq!(status, 200, "{name} was refused: {answer}");
        let seen = upstream.requests();
        let last = seen.last().expect("forwarded");
        assert_eq!(&last.body[..], &body[..], "{name} changed on the way");
    }
    assert_eq!(upstream.request_count(), valid.len());
}

#[tokio::test]
async fn every_invalid_request_in_the_corpus_is_refused_at_its_location() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let schema = error_schema();
    let invalid = corpus("invalid");
    assert!(
        invalid.len() >= 20,
        "the corpus has {} invalid requests",
        invalid.len()
    );
    for (name, case) in &invalid {
        let case: Value = serde_json::from_slice(case).expect("case is JSON");
        let endpoint = case["endpoint"].as_str().expect("endpoint");
        let body = serde_json::to_vec(&case["body"]).expect("body");
        let (status, answer) =
            send_raw(&gateway, path_for(endpoint), Some("application/json"), body).await;
        assert_eq!(status, 400, "{name} was not refused: {answer}");
        let locations: Vec<&str> = answer["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .filter_map(|e| e["location"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        let expected = case["location"].as_str().expect("location");
        assert!(
            locations.contains(&expected),
            "{name}: expected {expected} in {locations:?}"
        );
        for error in answer["errors"].as_array().into_iter().flatten() {
            assert!(
                error["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{name}: every error says what was expected: {error}"
            );
        }
        assert!(
            schema.is_valid(&answer),
            "{name}: the error body must match V1PromptModelError: {answer}"
        );
        assert_eq!(answer["error"]["type"], "invalid_request_error", "{name}");
    }
    assert_eq!(
        upstream.request_count(),
        0,
        "nothing invalid reached the upstream"
    );
}

#[tokio::test]
async fn bad_content_types_and_bodies_get_clear_400s_and_oversized_bodies_413() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "max_body_bytes = 1000",
        "",
        "",
    ))
    .await;
    let schema = error_schema();
    let chat = "/v1/chat/completions";
    let good = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let cases: Vec<(&str, Option<&str>, Vec<u8>, &str)> = vec![
        (
            "no content type",
            None,
            good.clone(),
            "missing Content-Type",
        ),
        (
            "form content type",
            Some("application/x-www-form-urlencoded"),
            good.clone(),
            "unsupported Content-Type",
        ),
        (
            "text content type",
            Some("text/plain"),
            good.clone(),
            "unsupported Content-Type",
        ),
        (
            "malformed JSON",
            Some("application/json"),
            b"{\"model\": \"m\",".to_vec(),
            "not valid JSON",
        ),
        (
            "array body",
            Some("application/json"),
            b"[]".to_vec(),
            "must be a JSON object, not an array",
        ),
        (
            "string body",
            Some("application/json"),
            b"\"hi\"".to_vec(),
            "must be a JSON object, not a string",
        ),
        (
            "invalid UTF-8",
            Some("application/json"),
            b"{\"model\":\"\xc3\x28\"}".to_vec(),
            "not valid JSON",
        ),
        (
            "empty body",
            Some("application/json"),
            Vec::new(),
            "not valid JSON",
        ),
    ];
    for (what, content_type, body, expected) in cases {
        let (status, answer) = send_raw(&gateway, chat, content_type, body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(expected),
            "{what}: {message:?} should say {expected:?}"
        );
        assert!(schema.is_valid(&answer), "{what}: shape: {answer}");
    }
    // JSON with a charset, and the `+json` family, are JSON.
    for content_type in [
        "application/json; charset=utf-8",
        "application/vnd.api+json",
    ] {
        let (status, _) = send_raw(&gateway, chat, Some(content_type), good.clone()).await;
        assert_eq!(status, 200, "{content_type}");
    }

    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let (status, answer) = send_raw(
        &gateway,
        chat,
        Some("application/json"),
        big.clone().into_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{answer}");
    assert!(schema.is_valid(&answer), "413 shape: {answer}");
    // Chunked, with no Content-Length: cut at the cap as it arrives.
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let response = common::client()
        .post(format!("{}{chat}", gateway.url()))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("chunked request");
    assert_eq!(response.status(), 413, "chunked body over the cap");
    assert_eq!(
        response.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "the rest of the body is still on the connection: the client must not reuse it"
    );
    assert_eq!(
        upstream.request_count(),
        2,
        "only the two good requests were forwarded"
    );
}

#[tokio::test]
async fn the_key_policy_refuses_other_models_and_too_many_tokens() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let keys = key_entry(
        "p",
        "tg-p",
        "models = [\"small\", \"llama-*\"]\nmax_tokens = 100",
    );
    let gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), "", "", &keys)).await;
    let schema = error_schema();
    let send = |body: Value| {
        let url = format!("{}/v1/chat/completions", gateway.url());
        async move {
            let response = common::client()
                .post(url)
                .header("authorization", "Bearer tg-p")
                .json(&body)
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let messages = json!([{"role": "user", "content": "hi"}]);

    let (status, answer) = send(json!({"model": "big", "messages": messages})).await;
    assert_eq!(status, 400);
    assert_eq!(answer["code"], "model-not-found", "{answer}");
    assert!(schema.is_valid(&answer), "{answer}");

    for field in ["max_tokens", "max_completion_tokens"] {
        let (status, answer) =
            send(json!({"model": "small", "messages": messages, field: 101})).await;
        assert_eq!(status, 400, "{field}");
        assert_eq!(answer["code"], "max-tokens-exceeded", "{field}: {answer}");
        assert!(
            answer["detail"]
                .as_str()
                .is_some_and(|d| d.contains(field) && d.contains("100")),
            "{answer}"
        );
        assert!(schema.is_valid(&answer), "{answer}");
    }
    assert_eq!(
        upstream.request_count(),
        0,
        "refused requests were not forwarded"
    );

    for model in ["small", "llama-3-8b"] {
        let (status, _) =
            send(json!({"model": model, "messages": messages, "max_tokens": 100})).await;
        assert_eq!(status, 200, "{model} is allowed");
    }
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("model=\"small\""),
        "an allow-listed model is a label: {metrics}"
    );
    assert!(
        !metrics.contains("model=\"llama-3-8b\""),
        "a pattern match is not a label"
    );
    assert!(
        !metrics.contains("model=\"big\""),
        "a refused model is not a label"
    );
    assert!(
        metrics.contains("tollgate_rejections_total{key=\"p\",reason=\"model_not_found\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tollgate_rejections_total{key=\"p\",reason=\"max_tokens_exceeded\"} 2"),
        "{metrics}"
    );
}

// === property tests: through a real gateway ===

/// A gateway and upstream on a runtime of their own, shared by the cases of one property.
struct Rig {
    runtime: tokio::runtime::Runtime,
    upstream: MockUpstream,
    gateway: TestGateway,
    client: reqwest::Client,
}

impl Rig {
    fn new() -> Rig {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (upstream, gateway) = runtime.block_on(async {
            let upstream = MockUpstream::start().await.expect("mock upstream");
            let config = common::config_toml(&upstream.url(), "", "inject_usage = false", "");
            let gateway = TestGateway::start_toml(&config).await;
            (upstream, gateway)
        });
        Rig {
            runtime,
            upstream,
            gateway,
            client: common::client(),
        }
    }

    fn post(&self, path: &str, body: Vec<u8>) -> Option<u16> {
        let request = self
            .client
            .post(format!("{}{path}", self.gateway.url()))
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(10))
            .body(body);
        self.runtime.block_on(async {
            let response = request.send().await.ok()?;
            let status = response.status().as_u16();
            response.bytes().await.ok()?;
            Some(status)
        })
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ,.!?]{0,40}",
        any::<String>().prop_map(|s| s.chars().take(60).collect()),
        Just("\u{1F600} \"quoted\" \\ back\nslash".to_owned()),
    ]
}

fn extra_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Chat bodies the schema accepts: any text, roles, sampling fields in range, vendor extras.
fn valid_chat_body() -> impl Strategy<Value = Value> {
    let message = (
        prop::sample::select(vec!["system", "user", "assistant", "developer"]),
        text(),
    )
        .prop_map(|(role, content)| json!({"role": role, "content": content}));
    (
        text(),
        prop::collection::vec(message, 1..5),
        prop::option::of(0.0f64..=2.0),
        prop::option::of(0u32..5000),
        any::<bool>(),
        prop::collection::btree_map("x_[a-z]{1,6}", extra_value(), 0..3),
    )
        .prop_map(
            |(model, messages, temperature, max_tokens, stream, extras)| {
                let mut body = json!({"model": model, "messages": messages, "stream": stream});
                if let Some(t) = temperature {
                    body["temperature"] = json!(t);
                }
                if let Some(m) = max_tokens {
                    body["max_tokens"] = json!(m);
                }
                for (k, v) in extras {
                    body[k] = v;
                }
                body
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_body_the_schema_accepts_is_forwarded_byte_for_byte(body in valid_chat_body(), pretty in any::<bool>()) {
        thread_local!(static RIG: Arc<Rig> = Arc::new(Rig::new()));
        let rig = RIG.with(Arc::clone);
        let bytes = if pretty {
            serde_json::to_vec_pretty(&body).expect("serialise")
        } else {
            serde_json::to_vec(&body).expect("serialise")
        };
        let before = rig.upstream.request_count();
        let status = rig.post("/v1/chat/completions", bytes.clone());
        prop_assert_eq!(status, Some(200), "refused: {}", body);
        let seen = rig.upstream.requests();
        prop_assert_eq!(rig.upstream.request_count(), before + 1);
        prop_assert_eq!(&seen.last().expect("forwarded").body[..], &bytes[..], "body changed on the way");
    }

    #[test]
    fn no_input_breaks_the_gateway(
        raw in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2000),
            extra_value().prop_map(|v| serde_json::to_vec(&v).expect("serialise")),
            (1usize..50_000).prop_map(|depth| format!("{{\"model\":\"m\",\"messages\":{}{}}}", "[".repeat(depth), "]".repeat(depth)).into_bytes()),
            (1usize..3_000_000).prop_map(|len| format!("{{\"model\":\"{}\",\"messages\":[]}}", "m".repeat(len)).into_bytes()),
            "[0-9]{1,400}".prop_map(|digits| format!("{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}],\"temperature\":{digits}}}").into_bytes()),
        ],
        path in prop::sample::select(vec!["/v1/chat/completions", "/v1/completions"]),
    ) {
        thread_local!(static RIG: Arc<Rig> = Arc::new(Rig::new()));
        let rig = RIG.with(Arc::clone);
        let status = rig.post(path, raw);
        prop_assert!(
            matches!(status, Some(200 | 400 | 413)),
            "the gateway answered {:?}", status
        );
        // And it still serves a good request afterwards.
        let good = br#"{"model":"m","prompt":"ok"}"#.to_vec();
        prop_assert_eq!(rig.post("/v1/completions", good), Some(200));
    }
}

#[tokio::test]
async fn a_body_trickled_too_slowly_gets_408_and_is_never_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "body_read_timeout = \"300ms\"",
        "",
        "",
    ))
    .await;
    let mut socket = tokio::net::TcpStream::connect(gateway.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":",
        common::TEST_KEY
    );
    socket
        .write_all(head.as_bytes())
        .await
        .expect("send head and a little body");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the gateway answered and closed instead of waiting forever"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "408 for a stalled body: {text}"
    );
    assert_eq!(upstream.request_count(), 0, "nothing forwarded");
}
