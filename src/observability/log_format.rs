//! The text log line: the layout of tracing-subscriber's default format without colours,
//!
//! ```text
//! 2026-11-22T17:47:39.894588Z  INFO tollgate::access: request_id="…" method=POST status=200 …
//! ```
//!
//! written without that formatter's styling machinery. With colours off, the default format
//! still paints every field name and separator through `nu_ansi_term` (empty styles, but a
//! formatter call each); for the access log's dozen fields that was a quarter of the line's cost,
//! and the access log runs once per request. The output is the same byte for byte (a test holds
//! the two side by side). On a terminal, `main` keeps the default format, with colours.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// `FormatEvent` for plain-text logs (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PlainText;

impl<S, N> FormatEvent<S, N> for PlainText
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        SystemTime.format_time(&mut writer)?;
        write!(writer, " {:>5} ", meta.level().as_str())?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                writer.write_char(':')?;
            }
            writer.write_char(' ')?;
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = Fields {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// Writes `message name=value …` as tracing-subscriber's default visitor does: the message
/// bare, every other value with `Debug` (so strings are quoted and escaped; values logged with
/// `%` are written with `Display`).
struct Fields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let sanitize = self.writer.sanitizes_ansi_escapes();
        let message = Escaped::new(DisplayAsDebug(value), sanitize);
        match value.source() {
            None => self.record_debug(field, &message),
            Some(source) => self.record_debug(
                field,
                &format_args!(
                    "{message:?} {}.sources={:?}",
                    field.name(),
                    Sources {
                        first: source,
                        sanitize
                    }
                ),
            ),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        if !std::mem::take(&mut self.first) {
            self.result = self.writer.write_char(' ');
        }
        let sanitize = self.writer.sanitizes_ansi_escapes();
        self.result = self.result.and_then(|()| match field.name() {
            "message" => write!(self.writer, "{:?}", Escaped::new(value, sanitize)),
            name => {
                let name = name.strip_prefix("r#").unwrap_or(name);
                write!(self.writer, "{name}={value:?}")
            }
        });
    }
}

/// `Debug` that prints the `Display` form (an error's message, unquoted).
struct DisplayAsDebug<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Debug for DisplayAsDebug<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.0, f)
    }
}

/// An error's chain of causes, `[cause, its cause, …]`.
struct Sources<'a> {
    first: &'a (dyn std::error::Error + 'static),
    sanitize: bool,
}

impl fmt::Debug for Sources<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut cause = Some(self.first);
        while let Some(error) = cause {
            list.entry(&Escaped::new(DisplayAsDebug(error), self.sanitize));
            cause = error.source();
        }
        list.finish()
    }
}

/// Writes `value` with terminal control characters spelled out, as tracing-subscriber does for
/// messages and errors: a logged message cannot drive the terminal that shows the log.
struct Escaped<T> {
    value: T,
    sanitize: bool,
}

impl<T> Escaped<T> {
    fn new(value: T, sanitize: bool) -> Self {
        Escaped { value, sanitize }
    }
}

impl<T: fmt::Debug> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sanitize {
            write!(EscapeControls(f), "{:?}", self.value)
        } else {
            write!(f, "{:?}", self.value)
        }
    }
}

struct EscapeControls<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapeControls<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", ch as u32)?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex, PoisonError};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Events of every kind the gateway logs: a message with fields, the access line, an
    /// error, an option, escapes.
    fn log_samples() {
        let error = std::io::Error::other("upstream refused");
        tracing::info!(listen = %"127.0.0.1:8080", workers = 2, "tollgate serving");
        tracing::info!(
            target: "tollgate::access",
            request_id = "a \"quoted\" id\nwith a newline",
            method = %http::Method::POST,
            path = ?"/v1/chat/completions",
            status = 200u16,
            duration_ms = 0.412,
            key = %"team-a",
            outcome = %"complete",
            error = Option::<&str>::None,
            r#type = "x",
        );
        tracing::warn!(%error, "accept failed");
        tracing::error!(
            error = &error as &dyn std::error::Error,
            "with an error value"
        );
        tracing::debug!(ok = true, n = -3i64, "debug line");
        tracing::warn!("a message with \x1b[31mescapes\x07 and \u{9b}C1");
        let chained = std::io::Error::other(ChainedError(std::io::Error::other("root \x1b cause")));
        tracing::error!(error = &chained as &dyn std::error::Error, "with causes");
    }

    /// An error with a cause.
    #[derive(Debug)]
    struct ChainedError(std::io::Error);

    impl fmt::Display for ChainedError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }

    impl std::error::Error for ChainedError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// Everything after the timestamp, line by line.
    fn without_timestamps(bytes: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(bytes)
            .lines()
            .map(|line| line.split_once(' ').map_or("", |(_, rest)| rest).to_owned())
            .collect()
    }

    #[test]
    fn lines_match_the_default_format_without_colours() {
        let ours = Captured::default();
        let theirs = Captured::default();
        let subscriber = |out: Captured| {
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || out.clone())
        };
        tracing::subscriber::with_default(
            subscriber(ours.clone()).event_format(PlainText).finish(),
            log_samples,
        );
        tracing::subscriber::with_default(subscriber(theirs.clone()).finish(), log_samples);
        let ours = ours.0.lock().expect("captured").clone();
        let theirs = theirs.0.lock().expect("captured").clone();
        assert_eq!(
            without_timestamps(&ours).len(),
            7,
            "every event is one line"
        );
        assert_eq!(without_timestamps(&ours), without_timestamps(&theirs));
        assert!(
            ours.starts_with(b"20") && ours[..30].contains(&b'Z'),
            "an RFC 3339 UTC timestamp first: {}",
            String::from_utf8_lossy(&ours)
        );
    }
}
