//! The upstream's response body on its way to the client: its frames ([`Answer`]'s, which joins
//! those already there) pass through untouched, with an idle timeout between frames and upstream
//! failures counted.
//!
//! A timeout on the response headers does not cover the body: an SSE stream that stalls after
//! its headers would otherwise hold the client, the connection and its permits forever.
//!
//! Edge cases:
//! - The idle timer is not reset on every frame (a timer-wheel operation per chunk); the time of
//!   the last frame is noted, and when the timer fires early it is re-armed from that time.
//! - Dropping this body drops the upstream body, which closes the upstream request: a client that
//!   leaves cancels the generation upstream.
//! - The endpoint counts the request in flight until this body ends or is dropped; an HTTP/1.1
//!   connection goes back to its worker's pool only when the body was read to its end (one
//!   dropped early is closed: what is left of the answer would be read by the next request), and
//!   [`Answer`] sees to that.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::http::body::BoxError;
use crate::observability::labels::UpstreamErrorKind;
use crate::observability::metrics::Metrics;
use crate::proxy::answer::Answer;
use crate::proxy::endpoint::InFlight;

#[derive(Debug, thiserror::Error)]
#[error("upstream sent nothing for {0:?} mid-response")]
pub(crate) struct IdleTimeout(Duration);

pin_project! {
    pub(crate) struct UpstreamBody {
        #[pin]
        inner: Answer,
        #[pin]
        idle: Sleep,
        idle_timeout: Duration,
        last_frame: Instant,
        metrics: Arc<Metrics>,
        // Dropped with the body at the latest; taken at its end.
        inflight: Option<InFlight>,
    }
}

impl UpstreamBody {
    pub(crate) fn new(
        inner: Answer,
        idle_timeout: Duration,
        metrics: Arc<Metrics>,
        inflight: InFlight,
    ) -> Self {
        let now = Instant::now();
        let mut body = UpstreamBody {
            inner,
            idle: tokio::time::sleep_until(now + idle_timeout),
            idle_timeout,
            last_frame: now,
            metrics,
            inflight: Some(inflight),
        };
        if body.inner.is_end_stream() {
            body.inflight = None;
        }
        body
    }
}

/// The pool's name, for the error metric (known until the body ended).
fn upstream_of(inflight: &Option<InFlight>) -> &str {
    inflight
        .as_ref()
        .map_or("none", |inflight| &inflight.endpoint().upstream)
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.last_frame = Instant::now();
                if this.inner.is_end_stream() {
                    this.inflight.take();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                let upstream = upstream_of(this.inflight);
                this.metrics
                    .upstream_error(upstream, UpstreamErrorKind::BodyError);
                this.inflight.take();
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(None) => {
                this.inflight.take();
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                if this.idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let deadline = *this.last_frame + *this.idle_timeout;
                if Instant::now() >= deadline {
                    let upstream = upstream_of(this.inflight);
                    this.metrics
                        .upstream_error(upstream, UpstreamErrorKind::BodyIdleTimeout);
                    return Poll::Ready(Some(Err(IdleTimeout(*this.idle_timeout).into())));
                }
                // A frame came since the timer was armed: wait out the rest from that frame.
                this.idle.as_mut().reset(deadline);
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
