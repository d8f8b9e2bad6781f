//! The one response body type every layer returns, and small constructors for it.
//!
//! Upstream bodies are boxed once into [`GatewayBody`] so that the stack has a single response
//! type whether the answer is streamed from the upstream or made by the gateway itself.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body of every layer.
pub type GatewayBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A body of bytes known in full.
pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> GatewayBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}
