//! The leaf service: sends the request to the configured upstream and streams its answer back.
//!
//! What it changes, and only this:
//! - the URI: `<upstream.url>` + the endpoint's `/v1/…` path + the client's query string; the
//!   client's `Host` and absolute-form URI play no part, so the upstream is never anything but
//!   the configured one;
//! - credentials: the client's `Authorization`, `api-key` and `x-api-key` are removed and the
//!   gateway's own `Authorization: Bearer …` is set (when configured);
//! - hop-by-hop headers (RFC 9110 §7.6.1, and any named in `Connection`) are dropped both ways;
//! - `accept-encoding: identity`, so the bytes the gateway observes are plain text;
//! - on the answer, the upstream's `x-request-id` becomes `x-upstream-request-id`, and its own
//!   rate-limit headers are removed ([`crate::http::headers`]): the client gets the gateway's.
//!
//! The request body reaches the upstream byte for byte; the response body comes back frame by
//! frame as the upstream sends it ([`UpstreamBody`]).
//!
//! Upstream failures: unreachable → 502, no response headers within
//! `upstream.response_header_timeout` → 504, connection broken before a response → 502.
//!
//! A request is sent again only when it provably never left: hyper hands back a request it did
//! not start writing (its error is `is_canceled`). hyper-util's client already sends such a
//! request again when the connection was a pooled one — the case of llama.cpp's server, which
//! closes after every stream while advertising keep-alive — and the proxy does it once more, on
//! a fresh unpooled connection, when the connection was new. A request the upstream may have
//! received (it was written, and the connection broke or closed with no answer) is never sent
//! again: a completion costs money and need not be idempotent. That client gets one 502.

pub(crate) mod upstream_body;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{timeout_at, Instant};
use tower::Service;

use crate::config::UpstreamConfig;
use crate::http::body::{BoxError, GatewayBody};
use crate::http::context::{Endpoint, RequestContext, UpstreamReached};
use crate::http::error::GatewayError;
use crate::http::headers::own_upstream_headers;
use crate::http::headers::CLIENT_CREDENTIALS;
use crate::observability::labels::UpstreamErrorKind;
use crate::observability::metrics::Metrics;
use crate::proxy::upstream_body::UpstreamBody;

/// How upstream connections are made (TCP, TLS with the trusted roots); built once and shared
/// by every worker's client.
pub(crate) type Connector = HttpsConnector<HttpConnector>;
type UpstreamClient = Client<Connector, Full<Bytes>>;

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
    /// Pooled keep-alive connections, HTTP/2 where the upstream offers it through ALPN.
    client: UpstreamClient,
    /// No pool: for the one retry of a request that never left.
    fresh: UpstreamClient,
    upstream: UpstreamConfig,
    authorization: Option<HeaderValue>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy with its own connection pool, connecting through `connector`.
    pub(crate) fn new(
        upstream: &UpstreamConfig,
        connector: Connector,
        metrics: Arc<Metrics>,
    ) -> Result<Proxy, BoxError> {
        let client = client_builder()
            .pool_idle_timeout(upstream.pool_idle_timeout)
            .pool_max_idle_per_host(upstream.pool_max_idle_per_host)
            .build(connector.clone());
        let fresh = client_builder().pool_max_idle_per_host(0).build(connector);
        let authorization = match &upstream.api_key {
            Some(key) => {
                let mut value = HeaderValue::try_from(format!("Bearer {}", key.expose()))
                    .map_err(|_| "the upstream credential is not a valid header value")?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Proxy {
            shared: Arc::new(Shared {
                client,
                fresh,
                upstream: upstream.clone(),
                authorization,
                metrics,
            }),
        })
    }
}

/// Shared settings of both clients. The connect timeout lives on the connector, the header
/// timeout around each request.
fn client_builder() -> hyper_util::client::legacy::Builder {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new());
    builder
}

/// The upstream connector for `upstream`: reads the system's trusted roots and `ca_file`.
pub(crate) fn connector(upstream: &UpstreamConfig) -> Result<Connector, BoxError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // Each SSE event must leave at once, not wait for a delayed ACK (Nagle).
    http.set_nodelay(true);
    http.set_connect_timeout(Some(upstream.connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));

    let tls = client_tls(upstream.ca_file.as_deref(), "upstream.ca_file")?;
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http))
}

/// TLS for a client of this process (the upstream, or `tollgate keys` calling the admin API):
/// the webpki roots, the system's, and the PEM certificates in `ca_file` (`setting` names it in
/// errors).
pub(crate) fn client_tls(
    ca_file: Option<&std::path::Path>,
    setting: &str,
) -> Result<rustls::ClientConfig, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // System roots where the machine has them: a private CA installed there is trusted too.
    for cert in rustls_native_certs::load_native_certs().certs {
        // A malformed system certificate is skipped, not fatal.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        use rustls_pki_types::pem::PemObject;
        let failed = |e: &dyn std::fmt::Display| format!("{setting} {}: {e}", path.display());
        let certs =
            rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| failed(&e))?;
        for cert in certs {
            roots
                .add(cert.map_err(|e| failed(&e))?)
                .map_err(|e| failed(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
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
                Err(error) => error.into_response(),
            })
        })
    }
}

impl Shared {
    async fn forward(
        &self,
        request: Request<Bytes>,
    ) -> Result<Response<GatewayBody>, GatewayError> {
        let (endpoint, start) = RequestContext::of(&request)
            .and_then(|context| Some((context.endpoint()?, context.start())))
            .ok_or_else(|| GatewayError::Internal("request reached the proxy unrouted".into()))?;
        let (parts, body) = request.into_parts();
        let uri = self.upstream_uri(endpoint, parts.uri.query())?;
        let headers = self.upstream_headers(parts.headers);
        let build = || {
            let mut upstream_request = Request::new(Full::new(body.clone()));
            *upstream_request.method_mut() = parts.method.clone();
            *upstream_request.uri_mut() = uri.clone();
            *upstream_request.headers_mut() = headers.clone();
            upstream_request
        };

        self.metrics
            .overhead_seconds
            .observe(start.elapsed().as_secs_f64());
        let deadline = Instant::now() + self.upstream.response_header_timeout;
        let response = match self.send(&self.client, build(), deadline).await {
            Err(Failure::NotSent(error)) => {
                tracing::debug!(%error, "the request never left; sending it on a fresh connection");
                self.metrics.upstream_error(UpstreamErrorKind::Retried);
                self.send(&self.fresh, build(), deadline).await
            }
            other => other,
        };
        let response = match response {
            Ok(response) => response,
            Err(failure) => {
                let reached = !matches!(failure, Failure::Unreachable(_));
                let mut response = self.fail(failure).into_response();
                if reached {
                    response.extensions_mut().insert(UpstreamReached);
                }
                return Ok(response);
            }
        };

        let (mut parts, incoming) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        own_upstream_headers(&mut parts.headers);
        parts.extensions.insert(UpstreamReached);
        let body = UpstreamBody::new(incoming, self.upstream.idle_timeout, self.metrics.clone());
        Ok(Response::from_parts(parts, body.boxed_unsync()))
    }

    async fn send(
        &self,
        client: &UpstreamClient,
        request: Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<Response<hyper::body::Incoming>, Failure> {
        match timeout_at(deadline, client.request(request)).await {
            Err(_elapsed) => Err(Failure::Timeout),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) if error.is_connect() => Err(Failure::Unreachable(error.into())),
            Ok(Err(error)) if never_sent(&error) => Err(Failure::NotSent(error.into())),
            Ok(Err(error)) => Err(Failure::Broken(error.into())),
        }
    }

    fn fail(&self, failure: Failure) -> GatewayError {
        match failure {
            Failure::Timeout => {
                self.metrics.upstream_error(UpstreamErrorKind::Timeout);
                GatewayError::UpstreamTimeout
            }
            Failure::Unreachable(error) => {
                self.metrics.upstream_error(UpstreamErrorKind::Connect);
                GatewayError::UpstreamUnreachable(error)
            }
            Failure::NotSent(error) | Failure::Broken(error) => {
                self.metrics.upstream_error(UpstreamErrorKind::Broken);
                GatewayError::UpstreamBroken(error)
            }
        }
    }

    fn upstream_uri(&self, endpoint: Endpoint, query: Option<&str>) -> Result<Uri, GatewayError> {
        let path = endpoint.upstream_path();
        let base = &self.upstream.base_path;
        let path_and_query = match query {
            Some(query) => format!("{base}{path}?{query}"),
            None => format!("{base}{path}"),
        };
        Uri::builder()
            .scheme(self.upstream.scheme.clone())
            .authority(self.upstream.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| GatewayError::Internal(format!("upstream URI: {e}")))
    }

    fn upstream_headers(&self, mut headers: HeaderMap) -> HeaderMap {
        strip_hop_by_hop(&mut headers);
        for name in &CLIENT_CREDENTIALS {
            headers.remove(name);
        }
        // The upstream's host comes from the configured URL; the length from the body itself.
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(authorization) = &self.authorization {
            headers.insert(header::AUTHORIZATION, authorization.clone());
        }
        headers
    }
}

enum Failure {
    Timeout,
    Unreachable(BoxError),
    /// hyper gave the request back unwritten: safe to send again.
    NotSent(BoxError),
    /// The request may have reached the upstream: never sent again.
    Broken(BoxError),
}

/// Whether hyper gave the request back without writing any of it (a connection that closed
/// before the request's turn came). A connection that closed or reset after the request was
/// written is not this case, whatever was answered. Walks the error's causes rather than
/// matching on messages.
fn never_sent(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return true;
        }
        source = cause.source();
    }
    false
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
