//! Usage and generated text read from a JSON answer: a complete `chat.completion` or
//! `text_completion` body, or one SSE chunk (the observer reads its events with the same code).
//!
//! Generated text is counted by a lexical walk ([`Cursor`]) that goes only into `choices` and skips
//! the rest without validating it; usage is read by serde, leniently, and only from JSON that is
//! valid as a whole.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::cursor::{escaped_chars, Cursor};
use super::search::may_hold_usage_object;
use super::{TokenCount, Usage};

/// Reads the top-level `usage` of a complete JSON response body (`chat.completion`,
/// `text_completion`). `None` when the body is not JSON, or `usage` is absent, null or names
/// neither `prompt_tokens` nor `completion_tokens`.
pub(crate) fn usage_from_json(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<UsageOnly>(body).ok()?.usage.0
}

/// Characters of generated text in a complete JSON response body: `choices[].message.content`,
/// `choices[].text`, reasoning, refusals and tool calls, as [`SseObserver::completion_chars`]
/// counts them in a stream (and as leniently). 0 when the body is not a JSON object.
pub(crate) fn completion_chars_from_json(body: &[u8]) -> u64 {
    scan_chunk(body).map_or(0, |scan| scan.chars)
}

// === Reading chunks ===
//
// `observe` runs on every event of every stream, so the generated text is counted by a lexical
// walk (`Cursor`) that descends only into `choices[]` and skips everything else without
// allocating; serde reads (and validates) only an event that carries a `usage` object, about one
// per stream.

/// What one chunk (or complete body) holds for accounting.
pub(super) struct ChunkScan {
    /// Characters of generated text (see [`super::SseObserver::completion_chars`]).
    pub(super) chars: u64,
    /// A top-level `usage` member whose value is an object.
    pub(super) usage_object: bool,
}

/// Scans a JSON chunk or body. `None` when it is not a JSON object as far as the walk can tell
/// (the walk does not validate what it skips, so a broken event may still count its text).
pub(super) fn scan_chunk(json: &[u8]) -> Option<ChunkScan> {
    scan_chunk_after(json, None)
}

/// The bytes a stream's last chunk had before its `choices` key, and that key's opening quote,
/// kept by [`scan_chunk_after`].
/// A stream's chunks repeat their metadata (`id`, `object`, `created`, `model`, …), so a chunk
/// that starts with those same bytes is walked from its `choices` on: the walk is forward-only
/// and reads nothing but the bytes it passes, so over the same bytes it reaches `choices` in the
/// same state, and skipping them changes nothing it finds.
#[derive(Debug, Default)]
pub(super) struct Prefix(Vec<u8>);

/// Longer metadata is walked every time: the prefix copy should stay small.
const MAX_PREFIX: usize = 512;

/// [`scan_chunk`] for a stream's chunk: skips the bytes before `choices` when they repeat the
/// last chunk's (see [`Prefix`]), and keeps this chunk's for the next.
pub(super) fn scan_chunk_after(json: &[u8], prefix: Option<&mut Prefix>) -> Option<ChunkScan> {
    let mut scan = ChunkScan {
        chars: 0,
        usage_object: false,
    };
    // Without a usage object anywhere (most chunks; `"usage": null` is no object), nothing after
    // `choices` matters: stop there. One vectorised search saves walking the metadata that
    // follows (llama.cpp puts `choices` first).
    let may_have_usage = may_hold_usage_object(json);
    let mut stopped = false;
    // Where `choices` starts, when nothing before it touched `scan` (no `usage` member).
    let mut choices_at = None;
    let mut usage_before = false;
    let mut member = |key: &[u8], key_start: usize, c: &mut Cursor| match key {
        b"choices" => {
            if !usage_before {
                choices_at.get_or_insert(key_start);
            }
            c.each_element(|c| {
                scan.chars += choice_chars(c)?;
                Some(())
            })?;
            stopped = !may_have_usage;
            if stopped {
                None
            } else {
                Some(())
            }
        }
        b"usage" => {
            usage_before = true;
            scan.usage_object = c.peek() == Some(b'{');
            c.skip_value()
        }
        _ => c.skip_value(),
    };
    let known = prefix
        .as_deref()
        .map(|p| p.0.as_slice())
        .filter(|p| !p.is_empty() && json.starts_with(p))
        .map(|p| p.len() - 1);
    let walked = match known {
        Some(at) => Cursor::resume(json, at).members(&mut member),
        None => Cursor::new(json).object(&mut member),
    };
    let scanned = (walked.is_some() || stopped).then_some(scan);
    if let (Some(prefix), None) = (prefix, known) {
        prefix.0.clear();
        if let Some(at) = choices_at.filter(|&at| at <= MAX_PREFIX) {
            // With the key's opening quote: the walk's last look (where whitespace ends).
            prefix.0.extend_from_slice(&json[..=at]);
        }
    }
    scanned
}

/// `choices[i]`: `delta` (streams), `message` (bodies), `text` (legacy completions).
fn choice_chars(c: &mut Cursor) -> Option<u64> {
    let mut chars = 0;
    c.each_member(|key, _, c| {
        match key {
            b"delta" | b"message" => chars += message_chars(c)?,
            b"text" => chars += text_chars(c)?,
            _ => c.skip_value()?,
        }
        Some(())
    })?;
    Some(chars)
}

/// A delta or message: its content, reasoning, refusal and tool calls.
fn message_chars(c: &mut Cursor) -> Option<u64> {
    let mut chars = 0;
    c.each_member(|key, _, c| {
        match key {
            b"content" | b"reasoning_content" | b"reasoning" | b"refusal" => {
                chars += text_chars(c)?;
            }
            b"tool_calls" => c.each_element(|c| {
                c.each_member(|key, _, c| match key {
                    b"function" => {
                        chars += function_chars(c)?;
                        Some(())
                    }
                    _ => c.skip_value(),
                })
            })?,
            b"function_call" => chars += function_chars(c)?,
            _ => c.skip_value()?,
        }
        Some(())
    })?;
    Some(chars)
}

/// A function call: its name and arguments.
fn function_chars(c: &mut Cursor) -> Option<u64> {
    let mut chars = 0;
    c.each_member(|key, _, c| {
        match key {
            b"name" | b"arguments" => chars += string_chars(c)?,
            _ => c.skip_value()?,
        }
        Some(())
    })?;
    Some(chars)
}

/// Text: a string, a content part (`{"type":"text","text":…}`) or an array of those.
fn text_chars(c: &mut Cursor) -> Option<u64> {
    if c.peek() != Some(b'[') {
        return part_chars(c);
    }
    let mut chars = 0;
    c.each_element(|c| {
        chars += part_chars(c)?;
        Some(())
    })?;
    Some(chars)
}

/// A string, or the `text` string of a content part.
fn part_chars(c: &mut Cursor) -> Option<u64> {
    if c.peek() != Some(b'{') {
        return string_chars(c);
    }
    let mut chars = 0;
    c.object(|key, _, c| {
        match key {
            b"text" => chars += string_chars(c)?,
            _ => c.skip_value()?,
        }
        Some(())
    })?;
    Some(chars)
}

/// Characters of the string at the cursor; any other value is skipped and counts 0.
fn string_chars(c: &mut Cursor) -> Option<u64> {
    if c.peek() != Some(b'"') {
        c.skip_value()?;
        return Some(0);
    }
    c.string().map(escaped_chars)
}

// === Reading usage ===
//
// Leniently: a `usage` value of an unexpected shape reads as no usage, and never makes the rest of
// the event unreadable.

/// A body or chunk, for its `usage` only (serde still reads, and so validates, all of it).
#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct UsageOnly {
    pub(super) usage: UsageField,
}

/// A `usage` member: `Some` for an object that names at least one of the two counts (readable or
/// not).
#[derive(Default)]
pub(super) struct UsageField(pub(super) Option<Usage>);

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum UsageKey {
    PromptTokens,
    CompletionTokens,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for UsageField {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UsageVisitor;
        impl<'de> Visitor<'de> for UsageVisitor {
            type Value = UsageField;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageField, A::Error> {
                let mut usage = Usage::default();
                while let Some(key) = map.next_key::<UsageKey>()? {
                    match key {
                        UsageKey::PromptTokens => {
                            usage.prompt_tokens = map.next_value::<Count>()?.0
                        }
                        UsageKey::CompletionTokens => {
                            usage.completion_tokens = map.next_value::<Count>()?.0;
                        }
                        UsageKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if usage == Usage::default() {
                    return Ok(UsageField(None));
                }
                Ok(UsageField(Some(usage)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<UsageField, A::Error> {
                drain_seq(seq).map(|()| UsageField(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<UsageField, E> {
                Ok(UsageField(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<UsageField, E> {
                Ok(UsageField(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<UsageField, E> {
                Ok(UsageField(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<UsageField, E> {
                Ok(UsageField(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<UsageField, E> {
                Ok(UsageField(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<UsageField, E> {
                Ok(UsageField(None))
            }
        }
        deserializer.deserialize_any(UsageVisitor)
    }
}

/// A token count: a non-negative integer (also written as an integral float) is reported, `null`
/// absent, anything else unreadable.
struct Count(TokenCount);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(TokenCount::Reported(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(Count(
                    u64::try_from(v).map_or(TokenCount::Unreadable, TokenCount::Reported),
                ))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                // 2^64 is exactly representable; every integral float below it fits a u64.
                let fits = (0.0..18_446_744_073_709_551_616.0).contains(&v) && v.fract() == 0.0;
                Ok(Count(if fits {
                    TokenCount::Reported(v as u64)
                } else {
                    TokenCount::Unreadable
                }))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
                Ok(Count(TokenCount::Unreadable))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
                Ok(Count(TokenCount::Unreadable))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count(TokenCount::Absent))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(TokenCount::Unreadable))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
                drain_seq(seq).map(|()| Count(TokenCount::Unreadable))
            }
        }
        deserializer.deserialize_any(CountVisitor)
    }
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

#[cfg(test)]
#[path = "json_tests.rs"]
mod tests;
