//! `[telemetry]`: where the gateway's OpenTelemetry spans go (OTLP over HTTP, protobuf), under
//! which service name, and how many of the traces that start here are kept.
//!
//! No section, no tracing. Each key the file leaves out falls back to the standard variable
//! (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`), then to a default; the file speaks
//! first, as OpenTelemetry's SDKs let code override the environment.
//!
//! Edge cases: `sample_ratio` outside 0..=1 (or not a number) is refused; the endpoint must be an
//! `http://` or `https://` URL with a host; a base URL gets OTLP's `/v1/traces` path appended,
//! one that names it already is kept; `headers_env` names a variable that must be set and hold
//! `name=value` pairs separated by commas (the OTLP variables' own form), whose values are
//! secrets and never print.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::source::Source;
use super::{ConfigError, Secret};

/// The OTLP/HTTP port collectors, Jaeger and Tempo listen on.
const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4318";
const DEFAULT_SERVICE: &str = "tollgate";
/// OTLP/HTTP's path for spans, appended to a base URL.
const TRACES_PATH: &str = "/v1/traces";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    otlp_endpoint: Option<Spanned<String>>,
    service_name: Option<Spanned<String>>,
    #[serde(default = "default_ratio")]
    sample_ratio: Spanned<f64>,
    headers_env: Option<Spanned<String>>,
    /// How long spans wait to be sent in a batch (the SDKs' `OTEL_BSP_SCHEDULE_DELAY`).
    #[serde(default = "default_batch_delay", with = "humantime_serde")]
    batch_delay: Duration,
    /// Spans waiting to be sent; more are dropped, and counted.
    #[serde(default = "default_queue_size")]
    queue_size: Spanned<usize>,
}

fn default_ratio() -> Spanned<f64> {
    Spanned::new(0..0, 1.0)
}

fn default_batch_delay() -> Duration {
    Duration::from_secs(5)
}

fn default_queue_size() -> Spanned<usize> {
    Spanned::new(0..0, 2048)
}

/// The validated `[telemetry]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The full URL spans are posted to (`…/v1/traces`).
    pub(crate) endpoint: String,
    pub(crate) service_name: String,
    /// The share of new traces kept; a client's sampled or unsampled trace is followed.
    pub(crate) sample_ratio: f64,
    /// Headers for the collector (its credentials), from `headers_env`.
    pub(crate) headers: Vec<(String, Secret)>,
    pub(crate) headers_env: Option<String>,
    pub(crate) batch_delay: Duration,
    pub(crate) queue_size: usize,
}

pub(super) fn telemetry(raw: RawTelemetry, src: &Source) -> Result<TelemetryConfig, ConfigError> {
    let ratio = raw.sample_ratio;
    if !(0.0..=1.0).contains(ratio.get_ref()) {
        return Err(src.at(
            ratio.span(),
            "telemetry.sample_ratio",
            format!("must be between 0.0 and 1.0, not {}", ratio.get_ref()),
        ));
    }
    let endpoint = match &raw.otlp_endpoint {
        Some(url) => traces_url(url.get_ref())
            .map_err(|why| src.at(url.span(), "telemetry.otlp_endpoint", why))?,
        None => {
            let base = env_value("OTEL_EXPORTER_OTLP_ENDPOINT");
            let base = base.as_deref().unwrap_or(DEFAULT_ENDPOINT);
            traces_url(base).map_err(|why| {
                ConfigError::new(format!("telemetry: OTEL_EXPORTER_OTLP_ENDPOINT: {why}"))
            })?
        }
    };
    let service_name = match &raw.service_name {
        Some(name) if name.get_ref().trim().is_empty() => {
            return Err(src.at(
                name.span(),
                "telemetry.service_name",
                "must not be empty".into(),
            ))
        }
        Some(name) => name.get_ref().clone(),
        None => env_value("OTEL_SERVICE_NAME").unwrap_or_else(|| DEFAULT_SERVICE.to_owned()),
    };
    let headers = match &raw.headers_env {
        Some(env) => headers(env, src)?,
        None => Vec::new(),
    };
    let queue_size = raw.queue_size;
    if *queue_size.get_ref() == 0 {
        return Err(src.at(
            queue_size.span(),
            "telemetry.queue_size",
            "must be at least 1".into(),
        ));
    }
    Ok(TelemetryConfig {
        endpoint,
        service_name,
        sample_ratio: *ratio.get_ref(),
        headers,
        headers_env: raw.headers_env.map(Spanned::into_inner),
        batch_delay: raw.batch_delay,
        queue_size: *queue_size.get_ref(),
    })
}

/// A variable's value, when it is set and not blank.
fn env_value(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|value| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// The URL spans are posted to, from a base URL or one that ends in `/v1/traces` already.
fn traces_url(url: &str) -> Result<String, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(format!(
            "{url:?} must be an http:// or https:// URL with a host"
        ));
    }
    let trimmed = url.trim_end_matches('/');
    Ok(if trimmed.ends_with(TRACES_PATH) {
        trimmed.to_owned()
    } else {
        format!("{trimmed}{TRACES_PATH}")
    })
}

/// The collector's headers from the variable `env` names: `name=value,name2=value2`.
fn headers(env: &Spanned<String>, src: &Source) -> Result<Vec<(String, Secret)>, ConfigError> {
    let key = "telemetry.headers_env";
    let name = env.get_ref();
    let value = env_value(name).ok_or_else(|| {
        src.at(
            env.span(),
            key,
            format!("environment variable {name} is not set; it must hold name=value pairs"),
        )
    })?;
    value
        .split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let (header, value) = pair.split_once('=').unwrap_or((pair, ""));
            let header = header.trim();
            let valid = http::HeaderName::from_bytes(header.as_bytes()).is_ok()
                && http::HeaderValue::from_str(value.trim()).is_ok()
                && !value.trim().is_empty();
            // The value is a credential: the message names the header only.
            match valid {
                true => Ok((header.to_owned(), Secret::new(value.trim().to_owned()))),
                false => Err(src.at(
                    env.span(),
                    key,
                    format!("environment variable {name}: {header:?} is not a name=value header"),
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parse(telemetry: &str) -> Result<Config, ConfigError> {
        let text = format!("[server]\n[upstream]\nurl = \"http://a\"\n[telemetry]\n{telemetry}\n");
        Config::parse(&text, "test.toml")
    }

    #[test]
    fn the_section_reads_into_the_exporter_settings_and_bad_values_are_refused() {
        std::env::set_var(
            "TOLLGATE_TELEMETRY_TEST_HEADERS",
            "x-token=s3cret, x-org = 7",
        );
        let config = parse(
            "otlp_endpoint = \"http://collector:4318\"\nservice_name = \"gw\"\n\
             sample_ratio = 0.25\nheaders_env = \"TOLLGATE_TELEMETRY_TEST_HEADERS\"\n\
             batch_delay = \"100ms\"\nqueue_size = 10",
        )
        .expect("valid");
        let telemetry = config.telemetry.expect("[telemetry] is on");
        assert_eq!(telemetry.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(telemetry.service_name, "gw");
        assert_eq!(telemetry.sample_ratio, 0.25);
        assert_eq!(telemetry.batch_delay, Duration::from_millis(100));
        assert_eq!(telemetry.queue_size, 10);
        let headers: Vec<(&str, &str)> = telemetry
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.expose()))
            .collect();
        assert_eq!(headers, [("x-token", "s3cret"), ("x-org", "7")]);
        assert!(
            !format!("{:?}", telemetry.headers).contains("s3cret"),
            "header values never print"
        );

        for (bad, says) in [
            (
                "sample_ratio = 1.5",
                "test.toml:5: telemetry.sample_ratio: must be between",
            ),
            (
                "otlp_endpoint = \"collector:4318\"",
                "telemetry.otlp_endpoint",
            ),
            ("queue_size = 0", "telemetry.queue_size: must be at least 1"),
            (
                "service_name = \" \"",
                "telemetry.service_name: must not be empty",
            ),
            (
                "headers_env = \"TOLLGATE_TELEMETRY_TEST_UNSET\"",
                "TOLLGATE_TELEMETRY_TEST_UNSET is not set",
            ),
            ("sample_rate = 0.5", "unknown field `sample_rate`"),
        ] {
            let error = parse(bad).expect_err(bad).to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn a_base_url_gets_the_traces_path_and_a_full_one_is_kept() {
        for (given, sent) in [
            ("http://collector:4318", "http://collector:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            ("https://tempo/otlp", "https://tempo/otlp/v1/traces"),
            ("http://c:4318/v1/traces", "http://c:4318/v1/traces"),
        ] {
            assert_eq!(traces_url(given).as_deref(), Ok(sent), "{given}");
        }
        for bad in ["collector:4318", "ftp://c/", "not a url", "/v1/traces"] {
            assert!(traces_url(bad).is_err(), "{bad} is refused");
        }
    }
}
