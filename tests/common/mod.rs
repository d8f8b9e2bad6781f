//! Shared test helpers: a gateway started in-process on free ports, pointed at a
//! [`mock_upstream::MockUpstream`] (the workspace's `mock-upstream` crate), and small HTTP
//! client helpers.

pub mod otlp;
pub mod postgres_server;
pub mod redis_server;
pub mod webdriver;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::state::clock::Clock;
use tollgate::{Config, Server, ServerOptions};

/// The key every test config has (name `test`, no limits), and that [`client`] sends.
pub const TEST_KEY: &str = "tg-test-key";

/// A `[[keys]]` entry for `token`, with extra lines (limits, policy).
pub fn key_entry(name: &str, token: &str, extra: &str) -> String {
    let sha256 = hex::encode(tollgate::keys::hash_token(token.as_bytes()));
    format!("[[keys]]\nname = \"{name}\"\nsha256 = \"{sha256}\"\n{extra}\n")
}

/// A fresh path for a gateway's state file, unique to this test run.
pub fn state_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "tollgate-test-{}-{}/state.db",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A fresh path for a gateway's usage ledger, beside a fresh state path.
pub fn ledger_path() -> std::path::PathBuf {
    state_path().with_file_name("usage.jsonl")
}

/// Every line of a usage ledger, parsed.
pub fn read_ledger(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("ledger exists")
        .lines()
        .map(|line| serde_json::from_str(line).expect("every ledger line is JSON"))
        .collect()
}

/// The ledger's lines once it has at least `n` (the writer is off the request path); bounded.
pub async fn ledger_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    for _ in 0..250 {
        if path.exists() {
            let lines = read_ledger(path);
            if lines.len() >= n {
                return lines;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    read_ledger(path)
}

/// A config for tests: both listeners on free ports, the upstream at `upstream_url`, plus
/// `extra_server` lines in `[server]`, `extra_upstream` lines in `[upstream]`, a state file of
/// its own, the key `test`, and `tail` after it (more keys, policies, `[ledger]`).
pub fn config_toml(
    upstream_url: &str,
    extra_server: &str,
    extra_upstream: &str,
    tail: &str,
) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra_server}\n\
         [upstream]\nurl = \"{upstream_url}\"\n{extra_upstream}\n\
         [state]\npath = \"{}\"\n{}\n{tail}\n",
        state_path().display(),
        key_entry("test", TEST_KEY, "")
    )
}

/// A gateway running in this process until dropped or shut down.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    reloader: Option<std::sync::Arc<tollgate::server::reload::Reloader>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestGateway {
    /// A gateway in front of `upstream_url` with default settings.
    pub async fn start(upstream_url: &str) -> TestGateway {
        TestGateway::start_toml(&config_toml(upstream_url, "", "", "")).await
    }

    pub async fn start_toml(toml: &str) -> TestGateway {
        let config = Config::parse(toml, "test.toml").expect("test config is valid");
        TestGateway::start_config(config).await
    }

    pub async fn start_config(config: Config) -> TestGateway {
        TestGateway::start_with(config, ServerOptions::default()).await
    }

    /// A gateway whose config comes from a file (reloadable) and whose limiters read `clock`.
    pub async fn start_file(path: &std::path::Path, clock: Clock) -> TestGateway {
        let config = Config::load(path).expect("test config file is valid");
        let options = ServerOptions {
            config_path: Some(path.to_owned()),
            clock,
        };
        TestGateway::start_with(config, options).await
    }

    pub async fn start_with(config: Config, options: ServerOptions) -> TestGateway {
        let server = Server::bind_with(config, options)
            .await
            .expect("gateway binds free ports");
        let reloader = server.reloader();
        let addr = server.local_addr().expect("bound address");
        let admin_addr = server.admin_addr().expect("bound admin address");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            server.run(shutdown).await.expect("gateway runs");
        });
        TestGateway {
            addr,
            admin_addr,
            reloader,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Reloads the config file now, as SIGHUP would.
    pub fn reload(
        &self,
    ) -> Result<tollgate::server::reload::ReloadSummary, tollgate::config::ConfigError> {
        self.reloader
            .as_ref()
            .expect("gateway started from a file")
            .reload()
    }

    /// `http://ADDR` of the client port.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// Starts a graceful shutdown and returns the task that finishes when it is done.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("shutdown begun once")
    }

    /// Waits until `/metrics` contains `needle` (for effects that follow a client's disconnect,
    /// which the gateway sees only when it next touches the connection). Bounded by `timeout`.
    pub async fn wait_for_metric(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_metrics(|metrics| metrics.contains(needle), timeout)
            .await
    }

    /// Waits until the `/metrics` text satisfies `ready`; bounded by `timeout`.
    pub async fn wait_for_metrics(&self, ready: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if ready(&self.metrics().await) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` on the admin API with `token`, which must answer 200 with JSON.
    pub async fn admin_json(&self, token: &str, path: &str) -> serde_json::Value {
        let response = reqwest::Client::new()
            .get(format!("{}{path}", self.admin_url()))
            .bearer_auth(token)
            .send()
            .await
            .expect("admin request");
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.expect("JSON")
    }

    /// The admin port's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.admin_url()))
            .await
            .expect("metrics reachable")
            .text()
            .await
            .expect("metrics text")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A client that sends [`TEST_KEY`] unless a request sets its own `Authorization`, and never
/// follows redirects.
pub fn client() -> reqwest::Client {
    client_with_key(TEST_KEY)
}

/// A client that sends `key` as its bearer token unless a request sets its own
/// `Authorization`, never follows redirects, and gives up after 60 s: long enough for the
/// 200-request races on a loaded 2-core machine, short enough to catch a hang.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::try_from(format!("Bearer {key}"))
            .expect("a key is a header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client builds")
}

/// A chat request body.
pub fn chat_body(stream: bool, include_usage: bool) -> String {
    let options = if include_usage {
        r#","stream_options":{"include_usage":true}"#
    } else {
        ""
    };
    format!(
        r#"{{"model":"mock-model","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"Say hello to the gateway"}}],"stream":{stream}{options}}}"#
    )
}

/// A legacy completions request body.
pub fn completions_body(stream: bool) -> String {
    format!(
        r#"{{"model":"mock-model","prompt":"The capital of France is","max_tokens":5,"stream":{stream}}}"#
    )
}

/// The status, selected headers and the whole body of one POST.
pub async fn post(
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, bytes::Bytes) {
    let mut request = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("whole body");
    (status, headers, bytes)
}

/// Whether some series of `metric` (a name and an opening brace) has counted anything: every
/// fixed series is exported at 0 from the start, so being there is not enough.
pub fn counted(metrics: &str, metric: &str) -> bool {
    metrics
        .lines()
        .any(|line| line.starts_with(metric) && !line.ends_with(" 0"))
}

/// A free local port with nothing listening on it.
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}
