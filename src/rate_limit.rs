//! Per-key limits on the way in: requests in flight (concurrency) and request rate (GCRA via
//! governor), each refused with its own 429 and `Retry-After`.
//!
//! Edge cases:
//! - The in-flight slot is taken first (cheap, and given back if the rate refuses), and held by
//!   the response body until its last byte is sent or the client leaves — a stream counts for as
//!   long as it runs. A full key is refused at once; requests never queue.
//! - `Retry-After` is whole seconds rounded up, so that a client that waits that long gets in.
//! - The `x-ratelimit-*-requests` headers (OpenAI's names) and the IETF `RateLimit-Policy` /
//!   `RateLimit` fields are set on every answer of a rate-limited key, 429s included.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use governor::clock::Clock as _;
use governor::middleware::StateSnapshot;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::body::{GatewayBody, WithGuard};
use crate::clock::Clock;
use crate::config::RateLimit as RateConfig;
use crate::error::{retry_after_secs, GatewayError};
use crate::extensions::Principal;
use crate::keys::InflightGuard;
use crate::metrics::Metrics;

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

#[derive(Clone)]
pub struct RateLimitLayer {
    clock: Clock,
    metrics: Arc<Metrics>,
}

impl RateLimitLayer {
    pub fn new(clock: Clock, metrics: Arc<Metrics>) -> Self {
        RateLimitLayer { clock, metrics }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            clock: self.clock.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    clock: Clock,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>, Error = Infallible>,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future =
        Either<Ready<Result<Response<GatewayBody>, Infallible>>, ResponseFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.admit(&request) {
            Ok((guard, headers)) => Either::Right(ResponseFuture {
                inner: self.inner.call(request),
                admitted: Some((guard, headers)),
            }),
            Err(response) => Either::Left(ready(Ok(*response))),
        }
    }
}

impl<S> RateLimit<S> {
    /// Takes an in-flight slot and a rate cell, or answers why not (boxed: refusals are the
    /// rare path, and keep the result small).
    fn admit<B>(
        &self,
        request: &Request<B>,
    ) -> Result<(InflightGuard, HeaderMap), Box<Response<GatewayBody>>> {
        let Some(Principal(key)) = request.extensions().get::<Principal>() else {
            // The auth layer must run first; never let a request through unidentified.
            return Err(Box::new(
                GatewayError::Internal("rate limit reached without a principal".into())
                    .into_response(),
            ));
        };
        let guard = key
            .inflight
            .try_acquire(key.limits.concurrency)
            .ok_or_else(|| {
                self.metrics.rejection(&key.name, "concurrency");
                Box::new(
                    GatewayError::ConcurrencyLimitExceeded {
                        limit: key.limits.concurrency.map_or(0, |l| l.get()),
                    }
                    .into_response(),
                )
            })?;
        let mut headers = HeaderMap::new();
        if let (Some(limiter), Some(rate)) = (&key.limiter, key.limits.rate) {
            match limiter.check() {
                Ok(snapshot) => rate_headers(&mut headers, rate, &snapshot),
                Err(not_until) => {
                    drop(guard);
                    self.metrics.rejection(&key.name, "rate");
                    let wait = not_until.wait_time_from(self.clock.now());
                    let mut response = GatewayError::RateLimitExceeded {
                        limit: describe(rate),
                        retry_after: wait,
                    }
                    .into_response();
                    denied_headers(response.headers_mut(), rate, wait);
                    return Err(Box::new(response));
                }
            }
        }
        Ok((guard, headers))
    }
}

pin_project! {
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        admitted: Option<(InflightGuard, HeaderMap)>,
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<GatewayBody>, Infallible>>,
{
    type Output = Result<Response<GatewayBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.inner.poll(cx));
        let Some((guard, headers)) = this.admitted.take() else {
            return Poll::Ready(Ok(response));
        };
        let (mut parts, body) = response.into_parts();
        for (name, value) in &headers {
            // Append: an inner layer may have set its own RateLimit fields already.
            parts.headers.append(name, value.clone());
        }
        // The slot is held by the body: a stream counts until it ends or its client leaves.
        let body = WithGuard::new(body, guard).boxed_unsync();
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}

/// "60 requests per 1m", for error messages.
fn describe(rate: RateConfig) -> String {
    format!(
        "{} requests per {}",
        rate.requests,
        humantime::format_duration(rate.per)
    )
}

/// How long until one more request is allowed, per cell.
fn period(rate: RateConfig) -> Duration {
    rate.per / rate.requests.get()
}

fn rate_headers(headers: &mut HeaderMap, rate: RateConfig, snapshot: &StateSnapshot) {
    let remaining = snapshot.remaining_burst_capacity();
    // Back to a full burst once every used cell has been replenished.
    let used = rate.burst.get().saturating_sub(remaining);
    let reset = period(rate) * used;
    set_headers(headers, rate, remaining, reset);
}

fn denied_headers(headers: &mut HeaderMap, rate: RateConfig, wait: Duration) {
    set_headers(headers, rate, 0, wait);
}

fn set_headers(headers: &mut HeaderMap, rate: RateConfig, remaining: u32, reset: Duration) {
    headers.insert(LIMIT_REQUESTS, rate.requests.get().into());
    headers.insert(REMAINING_REQUESTS, remaining.into());
    if let Ok(value) = HeaderValue::try_from(go_duration(reset)) {
        headers.insert(RESET_REQUESTS, value);
    }
    let window = rate.per.as_secs().max(1);
    if let Ok(value) = HeaderValue::try_from(format!("\"requests\";q={};w={window}", rate.requests))
    {
        headers.insert(RATELIMIT_POLICY, value);
    }
    let reset_secs = if reset.is_zero() {
        0
    } else {
        retry_after_secs(reset)
    };
    if let Ok(value) = HeaderValue::try_from(format!("\"requests\";r={remaining};t={reset_secs}")) {
        headers.insert(RATELIMIT, value);
    }
}

/// A duration the way OpenAI writes `x-ratelimit-reset-*`: `120ms`, `1s`, `6m0s`, `1h2m3s`.
pub fn go_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let total_ms = d.as_millis();
    let hours = total_ms / 3_600_000;
    let minutes = (total_ms / 60_000) % 60;
    let millis = total_ms % 60_000;
    let seconds = if millis % 1000 == 0 {
        format!("{}s", millis / 1000)
    } else {
        format!("{}s", (millis as f64 / 1000.0))
    };
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_like_openai() {
        assert_eq!(go_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
