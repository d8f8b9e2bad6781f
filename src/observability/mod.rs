//! What the gateway tells its operators: Prometheus [`metrics`] (with their fixed [`labels`]), each request's access line and
//! request metrics ([`access`]), the log lines — their text layout ([`log_format`]) and the
//! batched writer that puts them on stdout ([`log_writer`]) — and what the console shows of the
//! recent past: the per-second [`timeline`] and the [`recent`] requests; and OpenTelemetry spans
//! ([`traces`]).

pub(crate) mod access;
pub(crate) mod key_series;
pub(crate) mod labels;
pub(crate) mod log_format;
pub(crate) mod log_writer;
pub mod metrics;
pub mod timeline;
pub(crate) mod traces;

use self::log_format::PlainText;
use self::log_writer::{BatchedStdout, FlushGuard};

/// Log format: human-readable text, or one JSON object per line for machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stdout through the batched writer ([`log_writer`]); the guard writes out what is
/// still buffered when `main` returns.
pub fn init_tracing(format: LogFormat) -> std::io::Result<FlushGuard> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = BatchedStdout::start()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text if ansi => builder.init(),
        LogFormat::Text => builder.event_format(PlainText).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(guard)
}
