//! The one response body type every layer returns, and small constructors for it.
//!
//! Upstream bodies are boxed once into [`GatewayBody`] so that the stack has a single response
//! type whether the answer is streamed from the upstream or made by the gateway itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use pin_project_lite::pin_project;

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

pin_project! {
    /// A body that holds `guard` until the body is dropped: when its last frame has been sent,
    /// or when the client has gone away. Used for per-request resources such as in-flight slots.
    pub struct WithGuard<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B, G> WithGuard<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        WithGuard { inner, guard }
    }
}

impl<B: Body, G> Body for WithGuard<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
