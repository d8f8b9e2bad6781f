//! When a client connection is idle: no request in flight on it. A connection that stays idle
//! too long is closed by its worker (see `worker`), which is what keeps silent connections from
//! holding descriptors.
//!
//! [`Tracked`] wraps the request stack of one connection: a request counts as in flight from
//! the moment hyper hands it over until hyper drops its response body — that is, until the last
//! byte of a stream has gone, or the client left. [`Activity::idle`] completes once the
//! connection has had nothing in flight for the allowed time.
//!
//! Edge cases:
//! - Before its first request a connection gets `server.header_read_timeout`, not the (longer)
//!   idle timeout: an HTTP/2 connection that sends its preface and SETTINGS and then nothing
//!   opens no stream, and hyper has no timer of its own for that.
//! - A request whose response never started (the client left while it waited) ends its time in
//!   flight when its future is dropped.
//! - A stream longer than the idle timeout is in flight all along, and never cut for idleness.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::Service;

use crate::http::body::BoxError;
use crate::http::end::{End, Hook, HookBody, OnEnd};

/// What one connection has in flight, and since when it has had nothing.
#[derive(Debug)]
pub(crate) struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` at which the last request in flight ended.
    idle_since_ms: AtomicU64,
    /// Whether any request has come yet.
    served: AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            served: AtomicBool::new(false),
        })
    }

    /// Completes once nothing has been in flight for `idle_timeout` (`first_request` before the
    /// first request came).
    pub(crate) async fn idle(&self, first_request: Duration, idle_timeout: Duration) {
        loop {
            let deadline = match self.in_flight.load(Ordering::Acquire) {
                0 => {
                    let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                    let allowed = if self.served.load(Ordering::Acquire) {
                        idle_timeout
                    } else {
                        first_request
                    };
                    self.opened + since + allowed
                }
                // Busy: look again later, when the idle time cannot have run out sooner.
                _ => Instant::now() + idle_timeout,
            };
            let now = Instant::now();
            if deadline <= now && self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            // Whatever happens meanwhile, the deadline it sets is at least `idle_timeout` away.
            tokio::time::sleep_until(deadline.min(now + idle_timeout)).await;
        }
    }

    /// Whether a request is in flight now.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.served.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// One request in flight; its drop ends it.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let since = u64::try_from(self.0.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.idle_since_ms.store(since, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl OnEnd for InFlight {
    /// However the answer ended, the request is no longer in flight.
    fn on_end(self, _: End<'_>) {}
}

// === impl Tracked ===

/// A connection's request stack, counting what it has in flight into an [`Activity`].
#[derive(Debug, Clone)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

impl<S, Req, B> Service<Request<Req>> for Tracked<S>
where
    S: Service<Request<Req>, Response = Response<B>>,
    B: http_body::Body<Error = BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Req>) -> Self::Future {
        ResponseFuture {
            in_flight: Some(self.activity.begin()),
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// The stack's future; hands its time in flight on to the response body.
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        in_flight: Option<InFlight>,
    }
}

impl<F, B, E> std::future::Future for ResponseFuture<F>
where
    F: std::future::Future<Output = Result<Response<B>, E>>,
    B: http_body::Body<Error = BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let hook = this.in_flight.take().map_or_else(Hook::fired, Hook::new);
        Poll::Ready(result.map(|response| response.map(|inner| HookBody::new(inner, hook))))
    }
}

/// A response body that keeps its request in flight until its end, or until hyper drops it.
pub(crate) type TrackedBody<B> = HookBody<B, InFlight>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_response_body() {
        let activity = Activity::new();
        let service = Tracked::new(
            tower::service_fn(|_: Request<()>| async {
                Ok::<_, Infallible>(Response::new(crate::http::body::full("x")))
            }),
            activity.clone(),
        );
        let first = Duration::from_secs(1);
        let idle = Duration::from_secs(10);
        let response = service.oneshot(Request::new(())).await.expect("infallible");
        tokio::time::sleep(Duration::from_secs(30)).await;
        // The body is still held: in flight, so never idle.
        let waited = tokio::time::timeout(Duration::from_secs(60), activity.idle(first, idle));
        assert!(
            waited.await.is_err(),
            "a held body keeps the connection busy"
        );
        let ended = Instant::now();
        drop(response);
        activity.idle(first, idle).await;
        assert_eq!(
            ended.elapsed(),
            idle,
            "idle exactly idle_timeout after the body was dropped"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_first_request_the_first_request_timeout_applies() {
        let activity = Activity::new();
        let started = Instant::now();
        activity
            .idle(Duration::from_secs(1), Duration::from_secs(300))
            .await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
    }
}
