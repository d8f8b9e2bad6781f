//! The load generator's client: raw hyper HTTP/1.1 connections with TCP_NODELAY, one request at a
//! time on each, and the two requests every phase sends (a chat completion, JSON or streamed).
//!
//! A broken connection shows as an error of the request on it; a stream read through
//! [`read_stream`] is complete only if it ends with `data: [DONE]`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// No single request may hang the bench.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

const CHAT_PATH: &str = "/v1/chat/completions";
/// Every row's requests name `max_tokens` (8, the mock's default answer length), as deployed
/// clients do: below the `tollgate-full` key's cap, so that row forwards them unchanged and gets
/// the same answers as the others (a request naming none would get the cap inserted, and the
/// mock would answer with that many tokens).
const CHAT_BODY: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;
const STREAM_BODY: &str =
    r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;

pub type Sender = SendRequest<Full<Bytes>>;

pub async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    tcp.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        // A broken connection shows as an error of the request on it.
        let _ = connection.await;
    });
    Ok(sender)
}

/// Where a row's requests go, and the headers its client always sends.
pub struct Endpoint {
    pub addr: SocketAddr,
    host: HeaderValue,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// A request body and its `x-mock-*` headers.
pub struct Payload {
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Payload {
    pub fn chat() -> Payload {
        Payload {
            body: Bytes::from_static(CHAT_BODY.as_bytes()),
            headers: Vec::new(),
        }
    }

    pub fn stream(chunks: usize, delay_ms: u64) -> Payload {
        Payload {
            body: Bytes::from_static(STREAM_BODY.as_bytes()),
            headers: vec![
                (
                    HeaderName::from_static("x-mock-chunks"),
                    HeaderValue::from(chunks),
                ),
                (
                    HeaderName::from_static("x-mock-chunk-delay-ms"),
                    HeaderValue::from(delay_ms),
                ),
            ],
        }
    }
}

impl Endpoint {
    pub fn new(addr: SocketAddr, headers: Vec<(HeaderName, HeaderValue)>) -> Endpoint {
        let host = HeaderValue::from_str(&addr.to_string())
            .unwrap_or(HeaderValue::from_static("localhost"));
        Endpoint {
            addr,
            host,
            headers,
        }
    }

    pub fn request(&self, payload: &Payload) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(payload.body.clone()));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static(CHAT_PATH);
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in self.headers.iter().chain(&payload.headers) {
            headers.insert(name.clone(), value.clone());
        }
        request
    }

    pub fn get_models(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = Uri::from_static("/v1/models");
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        request
    }
}

/// Sends one request and reads the whole answer; returns its status and body.
pub async fn exchange(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// What one SSE stream looked like from the client.
pub struct StreamStats {
    /// From just before the request was written to the first `data:` bytes.
    pub ttfe: Option<Duration>,
    /// From just before the request was written to the end of the body.
    pub total: Duration,
    /// Longest time between two reads (the first: between the headers and the first read).
    pub max_gap: Duration,
    /// Ended with `data: [DONE]`.
    pub complete: bool,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// Streams one SSE answer. `running` counts the streams between their first event and their end.
pub async fn read_stream(
    sender: &mut Sender,
    request: Request<Full<Bytes>>,
    running: Option<&AtomicUsize>,
) -> anyhow::Result<StreamStats> {
    struct Running<'a>(Option<&'a AtomicUsize>);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            if let Some(counter) = self.0 {
                counter.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    sender.ready().await?;
    let start = Instant::now();
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        bail!("status {}", response.status());
    }
    let mut body = response.into_body();
    let mut ttfe = None;
    let mut last = Instant::now();
    let mut max_gap = Duration::ZERO;
    let mut tail: Vec<u8> = Vec::with_capacity(2 * DONE.len());
    let mut counted = Running(None);
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        max_gap = max_gap.max(now - last);
        last = now;
        if ttfe.is_none() {
            let mut window = tail.clone();
            window.extend_from_slice(data);
            if window.windows(5).any(|w| w == b"data:") {
                ttfe = Some(now - start);
                if let Some(counter) = running {
                    counter.fetch_add(1, Ordering::SeqCst);
                    counted = Running(Some(counter));
                }
            }
        }
        tail.extend_from_slice(&data[data.len().saturating_sub(DONE.len())..]);
        let excess = tail.len().saturating_sub(DONE.len());
        tail.drain(..excess);
    }
    let total = start.elapsed();
    drop(counted);
    Ok(StreamStats {
        ttfe,
        total,
        max_gap,
        complete: tail == DONE,
    })
}
