//! The admin listener, on its own port and never on the client port: `/metrics` (Prometheus
//! text), `/healthz` (the process is up), `/readyz` (config loaded, upstream reachable, state
//! backend usable), the operator's console (`/ui/`, [`console`]), and the admin API, guarded by
//! its own bearer token (`server.admin_token_env`; without one configured the API and the console
//! are off):
//!
//! - `GET /admin/keys`, `GET /admin/keys/{name}`: each key's limits, requests in flight and token
//!   windows, and where it is defined (`source`: `config` or `api`), never a secret;
//! - `POST /admin/keys`, `PATCH /admin/keys/{name}`, `POST /admin/keys/{name}/rotate`,
//!   `DELETE /admin/keys/{name}`: keys made, changed, rotated and revoked at run time
//!   ([`keys`]);
//! - `GET /admin/sections`: which of the console's pages have data on this gateway, each with the
//!   endpoint it reads — a page for a feature this gateway has not got is not listed;
//! - `GET /admin/stats?seconds=N`: the last N (at most 900) seconds of requests, errors,
//!   refusals, tokens and latency, second by second ([`Timeline`]);
//! - `GET /admin/requests`: the last 200 finished requests' ledger lines, newest first.
//!
//! Edge cases: `/readyz` opens a TCP connection to the upstream with a short timeout on every call
//! (no cached answer that could lie for a while); the admin token is compared by its SHA-256 digest,
//! so comparison timing reveals nothing usable about it; admin and console answers are never
//! stored by a cache (`no-store`); anything else is a 404 in the error shape.
//!
//! [`Timeline`]: crate::observability::timeline::Timeline

mod keys;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::accounting::recent::RecentRequests;
use crate::config::UpstreamConfig;
use crate::http::body::GatewayBody;
use crate::http::error::GatewayError;
use crate::http::headers::bearer_token;
use crate::keys::registry::KeyRegistry;
use crate::keys::{hash_token, KeyEntry, KeyOrigin, SharedKeys};
use crate::observability::metrics::Metrics;
use crate::observability::timeline;
use crate::server::console;
use crate::state::Backend;

/// How long `/readyz` waits for the upstream to accept a connection.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(crate) struct Admin {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) upstream: UpstreamConfig,
    pub(crate) backend: Arc<Backend>,
    /// The last ledger lines, for `/admin/requests`.
    pub(crate) recent: Arc<RecentRequests>,
    pub(crate) keys: SharedKeys,
    /// The file's keys and the managed ones, for the changes of the admin API.
    pub(crate) registry: Arc<KeyRegistry>,
    /// SHA-256 of the admin token; `None`: the admin API is off.
    pub(crate) token_digest: Option<[u8; 32]>,
}

impl Admin {
    /// One request from `peer` (named in the audit line of a key change).
    pub(crate) async fn handle(
        self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<GatewayBody>, Infallible> {
        let path = request.uri().path().to_owned();
        if path.starts_with("/admin/") {
            let mut response = match self.authorize(request.headers()) {
                Ok(()) if keys::is_keys_path(&path) => keys::route(&self, request, peer).await,
                Ok(()) if request.method() != Method::GET => {
                    GatewayError::MethodNotAllowed { allow: "GET" }.into_response()
                }
                Ok(()) => self.api(&path, request.uri().query()).await,
                Err(response) => *response,
            };
            console::protect(&mut response);
            return Ok(response);
        }
        if request.method() != Method::GET {
            return Ok(GatewayError::MethodNotAllowed { allow: "GET" }.into_response());
        }
        Ok(match path.as_str() {
            "/metrics" => {
                let mut response = Response::new(crate::http::body::full(self.metrics.render()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            "/healthz" => json_response(StatusCode::OK, json!({"status": "ok"})),
            "/readyz" => self.readiness().await,
            path if path == "/ui" || path.starts_with("/ui/") => {
                let mut response = match self.token_digest {
                    Some(_) => console::asset(path),
                    None => admin_off(),
                };
                console::protect(&mut response);
                response
            }
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

impl Admin {
    /// An admin API call, once authorized.
    async fn api(&self, path: &str, query: Option<&str>) -> Response<GatewayBody> {
        match path {
            "/admin/sections" => json_response(StatusCode::OK, sections()),
            "/admin/stats" => {
                let seconds = query_value(query, "seconds")
                    .and_then(|s| s.parse::<usize>().ok())
                    .unwrap_or(timeline::SECONDS);
                json_response(StatusCode::OK, json!(self.metrics.timeline.series(seconds)))
            }
            "/admin/requests" => json_response(
                StatusCode::OK,
                json!({ "requests": self.recent.newest_first() }),
            ),
            path => GatewayError::NotFound {
                path: path.to_owned(),
            }
            .into_response(),
        }
    }

    fn authorize(&self, headers: &http::HeaderMap) -> Result<(), Box<Response<GatewayBody>>> {
        let Some(expected) = &self.token_digest else {
            return Err(Box::new(admin_off()));
        };
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Err(Box::new(GatewayError::MissingApiKey.into_response()));
        };
        let Some(token) = bearer_token(value.as_bytes()) else {
            return Err(Box::new(GatewayError::MalformedApiKey.into_response()));
        };
        // Digests, not tokens, are compared: timing can tell at most how many leading bytes of a
        // SHA-256 matched, which says nothing an attacker can steer toward the token.
        if hash_token(token) == *expected {
            Ok(())
        } else {
            Err(Box::new(GatewayError::InvalidApiKey.into_response()))
        }
    }

    async fn all_keys(&self) -> Response<GatewayBody> {
        let store = self.keys.load();
        let mut names: Vec<Arc<str>> = store.names().cloned().collect();
        names.sort();
        let mut keys = Vec::with_capacity(names.len());
        for name in names {
            if let Some(entry) = store.get(&name) {
                keys.push(self.describe(entry).await);
            }
        }
        json_response(StatusCode::OK, json!({ "keys": keys }))
    }

    async fn one_key(&self, name: &str) -> Response<GatewayBody> {
        let entry = self.keys.load().get(name).cloned();
        match entry {
            Some(entry) => json_response(StatusCode::OK, self.describe(&entry).await),
            None => GatewayError::UnknownKey {
                name: name.to_owned(),
            }
            .into_response(),
        }
    }

    /// One key as the admin API shows it: name, where it is defined, limits, in flight, windows;
    /// for a managed key also what it was given and when. Never a token or a hash.
    async fn describe(&self, key: &KeyEntry) -> serde_json::Value {
        let limits = &key.limits;
        let quotas = &limits.quotas;
        let windows = match self.backend.status(&key.name, quotas).await {
            Ok(windows) => json!(quotas
                .iter()
                .zip(windows)
                .map(|(quota, w)| json!({
                    "window": quota.label(),
                    "limit": w.limit,
                    "used": w.used,
                    "reserved": w.reserved,
                    "remaining": w.remaining,
                    "reset_seconds": w.reset_after.as_secs(),
                }))
                .collect::<Vec<_>>()),
            Err(error) => json!({ "error": error.to_string() }),
        };
        let mut described = json!({
            "name": &*key.name,
            "source": <&'static str>::from(key.origin),
            "limits": {
                "models": limits.models.clone().unwrap_or_else(|| vec!["*".to_owned()]),
                "max_tokens": limits.max_tokens.map(|m| m.get()),
                "max_n": limits.max_n.map(|m| m.get()),
                "concurrency": limits.concurrency.map(|c| c.get()),
                "rate": limits.rate.map(|r| json!({
                    "requests": r.requests.get(),
                    "per_seconds": r.per.as_secs_f64(),
                    "burst": r.burst.get(),
                })),
                "quotas": quotas.iter().map(|q| json!({"tokens": q.tokens, "window": q.label()})).collect::<Vec<_>>(),
            },
            "inflight": key.inflight.current(),
            "windows": windows,
        });
        if key.origin == KeyOrigin::Api {
            if let Some(managed) = self.registry.managed(&key.name) {
                keys::describe_managed(&mut described, &managed, self.registry.now());
            }
        }
        described
    }
}

/// The console's pages that have data on this gateway, in the order the console shows them,
/// each with the endpoint it reads. A page is listed only when its feature exists, so a console
/// never shows an empty page: groups (`/admin/groups`) when `[groups]` are configured,
/// upstreams (`/admin/upstreams`) when pools are, and the keys page's `actions` (`create`,
/// `rotate`, `revoke`) when keys can be managed at run time.
fn sections() -> serde_json::Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "sections": [
            {"id": "overview", "title": "Overview", "api": "/admin/stats"},
            {"id": "keys", "title": "Keys", "api": "/admin/keys", "actions": ["create", "rotate", "revoke"]},
            {"id": "requests", "title": "Recent requests", "api": "/admin/requests"},
        ],
    })
}

/// The value of `name` in a query string (`a=1&b=2`), as written.
fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
}

/// The answer of the admin API and the console when no admin token is configured.
fn admin_off() -> Response<GatewayBody> {
    json_response(
        StatusCode::NOT_FOUND,
        json!({"status": 404, "title": "Not Found", "detail": "the admin API is off: set server.admin_token_env",
               "error": {"message": "the admin API is off: set server.admin_token_env", "type": "not_found_error", "code": "admin_disabled"}}),
    )
}

pub(super) fn json_response(status: StatusCode, value: serde_json::Value) -> Response<GatewayBody> {
    let mut response = Response::new(crate::http::body::full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
