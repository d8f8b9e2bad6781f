//! The leaf service: sends the request to an endpoint of its pool and streams its answer back.
//!
//! What it changes, and only this:
//! - the URI: the endpoint's base URL + the operation's `/v1/…` path + the client's query
//!   string; the client's `Host` and absolute-form URI play no part, so the upstream is never
//!   anything but a configured one (`Host` is the endpoint's);
//! - credentials: the client's `Authorization`, `api-key` and `x-api-key` are removed and the
//!   gateway's own `Authorization: Bearer …` is set (when configured);
//! - hop-by-hop headers (RFC 9110 §7.6.1, and any named in `Connection`) are dropped both ways;
//! - `accept-encoding: identity`, so the bytes the gateway observes are plain text;
//! - on the answer, the upstream's `x-request-id` becomes `x-upstream-request-id`, and its own
//!   rate-limit headers are removed ([`crate::http::headers`]): the client gets the gateway's.
//!
//! The request body reaches the upstream byte for byte; the response body comes back as the
//! upstream sends it, what was read together in one frame and nothing held back
//! ([`answer::Answer`], [`UpstreamBody`]).
//!
//! Which upstream: the pool the `pick_pool` layer chose by model, and in it the endpoint the
//! pool's balance picks ([`balance`]). `GET /v1/models` is answered from every pool ([`models`]).
//!
//! Upstream failures: unreachable → 502, no response headers within
//! `response_header_timeout` → 504, connection broken before a response → 502. Each is a failure
//! of its endpoint (as is a 502 or 503 answer, which passes through), counted toward its ejection
//! ([`endpoint`]).
//!
//! Failover: a request that could not be delivered — no connection (refused, timed out), or the
//! connection reset or closed before any response byte — is sent to another endpoint of the
//! pool, up to the pool's `retries` times; one that failed on a pooled connection (which may have
//! died while idle: llama.cpp's server closes after every stream while advertising keep-alive)
//! is first sent again on a fresh connection to the same endpoint. Never once any byte of an
//! answer has come: from then on the client gets what the upstream sent, or a broken stream. A
//! response-header timeout is not retried (the upstream may be generating the answer), and an
//! upstream's error status passes through as it was sent. However many endpoints a request
//! tried, it is charged once and has one ledger line: everything above this service sees one
//! request.

pub(crate) mod answer;
pub(crate) mod balance;
pub(crate) mod client;
pub(crate) mod endpoint;
pub(crate) mod h1;
pub(crate) mod health;
pub(crate) mod idle;
pub(crate) mod models;
pub(crate) mod pool;
pub(crate) mod upstream_body;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tokio::time::{timeout_at, Instant};
use tower::Service;

use crate::http::body::{BoxError, GatewayBody};
use crate::http::context::{Endpoint as Operation, RequestContext, UpstreamReached};
use crate::http::error::GatewayError;
use crate::http::headers::own_upstream_headers;
use crate::http::headers::CLIENT_CREDENTIALS;
use crate::observability::labels::UpstreamErrorKind;
use crate::observability::metrics::Metrics;
use crate::observability::traces::Attempt;
use crate::proxy::client::{SendError, UpstreamRequest};
use crate::proxy::endpoint::Endpoint;
use crate::proxy::pool::{Pool, SharedPools};
use crate::proxy::upstream_body::UpstreamBody;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the legacy
/// `proxy-connection` and `keep-alive`.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

#[derive(Clone)]
pub(crate) struct Proxy {
    shared: Arc<Shared>,
}

struct Shared {
    pools: SharedPools,
    /// This worker's slot in every endpoint's idle connections.
    slot: usize,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// The proxy of worker `slot`, sending through the pools in force.
    pub(crate) fn new(pools: SharedPools, slot: usize, metrics: Arc<Metrics>) -> Proxy {
        Proxy {
            shared: Arc::new(Shared {
                pools,
                slot,
                metrics,
            }),
        }
    }
}

impl Service<Request<Bytes>> for Proxy {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            Ok(match shared.forward(request).await {
                Ok(response) => response,
                Err(failure) => failure.into_response(),
            })
        })
    }
}

/// What became of one attempt that got no answer.
enum Failure {
    Timeout,
    Unreachable(BoxError),
    /// The connection failed before any response byte: the upstream may have read the request.
    Broken(BoxError),
}

/// A request that got no answer from any endpoint it tried.
struct Unanswered {
    error: GatewayError,
    /// Some endpoint may have read the request (and used tokens on it).
    reached: bool,
}

impl Unanswered {
    fn into_response(self) -> Response<GatewayBody> {
        let mut response = self.error.into_response();
        if self.reached {
            response.extensions_mut().insert(UpstreamReached);
        }
        response
    }
}

impl From<GatewayError> for Unanswered {
    fn from(error: GatewayError) -> Self {
        Unanswered {
            error,
            reached: false,
        }
    }
}

/// The request as every attempt sends it: built once, cloned per attempt (the body is shared).
struct Outgoing {
    method: http::Method,
    operation: Operation,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

impl Outgoing {
    fn to(&self, endpoint: &Endpoint) -> Result<UpstreamRequest, GatewayError> {
        let url = &endpoint.url;
        let path = self.operation.upstream_path();
        let path_and_query = match &self.query {
            Some(query) => format!("{}{path}?{query}", url.base_path),
            None => format!("{}{path}", url.base_path),
        };
        let uri = Uri::builder()
            .scheme(url.scheme.clone())
            .authority(url.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| GatewayError::Internal(format!("upstream URI: {e}")))?;
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = uri;
        let mut headers = self.headers.clone();
        if let Ok(host) = HeaderValue::from_str(url.authority.as_str()) {
            headers.insert(header::HOST, host);
        }
        *request.headers_mut() = headers;
        Ok(request)
    }
}

impl Shared {
    async fn forward(&self, request: Request<Bytes>) -> Result<Response<GatewayBody>, Unanswered> {
        let context = RequestContext::of(&request)
            .cloned()
            .ok_or_else(|| GatewayError::Internal("request reached the proxy unrouted".into()))?;
        let operation = context
            .endpoint()
            .ok_or_else(|| GatewayError::Internal("request reached the proxy unrouted".into()))?;
        if operation == Operation::Models {
            let pools = self.pools.load_full();
            return Ok(models::answer(&pools, &context, self.slot).await?);
        }
        let pool = context.pool().cloned().ok_or_else(|| {
            GatewayError::Internal("request reached the proxy without a pool".into())
        })?;
        let (parts, body) = request.into_parts();
        let outgoing = Outgoing {
            method: parts.method,
            operation,
            query: parts.uri.query().map(str::to_owned),
            headers: upstream_headers(parts.headers, pool.authorization.as_ref()),
            body,
        };
        self.metrics
            .overhead_seconds
            .observe(context.start().elapsed().as_secs_f64());
        let deadline = Instant::now() + pool.config.upstream.response_header_timeout;
        let mut tried: Vec<usize> = Vec::new();
        let mut reached = false;
        loop {
            // `None` only after a failure: the first choice always finds an endpoint.
            let Some(index) = pool.choose(&tried) else {
                return Err(Unanswered {
                    error: GatewayError::UpstreamUnreachable("no endpoint left to try".into()),
                    reached,
                });
            };
            let failure = match self
                .attempt(&context, &pool, index, &outgoing, deadline)
                .await
            {
                Ok(response) => return Ok(response),
                Err(failure) => failure,
            };
            reached |= !matches!(failure, Failure::Unreachable(_));
            let last =
                tried.len() >= pool.config.retries as usize || matches!(failure, Failure::Timeout);
            tried.push(index);
            let error = self.fail(&pool.config.name, failure);
            if last || tried.len() >= pool.endpoints.len() {
                return Err(Unanswered { error, reached });
            }
            tracing::debug!(%error, upstream = %pool.config.name, "not delivered; trying another endpoint");
            self.metrics
                .upstream_error(&pool.config.name, UpstreamErrorKind::Retried);
        }
    }

    /// One endpoint's try: on a pooled connection, and once more on a fresh one if that was
    /// found dead before any response byte.
    async fn attempt(
        &self,
        context: &RequestContext,
        pool: &Arc<Pool>,
        index: usize,
        outgoing: &Outgoing,
        deadline: Instant,
    ) -> Result<Response<GatewayBody>, Failure> {
        let endpoint = &pool.endpoints[index];
        let inflight = endpoint.start();
        let mut fresh = false;
        loop {
            let mut request = outgoing
                .to(endpoint)
                .map_err(|e| Failure::Broken(e.into()))?;
            // One CLIENT span per send, whose trace context the upstream gets.
            let span = context.trace().map(|trace| {
                let url = &endpoint.url;
                let https = url.scheme == http::uri::Scheme::HTTPS;
                let span = Attempt::start(context, trace, &url.authority, https, &pool.config.name);
                span.inject(request.headers_mut());
                (span, trace)
            });
            let sent = timeout_at(
                deadline,
                pool.connector.send(endpoint, self.slot, request, fresh),
            )
            .await;
            let failure = match sent {
                Ok(Ok(response)) => {
                    let status = response.status();
                    endpoint.count_status(&self.metrics, status.as_str());
                    if let Some((span, trace)) = span {
                        span.answered(trace, status);
                    }
                    if status == StatusCode::BAD_GATEWAY
                        || status == StatusCode::SERVICE_UNAVAILABLE
                    {
                        endpoint.failed(&pool.config);
                    } else {
                        endpoint.succeeded();
                    }
                    let (mut parts, incoming) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    own_upstream_headers(&mut parts.headers);
                    parts.extensions.insert(UpstreamReached);
                    let idle_timeout = pool.config.upstream.idle_timeout;
                    let body =
                        UpstreamBody::new(incoming, idle_timeout, self.metrics.clone(), inflight);
                    return Ok(Response::from_parts(parts, body.boxed_unsync()));
                }
                Ok(Err(SendError::Broken {
                    error,
                    reused: true,
                })) if !fresh => {
                    if let Some((span, _)) = span {
                        span.failed(UpstreamErrorKind::Broken.into());
                    }
                    tracing::debug!(%error, "a pooled connection was found dead; sending on a fresh one");
                    self.metrics
                        .upstream_error(&pool.config.name, UpstreamErrorKind::Retried);
                    fresh = true;
                    continue;
                }
                Err(_elapsed) => Failure::Timeout,
                Ok(Err(SendError::Connect(error))) => Failure::Unreachable(error),
                Ok(Err(SendError::Broken { error, .. })) => Failure::Broken(error),
            };
            endpoint.failed(&pool.config);
            endpoint.count_status(&self.metrics, failure.label());
            if let Some((span, _)) = span {
                span.failed(failure.label());
            }
            return Err(failure);
        }
    }

    /// Counts a failed attempt and says what the client would get for it.
    fn fail(&self, upstream: &str, failure: Failure) -> GatewayError {
        match failure {
            Failure::Timeout => {
                self.metrics
                    .upstream_error(upstream, UpstreamErrorKind::Timeout);
                GatewayError::UpstreamTimeout
            }
            Failure::Unreachable(error) => {
                self.metrics
                    .upstream_error(upstream, UpstreamErrorKind::Connect);
                GatewayError::UpstreamUnreachable(error)
            }
            Failure::Broken(error) => {
                self.metrics
                    .upstream_error(upstream, UpstreamErrorKind::Broken);
                GatewayError::UpstreamBroken(error)
            }
        }
    }
}

impl Failure {
    /// The `status` of `tollgate_upstream_requests_total` for an attempt with no answer.
    fn label(&self) -> &'static str {
        let kind = match self {
            Failure::Timeout => UpstreamErrorKind::Timeout,
            Failure::Unreachable(_) => UpstreamErrorKind::Connect,
            Failure::Broken(_) => UpstreamErrorKind::Broken,
        };
        kind.into()
    }
}

/// The client's headers as the upstream gets them: no hop-by-hop headers, no client
/// credentials, no length (the body sets it), identity encoding, the gateway's credential.
fn upstream_headers(mut headers: HeaderMap, authorization: Option<&HeaderValue>) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    for name in &CLIENT_CREDENTIALS {
        headers.remove(name);
    }
    // The upstream's host comes from the endpoint's URL; the length from the body itself.
    headers.remove(header::HOST);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    if let Some(authorization) = authorization {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    headers
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    // `Upgrade` is hop-by-hop too; the gateway does not tunnel protocols.
    headers.remove(header::UPGRADE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert("x-request-id", HeaderValue::from_static("abc"));
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-request-id"], "only end-to-end headers remain");
    }
}
