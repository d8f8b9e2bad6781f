//! The admin listener, on its own port and never on the client port: `/metrics` (Prometheus
//! text), `/healthz` (the process is up) and `/readyz` (config loaded and the upstream reachable).
//!
//! Edge cases: `/readyz` opens a TCP connection to the upstream with a short timeout on every call
//! (no cached answer that could lie for a while); anything else is a 404 in the error shape.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::body::GatewayBody;
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::state::Backend;

/// How long `/readyz` waits for the upstream to accept a connection.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub upstream: UpstreamConfig,
    pub backend: Arc<Backend>,
}

impl Admin {
    pub async fn handle(
        self,
        request: Request<Incoming>,
    ) -> Result<Response<GatewayBody>, Infallible> {
        if request.method() != Method::GET {
            return Ok(GatewayError::MethodNotAllowed { allow: "GET" }.into_response());
        }
        Ok(match request.uri().path() {
            "/metrics" => {
                let mut response = Response::new(crate::body::full(self.metrics.render()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/healthz" => json_response(StatusCode::OK, json!({"status": "ok"})),
            "/readyz" => self.readiness().await,
            path => GatewayError::NotFound {
                path: path.to_owned(),
            }
            .into_response(),
        })
    }

    async fn readiness(&self) -> Response<GatewayBody> {
        let host = self.upstream.authority.host();
        let port = self.upstream.authority.port_u16().unwrap_or(
            if self.upstream.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            },
        );
        let probe = tokio::time::timeout(
            READY_PROBE_TIMEOUT,
            tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port)),
        )
        .await;
        let (upstream_ok, upstream) = match probe {
            Ok(Ok(_)) => (true, "reachable".to_owned()),
            Ok(Err(err)) => (false, format!("unreachable: {err}")),
            Err(_) => (false, "connect timed out".to_owned()),
        };
        let (state_ok, state) = self.backend.readiness().await;
        let ready = upstream_ok && state_ok;
        json_response(
            if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            json!({
                "status": if ready { "ready" } else { "not ready" },
                "config": "loaded",
                "upstream": upstream,
                "state": state,
            }),
        )
    }
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<GatewayBody> {
    let mut response = Response::new(crate::body::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
