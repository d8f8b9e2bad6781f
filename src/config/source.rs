//! Where a config problem is: the text's origin (its file name) and the line of a key, so that
//! every error reads `FILE:LINE: key.path: what is wrong`.

use std::ops::Range;

use super::ConfigError;

/// The config text and where it came from, to place an error at its line.
pub(super) struct Source<'a> {
    text: &'a str,
    /// `None` for the fields of a key made through the admin API: no file, no line.
    origin: Option<&'a str>,
}

impl<'a> Source<'a> {
    pub(super) fn new(text: &'a str, origin: &'a str) -> Self {
        Source {
            text,
            origin: Some(origin),
        }
    }

    /// A request body's key fields: errors read `key: msg`, as in the file but without a place.
    pub(super) fn body(text: &'a str) -> Self {
        Source { text, origin: None }
    }

    /// An error at a key: `ORIGIN:LINE: key: msg`.
    pub(super) fn at(&self, span: Range<usize>, key: &str, msg: String) -> ConfigError {
        match self.origin {
            Some(origin) => ConfigError(format!(
                "{origin}:{}: {key}: {msg}",
                line_of(self.text, span.start)
            )),
            None => ConfigError(format!("{key}: {msg}")),
        }
    }

    /// The text at `span`, as the file writes it.
    pub(super) fn text_at(&self, span: Range<usize>) -> &'a str {
        self.text.get(span).unwrap_or("")
    }

    /// An error without a line (a default, or a value serde does not place): `ORIGIN: msg`.
    pub(super) fn whole(&self, msg: &str) -> ConfigError {
        match self.origin {
            Some(origin) => ConfigError(format!("{origin}: {msg}")),
            None => ConfigError(msg.to_owned()),
        }
    }
}

/// The 1-based line of a byte offset.
pub(super) fn line_of(source: &str, offset: usize) -> usize {
    source
        .get(..offset)
        .map_or(0, |before| before.matches('\n').count())
        + 1
}
