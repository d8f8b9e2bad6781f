//! Per-key limits on the way in: requests in flight (concurrency) and request rate (GCRA: governor
//! locally, a Lua script in Redis — see [`crate::state`]), each refused with its own 429 and
//! `Retry-After`; 503 when the shared state is unreachable under `fail_closed`. A key in a group
//! is held to its group's concurrency and rate as well, checked with its own; a refusal names
//! whose limit it was.
//!
//! Edge cases:
//! - The in-flight slot is taken first (cheap, and given back if the rate refuses), and held
//!   until the request's end hook runs — its last frame sent, or its client gone: a stream counts
//!   for as long as it runs. A full key is refused at once; requests never queue.
//! - `Retry-After` is whole seconds rounded up, so that a client that waits that long gets in.
//! - The `x-ratelimit-*-requests` headers (OpenAI's names) and the IETF `RateLimit-Policy` /
//!   `RateLimit` fields are set on every answer of a rate-limited key, 429s included.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response};
use tower::{Layer, Service};

use crate::config::RateLimit as RateConfig;
use crate::http::body::GatewayBody;
use crate::http::context::{AtEnd, Ending, RequestContext};
use crate::http::error::{retry_after_secs, GatewayError};
use crate::http::headers::{
    LIMIT_REQUESTS, RATELIMIT, RATELIMIT_POLICY, REMAINING_REQUESTS, RESET_REQUESTS,
};
use crate::keys::KeyEntry;
use crate::observability::labels::Rejection;
use crate::observability::metrics::Metrics;
use crate::state::{Backend, Refusal, Scope, Slot};

#[derive(Clone)]
pub(crate) struct RateLimitLayer {
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
}

impl RateLimitLayer {
    pub(crate) fn new(backend: Arc<Backend>, metrics: Arc<Metrics>) -> Self {
        RateLimitLayer { backend, metrics }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            backend: self.backend.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct RateLimit<S> {
    inner: S,
    backend: Arc<Backend>,
    metrics: Arc<Metrics>,
}

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Take the service that poll_ready made ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let backend = self.backend.clone();
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let Some((context, key)) = RequestContext::of(&request)
                .and_then(|context| Some((context.clone(), context.key()?.clone())))
            else {
                // The auth layer must run first; never let a request through unidentified.
                return Ok(
                    GatewayError::Internal("rate limit reached without a key".into())
                        .into_response(),
                );
            };
            let admission = match backend.admit(&key).await {
                Ok(admission) => admission,
                Err(refusal) => return Ok(refuse(&key, refusal, &metrics)),
            };
            // The slot is given back when the request ends: a stream counts until its last
            // frame is sent or its client leaves.
            context.at_end(Release(admission.slot));
            let Ok(response) = inner.call(request).await;
            let (mut parts, body) = response.into_parts();
            if let (Some(rate), Some((remaining, reset))) = (key.limits.rate, admission.rate) {
                let policy = key.rate_policy.get_or_init(|| rate_policy(rate)).clone();
                set_headers(&mut parts.headers, (rate, policy), remaining, reset);
            }
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// A request's in-flight slot, held until the request ends.
struct Release(Slot);

impl AtEnd for Release {
    fn at_end(self: Box<Self>, _context: &RequestContext, _ending: &Ending) {
        drop(self.0);
    }
}

/// The answer for a request the limits refused (the key's, or its group's).
fn refuse(key: &KeyEntry, refusal: Refusal, metrics: &Metrics) -> Response<GatewayBody> {
    let group = key.group.as_deref();
    let limits = |scope: Scope| match (scope, group) {
        (Scope::Group, Some(group)) => (
            group.config.concurrency,
            group.config.rate,
            format!("the group {}", group.name),
        ),
        _ => (
            key.limits.concurrency,
            key.limits.rate,
            "this key".to_owned(),
        ),
    };
    match refusal {
        Refusal::Concurrency { scope } => {
            metrics.rejection(&key.name, Rejection::Concurrency);
            let (limit, _, scope) = limits(scope);
            GatewayError::ConcurrencyLimitExceeded {
                scope,
                limit: limit.map_or(0, |l| l.get()),
            }
            .into_response()
        }
        Refusal::Rate { wait, scope } => {
            metrics.rejection(&key.name, Rejection::Rate);
            let (_, rate, who) = limits(scope);
            let Some(rate) = rate else {
                return GatewayError::Internal("rate refusal without a rate".into())
                    .into_response();
            };
            let mut response = GatewayError::RateLimitExceeded {
                limit: format!("{} for {who}", describe(rate)),
                retry_after: wait,
            }
            .into_response();
            set_headers(response.headers_mut(), (rate, rate_policy(rate)), 0, wait);
            response
        }
        Refusal::Unavailable(error) => {
            metrics.rejection(&key.name, Rejection::StateUnavailable);
            GatewayError::StateUnavailable(error.into()).into_response()
        }
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

/// Appends the request-rate fields: an inner layer (quotas) may have set its own RateLimit
/// fields already, and these names are set by no other layer. Straight into the response's map
/// (no map of its own to copy from).
fn set_headers(
    headers: &mut HeaderMap,
    (rate, policy): (RateConfig, Option<HeaderValue>),
    remaining: u32,
    reset: Duration,
) {
    headers.reserve(5);
    headers.append(LIMIT_REQUESTS, rate.requests.get().into());
    headers.append(REMAINING_REQUESTS, remaining.into());
    if let Ok(value) = HeaderValue::try_from(go_duration(reset)) {
        headers.append(RESET_REQUESTS, value);
    }
    if let Some(policy) = policy {
        headers.append(RATELIMIT_POLICY, policy);
    }
    let reset_secs = if reset.is_zero() {
        0
    } else {
        retry_after_secs(reset)
    };
    if let Ok(value) = HeaderValue::try_from(format!("\"requests\";r={remaining};t={reset_secs}")) {
        headers.append(RATELIMIT, value);
    }
}

/// The rate's `RateLimit-Policy` value: `"requests";q=600;w=60`.
fn rate_policy(rate: RateConfig) -> Option<HeaderValue> {
    let window = rate.per.as_secs().max(1);
    HeaderValue::try_from(format!("\"requests\";q={};w={window}", rate.requests)).ok()
}

/// A duration the way OpenAI writes `x-ratelimit-reset-*`: `120ms`, `1s`, `6m0s`, `1h2m3s`.
pub(crate) fn go_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let total_ms = d.as_millis();
    let hours = total_ms / 3_600_000;
    let minutes = (total_ms / 60_000) % 60;
    let millis = total_ms % 60_000;
    // One string, written once (this is on every answer of a limited key).
    let mut out = String::with_capacity(16);
    match (hours, minutes) {
        (0, 0) => {}
        (0, m) => write!(out, "{m}m").unwrap_or_default(),
        (h, m) => write!(out, "{h}h{m}m").unwrap_or_default(),
    }
    if millis.is_multiple_of(1000) {
        write!(out, "{}s", millis / 1000).unwrap_or_default();
    } else {
        write!(out, "{}s", millis as f64 / 1000.0).unwrap_or_default();
    }
    out
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
