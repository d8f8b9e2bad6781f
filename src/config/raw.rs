//! What the config file says, as serde reads it: every section and key, with its default, and
//! nothing checked beyond types. [`super::load`] validates it into the runtime [`super::Config`].
//!
//! Edge cases: unknown keys anywhere are errors (`deny_unknown_fields`); values whose errors must
//! name their line are kept [`Spanned`]; durations are written `30s`, `1m`, `1d` (humantime).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Balance, OnError, StateBackend};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    /// One upstream, for every model: the pool named `default`.
    pub(super) upstream: Option<Spanned<RawUpstream>>,
    /// Pools of endpoints, each serving the models its patterns match; the other form.
    pub(super) upstreams: Option<Spanned<Vec<RawUpstream>>>,
    /// Named sets of limits that keys refer to with `policy = "name"`.
    #[serde(default)]
    pub(super) policies: BTreeMap<String, RawLimits>,
    #[serde(default)]
    pub(super) keys: Vec<RawKey>,
    /// What requests cost, for cost quotas, the ledger and reports.
    pub(super) pricing: Option<RawPricing>,
    /// Limits several keys share, by name.
    #[serde(default)]
    pub(super) groups: BTreeMap<String, RawGroup>,
    #[serde(default)]
    pub(super) state: RawState,
    pub(super) ledger: Option<RawLedger>,
    /// OpenTelemetry spans ([`super::telemetry`]); none: no tracing.
    pub(super) telemetry: Option<super::telemetry::RawTelemetry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    #[serde(default = "defaults::backend")]
    pub(super) backend: Spanned<StateBackend>,
    #[serde(default = "defaults::state_path")]
    pub(super) path: PathBuf,
    #[serde(default = "defaults::flush_interval", with = "humantime_serde")]
    pub(super) flush_interval: Duration,
    pub(super) redis_url: Option<Spanned<String>>,
    /// The environment variable holding the Redis password: never in the file.
    pub(super) password_env: Option<Spanned<String>>,
    #[serde(default = "defaults::prefix")]
    pub(super) prefix: String,
    #[serde(default)]
    pub(super) on_error: OnError,
    #[serde(default = "defaults::lease", with = "humantime_serde")]
    pub(super) lease: Duration,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLedger {
    pub(super) path: Option<PathBuf>,
    /// The environment variable holding the PostgreSQL URL: never in the file.
    pub(super) postgres_url_env: Option<Spanned<String>>,
    #[serde(default = "defaults::postgres_table")]
    pub(super) postgres_table: Spanned<String>,
    pub(super) spool_path: Option<PathBuf>,
    pub(super) replica: Option<Spanned<String>>,
}

/// `{ tokens = N, per = W }` or `{ cost = X, per = W }`; `per` a duration, `"week"` or
/// `"month"`. The cost is kept with its place so that its decimal text can be read exactly.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuota {
    pub(super) tokens: Option<u64>,
    pub(super) cost: Option<Spanned<f64>>,
    pub(super) per: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPricing {
    #[serde(default = "defaults::currency")]
    pub(super) currency: String,
    #[serde(default)]
    pub(super) models: Vec<RawPrice>,
}

/// A price per 1,000,000 tokens; the numbers keep their place so that their decimal text is read
/// exactly, never through a float.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    pub(super) model: String,
    pub(super) prompt: Spanned<f64>,
    pub(super) completion: Spanned<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) quotas: Option<Spanned<Vec<RawQuota>>>,
    pub(super) concurrency: Option<Spanned<u32>>,
    pub(super) rate: Option<Spanned<RawRate>>,
}

/// Limits a policy sets; a key may set the same fields to override its policy.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) group: Option<Spanned<String>>,
    pub(super) quotas: Option<Spanned<Vec<RawQuota>>>,
    pub(super) models: Option<Vec<String>>,
    pub(super) max_tokens: Option<Spanned<u32>>,
    pub(super) max_n: Option<Spanned<u32>>,
    pub(super) concurrency: Option<Spanned<u32>>,
    pub(super) rate: Option<Spanned<RawRate>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRate {
    pub(super) requests: u32,
    #[serde(with = "humantime_serde")]
    pub(super) per: Duration,
    pub(super) burst: Option<u32>,
}

/// One hash, or several while a key is being rotated.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a SHA-256 (64 hex digits) or an array of them"
)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn as_slice(&self) -> &[String] {
        match self {
            OneOrMany::One(one) => std::slice::from_ref(one),
            OneOrMany::Many(many) => many,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) name: Spanned<String>,
    pub(super) sha256: Spanned<OneOrMany>,
    pub(super) policy: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) quotas: Option<Spanned<Vec<RawQuota>>>,
    pub(super) models: Option<Vec<String>>,
    pub(super) max_tokens: Option<Spanned<u32>>,
    pub(super) max_n: Option<Spanned<u32>>,
    pub(super) concurrency: Option<Spanned<u32>>,
    pub(super) rate: Option<Spanned<RawRate>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    #[serde(default = "defaults::listen")]
    pub(super) listen: Spanned<SocketAddr>,
    #[serde(default = "defaults::admin_listen")]
    pub(super) admin_listen: Spanned<SocketAddr>,
    #[serde(default = "defaults::max_body_bytes")]
    pub(super) max_body_bytes: Spanned<u64>,
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub(super) shutdown_timeout: Duration,
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub(super) header_read_timeout: Duration,
    #[serde(default = "defaults::body_read_timeout", with = "humantime_serde")]
    pub(super) body_read_timeout: Duration,
    #[serde(default = "defaults::server_idle_timeout", with = "humantime_serde")]
    pub(super) idle_timeout: Duration,
    #[serde(default = "defaults::max_connections")]
    pub(super) max_connections: Spanned<u64>,
    #[serde(default = "defaults::max_header_bytes")]
    pub(super) max_header_bytes: Spanned<u64>,
    /// The environment variable holding the admin API's bearer token.
    pub(super) admin_token_env: Option<Spanned<String>>,
    pub(super) tls: Option<Spanned<RawTls>>,
    pub(super) admin_tls: Option<Spanned<RawTls>>,
    /// Threads serving client connections; the machine's CPU count when absent.
    pub(super) workers: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

/// `[upstream]` or one `[[upstreams]]` entry: the same keys, except that `[upstream]` has one
/// `url` and a pool has `name`, `models` and `endpoints` (checked in `load`, with the key's line).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) url: Option<Spanned<String>>,
    pub(super) name: Option<Spanned<String>>,
    pub(super) models: Option<Spanned<Vec<String>>>,
    pub(super) endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(super) balance: Balance,
    #[serde(default = "defaults::retries")]
    pub(super) retries: Spanned<u32>,
    #[serde(default = "defaults::eject_after")]
    pub(super) eject_after: Spanned<u32>,
    #[serde(default = "defaults::eject_for", with = "humantime_serde")]
    pub(super) eject_for: Duration,
    pub(super) health_check: Option<Spanned<RawHealthCheck>>,
    pub(super) api_key_env: Option<Spanned<String>>,
    pub(super) api_key_file: Option<Spanned<String>>,
    /// Extra trusted CA certificates (PEM), for an upstream behind a private CA.
    pub(super) ca_file: Option<std::path::PathBuf>,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub(super) connect_timeout: Duration,
    #[serde(
        default = "defaults::response_header_timeout",
        with = "humantime_serde"
    )]
    pub(super) response_header_timeout: Duration,
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub(super) idle_timeout: Duration,
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pub(super) pool_idle_timeout: Duration,
    #[serde(default = "defaults::pool_max_idle_per_host")]
    pub(super) pool_max_idle_per_host: usize,
    #[serde(default = "defaults::inject_usage")]
    pub(super) inject_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    pub(super) path: String,
    #[serde(default = "defaults::health_interval", with = "humantime_serde")]
    pub(super) interval: Duration,
    #[serde(default = "defaults::health_timeout", with = "humantime_serde")]
    pub(super) timeout: Duration,
}

pub(super) mod defaults {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;
    use toml::Spanned;

    pub(crate) fn listen() -> Spanned<SocketAddr> {
        Spanned::new(0..0, SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)))
    }
    pub(crate) fn admin_listen() -> Spanned<SocketAddr> {
        Spanned::new(0..0, SocketAddr::from((Ipv4Addr::LOCALHOST, 9090)))
    }
    pub(crate) fn max_body_bytes() -> Spanned<u64> {
        Spanned::new(0..0, 4 * 1024 * 1024)
    }
    pub(crate) fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub(crate) fn header_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub(crate) fn server_idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub(crate) fn max_connections() -> Spanned<u64> {
        Spanned::new(0..0, 10_000)
    }
    pub(crate) fn max_header_bytes() -> Spanned<u64> {
        Spanned::new(0..0, 64 * 1024)
    }
    pub(crate) fn body_read_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub(crate) fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    /// A non-streamed completion sends its headers only when the whole answer is generated.
    pub(crate) fn response_header_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub(crate) fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub(crate) fn pool_idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub(crate) fn pool_max_idle_per_host() -> usize {
        256
    }
    pub(crate) fn inject_usage() -> bool {
        true
    }
    pub(crate) fn retries() -> Spanned<u32> {
        Spanned::new(0..0, 2)
    }
    pub(crate) fn eject_after() -> Spanned<u32> {
        Spanned::new(0..0, 3)
    }
    pub(crate) fn eject_for() -> Duration {
        Duration::from_secs(10)
    }
    pub(crate) fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub(crate) fn health_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub(crate) fn backend() -> Spanned<super::StateBackend> {
        Spanned::new(0..0, super::StateBackend::Local)
    }
    pub(crate) fn state_path() -> std::path::PathBuf {
        "state/tollgate.db".into()
    }
    pub(crate) fn flush_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub(crate) fn prefix() -> String {
        "tollgate:".to_owned()
    }
    pub(crate) fn postgres_table() -> Spanned<String> {
        Spanned::new(0..0, "tollgate_usage".to_owned())
    }

    pub(crate) fn currency() -> String {
        "USD".to_owned()
    }
    pub(crate) fn lease() -> Duration {
        Duration::from_secs(30)
    }
}
