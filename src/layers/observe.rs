//! The outer observer of every request: starts its clock, gives inner layers a [`RequestTags`]
//! to fill, and when the response's last byte has gone (or the client left, or the body broke)
//! writes the access-log line and the request metrics — exactly once.
//!
//! Edge cases:
//! - End of stream may come with the last data frame: `is_end_stream` is checked after every
//!   frame, because the consumer may not poll again.
//! - A response body dropped before its end (client gone) is still logged and counted, with
//!   outcome `client_gone`; a body that errors (upstream broke off) with outcome `body_error`.
//! - A request whose client leaves before the response headers is logged and counted too, with
//!   outcome `client_gone` and status 499 (nginx's "client closed request").

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::http::body::BoxError;
use crate::http::context::{Endpoint, RequestStart, RequestTags, SharedTags};
use crate::http::error::ErrorSource;
use crate::http::CLIENT_CLOSED_REQUEST;
use crate::observability::metrics::{Metrics, OTHER_MODEL, UNAUTHENTICATED};

#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        ObserveLayer { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, ResBody> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<ResBody>, Error = Infallible>,
{
    type Response = Response<ObservedBody<ResBody>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let start = Instant::now();
        let tags = SharedTags::default();
        request.extensions_mut().insert(RequestStart(start));
        request.extensions_mut().insert(tags.clone());
        let record = Record {
            start,
            method: request.method().clone(),
            // The path only: a query string may carry things that do not belong in logs.
            path: request.uri().path().to_owned(),
            request_id: request.headers().get("x-request-id").cloned(),
            tags,
            metrics: self.metrics.clone(),
            status: StatusCode::OK,
            error: None,
        };
        ResponseFuture {
            inner: self.inner.call(request),
            record: Some(record),
        }
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        record: Option<Record>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        /// Dropped before the response: the client left while the request was being handled
        /// (hyper drops the service future of a closed connection). Without this such a request
        /// had no access-log line and was not counted at all.
        fn drop(this: Pin<&mut Self>) {
            if let Some(mut record) = this.project().record.take() {
                record.status = StatusCode::from_u16(CLIENT_CLOSED_REQUEST)
                    .unwrap_or(StatusCode::BAD_REQUEST);
                record.finish(Outcome::ClientGone);
            }
        }
    }
}

impl<F, ResBody> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, Infallible>>,
{
    type Output = Result<Response<ObservedBody<ResBody>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.inner.poll(cx));
        let mut record = this.record.take();
        if let Some(record) = record.as_mut() {
            record.status = response.status();
            record.error = response.extensions().get::<ErrorSource>().cloned();
        }
        Poll::Ready(Ok(response.map(|inner| ObservedBody { inner, record })))
    }
}

pin_project! {
    /// The response body, watched for its end.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        record: Option<Record>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(record) = this.project().record.take() {
                record.finish(Outcome::ClientGone);
            }
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        let outcome = match &polled {
            None => Some(Outcome::Complete),
            Some(Err(_)) => Some(Outcome::BodyError),
            Some(Ok(_)) if this.inner.is_end_stream() => Some(Outcome::Complete),
            Some(Ok(_)) => None,
        };
        if let Some(outcome) = outcome {
            if let Some(record) = this.record.take() {
                record.finish(outcome);
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Complete,
    ClientGone,
    BodyError,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientGone => "client_gone",
            Outcome::BodyError => "body_error",
        }
    }
}

/// What the access log and the request metrics need, gathered on the way in and out.
struct Record {
    start: Instant,
    method: Method,
    path: String,
    request_id: Option<HeaderValue>,
    tags: SharedTags,
    metrics: Arc<Metrics>,
    status: StatusCode,
    error: Option<ErrorSource>,
}

impl Record {
    fn finish(self, outcome: Outcome) {
        let elapsed = self.start.elapsed();
        let RequestTags {
            endpoint,
            key,
            model,
        } = &*self.tags;
        let routed = endpoint.get().copied();
        let endpoint = routed.map_or("none", Endpoint::label);
        let key = key.get().map_or(UNAUTHENTICATED, |k| k);
        let model = model.get().map_or(OTHER_MODEL, |m| m);
        let status = self.status.as_str();

        self.metrics
            .requests_total
            .with_label_values(&[key, model, endpoint, status])
            .inc();
        if routed.is_some() {
            self.metrics
                .request_duration_seconds
                .with_label_values(&[key, model, endpoint])
                .observe(elapsed.as_secs_f64());
        }

        let request_id = self
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        // Whole microseconds: a short number to print ("0.412", not "0.41200000000000003").
        // Display (`%`) for names from known, safe sets; the client's request id and path keep
        // Debug's quoting and escaping, so that they cannot forge a field or a line.
        tracing::info!(
            target: "tollgate::access",
            request_id,
            method = %self.method,
            path = ?self.path,
            endpoint = %endpoint,
            status = self.status.as_u16(),
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
            key = %key,
            model = %model,
            outcome = %outcome.label(),
            error = self.error.as_ref().map(|e| e.0.as_str()),
        );
    }
}
