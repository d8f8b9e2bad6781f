//! The admin listener, on its own port and never on the client port: `/metrics` (Prometheus
//! text), `/healthz` (the process is up), `/readyz` (config loaded, upstream reachable, state
//! backend usable), the operator's console (`/ui/`, [`console`]), and the admin API, guarded by
//! its own bearer token (`server.admin_token_env`; without one configured the API and the console
//! are off):
//!
//! - `GET /admin/keys`, `GET /admin/keys/{name}`: each key's group, limits, requests in flight and
//!   windows (each with its `unit`: `tokens`, or `cost` in currency units), and where it is
//!   defined (`source`: `config` or `api`), never a secret;
//! - `POST /admin/keys`, `PATCH /admin/keys/{name}`, `POST /admin/keys/{name}/rotate`,
//!   `DELETE /admin/keys/{name}`: keys made, changed, rotated and revoked at run time
//!   ([`keys`]);
//! - `GET /admin/groups`, `GET /admin/groups/{name}`: each group's limits, member keys, requests
//!   in flight and windows;
//! - `GET /admin/sections`: which of the console's pages have data on this gateway, each with the
//!   endpoint it reads — a page for a feature this gateway has not got is not listed;
//! - `GET /admin/stats?seconds=N`: the last N (at most 900) seconds of requests, errors,
//!   refusals, tokens and latency, second by second ([`Timeline`]);
//! - `GET /admin/requests`: the last 200 finished requests' ledger lines, newest first;
//! - `GET /admin/upstreams`: each pool's models, balance and endpoints, with whether each is up,
//!   its requests in flight, its consecutive failures and until when it is ejected.
//!
//! Edge cases: `/readyz` is 503 when some pool has no endpoint up, naming the pool; an endpoint
//! of a pool without health checks is up until it fails, so for those `/readyz` also opens a TCP
//! connection to each with a short timeout on every call (no cached answer that could lie for a
//! while); the admin token is compared by its SHA-256 digest,
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
use crate::config::{Pricing, Quota, RateLimit, Unit};
use crate::http::body::GatewayBody;
use crate::http::error::GatewayError;
use crate::http::headers::bearer_token;
use crate::keys::registry::KeyRegistry;
use crate::keys::{hash_token, GroupEntry, KeyEntry, KeyOrigin, SharedKeys};
use crate::observability::metrics::{Metrics, NANO};
use crate::observability::timeline;
use crate::proxy::pool::{Pool, SharedPools};
use crate::server::console;
use crate::state::{Backend, Window};

/// How long `/readyz` waits for the upstream to accept a connection.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub(crate) struct Admin {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) pools: SharedPools,
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
        let pools = self.pools.load_full();
        let checks = pools.iter().map(|pool| pool_readiness(pool.clone()));
        let pool_states = futures_util::future::join_all(checks).await;
        let down: Vec<&str> = pools
            .iter()
            .zip(&pool_states)
            .filter(|(_, ready)| !**ready)
            .map(|(pool, _)| &*pool.config.name)
            .collect();
        let upstream = match down.as_slice() {
            [] => "reachable".to_owned(),
            names => format!("no endpoint up in {}", names.join(", ")),
        };
        let (state_ok, state) = self.backend.readiness().await;
        let ready = down.is_empty() && state_ok;
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
                "upstreams_down": down,
                "state": state,
            }),
        )
    }

    /// `GET /admin/upstreams`.
    fn upstreams(&self) -> Response<GatewayBody> {
        let pools = self.pools.load_full();
        let list: Vec<serde_json::Value> = pools.iter().map(|pool| describe_pool(pool)).collect();
        json_response(StatusCode::OK, json!({ "upstreams": list }))
    }
}

/// Whether some endpoint of `pool` is up; for a pool without health checks, also accepting TCP
/// connections now.
async fn pool_readiness(pool: Arc<Pool>) -> bool {
    let up = pool.endpoints.iter().filter(|e| e.is_up());
    if pool.config.health_check.is_some() {
        return up.count() > 0;
    }
    let probes = up.map(|endpoint| {
        let host = endpoint
            .url
            .authority
            .host()
            .trim_matches(['[', ']'])
            .to_owned();
        let port = endpoint.url.port();
        async move {
            matches!(
                tokio::time::timeout(
                    READY_PROBE_TIMEOUT,
                    tokio::net::TcpStream::connect((host.as_str(), port)),
                )
                .await,
                Ok(Ok(_))
            )
        }
    });
    futures_util::future::join_all(probes)
        .await
        .into_iter()
        .any(|reachable| reachable)
}

/// One pool as `/admin/upstreams` shows it.
fn describe_pool(pool: &Pool) -> serde_json::Value {
    let balance: &str = pool.config.balance.into();
    let endpoints: Vec<serde_json::Value> = pool
        .endpoints
        .iter()
        .map(|endpoint| {
            let snapshot = endpoint.snapshot();
            json!({
                "endpoint": &*endpoint.label,
                "url": endpoint.url.base_url(),
                "up": snapshot.up,
                "inflight": snapshot.inflight,
                "failures": snapshot.failures,
                "ejected_until": snapshot.ejected_until.map(rfc3339),
            })
        })
        .collect();
    json!({
        "name": &*pool.config.name,
        "models": pool.config.models,
        "balance": balance,
        "endpoints": endpoints,
    })
}

/// A wall-clock time as RFC 3339, UTC, to the millisecond.
fn rfc3339(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

impl Admin {
    /// An admin API call, once authorized.
    async fn api(&self, path: &str, query: Option<&str>) -> Response<GatewayBody> {
        // `/admin/keys…` is routed by `keys::route` before this.
        match path {
            "/admin/groups" => self.all_groups().await,
            "/admin/sections" => {
                let groups = self.keys.load().groups().next().is_some();
                json_response(StatusCode::OK, sections(groups))
            }
            "/admin/upstreams" => self.upstreams(),
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
            path => {
                if let Some(name) = path.strip_prefix("/admin/groups/") {
                    self.one_group(name).await
                } else {
                    GatewayError::NotFound {
                        path: path.to_owned(),
                    }
                    .into_response()
                }
            }
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

    /// One key as the admin API shows it: name, where it is defined, group, limits, in flight,
    /// its own windows; for a managed key also what it was given and when. Never a token or a
    /// hash.
    async fn describe(&self, key: &KeyEntry) -> serde_json::Value {
        let limits = &key.limits;
        let windows = self.windows(key.own_windows()).await;
        let mut described = json!({
            "name": &*key.name,
            "source": <&'static str>::from(key.origin),
            "group": key.group.as_ref().map(|g| &*g.name),
            "limits": {
                "models": limits.models.clone().unwrap_or_else(|| vec!["*".to_owned()]),
                "max_tokens": limits.max_tokens.map(|m| m.get()),
                "max_n": limits.max_n.map(|m| m.get()),
                "concurrency": limits.concurrency.map(|c| c.get()),
                "rate": limits.rate.map(rate_json),
                "quotas": quotas_json(&limits.quotas),
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

    /// Each window now: `{window, unit, limit, used, reserved, remaining, reset_seconds}`, cost
    /// in currency units; or the state backend's error.
    async fn windows(&self, windows: &[Window]) -> serde_json::Value {
        match self.backend.status(windows).await {
            Ok(status) => json!(status
                .iter()
                .map(|w| json!({
                    "window": w.per.label(),
                    "unit": w.unit.label(),
                    "limit": amount(w.unit, w.limit),
                    "used": amount(w.unit, w.used),
                    "reserved": w.reserved.map(|r| amount(w.unit, r)),
                    "remaining": amount(w.unit, w.remaining),
                    "reset_seconds": w.reset_after.as_secs(),
                }))
                .collect::<Vec<_>>()),
            Err(error) => json!({ "error": error.to_string() }),
        }
    }

    async fn all_groups(&self) -> Response<GatewayBody> {
        let store = self.keys.load();
        let mut groups: Vec<_> = store.groups().cloned().collect();
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::with_capacity(groups.len());
        for group in groups {
            out.push(self.describe_group(&group, store.pricing()).await);
        }
        json_response(StatusCode::OK, json!({ "groups": out }))
    }

    async fn one_group(&self, name: &str) -> Response<GatewayBody> {
        let store = self.keys.load();
        match store.group(name) {
            Some(group) => json_response(
                StatusCode::OK,
                self.describe_group(group, store.pricing()).await,
            ),
            None => GatewayError::NotFound {
                path: format!("/admin/groups/{name}"),
            }
            .into_response(),
        }
    }

    /// One group: name, limits, member keys, in flight, windows (`used` counts settled plus
    /// reserved, as for keys).
    async fn describe_group(&self, group: &GroupEntry, pricing: &Pricing) -> serde_json::Value {
        let config = &group.config;
        json!({
            "name": &*group.name,
            "limits": {
                "concurrency": config.concurrency.map(|c| c.get()),
                "rate": config.rate.map(rate_json),
                "quotas": quotas_json(&config.quotas),
                "currency": &pricing.currency,
            },
            "members": group.members.iter().map(|m| &**m).collect::<Vec<_>>(),
            "inflight": group.inflight.current(),
            "windows": self.windows(&group.windows).await,
        })
    }
}

/// A quota's figure as JSON: tokens as an integer, cost as currency units (a float whose shortest
/// form is the exact decimal of the nano-units for any sum below 10^6 units).
fn amount(unit: Unit, value: u64) -> serde_json::Value {
    match unit {
        Unit::Tokens => json!(value),
        Unit::Cost => json!(value as f64 / NANO),
    }
}

fn quotas_json(quotas: &[Quota]) -> Vec<serde_json::Value> {
    quotas
        .iter()
        .map(|q| match q.unit {
            Unit::Tokens => json!({"tokens": q.limit, "window": q.label()}),
            Unit::Cost => json!({"cost": amount(q.unit, q.limit), "window": q.label()}),
        })
        .collect()
}

fn rate_json(rate: RateLimit) -> serde_json::Value {
    json!({
        "requests": rate.requests.get(),
        "per_seconds": rate.per.as_secs_f64(),
        "burst": rate.burst.get(),
    })
}

/// The console's pages that have data on this gateway, in the order the console shows them,
/// each with the endpoint it reads. A page is listed only when its feature exists, so a console
/// never shows an empty page: groups (`/admin/groups`) when `[groups]` are configured. The keys
/// page's `actions` (`create`, `rotate`, `revoke`) are those of the admin API.
/// Upstreams (`/admin/upstreams`) are always there: every gateway has at least one pool.
fn sections(groups: bool) -> serde_json::Value {
    let mut sections = vec![
        json!({"id": "overview", "title": "Overview", "api": "/admin/stats"}),
        json!({"id": "keys", "title": "Keys", "api": "/admin/keys", "actions": ["create", "rotate", "revoke"]}),
    ];
    if groups {
        sections.push(json!({"id": "groups", "title": "Groups", "api": "/admin/groups"}));
    }
    sections.push(json!({"id": "upstreams", "title": "Upstreams", "api": "/admin/upstreams"}));
    sections.push(json!({"id": "requests", "title": "Recent requests", "api": "/admin/requests"}));
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "sections": sections,
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
