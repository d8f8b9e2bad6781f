//! A deterministic, fast mock of an OpenAI-compatible model server, for tollgate's tests, benches
//! and the `mock_upstream` example.
//!
//! It imitates the HTTP surface of OpenAI, vLLM and llama.cpp's `llama-server`
//! closely enough to put a gateway in front of it:
//!
//! * `POST {prefix}/v1/chat/completions` – `chat.completion` JSON, or with
//!   `"stream": true` a `text/event-stream` of `chat.completion.chunk` events
//!   (role chunk, one chunk per token, finish chunk, optional usage chunk when
//!   `stream_options.include_usage` is true, then `data: [DONE]`).
//! * `POST {prefix}/v1/completions` – the same for `text_completion`.
//! * `GET {prefix}/v1/models` – a one-model list (`mock-model`), or [`MockOptions::models`].
//! * `GET /health` – 200 `{"status":"ok"}`, as llama.cpp and vLLM answer their health check.
//! * `POST /v1/traces` – 200 with an empty body: an OTLP/HTTP trace sink that discards what it
//!   is sent (the overhead bench's traced rows export here).
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
//! `finish_reason` is `"length"`), else 8. `usage.prompt_tokens` counts the
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
//! | `x-mock-fault: F` | a [`Fault`]: a broken exchange or a canned answer the generator would never give |
//!
//! The faults, by their `x-mock-fault` value:
//!
//! | value | effect |
//! |---|---|
//! | `reset-before-headers` | read the request, then reset the TCP connection (RST) without any response |
//! | `stall-headers` | never answer (hang until the client goes away) |
//! | `stall-body` | send headers and 2 SSE events (half the JSON for non-stream), then hang |
//! | `abort-after=K` | send headers and `K` SSE events (non-stream: half the JSON if `K > 0`), then drop the connection mid-body |
//! | `not-json` | 200, `Content-Type: application/json`, body `this is not json` |
//! | `garbage-json` | 200 `application/json` whose body is not JSON: an object nested past any limit ([`canned::garbage_json`]) |
//! | `garbage-sse` | 200 `text/event-stream` whose body is anything but SSE ([`canned::garbage_sse`]) |
//! | `absurd-usage` | a chat answer reporting `u64::MAX` tokens ([`canned::ABSURD_USAGE`]) |
//! | `flood=BYTES` | 200 SSE, `BYTES` of chunk events in 64 KiB frames, each made only when the previous one was taken |
//!
//! The canned answers (`not-json` to `flood`) come whatever the request's body, on the completion
//! and model routes; [`Fault`] is their typed form (its `Display` is the header value). An unknown
//! `x-mock-fault` value is answered with 400 so typos are noticed.
//!
//! [`MockOptions::delay`] makes every answer slow by a fixed time (one slow replica among fast
//! ones); [`MockUpstream::stop`] kills the server and its connections, and
//! [`MockUpstream::start_on`] the same address starts it again (a replica restarted).
//!
//! [`MockOptions::close_after_stream`] imitates llama.cpp closing the
//! connection after each SSE response although the response did not say
//! `Connection: close`; [`MockOptions::require_key`] demands
//! `Authorization: Bearer <key>` (else 401).
//!
//! The server speaks HTTP/1.1 and h2c (prior knowledge) on the same port. What it saw is counted:
//! requests (and recorded, unless turned off), connections, completion bodies finished or
//! cancelled, and the body bytes handed to the connection.
//!
//! Modules: `server` (accept loop and connections), `fault` (the request headers read as knobs),
//! `respond` (routing and the answer), `generate` (the deterministic completions), `body` (the
//! response body with its delays and faults), [`canned`] (the canned answers' bytes).

pub mod canned;

mod body;
mod conn;
mod fault;
mod generate;
mod respond;
mod server;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Version};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

pub use fault::{Fault, ParseFaultError, FAULT_HEADER};

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
    /// Tokens generated when a request names no `max_tokens` (8 when `None`; llama.cpp's own
    /// default is "until the context is full").
    pub default_tokens: Option<usize>,
    /// Wait this long before answering every request (not `/health`): a slow replica.
    pub delay: Option<Duration>,
    /// The models `GET /v1/models` lists; `mock-model` when empty.
    pub models: Vec<String>,
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
        let accept_task = tokio::spawn(server::accept_loop(listener, Arc::clone(&shared)));
        Ok(MockUpstream {
            addr,
            shared,
            accept_task,
        })
    }

    /// Stops the server now: the listener closes and every connection drops (mid-answer ones
    /// too, as a killed process's would). The address can be bound again at once.
    pub async fn stop(mut self) {
        self.accept_task.abort();
        let _ = (&mut self.accept_task).await;
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

    /// The prompt and completion tokens of every `usage` object the mock generated (not the
    /// scripted ones of `x-mock-usage`): what a gateway in front of it should have charged.
    pub fn reported_tokens(&self) -> (u64, u64) {
        (
            self.shared.reported_prompt.load(Ordering::SeqCst),
            self.shared.reported_completion.load(Ordering::SeqCst),
        )
    }

    /// SSE streams sent completely.
    pub fn completed_streams(&self) -> usize {
        self.shared.completed.load(Ordering::SeqCst)
    }

    /// Bytes of completion bodies (JSON or SSE, canned answers included) handed to the
    /// connections so far: how far a reader that stopped reading let the mock get.
    pub fn body_bytes_sent(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::SeqCst)
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

// === impl Shared ===

/// What the server's tasks share: the options, the paths they resolve to, and the counters.
struct Shared {
    opts: MockOptions,
    chat_path: String,
    completions_path: String,
    models_path: String,
    /// `Bearer <key>` when a key is required.
    expected_auth: Option<String>,
    /// What `GET /v1/models` lists.
    models: Vec<String>,
    recording: AtomicBool,
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: AtomicUsize,
    connections: AtomicUsize,
    cancelled: AtomicUsize,
    completed: AtomicUsize,
    body_bytes: AtomicU64,
    reported_prompt: AtomicU64,
    reported_completion: AtomicU64,
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
            models: if opts.models.is_empty() {
                vec!["mock-model".to_owned()]
            } else {
                opts.models.clone()
            },
            opts,
            recording: AtomicBool::new(true),
            requests: Mutex::new(Vec::new()),
            request_count: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            completed: AtomicUsize::new(0),
            body_bytes: AtomicU64::new(0),
            reported_prompt: AtomicU64::new(0),
            reported_completion: AtomicU64::new(0),
            cancel_notify: Notify::new(),
        }
    }
}
