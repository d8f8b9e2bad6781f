//! The config file read and refused: defaults, every validation error with its line, secrets.

use super::raw::defaults;
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
    assert_eq!(config.server.listen, *defaults::listen().get_ref());
    assert_eq!(
        config.server.admin_listen,
        *defaults::admin_listen().get_ref()
    );
    let pool = &config.upstreams[0];
    assert_eq!(&*pool.name, "default");
    assert_eq!(pool.models, ["*"]);
    assert_eq!(pool.endpoints[0].base_path, "");
    assert_eq!(pool.upstream.response_header_timeout.as_secs(), 300);
    assert!(pool.upstream.api_key.is_none());
    assert_eq!(config.server.idle_timeout, Duration::from_secs(300));
    assert_eq!(config.server.max_connections.get(), 10_000);
    assert_eq!(config.server.max_header_bytes, 64 * 1024);
    assert!(config.server.admin_tls.is_none());
}

#[test]
fn connection_limits_out_of_range_are_refused_with_their_line() {
    for (line, key) in [
        ("max_connections = 0", "server.max_connections"),
        ("max_header_bytes = 100", "server.max_header_bytes"),
        ("max_header_bytes = 2000000", "server.max_header_bytes"),
    ] {
        let err = parse(&format!(
            "[server]\n{line}\n[upstream]\nurl = \"http://a\"\n"
        ))
        .expect_err("out of range");
        assert!(
            err.to_string()
                .starts_with(&format!("test.toml:2: {key}: must be between")),
            "{line}: {err}"
        );
    }
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let err =
        parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n[upstream]\nurl = \"http://a\"\n")
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
    let err =
        parse("[server]\n[upstream]\n\nurl = \"ftp://example.com\"\n").expect_err("ftp must fail");
    let msg = err.to_string();
    assert!(msg.starts_with("test.toml:4: upstream.url:"), "{msg}");
}

#[test]
fn workers_default_to_the_cpu_count_and_zero_is_refused() {
    let config = parse("[server]\n[upstream]\nurl = \"http://a\"\n").expect("valid");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(config.server.workers.get(), cpus);
    let config = parse("[server]\nworkers = 3\n[upstream]\nurl = \"http://a\"\n").expect("valid");
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
    let pool = &config.upstreams[0];
    assert_eq!(pool.upstream.idle_timeout, Duration::from_secs(120));
    assert_eq!(pool.endpoints[0].base_path, "/openai");
    assert_eq!(pool.endpoints[0].base_url(), "https://h/openai");
}

const HASH_A: &str = "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3";
const HASH_B: &str = "b3a8e0e1f9ab1bfe3a36f231f676f78bb30a519d2b21e6c530c0eee8ebb4a5d0";

fn with_keys(tail: &str) -> Result<Config, ConfigError> {
    parse(&format!("[server]\n[upstream]\nurl = \"http://a\"\n{tail}"))
}

#[test]
fn keys_take_their_policy_and_override_it() {
    let config = with_keys(&format!(
        "[policies.free]\nconcurrency = 2\nmax_n = 4\nrate = {{ requests = 60, per = \"1m\", burst = 5 }}\n\
         [[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\npolicy = \"free\"\n\
         [[keys]]\nname = \"b\"\nsha256 = \"{HASH_B}\"\npolicy = \"free\"\nconcurrency = 9\nmax_n = 1\n"
    ))
    .expect("keys parse");
    assert_eq!(config.keys[0].limits.max_n.map(NonZeroU32::get), Some(4));
    assert_eq!(
        config.keys[1].limits.max_n.map(NonZeroU32::get),
        Some(1),
        "key overrides policy"
    );
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
        (format!("[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\nmax_n = 0\n"), "keys[0].max_n"),
        (format!("[policies.p]\nmax_n = 0\n[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\n"), "policies.p.max_n"),
        (format!("[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\nrate = {{ requests = 1, per = \"0s\" }}\n"), "per must be longer"),
        (format!("[[keys]]\nname = \"a\"\nsha256 = \"{HASH_A}\"\nrate = {{ requests = 1, per = \"1s\", brust = 2 }}\n"), "brust"),
        (format!("[[keys]]\nname = \"unauthenticated\"\nsha256 = \"{HASH_A}\"\n"), "reserved"),
    ] {
        let err = with_keys(&tail).expect_err(expected);
        assert!(err.to_string().contains(expected), "{expected:?} not in {err}");
    }
}

#[test]
fn state_backend_is_one_of_its_names_and_says_them() {
    let config = parse("[server]\n[upstream]\nurl = \"http://a\"\n[state]\nbackend = \"local\"\n")
        .expect("local");
    assert!(config.state.redis.is_none());
    let err = parse("[server]\n[upstream]\nurl = \"http://a\"\n[state]\nbackend = \"sqlite\"\n")
        .expect_err("no such backend");
    assert_eq!(
        err.to_string(),
        "test.toml:5: state.backend: expected \"local\" or \"redis\", found \"sqlite\""
    );
    let err = parse("[server]\n[upstream]\nurl = \"http://a\"\n[state]\nbackend = \"redis\"\n")
        .expect_err("redis needs its URL");
    assert!(
        err.to_string().starts_with("test.toml:5: state.redis_url:"),
        "{err}"
    );
}

#[test]
fn secret_never_prints() {
    let secret = Secret::new("sk-very-secret".into());
    assert_eq!(format!("{secret:?} {secret}"), "***** *****");
}

// === [[upstreams]] ===

const POOLS: &str = r#"[server]
[[upstreams]]
name = "chat"
models = ["smollm2*", "mock-model"]
endpoints = ["http://127.0.0.1:8001", "http://127.0.0.1:8002/openai"]
balance = "round_robin"
retries = 1
eject_after = 5
eject_for = "30s"
health_check = { path = "/health", interval = "1s", timeout = "500ms" }
[[upstreams]]
name = "rest"
models = ["*"]
endpoints = ["https://api.example.com/openai"]
"#;

#[test]
fn pools_parse_with_their_settings_and_defaults() {
    let config = parse(POOLS).expect("valid pools");
    let [chat, rest] = &config.upstreams[..] else {
        panic!("two pools: {:?}", config.upstreams);
    };
    assert_eq!(&*chat.name, "chat");
    assert_eq!(chat.models, ["smollm2*", "mock-model"]);
    assert_eq!(chat.endpoints[1].label(), "127.0.0.1:8002");
    assert_eq!(chat.endpoints[1].base_url(), "http://127.0.0.1:8002/openai");
    assert_eq!(chat.balance, crate::config::Balance::RoundRobin);
    assert_eq!((chat.retries, chat.eject_after.get()), (1, 5));
    assert_eq!(chat.eject_for, Duration::from_secs(30));
    let check = chat.health_check.as_ref().expect("health check");
    assert_eq!(
        (check.path.as_str(), check.interval, check.timeout),
        (
            "/health",
            Duration::from_secs(1),
            Duration::from_millis(500)
        )
    );
    assert_eq!(rest.balance, crate::config::Balance::LeastRequests);
    assert_eq!((rest.retries, rest.eject_after.get()), (2, 3));
    assert_eq!(rest.eject_for, Duration::from_secs(10));
    assert!(rest.health_check.is_none());
    assert_eq!(rest.endpoints[0].label(), "api.example.com:443");
}

#[test]
fn pool_mistakes_name_the_key_and_line() {
    let cases = [
        (
            format!("{POOLS}[upstream]\nurl = \"http://a\"\n"),
            "not both",
        ),
        ("[server]\n".to_owned(), "no upstream"),
        (
            "[server]\n[[upstreams]]\nname = \"a b\"\nmodels = [\"*\"]\nendpoints = [\"http://a\"]\n"
                .to_owned(),
            "test.toml:3: upstreams[0].name",
        ),
        (
            "[server]\n[[upstreams]]\nname = \"a\"\nmodels = []\nendpoints = [\"http://a\"]\n"
                .to_owned(),
            "test.toml:4: upstreams[0].models",
        ),
        (
            "[server]\n[[upstreams]]\nname = \"a\"\nmodels = [\"*\"]\nendpoints = [\"http://a\", \"http://a:80/x\"]\n"
                .to_owned(),
            "listed twice",
        ),
        (
            "[server]\n[[upstreams]]\nname = \"a\"\nmodels = [\"*\"]\nurl = \"http://a\"\n"
                .to_owned(),
            "test.toml:5: upstreams[0].url",
        ),
        (
            "[server]\n[upstream]\nurl = \"http://a\"\nmodels = [\"x\"]\n".to_owned(),
            "test.toml:4: upstream.models",
        ),
        (
            "[server]\n[[upstreams]]\nname = \"a\"\nmodels = [\"*\"]\nendpoints = [\"ftp://a\"]\n"
                .to_owned(),
            "test.toml:5: upstreams[0].endpoints[0]",
        ),
        (
            "[server]\n[[upstreams]]\nname = \"a\"\nmodels = [\"*\"]\nendpoints = [\"http://a\"]\n\
             [[upstreams]]\nname = \"a\"\nmodels = [\"*\"]\nendpoints = [\"http://b\"]\n"
                .to_owned(),
            "names two pools",
        ),
        (
            "[server]\n[[upstreams]]\nname = \"a\"\nmodels = [\"*\"]\nendpoints = [\"http://a\"]\nbalance = \"random\"\n"
                .to_owned(),
            "upstreams[0].balance",
        ),
    ];
    for (text, expected) in cases {
        let err = parse(&text).expect_err(expected).to_string();
        assert!(err.contains(expected), "{expected:?} not in {err:?}");
    }
}

fn with_ledger(ledger: &str) -> Result<Config, ConfigError> {
    parse(&format!(
        "[server]\n[upstream]\nurl = \"http://a\"\n[state]\npath = \"/var/lib/tg/state.db\"\n[ledger]\n{ledger}\n"
    ))
}

#[test]
fn a_postgres_ledger_reads_its_url_from_the_environment_and_has_defaults() {
    std::env::set_var(
        "TOLLGATE_CONFIG_TEST_LEDGER_URL",
        "postgres://tollgate:hunter2@db.example:5432/usage?sslmode=require",
    );
    let config =
        with_ledger("postgres_url_env = \"TOLLGATE_CONFIG_TEST_LEDGER_URL\"").expect("valid");
    let ledger = config.ledger.expect("a ledger");
    assert_eq!(ledger.path, None, "no file: PostgreSQL only");
    let postgres = ledger.postgres.expect("postgres");
    assert_eq!(postgres.table, "tollgate_usage");
    assert_eq!(
        postgres.spool_path,
        PathBuf::from("/var/lib/tg/ledger-spool"),
        "beside the state"
    );
    assert!(!postgres.replica.is_empty(), "the host name");
    assert!(
        !format!("{postgres:?}").contains("hunter2"),
        "the URL's password never prints"
    );
}

#[test]
fn ledger_mistakes_are_named_without_showing_the_url() {
    std::env::set_var(
        "TOLLGATE_CONFIG_TEST_NOT_A_URL",
        "mysql://root:hunter2@db/usage",
    );
    std::env::remove_var("TOLLGATE_CONFIG_TEST_UNSET");
    for (ledger, expected) in [
        ("", "[ledger] needs path (a JSONL file), postgres_url_env (a PostgreSQL table), or both"),
        (
            "postgres_url_env = \"TOLLGATE_CONFIG_TEST_UNSET\"",
            "test.toml:7: ledger.postgres_url_env: environment variable TOLLGATE_CONFIG_TEST_UNSET is not set",
        ),
        (
            "postgres_url_env = \"TOLLGATE_CONFIG_TEST_NOT_A_URL\"",
            "does not hold a postgres:// or postgresql:// URL",
        ),
        (
            "postgres_url_env = \"TOLLGATE_CONFIG_TEST_NOT_A_URL\"\npostgres_table = \"x\"",
            "does not hold",
        ),
    ] {
        let error = with_ledger(ledger).expect_err("refused").to_string();
        assert!(error.contains(expected), "{ledger:?}: {error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
    std::env::set_var("TOLLGATE_CONFIG_TEST_GOOD_URL", "postgres://db/usage");
    for (line, key) in [
        (
            "postgres_table = \"Usage; DROP TABLE x\"",
            "ledger.postgres_table",
        ),
        ("replica = \" \"", "ledger.replica"),
    ] {
        let error = with_ledger(&format!(
            "postgres_url_env = \"TOLLGATE_CONFIG_TEST_GOOD_URL\"\n{line}"
        ))
        .expect_err("refused")
        .to_string();
        assert!(
            error.starts_with(&format!("test.toml:8: {key}:")),
            "{error}"
        );
    }
}

#[test]
fn prices_groups_and_calendar_windows_are_read_exactly() {
    let config = with_keys(&format!(
        "[pricing]\ncurrency = \"EUR\"\nmodels = [\n  {{ model = \"poolside-malibu*\", prompt = 3.00, completion = 15.00 }},\n  {{ model = \"*\", prompt = 0.1, completion = 1.5 }},\n]\n\
         [groups.team-a]\nquotas = [ {{ cost = 500.0, per = \"month\" }}, {{ tokens = 50000000, per = \"1d\" }} ]\n\
         concurrency = 64\nrate = {{ requests = 6000, per = \"1m\" }}\n\
         [policies.dev]\ngroup = \"team-a\"\n\
         [[keys]]\nname = \"alice\"\nsha256 = \"{HASH_A}\"\ngroup = \"team-a\"\nmax_tokens = 10\n\
         quotas = [ {{ cost = 20.1, per = \"month\" }}, {{ tokens = 100000, per = \"1h\" }}, {{ tokens = 5, per = \"week\" }} ]\n\
         [[keys]]\nname = \"bob\"\nsha256 = \"{HASH_B}\"\npolicy = \"dev\"\nmax_tokens = 10\n"
    ))
    .expect("the issue's config");
    let pricing = &config.budgets.pricing;
    assert_eq!(pricing.currency, "EUR");
    assert_eq!(
        pricing
            .price("poolside-malibu-2")
            .map(|p| (p.prompt, p.completion)),
        Some((3_000, 15_000))
    );
    assert_eq!(
        pricing.price("m").map(|p| (p.prompt, p.completion)),
        Some((100, 1_500)),
        "0.1 per million is exactly 100 nano-units per token"
    );
    let alice = &config.keys[0].limits;
    assert_eq!(alice.group.as_deref(), Some("team-a"));
    assert_eq!(
        alice.quotas,
        [
            Quota {
                limit: 20_100_000_000,
                unit: Unit::Cost,
                per: Period::Month
            },
            Quota::tokens(100_000, Duration::from_secs(3600)),
            Quota {
                limit: 5,
                unit: Unit::Tokens,
                per: Period::Week
            },
        ]
    );
    assert_eq!(
        config.keys[1].limits.group.as_deref(),
        Some("team-a"),
        "by policy"
    );
    let group = &config.budgets.groups[0];
    assert_eq!(group.concurrency.map(|c| c.get()), Some(64));
    assert_eq!(group.quotas[0].limit, 500_000_000_000);
}

#[test]
fn budget_mistakes_are_refused_naming_what_is_wrong() {
    let key = |extra: &str| {
        format!("[[keys]]\nname = \"alice\"\nsha256 = \"{HASH_A}\"\nmax_tokens = 10\n{extra}\n")
    };
    let star = "[pricing]\nmodels = [ { model = \"*\", prompt = 1, completion = 1 } ]\n";
    for (tail, expected) in [
        (
            "[pricing]\nmodels = [ { model = \"*\", prompt = 0.0005, completion = 1 } ]\n".to_owned(),
            "test.toml:5: pricing.models[0].prompt: \"0.0005\" has more than 3 decimals",
        ),
        (
            key("quotas = [ { cost = 1.0, per = \"month\" } ]"),
            "keys[0] (alice) has a cost quota (its own or its group's) and may use any model",
        ),
        (
            format!(
                "[pricing]\nmodels = [ {{ model = \"gpt-4o*\", prompt = 1, completion = 1 }} ]\n{}",
                key("models = [\"gpt-4o-mini\", \"llama*\"]\nquotas = [ { cost = 1.0, per = \"week\" } ]")
            ),
            "may use the model \"llama*\", which no [pricing] entry prices",
        ),
        (
            format!("{star}[groups.g]\nquotas = [ {{ cost = 1.0, per = \"month\" }} ]\n{}", key("group = \"g\"\nmodels = [\"x\"]")),
            "",
        ),
        (
            key("group = \"nope\""),
            "keys[0].group: no group named \"nope\"",
        ),
        (
            format!("{star}{}", key("quotas = [ { cost = 1.0, tokens = 5, per = \"month\" } ]")),
            "each quota is { tokens = N, per = W } or { cost = X, per = W }",
        ),
        (
            format!("{star}{}", key("quotas = [ { cost = 1.0, per = \"fortnight\" } ]")),
            "\"fortnight\": expected a duration (\"1h\", \"30d\"), \"week\" or \"month\"",
        ),
        (
            format!("{star}{}", key("quotas = [ { cost = 1.0, per = \"month\" }, { cost = 2.0, per = \"month\" } ]")),
            "two cost quotas over the same window (month)",
        ),
        (
            "[groups.g]\nquotas = [ { tokens = 5, per = \"1h\" } ]\n[[keys]]\nname = \"a\"\nsha256 = \"a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3\"\ngroup = \"g\"\n".to_owned(),
            "its group \"g\" has quotas, so the key needs max_tokens",
        ),
    ] {
        let result = with_keys(&tail);
        if expected.is_empty() {
            result.expect("a group's cost quota with every model of the key priced");
            continue;
        }
        let err = result.expect_err(expected);
        assert!(err.to_string().contains(expected), "{expected:?} not in {err}");
    }
}

#[test]
fn model_patterns_are_exact_prefix_or_any() {
    use crate::config::model_matches;
    assert!(model_matches("mock-model", "mock-model"));
    assert!(!model_matches("mock-model", "mock-model-2"));
    assert!(model_matches("smollm2*", "smollm2-135m"));
    assert!(!model_matches("smollm2*", "llama"));
    assert!(model_matches("*", "anything"));
}

/// A key of the admin API is refused in the file's words, without the file's place: the
/// message of a `[[keys]]` entry with the same fields, less `test.toml:LINE: keys[0].`.
#[test]
fn api_key_fields_get_the_messages_the_file_gets() {
    let head = "[server]\n[upstream]\nurl = \"http://a\"\n[policies.small]\nmax_tokens = 100\n";
    let policies = parse(head).expect("policies parse").policies;
    let hash = "ab".repeat(32);
    for (toml, json) in [
        ("max_tokens = 0", serde_json::json!({"max_tokens": 0})),
        ("max_tokens = \"4\"", serde_json::json!({"max_tokens": "4"})),
        ("max_tokens = -1", serde_json::json!({"max_tokens": -1})),
        ("concurrency = 1.5", serde_json::json!({"concurrency": 1.5})),
        ("policy = \"big\"", serde_json::json!({"policy": "big"})),
        ("group = \"team\"", serde_json::json!({"group": "team"})),
        ("models = \"gpt\"", serde_json::json!({"models": "gpt"})),
        (
            "rate = { requests = 0, per = \"1m\" }",
            serde_json::json!({"rate": {"requests": 0, "per": "1m"}}),
        ),
        (
            "rate = { requests = 5, per = \"soon\" }",
            serde_json::json!({"rate": {"requests": 5, "per": "soon"}}),
        ),
        (
            "quotas = [{ tokens = 10, per = \"1d\" }]",
            serde_json::json!({"quotas": [{"tokens": 10, "per": "1d"}]}),
        ),
        (
            "quotas = [{ tokens = 10, per = \"1d\", extra = 1 }]\nmax_tokens = 5",
            serde_json::json!({"quotas": [{"tokens": 10, "per": "1d", "extra": 1}], "max_tokens": 5}),
        ),
    ] {
        let file = format!("{head}[[keys]]\nname = \"k\"\nsha256 = \"{hash}\"\n{toml}\n");
        let from_file = parse(&file).expect_err(toml).to_string();
        let fields = json.as_object().expect("object").clone();
        let from_api = policies
            .resolve("k", &fields, &[[0xab; 32]])
            .expect_err(toml)
            .to_string();
        let (_, tail) = from_file
            .split_once("keys[0].")
            .unwrap_or_else(|| panic!("{toml}: {from_file}"));
        assert_eq!(from_api, tail, "{toml}: the file says {from_file:?}");
    }
    let bad_name = policies
        .resolve("two words", &serde_json::Map::new(), &[[1; 32]])
        .expect_err("a name the file refuses");
    assert_eq!(
        bad_name.to_string(),
        "name: \"two words\": use 1-64 letters, digits, '-', '_' or '.'"
    );
    let fine = serde_json::json!({"policy": "small", "concurrency": 2, "max_tokens": null});
    let key = policies
        .resolve("k", fine.as_object().expect("object"), &[[1; 32]])
        .expect("valid fields resolve");
    assert_eq!(
        key.limits.max_tokens.map(|m| m.get()),
        Some(100),
        "the policy's"
    );
    assert_eq!(
        key.limits.concurrency.map(|c| c.get()),
        Some(2),
        "the key's own"
    );
}
