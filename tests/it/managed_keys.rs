//! Keys made, changed, rotated and revoked at run time through the admin API: on one gateway
//! (local state, kept in a file beside the state file), on replicas sharing a real Redis, after
//! restarts, through `tollgate keys`, and with no token or hash anywhere but the one answer that
//! hands a token out.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mock_upstream::MockUpstream;
use serde_json::{json, Value};
use tollgate::state::clock::Clock;
use tollgate::{Config, ServerOptions};

use crate::common::redis_server::RedisServer;
use crate::common::{self, TestGateway};

const ADMIN_TOKEN: &str = "managed-keys-admin-token-0123456789";
const ADMIN_TOKEN_ENV: &str = "TOLLGATE_MANAGED_KEYS_TEST_ADMIN_TOKEN";
const CHAT: &str = "/v1/chat/completions";
const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// A config with the admin API on, a `[policies.small]`, the test key `test` from the file,
/// and `state` in place of the shared helper's local state section when given.
fn config(upstream: &MockUpstream, state: Option<&str>) -> String {
    std::env::set_var(ADMIN_TOKEN_ENV, ADMIN_TOKEN);
    let toml = common::config_toml(
        &upstream.url(),
        &format!("admin_token_env = \"{ADMIN_TOKEN_ENV}\""),
        "",
        "[policies.small]\nmax_tokens = 20\nconcurrency = 4\n",
    );
    match state {
        Some(state) => {
            // The helper's `[state]` runs up to the test key's `[[keys]]`.
            let start = toml.find("[state]").expect("state section");
            let end = start + toml[start..].find("[[keys]]").expect("the test key");
            format!("{}{state}\n{}", &toml[..start], &toml[end..])
        }
        None => toml,
    }
}

fn redis_state(redis: &RedisServer, prefix: &str) -> String {
    format!(
        "[state]\nbackend = \"redis\"\nredis_url = \"{}\"\nprefix = \"{prefix}\"\non_error = \"fail_open\"\n",
        redis.url()
    )
}

/// One admin call: status and JSON answer (`null` for none).
async fn admin(
    gateway: &TestGateway,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    admin_at(&gateway.admin_url(), method, path, body).await
}

async fn admin_at(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut request = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("admin request");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("admin answer");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("admin answers JSON")
    };
    (status, value)
}

/// Makes `name` with `fields`; its token.
async fn create(gateway: &TestGateway, name: &str, fields: Value) -> String {
    let mut body = fields;
    body["name"] = name.into();
    let (status, answer) = admin(gateway, "POST", "/admin/keys", Some(body)).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["name"], name);
    let token = answer["key"].as_str().expect("the new key").to_owned();
    assert!(token.starts_with("tg-") && token.len() == 51, "{token}");
    token
}

/// The status of a chat request with `token` on the client port at `url`, asking for
/// `max_tokens` when given.
async fn chat_status(url: &str, token: &str, max_tokens: Option<u32>) -> u16 {
    let body = match max_tokens {
        Some(max) => {
            json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max})
        }
        None => json!({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}),
    };
    common::client_with_key(token)
        .post(format!("{url}{CHAT}"))
        .json(&body)
        .send()
        .await
        .expect("chat request")
        .status()
        .as_u16()
}

/// Polls until the chat status of `token` is `want`, for at most `bound`; how long it took, or
/// `None`. A bound against a hang, with room for a loaded machine: the figure is printed, not
/// asserted.
async fn until_status(url: &str, token: &str, want: u16, bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < bound {
        if chat_status(url, token, None).await == want {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn a_managed_key_lives_from_creation_through_patch_and_rotation_to_revocation() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let clock = Clock::manual();
    let parsed = Config::parse(&config(&upstream, None), "test.toml").expect("config");
    let options = ServerOptions {
        config_path: None,
        clock: clock.clone(),
    };
    let gateway = TestGateway::start_with(parsed, options).await;
    let url = gateway.url();

    let first = create(
        &gateway,
        "dev-1",
        json!({"max_tokens": 50, "quotas": [{"tokens": 100000, "per": "1d"}]}),
    )
    .await;
    assert_eq!(
        chat_status(&url, &first, None).await,
        200,
        "the key works at once"
    );
    assert_eq!(
        chat_status(&url, &first, Some(100)).await,
        400,
        "over its cap of 50"
    );
    let (_, before) = admin(&gateway, "GET", "/admin/keys/dev-1", None).await;
    let used = before["windows"][0]["used"].as_u64().expect("window used");
    assert!(used > 0, "the request was charged: {before}");

    let (status, patched) = admin(
        &gateway,
        "PATCH",
        "/admin/keys/dev-1",
        Some(json!({"max_tokens": 200, "models": ["mock-*"]})),
    )
    .await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["source"], "api");
    assert_eq!(patched["limits"]["max_tokens"], 200);
    assert_eq!(patched["limits"]["models"], json!(["mock-*"]));
    assert_eq!(
        patched["windows"][0]["used"].as_u64(),
        Some(used),
        "the quota window keeps its usage across the patch"
    );
    assert_eq!(
        chat_status(&url, &first, Some(100)).await,
        200,
        "the new cap applies"
    );

    let (status, rotated) = admin(
        &gateway,
        "POST",
        "/admin/keys/dev-1/rotate",
        Some(json!({"grace": "1h"})),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let second = rotated["key"].as_str().expect("the new key").to_owned();
    assert_ne!(second, first);
    assert!(rotated["previous_key_valid_until"].is_string(), "{rotated}");
    assert_eq!(
        chat_status(&url, &second, None).await,
        200,
        "the new key works at once"
    );
    assert_eq!(
        chat_status(&url, &first, None).await,
        200,
        "the old one during its grace"
    );
    clock.advance(Duration::from_secs(3600));
    assert_eq!(
        chat_status(&url, &first, None).await,
        401,
        "the grace has ended"
    );
    assert_eq!(
        chat_status(&url, &second, None).await,
        200,
        "the new key works on"
    );

    let (status, rotated) = admin(&gateway, "POST", "/admin/keys/dev-1/rotate", None).await;
    assert_eq!(status, 200, "{rotated}");
    assert!(
        rotated["previous_key_valid_until"].is_null(),
        "no grace by default"
    );
    let third = rotated["key"].as_str().expect("the new key").to_owned();
    assert_eq!(
        chat_status(&url, &second, None).await,
        401,
        "no grace: refused at once"
    );

    let (status, gone) = admin(&gateway, "DELETE", "/admin/keys/dev-1", None).await;
    assert_eq!((status, gone), (204, Value::Null));
    assert_eq!(
        chat_status(&url, &third, None).await,
        401,
        "revoked: refused"
    );
    let (status, missing) = admin(&gateway, "GET", "/admin/keys/dev-1", None).await;
    assert_eq!(status, 404);
    assert_eq!(missing["code"], "key-not-found");
    let (status, _) = admin(&gateway, "DELETE", "/admin/keys/dev-1", None).await;
    assert_eq!(status, 404, "revoked once");
}

#[tokio::test]
async fn config_file_keys_are_read_only_and_names_are_taken_once() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&config(&upstream, None)).await;
    for (method, path, body) in [
        ("PATCH", "/admin/keys/test", Some(json!({"max_tokens": 5}))),
        ("POST", "/admin/keys/test/rotate", None),
        ("DELETE", "/admin/keys/test", None),
        ("POST", "/admin/keys", Some(json!({"name": "test"}))),
    ] {
        let (status, answer) = admin(&gateway, method, path, body).await;
        assert_eq!(status, 409, "{method} {path}: {answer}");
        assert_eq!(answer["code"], "defined-in-config", "{method} {path}");
    }
    assert_eq!(
        chat_status(&gateway.url(), common::TEST_KEY, Some(100)).await,
        200,
        "the file's key is unchanged"
    );

    create(&gateway, "dev-2", json!({"policy": "small"})).await;
    let (status, answer) = admin(
        &gateway,
        "POST",
        "/admin/keys",
        Some(json!({"name": "dev-2"})),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["code"], "key-exists");

    let (_, all) = admin(&gateway, "GET", "/admin/keys", None).await;
    let sources: Vec<(&str, &str)> = all["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            (
                k["name"].as_str().unwrap_or(""),
                k["source"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(sources, [("dev-2", "api"), ("test", "config")]);
    let dev = &all["keys"][0];
    assert_eq!(dev["limits"]["max_tokens"], 20, "from the policy");
    assert_eq!(dev["definition"], json!({"policy": "small"}));

    let (status, answer) = admin(&gateway, "PUT", "/admin/keys/dev-2", None).await;
    assert_eq!(status, 405, "{answer}");
}

/// The message the config file gets for a `[[keys]]` entry with `toml`, without its place.
fn file_message(upstream: &MockUpstream, toml: &str) -> Option<String> {
    let entry = common::key_entry("bad", "tg-bad", toml);
    let text = format!("{}{entry}", config(upstream, None));
    let error = Config::parse(&text, "test.toml").err()?.to_string();
    Some(error.split_once("keys[1].")?.1.to_owned())
}

#[tokio::test]
async fn invalid_bodies_are_refused_with_the_config_files_messages() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&config(&upstream, None)).await;
    for (toml, fields) in [
        ("max_tokens = 0", json!({"max_tokens": 0})),
        ("concurrency = \"4\"", json!({"concurrency": "4"})),
        ("policy = \"huge\"", json!({"policy": "huge"})),
        (
            "rate = { requests = 10, per = \"0s\" }",
            json!({"rate": {"requests": 10, "per": "0s"}}),
        ),
        (
            "quotas = [{ tokens = 5, per = \"1d\" }]",
            json!({"quotas": [{"tokens": 5, "per": "1d"}]}),
        ),
        ("models = [1]", json!({"models": [1]})),
        // `group` is a key field once groups exist; until then the file and the API refuse
        // it alike, and once they do, accept (or refuse) it alike.
        ("group = \"team-a\"", json!({"group": "team-a"})),
    ] {
        let mut body = fields;
        body["name"] = "bad".into();
        let (status, answer) = admin(&gateway, "POST", "/admin/keys", Some(body)).await;
        match file_message(&upstream, toml) {
            Some(message) => {
                assert_eq!(status, 400, "{toml}: {answer}");
                assert_eq!(answer["detail"], message, "{toml}");
            }
            None => {
                assert_eq!(
                    status, 201,
                    "{toml}: the file takes it, and so does the API"
                );
                admin(&gateway, "DELETE", "/admin/keys/bad", None).await;
            }
        }
    }
    let (status, _) = admin(&gateway, "GET", "/admin/keys/bad", None).await;
    assert_eq!(status, 404, "nothing refused was stored");

    for (body, message) in [
        (json!({"max_tokens": 5}), "missing field `name`"),
        (
            json!({"name": "two words"}),
            "name: \"two words\": use 1-64 letters, digits, '-', '_' or '.'",
        ),
        (
            json!({"name": "unauthenticated"}),
            "name: \"unauthenticated\" is reserved for requests without a valid key",
        ),
        (json!([1]), "the body must be a JSON object, found an array"),
    ] {
        let (status, answer) = admin(&gateway, "POST", "/admin/keys", Some(body)).await;
        assert_eq!((status, answer["detail"].as_str()), (400, Some(message)));
    }
    let hash = "ab".repeat(32);
    let (status, answer) = admin(
        &gateway,
        "POST",
        "/admin/keys",
        Some(json!({"name": "x", "sha256": hash})),
    )
    .await;
    assert_eq!(status, 400, "a hash is the gateway's to set: {answer}");

    create(&gateway, "dev-3", json!({"max_tokens": 10})).await;
    let (status, answer) = admin(
        &gateway,
        "PATCH",
        "/admin/keys/dev-3",
        Some(json!({"max_tokens": -3})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        answer["detail"],
        "max_tokens: expected an integer from 0 to 4294967295, found the integer -3"
    );
    let (status, answer) = admin(
        &gateway,
        "POST",
        "/admin/keys/dev-3/rotate",
        Some(json!({"grace": "soon"})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let (_, kept) = admin(&gateway, "GET", "/admin/keys/dev-3", None).await;
    assert_eq!(
        kept["limits"]["max_tokens"], 10,
        "a refused change changes nothing"
    );
}

#[tokio::test]
async fn managed_keys_survive_a_restart_in_the_file_beside_the_state() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let toml = config(&upstream, None);
    let mut gateway = TestGateway::start_toml(&toml).await;
    let token = create(&gateway, "dev-4", json!({"concurrency": 3})).await;
    let revoked = create(&gateway, "dev-5", json!({})).await;
    admin(&gateway, "DELETE", "/admin/keys/dev-5", None).await;
    gateway.begin_shutdown().await.expect("shut down");

    let state_line = toml
        .lines()
        .find(|l| l.starts_with("path = "))
        .expect("state path");
    let state_path = state_line.trim_start_matches("path = ").trim_matches('"');
    let file = std::path::Path::new(state_path).with_extension("keys.json");
    let stored = std::fs::read_to_string(&file).expect("the managed keys file");
    assert!(
        stored.contains("\"dev-4\"") && !stored.contains("\"dev-5\""),
        "{stored}"
    );

    let again = TestGateway::start_toml(&toml).await;
    assert_eq!(
        chat_status(&again.url(), &token, None).await,
        200,
        "kept across the restart"
    );
    assert_eq!(
        chat_status(&again.url(), &revoked, None).await,
        401,
        "revoked stays revoked"
    );
    let (_, key) = admin(&again, "GET", "/admin/keys/dev-4", None).await;
    assert_eq!(
        (
            key["source"].as_str(),
            key["limits"]["concurrency"].as_u64()
        ),
        (Some("api"), Some(3))
    );
}

#[tokio::test]
async fn replicas_sharing_redis_accept_and_refuse_a_key_within_a_second_and_a_new_one_loads_them() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let toml = config(&upstream, Some(&redis_state(&redis, "mk1:")));
    let one = TestGateway::start_toml(&toml).await;
    let two = TestGateway::start_toml(&toml).await;
    // The bound leaves room for a loaded machine; the figure itself is printed.
    let bound = Duration::from_secs(3);

    let token = create(&one, "dev-6", json!({"max_tokens": 30})).await;
    let accepted = until_status(&two.url(), &token, 200, bound).await;
    assert!(accepted.is_some(), "created on one, accepted on two");
    let (_, shown) = admin(&two, "GET", "/admin/keys/dev-6", None).await;
    assert_eq!(
        (
            shown["source"].as_str(),
            shown["limits"]["max_tokens"].as_u64()
        ),
        (Some("api"), Some(30))
    );

    let (status, rotated) = admin(&two, "POST", "/admin/keys/dev-6/rotate", None).await;
    assert_eq!(status, 200);
    let rotated = rotated["key"].as_str().expect("key").to_owned();
    assert!(
        until_status(&one.url(), &rotated, 200, bound)
            .await
            .is_some(),
        "rotated on two, the new key works on one"
    );
    assert!(
        until_status(&one.url(), &token, 401, bound).await.is_some(),
        "and the old one is refused there"
    );

    let three = TestGateway::start_toml(&toml).await;
    assert_eq!(
        chat_status(&three.url(), &rotated, None).await,
        200,
        "a replica that starts loads them all"
    );

    let (status, _) = admin(&one, "DELETE", "/admin/keys/dev-6", None).await;
    assert_eq!(status, 204);
    let refused = until_status(&two.url(), &rotated, 401, bound).await;
    assert!(refused.is_some(), "revoked on one, refused on two");
    eprintln!(
        "managed key seen by another replica: created after {:?}, revoked after {:?}",
        accepted.unwrap_or_default(),
        refused.unwrap_or_default()
    );
}

#[tokio::test]
async fn a_change_whose_notification_was_missed_arrives_with_the_resync() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let toml = config(&upstream, Some(&redis_state(&redis, "mk2:")));
    let one = TestGateway::start_toml(&toml).await;
    let token = create(&one, "dev-7", json!({})).await;
    let record = {
        let mut conn = redis.client().get_connection().expect("redis");
        let record: String = redis::cmd("HGET")
            .arg("mk2:managed_keys")
            .arg("dev-7")
            .query(&mut conn)
            .expect("stored");
        let copy = record.replace("\"dev-7\"", "\"dev-8\"");
        // Written as another tool might: no notification, only the change number.
        redis::cmd("HSET")
            .arg("mk2:managed_keys")
            .arg("dev-8")
            .arg(&copy)
            .query::<i64>(&mut conn)
            .expect("hset");
        redis::cmd("INCR")
            .arg("mk2:managed_keys:version")
            .query::<i64>(&mut conn)
            .expect("incr");
        record
    };
    assert!(!record.contains(&token), "the record holds no token");
    let (status, _) = admin(&one, "GET", "/admin/keys/dev-8", None).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = status == 200;
    while !found && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        found = admin(&one, "GET", "/admin/keys/dev-8", None).await.0 == 200;
    }
    assert!(
        found,
        "the periodic resync read the change no one announced"
    );
}

#[tokio::test]
async fn replicas_keep_their_managed_keys_while_redis_is_away_and_give_them_back() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let toml = config(&upstream, Some(&redis_state(&redis, "mk3:")));
    let one = TestGateway::start_toml(&toml).await;
    let token = create(&one, "dev-9", json!({"concurrency": 2})).await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        chat_status(&one.url(), &token, None).await,
        200,
        "kept (fail_open) while Redis is away"
    );
    let (status, answer) =
        admin(&one, "POST", "/admin/keys", Some(json!({"name": "dev-10"}))).await;
    assert_eq!(
        status, 503,
        "a change that cannot be stored is not made: {answer}"
    );

    // Back empty (no persistence): the replica writes back what it knows.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = false;
    while !back && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(mut conn) = redis.client().get_connection() else {
            continue;
        };
        back = redis::cmd("HEXISTS")
            .arg("mk3:managed_keys")
            .arg("dev-9")
            .query::<bool>(&mut conn)
            .unwrap_or(false);
    }
    assert!(back, "the managed key is in Redis again");
    let two = TestGateway::start_toml(&toml).await;
    assert_eq!(
        chat_status(&two.url(), &token, None).await,
        200,
        "and a new replica loads it"
    );
}

/// A gateway in its own process (so that its log can be read), on fixed free ports.
struct Child {
    child: std::process::Child,
    url: String,
    admin_url: String,
    _config: tempfile::NamedTempFile,
}

impl Child {
    fn start(upstream: &MockUpstream) -> Child {
        let (port, admin_port) = (common::closed_port(), common::closed_port());
        let toml = config(upstream, None)
            .replace(
                "admin_listen = \"127.0.0.1:0\"",
                &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
            )
            .replace(
                "\nlisten = \"127.0.0.1:0\"",
                &format!("\nlisten = \"127.0.0.1:{port}\""),
            );
        let file = tempfile::NamedTempFile::new().expect("config file");
        std::fs::write(file.path(), toml).expect("write config");
        let child = Command::new(BIN)
            .args(["--log-format", "json", "serve", "--config"])
            .arg(file.path())
            .env(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gateway");
        Child {
            child,
            url: format!("http://127.0.0.1:{port}"),
            admin_url: format!("http://127.0.0.1:{admin_port}"),
            _config: file,
        }
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if reqwest::get(format!("{}/healthz", self.admin_url))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the gateway did not start");
    }

    /// Stops it (SIGTERM) and returns everything it logged.
    async fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        tokio::task::spawn_blocking(move || {
            let _ = self.child.wait();
            let mut log = String::new();
            if let Some(mut out) = self.child.stdout.take() {
                let _ = std::io::Read::read_to_string(&mut out, &mut log);
            }
            if let Some(mut err) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut log);
            }
            log
        })
        .await
        .expect("join")
    }
}

/// Every token and the hex of its SHA-256: what must never appear.
fn secrets(tokens: &[&str]) -> Vec<String> {
    tokens
        .iter()
        .flat_map(|t| {
            [
                t.to_string(),
                hex::encode(tollgate::keys::hash_token(t.as_bytes())),
            ]
        })
        .collect()
}

#[tokio::test]
async fn no_token_or_hash_appears_in_any_log_metric_or_answer_but_the_one_that_hands_it_out() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = Child::start(&upstream);
    gateway.wait_ready().await;
    let base = gateway.admin_url.clone();
    let mut seen = String::new();
    let call = |method: &'static str, path: String, body: Option<Value>| {
        let base = base.clone();
        async move { admin_at(&base, method, &path, body).await }
    };

    let (status, created) = call(
        "POST",
        "/admin/keys".into(),
        Some(json!({"name": "dev-11", "max_tokens": 40})),
    )
    .await;
    assert_eq!(status, 201);
    let first = created["key"].as_str().expect("key").to_owned();
    assert_eq!(chat_status(&gateway.url, &first, None).await, 200);
    assert_eq!(chat_status(&gateway.url, &first, Some(400)).await, 400);
    for (method, path, body) in [
        (
            "PATCH",
            "/admin/keys/dev-11",
            Some(json!({"concurrency": 2})),
        ),
        (
            "PATCH",
            "/admin/keys/dev-11",
            Some(json!({"concurrency": 0})),
        ),
        ("GET", "/admin/keys", None),
    ] {
        let (_, answer) = call(method, path.into(), body).await;
        seen.push_str(&answer.to_string());
    }
    let (_, rotated) = call(
        "POST",
        "/admin/keys/dev-11/rotate".into(),
        Some(json!({"grace": "1h"})),
    )
    .await;
    let second = rotated["key"].as_str().expect("key").to_owned();
    for token in [&first, &second] {
        assert_eq!(chat_status(&gateway.url, token, None).await, 200);
    }
    for path in [
        "/admin/keys/dev-11",
        "/admin/requests",
        "/admin/stats?seconds=5",
    ] {
        seen.push_str(&call("GET", path.into(), None).await.1.to_string());
    }
    let (status, _) = call("DELETE", "/admin/keys/dev-11".into(), None).await;
    assert_eq!(status, 204);
    let refused = common::client_with_key(&second)
        .post(format!("{}{CHAT}", gateway.url))
        .json(&json!({"model": "mock-model", "messages": []}))
        .send()
        .await
        .expect("refused request");
    assert_eq!(refused.status(), 401);
    seen.push_str(&refused.text().await.expect("body"));
    seen.push_str(
        &reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text"),
    );
    let log = gateway.stop().await;

    for secret in secrets(&[&first, &second]) {
        assert!(
            !seen.contains(&secret),
            "an answer or a metric shows {secret}"
        );
        assert!(!log.contains(&secret), "the log shows {secret}");
    }
    let audit: Vec<Value> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["target"] == "tollgate::audit")
        .collect();
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|l| {
            (
                l["fields"]["action"]
                    .as_str()
                    .or(l["action"].as_str())
                    .unwrap_or("?"),
                l["fields"]["key"]
                    .as_str()
                    .or(l["key"].as_str())
                    .unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("create", "dev-11"),
            ("update", "dev-11"),
            ("rotate", "dev-11"),
            ("revoke", "dev-11")
        ],
        "one audit line per change made: {audit:#?}"
    );
    assert!(
        audit.iter().all(|l| l.to_string().contains("127.0.0.1:")),
        "each names its source: {audit:#?}"
    );
}

/// Runs `tollgate keys ARGS --admin URL` with the admin token; (success, stdout, stderr).
fn cli(admin_url: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(BIN)
        .arg("keys")
        .args(args)
        .args(["--admin", admin_url])
        .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .expect("run tollgate keys");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn tollgate_keys_manages_the_keys_of_a_running_gateway() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start_toml(&config(&upstream, None)).await;
    let admin_url = gateway.admin_url();
    let run = |args: Vec<&str>| {
        let admin_url = admin_url.clone();
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&admin_url, &args)
        })
    };

    let (ok, stdout, stderr) = run(vec![
        "create", "dev-12", "--policy", "small", "--rate", "60/1m", "--quota", "10000/1d",
        "--models", "mock-*",
    ])
    .await
    .expect("join");
    assert!(ok, "{stderr}");
    let token = stdout.trim().to_owned();
    assert!(
        token.starts_with("tg-") && !stdout.trim().contains('\n'),
        "the key alone on stdout: {stdout:?}"
    );
    assert!(!stderr.contains(&token), "and only there");
    assert_eq!(chat_status(&gateway.url(), &token, None).await, 200);
    assert_eq!(
        chat_status(&gateway.url(), &token, Some(25)).await,
        400,
        "the policy's cap of 20"
    );

    let (ok, stdout, _) = run(vec!["list"]).await.expect("join");
    assert!(ok);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("dev-12"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        line.contains("api") && line.contains("mock-*") && line.contains("10000/1d"),
        "{line}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("test ") && l.contains("config")),
        "{stdout}"
    );

    let (ok, stdout, stderr) = run(vec![
        "update",
        "dev-12",
        "--max-tokens",
        "50",
        "--unset",
        "rate",
    ])
    .await
    .expect("join");
    assert!(ok, "{stderr}");
    let updated: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        (
            updated["limits"]["max_tokens"].as_u64(),
            &updated["limits"]["rate"]
        ),
        (Some(50), &Value::Null)
    );

    let (ok, stdout, stderr) = run(vec!["rotate", "dev-12", "--grace", "1h"])
        .await
        .expect("join");
    assert!(ok, "{stderr}");
    let rotated = stdout.trim().to_owned();
    assert!(rotated.starts_with("tg-") && rotated != token);
    assert!(stderr.contains("the old key works until"), "{stderr}");
    for key in [&token, &rotated] {
        assert_eq!(chat_status(&gateway.url(), key, None).await, 200);
    }

    let (ok, stdout, _) = run(vec!["show", "dev-12"]).await.expect("join");
    assert!(ok);
    let shown: Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(shown["previous_key_valid_until"].is_string(), "{shown}");
    assert!(!stdout.contains(&rotated) && !stdout.contains(&token));

    let (ok, _, stderr) = run(vec!["create", "dev-12"]).await.expect("join");
    assert!(
        !ok && stderr.contains("409") && stderr.contains("exists"),
        "{stderr}"
    );
    let (ok, _, stderr) = run(vec!["create", "dev-13", "--max-n", "0"])
        .await
        .expect("join");
    assert!(
        !ok && stderr.contains("max_n: must be at least 1"),
        "the config's message: {stderr}"
    );

    let (ok, _, stderr) = run(vec!["revoke", "dev-12"]).await.expect("join");
    assert!(ok, "{stderr}");
    for key in [&token, &rotated] {
        assert_eq!(chat_status(&gateway.url(), key, None).await, 401);
    }
    let output = Command::new(BIN)
        .args(["keys", "list", "--admin", &admin_url])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("TOLLGATE_ADMIN_TOKEN"));
}

#[tokio::test]
async fn a_reload_that_would_break_a_managed_key_is_refused_and_one_that_changes_its_policy_applies(
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let toml = config(&upstream, None);
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(file.path(), &toml).expect("write config");
    let gateway = TestGateway::start_file(file.path(), Clock::real()).await;
    let token = create(&gateway, "dev-14", json!({"policy": "small"})).await;
    assert_eq!(
        chat_status(&gateway.url(), &token, Some(30)).await,
        400,
        "cap 20"
    );

    std::fs::write(
        file.path(),
        toml.replace("max_tokens = 20", "max_tokens = 40"),
    )
    .expect("write");
    gateway.reload().expect("a policy change reloads");
    assert_eq!(
        chat_status(&gateway.url(), &token, Some(30)).await,
        200,
        "the new policy applies to the managed key"
    );

    let without = toml.replace("[policies.small]", "[policies.other]");
    std::fs::write(file.path(), &without).expect("write");
    let error = gateway
        .reload()
        .expect_err("the key's policy is gone")
        .to_string();
    assert!(
        error.contains("managed key \"dev-14\"") && error.contains("no policy named \"small\""),
        "{error}"
    );
    let clash = format!(
        "{toml}{}",
        common::key_entry("dev-14", "tg-file-dev-14", "")
    );
    std::fs::write(file.path(), &clash).expect("write");
    let error = gateway.reload().expect_err("the name is taken").to_string();
    assert!(
        error.contains("\"dev-14\" is in the file and also a managed key"),
        "{error}"
    );
    assert_eq!(
        chat_status(&gateway.url(), &token, Some(30)).await,
        200,
        "the running keys stay in force"
    );
    assert_eq!(
        chat_status(&gateway.url(), "tg-file-dev-14", None).await,
        401
    );
}

/// A key made through the API joins a group as a file key does: the group lists it and it is
/// served, and a group the config lacks, or one whose quotas the key's fields cannot bound, is
/// refused with the file's message.
#[tokio::test]
async fn a_managed_key_joins_a_group_and_is_checked_against_it() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let toml = config(&upstream, None).replace(
        "[policies.small]",
        "[groups.team]\nconcurrency = 1\nquotas = [ { tokens = 100000, per = \"1d\" } ]\n\
         [policies.small]",
    );
    let gateway = TestGateway::start_toml(&toml).await;
    let (status, made) = admin(
        &gateway,
        "POST",
        "/admin/keys",
        Some(json!({"name": "member", "group": "team", "max_tokens": 16})),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let token = made["key"].as_str().expect("token").to_owned();
    let (_, key) = admin(&gateway, "GET", "/admin/keys/member", None).await;
    assert_eq!(key["group"], "team", "{key}");
    let (_, group) = admin(&gateway, "GET", "/admin/groups/team", None).await;
    assert_eq!(group["members"], json!(["member"]), "{group}");
    assert_eq!(chat_status(&gateway.url(), &token, Some(8)).await, 200);

    let (status, refused) = admin(
        &gateway,
        "POST",
        "/admin/keys",
        Some(json!({"name": "stray", "group": "nope"})),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("group: no group named \"nope\"")),
        "{refused}"
    );
    let (status, refused) = admin(
        &gateway,
        "POST",
        "/admin/keys",
        Some(json!({"name": "unbounded", "group": "team"})),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("needs max_tokens")),
        "{refused}"
    );
}
