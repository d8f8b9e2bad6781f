//! Typed request extensions: the contract between layers. A layer reads only what an outer layer
//! put here, and adds only what it owns.
//!
//! | extension        | added by  | read by                     |
//! |------------------|-----------|-----------------------------|
//! | [`RequestStart`] | observe   | proxy (overhead metric)     |
//! | [`RequestTags`]  | observe   | inner layers fill it; observe reads it for metrics and the access log |
//! | [`Endpoint`]     | route     | proxy (route also notes it in the tags) |
//! | [`Principal`]    | auth      | rate_limit, policy (auth also notes the key name in the tags) |
//! | [`ParsedRequest`]| validate  | policy, and later accounting (policy notes the model label in the tags) |

use std::sync::{Arc, OnceLock};

use tokio::time::Instant;

/// When the gateway received the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestStart(pub Instant);

/// Facts inner layers learn about a request that the outer observe layer reports: set once,
/// read when the response ends.
#[derive(Debug, Default)]
pub struct RequestTags {
    /// The API operation, once routed.
    pub endpoint: OnceLock<Endpoint>,
    /// The configured name of the caller's key.
    pub key: OnceLock<Arc<str>>,
    /// The model label: a model the key may use, or `other` (bounded, never raw client input).
    pub model: OnceLock<Arc<str>>,
}

pub type SharedTags = Arc<RequestTags>;

/// The API operation a request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Models,
}

impl Endpoint {
    /// The path under the upstream base URL, and the `endpoint` metric label.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Models => "/v1/models",
        }
    }

    pub fn label(self) -> &'static str {
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
pub struct UpstreamReached;

/// The authenticated caller: its key's entry in the live key table.
#[derive(Clone)]
pub struct Principal(pub Arc<crate::keys::KeyEntry>);

/// The request body, parsed and checked against the schema, with the fields later layers use.
#[derive(Debug)]
pub struct ParsedRequest {
    pub json: serde_json::Value,
    pub model: String,
    pub stream: bool,
    /// `stream_options.include_usage` as the client sent it.
    pub include_usage: bool,
    /// The larger of `max_tokens` and `max_completion_tokens`, when either is set.
    pub max_tokens: Option<u64>,
}

impl ParsedRequest {
    pub fn new(json: serde_json::Value) -> ParsedRequest {
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
        let max_tokens = ["max_tokens", "max_completion_tokens"]
            .iter()
            .filter_map(|field| json.get(field).and_then(|v| v.as_u64()))
            .max();
        ParsedRequest {
            json,
            model,
            stream,
            include_usage,
            max_tokens,
        }
    }
}
