//! The outermost layer: it gives each request its [`RequestContext`] (its id — the client's
//! `x-request-id`, or a new UUID — and its clock), and owns the request's one end-of-request
//! [`Hook`]. The hook runs when the response's last frame has gone, its body failed, or the
//! client left (before the response headers too): first the end actions inner layers registered
//! (settlement, then the in-flight slot), then the access line and the request metrics, and —
//! when the request is traced — its SERVER span ([`crate::observability::traces`]) — exactly
//! once.
//!
//! Every response carries the id the gateway logged as `x-request-id`, replacing any other (the
//! proxy keeps the upstream's own as `x-upstream-request-id`).
//!
//! Edge cases:
//! - A request whose client leaves before the response headers (hyper drops this layer's
//!   future) ends with status 499 (nginx's "client closed request") and outcome `client_gone`;
//!   one dropped while a panic unwinds, with 500 (what `CatchPanic` would have answered).
//! - A client's `x-request-id` that is not text is forwarded and returned as sent, and logged as
//!   `-`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use bytes::Bytes;
use http_body::Body;
use http_body_util::Either;

use crate::http::body::BoxError;
use crate::http::context::{Ending, Outcome, RequestContext, SharedContext, UpstreamReached};
use crate::http::end::{End, Hook, HookBody, OnEnd};
use crate::http::error::{ErrorReason, ErrorSource};
use crate::http::headers::X_REQUEST_ID;
use crate::http::CLIENT_CLOSED_REQUEST;
use crate::observability::access;
use crate::observability::metrics::Metrics;
use crate::observability::traces::answer::AnswerScan;
use crate::observability::traces::{self, SharedTraces};

/// The answer's body, read for its span when the request is sampled.
type Answer<B> = Either<B, AnswerScan<B>>;

#[derive(Clone)]
pub(crate) struct ObserveLayer {
    metrics: Arc<Metrics>,
    traces: SharedTraces,
}

impl ObserveLayer {
    pub(crate) fn new(metrics: Arc<Metrics>, traces: SharedTraces) -> Self {
        ObserveLayer { metrics, traces }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
            traces: self.traces.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
    traces: SharedTraces,
}

impl<S, B, ResBody> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<ResBody>, Error = Infallible>,
    ResBody: Body<Data = Bytes, Error = BoxError>,
{
    type Response = Response<HookBody<Answer<ResBody>, Finish>>;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = match request.headers().get(X_REQUEST_ID) {
            Some(id) => id.clone(),
            None => {
                let id = random_request_id();
                request.headers_mut().insert(X_REQUEST_ID, id.clone());
                id
            }
        };
        let mut context = RequestContext::new(id, request.method().clone(), request.uri().path());
        if let Some(traces) = &self.traces {
            context = context.with_trace(traces.start_request(request.headers(), request.method()));
        }
        let context = Arc::new(context);
        request.extensions_mut().insert(context.clone());
        let finish = Finish {
            context,
            metrics: self.metrics.clone(),
            head: None,
        };
        ResponseFuture {
            inner: self.inner.call(request),
            hook: Hook::new(finish),
        }
    }
}

/// A random (v4) UUID, formatted on the stack rather than through a `String` and a parse.
fn random_request_id() -> HeaderValue {
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

pin_project! {
    /// Holds the hook until the response head comes; dropped before that, the hook fires
    /// (the client left).
    pub(crate) struct ResponseFuture<F> {
        #[pin]
        inner: F,
        hook: Hook<Finish>,
    }
}

impl<F, B> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Output = Result<Response<HookBody<Answer<B>, Finish>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        let mut hook = std::mem::replace(this.hook, Hook::fired());
        let mut scanned = None;
        if let Some(finish) = hook.get_mut() {
            finish.head = Some(Head::of(&response));
            response
                .headers_mut()
                .insert(X_REQUEST_ID, finish.context.id_header().clone());
            // A sampled request's answer is read for its span's model and finish reasons.
            let sampled = finish.context.trace().is_some_and(|t| t.is_recording());
            scanned = sampled.then(|| finish.context.clone());
        }
        let body = response.map(|body| match scanned {
            Some(context) => Either::Right(AnswerScan::new(body, context)),
            None => Either::Left(body),
        });
        Poll::Ready(Ok(body.map(|body| HookBody::new(body, hook))))
    }
}

/// What the end reads of the response head.
struct Head {
    status: StatusCode,
    upstream_reached: bool,
    error: Option<ErrorSource>,
    /// The gateway's reason for its error answer (a span's `error.type`).
    reason: Option<&'static str>,
}

impl Head {
    fn of<B>(response: &Response<B>) -> Head {
        Head {
            status: response.status(),
            upstream_reached: response.extensions().get::<UpstreamReached>().is_some(),
            error: response.extensions().get::<ErrorSource>().cloned(),
            reason: response.extensions().get::<ErrorReason>().map(|r| r.0),
        }
    }
}

/// The request's end: its context's end actions, then its access line and request metrics.
pub(crate) struct Finish {
    context: SharedContext,
    metrics: Arc<Metrics>,
    /// Set when the response head comes; `None` while the request is still inside.
    head: Option<Head>,
}

impl Finish {
    fn ending(head: Option<Head>, end: End<'_>) -> Ending {
        let outcome = match end {
            End::Complete | End::Trailers(_) => Outcome::Complete,
            End::Error(_) => Outcome::UpstreamError,
            End::Cancelled => Outcome::ClientGone,
        };
        match head {
            Some(head) => Ending {
                status: head.status,
                outcome,
                upstream_reached: head.upstream_reached,
                error: head.error,
            },
            None => Ending {
                // Unwinding from a panic: the client gets a 500, not a 499.
                status: if std::thread::panicking() {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::from_u16(CLIENT_CLOSED_REQUEST).unwrap_or(StatusCode::BAD_REQUEST)
                },
                outcome,
                // Only a request handed to the proxy has a settlement to tell: the proxy sends at
                // once and holds nothing back, so the upstream had it.
                upstream_reached: true,
                error: None,
            },
        }
    }
}

impl OnEnd for Finish {
    fn on_end(self, end: End<'_>) {
        let reason = self.head.as_ref().and_then(|head| head.reason);
        let ending = Finish::ending(self.head, end);
        self.context.run_end_actions(&ending);
        access::record(&self.metrics, &self.context, &ending);
        traces::end_request(&self.context, &ending, reason);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use http_body_util::BodyExt;
    use tower::{service_fn, ServiceExt};

    use super::*;
    use crate::http::body::{full, GatewayBody};
    use crate::http::context::AtEnd;

    /// Notes in `log` what it was told when the request ended.
    struct Note {
        name: &'static str,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl AtEnd for Note {
        fn at_end(self: Box<Self>, _context: &RequestContext, ending: &Ending) {
            let line = format!(
                "{} {} {:?}",
                self.name,
                ending.status.as_u16(),
                ending.outcome
            );
            self.log.lock().expect("not poisoned").push(line);
        }
    }

    fn notes(log: &Mutex<Vec<String>>) -> Vec<String> {
        log.lock().expect("not poisoned").clone()
    }

    /// An inner service that registers two end actions, the way rate limit and quota do.
    fn registering(
        log: Arc<Mutex<Vec<String>>>,
        answer: impl Future<Output = ()> + Send + Clone + 'static,
    ) -> impl Service<
        Request<()>,
        Response = Response<GatewayBody>,
        Error = Infallible,
        Future = impl Send,
    > + Clone {
        service_fn(move |request: Request<()>| {
            let log = log.clone();
            let answer = answer.clone();
            async move {
                let context = RequestContext::of(&request).expect("a context").clone();
                for name in ["outer", "inner"] {
                    let log = log.clone();
                    context.at_end(Note { name, log });
                }
                answer.await;
                let mut response = Response::new(full("answer"));
                response
                    .headers_mut()
                    .insert(X_REQUEST_ID, HeaderValue::from_static("from-below"));
                Ok::<_, Infallible>(response)
            }
        })
    }

    #[tokio::test]
    async fn end_actions_run_once_when_the_body_ends_innermost_first() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let service = ObserveLayer::new(Arc::new(Metrics::new()), None)
            .layer(registering(log.clone(), std::future::ready(())));
        let request = Request::builder()
            .header(X_REQUEST_ID, "client-id")
            .body(())
            .expect("request");
        let response = service.oneshot(request).await.expect("infallible");
        assert_eq!(
            response.headers()[X_REQUEST_ID],
            "client-id",
            "the id the gateway logs, not one from below"
        );
        assert!(
            notes(&log).is_empty(),
            "nothing runs before the body is read"
        );
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(&body.to_bytes()[..], b"answer");
        assert_eq!(
            notes(&log),
            ["inner 200 Complete", "outer 200 Complete"],
            "once each, the innermost first"
        );
    }

    #[tokio::test]
    async fn a_client_gone_before_the_headers_ends_the_request_with_499() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let service = ObserveLayer::new(Arc::new(Metrics::new()), None)
            .layer(registering(log.clone(), std::future::pending::<()>()));
        let mut future = Box::pin(service.oneshot(Request::new(())));
        let polled = futures_util::poll!(future.as_mut());
        assert!(polled.is_pending(), "the answer has not come");
        assert!(
            notes(&log).is_empty(),
            "nothing ends while the request is inside"
        );
        drop(future);
        assert_eq!(
            notes(&log),
            ["inner 499 ClientGone", "outer 499 ClientGone"],
            "the hook fires when the future is dropped"
        );
    }
}
