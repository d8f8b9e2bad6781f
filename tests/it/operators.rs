//! The operators' view: TLS on the client and admin listeners, the admin API, and the counters a
//! fresh gateway exports for alerts.

use std::io::Write;
use std::time::Duration;

use mock_upstream::MockUpstream;
use serde_json::{json, Value};
use tollgate::state::clock::Clock;

use crate::common::{self, key_entry, TestGateway};

/// A self-signed certificate for `localhost`: (certificate PEM, key PEM).
fn certificate() -> (String, String) {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    (made.cert.pem(), made.signing_key.serialize_pem())
}

fn write(path: &std::path::Path, text: &str) {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("write file");
}

fn https_client(cert_pem: &str, http1: bool) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        "authorization",
        reqwest::header::HeaderValue::from_static("Bearer tg-test-key"),
    );
    let mut builder = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).expect("PEM"))
        .default_headers(headers)
        .timeout(Duration::from_secs(10));
    if http1 {
        builder = builder.http1_only();
    }
    builder.build().expect("https client")
}

/// A certificate and its key written to files in a directory of their own.
struct CertFiles {
    dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl CertFiles {
    /// Files holding a fresh certificate; returns them and the certificate's PEM.
    fn new() -> (CertFiles, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = CertFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            dir,
        };
        let pem = files.replace();
        (files, pem)
    }

    /// Writes a new certificate over the old one; returns its PEM.
    fn replace(&self) -> String {
        let (cert, key) = certificate();
        write(&self.cert, &cert);
        write(&self.key, &key);
        cert
    }

    /// The `[server]` line `name = { cert, key }` for these files.
    fn toml(&self, name: &str) -> String {
        format!(
            "{name} = {{ cert = \"{}\", key = \"{}\" }}",
            self.cert.display(),
            self.key.display()
        )
    }

    /// A gateway reading a config file (here too) with `server` lines, in front of `upstream`.
    async fn gateway(&self, upstream: &str, server: &str) -> TestGateway {
        let config_file = self.dir.path().join("tollgate.toml");
        write(&config_file, &common::config_toml(upstream, server, "", ""));
        TestGateway::start_file(&config_file, Clock::real()).await
    }
}

#[tokio::test]
async fn tls_serves_h2_and_http1_and_a_reload_swaps_the_certificate_without_dropping_connections() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let (files, old_cert) = CertFiles::new();
    let gateway = files.gateway(&upstream.url(), &files.toml("tls")).await;
    let url = format!(
        "https://localhost:{}/v1/chat/completions",
        gateway.addr.port()
    );
    let body =
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true})
            .to_string();

    let direct = common::post(
        &format!("{}/v1/chat/completions", upstream.url()),
        &body,
        &[],
    )
    .await
    .2;
    for http1 in [false, true] {
        let response = https_client(&old_cert, http1)
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("HTTPS request");
        let expected = if http1 {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };
        assert_eq!(response.version(), expected, "ALPN chose the protocol");
        assert_eq!(
            response.bytes().await.expect("body"),
            direct,
            "the same bytes over TLS"
        );
    }

    // A connection open before the reload keeps working after it.
    let old_client = https_client(&old_cert, true);
    let first = old_client
        .get(url.replace("chat/completions", "models"))
        .send()
        .await
        .expect("before reload");
    assert_eq!(first.status(), 200);
    first.bytes().await.expect("body");

    let new_cert = files.replace();
    gateway.reload().expect("reload with valid new files");

    let again = old_client
        .get(url.replace("chat/completions", "models"))
        .send()
        .await;
    assert!(
        again.is_ok_and(|r| r.status() == 200),
        "the open connection survived the reload"
    );
    let fresh_old = https_client(&old_cert, true)
        .get(url.replace("chat/completions", "models"))
        .send()
        .await;
    assert!(
        fresh_old.is_err(),
        "a new handshake no longer gets the old certificate"
    );
    let fresh_new = https_client(&new_cert, true)
        .get(url.replace("chat/completions", "models"))
        .send()
        .await;
    assert!(
        fresh_new.is_ok_and(|r| r.status() == 200),
        "a new handshake gets the new certificate"
    );

    // Files that do not load: the reload is refused and the certificate in force stays.
    write(&files.key, "not a key");
    let error = gateway
        .reload()
        .expect_err("a broken key refuses the reload");
    assert!(error.to_string().contains("server.tls"), "{error}");
    let still = https_client(&new_cert, true)
        .get(url.replace("chat/completions", "models"))
        .send()
        .await;
    assert!(
        still.is_ok_and(|r| r.status() == 200),
        "the old certificate stays in force"
    );
}

async fn admin_healthz(port: u16, cert: &str) -> Result<u16, reqwest::Error> {
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes()).expect("PEM"))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("https client");
    let response = client
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await?;
    Ok(response.status().as_u16())
}

#[tokio::test]
async fn the_admin_listener_serves_tls_and_a_reload_swaps_its_certificate() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let (files, old_cert) = CertFiles::new();
    let gateway = files
        .gateway(&upstream.url(), &files.toml("admin_tls"))
        .await;
    let port = gateway.admin_addr.port();
    assert_eq!(
        admin_healthz(port, &old_cert)
            .await
            .expect("HTTPS /healthz"),
        200
    );
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        !plain.is_ok_and(|r| r.status() == 200),
        "plain HTTP is not served on a TLS admin listener"
    );
    // The client listener stays plain: admin_tls is the admin listener's alone.
    let (status, _, _) = common::post(
        &format!("{}/v1/chat/completions", gateway.url()),
        &common::chat_body(false, false),
        &[],
    )
    .await;
    assert_eq!(status, 200);

    let new_cert = files.replace();
    gateway.reload().expect("reload with valid new files");
    assert!(
        admin_healthz(port, &old_cert).await.is_err(),
        "a new handshake no longer gets the old certificate"
    );
    assert_eq!(
        admin_healthz(port, &new_cert)
            .await
            .expect("new certificate"),
        200
    );
    write(&files.key, "not a key");
    let error = gateway
        .reload()
        .expect_err("a broken key refuses the reload");
    assert!(error.to_string().contains("server.admin_tls"), "{error}");
}

#[test]
fn tls_files_that_do_not_load_are_a_config_error_with_a_line() {
    let text = "[server]\ntls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }\n[upstream]\nurl = \"http://a\"\n";
    let error = tollgate::Config::parse(text, "tls.toml").expect_err("missing files refused");
    let message = error.to_string();
    assert!(message.starts_with("tls.toml:2: server.tls:"), "{message}");
    assert!(message.contains("/nonexistent/cert.pem"), "{message}");
}

#[tokio::test]
async fn the_admin_api_shows_limits_and_usage_behind_its_own_token() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let token = "admin-token-0123456789abcdef";
    std::env::set_var("TOLLGATE_TEST_ADMIN_TOKEN", token);
    let keys = format!(
        "{}{}",
        key_entry(
            "alpha",
            "tg-alpha",
            "max_tokens = 50\nconcurrency = 3\nrate = { requests = 60, per = \"1m\", burst = 10 }\nquotas = [{ tokens = 10000, per = \"1h\" }, { tokens = 100000, per = \"1d\" }]\nmodels = [\"m\"]",
        ),
        key_entry("beta", "tg-beta", "")
    );
    let gateway = TestGateway::start_toml(&common::config_toml(
        &upstream.url(),
        "admin_token_env = \"TOLLGATE_TEST_ADMIN_TOKEN\"",
        "",
        &keys,
    ))
    .await;
    // A known workload: the mock reports 2 prompt words and max_tokens completion tokens.
    for max_tokens in [5, 7, 9] {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens});
        let (status, _, _) = common::post(
            &format!("{}/v1/chat/completions", gateway.url()),
            &body.to_string(),
            &[("authorization", "Bearer tg-alpha")],
        )
        .await;
        assert_eq!(status, 200);
    }
    // Settlement happens as each answer ends; it is done once nothing is in flight.
    assert!(
        gateway
            .wait_for_metric(
                "tollgate_inflight_requests{key=\"alpha\"} 0",
                Duration::from_secs(5)
            )
            .await
    );

    let admin = reqwest::Client::new();
    let keys_url = format!("{}/admin/keys", gateway.admin_url());
    for (auth, expected) in [
        (None, 401),
        (Some("Bearer wrong-token-0000000000"), 401),
        (Some("Bearer tg-alpha"), 401),
    ] {
        let mut request = admin.get(&keys_url);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.expect("admin request");
        assert_eq!(response.status(), expected, "{auth:?}");
    }
    let response = admin
        .get(&keys_url)
        .bearer_auth(token)
        .send()
        .await
        .expect("admin request");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    for secret in [
        "tg-alpha",
        "tg-beta",
        token,
        &hex::encode(tollgate::keys::hash_token(b"tg-alpha")),
    ] {
        assert!(
            !text.contains(secret),
            "no secret in the admin API: found {secret}"
        );
    }
    let listing: Value = serde_json::from_str(&text).expect("JSON");
    let names: Vec<&str> = listing["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["alpha", "beta", "test"]);
    // One bearer parser for clients and operators: the scheme in any case (RFC 9110 §11.1).
    let lowercase = admin
        .get(&keys_url)
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .expect("admin request");
    assert_eq!(lowercase.status(), 200, "a lowercase scheme is accepted");

    let alpha: Value = admin
        .get(format!("{keys_url}/alpha"))
        .bearer_auth(token)
        .send()
        .await
        .expect("one key")
        .json()
        .await
        .expect("JSON");
    let used = (2 + 5) + (2 + 7) + (2 + 9);
    assert_eq!(alpha["inflight"], 0);
    assert_eq!(alpha["limits"]["concurrency"], 3);
    assert_eq!(alpha["limits"]["rate"]["requests"], 60);
    assert_eq!(alpha["limits"]["max_tokens"], 50);
    assert_eq!(alpha["windows"][0]["window"], "1h");
    assert_eq!(alpha["windows"][0]["used"], used, "{alpha}");
    assert_eq!(alpha["windows"][0]["remaining"], 10000 - used);
    assert_eq!(alpha["windows"][1]["window"], "1d");
    assert_eq!(alpha["windows"][1]["used"], used);
    let missing = admin
        .get(format!("{keys_url}/nobody"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_token() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = TestGateway::start(&upstream.url()).await;
    let response = reqwest::get(format!("{}/admin/keys", gateway.admin_url()))
        .await
        .expect("request");
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "admin_disabled");
}

/// The series a configured key has from the start (and from the reload that adds it).
fn per_key_series(key: &str) -> Vec<String> {
    let mut series: Vec<String> = [
        "rate",
        "concurrency",
        "model_not_found",
        "max_tokens_exceeded",
        "quota",
        "state_unavailable",
    ]
    .iter()
    .map(|reason| format!("tollgate_rejections_total{{key=\"{key}\",reason=\"{reason}\"}} 0"))
    .collect();
    series.push(format!(
        "tollgate_quota_overrun_tokens_total{{key=\"{key}\"}} 0"
    ));
    series.push(format!("tollgate_inflight_requests{{key=\"{key}\"}} 0"));
    series
}

/// The lines of `expected` that are not lines of `metrics`.
fn absent<'a>(metrics: &str, expected: &'a [String]) -> Vec<&'a String> {
    expected
        .iter()
        .filter(|series| !metrics.lines().any(|line| line == series.as_str()))
        .collect()
}

#[tokio::test]
async fn a_fresh_gateway_exports_every_fixed_counter_at_zero_and_a_reload_adds_new_keys() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let config_file = dir.path().join("tollgate.toml");
    let ledger = format!(
        "[ledger]\npath = \"{}\"\n",
        dir.path().join("usage.jsonl").display()
    );
    write(
        &config_file,
        &common::config_toml(&upstream.url(), "", "", &ledger),
    );
    let gateway = TestGateway::start_file(&config_file, Clock::real()).await;

    let metrics = gateway.metrics().await;
    let mut expected: Vec<String> = [
        "tollgate_upstream_errors_total{kind=\"connect\",upstream=\"default\"} 0",
        "tollgate_upstream_errors_total{kind=\"timeout\",upstream=\"default\"} 0",
        "tollgate_upstream_errors_total{kind=\"broken\",upstream=\"default\"} 0",
        "tollgate_upstream_errors_total{kind=\"body_idle_timeout\",upstream=\"default\"} 0",
        "tollgate_upstream_errors_total{kind=\"body_error\",upstream=\"default\"} 0",
        "tollgate_upstream_errors_total{kind=\"retried\",upstream=\"default\"} 0",
        "tollgate_ledger_errors_total{reason=\"write\"} 0",
        "tollgate_ledger_errors_total{reason=\"queue_full\"} 0",
        "tollgate_ledger_errors_total{reason=\"closed\"} 0",
        "tollgate_state_errors_total{op=\"admit\"} 0",
        "tollgate_state_errors_total{op=\"reserve\"} 0",
        "tollgate_state_errors_total{op=\"settle\"} 0",
        "tollgate_state_errors_total{op=\"status\"} 0",
        "tollgate_state_errors_total{op=\"renew\"} 0",
        "tollgate_state_errors_total{op=\"release\"} 0",
        "tollgate_state_errors_total{op=\"managed_keys\"} 0",
        "tollgate_rejections_total{key=\"unauthenticated\",reason=\"missing_api_key\"} 0",
        "tollgate_rejections_total{key=\"unauthenticated\",reason=\"malformed_api_key\"} 0",
        "tollgate_rejections_total{key=\"unauthenticated\",reason=\"invalid_api_key\"} 0",
    ]
    .map(String::from)
    .to_vec();
    expected.extend(per_key_series("test"));
    // The pool's one endpoint: up, nothing in flight, its answers and failures at 0.
    let endpoint = upstream.addr();
    let pool = format!("endpoint=\"{endpoint}\",upstream=\"default\"");
    expected.push(format!("tollgate_upstream_up{{{pool}}} 1"));
    expected.push(format!("tollgate_upstream_inflight{{{pool}}} 0"));
    for status in ["200", "connect", "timeout", "broken"] {
        expected.push(format!(
            "tollgate_upstream_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\",upstream=\"default\"}} 0"
        ));
    }
    let missing = absent(&metrics, &expected);
    assert!(
        missing.is_empty(),
        "not exported at 0 by a fresh gateway: {missing:#?}\n{metrics}"
    );
    assert!(
        !metrics.contains("key=\"late\""),
        "no series for a key not configured yet"
    );

    let keys = format!("{ledger}{}", key_entry("late", "tg-late", ""));
    write(
        &config_file,
        &common::config_toml(&upstream.url(), "", "", &keys),
    );
    gateway.reload().expect("reload adds a key");
    let metrics = gateway.metrics().await;
    let late = per_key_series("late");
    let missing = absent(&metrics, &late);
    assert!(
        missing.is_empty(),
        "not exported at 0 after the reload that added the key: {missing:#?}\n{metrics}"
    );
}

/// The value of the series that starts with `series` (name and labels), if exported.
fn gauge(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn quota_window_gauges_start_at_their_value_in_the_state_and_a_reload_adds_new_keys() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.db");
    let config_file = dir.path().join("tollgate.toml");
    let quota = "max_tokens = 50\nquotas = [{ tokens = 10000, per = \"1h\" }]";
    let config = |keys: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nurl = \"{}\"\n[state]\npath = \"{}\"\n{keys}",
            upstream.url(),
            state.display(),
        )
    };
    let used_series = "tollgate_quota_used_tokens{key=\"q\",window=\"1h\"}";
    write(&config_file, &config(&key_entry("q", "tg-q", quota)));

    let mut first = TestGateway::start_file(&config_file, Clock::real()).await;
    assert!(
        first
            .wait_for_metric(&format!("{used_series} 0"), Duration::from_secs(5))
            .await,
        "a fresh window is exported at 0 before any request:\n{}",
        first.metrics().await
    );
    let (status, _, _) = common::post(
        &format!("{}/v1/chat/completions", first.url()),
        &common::chat_body(false, false),
        &[("authorization", "Bearer tg-q")],
    )
    .await;
    assert_eq!(status, 200);
    let charged = gauge(&first.metrics().await, used_series).expect("the window's gauge");
    assert!(charged > 0, "the request was charged");
    first.begin_shutdown().await.expect("shutdown");

    // A restart shows the window as the state file holds it, before the key's first request.
    let second = TestGateway::start_file(&config_file, Clock::real()).await;
    let restarted = format!("{used_series} {charged}");
    assert!(
        second
            .wait_for_metric(&restarted, Duration::from_secs(5))
            .await,
        "after a restart the gauge reads {charged}:\n{}",
        second.metrics().await
    );
    let keys = format!(
        "{}{}",
        key_entry("q", "tg-q", quota),
        key_entry("late", "tg-late", quota)
    );
    write(&config_file, &config(&keys));
    second.reload().expect("reload adds a key");
    let late = "tollgate_quota_used_tokens{key=\"late\",window=\"1h\"} 0";
    assert!(
        second.wait_for_metric(late, Duration::from_secs(5)).await,
        "a key added by a reload has its window at 0:\n{}",
        second.metrics().await
    );
}
