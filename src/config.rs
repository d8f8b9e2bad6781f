//! The config file: TOML read into [`RawConfig`] (exactly what the file says), then
//! [`Config::load`] turns it into the validated runtime [`Config`].
//!
//! Edge cases:
//! - Unknown keys anywhere are errors (`deny_unknown_fields`), reported with the key's line, so a
//!   section that belongs to a later feature is refused rather than silently ignored.
//! - Errors name the full key path (`upstream.url`) and the line in the file.
//! - Secrets never live in the file: `upstream.api_key_env` names an environment variable and
//!   `upstream.api_key_file` a file; the value is held in a [`Secret`] that never prints.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// The default config, embedded so that `tollgate serve` runs with no file at all.
pub const DEFAULT_CONFIG: &str = include_str!("../config/tollgate.toml");

/// A config problem, already phrased for the operator: `FILE:LINE: key.path: what is wrong`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

// === raw config: what the file says ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "defaults::listen")]
    listen: SocketAddr,
    #[serde(default = "defaults::admin_listen")]
    admin_listen: SocketAddr,
    #[serde(default = "defaults::max_body_bytes")]
    max_body_bytes: Spanned<u64>,
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    shutdown_timeout: Duration,
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    header_read_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Spanned<String>,
    api_key_env: Option<Spanned<String>>,
    api_key_file: Option<Spanned<String>>,
    /// Extra trusted CA certificates (PEM), for an upstream behind a private CA.
    ca_file: Option<std::path::PathBuf>,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    connect_timeout: Duration,
    #[serde(
        default = "defaults::response_header_timeout",
        with = "humantime_serde"
    )]
    response_header_timeout: Duration,
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    idle_timeout: Duration,
    #[serde(default = "defaults::pool_idle_timeout", with = "humantime_serde")]
    pool_idle_timeout: Duration,
    #[serde(default = "defaults::pool_max_idle_per_host")]
    pool_max_idle_per_host: usize,
}

mod defaults {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;
    use toml::Spanned;

    pub fn listen() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 8080))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 9090))
    }
    pub fn max_body_bytes() -> Spanned<u64> {
        Spanned::new(0..0, 4 * 1024 * 1024)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    /// A non-streamed completion sends its headers only when the whole answer is generated.
    pub fn response_header_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn pool_idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn pool_max_idle_per_host() -> usize {
        256
    }
}

// === runtime config ===

/// The validated config the gateway runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_body_bytes: usize,
    /// How long in-flight requests and streams may run on after SIGTERM before they are cut.
    pub shutdown_timeout: Duration,
    /// A client must finish sending request headers within this time (slowloris guard).
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    /// The base path without a trailing slash: "" or e.g. "/openai".
    pub base_path: String,
    /// The gateway's own credential, sent as `Authorization: Bearer …`.
    pub api_key: Option<Secret>,
    /// Where the credential should have come from, for messages when it is missing.
    pub api_key_source: Option<String>,
    /// Extra trusted CA certificates (PEM) besides the system's and the webpki roots.
    pub ca_file: Option<std::path::PathBuf>,
    pub connect_timeout: Duration,
    pub response_header_timeout: Duration,
    pub idle_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

impl UpstreamConfig {
    /// `scheme://authority/base_path` as configured, for logs and `tollgate check`.
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))?;
        Config::parse(&source, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in error messages.
    pub fn parse(source: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw = parse_raw(source, origin)?;
        let at = |span: std::ops::Range<usize>, key: &str, msg: String| {
            ConfigError(format!(
                "{origin}:{}: {key}: {msg}",
                line_of(source, span.start)
            ))
        };

        let max_body = raw.server.max_body_bytes;
        if *max_body.get_ref() == 0 {
            return Err(at(
                max_body.span(),
                "server.max_body_bytes",
                "must be greater than 0".into(),
            ));
        }
        let max_body_bytes = usize::try_from(*max_body.get_ref()).map_err(|_| {
            at(
                max_body.span(),
                "server.max_body_bytes",
                "is larger than this machine can address".into(),
            )
        })?;

        let (scheme, authority, base_path) = parse_upstream_url(raw.upstream.url.get_ref())
            .map_err(|msg| at(raw.upstream.url.span(), "upstream.url", msg))?;

        let (api_key, api_key_source) = match (raw.upstream.api_key_env, raw.upstream.api_key_file)
        {
            (Some(_), Some(file)) => {
                return Err(at(
                    file.span(),
                    "upstream.api_key_file",
                    "set either api_key_env or api_key_file, not both".into(),
                ))
            }
            (Some(env), None) => {
                let name = env.get_ref();
                if name.is_empty() {
                    return Err(at(
                        env.span(),
                        "upstream.api_key_env",
                        "must name an environment variable".into(),
                    ));
                }
                let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty());
                (
                    value.map(|v| Secret(v.trim().to_owned())),
                    Some(format!("environment variable {name}")),
                )
            }
            (None, Some(file)) => {
                let value = std::fs::read_to_string(file.get_ref()).map_err(|e| {
                    at(
                        file.span(),
                        "upstream.api_key_file",
                        format!("cannot read {}: {e}", file.get_ref()),
                    )
                })?;
                let value = value.trim().to_owned();
                if value.is_empty() {
                    return Err(at(
                        file.span(),
                        "upstream.api_key_file",
                        format!("{} is empty", file.get_ref()),
                    ));
                }
                (
                    Some(Secret(value)),
                    Some(format!("file {}", file.get_ref())),
                )
            }
            (None, None) => (None, None),
        };

        Ok(Config {
            server: ServerConfig {
                listen: raw.server.listen,
                admin_listen: raw.server.admin_listen,
                max_body_bytes,
                shutdown_timeout: raw.server.shutdown_timeout,
                header_read_timeout: raw.server.header_read_timeout,
            },
            upstream: UpstreamConfig {
                scheme,
                authority,
                base_path,
                api_key,
                api_key_source,
                ca_file: raw.upstream.ca_file,
                connect_timeout: raw.upstream.connect_timeout,
                response_header_timeout: raw.upstream.response_header_timeout,
                idle_timeout: raw.upstream.idle_timeout,
                pool_idle_timeout: raw.upstream.pool_idle_timeout,
                pool_max_idle_per_host: raw.upstream.pool_max_idle_per_host,
            },
        })
    }

    /// Problems that do not stop the gateway but that an operator should hear about.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let (None, Some(source)) = (&self.upstream.api_key, &self.upstream.api_key_source) {
            warnings.push(format!(
                "upstream credential missing: {source} is not set; requests reach the upstream without Authorization"
            ));
        }
        warnings
    }
}

fn parse_raw(source: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    let deserializer = toml::Deserializer::new(source);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let line = inner.span().map(|span| line_of(source, span.start));
        let message = inner.message().to_owned();
        match (line, path.as_str()) {
            (Some(line), ".") => ConfigError(format!("{origin}:{line}: {message}")),
            (Some(line), path) => ConfigError(format!("{origin}:{line}: {path}: {message}")),
            (None, ".") => ConfigError(format!("{origin}: {message}")),
            (None, path) => ConfigError(format!("{origin}: {path}: {message}")),
        }
    })
}

/// The 1-based line of a byte offset.
fn line_of(source: &str, offset: usize) -> usize {
    source
        .get(..offset)
        .map_or(0, |before| before.matches('\n').count())
        + 1
}

fn parse_upstream_url(
    url: &str,
) -> Result<(http::uri::Scheme, http::uri::Authority, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{url:?} needs a scheme, http:// or https://"))?;
    if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
        return Err(format!("{url:?}: the scheme must be http or https"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{url:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?}: credentials in the URL are not allowed; use api_key_env"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("{url:?}: a base URL takes no query string"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme, authority, base_path))
}

#[cfg(test)]
mod tests {
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
        assert_eq!(config.server.listen, defaults::listen());
        assert_eq!(config.server.admin_listen, defaults::admin_listen());
        assert_eq!(config.upstream.base_path, "");
        assert_eq!(config.upstream.response_header_timeout.as_secs(), 300);
        assert!(config.upstream.api_key.is_none());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse(
            "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n[upstream]\nurl = \"http://a\"\n",
        )
        .expect_err("unknown key must fail");
        let msg = err.to_string();
        assert!(msg.contains("test.toml:3"), "line missing in {msg:?}");
        assert!(msg.contains("lisen"), "key missing in {msg:?}");
    }

    #[test]
    fn later_sections_are_rejected_until_supported() {
        let err = parse("[server]\n[upstream]\nurl = \"http://a\"\n[ledger]\npath = \"x\"\n")
            .expect_err("unsupported section must fail");
        assert!(err.to_string().contains("ledger"), "{err}");
    }

    #[test]
    fn bad_url_names_key_and_line() {
        let err = parse("[server]\n[upstream]\n\nurl = \"ftp://example.com\"\n")
            .expect_err("ftp must fail");
        let msg = err.to_string();
        assert!(msg.starts_with("test.toml:4: upstream.url:"), "{msg}");
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

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("sk-very-secret".into());
        assert_eq!(format!("{secret:?} {secret}"), "***** *****");
    }
}
