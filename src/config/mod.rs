//! The config file: TOML read into [`RawConfig`] (exactly what the file says), then
//! [`Config::load`] turns it into the validated runtime [`Config`].
//!
//! Edge cases:
//! - Unknown keys anywhere are errors (`deny_unknown_fields`), reported with the key's line, so a
//!   section that belongs to a later feature is refused rather than silently ignored.
//! - Errors name the full key path (`upstream.url`) and the line in the file, and say what was
//!   expected and found in TOML's words (`expected an integer, found the string "4"`).
//! - Secrets never live in the file: `upstream.api_key_env` names an environment variable and
//!   `upstream.api_key_file` a file; the value is held in a [`Secret`] that never prints.

mod budgets;
mod keys;
mod limits;
mod load;
mod raw;
mod read;
mod source;
mod telemetry;
#[cfg(test)]
mod tests;
pub(crate) mod tls;
mod upstreams;

pub(crate) use self::keys::{Policies, TOKEN_PREFIX};
pub(crate) use self::limits::is_valid_key_name;
pub use self::telemetry::TelemetryConfig;
pub(crate) use self::upstreams::{Balance, EndpointUrl, PoolConfig};

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// The default config, embedded so that `tollgate serve` runs with no file at all.
pub(crate) const DEFAULT_CONFIG: &str = include_str!("../../config/tollgate.toml");

/// A config problem, already phrased for the operator: `FILE:LINE: key.path: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(message: String) -> Self {
        ConfigError(message)
    }
}

// === runtime config ===

/// The validated config the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    /// The upstream pools in file order (the first whose models match serves a request); one
    /// pool named `default` for a config with `[upstream]`.
    pub upstreams: Vec<PoolConfig>,
    pub keys: Vec<KeyConfig>,
    /// Prices and groups: applied by a reload, like keys.
    pub budgets: Budgets,
    /// The policies the keys were resolved from, kept for the keys made through the admin API.
    pub(crate) policies: Policies,
    pub state: StateConfig,
    /// Where one JSON line per finished request goes; `None`: no ledger.
    pub ledger: Option<LedgerConfig>,
    /// Where OpenTelemetry spans go; `None`: no tracing.
    pub telemetry: Option<TelemetryConfig>,
}

/// `[ledger]`: a file, a PostgreSQL table, or both.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerConfig {
    /// The JSONL file; `None`: none.
    pub path: Option<PathBuf>,
    pub(crate) postgres: Option<PostgresLedger>,
}

/// The ledger's PostgreSQL table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PostgresLedger {
    /// The URL, from the environment variable `url_env` (checked to parse at load); it may hold
    /// a password, so it never prints.
    pub(crate) url: Secret,
    pub(crate) url_env: String,
    pub(crate) table: String,
    /// Where lines wait while PostgreSQL is unreachable.
    pub(crate) spool_path: PathBuf,
    /// Written on every row.
    pub(crate) replica: String,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    /// Where the quota windows are saved (`local` backend).
    pub(crate) path: PathBuf,
    /// How often charged usage is written; at most this much is lost to a SIGKILL.
    pub(crate) flush_interval: Duration,
    /// Set when `backend = "redis"`.
    pub redis: Option<RedisConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS).
    pub(crate) url: String,
    pub(crate) password: Option<Secret>,
    /// Every Redis key the gateway writes starts with this.
    pub(crate) prefix: String,
    pub(crate) on_error: OnError,
    /// How long a concurrency slot or a quota reservation outlives a replica that stopped
    /// renewing it.
    pub(crate) lease: Duration,
}

/// A budget over a window: tokens, or cost in nano-units (10^-9) of `[pricing] currency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Tokens, or nano-units of currency.
    pub limit: u64,
    pub unit: Unit,
    pub per: Period,
}

impl Quota {
    /// A token quota over a fixed window of `per` (whole seconds, at least 1).
    pub fn tokens(limit: u64, per: Duration) -> Quota {
        Quota {
            limit,
            unit: Unit::Tokens,
            per: Period::fixed(per),
        }
    }

    /// The metric label of this window: its length as written in configs (`1m`, `1d`, `month`).
    pub(crate) fn label(&self) -> String {
        self.per.label()
    }
}

/// What a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Unit {
    Tokens,
    /// Nano-units (10^-9) of the pricing's currency.
    Cost,
}

impl Unit {
    pub(crate) fn label(self) -> &'static str {
        self.into()
    }
}

/// A quota's window: fixed (aligned to multiples of its length since the epoch), an ISO week
/// (from Monday 00:00 UTC) or a calendar month (from the 1st 00:00 UTC). See `state::window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Fixed(NonZeroU64),
    Week,
    Month,
}

impl Period {
    /// A fixed window of `per`, in whole seconds (at least 1).
    pub fn fixed(per: Duration) -> Period {
        Period::Fixed(NonZeroU64::new(per.as_secs()).unwrap_or(NonZeroU64::MIN))
    }

    /// As written in configs and shown in headers, metrics and the admin API: `1m`, `1d`,
    /// `week`, `month`.
    pub(crate) fn label(self) -> String {
        match self {
            Period::Fixed(secs) => window_label(Duration::from_secs(secs.get())),
            Period::Week => "week".to_owned(),
            Period::Month => "month".to_owned(),
        }
    }

    /// Its name in state keys and files: the length in seconds, `week` or `month`.
    pub(crate) fn id(self) -> String {
        match self {
            Period::Fixed(secs) => secs.get().to_string(),
            Period::Week => "week".to_owned(),
            Period::Month => "month".to_owned(),
        }
    }

    /// The window named `id` (as [`Period::id`] writes it).
    pub(crate) fn from_id(id: &str) -> Option<Period> {
        match id {
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            secs => secs
                .parse()
                .ok()
                .and_then(NonZeroU64::new)
                .map(Period::Fixed),
        }
    }
}

/// A window's length as written in configs (`1m`, `1d`): its metric label and name in headers.
pub(crate) fn window_label(per: Duration) -> String {
    match per.as_secs().max(1) {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `[pricing]` and `[groups.NAME]`: what requests cost, and the limits several keys share.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budgets {
    pub pricing: Pricing,
    /// Sorted by name.
    pub groups: Vec<GroupConfig>,
}

/// The price table: per model pattern, nano-units of currency per token (exact: a price per
/// million tokens with at most 3 decimals is a whole number of nano-units per token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    /// A label (`USD`), shown in reports, refusals and the admin API.
    pub currency: String,
    /// First match in order wins.
    pub models: Vec<Price>,
}

impl Default for Pricing {
    fn default() -> Self {
        Pricing {
            currency: "USD".to_owned(),
            models: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// An exact model name, `prefix*`, or `*`.
    pub model: String,
    /// Nano-units per prompt token.
    pub prompt: u64,
    /// Nano-units per completion token.
    pub completion: u64,
}

impl Pricing {
    /// The price of `model`: the first entry that matches it.
    pub(crate) fn price(&self, model: &str) -> Option<&Price> {
        self.models.iter().find(|p| model_matches(&p.model, model))
    }
}

/// Whether a model pattern, as keys' allow-lists, prices and pools' `models` write them, matches
/// `model`: `*` matches everything, `prefix*` a prefix, anything else exactly.
pub(crate) fn model_matches(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

/// Limits that several keys share (`[groups.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub name: Arc<str>,
    pub quotas: Vec<Quota>,
    /// Requests in flight across all the group's keys.
    pub concurrency: Option<NonZeroU32>,
    /// Request rate across all the group's keys.
    pub rate: Option<RateLimit>,
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
    /// Token and cost budgets, each over its own window.
    pub quotas: Vec<Quota>,
    /// The group whose limits the key shares (`[groups.NAME]`), at most one.
    pub group: Option<Arc<str>>,
    /// Models the key may ask for: exact names, `prefix*` patterns, or `*`. `None`: any.
    pub models: Option<Vec<String>>,
    /// Cap on `max_tokens` / `max_completion_tokens` and the vendors' length fields.
    pub max_tokens: Option<NonZeroU32>,
    /// Cap on the answers a request asks for: `n`, `best_of`, llama.cpp's `n_cmpl`.
    pub max_n: Option<NonZeroU32>,
    pub concurrency: Option<NonZeroU32>,
    pub rate: Option<RateLimit>,
}

/// GCRA: `requests` per `per` as a steady rate, with up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub(crate) requests: NonZeroU32,
    pub(crate) per: Duration,
    pub(crate) burst: NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) admin_listen: SocketAddr,
    pub(crate) max_body_bytes: usize,
    /// How long in-flight requests and streams may run on after SIGTERM before they are cut.
    pub(crate) shutdown_timeout: Duration,
    /// A client must finish sending request headers within this time (slowloris guard).
    pub(crate) header_read_timeout: Duration,
    /// A client must finish sending its request body within this time (slowloris guard).
    pub(crate) body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub(crate) idle_timeout: Duration,
    /// Client connections open at once; more are closed as they come.
    pub(crate) max_connections: NonZeroUsize,
    /// The largest request head (request line and header fields) answered, else 431.
    pub(crate) max_header_bytes: usize,
    /// The admin API's bearer token; `None` disables `/admin/*`.
    pub(crate) admin_token: Option<Secret>,
    /// TLS on the client listener; `None`: plain HTTP (and h2c).
    pub(crate) tls: Option<tls::TlsFiles>,
    /// TLS on the admin listener; `None`: plain HTTP.
    pub(crate) admin_tls: Option<tls::TlsFiles>,
    /// Threads serving client connections, each with its own event loop and upstream pool.
    pub(crate) workers: NonZeroUsize,
}

/// How a pool's endpoints are spoken to: the same for every endpoint of the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// The gateway's own credential, sent as `Authorization: Bearer …`.
    pub(crate) api_key: Option<Secret>,
    /// Where the credential should have come from, for messages when it is missing.
    pub(crate) api_key_source: Option<String>,
    /// Extra trusted CA certificates (PEM) besides the system's and the webpki roots.
    pub(crate) ca_file: Option<std::path::PathBuf>,
    /// Ask streams for usage (`stream_options.include_usage`) when the client did not, and remove
    /// what the client did not ask for from its stream.
    pub(crate) inject_usage: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_header_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) pool_idle_timeout: Duration,
    pub(crate) pool_max_idle_per_host: usize,
}

impl ServerConfig {
    /// Every listener, by its config key.
    pub(crate) fn listeners(&self) -> [(&'static str, SocketAddr); 2] {
        [
            ("server.listen", self.listen),
            ("server.admin_listen", self.admin_listen),
        ]
    }

    /// The first two listeners that could not both bind.
    pub(crate) fn listener_clash(&self) -> Option<ListenerClash> {
        let listeners = self.listeners();
        listeners.iter().enumerate().find_map(|(i, &first)| {
            listeners[i + 1..]
                .iter()
                .find(|second| addresses_clash(first.1, second.1))
                .map(|&second| ListenerClash { first, second })
        })
    }
}

/// Two listeners on one address, by config key and address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenerClash {
    pub(crate) first: (&'static str, SocketAddr),
    pub(crate) second: (&'static str, SocketAddr),
}

impl fmt::Display for ListenerClash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ((name, addr), (other_name, other)) = (self.first, self.second);
        write!(
            f,
            "{name} = {addr} and {other_name} = {other} cannot both listen; each listener needs an address of its own"
        )
    }
}

/// Whether the second of two listeners would fail to bind: the same port (0 picks a free one
/// each time, so never), on the same IP or where one is a wildcard that covers the other
/// (`0.0.0.0` covers IPv4, `[::]` both families on Linux).
fn addresses_clash(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |wide: SocketAddr, other: SocketAddr| {
        wide.ip().is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(value: String) -> Self {
        Secret(value)
    }
    pub(crate) fn expose(&self) -> &str {
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

/// Where quota windows and limits live (`state.backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StateBackend {
    /// In this process, saved to `state.path`.
    #[default]
    Local,
    /// In Redis at `state.redis_url`, shared by every replica.
    Redis,
}

/// What the gateway does while the Redis backend is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OnError {
    /// Admit on this replica's local limits; apply the usage to Redis when it returns.
    FailOpen,
    /// Refuse with 503.
    #[default]
    FailClosed,
}

impl Config {
    /// Problems that do not stop the gateway but that an operator should hear about.
    pub(crate) fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.keys.is_empty() && self.server.admin_token.is_none() {
            warnings.push(
                "no [[keys]] configured: every request is refused with 401; make one with `tollgate keygen --name NAME`"
                    .to_owned(),
            );
        } else if self.keys.is_empty() {
            warnings.push(
                "no [[keys]] in the config file: only keys made through the admin API are accepted (`tollgate keys create NAME`)"
                    .to_owned(),
            );
        }
        for pool in &self.upstreams {
            let upstream = &pool.upstream;
            if let (None, Some(source)) = (&upstream.api_key, &upstream.api_key_source) {
                warnings.push(format!(
                    "upstream {:?}: credential missing: {source} is not set; requests reach it without Authorization",
                    &*pool.name
                ));
            }
        }
        warnings
    }
}
