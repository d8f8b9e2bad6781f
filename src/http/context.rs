//! The request context: one per request, made by the outermost layer (observe) and shared as an
//! `Arc` through the request's extensions. It holds what the request learns on its way in — its
//! id, its start, the endpoint, the key, the model label — each fact set once by the layer that
//! learns it, and the actions that must run once when the answer ends, registered by the layers
//! that took something to give back (a quota reservation, an in-flight slot). There is no second
//! copy of the id or of a label anywhere: the ledger, the access log and the metrics read them
//! here.
//!
//! | fact / action        | set by    | read by                                               |
//! |----------------------|-----------|-------------------------------------------------------|
//! | id, start, method, path | observe | proxy (start: overhead metric), the end (ledger, access log) |
//! | endpoint             | route     | validate, proxy, the end (labels)                     |
//! | key                  | auth      | rate_limit, policy, quota, the end (labels)           |
//! | model label          | policy    | quota, the end (labels)                               |
//! | upstream (pool)      | pick_pool | quota (inject_usage), proxy, the end (ledger, access log) |
//! | end actions          | rate_limit (slot), quota (settlement) | the end, inner first     |
//!
//! Other request extensions: [`ParsedRequest`] (validate → policy, quota); on the response,
//! [`UpstreamReached`] (proxy → the end).
//!
//! A traced request also carries its [`RequestTrace`] (observe; read by validate, quota's
//! settlement, proxy and the end); an untraced one has none, and pays nothing for spans.
//!
//! Edge cases: a layer that finds no context answers 500 (the stack is mis-assembled) rather
//! than let the request through unaccounted; end actions run in reverse order of registration,
//! as a response unwinds the stack, so the settlement (innermost) runs before the slot is given
//! back, and both before the access line is written.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use http::{HeaderValue, Method, Request, StatusCode};
use tokio::time::Instant;

use crate::http::error::ErrorSource;
use crate::http::generation::Generation;
use crate::http::trace::RequestTrace;
use crate::keys::KeyEntry;
use crate::observability::metrics::{OTHER_MODEL, UNAUTHENTICATED};
use crate::proxy::pool::Pool;

/// What a request learns on its way, and what must happen when it ends.
pub struct RequestContext {
    /// The id the gateway logs, forwards and returns: the client's, or a new UUID.
    id: HeaderValue,
    start: Instant,
    method: Method,
    /// The path only: a query string may carry things that do not belong in logs.
    path: Box<str>,
    endpoint: OnceLock<Endpoint>,
    key: OnceLock<Arc<KeyEntry>>,
    /// A model the key names exactly, or unset (`other`): never raw client input.
    model: OnceLock<Arc<str>>,
    /// The pool that serves the request's model.
    pool: OnceLock<Arc<Pool>>,
    /// Set when the request is traced (`[telemetry]`).
    trace: Option<RequestTrace>,
    at_end: Mutex<Vec<Box<dyn AtEnd>>>,
}

pub(crate) type SharedContext = Arc<RequestContext>;

impl RequestContext {
    /// A request received now.
    pub fn new(id: HeaderValue, method: Method, path: &str) -> RequestContext {
        RequestContext {
            id,
            start: Instant::now(),
            method,
            path: path.into(),
            endpoint: OnceLock::new(),
            key: OnceLock::new(),
            model: OnceLock::new(),
            pool: OnceLock::new(),
            trace: None,
            at_end: Mutex::new(Vec::new()),
        }
    }

    /// The request, traced.
    pub(crate) fn with_trace(mut self, trace: RequestTrace) -> RequestContext {
        self.trace = Some(trace);
        self
    }

    /// The request's spans and their facts; `None` when it is not traced.
    pub(crate) fn trace(&self) -> Option<&RequestTrace> {
        self.trace.as_ref()
    }

    /// The context the outer layer gave `request`.
    pub(crate) fn of<B>(request: &Request<B>) -> Option<&SharedContext> {
        request.extensions().get::<SharedContext>()
    }

    /// The context and the parsed body of `request`; `None` for a request without a body to
    /// judge (`GET /v1/models`).
    pub(crate) fn with_parsed<B>(
        request: &Request<B>,
    ) -> Option<(&SharedContext, &Arc<ParsedRequest>)> {
        let context = RequestContext::of(request)?;
        Some((context, request.extensions().get::<Arc<ParsedRequest>>()?))
    }

    pub(crate) fn id_header(&self) -> &HeaderValue {
        &self.id
    }

    /// The id as text; `-` when the client sent one that is not.
    pub(crate) fn id(&self) -> &str {
        self.id.to_str().unwrap_or("-")
    }

    pub(crate) fn start(&self) -> Instant {
        self.start
    }

    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    pub(crate) fn endpoint(&self) -> Option<Endpoint> {
        self.endpoint.get().copied()
    }

    /// The `endpoint` label: `none` before routing.
    pub(crate) fn endpoint_label(&self) -> &'static str {
        self.endpoint().map_or("none", Endpoint::label)
    }

    /// Set once, by the route layer (a second set is ignored).
    pub fn set_endpoint(&self, endpoint: Endpoint) {
        let _ = self.endpoint.set(endpoint);
    }

    /// The authenticated caller's entry in the live key table.
    pub(crate) fn key(&self) -> Option<&Arc<KeyEntry>> {
        self.key.get()
    }

    /// The `key` label: the key's configured name, or `unauthenticated`.
    pub(crate) fn key_label(&self) -> &str {
        self.key.get().map_or(UNAUTHENTICATED, |key| &key.name)
    }

    /// Set once, by the auth layer.
    pub fn set_key(&self, key: Arc<KeyEntry>) {
        let _ = self.key.set(key);
    }

    /// The `model` label: a model the key names exactly, or `other`.
    pub(crate) fn model_label(&self) -> &str {
        self.model.get().map_or(OTHER_MODEL, |model| model)
    }

    /// Set once, by the policy layer.
    pub(crate) fn set_model_label(&self, model: &str) {
        let _ = self.model.set(Arc::from(model));
    }

    /// The pool chosen for the request's model.
    pub(crate) fn pool(&self) -> Option<&Arc<Pool>> {
        self.pool.get()
    }

    /// The `upstream` of the ledger and the access log: the pool's name, or `none`.
    pub(crate) fn upstream_label(&self) -> &str {
        self.pool.get().map_or("none", |pool| &pool.config.name)
    }

    /// Set once, by the pick_pool layer.
    pub(crate) fn set_pool(&self, pool: Arc<Pool>) {
        let _ = self.pool.set(pool);
    }

    /// Registers `action` to run once when the answer ends (or the request is dropped).
    pub fn at_end(&self, action: impl AtEnd + 'static) {
        self.actions().push(Box::new(action));
    }

    /// Runs the registered end actions, the last registered (innermost layer) first. Called by
    /// the end-of-request hook, once.
    pub fn run_end_actions(&self, ending: &Ending) {
        let actions = std::mem::take(&mut *self.actions());
        for action in actions.into_iter().rev() {
            action.at_end(self, ending);
        }
    }

    fn actions(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn AtEnd>>> {
        // A panic elsewhere while the list was held leaves it intact: keep using it.
        self.at_end.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Something a layer took for a request that must be given back, charged or written once the
/// answer is over.
pub trait AtEnd: Send {
    fn at_end(self: Box<Self>, context: &RequestContext, ending: &Ending);
}

/// How a request ended, as its end actions are told.
#[derive(Debug)]
pub struct Ending {
    /// The status the client got; 499 when it left before the response headers, 500 when the
    /// request was dropped by a panic.
    pub status: StatusCode,
    pub outcome: Outcome,
    /// Whether the upstream saw the request (it may have used tokens).
    pub upstream_reached: bool,
    /// The gateway's own error answer, with what the access log says about it.
    pub error: Option<ErrorSource>,
}

/// How the answer's body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its last frame (or its trailers) went out.
    Complete,
    /// The client left first: before the response headers, or mid-body.
    ClientGone,
    /// The body failed: the upstream broke off or went idle.
    UpstreamError,
}

impl Outcome {
    /// The access log's word: `complete`, `client_gone`, `body_error` (the body failed).
    pub(crate) fn log_label(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamError => "body_error",
        }
    }

    /// The ledger's word: `complete`, `client_gone`, `upstream_error` (the upstream failed the
    /// request, mid-body or before it). Both words are read by users and tools: each output keeps
    /// its own.
    pub(crate) fn ledger_label(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamError => "upstream_error",
        }
    }
}

/// The API operation a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Models,
}

impl Endpoint {
    /// The path under the upstream base URL, and the `endpoint` metric label.
    pub(crate) fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Models => "/v1/models",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Models => "models",
        }
    }
}

/// Set on a response when the upstream saw the request (it answered, or failed after the request
/// was sent): such a request may have used tokens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamReached;

/// The request body, parsed and checked against the schema, with the fields later layers use.
#[derive(Debug)]
pub struct ParsedRequest {
    pub(crate) json: serde_json::Value,
    pub(crate) model: String,
    pub(crate) stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub(crate) include_usage: bool,
    /// The fields that bound the answer's length and count.
    pub(crate) generation: Generation,
}

impl ParsedRequest {
    pub(crate) fn new(json: serde_json::Value) -> ParsedRequest {
        let model = json
            .get("model")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_owned();
        let stream = json
            .get("stream")
            .and_then(|s| s.as_bool())
            .unwrap_or(false);
        let include_usage = json
            .pointer("/stream_options/include_usage")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let generation = Generation::read(&json);
        ParsedRequest {
            generation,
            json,
            model,
            stream,
            include_usage,
        }
    }
}
