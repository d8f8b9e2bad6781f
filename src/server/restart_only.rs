//! The settings a reload cannot apply: everything read only when the gateway starts (listeners,
//! connection limits, state, ledger, workers, the admin token, telemetry), named
//! by their config key so that a reload can log each one that changed and was left as it was.
//!
//! What a reload does apply, and so is not listed: keys and policies, prices and groups, the
//! upstream pools (their models, endpoints, balance, ejection, health checks and client settings;
//! requests in flight on a removed endpoint finish there), and the certificate files of a
//! listener that already has TLS.
//!
//! Every field of the runtime config is destructured here without `..`: a new setting does not
//! compile until it says whether a reload applies it.

use crate::config::{
    Config, LedgerConfig, PostgresLedger, RedisConfig, ServerConfig, StateConfig, TelemetryConfig,
};

/// The config keys of the start-only settings that differ between `current` and `new`, in the
/// order of the reference in README.
pub(crate) fn changed(current: &Config, new: &Config) -> Vec<&'static str> {
    // Keys (and the policies they were resolved from) and the upstream pools are what a reload
    // applies.
    let Config {
        server,
        upstreams: _,
        keys: _,
        // Prices and groups apply to new requests, like keys.
        budgets: _,
        // Kept for the keys made through the admin API, which a reload re-resolves.
        policies: _,
        state,
        ledger,
        telemetry,
    } = current;
    let mut changed = server_changes(server, &new.server);
    changed.extend(state_changes(state, &new.state));
    changed.extend(ledger_changes(ledger.as_ref(), new.ledger.as_ref()));
    changed.extend(telemetry_changes(
        telemetry.as_ref(),
        new.telemetry.as_ref(),
    ));
    changed
}

/// The exporter and its sampler are made once, at start: every `[telemetry]` key is start-only.
fn telemetry_changes(
    current: Option<&TelemetryConfig>,
    new: Option<&TelemetryConfig>,
) -> Vec<&'static str> {
    let (current, new) = match (current, new) {
        (None, None) => return Vec::new(),
        (Some(current), Some(new)) => (current, new),
        // Added or removed: the section as a whole.
        _ => return vec!["telemetry"],
    };
    let TelemetryConfig {
        endpoint,
        service_name,
        sample_ratio,
        headers,
        headers_env,
        batch_delay,
        queue_size,
    } = current;
    names(&[
        ("telemetry.otlp_endpoint", *endpoint != new.endpoint),
        ("telemetry.service_name", *service_name != new.service_name),
        ("telemetry.sample_ratio", *sample_ratio != new.sample_ratio),
        (
            "telemetry.headers_env",
            (headers, headers_env) != (&new.headers, &new.headers_env),
        ),
        ("telemetry.batch_delay", *batch_delay != new.batch_delay),
        ("telemetry.queue_size", *queue_size != new.queue_size),
    ])
}

fn ledger_changes(current: Option<&LedgerConfig>, new: Option<&LedgerConfig>) -> Vec<&'static str> {
    let none = LedgerConfig {
        path: None,
        postgres: None,
    };
    let LedgerConfig { path, postgres } = current.unwrap_or(&none);
    let new = new.unwrap_or(&none);
    let mut changed = names(&[("ledger.path", *path != new.path)]);
    match (postgres, &new.postgres) {
        (Some(current), Some(new)) => changed.extend(postgres_changes(current, new)),
        (None, None) => {}
        _ => changed.push("ledger.postgres_url_env"),
    }
    changed
}

fn postgres_changes(current: &PostgresLedger, new: &PostgresLedger) -> Vec<&'static str> {
    let PostgresLedger {
        url,
        url_env,
        table,
        spool_path,
        replica,
    } = current;
    names(&[
        (
            "ledger.postgres_url_env",
            (url, url_env) != (&new.url, &new.url_env),
        ),
        ("ledger.postgres_table", *table != new.table),
        ("ledger.spool_path", *spool_path != new.spool_path),
        ("ledger.replica", *replica != new.replica),
    ])
}

/// The names whose flag is set.
fn names(settings: &[(&'static str, bool)]) -> Vec<&'static str> {
    settings
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| *name)
        .collect()
}

fn server_changes(current: &ServerConfig, new: &ServerConfig) -> Vec<&'static str> {
    let ServerConfig {
        listen,
        admin_listen,
        max_body_bytes,
        shutdown_timeout,
        header_read_timeout,
        body_read_timeout,
        idle_timeout,
        max_connections,
        max_header_bytes,
        admin_token,
        tls,
        admin_tls,
        workers,
    } = current;
    names(&[
        ("server.listen", *listen != new.listen),
        ("server.admin_listen", *admin_listen != new.admin_listen),
        (
            "server.max_body_bytes",
            *max_body_bytes != new.max_body_bytes,
        ),
        (
            "server.shutdown_timeout",
            *shutdown_timeout != new.shutdown_timeout,
        ),
        (
            "server.header_read_timeout",
            *header_read_timeout != new.header_read_timeout,
        ),
        (
            "server.body_read_timeout",
            *body_read_timeout != new.body_read_timeout,
        ),
        ("server.workers", *workers != new.workers),
        ("server.idle_timeout", *idle_timeout != new.idle_timeout),
        (
            "server.max_connections",
            *max_connections != new.max_connections,
        ),
        (
            "server.max_header_bytes",
            *max_header_bytes != new.max_header_bytes,
        ),
        // The certificate files are re-read by every reload; TLS on or off is the listener's.
        ("server.tls", tls.is_some() != new.tls.is_some()),
        (
            "server.admin_tls",
            admin_tls.is_some() != new.admin_tls.is_some(),
        ),
        ("server.admin_token_env", *admin_token != new.admin_token),
    ])
}

fn state_changes(current: &StateConfig, new: &StateConfig) -> Vec<&'static str> {
    let StateConfig {
        path,
        flush_interval,
        redis,
    } = current;
    let mut changed = names(&[
        ("state.backend", redis.is_some() != new.redis.is_some()),
        ("state.path", *path != new.path),
        (
            "state.flush_interval",
            *flush_interval != new.flush_interval,
        ),
    ]);
    // Redis settings are compared when both configs use Redis; else `state.backend` said it.
    if let (Some(current), Some(new)) = (redis, &new.redis) {
        changed.extend(redis_changes(current, new));
    }
    changed
}

fn redis_changes(current: &RedisConfig, new: &RedisConfig) -> Vec<&'static str> {
    let RedisConfig {
        url,
        password,
        prefix,
        on_error,
        lease,
    } = current;
    names(&[
        ("state.redis_url", *url != new.url),
        ("state.password_env", *password != new.password),
        ("state.prefix", *prefix != new.prefix),
        ("state.on_error", *on_error != new.on_error),
        ("state.lease", *lease != new.lease),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3";

    fn config(state: &str, keys: &str) -> Config {
        let text = format!("[server]\n[upstream]\nurl = \"http://a\"\n[state]\n{state}\n{keys}");
        Config::parse(&text, "test.toml").expect("valid config")
    }

    #[test]
    fn keys_and_policies_are_applied_and_not_listed() {
        let key = format!(
            "[policies.p]\nconcurrency = 2\n[[keys]]\nname = \"a\"\nsha256 = \"{HASH}\"\npolicy = \"p\"\n"
        );
        assert_eq!(
            changed(&config("", ""), &config("", &key)),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn every_redis_setting_is_named_when_both_configs_use_redis() {
        std::env::set_var("TOLLGATE_RESTART_ONLY_TEST_PW", "secret");
        let current = config("backend = \"redis\"\nredis_url = \"redis://a:6379\"\n", "");
        let new = config(
            "backend = \"redis\"\nredis_url = \"redis://b:6379\"\n\
             password_env = \"TOLLGATE_RESTART_ONLY_TEST_PW\"\nprefix = \"x:\"\n\
             on_error = \"fail_open\"\nlease = \"9s\"\n",
            "",
        );
        assert_eq!(
            changed(&current, &new),
            [
                "state.redis_url",
                "state.password_env",
                "state.prefix",
                "state.on_error",
                "state.lease"
            ]
        );
        assert_eq!(
            changed(&config("", ""), &new),
            ["state.backend"],
            "from local to Redis: the backend, not each of its settings"
        );
    }

    #[test]
    fn telemetry_is_start_only_and_each_changed_key_is_named() {
        let traced = |tail: &str| {
            let text = format!(
                "[server]\n[upstream]\nurl = \"http://a\"\n[telemetry]\notlp_endpoint = \"http://c\"\n{tail}"
            );
            Config::parse(&text, "test.toml").expect("valid config")
        };
        assert_eq!(changed(&config("", ""), &traced("")), ["telemetry"]);
        assert_eq!(changed(&traced(""), &config("", "")), ["telemetry"]);
        assert_eq!(
            changed(
                &traced(""),
                &traced("sample_ratio = 0.5\nservice_name = \"x\"")
            ),
            ["telemetry.service_name", "telemetry.sample_ratio"]
        );
    }

    #[test]
    fn every_ledger_setting_is_named() {
        std::env::set_var("TOLLGATE_RESTART_ONLY_TEST_PG", "postgres://a/usage");
        let ledger = |lines: &str| config("", &format!("[ledger]\n{lines}\n"));
        let current = ledger("postgres_url_env = \"TOLLGATE_RESTART_ONLY_TEST_PG\"");
        let new = ledger(
            "path = \"u.jsonl\"\npostgres_url_env = \"TOLLGATE_RESTART_ONLY_TEST_PG\"\n\
             postgres_table = \"t\"\nspool_path = \"s\"\nreplica = \"r\"",
        );
        assert_eq!(
            changed(&current, &new),
            [
                "ledger.path",
                "ledger.postgres_table",
                "ledger.spool_path",
                "ledger.replica"
            ]
        );
        assert_eq!(
            changed(&config("", ""), &current),
            ["ledger.postgres_url_env"],
            "a ledger table where there was none"
        );
    }
}
