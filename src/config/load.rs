//! [`RawConfig`] → the validated runtime [`Config`]: one function per section (server, upstream,
//! state), the keys in [`super::keys`]. Errors name the file, the line and the full key path
//! (`test.toml:3: upstream.url: …`).
//!
//! Edge cases: the upstream credential is read from its environment variable or file here, once
//! (a variable that is unset is no error: `check` and `warnings` report it); TLS files are loaded
//! here too, so that `check`, start and reload all refuse files that do not load.

use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::budgets::{check_keys, resolve_budgets};
use super::keys::{resolve_keys, Policies};
use super::raw::{RawLedger, RawServer, RawState, RawTls};
use super::read::parse_raw;
use super::source::Source;
use super::tls::{self, TlsFiles};
use super::{
    Config, ConfigError, LedgerConfig, PostgresLedger, RedisConfig, Secret, ServerConfig,
    StateBackend, StateConfig,
};

/// More threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))?;
        Config::parse(&source, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in error messages.
    pub fn parse(source: &str, origin: &str) -> Result<Config, ConfigError> {
        let mut raw = parse_raw(source, origin)?;
        let src = Source::new(source, origin);
        let upstreams = super::upstreams::pools(&mut raw, &src)?;
        let server = server(raw.server, &src)?;
        let keys = resolve_keys(&raw.policies, raw.keys, &src)?;
        let budgets = resolve_budgets(raw.pricing, raw.groups, &src)?;
        check_keys(&keys, &budgets, &src)?;
        let state = state(raw.state, &src)?;
        let ledger = match raw.ledger {
            Some(raw) => Some(ledger(raw, &state, &src)?),
            None => None,
        };
        let telemetry = match raw.telemetry {
            Some(raw) => Some(super::telemetry::telemetry(raw, &src)?),
            None => None,
        };
        Ok(Config {
            server,
            upstreams,
            keys,
            policies: Policies::new(raw.policies, budgets.clone()),
            budgets,
            state,
            ledger,
            telemetry,
        })
    }
}

// === [server] ===

fn server(raw: RawServer, src: &Source) -> Result<ServerConfig, ConfigError> {
    let max_body = raw.max_body_bytes;
    if *max_body.get_ref() == 0 {
        return Err(src.at(
            max_body.span(),
            "server.max_body_bytes",
            "must be greater than 0".into(),
        ));
    }
    let max_body_bytes = usize::try_from(*max_body.get_ref()).map_err(|_| {
        src.at(
            max_body.span(),
            "server.max_body_bytes",
            "is larger than this machine can address".into(),
        )
    })?;
    let workers = match raw.workers {
        None => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
        Some(workers) => usize::try_from(*workers.get_ref())
            .ok()
            .filter(|n| (1..=MAX_WORKERS).contains(n))
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| {
                src.at(
                    workers.span(),
                    "server.workers",
                    format!("must be between 1 and {MAX_WORKERS}"),
                )
            })?,
    };
    let tls = load_tls(raw.tls, "server.tls", src)?;
    let admin_tls = load_tls(raw.admin_tls, "server.admin_tls", src)?;
    let max_connections = within(
        &raw.max_connections,
        "server.max_connections",
        1..=1 << 24,
        src,
    )?;
    let max_connections = NonZeroUsize::new(max_connections).unwrap_or(NonZeroUsize::MIN);
    let max_header_bytes = within(
        &raw.max_header_bytes,
        "server.max_header_bytes",
        1024..=1 << 20,
        src,
    )?;
    let admin_token = match &raw.admin_token_env {
        Some(env) => {
            let token = std::env::var(env.get_ref())
                .ok()
                .filter(|t| t.trim().len() >= 16)
                .ok_or_else(|| {
                    src.at(
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
    let config = ServerConfig {
        listen: *raw.listen.get_ref(),
        admin_listen: *raw.admin_listen.get_ref(),
        max_body_bytes,
        shutdown_timeout: raw.shutdown_timeout,
        header_read_timeout: raw.header_read_timeout,
        body_read_timeout: raw.body_read_timeout,
        idle_timeout: raw.idle_timeout,
        max_connections,
        max_header_bytes,
        admin_token,
        tls,
        admin_tls,
        workers,
    };
    if let Some(clash) = config.listener_clash() {
        // At the listener written last: a default has no line.
        let span = |key| match key {
            "server.listen" => raw.listen.span(),
            _ => raw.admin_listen.span(),
        };
        let (first, second) = (span(clash.first.0), span(clash.second.0));
        let (at, key) = if second.start >= first.start {
            (second, clash.second.0)
        } else {
            (first, clash.first.0)
        };
        return Err(src.at(at, key, clash.to_string()));
    }
    Ok(config)
}

/// TLS files, loaded now so that `check`, start and reload all refuse files that do not load.
fn load_tls(
    raw: Option<Spanned<RawTls>>,
    key: &str,
    src: &Source,
) -> Result<Option<TlsFiles>, ConfigError> {
    let Some(spanned) = raw else {
        return Ok(None);
    };
    let span = spanned.span();
    let files = spanned.into_inner();
    tls::load(&files.cert, &files.key).map_err(|e| src.at(span, key, e.to_string()))?;
    Ok(Some(TlsFiles {
        cert: files.cert,
        key: files.key,
    }))
}

/// A count that must lie in `range`, as a `usize`.
fn within(
    value: &Spanned<u64>,
    key: &str,
    range: RangeInclusive<u64>,
    src: &Source,
) -> Result<usize, ConfigError> {
    if !range.contains(value.get_ref()) {
        let (low, high) = range.into_inner();
        return Err(src.at(
            value.span(),
            key,
            format!("must be between {low} and {high}"),
        ));
    }
    usize::try_from(*value.get_ref()).map_err(|_| src.at(value.span(), key, "too large".into()))
}

// === [state] ===

fn state(raw: RawState, src: &Source) -> Result<StateConfig, ConfigError> {
    let redis = match raw.backend.get_ref() {
        StateBackend::Local => None,
        StateBackend::Redis => Some(redis(&raw, src)?),
    };
    if raw.flush_interval.is_zero() {
        return Err(src.whole("state.flush_interval must be longer than 0s"));
    }
    Ok(StateConfig {
        path: raw.path,
        flush_interval: raw.flush_interval,
        redis,
    })
}

fn redis(raw: &RawState, src: &Source) -> Result<RedisConfig, ConfigError> {
    let Some(url) = &raw.redis_url else {
        return Err(src.at(
            raw.backend.span(),
            "state.redis_url",
            "the redis backend needs redis_url = \"redis://host:6379\"".into(),
        ));
    };
    let scheme_ok = url.get_ref().starts_with("redis://") || url.get_ref().starts_with("rediss://");
    if !scheme_ok {
        return Err(src.at(
            url.span(),
            "state.redis_url",
            "must start with redis:// or rediss:// (TLS)".into(),
        ));
    }
    // Parsed now, so that `check` refuses what `serve` would; the client's errors never show the
    // URL, and neither does this message.
    let info =
        redis::IntoConnectionInfo::into_connection_info(url.get_ref().as_str()).map_err(|e| {
            src.at(
                url.span(),
                "state.redis_url",
                format!("not a Redis URL: {e}"),
            )
        })?;
    if info.redis_settings().password().is_some() {
        return Err(src.at(
            url.span(),
            "state.redis_url",
            "a password in the URL is not allowed; name the environment variable that holds it with password_env".into(),
        ));
    }
    let password = match &raw.password_env {
        Some(env) => Some(std::env::var(env.get_ref()).map(Secret).map_err(|_| {
            src.at(
                env.span(),
                "state.password_env",
                format!("environment variable {} is not set", env.get_ref()),
            )
        })?),
        None => None,
    };
    if raw.lease < Duration::from_secs(1) {
        return Err(src.whole("state.lease must be at least 1s"));
    }
    Ok(RedisConfig {
        url: url.get_ref().clone(),
        password,
        prefix: raw.prefix.clone(),
        on_error: raw.on_error,
        lease: raw.lease,
    })
}

// === [ledger] ===

/// The spool's file name beside the state file, when `spool_path` is not set.
const DEFAULT_SPOOL: &str = "ledger-spool";

fn ledger(raw: RawLedger, state: &StateConfig, src: &Source) -> Result<LedgerConfig, ConfigError> {
    let postgres = match &raw.postgres_url_env {
        Some(env) => Some(postgres_ledger(&raw, env, state, src)?),
        None => None,
    };
    if raw.path.is_none() && postgres.is_none() {
        return Err(src.whole(
            "[ledger] needs path (a JSONL file), postgres_url_env (a PostgreSQL table), or both",
        ));
    }
    Ok(LedgerConfig {
        path: raw.path,
        postgres,
    })
}

fn postgres_ledger(
    raw: &RawLedger,
    env: &Spanned<String>,
    state: &StateConfig,
    src: &Source,
) -> Result<PostgresLedger, ConfigError> {
    let key = "ledger.postgres_url_env";
    let name = env.get_ref();
    let url = std::env::var(name)
        .ok()
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .ok_or_else(|| {
            src.at(
                env.span(),
                key,
                format!("environment variable {name} is not set; it must hold a postgres:// URL"),
            )
        })?;
    // The parser's message may quote the URL (and its password): never shown.
    if crate::accounting::ledger::postgres::parse_url(&url).is_none() {
        return Err(src.at(
            env.span(),
            key,
            format!("environment variable {name} does not hold a postgres:// or postgresql:// URL"),
        ));
    }
    let table = &raw.postgres_table;
    if !crate::accounting::ledger::postgres::schema::valid_table_name(table.get_ref()) {
        return Err(src.at(
            table.span(),
            "ledger.postgres_table",
            "must be a plain name of at most 40 lower-case letters, digits and _ (for another schema, set search_path in the URL's options)".into(),
        ));
    }
    let replica = match &raw.replica {
        Some(replica) if replica.get_ref().trim().is_empty() => {
            return Err(src.at(replica.span(), "ledger.replica", "must not be empty".into()))
        }
        Some(replica) => replica.get_ref().clone(),
        None => host_name(),
    };
    let spool_path = raw.spool_path.clone().unwrap_or_else(|| {
        state
            .path
            .parent()
            .map_or_else(|| DEFAULT_SPOOL.into(), |dir| dir.join(DEFAULT_SPOOL))
    });
    Ok(PostgresLedger {
        url: Secret(url),
        url_env: name.clone(),
        table: table.get_ref().clone(),
        spool_path,
        replica,
    })
}

/// This machine's host name; `unknown` when it has none that is text.
fn host_name() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}
