//! Reading the config text into [`RawConfig`], and saying what serde found wrong in the words of
//! the file: `test.toml:7: keys[0].concurrency: expected an integer, found the string "4"`,
//! `test.toml:9: state.backend: expected "local" or "redis", found "sqlite"`.
//!
//! Edge cases: the fields serde uses inside a [`toml::Spanned`] value
//! (`$__serde_spanned_private_value`) never show in a key path; serde's `invalid type: …,
//! expected u32` becomes `expected an integer, found …`, with Rust type names (`u32`,
//! `struct RawRate`, `a sequence`, `a map`) put as TOML says them (an integer, a table, an
//! array). A message serde phrased some other way is passed on as it is.

use std::fmt::Write;

use serde::de::DeserializeOwned;
use serde_path_to_error::{Path, Segment};

use super::raw::{RawConfig, RawKey};
use super::source::line_of;
use super::ConfigError;

/// The fields serde reads a `Spanned` value through; never part of a key path in the file.
const SPANNED_FIELD_PREFIX: &str = "$__serde_spanned_private_";

pub(super) fn parse_raw(source: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    deserialize(source, Some(origin))
}

/// One `[[keys]]` entry's fields on their own (a key made through the admin API), with the
/// config's messages but no file or line: `max_tokens: expected an integer, found the string "4"`.
pub(super) fn parse_key(source: &str) -> Result<RawKey, ConfigError> {
    deserialize(source, None)
}

fn deserialize<T: DeserializeOwned>(source: &str, origin: Option<&str>) -> Result<T, ConfigError> {
    let deserializer = toml::Deserializer::new(source);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = key_path(err.path());
        let inner = err.into_inner();
        let line = inner.span().map(|span| line_of(source, span.start));
        let message = plain_message(inner.message());
        let place = match (origin, line) {
            (Some(origin), Some(line)) => format!("{origin}:{line}: "),
            (Some(origin), None) => format!("{origin}: "),
            (None, _) => String::new(),
        };
        if path.is_empty() {
            ConfigError(format!("{place}{message}"))
        } else {
            ConfigError(format!("{place}{path}: {message}"))
        }
    })
}

/// The key as the file writes it: `keys[0].rate.requests`; empty at the top level.
fn key_path(path: &Path) -> String {
    let mut out = String::new();
    for segment in path {
        let name = match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
                continue;
            }
            Segment::Map { key } | Segment::Enum { variant: key } => key.as_str(),
            Segment::Unknown => "?",
        };
        if name.starts_with(SPANNED_FIELD_PREFIX) {
            continue;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(name);
    }
    out
}

/// serde's `invalid type` / `invalid value` / `unknown variant` messages as `expected …, found …`.
fn plain_message(message: &str) -> String {
    // `unknown variant `x`, expected `a` or `b``: the choices as the file writes strings.
    if let Some((found, choices)) = message
        .strip_prefix("unknown variant `")
        .and_then(|rest| rest.split_once("`, expected "))
    {
        return format!("expected {}, found \"{found}\"", choices.replace('`', "\""));
    }
    let (kind, rest) = if let Some(rest) = message.strip_prefix("invalid type: ") {
        (Mismatch::Type, rest)
    } else if let Some(rest) = message.strip_prefix("invalid value: ") {
        (Mismatch::Value, rest)
    } else {
        return message.to_owned();
    };
    match rest.rsplit_once(", expected ") {
        Some((found, expected)) => format!(
            "expected {}, found {}",
            expected_words(expected, kind),
            found_words(found)
        ),
        None => message.to_owned(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mismatch {
    /// The wrong kind of value (a string for a number).
    Type,
    /// The right kind, out of range (-1 for an unsigned number).
    Value,
}

/// What serde expected (a Rust type or a visitor's words), as TOML says it.
fn expected_words(expected: &str, kind: Mismatch) -> String {
    let words = match (expected, kind) {
        ("u8", Mismatch::Value) => return format!("an integer from 0 to {}", u8::MAX),
        ("u16", Mismatch::Value) => return format!("an integer from 0 to {}", u16::MAX),
        ("u32", Mismatch::Value) => return format!("an integer from 0 to {}", u32::MAX),
        ("u64" | "u128" | "usize", Mismatch::Value) => "an integer of 0 or more",
        (
            "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "i8" | "i16" | "i32" | "i64" | "i128"
            | "isize",
            _,
        ) => "an integer",
        ("f32" | "f64", _) => "a number",
        ("a boolean", _) => "true or false",
        ("socket address", _) => "an address such as \"127.0.0.1:8080\"",
        ("a duration", _) => "a duration such as \"30s\" or \"5m\"",
        ("a sequence", _) => "an array",
        ("a map", _) => "a table",
        ("path string", _) => "a path",
        (other, _) if other.starts_with("struct ") => "a table",
        (other, _) => other,
    };
    words.to_owned()
}

/// What the file held (serde's `Unexpected`), as TOML says it.
fn found_words(found: &str) -> String {
    // serde writes scalars as `kind `value``, strings as `string "value"`.
    let scalar = |prefix: &str| {
        found
            .strip_prefix(prefix)
            .and_then(|v| v.strip_prefix('`'))
            .and_then(|v| v.strip_suffix('`'))
            .map(str::to_owned)
    };
    if let Some(value) = scalar("integer ") {
        return format!("the integer {value}");
    }
    if let Some(value) = scalar("floating point ") {
        return format!("the number {value}");
    }
    if let Some(value) = scalar("boolean ") {
        return value;
    }
    if let Some(value) = found.strip_prefix("string ") {
        return format!("the string {value}");
    }
    match found {
        "sequence" => "an array".to_owned(),
        "map" => "a table".to_owned(),
        other => other.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::plain_message;

    #[test]
    fn serde_mismatches_are_said_in_toml_words() {
        for (serde, plain) in [
            (
                "invalid type: string \"4\", expected u32",
                "expected an integer, found the string \"4\"",
            ),
            (
                "invalid value: integer `-1`, expected u32",
                "expected an integer from 0 to 4294967295, found the integer -1",
            ),
            (
                "invalid value: integer `-1`, expected u64",
                "expected an integer of 0 or more, found the integer -1",
            ),
            (
                "invalid type: floating point `1.5`, expected u32",
                "expected an integer, found the number 1.5",
            ),
            (
                "invalid type: string \"yes\", expected a boolean",
                "expected true or false, found the string \"yes\"",
            ),
            (
                "invalid type: integer `5`, expected struct RawRate",
                "expected a table, found the integer 5",
            ),
            (
                "invalid type: map, expected a sequence",
                "expected an array, found a table",
            ),
            (
                "invalid type: boolean `true`, expected a string",
                "expected a string, found true",
            ),
            (
                "unknown variant `sqlite`, expected `local` or `redis`",
                "expected \"local\" or \"redis\", found \"sqlite\"",
            ),
            (
                "unknown variant `x`, expected one of `a`, `b`, `c`",
                "expected one of \"a\", \"b\", \"c\", found \"x\"",
            ),
            ("missing field `url`", "missing field `url`"),
        ] {
            assert_eq!(plain_message(serde), plain, "{serde}");
        }
    }
}
