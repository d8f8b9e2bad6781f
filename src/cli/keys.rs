//! `tollgate keys`: the managed keys of a running gateway, through its admin API (an HTTP client
//! of `/admin/keys`; the admin token from `TOLLGATE_ADMIN_TOKEN`). `create` and `rotate` print
//! the new key alone on stdout, once — `KEY=$(tollgate keys create dev-7)` — and everything
//! else on stderr; `list` and `show` print to stdout. A refusal prints the gateway's own message
//! (`tollgate: 400: max_tokens: must be at least 1 …`) and exits non-zero.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Map, Value};

/// The environment variable the admin token is read from.
pub const ADMIN_TOKEN_ENV: &str = "TOLLGATE_ADMIN_TOKEN";
/// A call that takes longer than this is reported as failed, not waited on.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(clap::Args)]
pub struct KeysArgs {
    /// The gateway's admin API (`server.admin_listen`), `http://` or `https://`.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:9090",
        value_name = "URL"
    )]
    pub admin: String,
    /// Extra trusted CA certificates (PEM) for an `https://` admin URL.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make a key; prints it once on stdout.
    Create {
        name: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// Change a key's fields; the others stay as they are.
    Update {
        name: String,
        #[command(flatten)]
        fields: Fields,
        /// Drop the key's own value of a field (`--unset rate`): its policy's applies again.
        #[arg(long, value_name = "FIELD")]
        unset: Vec<String>,
    },
    /// Every key, the file's and the managed ones.
    List {
        /// The admin API's JSON as it is.
        #[arg(long)]
        json: bool,
    },
    /// One key, as JSON.
    Show { name: String },
    /// A new token for a key; prints it once on stdout.
    Rotate {
        name: String,
        /// How long the old token keeps working (`1h`, `7d`); without it, it stops at once.
        #[arg(long)]
        grace: Option<String>,
    },
    /// Remove a key: refused from its next request.
    Revoke { name: String },
}

/// A key's fields, as `[[keys]]` names them.
#[derive(clap::Args, Default)]
pub struct Fields {
    /// A `[policies.NAME]` of the gateway's config to take limits from.
    #[arg(long)]
    pub policy: Option<String>,
    /// The group the key belongs to.
    #[arg(long)]
    pub group: Option<String>,
    /// Models the key may use: names, `prefix*` or `*` (repeat, or separate with commas).
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u64>,
    #[arg(long, value_name = "N")]
    pub max_n: Option<u64>,
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u64>,
    /// Requests per window, `REQUESTS/WINDOW`: `600/1m`.
    #[arg(long, value_name = "N/WINDOW")]
    pub rate: Option<String>,
    /// The rate's burst (default: its requests).
    #[arg(long, value_name = "N", requires = "rate")]
    pub burst: Option<u64>,
    /// A token quota, `TOKENS/WINDOW`: `100000/1d` (repeat for several windows).
    #[arg(long = "quota", value_name = "N/WINDOW")]
    pub quotas: Vec<String>,
}

impl Fields {
    /// The fields given, as the admin API takes them.
    fn to_json(&self) -> Result<Map<String, Value>, String> {
        let mut out = Map::new();
        let mut set = |field: &str, value: Option<Value>| {
            if let Some(value) = value {
                out.insert(field.to_owned(), value);
            }
        };
        set("policy", self.policy.clone().map(Value::from));
        set("group", self.group.clone().map(Value::from));
        set(
            "models",
            (!self.models.is_empty()).then(|| Value::from(self.models.clone())),
        );
        set("max_tokens", self.max_tokens.map(Value::from));
        set("max_n", self.max_n.map(Value::from));
        set("concurrency", self.concurrency.map(Value::from));
        if let Some(rate) = &self.rate {
            let (requests, per) = per_window(rate, "--rate")?;
            let mut rate = json!({"requests": requests, "per": per});
            if let Some(burst) = self.burst {
                rate["burst"] = burst.into();
            }
            set("rate", Some(rate));
        }
        if !self.quotas.is_empty() {
            let mut quotas = Vec::new();
            for quota in &self.quotas {
                let (tokens, per) = per_window(quota, "--quota")?;
                quotas.push(json!({"tokens": tokens, "per": per}));
            }
            set("quotas", Some(Value::from(quotas)));
        }
        Ok(out)
    }
}

/// `600/1m` → (600, "1m"); the window is checked by the gateway, in the config's words.
fn per_window(text: &str, flag: &str) -> Result<(u64, String), String> {
    text.split_once('/')
        .and_then(|(n, per)| Some((n.trim().parse().ok()?, per.trim().to_owned())))
        .ok_or_else(|| format!("{flag} {text:?}: write it as N/WINDOW, e.g. 600/1m"))
}

pub fn run(args: KeysArgs) -> ExitCode {
    let runtime = match super::control_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(call(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tollgate: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn call(args: KeysArgs) -> Result<(), String> {
    let admin = AdminClient::new(&args.admin, args.ca_file.as_deref())?;
    match args.command {
        KeysCommand::Create { name, fields } => {
            let mut body = fields.to_json()?;
            body.insert("name".into(), name.clone().into());
            let answer = admin.send(Method::POST, "/admin/keys", Some(body)).await?;
            print_token(&answer, &format!("key {name} created"))
        }
        KeysCommand::Update {
            name,
            fields,
            unset,
        } => {
            let mut body = fields.to_json()?;
            for field in unset {
                body.insert(field, Value::Null);
            }
            let path = format!("/admin/keys/{name}");
            let answer = admin.send(Method::PATCH, &path, Some(body)).await?;
            print_json(&answer);
            Ok(())
        }
        KeysCommand::List { json } => {
            let answer = admin.send(Method::GET, "/admin/keys", None).await?;
            if json {
                print_json(&answer);
            } else {
                print_table(&answer);
            }
            Ok(())
        }
        KeysCommand::Show { name } => {
            let path = format!("/admin/keys/{name}");
            print_json(&admin.send(Method::GET, &path, None).await?);
            Ok(())
        }
        KeysCommand::Rotate { name, grace } => {
            let mut body = Map::new();
            if let Some(grace) = grace {
                body.insert("grace".into(), grace.into());
            }
            let path = format!("/admin/keys/{name}/rotate");
            let answer = admin.send(Method::POST, &path, Some(body)).await?;
            let old = match answer["previous_key_valid_until"].as_str() {
                Some(until) => format!("the old key works until {until}"),
                None => "the old key no longer works".to_owned(),
            };
            print_token(&answer, &format!("key {name} rotated; {old}"))
        }
        KeysCommand::Revoke { name } => {
            let path = format!("/admin/keys/{name}");
            admin.send(Method::DELETE, &path, None).await?;
            eprintln!("key {name} revoked");
            Ok(())
        }
    }
}

/// The new key alone on stdout (for `$(…)`), what happened on stderr.
fn print_token(answer: &Value, what: &str) -> Result<(), String> {
    let token = answer["key"]
        .as_str()
        .ok_or("the gateway's answer holds no key")?;
    eprintln!("{what} (the key is shown once; hand it to the client, store it nowhere else):");
    println!("{token}");
    Ok(())
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// One line per key: name, where it is defined, and its limits in brief.
fn print_table(answer: &Value) {
    println!(
        "{:<24} {:<7} {:<20} {:>10} {:>11}  quotas",
        "NAME", "SOURCE", "MODELS", "MAX_TOKENS", "CONCURRENCY"
    );
    let none = Vec::new();
    for key in answer["keys"].as_array().unwrap_or(&none) {
        let limits = &key["limits"];
        let shown = |v: &Value| match v {
            Value::Null => "-".to_owned(),
            other => other.to_string(),
        };
        let models: Vec<&str> = limits["models"]
            .as_array()
            .unwrap_or(&none)
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let quotas: Vec<String> = limits["quotas"]
            .as_array()
            .unwrap_or(&none)
            .iter()
            .map(|q| format!("{}/{}", q["tokens"], q["window"].as_str().unwrap_or("?")))
            .collect();
        println!(
            "{:<24} {:<7} {:<20} {:>10} {:>11}  {}",
            key["name"].as_str().unwrap_or("?"),
            key["source"].as_str().unwrap_or("?"),
            models.join(","),
            shown(&limits["max_tokens"]),
            shown(&limits["concurrency"]),
            quotas.join(" ")
        );
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The admin API at a base URL, with the token from the environment.
struct AdminClient {
    base: String,
    token: String,
    client: Client<Connector, Full<Bytes>>,
}

impl AdminClient {
    fn new(base: &str, ca_file: Option<&std::path::Path>) -> Result<AdminClient, String> {
        let token = std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("set {ADMIN_TOKEN_ENV} to the gateway's admin token"))?;
        let tls =
            crate::proxy::client::client_tls(ca_file, "--ca-file").map_err(|e| e.to_string())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// One call; its JSON answer (`null` for an empty one), or the gateway's refusal.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Map<String, Value>>,
    ) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let body = body.map_or_else(Bytes::new, |b| Bytes::from(Value::Object(b).to_string()));
        let request = Request::builder()
            .method(method)
            .uri(&url)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| format!("{url}: {e}"))?;
        let response = tokio::time::timeout(CALL_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("{url}: no answer within {CALL_TIMEOUT:?}"))?
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|_| format!("{url}: {status}, and the answer is not JSON"))?
        };
        if status.is_success() {
            return Ok(value);
        }
        let detail = value["detail"].as_str().unwrap_or("no detail");
        Err(match status {
            StatusCode::UNAUTHORIZED => {
                format!("{}: {detail} (check {ADMIN_TOKEN_ENV})", status.as_u16())
            }
            _ => format!("{}: {detail}", status.as_u16()),
        })
    }
}
