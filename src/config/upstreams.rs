//! The upstream pools: `[upstream]` (one `url`, one pool named `default` for every model) or
//! `[[upstreams]]` (named pools of endpoints, each serving the models its patterns match), never
//! both in one file.
//!
//! Edge cases: a pool name is a metric label (letters, digits, `-`, `_`, `.`) and unique; a pool
//! needs at least one model pattern and one endpoint; an endpoint written twice in one pool is an
//! error (it would count double in the balance); `[upstream]` takes no `name`, `models` or
//! `endpoints`, and a pool no `url`: each error names the key and its line.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::limits::is_valid_key_name;
use super::raw::{RawConfig, RawUpstream};
use super::source::Source;
use super::{ConfigError, Secret, UpstreamConfig};

/// The name of the one pool a config with `[upstream]` has.
pub(crate) const DEFAULT_POOL: &str = "default";

/// One pool: the models it serves, its endpoints, and how requests are spread and failed over.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// The `upstream` label in metrics, logs and the ledger.
    pub(crate) name: Arc<str>,
    /// Exact names, `prefix*` patterns, or `*`.
    pub(crate) models: Vec<String>,
    pub(crate) endpoints: Vec<EndpointUrl>,
    pub(crate) balance: Balance,
    /// Other endpoints tried for a request that could not be delivered.
    pub(crate) retries: u32,
    /// Consecutive failures that take an endpoint out.
    pub(crate) eject_after: NonZeroU32,
    /// The first ejection's length; it doubles while the endpoint keeps failing, up to 5 minutes.
    pub(crate) eject_for: Duration,
    pub(crate) health_check: Option<HealthCheck>,
    /// Credential, timeouts, connection pool, trusted roots, usage injection.
    pub(crate) upstream: UpstreamConfig,
}

/// One endpoint's base URL, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointUrl {
    /// `http` or `https`.
    pub(crate) scheme: http::uri::Scheme,
    pub(crate) authority: http::uri::Authority,
    /// The base path without a trailing slash: "" or e.g. "/openai".
    pub(crate) base_path: String,
}

impl EndpointUrl {
    /// `scheme://authority/base_path` as configured, for logs, `tollgate check` and the admin API.
    pub(crate) fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }

    /// The `endpoint` label: the configured `host:port` (a bounded label).
    pub(crate) fn label(&self) -> String {
        format!("{}:{}", self.authority.host(), self.port())
    }

    /// The port, the scheme's default when the URL names none.
    pub(crate) fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            })
    }

    pub(crate) fn is_https(&self) -> bool {
        self.scheme == http::uri::Scheme::HTTPS
    }
}

/// How a pool picks the endpoint of a request (`balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Balance {
    /// Two endpoints at random among those up; the one with fewer requests in flight.
    #[default]
    LeastRequests,
    /// Each endpoint that is up in turn.
    RoundRobin,
}

/// Active checks: a GET of `path` on every endpoint each `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub(crate) path: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// The pools `raw` describes, in file order.
pub(super) fn pools(raw: &mut RawConfig, src: &Source) -> Result<Vec<PoolConfig>, ConfigError> {
    match (raw.upstream.take(), raw.upstreams.take()) {
        (Some(_), Some(many)) => Err(src.at(
            many.span(),
            "upstreams",
            "a config has either one [upstream] or [[upstreams]] pools, not both: move the url of [upstream] into a pool's endpoints".into(),
        )),
        (None, None) => Err(src.whole(
            "no upstream: add [upstream] with url = \"http://host:port\", or [[upstreams]] pools",
        )),
        (Some(one), None) => Ok(vec![single(one.into_inner(), src)?]),
        (None, Some(many)) => {
            let span = many.span();
            let many = many.into_inner();
            if many.is_empty() {
                return Err(src.at(span, "upstreams", "needs at least one pool".into()));
            }
            let mut names = HashSet::new();
            let mut out = Vec::with_capacity(many.len());
            for (index, raw) in many.into_iter().enumerate() {
                let pool = pool(raw, index, src)?;
                if !names.insert(pool.name.clone()) {
                    return Err(src.at(
                        span.clone(),
                        &format!("upstreams[{index}].name"),
                        format!("{:?} names two pools; each needs a name of its own", &*pool.name),
                    ));
                }
                out.push(pool);
            }
            Ok(out)
        }
    }
}

/// `[upstream]`: the pool `default`, one endpoint, every model.
fn single(raw: RawUpstream, src: &Source) -> Result<PoolConfig, ConfigError> {
    for (key, span) in [
        ("name", raw.name.as_ref().map(Spanned::span)),
        ("models", raw.models.as_ref().map(Spanned::span)),
        ("endpoints", raw.endpoints.as_ref().map(Spanned::span)),
    ] {
        if let Some(span) = span {
            return Err(src.at(
                span,
                &format!("upstream.{key}"),
                "belongs to [[upstreams]] pools; [upstream] has one url and serves every model"
                    .into(),
            ));
        }
    }
    let Some(url) = &raw.url else {
        return Err(src.whole("upstream.url is missing: the upstream's base URL, http or https"));
    };
    let endpoint =
        parse_upstream_url(url.get_ref()).map_err(|msg| src.at(url.span(), "upstream.url", msg))?;
    finish(
        raw,
        Arc::from(DEFAULT_POOL),
        vec!["*".to_owned()],
        vec![endpoint],
        "upstream",
        src,
    )
}

/// One `[[upstreams]]` entry.
fn pool(raw: RawUpstream, index: usize, src: &Source) -> Result<PoolConfig, ConfigError> {
    let at = |key: &str| format!("upstreams[{index}].{key}");
    if let Some(url) = &raw.url {
        return Err(src.at(
            url.span(),
            &at("url"),
            "a pool lists its replicas in endpoints = [\"http://host:port\", …]".into(),
        ));
    }
    let Some(name) = &raw.name else {
        return Err(src.whole(&format!("{} is missing", at("name"))));
    };
    if !is_valid_key_name(name.get_ref()) {
        return Err(src.at(
            name.span(),
            &at("name"),
            format!(
                "{:?}: use letters, digits, '-', '_' and '.' (it is a metric label)",
                name.get_ref()
            ),
        ));
    }
    let models = match &raw.models {
        Some(models) if !models.get_ref().is_empty() => models.get_ref().clone(),
        Some(models) => {
            return Err(src.at(
                models.span(),
                &at("models"),
                "needs at least one model: an exact name, \"prefix*\" or \"*\"".into(),
            ))
        }
        None => return Err(src.whole(&format!("{} is missing", at("models")))),
    };
    let endpoints = endpoints(&raw, &at("endpoints"), src)?;
    let name = Arc::from(name.get_ref().as_str());
    let key = format!("upstreams[{index}]");
    finish(raw, name, models, endpoints, &key, src)
}

fn endpoints(raw: &RawUpstream, key: &str, src: &Source) -> Result<Vec<EndpointUrl>, ConfigError> {
    let Some(list) = &raw.endpoints else {
        return Err(src.whole(&format!("{key} is missing")));
    };
    if list.get_ref().is_empty() {
        return Err(src.at(list.span(), key, "needs at least one endpoint".into()));
    }
    let mut out: Vec<EndpointUrl> = Vec::with_capacity(list.get_ref().len());
    for (i, url) in list.get_ref().iter().enumerate() {
        let endpoint = parse_upstream_url(url.get_ref())
            .map_err(|msg| src.at(url.span(), &format!("{key}[{i}]"), msg))?;
        if out.iter().any(|seen| seen.label() == endpoint.label()) {
            return Err(src.at(
                url.span(),
                &format!("{key}[{i}]"),
                format!("{} is listed twice in this pool", endpoint.label()),
            ));
        }
        out.push(endpoint);
    }
    Ok(out)
}

/// The settings `[upstream]` and a pool share.
fn finish(
    raw: RawUpstream,
    name: Arc<str>,
    models: Vec<String>,
    endpoints: Vec<EndpointUrl>,
    key: &str,
    src: &Source,
) -> Result<PoolConfig, ConfigError> {
    let eject_after = NonZeroU32::new(*raw.eject_after.get_ref()).ok_or_else(|| {
        src.at(
            raw.eject_after.span(),
            &format!("{key}.eject_after"),
            "must be at least 1".into(),
        )
    })?;
    if raw.eject_for.is_zero() {
        return Err(src.whole(&format!("{key}.eject_for must be longer than 0s")));
    }
    let health_check = match &raw.health_check {
        Some(check) => Some(health_check(check, &format!("{key}.health_check"), src)?),
        None => None,
    };
    Ok(PoolConfig {
        name,
        models,
        endpoints,
        balance: raw.balance,
        retries: *raw.retries.get_ref(),
        eject_after,
        eject_for: raw.eject_for,
        health_check,
        upstream: upstream_client(&raw, key, src)?,
    })
}

fn health_check(
    raw: &Spanned<super::raw::RawHealthCheck>,
    key: &str,
    src: &Source,
) -> Result<HealthCheck, ConfigError> {
    let check = raw.get_ref();
    if !check.path.starts_with('/') {
        return Err(src.at(
            raw.span(),
            &format!("{key}.path"),
            format!("{:?} must start with '/'", check.path),
        ));
    }
    if check.path.parse::<http::uri::PathAndQuery>().is_err() {
        return Err(src.at(
            raw.span(),
            &format!("{key}.path"),
            format!("{:?} is not a URL path", check.path),
        ));
    }
    if check.interval.is_zero() || check.timeout.is_zero() {
        return Err(src.at(
            raw.span(),
            key,
            "interval and timeout must be longer than 0s".into(),
        ));
    }
    Ok(HealthCheck {
        path: check.path.clone(),
        interval: check.interval,
        timeout: check.timeout,
    })
}

// === [upstream] and [[upstreams]]: what every endpoint of a pool shares ===

/// The client settings of `[upstream]` or a pool (`key` is its path: `upstream`,
/// `upstreams[1]`).
fn upstream_client(
    raw: &RawUpstream,
    key: &str,
    src: &Source,
) -> Result<UpstreamConfig, ConfigError> {
    let (api_key, api_key_source) = upstream_credential(raw, key, src)?;
    Ok(UpstreamConfig {
        api_key,
        api_key_source,
        ca_file: raw.ca_file.clone(),
        inject_usage: raw.inject_usage,
        connect_timeout: raw.connect_timeout,
        response_header_timeout: raw.response_header_timeout,
        idle_timeout: raw.idle_timeout,
        pool_idle_timeout: raw.pool_idle_timeout,
        pool_max_idle_per_host: raw.pool_max_idle_per_host,
    })
}

/// The gateway's own credential, from `api_key_env` or `api_key_file`, and where it came from.
fn upstream_credential(
    raw: &RawUpstream,
    key: &str,
    src: &Source,
) -> Result<(Option<Secret>, Option<String>), ConfigError> {
    match (&raw.api_key_env, &raw.api_key_file) {
        (Some(_), Some(file)) => Err(src.at(
            file.span(),
            &format!("{key}.api_key_file"),
            "set either api_key_env or api_key_file, not both".into(),
        )),
        (Some(env), None) => {
            let name = env.get_ref();
            if name.is_empty() {
                return Err(src.at(
                    env.span(),
                    &format!("{key}.api_key_env"),
                    "must name an environment variable".into(),
                ));
            }
            let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty());
            Ok((
                value.map(|v| Secret(v.trim().to_owned())),
                Some(format!("environment variable {name}")),
            ))
        }
        (None, Some(file)) => {
            let value = std::fs::read_to_string(file.get_ref()).map_err(|e| {
                src.at(
                    file.span(),
                    &format!("{key}.api_key_file"),
                    format!("cannot read {}: {e}", file.get_ref()),
                )
            })?;
            let value = value.trim().to_owned();
            if value.is_empty() {
                return Err(src.at(
                    file.span(),
                    &format!("{key}.api_key_file"),
                    format!("{} is empty", file.get_ref()),
                ));
            }
            Ok((
                Some(Secret(value)),
                Some(format!("file {}", file.get_ref())),
            ))
        }
        (None, None) => Ok((None, None)),
    }
}

/// A base URL: http or https, a host, an optional path, no query and no credentials.
fn parse_upstream_url(url: &str) -> Result<EndpointUrl, String> {
    // First, and on the text: whatever stands before an `@` may be a password, in a URL that
    // parses or not; no message below may show it.
    if url.contains('@') {
        return Err(format!(
            "{:?}: credentials in the URL are not allowed; use api_key_env or api_key_file",
            without_credentials(url)
        ));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{url:?} needs a scheme, http:// or https://"))?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(format!("{url:?}: the scheme must be http or https"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if uri.query().is_some() {
        return Err(format!("{url:?}: a base URL takes no query string"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok(EndpointUrl {
        scheme,
        authority,
        base_path,
    })
}

/// `url` with everything between its scheme and its last `@` shown as `***`: a URL whose
/// password is in the path part (`http://u:pa/ss@host`) is hidden as well as a well-formed one.
fn without_credentials(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url.rfind('@') {
        Some(at) if at >= start => format!("{}***{}", &url[..start], &url[at..]),
        _ => url.to_owned(),
    }
}
