//! The only place the request stack is assembled.
//!
//! Layers share one [`RequestContext`] per request (an `Arc` in the request's extensions): each
//! fills the facts it learns, and registers what must run when the request ends. Outermost first,
//! what each layer sets in the context (+) or reads from it (?):
//!
//! 1. `Observe`          + the context: id (the client's `x-request-id`, or a new UUID), start,
//!    method, path, and with `[telemetry]` the trace (the SERVER span, continuing the client's
//!    `traceparent`); `x-request-id` on every response. Owns the one end-of-request hook: when
//!    the answer ends (or the client leaves, before the headers too) it runs the context's end
//!    actions, then writes the access line and the request metrics, and ends the span
//! 2. `CatchPanic`       a panic below becomes a 500 in the error shape, not a dropped connection
//! 3. `RequestHead`      request line and header fields within `max_header_bytes`, 431 otherwise
//! 4. `Route`            + endpoint; 404/405 otherwise
//! 5. `Authenticate`     + key; 401 otherwise
//! 6. `RateLimit`        ? key; in-flight slot (given back by an end action) and request rate,
//!    429 otherwise
//! 7. `RequestBody`      reads the body whole, capped (413), into `Request<Bytes>`
//! 8. `ValidateBody`     ? endpoint; + the [`ParsedRequest`] extension (and the trace's requested
//!    model and `max_tokens`); JSON and schema, 400 otherwise
//! 9. `EnforcePolicy`    ? key, ? [`ParsedRequest`]; + model label; models and max_tokens cap,
//!    400 otherwise
//! 10. `PickPool`        ? [`ParsedRequest`]; + upstream (the pool whose models match), 400
//!     `model-not-found` otherwise
//! 11. `Quota`           ? key, ? [`ParsedRequest`], ? upstream; reserves the worst case in every token
//!     window (429 otherwise); sets `include_usage` upstream when the client did not, and the
//!     key's cap as `max_tokens` when the request names none; + the settlement as an end action,
//!     and watches the answer for usage ([`WatchedBody`])
//! 12. `Proxy`           ? endpoint, ? start, ? upstream, ? trace; picks the pool's endpoint,
//!     forwards (failing over to another endpoint while nothing was delivered; one CLIENT span
//!     per attempt, whose `traceparent` the upstream gets) and streams the answer back, marked
//!     [`UpstreamReached`]
//!
//! [`RequestContext`]: crate::http::context::RequestContext
//! [`ParsedRequest`]: crate::http::context::ParsedRequest
//! [`UpstreamReached`]: crate::http::context::UpstreamReached
//! [`WatchedBody`]: crate::accounting::WatchedBody

use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;

use crate::accounting::Accounting;
use crate::config::Config;
use crate::http::body::{BoxError, GatewayBody};
use crate::http::error::GatewayError;
use crate::keys::SharedKeys;
use crate::layers::auth::auth_layer;
use crate::layers::observe::ObserveLayer;
use crate::layers::pick_pool::pick_pool_layer;
use crate::layers::policy::policy_layer;
use crate::layers::quota::QuotaLayer;
use crate::layers::rate_limit::RateLimitLayer;
use crate::layers::request_body::RequestBodyLayer;
use crate::layers::request_head::RequestHeadLayer;
use crate::layers::route::RouteLayer;
use crate::layers::validate::{validate_layer, Schemas};
use crate::observability::metrics::Metrics;
use crate::observability::traces::SharedTraces;
use crate::proxy::pool::SharedPools;
use crate::proxy::Proxy;

/// Builds worker `worker`'s request stack for `config`, with the live key table `keys` (whose
/// clock the limiters read) and the upstream pools in force, recording into `metrics`. Each
/// worker's stack uses its own slot of every endpoint's idle connections.
#[expect(
    clippy::too_many_arguments,
    reason = "each is a distinct shared part of the gateway; a struct of them would only rename them"
)]
pub(crate) fn build_stack(
    config: &Config,
    pools: SharedPools,
    worker: usize,
    keys: SharedKeys,
    schemas: Arc<Schemas>,
    accounting: Accounting,
    metrics: Arc<Metrics>,
    traces: SharedTraces,
) -> Result<
    impl Service<
            Request<Incoming>,
            Response = Response<impl Body<Data = Bytes, Error = BoxError> + Send + 'static>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    BoxError,
> {
    let proxy = Proxy::new(pools.clone(), worker, metrics.clone());
    Ok(ServiceBuilder::new()
        // Outside everything that can answer, so that every answer carries the request's id and
        // is settled, logged and counted once.
        .layer(ObserveLayer::new(metrics.clone(), traces))
        // Inside Observe, so a panic's 500 is still logged and counted.
        .layer(CatchPanicLayer::custom(panic_response))
        // First of the checks: an oversized head is refused before anything reads it.
        .layer(RequestHeadLayer::new(config.server.max_header_bytes))
        // Before any work on the body: unknown paths cost nothing.
        .layer(RouteLayer)
        // Before limits: an unknown caller must not spend anyone's allowance.
        .layer(auth_layer(keys, metrics.clone()))
        // Before the body is read: a refused request costs no buffering.
        .layer(RateLimitLayer::new(
            accounting.backend.clone(),
            metrics.clone(),
        ))
        .layer(RequestBodyLayer::new(
            config.server.max_body_bytes,
            config.server.body_read_timeout,
        ))
        .layer(validate_layer(schemas))
        // After validation: the policy reads the parsed body.
        .layer(policy_layer(metrics.clone()))
        // After the key's own allow-list, which speaks first; before the quota, so that a model
        // no pool serves reserves nothing.
        .layer(pick_pool_layer(pools, metrics.clone()))
        // Last before the upstream: only requests that will really be sent reserve tokens.
        .layer(QuotaLayer::new(accounting, metrics))
        .service(proxy))
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response<GatewayBody> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    GatewayError::Internal(format!("panic while handling the request: {what}")).into_response()
}
