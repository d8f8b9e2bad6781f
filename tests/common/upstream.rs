//! A deterministic, fast mock of an OpenAI-compatible model server.
//!
//! It imitates the HTTP surface of OpenAI, vLLM and llama.cpp's `llama-server`
//! closely enough to put a gateway in front of it:
//!
//! * `POST {prefix}/v1/chat/completions` – `chat.completion` JSON, or with
//!   `"stream": true` a `text/event-stream` of `chat.completion.chunk` events
//!   (role chunk, one chunk per token, finish chunk, optional usage chunk when
//!   `stream_options.include_usage` is true, then `data: [DONE]`).
//! * `POST {prefix}/v1/completions` – the same for `text_completion`.
//! * `GET {prefix}/v1/models` – a one-model list (`mock-model`).
//! * anything else – 404 with llama.cpp's `File Not Found` error body; a body
//!   that is not a JSON object – 400 with an OpenAI-style error body.
//!
//! Output is a pure function of the request: the `id` is derived from an
//! FNV-1a hash of the request's JSON without its `stream_options` (so a gateway
//! that adds `include_usage` gets the same id), `created` is always 1700000000 and `model`
//! echoes the request's `model` (default `mock-model`). Token `i` is the text
//! `"tok<i> "`. So a response fetched directly and one fetched through a
//! gateway are byte-identical for the same request. Every SSE event is sent as
//! its own body frame, so chunk timing is observable.
//!
//! The number of tokens `N` is the `x-mock-chunks` header if present, else
//! `max_tokens` / `max_completion_tokens` (capped at 4096, and then
//! `finish_reason` is `"length"`), else [`MockOptions::default_tokens`] (8 unless
//! set: llama.cpp's own default is "until the context is full"). `usage.prompt_tokens` counts the
//! whitespace-separated words of all message contents (chat) or of the prompt
//! (completions; a token array counts its length), at least 1.
//!
//! # Request headers the mock obeys (a gateway forwards them)
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-chunks: N` | produce `N` tokens / content chunks |
//! | `x-mock-tools: 1` | chat answers with a `get_weather` tool call (`finish_reason: "tool_calls"`) |
//! | `x-mock-prompt-tokens: N` | report `N` prompt tokens (as a real tokenizer might count the prompt) |
//! | `x-mock-usage: {…}` | send this text as the `usage` object, verbatim (a broken upstream's counts) |
//! | `x-mock-status: 503` | answer with that 4xx/5xx status and an OpenAI-style error body, even for `stream: true` |
//! | `x-mock-header-delay-ms: N` | wait `N` ms before sending response headers |
//! | `x-mock-chunk-delay-ms: N` | wait `N` ms between body frames (first frame right after the headers) |
//! | `x-mock-fault: reset-before-headers` | read the request, then reset the TCP connection (RST) without any response |
//! | `x-mock-fault: stall-headers` | never answer (hang until the client goes away) |
//! | `x-mock-fault: stall-body` | send headers and 2 SSE events (half the JSON for non-stream), then hang |
//! | `x-mock-fault: abort-after=K` | send headers and `K` SSE events (non-stream: half the JSON if `K > 0`), then drop the connection mid-body |
//! | `x-mock-fault: not-json` | 200, `Content-Type: application/json`, body `this is not json` |
//!
//! An unknown `x-mock-fault` value is answered with 400 so typos are noticed.
//!
//! [`MockOptions::close_after_stream`] imitates llama.cpp closing the
//! connection after each SSE response although the response did not say
//! `Connection: close`; [`MockOptions::require_key`] demands
//! `Authorization: Bearer <key>` (else 401).
//!
//! The server speaks HTTP/1.1 and h2c (prior knowledge) on the same port.
//!
//! This file is shared by the integration tests, the `mock_upstream` example
//! and the benches via `#[path]`; it depends on nothing from the crate.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Sleep;

/// `created` of every generated object.
const CREATED: u64 = 1_700_000_000;
/// Default number of completion tokens.
const DEFAULT_TOKENS: usize = 8;
/// Cap for `max_tokens` / `max_completion_tokens`.
const MAX_TOKENS_CAP: u64 = 4096;
/// Cap for the `x-mock-chunks` header (keeps memory bounded on odd input).
const HEADER_CHUNKS_CAP: usize = 1_000_000;
/// Pause between the last frame and the failure of an `abort-after` body.
const ABORT_FLUSH_PAUSE: Duration = Duration::from_millis(10);
/// The tool call arguments, streamed in these pieces.
const TOOL_ARG_PIECES: [&str; 4] = ["{\"city", "\": \"", "Paris", "\"}"];

const NOT_FOUND_BODY: &str =
    r#"{"error":{"message":"File Not Found","type":"not_found_error","code":404}}"#;
const UNAUTHORIZED_BODY: &str = r#"{"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
const MODELS_BODY: &str = r#"{"object":"list","data":[{"id":"mock-model","object":"model","created":1700000000,"owned_by":"mock"}]}"#;
const NOT_JSON_BODY: &str = "this is not json";

/// A running mock server. Dropping it stops the server and its connections.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

/// Server options.
#[derive(Clone, Debug, Default)]
pub struct MockOptions {
    /// Path prefix: `""` serves `/v1/...`, `"/openai"` serves `/openai/v1/...`.
    pub prefix: String,
    /// llama.cpp quirk: after every SSE response, close the connection
    /// although the response advertised keep-alive.
    pub close_after_stream: bool,
    /// If set, require `Authorization: Bearer <key>`; otherwise answer 401.
    pub require_key: Option<String>,
    /// Tokens generated when a request names no `max_tokens` (8 when `None`).
    pub default_tokens: Option<usize>,
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: Method,
    pub path_and_query: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1:0` with default options.
    pub async fn start() -> io::Result<MockUpstream> {
        Self::start_with(MockOptions::default()).await
    }

    /// Starts a mock on `127.0.0.1:0`.
    pub async fn start_with(opts: MockOptions) -> io::Result<MockUpstream> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), opts).await
    }

    /// Starts a mock listening on `addr`.
    pub async fn start_on(addr: SocketAddr, opts: MockOptions) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts));
        let accept_task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(MockUpstream {
            addr,
            shared,
            accept_task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, without the prefix.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in order (recorded before answering).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Number of requests received so far (counted even when recording is off).
    pub fn request_count(&self) -> usize {
        self.shared.request_count.load(Ordering::SeqCst)
    }

    /// Turns recording of requests for [`requests`](Self::requests) on or off
    /// (on by default; long-running servers and benchmarks turn it off to keep
    /// memory flat).
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::SeqCst);
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Response bodies (SSE or JSON of the completion routes) whose receiver
    /// went away before the end.
    pub fn cancelled_streams(&self) -> usize {
        self.shared.cancelled.load(Ordering::SeqCst)
    }

    /// Waits until [`cancelled_streams`](Self::cancelled_streams) `>= n`;
    /// returns whether that happened within `timeout`.
    pub async fn wait_cancelled(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.cancel_notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a wake-up in between is not lost.
            notified.as_mut().enable();
            if self.cancelled_streams() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.cancelled_streams() >= n;
            }
        }
    }

    /// SSE streams sent completely.
    pub fn completed_streams(&self) -> usize {
        self.shared.completed.load(Ordering::SeqCst)
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // The accept task owns the listener and the JoinSet of connection
        // tasks, so aborting it tears everything down.
        self.accept_task.abort();
    }
}

impl fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .field("opts", &self.shared.opts)
            .finish_non_exhaustive()
    }
}

/// Keeps the whole public API "used" in every crate that includes this file
/// (each test, example or bench uses only a part of it), so includers need no
/// lint attribute. Being `expect(dead_code)` makes it a liveness root.
#[expect(
    dead_code,
    reason = "anchor that marks the shared API as used for every includer"
)]
fn api_anchor(r: &RecordedRequest, o: &MockOptions) {
    let _ = (&r.method, &r.path_and_query, r.version, &r.headers, &r.body);
    let _ = (
        &o.prefix,
        o.close_after_stream,
        &o.require_key,
        o.default_tokens,
    );
    let _ = (
        MockUpstream::start,
        MockUpstream::start_with,
        MockUpstream::start_on,
        MockUpstream::addr,
        MockUpstream::url,
        MockUpstream::requests,
        MockUpstream::request_count,
        MockUpstream::set_recording,
        MockUpstream::connections,
        MockUpstream::cancelled_streams,
        MockUpstream::wait_cancelled,
        MockUpstream::completed_streams,
    );
}

// ---------------------------------------------------------------------------
// Server internals
// ---------------------------------------------------------------------------

struct Shared {
    opts: MockOptions,
    chat_path: String,
    completions_path: String,
    models_path: String,
    /// `Bearer <key>` when a key is required.
    expected_auth: Option<String>,
    recording: AtomicBool,
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: AtomicUsize,
    connections: AtomicUsize,
    cancelled: AtomicUsize,
    completed: AtomicUsize,
    cancel_notify: Notify,
}

impl Shared {
    fn new(opts: MockOptions) -> Shared {
        let trimmed = opts.prefix.trim_end_matches('/');
        let prefix = if trimmed.is_empty() || trimmed.starts_with('/') {
            trimmed.to_owned()
        } else {
            format!("/{trimmed}")
        };
        Shared {
            chat_path: format!("{prefix}/v1/chat/completions"),
            completions_path: format!("{prefix}/v1/completions"),
            models_path: format!("{prefix}/v1/models"),
            expected_auth: opts.require_key.as_ref().map(|k| format!("Bearer {k}")),
            opts,
            recording: AtomicBool::new(true),
            requests: Mutex::new(Vec::new()),
            request_count: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            cancel_notify: Notify::new(),
        }
    }
}

/// Per-connection control channel from the service/body to the connection task.
#[derive(Default)]
struct ConnCtl {
    /// Graceful close after the current response (close-after-stream).
    close: Notify,
    /// Drop the connection right now.
    kill: Notify,
    /// Close with RST (SO_LINGER 0) instead of FIN when the socket is dropped.
    reset: AtomicBool,
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    // Best effort; a failure only costs latency.
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(serve_connection(tcp, Arc::clone(&shared), Arc::clone(&builder)));
                }
                // E.g. EMFILE: back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
) {
    let ctl = Arc::new(ConnCtl::default());
    let io = TokioIo::new(MockIo {
        tcp,
        ctl: Arc::clone(&ctl),
    });
    let svc_ctl = Arc::clone(&ctl);
    let service = service_fn(move |req| handle(Arc::clone(&shared), Arc::clone(&svc_ctl), req));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            () = ctl.kill.notified() => break,
            () = ctl.close.notified(), if !closing => {
                closing = true;
                // Finishes the in-flight response, then closes; the response
                // head was already written, so it never says `Connection: close`.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The TCP stream, plus "reset on drop" for `reset-before-headers`.
struct MockIo {
    tcp: TcpStream,
    ctl: Arc<ConnCtl>,
}

impl Drop for MockIo {
    fn drop(&mut self) {
        if self.ctl.reset.load(Ordering::SeqCst) {
            // Best effort: makes the close an RST instead of a FIN.
            let _ = self.tcp.set_zero_linger();
        }
    }
}

impl AsyncRead for MockIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for MockIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Error used to make hyper drop a connection (no response / broken body).
#[derive(Debug)]
struct MockAbort(&'static str);

impl fmt::Display for MockAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mock upstream: {}", self.0)
    }
}

impl std::error::Error for MockAbort {}

// ---------------------------------------------------------------------------
// Request knobs
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    ResetBeforeHeaders,
    StallHeaders,
    StallBody,
    AbortAfter(usize),
    NotJson,
}

#[derive(Debug, Default)]
struct Knobs {
    chunks: Option<usize>,
    prompt_tokens: Option<usize>,
    usage: Option<String>,
    tools: bool,
    status: Option<StatusCode>,
    header_delay: Option<Duration>,
    chunk_delay: Option<Duration>,
    fault: Option<Fault>,
    /// `x-mock-fault` was present but not understood.
    bad_fault: bool,
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    header_str(headers, name)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

impl Knobs {
    fn from_headers(headers: &HeaderMap) -> Knobs {
        let mut knobs = Knobs {
            chunks: header_str(headers, "x-mock-chunks")
                .and_then(|v| v.parse::<usize>().ok())
                .map(|n| n.min(HEADER_CHUNKS_CAP)),
            prompt_tokens: header_str(headers, "x-mock-prompt-tokens")
                .and_then(|v| v.parse::<usize>().ok()),
            usage: header_str(headers, "x-mock-usage").map(str::to_owned),
            tools: matches!(
                header_str(headers, "x-mock-tools"),
                Some("1" | "true" | "yes")
            ),
            status: header_str(headers, "x-mock-status")
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|s| (400..=599).contains(s))
                .and_then(|s| StatusCode::from_u16(s).ok()),
            header_delay: header_ms(headers, "x-mock-header-delay-ms"),
            chunk_delay: header_ms(headers, "x-mock-chunk-delay-ms"),
            ..Knobs::default()
        };
        if let Some(fault) = header_str(headers, "x-mock-fault") {
            knobs.fault = match fault {
                "reset-before-headers" => Some(Fault::ResetBeforeHeaders),
                "stall-headers" => Some(Fault::StallHeaders),
                "stall-body" => Some(Fault::StallBody),
                "not-json" => Some(Fault::NotJson),
                other => other
                    .strip_prefix("abort-after=")
                    .and_then(|k| k.trim().parse::<usize>().ok())
                    .map(Fault::AbortAfter),
            };
            knobs.bad_fault = knobs.fault.is_none();
        }
        knobs
    }
}

// ---------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------

async fn handle(
    shared: Arc<Shared>,
    ctl: Arc<ConnCtl>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, MockAbort> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Ok(error_400(&format!("failed to read request body: {e}")));
        }
    };
    shared.request_count.fetch_add(1, Ordering::SeqCst);
    if shared.recording.load(Ordering::Relaxed) {
        let record = RecordedRequest {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned()),
            version: parts.version,
            headers: parts.headers.clone(),
            body: body.clone(),
        };
        shared
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }

    let knobs = Knobs::from_headers(&parts.headers);
    match knobs.fault {
        Some(Fault::ResetBeforeHeaders) => {
            ctl.reset.store(true, Ordering::SeqCst);
            ctl.kill.notify_one();
            // For HTTP/1 a service error also makes hyper drop the connection
            // without writing a response.
            return Err(MockAbort("reset-before-headers"));
        }
        Some(Fault::StallHeaders) => std::future::pending::<()>().await,
        _ => {}
    }
    if let Some(delay) = knobs.header_delay {
        tokio::time::sleep(delay).await;
    }
    Ok(respond(&shared, &ctl, &parts, &body, &knobs))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
    Models,
}

fn respond(
    shared: &Arc<Shared>,
    ctl: &Arc<ConnCtl>,
    parts: &http::request::Parts,
    body: &Bytes,
    knobs: &Knobs,
) -> Response<MockBody> {
    if let Some(expected) = &shared.expected_auth {
        let ok = parts
            .headers
            .get(AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == expected.as_bytes());
        if !ok {
            return json_response(
                StatusCode::UNAUTHORIZED,
                MockBody::full(Bytes::from_static(UNAUTHORIZED_BODY.as_bytes())),
            );
        }
    }
    if knobs.bad_fault {
        return error_400("unknown x-mock-fault value");
    }
    if let Some(status) = knobs.status {
        let kind = if status.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let text = format!(
            r#"{{"error":{{"message":"mock error","type":"{kind}","code":{}}}}}"#,
            status.as_u16()
        );
        return json_response(status, MockBody::full(Bytes::from(text)));
    }

    let path = parts.uri.path();
    let route = if path == shared.chat_path {
        Some(Route::Chat)
    } else if path == shared.completions_path {
        Some(Route::Completions)
    } else if path == shared.models_path {
        Some(Route::Models)
    } else {
        None
    };
    let route = match (route, &parts.method) {
        (Some(Route::Models), &Method::GET) => Route::Models,
        (Some(r @ (Route::Chat | Route::Completions)), &Method::POST) => r,
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                MockBody::full(Bytes::from_static(NOT_FOUND_BODY.as_bytes())),
            )
        }
    };

    if knobs.fault == Some(Fault::NotJson) {
        return json_response(
            StatusCode::OK,
            MockBody::full(Bytes::from_static(NOT_JSON_BODY.as_bytes())),
        );
    }
    if route == Route::Models {
        let body = MockBody::full(Bytes::from_static(MODELS_BODY.as_bytes()));
        return json_response(StatusCode::OK, body.with_faults(knobs, false));
    }

    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return error_400("request body must be a JSON object"),
        Err(e) => return error_400(&format!("invalid JSON in request body: {e}")),
    };
    let default_tokens = shared.opts.default_tokens.unwrap_or(DEFAULT_TOKENS);
    let gen = Generation::new(route, &request, body, knobs, default_tokens);
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let track = Track {
        shared: Arc::clone(shared),
        ctl: Arc::clone(ctl),
        sse: stream,
    };
    if stream {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let events = if route == Route::Chat {
            gen.chat_events(include_usage)
        } else {
            gen.completion_events(include_usage)
        };
        let body = MockBody::frames(events.buf, events.ends)
            .with_faults(knobs, true)
            .tracked(track);
        let mut resp = Response::new(body);
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    } else {
        let text = if route == Route::Chat {
            gen.chat_json()
        } else {
            gen.completion_json()
        };
        let body = MockBody::full(Bytes::from(text))
            .with_faults(knobs, false)
            .tracked(track);
        json_response(StatusCode::OK, body)
    }
}

fn json_response(status: StatusCode, body: MockBody) -> Response<MockBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_400(message: &str) -> Response<MockBody> {
    let text = format!(
        r#"{{"error":{{"code":400,"message":{},"type":"invalid_request_error"}}}}"#,
        json_string(message)
    );
    json_response(StatusCode::BAD_REQUEST, MockBody::full(Bytes::from(text)))
}

/// `s` as a JSON string literal (quoted and escaped).
fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// 64-bit FNV-1a.
/// The hash the `id` comes from: of the request without its `stream_options`, so that a gateway
/// that asks for usage on the client's behalf still gets the same answer.
fn conversation_hash(request: &Value, body: &[u8]) -> u64 {
    match request {
        Value::Object(map) if map.contains_key("stream_options") => {
            let mut rest = map.clone();
            rest.remove("stream_options");
            fnv1a(Value::Object(rest).to_string().as_bytes())
        }
        Value::Object(map) => fnv1a(Value::Object(map.clone()).to_string().as_bytes()),
        _ => fnv1a(body),
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn count_words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Words in a chat message `content` (a string or an array of parts).
fn content_words(content: Option<&Value>) -> usize {
    match content {
        Some(Value::String(s)) => count_words(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match part {
                Value::String(s) => count_words(s),
                Value::Object(_) => part
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, count_words),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

fn prompt_tokens(route: Route, request: &Value) -> usize {
    let n = match route {
        Route::Chat => request
            .get("messages")
            .and_then(Value::as_array)
            .map_or(0, |messages| {
                messages
                    .iter()
                    .map(|m| content_words(m.get("content")))
                    .sum()
            }),
        _ => match request.get("prompt") {
            Some(Value::String(s)) => count_words(s),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => count_words(s),
                    Value::Number(_) => 1,
                    Value::Array(tokens) => tokens.len(),
                    _ => 0,
                })
                .sum(),
            _ => 0,
        },
    };
    n.max(1)
}

/// Everything that determines a generated answer.
struct Generation {
    /// Hex hash of the request body.
    hash: String,
    /// The model name as a JSON string literal.
    model: String,
    n: usize,
    finish: &'static str,
    prompt_tokens: usize,
    tools: bool,
    /// The `usage` object's text, when `x-mock-usage` scripts it.
    usage: Option<String>,
}

/// SSE events packed into one buffer; `ends[i]` is where event `i` ends.
struct Events {
    buf: String,
    ends: Vec<usize>,
}

impl Events {
    fn with_capacity(events: usize, bytes: usize) -> Events {
        Events {
            buf: String::with_capacity(bytes),
            ends: Vec::with_capacity(events),
        }
    }

    /// Appends `data: <parts...>\n\n` as one event.
    fn event(&mut self, parts: &[&str]) {
        self.buf.push_str("data: ");
        for p in parts {
            self.buf.push_str(p);
        }
        self.buf.push_str("\n\n");
        self.ends.push(self.buf.len());
    }
}

impl Generation {
    fn new(
        route: Route,
        request: &Value,
        body: &[u8],
        knobs: &Knobs,
        default_tokens: usize,
    ) -> Generation {
        let max_tokens = request
            .get("max_tokens")
            .and_then(Value::as_u64)
            .or_else(|| request.get("max_completion_tokens").and_then(Value::as_u64));
        let (n, finish) = match (knobs.chunks, max_tokens) {
            (Some(n), _) => (n, "stop"),
            // Bounded by MAX_TOKENS_CAP, so the cast cannot truncate.
            (None, Some(max)) => (max.min(MAX_TOKENS_CAP) as usize, "length"),
            (None, None) => (default_tokens, "stop"),
        };
        let tools = knobs.tools && route == Route::Chat;
        Generation {
            hash: format!("{:016x}", conversation_hash(request, body)),
            model: json_string(
                request
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or("mock-model"),
            ),
            n,
            finish: if tools { "tool_calls" } else { finish },
            prompt_tokens: knobs
                .prompt_tokens
                .unwrap_or_else(|| prompt_tokens(route, request)),
            tools,
            usage: knobs.usage.clone(),
        }
    }

    fn usage(&self) -> String {
        if let Some(usage) = &self.usage {
            return usage.clone();
        }
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
            self.prompt_tokens,
            self.n,
            self.prompt_tokens + self.n
        )
    }

    fn text(&self) -> String {
        let mut text = String::with_capacity(self.n * 7);
        for i in 0..self.n {
            text.push_str("tok");
            text.push_str(&i.to_string());
            text.push(' ');
        }
        text
    }

    /// `{"id":"call_...","type":"function","function":{"name":"get_weather","arguments":""`
    fn tool_call_head(&self) -> String {
        format!(
            r#""id":"call_{}","type":"function","function":{{"name":"get_weather","arguments":"#,
            self.hash
        )
    }

    fn chat_json(&self) -> String {
        let message = if self.tools {
            let args = json_string(&TOOL_ARG_PIECES.concat());
            format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{{{}{args}}}}}]}}"#,
                self.tool_call_head()
            )
        } else {
            format!(
                r#"{{"role":"assistant","content":{}}}"#,
                json_string(&self.text())
            )
        };
        format!(
            r#"{{"id":"chatcmpl-{}","object":"chat.completion","created":{CREATED},"model":{},"system_fingerprint":"fp_mock","choices":[{{"index":0,"message":{message},"logprobs":null,"finish_reason":"{}"}}],"usage":{}}}"#,
            self.hash,
            self.model,
            self.finish,
            self.usage()
        )
    }

    fn completion_json(&self) -> String {
        format!(
            r#"{{"id":"cmpl-{}","object":"text_completion","created":{CREATED},"model":{},"system_fingerprint":"fp_mock","choices":[{{"text":{},"index":0,"logprobs":null,"finish_reason":"{}"}}],"usage":{}}}"#,
            self.hash,
            self.model,
            json_string(&self.text()),
            self.finish,
            self.usage()
        )
    }

    fn chat_events(&self, include_usage: bool) -> Events {
        let head = format!(
            r#"{{"id":"chatcmpl-{}","object":"chat.completion.chunk","created":{CREATED},"model":{},"system_fingerprint":"fp_mock","choices":"#,
            self.hash, self.model
        );
        const OPEN: &str = r#"[{"index":0,"delta":"#;
        const NO_FINISH: &str = r#","logprobs":null,"finish_reason":null}]}"#;
        let pieces = if self.tools {
            TOOL_ARG_PIECES.len()
        } else {
            self.n
        };
        let mut ev = Events::with_capacity(pieces + 4, (pieces + 4) * (head.len() + 96));
        if self.tools {
            let first = format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{{"index":0,{}""}}}}]}}"#,
                self.tool_call_head()
            );
            ev.event(&[&head, OPEN, &first, NO_FINISH]);
            for piece in TOOL_ARG_PIECES {
                let delta = format!(
                    r#"{{"tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}}"#,
                    json_string(piece)
                );
                ev.event(&[&head, OPEN, &delta, NO_FINISH]);
            }
        } else {
            ev.event(&[
                &head,
                OPEN,
                r#"{"role":"assistant","content":""}"#,
                NO_FINISH,
            ]);
            for i in 0..self.n {
                let delta = format!(r#"{{"content":"tok{i} "}}"#);
                ev.event(&[&head, OPEN, &delta, NO_FINISH]);
            }
        }
        let finish = format!(r#","logprobs":null,"finish_reason":"{}"}}]}}"#, self.finish);
        ev.event(&[&head, OPEN, "{}", &finish]);
        if include_usage {
            let usage = format!(r#"[],"usage":{}}}"#, self.usage());
            ev.event(&[&head, &usage]);
        }
        ev.event(&["[DONE]"]);
        ev
    }

    fn completion_events(&self, include_usage: bool) -> Events {
        let head = format!(
            r#"{{"id":"cmpl-{}","object":"text_completion","created":{CREATED},"model":{},"system_fingerprint":"fp_mock","choices":"#,
            self.hash, self.model
        );
        let mut ev = Events::with_capacity(self.n + 3, (self.n + 3) * (head.len() + 80));
        for i in 0..self.n {
            let choice = format!(
                r#"[{{"text":"tok{i} ","index":0,"logprobs":null,"finish_reason":null}}]}}"#
            );
            ev.event(&[&head, &choice]);
        }
        let finish = format!(
            r#"[{{"text":"","index":0,"logprobs":null,"finish_reason":"{}"}}]}}"#,
            self.finish
        );
        ev.event(&[&head, &finish]);
        if include_usage {
            let usage = format!(r#"[],"usage":{}}}"#, self.usage());
            ev.event(&[&head, &usage]);
        }
        ev.event(&["[DONE]"]);
        ev
    }
}

// ---------------------------------------------------------------------------
// Response body
// ---------------------------------------------------------------------------

/// What happens once the frames to send are exhausted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// End the body normally.
    Finish,
    /// Hang forever.
    Stall,
    /// Fail the body, making hyper drop the connection mid-body.
    Abort,
}

/// Counting and close-after-stream hooks of a generated body.
struct Track {
    shared: Arc<Shared>,
    ctl: Arc<ConnCtl>,
    sse: bool,
}

/// A body of pre-built frames sliced out of one buffer, with optional delay
/// between frames and an optional fault at the end.
struct MockBody {
    data: Bytes,
    /// End offsets of the frames in `data`.
    ends: Vec<usize>,
    /// Index of the next frame.
    next: usize,
    /// Number of frames to send before `tail`.
    limit: usize,
    tail: Tail,
    /// Content-Length to advertise (non-stream bodies).
    exact_len: Option<u64>,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
    track: Option<Track>,
    /// The pause before `Tail::Abort` has been started.
    abort_armed: bool,
    done: bool,
}

impl MockBody {
    /// A single-frame body with a Content-Length.
    fn full(data: Bytes) -> MockBody {
        let len = data.len();
        MockBody {
            exact_len: Some(len as u64),
            ends: vec![len],
            limit: 1,
            data,
            next: 0,
            tail: Tail::Finish,
            delay: None,
            sleep: None,
            track: None,
            abort_armed: false,
            done: false,
        }
    }

    /// A streamed (chunked) body sending one frame per event.
    fn frames(buf: String, ends: Vec<usize>) -> MockBody {
        MockBody {
            data: Bytes::from(buf),
            limit: ends.len(),
            ends,
            next: 0,
            tail: Tail::Finish,
            exact_len: None,
            delay: None,
            sleep: None,
            track: None,
            abort_armed: false,
            done: false,
        }
    }

    /// Applies the body faults and the chunk delay of `knobs`. For a
    /// non-stream body a fault splits it in two halves and sends only the
    /// first (none for `abort-after=0`).
    fn with_faults(mut self, knobs: &Knobs, sse: bool) -> MockBody {
        self.delay = knobs.chunk_delay;
        let (keep, tail) = match knobs.fault {
            Some(Fault::StallBody) => (if sse { 2 } else { 1 }, Tail::Stall),
            Some(Fault::AbortAfter(k)) => (if sse { k } else { k.min(1) }, Tail::Abort),
            _ => return self,
        };
        if !sse {
            let len = self.data.len();
            self.ends = vec![len / 2, len];
        }
        self.limit = keep.min(self.ends.len());
        self.tail = tail;
        self
    }

    fn tracked(mut self, track: Track) -> MockBody {
        self.track = Some(track);
        self
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(track) = &self.track {
            if track.sse {
                track.shared.completed.fetch_add(1, Ordering::SeqCst);
                if track.shared.opts.close_after_stream {
                    track.ctl.close.notify_one();
                }
            }
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = MockAbort;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MockAbort>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.next >= this.limit {
            return match this.tail {
                Tail::Finish => {
                    this.finish();
                    Poll::Ready(None)
                }
                // Never woken: the body hangs until the connection goes away.
                Tail::Stall => Poll::Pending,
                Tail::Abort => {
                    // Pause briefly first so the head and the frames sent so
                    // far reach the socket: hyper (HTTP/1) flushes while the
                    // body is pending, and h2 would discard queued DATA frames
                    // on the reset.
                    if !this.abort_armed {
                        this.abort_armed = true;
                        this.sleep = Some(Box::pin(tokio::time::sleep(ABORT_FLUSH_PAUSE)));
                    }
                    if let Some(pause) = this.sleep.as_mut() {
                        if pause.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    this.sleep = None;
                    this.done = true;
                    Poll::Ready(Some(Err(MockAbort("abort-after"))))
                }
            };
        }
        if this.next > 0 {
            if let Some(delay) = this.delay {
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
        }
        let start = if this.next == 0 {
            0
        } else {
            this.ends[this.next - 1]
        };
        let end = this.ends[this.next];
        this.next += 1;
        let frame = this.data.slice(start..end);
        if this.next >= this.limit && this.tail == Tail::Finish {
            this.finish();
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.exact_len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Drop for MockBody {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(track) = &self.track {
            track.shared.cancelled.fetch_add(1, Ordering::SeqCst);
            track.shared.cancel_notify.notify_waiters();
        }
    }
}
