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
    assert_eq!(config.upstream.base_path, "");
    assert_eq!(config.upstream.response_header_timeout.as_secs(), 300);
    assert!(config.upstream.api_key.is_none());
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
