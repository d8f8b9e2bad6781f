//! The config file: TOML read into [`RawConfig`] (exactly what the file says), then
//! [`Config::load`] turns it into the validated runtime [`Config`].
//!
//! Edge cases:
//! - Unknown keys anywhere are errors (`deny_unknown_fields`), reported with the key's line, so a
//!   section that belongs to a later feature is refused rather than silently ignored.
//! - Errors name the full key path (`upstream.url`) and the line in the file.
//! - Secrets never live in the file: `upstream.api_key_env` names an environment variable and
//!   `upstream.api_key_file` a file; the value is held in a [`Secret`] that never prints.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The default config, embedded so that `tollgate serve` runs with no file at all.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/tollgate.toml");

/// More threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

/// A config problem, already phrased for the operator: `FILE:LINE: key.path: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn new(message: String) -> Self {
        ConfigError(message)
    }
}

// === raw config: what the file says ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    /// Named sets of limits that keys refer to with `policy = "name"`.
    #[serde(default)]
    policies: BTreeMap<String, RawLimits>,
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default)]
    state: RawState,
    ledger: Option<RawLedger>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    #[serde(default = "defaults::backend")]
    backend: Spanned<String>,
    #[serde(default = "defaults::state_path")]
    path: PathBuf,
    #[serde(default = "defaults::flush_interval", with = "humantime_serde")]
    flush_interval: Duration,
    redis_url: Option<Spanned<String>>,
    /// The environment variable holding the Redis password: never in the file.
    password_env: Option<Spanned<String>>,
    #[serde(default = "defaults::prefix")]
    prefix: String,
    #[serde(default)]
    on_error: OnError,
    #[serde(default = "defaults::lease", with = "humantime_serde")]
    lease: Duration,
}

impl Default for RawState {
    fn default() -> Self {
        RawState {
            backend: defaults::backend(),
            path: defaults::state_path(),
            flush_interval: defaults::flush_interval(),
            redis_url: None,
            password_env: None,
            prefix: defaults::prefix(),
            on_error: OnError::default(),
            lease: defaults::lease(),
        }
    }
}

/// What the gateway does while the Redis backend is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Admit on this replica's local limits; apply the usage to Redis when it returns.
    FailOpen,
    /// Refuse with 503.
    #[default]
    FailClosed,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    tokens: u64,
    #[serde(with = "humantime_serde")]
    per: Duration,
}

/// Limits a policy sets; a key may set the same fields to override its policy.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    quotas: Option<Spanned<Vec<RawQuota>>>,
    models: Option<Vec<String>>,
    max_tokens: Option<Spanned<u32>>,
    concurrency: Option<Spanned<u32>>,
    rate: Option<Spanned<RawRate>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    requests: u32,
    #[serde(with = "humantime_serde")]
    per: Duration,
    burst: Option<u32>,
}

/// One hash, or several while a key is being rotated.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(one) => std::slice::from_ref(one),
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    name: Spanned<String>,
    sha256: Spanned<OneOrMany>,
    policy: Option<Spanned<String>>,
    quotas: Option<Spanned<Vec<RawQuota>>>,
    models: Option<Vec<String>>,
    max_tokens: Option<Spanned<u32>>,
    concurrency: Option<Spanned<u32>>,
    rate: Option<Spanned<RawRate>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "defaults::listen")]
    listen: SocketAddr,
    #[serde(default = "defaults::admin_listen")]
    admin_listen: SocketAddr,
    #[serde(default = "defaults::max_body_bytes")]
    max_body_bytes: Spanned<u64>,
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    shutdown_timeout: Duration,
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    header_read_timeout: Duration,
    #[serde(default = "defaults::body_read_timeout", with = "humantime_serde")]
    body_read_timeout: Duration,
    /// The environment variable holding the admin API's bearer token.
    admin_token_env: Option<Spanned<String>>,
    tls: Option<Spanned<RawTls>>,
    /// Threads serving client connections; the machine's CPU count when absent.
    workers: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Spanned<String>,
    api_key_env: Option<Spanned<String>>,
    api_key_file: Option<Spanned<String>>,
    /// Extra trusted CA certificates (PEM), for an upstream behind a private CA.
    ca_file: Option<std::path::PathBuf>,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(
        default = "defaults::response_header_timeout",
        with = "humantime_serde"
    )]
    response_header_timeout: Duration,
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pool_idle_timeout: Duration,
    #[serde(default = "defaults::pool_max_idle_per_host")]
    pool_max_idle_per_host: usize,
    #[serde(default = "defaults::inject_usage")]
    inject_usage: bool,
}

mod defaults {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;
    use toml::Spanned;

    pub fn listen() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 8080))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 9090))
    }
    pub fn max_body_bytes() -> Spanned<u64> {
        Spanned::new(0..0, 4 * 1024 * 1024)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn body_read_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    /// A non-streamed completion sends its headers only when the whole answer is generated.
    pub fn response_header_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn pool_max_idle_per_host() -> usize {
        256
    }
    pub fn inject_usage() -> bool {
        true
    }
    pub fn backend() -> Spanned<String> {
        Spanned::new(0..0, "local".to_owned())
    }
    pub fn state_path() -> std::path::PathBuf {
        "state/tollgate.db".into()
    }
    pub fn flush_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn prefix() -> String {
        "tollgate:".to_owned()
    }
    pub fn lease() -> Duration {
        Duration::from_secs(30)
    }
}

// === runtime config ===

/// The validated config the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub keys: Vec<KeyConfig>,
    pub state: StateConfig,
    /// Where one JSON line per finished request goes; `None`: no ledger.
    pub ledger: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Where the quota windows are saved (`local` backend).
    pub path: PathBuf,
    /// How often charged usage is written; at most this much is lost to a SIGKILL.
    pub flush_interval: Duration,
    /// Set when `backend = "redis"`.
    pub redis: Option<RedisConfig>,
}

#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS).
    pub url: String,
    pub password: Option<Secret>,
    /// Every Redis key the gateway writes starts with this.
    pub prefix: String,
    pub on_error: OnError,
    /// How long a concurrency slot outlives a replica that stopped renewing it.
    pub lease: Duration,
}

/// A token budget over a fixed window aligned to UTC (see `state::local`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub tokens: u64,
    pub per: Duration,
}

impl Quota {
    pub fn per_secs(&self) -> u64 {
        self.per.as_secs().max(1)
    }

    /// The metric label of this window: its length as written in configs (`1m`, `1d`).
    pub fn label(&self) -> String {
        window_label(self.per)
    }
}

/// A window's length as written in configs (`1m`, `1d`): its metric label and name in headers.
pub fn window_label(per: Duration) -> String {
    match per.as_secs().max(1) {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// One client key: who it is, and what it may do.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyConfig {
    /// The label in metrics and logs.
    pub name: Arc<str>,
    /// SHA-256 of each bearer token that is this key (several while rotating); the tokens
    /// themselves are never stored.
    pub sha256: Vec<[u8; 32]>,
    pub limits: Limits,
}

/// A key's limits after its policy and its own overrides are merged. `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    /// Token budgets, each over its own window.
    pub quotas: Vec<Quota>,
    /// Models the key may ask for: exact names, `prefix*` patterns, or `*`. `None`: any.
    pub models: Option<Vec<String>>,
    /// Cap on `max_tokens` / `max_completion_tokens`.
    pub max_tokens: Option<NonZeroU32>,
    pub concurrency: Option<NonZeroU32>,
    pub rate: Option<RateLimit>,
}

/// GCRA: `requests` per `per` as a steady rate, with up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    /// How long in-flight requests and streams may run on after SIGTERM before they are cut.
    pub shutdown_timeout: Duration,
    /// A client must finish sending request headers within this time (slowloris guard).
    pub header_read_timeout: Duration,
    /// A client must finish sending its request body within this time (slowloris guard).
    pub body_read_timeout: Duration,
    /// The admin API's bearer token; `None` disables `/admin/*`.
    pub admin_token: Option<Secret>,
    /// TLS on the client listener; `None`: plain HTTP (and h2c).
    pub tls: Option<crate::server::tls::TlsFiles>,
    /// Threads serving client connections, each with its own event loop and upstream pool.
    pub workers: NonZeroUsize,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// The base path without a trailing slash: "" or e.g. "/openai".
    pub base_path: String,
    /// The gateway's own credential, sent as `Authorization: Bearer …`.
    pub api_key: Option<Secret>,
    /// Where the credential should have come from, for messages when it is missing.
    pub api_key_source: Option<String>,
    /// Extra trusted CA certificates (PEM) besides the system's and the webpki roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Ask streams for usage (`stream_options.include_usage`) when the client did not, and remove
    /// what the client did not ask for from its stream.
    pub inject_usage: bool,
    pub connect_timeout: Duration,
    pub response_header_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

impl UpstreamConfig {
    /// `scheme://authority/base_path` as configured, for logs and `tollgate check`.
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))?;
        Config::parse(&source, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in error messages.
    pub fn parse(source: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw = parse_raw(source, origin)?;
        let at = |span: Range<usize>, key: &str, msg: String| {
            ConfigError(format!(
                "{origin}:{}: {key}: {msg}",
                line_of(source, span.start)
            ))
        };

        let max_body = raw.server.max_body_bytes;
        if *max_body.get_ref() == 0 {
            return Err(at(
                max_body.span(),
                "server.max_body_bytes",
                "must be greater than 0".into(),
            ));
        }
        let max_body_bytes = usize::try_from(*max_body.get_ref()).map_err(|_| {
            at(
                max_body.span(),
                "server.max_body_bytes",
                "is larger than this machine can address".into(),
            )
        })?;

        let workers = match raw.server.workers {
            None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            Some(workers) => usize::try_from(*workers.get_ref())
                .ok()
                .filter(|n| (1..=MAX_WORKERS).contains(n))
                .and_then(NonZeroUsize::new)
                .ok_or_else(|| {
                    at(
                        workers.span(),
                        "server.workers",
                        format!("must be between 1 and {MAX_WORKERS}"),
                    )
                })?,
        };

        let (scheme, authority, base_path) = parse_upstream_url(raw.upstream.url.get_ref())
            .map_err(|msg| at(raw.upstream.url.span(), "upstream.url", msg))?;

        let (api_key, api_key_source) = match (raw.upstream.api_key_env, raw.upstream.api_key_file)
        {
            (Some(_), Some(file)) => {
                return Err(at(
                    file.span(),
                    "upstream.api_key_file",
                    "set either api_key_env or api_key_file, not both".into(),
                ))
            }
            (Some(env), None) => {
                let name = env.get_ref();
                if name.is_empty() {
                    return Err(at(
                        env.span(),
                        "upstream.api_key_env",
                        "must name an environment variable".into(),
                    ));
                }
                let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty());
                (
                    value.map(|v| Secret(v.trim().to_owned())),
                    Some(format!("environment variable {name}")),
                )
            }
            (None, Some(file)) => {
                let value = std::fs::read_to_string(file.get_ref()).map_err(|e| {
                    at(
                        file.span(),
                        "upstream.api_key_file",
                        format!("cannot read {}: {e}", file.get_ref()),
                    )
                })?;
                let value = value.trim().to_owned();
                if value.is_empty() {
                    return Err(at(
                        file.span(),
                        "upstream.api_key_file",
                        format!("{} is empty", file.get_ref()),
                    ));
                }
                (
                    Some(Secret(value)),
                    Some(format!("file {}", file.get_ref())),
                )
            }
            (None, None) => (None, None),
        };

        let keys = resolve_keys(&raw.policies, raw.keys, &at)?;
        let tls = match raw.server.tls {
            Some(spanned) => {
                let span = spanned.span();
                let files = spanned.into_inner();
                // Load them now, so that `check`, start and reload all refuse files that do not.
                crate::server::tls::load(&files.cert, &files.key)
                    .map_err(|msg| at(span, "server.tls", msg))?;
                Some(crate::server::tls::TlsFiles {
                    cert: files.cert,
                    key: files.key,
                })
            }
            None => None,
        };
        let admin_token = match &raw.server.admin_token_env {
            Some(env) => {
                let token = std::env::var(env.get_ref())
                    .ok()
                    .filter(|t| t.trim().len() >= 16)
                    .ok_or_else(|| {
                        at(
                            env.span(),
                            "server.admin_token_env",
                            format!(
                                "environment variable {} must hold a token of at least 16 characters",
                                env.get_ref()
                            ),
                        )
                    })?;
                Some(Secret(token.trim().to_owned()))
            }
            None => None,
        };
        let redis = match raw.state.backend.get_ref().as_str() {
            "local" => None,
            "redis" => {
                let Some(url) = raw.state.redis_url else {
                    return Err(at(
                        raw.state.backend.span(),
                        "state.redis_url",
                        "the redis backend needs redis_url = \"redis://host:6379\"".into(),
                    ));
                };
                let scheme_ok =
                    url.get_ref().starts_with("redis://") || url.get_ref().starts_with("rediss://");
                if !scheme_ok {
                    return Err(at(
                        url.span(),
                        "state.redis_url",
                        "must start with redis:// or rediss:// (TLS)".into(),
                    ));
                }
                let password = match &raw.state.password_env {
                    Some(env) => Some(std::env::var(env.get_ref()).map(Secret).map_err(|_| {
                        at(
                            env.span(),
                            "state.password_env",
                            format!("environment variable {} is not set", env.get_ref()),
                        )
                    })?),
                    None => None,
                };
                if raw.state.lease < Duration::from_secs(1) {
                    return Err(ConfigError(format!(
                        "{origin}: state.lease must be at least 1s"
                    )));
                }
                Some(RedisConfig {
                    url: url.into_inner(),
                    password,
                    prefix: raw.state.prefix,
                    on_error: raw.state.on_error,
                    lease: raw.state.lease,
                })
            }
            other => {
                return Err(at(
                    raw.state.backend.span(),
                    "state.backend",
                    format!("unknown backend {other:?}: use \"local\" or \"redis\""),
                ))
            }
        };
        if raw.state.flush_interval.is_zero() {
            return Err(ConfigError(format!(
                "{origin}: state.flush_interval must be longer than 0s"
            )));
        }

        Ok(Config {
            keys,
            state: StateConfig {
                path: raw.state.path,
                flush_interval: raw.state.flush_interval,
                redis,
            },
            ledger: raw.ledger.map(|l| l.path),
            server: ServerConfig {
                listen: raw.server.listen,
                admin_listen: raw.server.admin_listen,
                max_body_bytes,
                shutdown_timeout: raw.server.shutdown_timeout,
                header_read_timeout: raw.server.header_read_timeout,
                body_read_timeout: raw.server.body_read_timeout,
                admin_token,
                tls,
                workers,
            },
            upstream: UpstreamConfig {
                scheme,
                authority,
                base_path,
                api_key,
                api_key_source,
                ca_file: raw.upstream.ca_file,
                inject_usage: raw.upstream.inject_usage,
                connect_timeout: raw.upstream.connect_timeout,
                response_header_timeout: raw.upstream.response_header_timeout,
                idle_timeout: raw.upstream.idle_timeout,
                pool_idle_timeout: raw.upstream.pool_idle_timeout,
                pool_max_idle_per_host: raw.upstream.pool_max_idle_per_host,
            },
        })
    }

    /// Problems that do not stop the gateway but that an operator should hear about.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.keys.is_empty() {
            warnings.push(
                "no [[keys]] configured: every request is refused with 401; make one with `tollgate keygen --name NAME`"
                    .to_owned(),
            );
        }
        if let (None, Some(source)) = (&self.upstream.api_key, &self.upstream.api_key_source) {
            warnings.push(format!(
                "upstream credential missing: {source} is not set; requests reach the upstream without Authorization"
            ));
        }
        warnings
    }
}

/// Builds each key's limits from its policy and its own fields, and checks names and hashes.
fn resolve_keys(
    policies: &BTreeMap<String, RawLimits>,
    raw_keys: Vec<RawKey>,
    at: &impl Fn(Range<usize>, &str, String) -> ConfigError,
) -> Result<Vec<KeyConfig>, ConfigError> {
    for (name, policy) in policies {
        let prefix = format!("policies.{name}");
        validate_limits(policy, &prefix, at)?;
    }
    let mut names = HashSet::new();
    let mut hashes = HashSet::new();
    let mut keys = Vec::with_capacity(raw_keys.len());
    for (i, raw) in raw_keys.into_iter().enumerate() {
        let path = |field: &str| format!("keys[{i}].{field}");
        let name = raw.name.get_ref().as_str();
        if !is_valid_key_name(name) {
            return Err(at(
                raw.name.span(),
                &path("name"),
                format!("{name:?}: use 1-64 letters, digits, '-', '_' or '.'"),
            ));
        }
        if name == crate::layers::observe::UNAUTHENTICATED {
            return Err(at(
                raw.name.span(),
                &path("name"),
                format!("{name:?} is reserved for requests without a valid key"),
            ));
        }
        if !names.insert(name.to_owned()) {
            return Err(at(
                raw.name.span(),
                &path("name"),
                format!("duplicate key name {name:?}"),
            ));
        }
        let texts = raw.sha256.get_ref().as_slice();
        if texts.is_empty() {
            return Err(at(
                raw.sha256.span(),
                &path("sha256"),
                "needs at least one hash".to_owned(),
            ));
        }
        let mut sha256 = Vec::with_capacity(texts.len());
        for text in texts {
            let digest =
                parse_sha256(text).map_err(|msg| at(raw.sha256.span(), &path("sha256"), msg))?;
            if !hashes.insert(digest) {
                return Err(at(
                    raw.sha256.span(),
                    &path("sha256"),
                    "the same hash is used twice".to_owned(),
                ));
            }
            sha256.push(digest);
        }
        let mut merged = match &raw.policy {
            Some(policy) => policies.get(policy.get_ref()).cloned().ok_or_else(|| {
                let known: Vec<&str> = policies.keys().map(String::as_str).collect();
                at(
                    policy.span(),
                    &path("policy"),
                    format!(
                        "no policy named {:?} (defined: {known:?})",
                        policy.get_ref()
                    ),
                )
            })?,
            None => RawLimits::default(),
        };
        if raw.quotas.is_some() {
            merged.quotas = raw.quotas;
        }
        if raw.models.is_some() {
            merged.models = raw.models;
        }
        if raw.max_tokens.is_some() {
            merged.max_tokens = raw.max_tokens;
        }
        if raw.concurrency.is_some() {
            merged.concurrency = raw.concurrency;
        }
        if raw.rate.is_some() {
            merged.rate = raw.rate;
        }
        let limits = validate_limits(&merged, &format!("keys[{i}]"), at)?;
        keys.push(KeyConfig {
            name: Arc::from(name),
            sha256,
            limits,
        });
    }
    Ok(keys)
}

fn validate_limits(
    raw: &RawLimits,
    prefix: &str,
    at: &impl Fn(Range<usize>, &str, String) -> ConfigError,
) -> Result<Limits, ConfigError> {
    let concurrency = match &raw.concurrency {
        Some(value) => Some(NonZeroU32::new(*value.get_ref()).ok_or_else(|| {
            at(
                value.span(),
                &format!("{prefix}.concurrency"),
                "must be at least 1 (leave it out for no limit)".into(),
            )
        })?),
        None => None,
    };
    let rate = match &raw.rate {
        Some(spanned) => {
            let rate = spanned.get_ref();
            let key = format!("{prefix}.rate");
            let requests = NonZeroU32::new(rate.requests)
                .ok_or_else(|| at(spanned.span(), &key, "requests must be at least 1".into()))?;
            if rate.per.is_zero() {
                return Err(at(
                    spanned.span(),
                    &key,
                    "per must be longer than 0s".into(),
                ));
            }
            let burst = match rate.burst {
                Some(burst) => NonZeroU32::new(burst)
                    .ok_or_else(|| at(spanned.span(), &key, "burst must be at least 1".into()))?,
                None => requests,
            };
            Some(RateLimit {
                requests,
                per: rate.per,
                burst,
            })
        }
        None => None,
    };
    let max_tokens = match &raw.max_tokens {
        Some(value) => Some(NonZeroU32::new(*value.get_ref()).ok_or_else(|| {
            at(
                value.span(),
                &format!("{prefix}.max_tokens"),
                "must be at least 1 (leave it out for no cap)".into(),
            )
        })?),
        None => None,
    };
    let mut quotas = Vec::new();
    if let Some(raw_quotas) = &raw.quotas {
        let key = format!("{prefix}.quotas");
        for quota in raw_quotas.get_ref() {
            if quota.tokens == 0 || quota.per < Duration::from_secs(1) {
                return Err(at(
                    raw_quotas.span(),
                    &key,
                    "each quota needs tokens >= 1 and a window (per) of at least 1s".into(),
                ));
            }
            if quota.per.subsec_nanos() != 0 {
                return Err(at(
                    raw_quotas.span(),
                    &key,
                    "windows are whole seconds".into(),
                ));
            }
            if quotas.iter().any(|q: &Quota| q.per == quota.per) {
                return Err(at(
                    raw_quotas.span(),
                    &key,
                    format!("two quotas over the same window ({:?})", quota.per),
                ));
            }
            quotas.push(Quota {
                tokens: quota.tokens,
                per: quota.per,
            });
        }
        if !quotas.is_empty() && raw.max_tokens.is_none() && prefix.starts_with("keys") {
            return Err(at(
                raw_quotas.span(),
                &key,
                "a key with quotas needs max_tokens: a request that names no max_tokens reserves \
                 the key's cap, so the worst case must be bounded"
                    .into(),
            ));
        }
    }
    // `["*"]` and no list at all mean the same; keep one spelling.
    let models = raw
        .models
        .clone()
        .filter(|models| !models.iter().any(|m| m == "*"));
    Ok(Limits {
        quotas,
        models,
        max_tokens,
        concurrency,
        rate,
    })
}

/// Key names become metric labels and log fields: keep them plain.
pub fn is_valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let mut digest = [0u8; 32];
    if text.starts_with(crate::keys::TOKEN_PREFIX) {
        return Err(
            "this looks like a key itself; put its SHA-256 here (tollgate keygen prints it)".into(),
        );
    }
    hex::decode_to_slice(text, &mut digest)
        .map_err(|_| "must be 64 hex digits: the SHA-256 of the key".to_owned())?;
    Ok(digest)
}

fn parse_raw(source: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    let deserializer = toml::Deserializer::new(source);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let line = inner.span().map(|span| line_of(source, span.start));
        let message = inner.message().to_owned();
        match (line, path.as_str()) {
            (Some(line), ".") => ConfigError(format!("{origin}:{line}: {message}")),
            (Some(line), path) => ConfigError(format!("{origin}:{line}: {path}: {message}")),
            (None, ".") => ConfigError(format!("{origin}: {message}")),
            (None, path) => ConfigError(format!("{origin}: {path}: {message}")),
        }
    })
}

/// The 1-based line of a byte offset.
fn line_of(source: &str, offset: usize) -> usize {
    source
        .get(..offset)
        .map_or(0, |before| before.matches('\n').count())
        + 1
}

fn parse_upstream_url(
    url: &str,
) -> Result<(http::uri::Scheme, http::uri::Authority, String), String> {
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
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?}: credentials in the URL are not allowed; use api_key_env"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("{url:?}: a base URL takes no query string"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme, authority, base_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(src, "test.toml")
    }

    #[test]
    fn embedded_default_config_parses() {
        let config = parse(DEFAULT_CONFIG).expect("the embedded default config must parse");
        assert_eq!(config.server.max_body_bytes, 4 * 1024 * 1024);
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let config = parse("[server]\n[upstream]\nurl = \"http://127.0.0.1:8000\"\n")
            .expect("minimal config parses");
        assert_eq!(config.server.listen, defaults::listen());
        assert_eq!(config.server.admin_listen, defaults::admin_listen());
        assert_eq!(config.upstream.base_path, "");
        assert_eq!(config.upstream.response_header_timeout.as_secs(), 300);
        assert!(config.upstream.api_key.is_none());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse(
            "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n[upstream]\nurl = \"http://a\"\n",
        )
        .expect_err("unknown key must fail");
        let msg = err.to_string();
        assert!(msg.contains("test.toml:3"), "line missing in {msg:?}");
        assert!(msg.contains("lisen"), "key missing in {msg:?}");
    }

    #[test]
    fn later_sections_are_rejected_until_supported() {
        let err = parse("[server]\n[upstream]\nurl = \"http://a\"\n[tracing]\nlevel = \"x\"\n")
            .expect_err("unsupported section must fail");
        assert!(err.to_string().contains("tracing"), "{err}");
    }

    #[test]
    fn bad_url_names_key_and_line() {
        let err = parse("[server]\n[upstream]\n\nurl = \"ftp://example.com\"\n")
            .expect_err("ftp must fail");
        let msg = err.to_string();
        assert!(msg.starts_with("test.toml:4: upstream.url:"), "{msg}");
    }

    #[test]
    fn workers_default_to_the_cpu_count_and_zero_is_refused() {
        let config = parse("[server]\n[upstream]\nurl = \"http://a\"\n").expect("valid");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config.server.workers.get(), cpus);
        let config =
            parse("[server]\nworkers = 3\n[upstream]\nurl = \"http://a\"\n").expect("valid");
        assert_eq!(config.server.workers.get(), 3);
        let err = parse("[server]\nworkers = 0\n[upstream]\nurl = \"http://a\"\n")
            .expect_err("no workers cannot serve");
        assert!(
            err.to_string().starts_with("test.toml:2: server.workers:"),
            "{err}"
        );
    }

    #[test]
    fn bad_value_type_names_path_and_line() {
        let err = parse("[server]\nmax_body_bytes = \"big\"\n[upstream]\nurl = \"http://a\"\n")
            .expect_err("string for a number must fail");
        let msg = err.to_string();
        assert!(msg.contains("test.toml:2"), "{msg}");
        assert!(msg.contains("max_body_bytes"), "{msg}");
    }

    #[test]
    fn durations_use_human_units() {
        let config = parse(
            "[server]\nshutdown_timeout = \"5s\"\n[upstream]\nurl = \"https://h/openai/\"\nidle_timeout = \"2m\"\n",
        )
        .expect("durations parse");
        assert_eq!(config.server.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(config.upstream.idle_timeout, Duration::from_secs(120));
        assert_eq!(config.upstream.base_path, "/openai");
        assert_eq!(config.upstream.base_url(), "https://h/openai");
    }

    const HASH_A: &str = "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3";
    const HASH_B: &str = "b3a8e0e1f9ab1bfe3a36f231f676f78bb30a519d2b21e6c530c0eee8ebb4a5d0";

    fn with_keys(tail: &str) -> Result<Config, ConfigError> {
        parse(&format!("[server]\n[upstream]\nurl = \"http://a\"\n{tail}"))
    }

    #[test]
    fn keys_take_their_policy_and_override_it() {
        let config = with_keys(&format!(
            "[policies.free]\nconcurrency = 2\nrate = {{ requests = 60, per = \"1m\", burst = 5 }}\n\
             [[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\npolicy = \"free\"\n\
             [[keys]]\nname = \"b\"\nsha256 = \"{HASH_B}\"\npolicy = \"free\"\nconcurrency = 9\n"
        ))
        .expect("keys parse");
        let rate = RateLimit {
            requests: NonZeroU32::new(60).expect("nonzero"),
            per: Duration::from_secs(60),
            burst: NonZeroU32::new(5).expect("nonzero"),
        };
        assert_eq!(
            config.keys[0].limits.concurrency.map(NonZeroU32::get),
            Some(2)
        );
        assert_eq!(config.keys[0].limits.rate, Some(rate));
        assert_eq!(
            config.keys[1].limits.concurrency.map(NonZeroU32::get),
            Some(9),
            "key overrides policy"
        );
        assert_eq!(
            config.keys[1].limits.rate,
            Some(rate),
            "policy fills what the key leaves out"
        );
    }

    #[test]
    fn burst_defaults_to_the_request_count() {
        let config = with_keys(&format!(
            "[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\nrate = {{ requests = 10, per = \"1s\" }}\n"
        ))
        .expect("parses");
        assert_eq!(config.keys[0].limits.rate.map(|r| r.burst.get()), Some(10));
    }

    #[test]
    fn duplicate_names_and_hashes_are_errors_with_lines() {
        let err = with_keys(&format!(
            "[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\n[[keys]]\nname = \"a\"\nsha256 = \"{HASH_B}\"\n"
        ))
        .expect_err("duplicate name");
        assert!(
            err.to_string()
                .contains("test.toml:8: keys[1].name: duplicate"),
            "{err}"
        );
        let err = with_keys(&format!(
            "[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\n[[keys]]\nname = \"b\"\nsha256 = \"{HASH_A}\"\n"
        ))
        .expect_err("duplicate hash");
        assert!(
            err.to_string().contains("test.toml:9: keys[1].sha256"),
            "{err}"
        );
    }

    #[test]
    fn a_key_may_have_several_hashes_while_it_is_rotated() {
        let config = with_keys(&format!(
            "[[keys]]\nname = \"a\"\nsha256 = [\"{HASH_A}\", \"{HASH_B}\"]\n"
        ))
        .expect("two hashes for one key");
        assert_eq!(config.keys[0].sha256.len(), 2);
        let err = with_keys(&format!(
            "[[keys]]\nname = \"a\"\nsha256 = [\"{HASH_A}\", \"{HASH_A}\"]\n"
        ))
        .expect_err("the same hash twice");
        assert!(err.to_string().contains("used twice"), "{err}");
    }

    #[test]
    fn bad_key_fields_are_explained() {
        for (tail, expected) in [
            ("[[keys]]\nname = \"a\"\nsha256 = \"tg-abc\"\n".to_owned(), "looks like a key itself"),
            ("[[keys]]\nname = \"a\"\nsha256 = \"abc\"\n".to_owned(), "64 hex digits"),
            (format!("[[keys]]\nname = \"a b\"\nsha256 = \"{HASH_A}\"\n"), "keys[0].name"),
            (format!("[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\npolicy = \"gold\"\n"), "no policy named \"gold\""),
            (format!("[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\nconcurrency = 0\n"), "keys[0].concurrency"),
            (format!("[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\nrate = {{ requests = 1, per = \"0s\" }}\n"), "per must be longer"),
            (format!("[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\nrate = {{ requests = 1, per = \"1s\", brust = 2 }}\n"), "brust"),
            (format!("[[keys]]\nname = \"unauthenticated\"\nsha256 = \"{HASH_A}\"\n"), "reserved"),
        ] {
            let err = with_keys(&tail).expect_err(expected);
            assert!(err.to_string().contains(expected), "{expected:?} not in {err}");
        }
    }

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("sk-very-secret".into());
        assert_eq!(format!("{secret:?} {secret}"), "***** *****");
    }
}
