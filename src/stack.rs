//! The only place the request stack is assembled.
//!
//! Layers, outermost first, and the request extensions each adds (+) or reads (?):
//!
//! 1. `SetRequestId`     + `x-request-id` header: the client's, or a new UUID
//! 2. `PropagateRequestId` copies `x-request-id` onto every response
//! 3. `Observe`          + [`RequestStart`], [`RequestTags`]; writes the access log and request
//!    metrics when the response body ends
//! 4. `CatchPanic`       a panic below becomes a 500 in the error shape, not a dropped connection
//! 5. `RequestHead`      request line and header fields within `max_header_bytes`, 431 otherwise
//! 6. `Route`            + [`Endpoint`] (and `RequestTags::endpoint`); 404/405 otherwise
//! 7. `Authenticate`     + [`Principal`] (and `RequestTags::key`); 401 otherwise
//! 8. `RateLimit`        ? [`Principal`]; in-flight slot and request rate, 429 otherwise
//! 9. `RequestBody`      reads the body whole, capped (413), into `Request<Bytes>`
//! 10. `ValidateBody`    ? [`Endpoint`]; + [`ParsedRequest`]; JSON and schema, 400 otherwise
//! 11. `EnforcePolicy`   ? [`Principal`], ? [`ParsedRequest`]; models and max_tokens cap, 400
//!     otherwise (and `RequestTags::model`)
//! 12. `Quota`           ? [`Principal`], ? [`ParsedRequest`], ? `RequestTags::model`; reserves the
//!     worst case in every token window (429 otherwise); sets `include_usage` upstream when the
//!     client did not; settles to the real usage when the answer ends (`AccountedBody`)
//! 13. `Proxy`           ? [`Endpoint`], ? [`RequestStart`]; forwards and streams the answer back
//!
//! [`RequestStart`]: crate::http::context::RequestStart
//! [`RequestTags`]: crate::http::context::RequestTags
//! [`Endpoint`]: crate::http::context::Endpoint
//! [`Principal`]: crate::http::context::Principal
//! [`ParsedRequest`]: crate::http::context::ParsedRequest

use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use tower::{Service, ServiceBuilder};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};

use crate::accounting::ledger::Ledger;
use crate::config::Config;
use crate::http::body::{BoxError, GatewayBody};
use crate::http::error::GatewayError;
use crate::keys::SharedKeys;
use crate::layers::auth::auth_layer;
use crate::layers::observe::ObserveLayer;
use crate::layers::policy::policy_layer;
use crate::layers::quota::QuotaLayer;
use crate::layers::rate_limit::RateLimitLayer;
use crate::layers::request_body::RequestBodyLayer;
use crate::layers::request_head::RequestHeadLayer;
use crate::layers::route::RouteLayer;
use crate::layers::validate::{validate_layer, Schemas};
use crate::observability::metrics::Metrics;
use crate::proxy::{Connector, Proxy};
use crate::state::Backend;

/// Builds the gateway's request stack for `config`, with the live key table `keys` (whose clock
/// the limiters read), recording into `metrics`. Each stack keeps its own upstream pool, made
/// through the shared `connector`.
pub fn build_stack(
    config: &Config,
    connector: &Connector,
    keys: SharedKeys,
    schemas: Arc<Schemas>,
    accounting: Accounting,
    metrics: Arc<Metrics>,
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
    let proxy = Proxy::new(&config.upstream, connector.clone(), metrics.clone())?;
    Ok(ServiceBuilder::new()
        // First, so that even the access log and error answers carry the id.
        .layer(SetRequestIdLayer::x_request_id(RandomRequestId))
        .layer(PropagateRequestIdLayer::x_request_id())
        // Outside everything that can answer, so every answer is logged and counted once.
        .layer(ObserveLayer::new(metrics.clone()))
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
        // Last before the upstream: only requests that will really be sent reserve tokens.
        .layer(QuotaLayer::new(
            accounting.backend,
            accounting.ledger,
            metrics,
            config.upstream.inject_usage,
        ))
        .service(proxy))
}

/// A random (v4) UUID for a request that came without an `x-request-id`: tower-http's
/// `MakeRequestUuid`, but formatted on the stack instead of through a `String` and a parse.
#[derive(Clone, Copy)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let mut buffer = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
        http::HeaderValue::from_str(id).ok().map(RequestId::new)
    }
}

/// Where usage is charged and written.
#[derive(Clone)]
pub struct Accounting {
    pub backend: Arc<Backend>,
    pub ledger: Option<Arc<Ledger>>,
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response<GatewayBody> {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    GatewayError::Internal(format!("panic while handling the request: {what}")).into_response()
}
