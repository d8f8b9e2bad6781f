//! `tollgate demo`: the gateway on its embedded demo config (`config/demo.toml`), in front of a
//! built-in deterministic model server (the `mock-upstream` crate: chat and completions, JSON and
//! SSE, with usage) or of a real one (`--upstream URL`), on loopback ports, with two keys made
//! for the run — `demo-open` (no limits) and `demo-tight` (a tight rate and small quotas, so a
//! 429 is a loop away). It prints the keys, three curl lines that work as printed (a JSON
//! answer, a stream, a refusal), the metrics URL and the console URL with its admin token, and
//! serves until Ctrl-C.
//!
//! Edge cases: the keys and the admin token are random for each run, so a demo left running
//! admits only whoever read its terminal; its state and ledger live in a folder of the run's own
//! under the system's temp dir, removed at exit, so every run starts with empty quotas; a busy
//! port fails the start with the address and a hint (`--listen 127.0.0.1:0` takes any free one).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use mock_upstream::{MockOptions, MockUpstream};
use ring::rand::SecureRandom;
use toml::{Table, Value};

use crate::config::{Config, Secret};
use crate::http::body::BoxError;
use crate::keys::{generate_token, hash_token};
use crate::server::Server;

/// The demo's config; the demo fills in addresses, upstream, paths, token and keys.
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

/// What `tollgate demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// A real model server instead of the built-in one.
    pub upstream: Option<String>,
    /// The model the printed curl lines ask for.
    pub model: String,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            upstream: None,
            model: "mock-model".to_owned(),
        }
    }
}

/// The run's secrets, shown once.
#[derive(Debug, Clone)]
pub struct DemoKeys {
    /// `demo-open`: no limits.
    pub open: String,
    /// `demo-tight`: a tight rate and small quotas.
    pub tight: String,
    /// The admin API's and the console's bearer token.
    pub admin: String,
}

/// A demo gateway, bound and ready to run.
pub struct Demo {
    server: Server,
    keys: DemoKeys,
    model: String,
    /// The built-in model server, while the demo runs; `None` with `--upstream`.
    built_in: Option<MockUpstream>,
    upstream_url: String,
    /// Removed when the demo is dropped.
    state: StateDir,
}

impl Demo {
    /// Starts the built-in model server (unless `--upstream`) and binds the gateway.
    pub async fn start(options: DemoOptions) -> Result<Demo, BoxError> {
        if !is_plain_model_name(&options.model) {
            return Err(format!(
                "--model {:?}: use letters, digits and - _ . : / only (it goes into the printed curl lines)",
                options.model
            )
            .into());
        }
        let built_in = match &options.upstream {
            Some(_) => None,
            None => {
                let mock = MockUpstream::start_on(
                    SocketAddr::from(([127, 0, 0, 1], 0)),
                    MockOptions::default(),
                )
                .await
                .map_err(|e| format!("cannot start the built-in model server: {e}"))?;
                // A long-running server must not keep every request in memory.
                mock.set_recording(false);
                Some(mock)
            }
        };
        let upstream_url = match (&options.upstream, &built_in) {
            (Some(url), _) => url.clone(),
            (None, Some(mock)) => mock.url(),
            (None, None) => unreachable!("the built-in server starts when no upstream is given"),
        };
        let keys = DemoKeys {
            open: generate_token().map_err(|_| "the system random source failed")?,
            tight: generate_token().map_err(|_| "the system random source failed")?,
            admin: admin_token()?,
        };
        let state = StateDir::create()?;
        let mut config = demo_config(&options, &upstream_url, state.path(), &keys)?;
        config.server.admin_token = Some(Secret::new(keys.admin.clone()));
        if options.upstream.is_some() {
            for warning in config.warnings() {
                tracing::warn!("{warning}");
            }
        }
        let server = Server::bind(config).await.map_err(|e| {
            format!("{e} (is another tollgate running? --listen 127.0.0.1:0 and --admin-listen 127.0.0.1:0 take any free port)")
        })?;
        Ok(Demo {
            server,
            keys,
            model: options.model,
            built_in,
            upstream_url,
            state,
        })
    }

    pub fn keys(&self) -> &DemoKeys {
        &self.keys
    }

    pub fn url(&self) -> Result<String, BoxError> {
        Ok(format!("http://{}", self.server.local_addr()?))
    }

    pub fn admin_url(&self) -> Result<String, BoxError> {
        Ok(format!("http://{}", self.server.admin_addr()?))
    }

    /// What the demo prints at start: where everything is, the keys, and lines to try.
    pub fn banner(&self) -> Result<String, BoxError> {
        let (url, admin) = (self.url()?, self.admin_url()?);
        let DemoKeys {
            open,
            tight,
            admin: token,
        } = &self.keys;
        let model = &self.model;
        let upstream = match &self.built_in {
            Some(_) => format!(
                "the built-in model server ({}; deterministic answers, any model name)",
                self.upstream_url
            ),
            None => self.upstream_url.clone(),
        };
        let json = |stream: bool| {
            let stream = if stream { r#""stream":true,"# } else { "" };
            format!(
                r#"'{{"model":"{model}",{stream}"messages":[{{"role":"user","content":"Hello"}}]}}'"#
            )
        };
        let headers = |key: &str| {
            format!(r#"-H "authorization: Bearer {key}" -H 'content-type: application/json'"#)
        };
        Ok(format!(
            "\
tollgate demo: a gateway on {url}, in front of {upstream}

Keys, made for this run (they stop working when it ends):
  demo-open   {open}   any model, no limits
  demo-tight  {tight}   {model} only; 3 requests at once then one every 6 s; 600 tokens per 10 min, 5000 a day

Try it:
# a JSON answer
curl -s {url}/v1/chat/completions {open_headers} -d {json}
# a stream of server-sent events
curl -sN {url}/v1/chat/completions {open_headers} -d {stream}
# a refusal: the tight key's fourth request in a row gets 429 with Retry-After
for i in 1 2 3 4; do curl -s -w ' -> %{{http_code}}\\n' {url}/v1/completions {tight_headers} -d '{{\"model\":\"{model}\",\"prompt\":\"Hello\",\"max_tokens\":4}}'; done

Metrics:  {admin}/metrics
Console:  {admin}/ui/   admin token: {token}

Ctrl-C stops the demo.
",
            open_headers = headers(open),
            tight_headers = headers(tight),
            json = json(false),
            stream = json(true),
        ))
    }

    /// Serves until `shutdown` completes, then drains and removes the demo's state.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BoxError> {
        let Demo {
            server,
            built_in,
            state,
            ..
        } = self;
        let served = server.run(shutdown).await;
        drop(built_in);
        drop(state);
        served
    }
}

/// `tollgate demo`.
pub fn run(options: DemoOptions) -> ExitCode {
    let runtime = match super::control_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let demo = Demo::start(options).await?;
        println!("{}", demo.banner()?);
        demo.run(super::serve::shutdown_signal()).await
    });
    match result {
        Ok(()) => {
            eprintln!("tollgate demo: stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tollgate: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The embedded demo config with this run's addresses, upstream, paths and keys.
fn demo_config(
    options: &DemoOptions,
    upstream_url: &str,
    state: &Path,
    keys: &DemoKeys,
) -> Result<Config, BoxError> {
    let mut doc: Table = DEMO_CONFIG.parse()?;
    let path = |name: &str| Value::String(state.join(name).display().to_string());
    for (section, key, value) in [
        (
            "server",
            "listen",
            Value::String(options.listen.to_string()),
        ),
        (
            "server",
            "admin_listen",
            Value::String(options.admin_listen.to_string()),
        ),
        ("upstream", "url", Value::String(upstream_url.to_owned())),
        ("state", "path", path("tollgate.db")),
        ("ledger", "path", path("usage.jsonl")),
    ] {
        doc.get_mut(section)
            .and_then(Value::as_table_mut)
            .ok_or_else(|| format!("the demo config has no [{section}]"))?
            .insert(key.to_owned(), value);
    }
    // The tight key may ask for the demo's model only, which metrics and the ledger then label
    // by name (the open key's `*` is labelled `other`: a client must not grow the label set).
    doc.get_mut("policies")
        .and_then(|p| p.get_mut("tight"))
        .and_then(Value::as_table_mut)
        .ok_or("the demo config has no [policies.tight]")?
        .insert(
            "models".into(),
            Value::Array(vec![Value::String(options.model.clone())]),
        );
    let key = |name: &str, policy: &str, token: &str| {
        let mut entry = Table::new();
        entry.insert("name".into(), Value::String(name.into()));
        entry.insert(
            "sha256".into(),
            Value::String(hex::encode(hash_token(token.as_bytes()))),
        );
        entry.insert("policy".into(), Value::String(policy.into()));
        Value::Table(entry)
    };
    doc.insert(
        "keys".into(),
        Value::Array(vec![
            key("demo-open", "open", &keys.open),
            key("demo-tight", "tight", &keys.tight),
        ]),
    );
    Ok(Config::parse(&toml::to_string(&doc)?, "<demo config>")?)
}

/// A random admin token, told apart from client keys by its prefix.
fn admin_token() -> Result<String, BoxError> {
    let mut secret = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| "the system random source failed")?;
    Ok(format!("admin-{}", hex::encode(secret)))
}

/// A model name that can go between the printed lines' quotes as it is.
fn is_plain_model_name(model: &str) -> bool {
    !model.is_empty()
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
}

/// The run's own folder for the state file and the ledger; removed when dropped.
struct StateDir(PathBuf);

impl StateDir {
    fn create() -> Result<StateDir, BoxError> {
        let mut suffix = [0u8; 4];
        ring::rand::SystemRandom::new()
            .fill(&mut suffix)
            .map_err(|_| "the system random source failed")?;
        let path = std::env::temp_dir().join(format!(
            "tollgate-demo-{}-{}",
            std::process::id(),
            hex::encode(suffix)
        ));
        std::fs::create_dir_all(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(StateDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(path = %self.0.display(), %error, "cannot remove the demo's state");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_holds_both_keys_and_their_limits() {
        let keys = DemoKeys {
            open: "tg-open-0000000000000000".into(),
            tight: "tg-tight-000000000000000".into(),
            admin: "admin-0000000000000000".into(),
        };
        let options = DemoOptions {
            listen: "127.0.0.1:0".parse().expect("address"),
            admin_listen: "127.0.0.1:0".parse().expect("address"),
            ..DemoOptions::default()
        };
        let state = std::env::temp_dir();
        let config = demo_config(&options, "http://127.0.0.1:1", &state, &keys).expect("valid");
        let names: Vec<&str> = config.keys.iter().map(|k| &*k.name).collect();
        assert_eq!(names, ["demo-open", "demo-tight"]);
        assert_eq!(config.server.listen, options.listen);
        assert_eq!(
            config.upstreams[0].endpoints[0].base_url(),
            "http://127.0.0.1:1"
        );
        assert_eq!(
            config.ledger.and_then(|ledger| ledger.path),
            Some(state.join("usage.jsonl"))
        );
        let tight = &config.keys[1].limits;
        assert_eq!(tight.quotas.len(), 2, "two windows to watch");
        assert!(tight.rate.is_some() && tight.max_tokens.is_some());
        assert!(
            config.keys[0].limits.rate.is_none(),
            "the open key has no rate"
        );
        assert_eq!(config.keys[0].limits.models, None, "any model");
        assert_eq!(
            tight.models,
            Some(vec!["mock-model".to_owned()]),
            "the demo's model only"
        );
    }

    #[test]
    fn model_names_that_would_break_the_printed_quotes_are_refused() {
        assert!(is_plain_model_name("mock-model"));
        assert!(is_plain_model_name("Qwen/Qwen2.5-0.5B-Instruct"));
        assert!(!is_plain_model_name("it's"));
        assert!(!is_plain_model_name("a\"b"));
        assert!(!is_plain_model_name(""));
    }
}
