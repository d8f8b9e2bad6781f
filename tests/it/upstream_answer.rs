//! What of the upstream's answer reaches the client: its trailers (HTTP/2 end to end), never its
//! `x-request-id` in place of the gateway's, and never its own rate-limit headers beside the
//! gateway's.
//!
//! The upstream here is a tiny HTTPS server (HTTP/2 by ALPN, so that it can send trailers) that
//! answers every request with one chat completion, the headers OpenAI sends, and a trailer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use crate::common::{self, key_entry, TestGateway};

const CHAT: &str = "/v1/chat/completions";
const UPSTREAM_ID: &str = "req_upstream_42";
const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"mock-model","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9}}"#;

/// A running HTTPS upstream: its URL, and the CA file the gateway must trust.
struct TrailerUpstream {
    url: String,
    ca_file: tempfile::NamedTempFile,
}

impl TrailerUpstream {
    async fn start() -> TrailerUpstream {
        let made =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let ca_file = tempfile::NamedTempFile::new().expect("CA file");
        std::fs::write(ca_file.path(), made.cert.pem()).expect("write CA file");
        let key = rustls_pki_types::PrivateKeyDer::try_from(made.signing_key.serialize_der())
            .expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![made.cert.der().clone()], key)
            .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(|_request| async {
                        Ok::<_, std::convert::Infallible>(answer())
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TrailerUpstream {
            url: format!("https://localhost:{port}"),
            ca_file,
        }
    }

    /// A gateway in front of this upstream, with `tail` after the test key (more keys, a ledger).
    async fn gateway(&self, tail: &str) -> TestGateway {
        let ca = format!("ca_file = \"{}\"", self.ca_file.path().display());
        TestGateway::start_toml(&common::config_toml(&self.url, "", &ca, tail)).await
    }
}

type AnswerBody = StreamBody<futures_util::stream::Iter<std::vec::IntoIter<FrameResult>>>;
type FrameResult = Result<Frame<Bytes>, std::convert::Infallible>;

/// One chat completion with OpenAI's headers, its id and limits, and a trailer after the body.
fn answer() -> http::Response<AnswerBody> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-upstream-trailer", http::HeaderValue::from_static("done"));
    let frames = vec![
        Ok(Frame::data(Bytes::from_static(ANSWER.as_bytes()))),
        Ok(Frame::trailers(trailers)),
    ];
    http::Response::builder()
        .header("content-type", "application/json")
        .header("x-request-id", UPSTREAM_ID)
        .header("x-ratelimit-limit-requests", "5000")
        .header("x-ratelimit-remaining-requests", "4999")
        .header("x-ratelimit-reset-requests", "12ms")
        .header("x-ratelimit-limit-tokens", "1000000")
        .header("x-ratelimit-remaining-tokens", "999999")
        .header("x-ratelimit-reset-tokens", "0s")
        .header("ratelimit-policy", "\"upstream\";q=5000;w=60")
        .header("ratelimit", "\"upstream\";r=4999;t=1")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .expect("response")
}

/// One chat request over h2c (prior knowledge) to the gateway: the head, the body, the trailers.
async fn h2c_chat(
    addr: std::net::SocketAddr,
    token: &str,
) -> (http::response::Parts, Bytes, Option<http::HeaderMap>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{addr}{CHAT}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(common::chat_body(false, false))))
        .expect("request");
    let response: http::Response<Incoming> =
        tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
            .await
            .expect("an answer in time")
            .expect("h2 send");
    assert_eq!(response.version(), http::Version::HTTP_2, "spoke HTTP/2");
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("whole body");
    let trailers = collected.trailers().cloned();
    (parts, collected.to_bytes(), trailers)
}

#[tokio::test]
async fn upstream_trailers_reach_an_http2_client_and_usage_is_still_charged() {
    let upstream = TrailerUpstream::start().await;
    let ledger = common::state_path().with_file_name("usage.jsonl");
    let gateway = upstream
        .gateway(&format!("[ledger]\npath = \"{}\"\n", ledger.display()))
        .await;

    let (parts, body, trailers) = h2c_chat(gateway.addr, common::TEST_KEY).await;
    assert_eq!(parts.status, 200, "answered");
    assert_eq!(body, ANSWER.as_bytes(), "the body passes through unchanged");
    let trailers = trailers.expect("the upstream's trailers reach the client");
    assert_eq!(
        trailers
            .get("x-upstream-trailer")
            .and_then(|v| v.to_str().ok()),
        Some("done"),
        "the trailer's value: {trailers:?}"
    );

    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(
            "tollgate_tokens_total{key=\"test\",kind=\"completion\",model=\"other\",source=\"reported\"} 2"
        ),
        "the reported usage is charged:\n{metrics}"
    );
}

#[tokio::test]
async fn the_client_gets_the_request_id_the_gateway_logged_and_the_upstreams_beside_it() {
    let upstream = TrailerUpstream::start().await;
    let ledger = common::state_path().with_file_name("usage.jsonl");
    let mut gateway = upstream
        .gateway(&format!("[ledger]\npath = \"{}\"\n", ledger.display()))
        .await;
    let url = format!("{}{CHAT}", gateway.url());

    // A client's own id comes back as it was sent.
    let (status, headers, _) = common::post(
        &url,
        &common::chat_body(false, false),
        &[("x-request-id", "client-chosen-7")],
    )
    .await;
    assert_eq!(status, 200);
    let header = |headers: &reqwest::header::HeaderMap, name: &str| {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("<bin>").to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        header(&headers, "x-request-id"),
        ["client-chosen-7"],
        "the client's own id, once"
    );
    assert_eq!(
        header(&headers, "x-upstream-request-id"),
        [UPSTREAM_ID],
        "the upstream's id, under its own name"
    );

    // A generated id: the one the ledger holds.
    let (status, headers, _) = common::post(&url, &common::chat_body(false, false), &[]).await;
    assert_eq!(status, 200);
    let generated = header(&headers, "x-request-id");
    assert_eq!(generated.len(), 1, "one id: {generated:?}");
    assert_ne!(generated[0], UPSTREAM_ID, "not the upstream's id");

    gateway.begin_shutdown().await.expect("clean shutdown");
    let ids: Vec<String> = std::fs::read_to_string(&ledger)
        .expect("ledger written")
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).expect("JSON line"))
        .filter_map(|line| line["request_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        ids,
        ["client-chosen-7", generated[0].as_str()],
        "the ledger holds the ids the client got"
    );
}

#[tokio::test]
async fn a_limited_key_sees_only_the_gateways_rate_limit_headers() {
    let upstream = TrailerUpstream::start().await;
    let limited = key_entry(
        "limited",
        "tg-limited-key",
        "rate = { requests = 100, per = \"1m\", burst = 100 }\n\
         max_tokens = 100\nquotas = [{ tokens = 50000, per = \"1h\" }]",
    );
    let gateway = upstream.gateway(&limited).await;
    let response = common::client_with_key("tg-limited-key")
        .post(format!("{}{CHAT}", gateway.url()))
        .header("content-type", "application/json")
        .body(common::chat_body(false, false))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    let all = |name: &str| {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("<bin>").to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("x-ratelimit-limit-requests"), ["100"], "the key's rate");
    assert_eq!(
        all("x-ratelimit-limit-tokens"),
        ["50000"],
        "the key's quota"
    );
    for name in [
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ] {
        assert_eq!(
            all(name).len(),
            1,
            "{name}: one value, the gateway's: {headers:?}"
        );
    }
    for name in ["ratelimit", "ratelimit-policy"] {
        assert!(
            all(name).iter().all(|v| !v.contains("upstream")),
            "{name}: the upstream's field never reaches the client: {:?}",
            all(name)
        );
    }

    // A key without limits gets no rate-limit header from anyone: the upstream's describe the
    // gateway's own credential, shared by every key, not this client's allowance.
    let (_, headers, _) = common::post(
        &format!("{}{CHAT}", gateway.url()),
        &common::chat_body(false, false),
        &[],
    )
    .await;
    let leaked: Vec<_> = headers
        .keys()
        .filter(|name| {
            name.as_str().starts_with("x-ratelimit") || name.as_str().starts_with("ratelimit")
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "no upstream limits for an unlimited key: {leaked:?}"
    );
}
