//! Token usage read from upstream responses as they pass, and the stream rewrite that takes back
//! out of a client's stream the usage the gateway asked for on its behalf. Pure: no I/O, no
//! clocks, no allocation per frame on the common path.
//!
//! - [`usage_from_json`] / [`completion_chars_from_json`]: a complete `chat.completion` or
//!   `text_completion` body.
//! - [`SseObserver`]: watches an SSE stream frame by frame (the frames themselves are only
//!   borrowed) and keeps the last usage object seen, whether `[DONE]` came, and how much text was
//!   generated, for an estimate when no usage ever arrives.
//! - [`UsageStripper`]: when the gateway set `stream_options.include_usage` upstream although the
//!   client did not ask for it, removes from the client's stream what only that flag added.
//! - [`estimate_prompt_tokens`] / [`estimate_tokens_from_chars`]: the heuristics used where no
//!   count exists (quota reservation, and a stream that broke off before its usage).
//!
//! Where usage rides, by server (samples in `shared/upstream/README.md`):
//! - llama.cpp chat streams: only with `include_usage`, in a final chunk with `"choices": []`.
//! - llama.cpp legacy completions streams: on the `finish_reason` chunk, *always*, asked or not.
//! - OpenAI (and vLLM per the OpenAI contract) with `include_usage`: `"usage": null` on every
//!   chunk, the real object in a final chunk with `"choices": []`.
//! - Some proxies: the usage object on a chunk that still has a choices entry.
//!
//! So the observer reads `usage` from *any* data event and keeps the last non-null one (vLLM's
//! `continuous_usage_stats` sends a running total on every chunk: the last one is the total).
//!
//! # The stripping rule
//!
//! [`UsageStripper`] is used only when the gateway itself added `include_usage`. For each complete
//! event whose single `data:` line is a JSON object with a top-level `usage` member, it:
//! 1. drops the whole event (its lines and its terminating blank line) when `usage` is an object
//!    and `choices` is an empty array: that is the chunk the flag adds, by OpenAI's contract;
//! 2. removes the member `"usage": null` (with its separating comma and whitespace), the field
//!    OpenAI-style servers add to every chunk once the flag is set;
//! 3. leaves alone a `usage` object on a chunk whose `choices` is non-empty (or absent).
//!
//! Why 3: a server may put usage on a content-bearing chunk unasked — llama.cpp does on every
//! legacy completions stream — and the client would have seen it without the gateway. Removing
//! it would take away what the client was always sent; keeping it, when a proxy only added it
//! because of the flag, leaves an extra field that clients which did not ask for usage ignore.
//! The first mistake breaks clients, the second cannot, so the rule errs on the second side.
//! `"usage": null` is removed wherever it appears at the top level: a null carries nothing, so
//! even a server that sent it unasked tells the client nothing the rewritten chunk does not.
//!
//! # Edge cases
//!
//! - Lines end with `\n`, `\r\n` or a lone `\r` (SSE spec); a `\r\n` may be split across two
//!   frames, and a frame ending in `\r` ends its line at once (nothing waits for the next frame).
//! - An event may span frames, and a frame may hold many events. The observer copies only the
//!   unfinished last line of a frame; complete lines are scanned where they lie.
//! - Comments (`: ping`), `event:`, `id:` and `retry:` lines are skipped by the observer and
//!   forwarded byte for byte by the stripper, as are blank lines and the line-ending style.
//! - A line longer than the observer's cap is dropped and counted ([`SseObserver::dropped_lines`]),
//!   however it is split, so memory stays bounded; scanning resumes at the next line break. An
//!   event longer than the stripper's cap is forwarded unchanged (its bytes are never lost).
//! - The outcome never depends on where the frames were cut: same usage, counts and output bytes.
//! - A `data:` field split over several lines of one event (legal SSE, never sent by these
//!   servers) is read line by line: the event counts once, and each piece counts only the text it
//!   holds whole; the stripper forwards such an event unchanged.
//! - Generated text is counted by a lexical walk that goes only into `choices` and skips the rest
//!   without validating it (an estimate is all that rests on it); a value of an unexpected shape
//!   (`"content": 5`) counts nothing, and a data line that is not a JSON object adds nothing.
//! - Usage is read by serde, and only from an event that is valid JSON; a `usage` of an unexpected
//!   shape reads as no usage and never hides the rest of its event.
//! - A usage object needs `prompt_tokens` or `completion_tokens` (the other reads as 0); counts
//!   that are negative, fractional or not numbers read as absent.
//! - `"usage"` written with escapes in its key (`"\u0075sage"`) is not recognised by the stripper:
//!   the event passes unchanged. An event that is not valid JSON also passes unchanged.
//! - The stripper holds back only an incomplete event, and only until its blank line arrives;
//!   [`UsageStripper::finish`] flushes what is left when the stream ends.
//!
//! # Cost
//!
//! Per event, release build (the `cost_per_event` test; instruction counts from cachegrind, which
//! do not depend on the machine's load): `observe` ~2.5k instructions, 140-190 ns on the shared
//! 2-core build machine, so ~5-6 µs for a 32-event llama.cpp stream; `rewrite` ~1.5k (100-140 ns)
//! when nothing changes (the same `Bytes` back, no copy) and ~10k (650-900 ns) for an event it
//! edits (serde validates it first, and the result is a copy). OpenAI-style chunks, whose
//! `choices` come after the metadata, cost ~4.4k to observe. Where the time goes: line breaks and
//! string ends found eight bytes at a time, a search for the `"usage"` key that lets the walk stop
//! right after `choices`, and the walk itself; serde only for the (about one) event with a usage
//! object.

use std::fmt;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// A sensible cap on an SSE line (observer) or an incomplete event (stripper): chunks are a few
/// hundred bytes; a whole tool-call argument in one chunk can reach tens of KiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// Characters per token in the estimates: the usual figure for English text and code with BPE
/// tokenizers (OpenAI's own rule of thumb).
const CHARS_PER_TOKEN: u64 = 4;
/// Tokens a chat template spends on each message besides its text (role, start and end markers:
/// ChatML's `<|im_start|>role\n…<|im_end|>\n` is 4-5).
const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens a chat template spends to open the assistant's reply (`<|im_start|>assistant\n`).
const TOKENS_PER_REPLY: u64 = 3;

/// Token counts for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Both counts together, as charged against a quota.
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

/// Reads the top-level `usage` of a complete JSON response body (`chat.completion`,
/// `text_completion`). `None` when the body is not JSON, or `usage` is absent, null or holds no
/// count.
pub fn usage_from_json(body: &[u8]) -> Option<Usage> {
    serde_json::from_slice::<UsageOnly>(body).ok()?.usage.0
}

/// Characters of generated text in a complete JSON response body: `choices[].message.content`,
/// `choices[].text`, reasoning, refusals and tool calls, as [`SseObserver::completion_chars`]
/// counts them in a stream (and as leniently). 0 when the body is not a JSON object.
pub fn completion_chars_from_json(body: &[u8]) -> u64 {
    scan_chunk(body).map_or(0, |scan| scan.chars)
}

/// Tokens for `chars` characters of text: one per [`CHARS_PER_TOKEN`] (4) characters, rounded
/// up, so any non-empty text is at least 1 token and an empty one 0.
pub fn estimate_tokens_from_chars(chars: u64) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN)
}

/// Estimates the prompt tokens of a chat or completions request body, before the upstream has
/// counted them: see [`estimate_prompt_tokens_json`]. A body that is not JSON counts by its
/// length (a token per 4 bytes).
pub fn estimate_prompt_tokens(request_body: &[u8]) -> u64 {
    match serde_json::from_slice::<serde_json::Value>(request_body) {
        Ok(request) => estimate_prompt_tokens_json(&request),
        Err(_) => estimate_tokens_from_chars(request_body.len() as u64),
    }
}

/// Estimates the prompt tokens of an already parsed request:
/// - chat: the text of every message (`content` as a string, or the `text` of its content parts;
///   `name`; the name and arguments of assistant `tool_calls`), plus 4 tokens per message and 3
///   for the reply's opening; `tools` / `functions` by the length of their JSON;
/// - completions: `prompt` as a string, an array of strings, a token array or an array of token
///   arrays — token ids count exactly one each — plus `suffix`;
/// - text is counted by [`estimate_tokens_from_chars`]. Images and audio parts count nothing
///   (their cost depends on the model); a body with neither `messages` nor `prompt` counts by the
///   length of its JSON.
pub fn estimate_prompt_tokens_json(request: &serde_json::Value) -> u64 {
    use serde_json::Value;

    let mut chars = 0u64;
    let mut exact = 0u64;
    let mut known = false;
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        known = true;
        exact += TOKENS_PER_REPLY + TOKENS_PER_MESSAGE * messages.len() as u64;
        for message in messages {
            chars += message.get("content").map_or(0, content_chars);
            chars += message.get("name").map_or(0, str_chars);
            for call in message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(function) = call.get("function") {
                    chars += function.get("name").map_or(0, str_chars);
                    chars += function.get("arguments").map_or(0, str_chars);
                }
            }
        }
        for definitions in ["tools", "functions"] {
            if let Some(definitions) = request.get(definitions).filter(|v| !v.is_null()) {
                chars += json_chars(definitions);
            }
        }
    }
    if let Some(prompt) = request.get("prompt") {
        known = true;
        match prompt {
            Value::String(text) => chars += text.chars().count() as u64,
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::String(text) => chars += text.chars().count() as u64,
                        Value::Number(_) => exact += 1,
                        Value::Array(tokens) => exact += tokens.len() as u64,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        chars += request.get("suffix").map_or(0, str_chars);
    }
    if !known {
        chars = json_chars(request);
    }
    exact.saturating_add(estimate_tokens_from_chars(chars))
}

/// Characters of a string value; 0 for anything else.
fn str_chars(value: &serde_json::Value) -> u64 {
    value.as_str().map_or(0, |text| text.chars().count() as u64)
}

/// Characters of a message's `content`: a string, or the `text` of each content part.
fn content_chars(content: &serde_json::Value) -> u64 {
    match content {
        serde_json::Value::Array(parts) => parts
            .iter()
            .map(|part| part.get("text").map_or(0, str_chars))
            .sum(),
        other => str_chars(other),
    }
}

/// Characters of a value written as compact JSON, counted without building the string.
fn json_chars(value: &serde_json::Value) -> u64 {
    struct CharCounter(u64);
    impl std::io::Write for CharCounter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += utf8_chars(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = CharCounter(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => 0,
    }
}

/// Characters in UTF-8 bytes: every byte that does not continue a character starts one.
fn utf8_chars(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| (b & 0xC0) != 0x80).count() as u64
}

// === impl SseObserver ===

/// Watches an SSE stream frame by frame: feed it every data frame's bytes as they pass (it only
/// borrows them, and copies only a frame's unfinished last line).
#[derive(Debug)]
pub struct SseObserver {
    max_line_bytes: usize,
    /// The unfinished line a frame ended with, waiting for the rest of it.
    carry: Vec<u8>,
    /// Inside a line that outgrew the cap: its bytes are dropped until its line break.
    skipping: bool,
    /// The last byte seen was a `\r` ending a line: a `\n` right after it belongs to that break.
    pending_lf: bool,
    /// A `data:` line of the current event has been seen (an event counts once).
    in_event: bool,
    usage: Option<Usage>,
    saw_done: bool,
    completion_chars: u64,
    events: u64,
    dropped_lines: u64,
}

impl SseObserver {
    /// `max_line_bytes` caps one line (and so the carried-over bytes); a longer line is dropped.
    /// [`DEFAULT_MAX_LINE_BYTES`] suits model streams.
    pub fn new(max_line_bytes: usize) -> Self {
        SseObserver {
            max_line_bytes,
            carry: Vec::new(),
            skipping: false,
            pending_lf: false,
            in_event: false,
            usage: None,
            saw_done: false,
            completion_chars: 0,
            events: 0,
            dropped_lines: 0,
        }
    }

    /// Reads one frame of the stream. Events may span frames; a frame may hold many events.
    pub fn observe(&mut self, frame: &[u8]) {
        let mut rest = frame;
        if self.pending_lf {
            if let Some((&first, after)) = rest.split_first() {
                self.pending_lf = false;
                if first == b'\n' {
                    rest = after;
                }
            }
        }
        while let Some(LineEnd { len, term }) = line_end(rest) {
            let line = &rest[..len];
            rest = &rest[len + term..];
            if rest.is_empty() && term == 1 && line_break_is_cr(frame) {
                self.pending_lf = true;
            }
            self.end_line(line);
        }
        self.keep_tail(rest);
    }

    /// The last non-null usage object seen in any data event.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether `data: [DONE]` was seen: the upstream finished the stream properly.
    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Characters of generated text seen so far: `choices[].delta.content` (a string or content
    /// parts' `text`), `choices[].text`, `delta.reasoning_content` / `delta.reasoning`,
    /// `delta.refusal`, and the name and arguments of `delta.tool_calls[].function` (and of the
    /// legacy `delta.function_call`). For [`estimate_tokens_from_chars`] when no usage arrives.
    pub fn completion_chars(&self) -> u64 {
        self.completion_chars
    }

    /// Data events seen, `[DONE]` included.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Lines dropped because they were longer than the cap.
    pub fn dropped_lines(&self) -> u64 {
        self.dropped_lines
    }

    /// A line is complete: `line` is its end (or all of it), without the line break.
    fn end_line(&mut self, line: &[u8]) {
        if self.skipping {
            self.skipping = false;
            return;
        }
        if self.carry.len() + line.len() > self.max_line_bytes {
            // Dropped whether it came whole or in pieces, so the outcome does not depend on cuts.
            self.dropped_lines += 1;
            self.carry.clear();
            return;
        }
        if self.carry.is_empty() {
            self.line(line);
        } else {
            let mut whole = std::mem::take(&mut self.carry);
            whole.extend_from_slice(line);
            self.line(&whole);
            whole.clear();
            self.carry = whole;
        }
    }

    /// Keeps the unfinished end of a frame for the next one, within the cap.
    fn keep_tail(&mut self, tail: &[u8]) {
        if tail.is_empty() || self.skipping {
            return;
        }
        if self.carry.len() + tail.len() > self.max_line_bytes {
            self.dropped_lines += 1;
            self.skipping = true;
            self.carry = Vec::new();
            return;
        }
        self.carry.extend_from_slice(tail);
    }

    /// One complete line of the stream.
    fn line(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.in_event = false;
            return;
        }
        let Some(value) = data_value(line) else {
            return; // a comment, or a field other than `data`
        };
        if !self.in_event {
            self.in_event = true;
            self.events += 1;
        }
        let value = value.trim_ascii();
        if value == b"[DONE]" {
            self.saw_done = true;
        } else if let Some(scan) = scan_chunk(value) {
            self.completion_chars += scan.chars;
            if scan.usage_object {
                // About once per stream: read it properly.
                if let Ok(UsageOnly {
                    usage: UsageField(Some(usage)),
                }) = serde_json::from_slice(value)
                {
                    self.usage = Some(usage);
                }
            }
        }
    }
}

/// Whether `frame` ends with a line break that is a lone `\r` (its `\n` may be in the next frame).
fn line_break_is_cr(frame: &[u8]) -> bool {
    frame.last() == Some(&b'\r')
}

/// Where a line ends: `len` bytes of line, then a `term`-byte line break.
struct LineEnd {
    len: usize,
    term: usize,
}

/// The first line break in `bytes`: `\n`, `\r\n` or a lone `\r`.
fn line_end(bytes: &[u8]) -> Option<LineEnd> {
    let len = find_either(bytes, b'\n', b'\r')?;
    let term = if bytes[len] == b'\r' && bytes.get(len + 1) == Some(&b'\n') {
        2
    } else {
        1
    };
    Some(LineEnd { len, term })
}

/// The value of a `data` field line (after `data:` and one optional space), `None` for any other
/// line. A bare `data` line is a data field with an empty value (SSE spec).
fn data_value(line: &[u8]) -> Option<&[u8]> {
    let value = line.strip_prefix(b"data")?;
    if value.is_empty() {
        return Some(value);
    }
    let value = value.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

// === Reading chunks ===
//
// `observe` runs on every event of every stream, so the generated text is counted by a lexical
// walk (`Cursor`) that descends only into `choices[]` and skips everything else without
// allocating; serde reads (and validates) only an event that carries a `usage` object, about one
// per stream.

/// What one chunk (or complete body) holds for accounting.
struct ChunkScan {
    /// Characters of generated text (see [`SseObserver::completion_chars`]).
    chars: u64,
    /// A top-level `usage` member whose value is an object.
    usage_object: bool,
}

/// Scans a JSON chunk or body. `None` when it is not a JSON object as far as the walk can tell
/// (the walk does not validate what it skips, so a broken event may still count its text).
fn scan_chunk(json: &[u8]) -> Option<ChunkScan> {
    let mut scan = ChunkScan {
        chars: 0,
        usage_object: false,
    };
    // Without a usage object anywhere (most chunks; `"usage": null` is no object), nothing after
    // `choices` matters: stop there. One vectorised search saves walking the metadata that
    // follows (llama.cpp puts `choices` first).
    let may_have_usage = may_hold_usage_object(json);
    let mut stopped = false;
    let walked = Cursor::new(json).object(|key, _, c| match key {
        b"choices" => {
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
            scan.usage_object = c.peek() == Some(b'{');
            c.skip_value()
        }
        _ => c.skip_value(),
    });
    (walked.is_some() || stopped).then_some(scan)
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

/// Characters a JSON string's text (as written, between its quotes) stands for: each escape is
/// one character, and a `\uD83D\uDE00` surrogate pair one character in all.
fn escaped_chars(raw: &[u8]) -> u64 {
    let mut chars = utf8_chars(raw);
    let mut i = 0;
    while let Some(at) = raw
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| b == b'\\'))
    {
        let escape = i + at;
        if raw.get(escape + 1) == Some(&b'u') {
            // Six bytes for one character; a low surrogate belongs to the high one before it.
            let low_surrogate = matches!(
                raw.get(escape + 2..escape + 4),
                Some([b'd' | b'D', b'c'..=b'f' | b'C'..=b'F'])
            );
            chars = chars.saturating_sub(if low_surrogate { 6 } else { 5 });
            i = escape + 6;
        } else {
            chars = chars.saturating_sub(1);
            i = escape + 2;
        }
    }
    chars
}

/// A forward-only reader of JSON text that looks at what it is asked for and skips the rest
/// lexically, without validating or allocating. Nesting it descends into is fixed by its callers;
/// `skip_value` is a loop, so no input can make it recurse deeply.
struct Cursor<'a> {
    json: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(json: &'a [u8]) -> Self {
        let mut cursor = Cursor { json, pos: 0 };
        cursor.skip_ws();
        cursor
    }

    fn skip_ws(&mut self) {
        while matches!(self.json.get(self.pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.json.get(self.pos).copied()
    }

    /// Whether only whitespace is left.
    fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.pos == self.json.len()
    }

    /// Reads the string at the cursor: its bytes between the quotes, escapes as written.
    fn string(&mut self) -> Option<&'a [u8]> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.pos + 1;
        let mut i = start;
        loop {
            i += find_either(self.json.get(i..)?, b'"', b'\\')?;
            if self.json[i] == b'"' {
                self.pos = i + 1;
                return Some(&self.json[start..i]);
            }
            i += 2; // a backslash and the byte it escapes
        }
    }

    /// Skips the value at the cursor and the whitespace after it.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                let rest = &self.json[self.pos..];
                let len = rest
                    .iter()
                    .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                    .unwrap_or(rest.len());
                if len == 0 {
                    return None;
                }
                self.pos += len;
            }
        }
        self.skip_ws();
        Some(())
    }

    /// Reads the object at the cursor member by member: `member` gets each key (as written), where
    /// the key's opening quote is, and the cursor at the value, and must skip or read the value.
    fn object(
        &mut self,
        mut member: impl FnMut(&'a [u8], usize, &mut Self) -> Option<()>,
    ) -> Option<()> {
        if self.peek()? != b'{' {
            return None;
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            self.skip_ws();
            return Some(());
        }
        loop {
            let key_start = self.pos;
            let key = self.string()?;
            self.skip_ws();
            if self.peek()? != b':' {
                return None;
            }
            self.pos += 1;
            self.skip_ws();
            member(key, key_start, self)?;
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_ws();
                }
                b'}' => {
                    self.pos += 1;
                    self.skip_ws();
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Reads the array at the cursor element by element: `element` gets the cursor at each one.
    fn array(&mut self, mut element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        if self.peek()? != b'[' {
            return None;
        }
        self.pos += 1;
        self.skip_ws();
        if self.peek()? == b']' {
            self.pos += 1;
            self.skip_ws();
            return Some(());
        }
        loop {
            element(self)?;
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.skip_ws();
                }
                b']' => {
                    self.pos += 1;
                    self.skip_ws();
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// [`Cursor::object`] if the value is an object; any other value is skipped.
    fn each_member(
        &mut self,
        member: impl FnMut(&'a [u8], usize, &mut Self) -> Option<()>,
    ) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(member),
            _ => self.skip_value(),
        }
    }

    /// [`Cursor::array`] if the value is an array; any other value is skipped.
    fn each_element(&mut self, element: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        match self.peek()? {
            b'[' => self.array(element),
            _ => self.skip_value(),
        }
    }
}

/// The first `a` or `b` in `haystack`: the scans for line breaks and string ends, which are what
/// `observe` and `rewrite` spend their time on.
fn find_either(haystack: &[u8], a: u8, b: u8) -> Option<usize> {
    let (splat_a, splat_b) = (splat(a), splat(b));
    swar_find(
        haystack,
        |word| zero_bytes(word ^ splat_a) | zero_bytes(word ^ splat_b),
        |x| x == a || x == b,
    )
}

/// The first `byte` in `haystack`.
fn find_byte(haystack: &[u8], byte: u8) -> Option<usize> {
    let splat_byte = splat(byte);
    swar_find(
        haystack,
        |word| zero_bytes(word ^ splat_byte),
        |x| x == byte,
    )
}

const ONES: u64 = u64::from_le_bytes([0x01; 8]);

/// `byte` in each of a word's eight bytes.
fn splat(byte: u8) -> u64 {
    ONES * u64::from(byte)
}

/// The high bit of each zero byte of `word`. Bits above the lowest may be false positives (a
/// borrow runs upwards); the lowest is exact, and the lowest is all [`swar_find`] uses.
fn zero_bytes(word: u64) -> u64 {
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    word.wrapping_sub(ONES) & !word & HIGHS
}

/// Searches eight bytes at a time (SWAR, in safe code): `hits` marks matching bytes of a
/// little-endian word as [`zero_bytes`] does; `is` tests the bytes of the short tail.
fn swar_find(haystack: &[u8], hits: impl Fn(u64) -> u64, is: impl Fn(u8) -> bool) -> Option<usize> {
    let mut words = haystack.chunks_exact(8);
    let mut offset = 0;
    for word in &mut words {
        let found = hits(u64::from_le_bytes(word.try_into().unwrap_or_default()));
        if found != 0 {
            return Some(offset + (found.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&x| is(x))
        .map(|i| offset + i)
}

/// Where the key `"usage"` (its opening quote) first occurs in `bytes`. Searches for its `g`,
/// rare in chunks (llama.cpp's have none besides this key's), eight bytes at a time: this beats
/// std's substring search on event-sized inputs, whose searcher is set up anew on every call.
fn find_usage_key(bytes: &[u8]) -> Option<usize> {
    const KEY: &[u8] = b"\"usage\"";
    let mut from = 4;
    while let Some(at) = bytes.get(from..).and_then(|rest| find_byte(rest, b'g')) {
        let start = from + at - 4;
        if bytes[start..].starts_with(KEY) {
            return Some(start);
        }
        from += at + 1;
    }
    None
}

/// Whether `json` may hold a `usage` object: `"usage"`, `:` and `{`, with optional whitespace
/// between, anywhere. A cheap test; the walk then decides whether it is a top-level member.
fn may_hold_usage_object(json: &[u8]) -> bool {
    let mut rest = json;
    while let Some(at) = find_usage_key(rest) {
        rest = &rest[at + b"\"usage\"".len()..];
        if let Some(value) = rest.trim_ascii_start().strip_prefix(b":") {
            if value.trim_ascii_start().first() == Some(&b'{') {
                return true;
            }
        }
    }
    false
}

// === Reading usage ===
//
// Leniently: a `usage` value of an unexpected shape reads as no usage, and never makes the rest of
// the event unreadable.

/// A body or chunk, for its `usage` only (serde still reads, and so validates, all of it).
#[derive(Deserialize, Default)]
#[serde(default)]
struct UsageOnly {
    usage: UsageField,
}

/// A `usage` member: `Some` for an object with at least one of the two counts.
#[derive(Default)]
struct UsageField(Option<Usage>);

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
                let (mut prompt, mut completion) = (None, None);
                while let Some(key) = map.next_key::<UsageKey>()? {
                    match key {
                        UsageKey::PromptTokens => prompt = map.next_value::<Count>()?.0,
                        UsageKey::CompletionTokens => completion = map.next_value::<Count>()?.0,
                        UsageKey::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                if prompt.is_none() && completion.is_none() {
                    return Ok(UsageField(None));
                }
                Ok(UsageField(Some(Usage {
                    prompt_tokens: prompt.unwrap_or(0),
                    completion_tokens: completion.unwrap_or(0),
                })))
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

/// A token count: a non-negative integer (also written as an integral float); anything else is
/// `None`.
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl<'de> Visitor<'de> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).ok()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                // 2^64 is exactly representable; every integral float below it fits a u64.
                let fits = (0.0..18_446_744_073_709_551_616.0).contains(&v) && v.fract() == 0.0;
                Ok(Count(fits.then_some(v as u64)))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
                drain_seq(seq).map(|()| Count(None))
            }
        }
        deserializer.deserialize_any(CountVisitor)
    }
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

// === impl UsageStripper ===

/// Removes from a client's SSE stream what the gateway's own `include_usage` added (see the
/// module doc for the rule). Holds back only an incomplete event, with its own carry-over.
#[derive(Debug)]
pub struct UsageStripper {
    max_event_bytes: usize,
    /// The start of an incomplete event (at most `max_event_bytes`).
    held: Vec<u8>,
    /// The current line already has bytes, so the next line break does not make it blank.
    line_has_bytes: bool,
    /// The last byte seen was a `\r` ending a line: a `\n` right after it belongs to that break.
    pending_lf: bool,
    /// ... and that `\r` ended an event that was removed, so that `\n` goes too.
    drop_lf: bool,
    /// The current event outgrew the cap: it is forwarded unchanged until it ends.
    passthrough: bool,
    events_removed: u64,
    fields_removed: u64,
}

/// What becomes of one complete event.
enum Fate {
    Keep,
    Drop,
    /// Forward the event without these bytes.
    Cut(Range<usize>),
}

impl UsageStripper {
    /// `max_line_bytes` caps the bytes of an incomplete event held back; a longer event is
    /// forwarded unchanged. [`DEFAULT_MAX_LINE_BYTES`] suits model streams.
    pub fn new(max_line_bytes: usize) -> Self {
        UsageStripper {
            max_event_bytes: max_line_bytes,
            held: Vec::new(),
            line_has_bytes: false,
            pending_lf: false,
            drop_lf: false,
            passthrough: false,
            events_removed: 0,
            fields_removed: 0,
        }
    }

    /// Takes a frame and returns the bytes to forward now. A frame of complete events with
    /// nothing to remove comes back as the same `Bytes` (no copy); a frame that ends inside an
    /// event returns the events before it as a slice of the frame and holds the rest until the
    /// event's end arrives. The result may be empty: there is nothing to send yet.
    pub fn rewrite(&mut self, frame: Bytes) -> Bytes {
        let mut emit = Emit::default();
        let mut start = 0; // where the current event's bytes in this frame begin
        let mut i = 0; // where scanning resumes
        if self.pending_lf && !frame.is_empty() {
            self.pending_lf = false;
            if frame[0] == b'\n' {
                i = 1;
                if self.drop_lf {
                    start = 1;
                } else if self.held.is_empty() && !self.passthrough {
                    // The `\r` ended an event that is already forwarded: this is its last byte.
                    emit.keep(&frame, 0..1);
                    start = 1;
                }
            }
            self.drop_lf = false;
        }
        while let Some(LineEnd { len, term }) = line_end(&frame[i..]) {
            let blank = len == 0 && !self.line_has_bytes;
            self.line_has_bytes = false;
            let end = i + len + term;
            let lone_cr_at_end = end == frame.len() && term == 1 && frame[end - 1] == b'\r';
            self.pending_lf = lone_cr_at_end;
            if blank {
                let dropped = self.end_event(&frame, start..end, term, &mut emit);
                self.drop_lf = lone_cr_at_end && dropped;
                start = end;
            }
            i = end;
        }
        if i < frame.len() {
            self.line_has_bytes = true;
        }
        self.hold(&frame, start..frame.len(), &mut emit);
        emit.into_bytes(frame)
    }

    /// Flushes what is held at the end of the stream: an event that never got its blank line
    /// (which the client will not dispatch) is still rewritten by the same rule.
    pub fn finish(&mut self) -> Bytes {
        self.pending_lf = false;
        self.drop_lf = false;
        self.passthrough = false;
        self.line_has_bytes = false;
        let held = std::mem::take(&mut self.held);
        match self.fate(&held) {
            Fate::Keep => Bytes::from(held),
            Fate::Drop => Bytes::new(),
            Fate::Cut(cut) => {
                let mut out = BytesMut::with_capacity(held.len() - cut.len());
                out.extend_from_slice(&held[..cut.start]);
                out.extend_from_slice(&held[cut.end..]);
                out.freeze()
            }
        }
    }

    /// Usage-only events removed so far.
    pub fn events_removed(&self) -> u64 {
        self.events_removed
    }

    /// `"usage": null` members removed so far.
    pub fn fields_removed(&self) -> u64 {
        self.fields_removed
    }

    /// An event ends with `frame[range]` (its last `term` bytes are the blank line's break).
    /// Returns whether the event was dropped.
    fn end_event(
        &mut self,
        frame: &Bytes,
        range: Range<usize>,
        term: usize,
        emit: &mut Emit,
    ) -> bool {
        if self.passthrough {
            self.passthrough = false;
            emit.keep(frame, range);
            return false;
        }
        // The cap leaves out the final line break, which a cut may have moved to the next frame.
        if self.held.len() + range.len() - term > self.max_event_bytes {
            emit.push(frame, &self.held);
            self.held.clear();
            emit.keep(frame, range);
            return false;
        }
        if self.held.is_empty() {
            match self.fate(&frame[range.clone()]) {
                Fate::Keep => emit.keep(frame, range),
                Fate::Drop => return true,
                Fate::Cut(cut) => {
                    emit.keep(frame, range.start..range.start + cut.start);
                    emit.keep(frame, range.start + cut.end..range.end);
                }
            }
            return false;
        }
        let mut event = std::mem::take(&mut self.held);
        event.extend_from_slice(&frame[range]);
        let dropped = match self.fate(&event) {
            Fate::Keep => {
                emit.push(frame, &event);
                false
            }
            Fate::Drop => true,
            Fate::Cut(cut) => {
                emit.push(frame, &event[..cut.start]);
                emit.push(frame, &event[cut.end..]);
                false
            }
        };
        event.clear();
        self.held = event;
        dropped
    }

    /// Holds the unfinished end of a frame until its event ends, within the cap.
    fn hold(&mut self, frame: &Bytes, range: Range<usize>, emit: &mut Emit) {
        if range.is_empty() {
            return;
        }
        if self.passthrough {
            emit.keep(frame, range);
        } else if self.held.len() + range.len() > self.max_event_bytes {
            emit.push(frame, &self.held);
            self.held = Vec::new();
            emit.keep(frame, range);
            self.passthrough = true;
        } else {
            self.held.extend_from_slice(&frame[range]);
        }
    }

    /// Decides an event's fate, and counts what is removed.
    fn fate(&mut self, event: &[u8]) -> Fate {
        let fate = event_fate(event);
        match fate {
            Fate::Keep => {}
            Fate::Drop => self.events_removed += 1,
            Fate::Cut(_) => self.fields_removed += 1,
        }
        fate
    }
}

/// The stripping rule for one complete event (module doc, "The stripping rule").
fn event_fate(event: &[u8]) -> Fate {
    if find_usage_key(event).is_none() {
        return Fate::Keep; // the fast path: most events
    }
    let mut data: Option<Range<usize>> = None;
    let mut pos = 0;
    while pos < event.len() {
        let rest = &event[pos..];
        let (len, next) = match line_end(rest) {
            Some(LineEnd { len, term }) => (len, pos + len + term),
            None => (rest.len(), event.len()),
        };
        if let Some(value) = data_value(&rest[..len]) {
            if data.is_some() {
                return Fate::Keep; // a multi-line data field: not what these servers send
            }
            let value_start = pos + len - value.len();
            data = Some(value_start..pos + len);
        }
        pos = next;
    }
    let Some(data) = data else {
        return Fate::Keep;
    };
    let json = &event[data.clone()];
    let Some(object) = TopLevel::scan(json) else {
        return Fate::Keep;
    };
    let Some(usage) = object.usage else {
        return Fate::Keep;
    };
    let value = &json[usage.value.clone()];
    let fate = if value == b"null" {
        let cut = usage.cut();
        Fate::Cut(data.start + cut.start..data.start + cut.end)
    } else if value.first() == Some(&b'{') && object.choices_empty {
        Fate::Drop
    } else {
        return Fate::Keep;
    };
    // The scan is lexical: make sure the event is valid JSON, so that an edit cannot break it.
    if serde_json::from_slice::<IgnoredAny>(json).is_err() {
        return Fate::Keep;
    }
    fate
}

/// What the stripper needs to know about a JSON object's top-level members.
struct TopLevel {
    usage: Option<Member>,
    /// `choices` is present and an empty array.
    choices_empty: bool,
}

/// Where a top-level member lies in the object's bytes.
struct Member {
    /// The member's key (its opening quote) …
    key_start: usize,
    /// … and its value.
    value: Range<usize>,
    /// The end of the previous member's value, if there is one.
    prev_value_end: Option<usize>,
    /// The start of the next member's key, if there is one.
    next_key_start: Option<usize>,
}

impl Member {
    /// The bytes to remove to take this member out and leave valid JSON with every other byte
    /// intact: from the previous value's end (taking the comma before it), or else up to the
    /// next key (taking the comma after it), or else just the member.
    fn cut(&self) -> Range<usize> {
        match (self.prev_value_end, self.next_key_start) {
            (Some(prev), _) => prev..self.value.end,
            (None, Some(next)) => self.key_start..next,
            (None, None) => self.key_start..self.value.end,
        }
    }
}

impl TopLevel {
    /// Scans a JSON object's top level. `None` when it is not an object, or `usage` or `choices`
    /// appears twice (which one would a client read?).
    fn scan(json: &[u8]) -> Option<TopLevel> {
        let mut top = TopLevel {
            usage: None,
            choices_empty: false,
        };
        let mut seen_choices = false;
        let mut prev_value_end = None;
        let mut cursor = Cursor::new(json);
        cursor.object(|key, key_start, c| {
            if let Some(usage) = top.usage.as_mut() {
                usage.next_key_start.get_or_insert(key_start);
            }
            let value_start = c.pos;
            c.skip_value()?;
            let value_end = value_start + json[value_start..c.pos].trim_ascii_end().len();
            match key {
                b"usage" if top.usage.is_some() => return None,
                b"usage" => {
                    top.usage = Some(Member {
                        key_start,
                        value: value_start..value_end,
                        prev_value_end,
                        next_key_start: None,
                    });
                }
                b"choices" if seen_choices => return None,
                b"choices" => {
                    seen_choices = true;
                    let value = &json[value_start..value_end];
                    top.choices_empty = value.first() == Some(&b'[')
                        && value[1..value.len() - 1].trim_ascii().is_empty();
                }
                _ => {}
            }
            prev_value_end = Some(value_end);
            Some(())
        })?;
        cursor.at_end().then_some(top)
    }
}

/// The output of one [`UsageStripper::rewrite`]: a run of the frame's own bytes while nothing has
/// been changed, an owned buffer once something has.
#[derive(Default)]
struct Emit {
    run: Option<Range<usize>>,
    out: Option<BytesMut>,
}

impl Emit {
    /// Forwards `frame[range]` unchanged.
    fn keep(&mut self, frame: &Bytes, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        match (&mut self.out, &mut self.run) {
            (Some(out), _) => out.extend_from_slice(&frame[range]),
            (None, None) => self.run = Some(range),
            (None, Some(run)) if run.end == range.start => run.end = range.end,
            (None, Some(_)) => self.owned(frame).extend_from_slice(&frame[range]),
        }
    }

    /// Forwards bytes that are not part of this frame (held from earlier ones, or edited).
    fn push(&mut self, frame: &Bytes, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.owned(frame).extend_from_slice(bytes);
        }
    }

    fn owned(&mut self, frame: &Bytes) -> &mut BytesMut {
        let run = self.run.take();
        self.out.get_or_insert_with(|| {
            let mut out = BytesMut::new();
            if let Some(run) = run {
                out.extend_from_slice(&frame[run]);
            }
            out
        })
    }

    fn into_bytes(self, frame: Bytes) -> Bytes {
        match (self.out, self.run) {
            (Some(out), _) => out.freeze(),
            (None, Some(run)) if run.start == 0 && run.end == frame.len() => frame,
            (None, Some(run)) => frame.slice(run),
            (None, None) => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // === Samples: llama.cpp b11434 (shared/upstream/README.md), OpenAI, a proxy ===

    const LLAMA_CHAT_JSON: &str = concat!(
        r#"{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","#,
        r#""content":"1. Red: The most obvious colour, but there are many more.\n"}}],"#,
        r#""created":1795356673,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
        r#""object":"chat.completion","#,
        r#""usage":{"completion_tokens":16,"prompt_tokens":34,"total_tokens":50,"#,
        r#""prompt_tokens_details":{"cached_tokens":0}},"#,
        r#""id":"chatcmpl-LQXcd8MBSl3yOffpRHkmEzkeU8A4qSVK","#,
        r#""timings":{"cache_n":0,"prompt_n":34,"prompt_ms":262.59,"predicted_n":16,"predicted_ms":1166.7}}"#
    );

    const LLAMA_COMPLETIONS_JSON: &str = concat!(
        r#"{"choices":[{"text":" Paris.\n\n","index":0,"logprobs":null,"finish_reason":"length"}],"#,
        r#""created":1795356680,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
        r#""object":"text_completion","#,
        r#""usage":{"completion_tokens":4,"prompt_tokens":5,"total_tokens":9,"prompt_tokens_details":{"cached_tokens":0}},"#,
        r#""id":"chatcmpl-AfhsYUCdwqvPLCdtHod5487KIk3CXYLE","timings":{"cache_n":0,"prompt_n":5}}"#
    );

    const LLAMA_TOOL_JSON: &str = concat!(
        r#"{"choices":[{"finish_reason":"tool_calls","index":0,"message":{"role":"assistant","content":"","#,
        r#""tool_calls":[{"type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"},"#,
        r#""id":"67392dNF"}]}}],"object":"chat.completion","#,
        r#""usage":{"completion_tokens":19,"prompt_tokens":210,"total_tokens":229}}"#
    );

    /// llama.cpp chat stream, `include_usage` set: a final `choices: []` chunk carries usage.
    /// Generated text: "Hello" + "! How" + " can" = 14 chars.
    const LLAMA_CHAT_SSE_USAGE_CHUNK: &str = concat!(
        r#"data: {"choices":[],"created":1795356677,"id":"chatcmpl-Cyy2aK3","model":"smollm2-135m-instruct","#,
        r#""system_fingerprint":"b0-unknown","object":"chat.completion.chunk","#,
        r#""usage":{"completion_tokens":4,"prompt_tokens":33,"total_tokens":37,"prompt_tokens_details":{"cached_tokens":32}},"#,
        r#""timings":{"cache_n":32,"prompt_n":1,"prompt_ms":9.5,"predicted_n":4,"predicted_ms":38.1}}"#,
        "\n\n"
    );

    fn llama_chat_sse(include_usage: bool) -> String {
        let chunk = |choice: &str| {
            format!(
                concat!(
                    r#"data: {{"choices":[{}],"created":1795356677,"id":"chatcmpl-Cyy2aK3","#,
                    r#""model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
                    r#""object":"chat.completion.chunk"}}"#,
                    "\n\n"
                ),
                choice
            )
        };
        let mut stream = String::new();
        stream += &chunk(
            r#"{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}"#,
        );
        for piece in ["Hello", "! How", " can"] {
            stream += &chunk(&format!(
                r#"{{"finish_reason":null,"index":0,"delta":{{"content":"{piece}"}}}}"#
            ));
        }
        stream += &chunk(r#"{"finish_reason":"length","index":0,"delta":{}}"#);
        if include_usage {
            stream += LLAMA_CHAT_SSE_USAGE_CHUNK;
        }
        stream + "data: [DONE]\n\n"
    }

    /// llama.cpp legacy completions stream: usage on the finish chunk, asked or not.
    /// Generated text: " Paris" + "." = 7 chars.
    const LLAMA_COMPLETIONS_SSE: &str = concat!(
        r#"data: {"choices":[{"text":" Paris","index":0,"logprobs":null,"finish_reason":null}],"#,
        r#""created":1795356680,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
        r#""object":"text_completion","id":"chatcmpl-OqhiLx"}"#,
        "\n\n",
        r#"data: {"choices":[{"text":".","index":0,"logprobs":null,"finish_reason":null}],"#,
        r#""created":1795356680,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
        r#""object":"text_completion","id":"chatcmpl-OqhiLx"}"#,
        "\n\n",
        r#"data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"#,
        r#""created":1795356680,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
        r#""object":"text_completion","#,
        r#""usage":{"completion_tokens":2,"prompt_tokens":5,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":4}},"#,
        r#""id":"chatcmpl-OqhiLx","timings":{"cache_n":4,"prompt_n":1,"predicted_n":2}}"#,
        "\n\n",
        "data: [DONE]\n\n"
    );

    /// llama.cpp streamed tool call, `include_usage` set: name (11) + arguments (17) = 28 chars.
    fn llama_tool_sse() -> String {
        let tail = r#"],"created":1795356690,"id":"chatcmpl-T","model":"smollm2-135m-instruct","object":"chat.completion.chunk"}"#;
        let mut stream = format!(
            "data: {{\"choices\":[{}{tail}\n\n",
            r#"{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}"#
        );
        stream += &format!(
            "data: {{\"choices\":[{}{tail}\n\n",
            r#"{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"id":"zwUmZ7sq","type":"function","function":{"name":"get_weather","arguments":"{"}}]}}"#
        );
        for piece in [r#"\""#, "city", r#"\":"#, r#" \""#, "Paris", r#"\""#, "}"] {
            stream += &format!(
                "data: {{\"choices\":[{{\"finish_reason\":null,\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":\"{piece}\"}}}}]}}}}{tail}\n\n"
            );
        }
        stream += &format!(
            "data: {{\"choices\":[{}{tail}\n\n",
            r#"{"finish_reason":"tool_calls","index":0,"delta":{}}"#
        );
        stream += concat!(
            r#"data: {"choices":[],"created":1795356690,"id":"chatcmpl-T","model":"smollm2-135m-instruct","#,
            r#""object":"chat.completion.chunk","usage":{"completion_tokens":19,"prompt_tokens":210,"total_tokens":229}}"#,
            "\n\n"
        );
        stream + "data: [DONE]\n\n"
    }

    /// An OpenAI-style stream: with `include_usage`, `"usage":null` on every chunk and a final
    /// usage chunk with `"choices":[]`. Generated text: "Hi" + " there" = 8 chars.
    fn openai_sse(include_usage: bool) -> String {
        let null = if include_usage {
            r#","usage":null"#
        } else {
            ""
        };
        let chunk = |delta: &str, finish: &str| {
            format!(
                concat!(
                    r#"data: {{"id":"chatcmpl-B9MBs8","object":"chat.completion.chunk","created":1741570283,"#,
                    r#""model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","#,
                    r#""choices":[{{"index":0,"delta":{},"logprobs":null,"finish_reason":{}}}]{}}}"#,
                    "\n\n"
                ),
                delta, finish, null
            )
        };
        let mut stream = chunk(
            r#"{"role":"assistant","content":"","refusal":null}"#,
            "null",
        );
        stream += &chunk(r#"{"content":"Hi"}"#, "null");
        stream += &chunk(r#"{"content":" there"}"#, "null");
        stream += &chunk("{}", r#""stop""#);
        if include_usage {
            stream += concat!(
                r#"data: {"id":"chatcmpl-B9MBs8","object":"chat.completion.chunk","created":1741570283,"#,
                r#""model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","#,
                r#""choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"#,
                r#""prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"#,
                r#""completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}}}"#,
                "\n\n"
            );
        }
        stream + "data: [DONE]\n\n"
    }

    /// A proxy that puts usage on a chunk that still has a choices entry. Text: "Yes" = 3 chars.
    const PROXY_SSE: &str = concat!(
        r#"data: {"id":"gen-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Yes"},"finish_reason":null}]}"#,
        "\n\n",
        r#"data: {"id":"gen-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}"#,
        "\n\n",
        r#"data: {"id":"gen-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":""},"finish_reason":null}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#,
        "\n\n",
        "data: [DONE]\n\n"
    );

    /// A stream, what the stripper must turn it into, and what the observer must find in it.
    struct Case {
        name: &'static str,
        stream: String,
        stripped: String,
        usage: Option<Usage>,
        events: u64,
        chars: u64,
    }

    fn usage(prompt_tokens: u64, completion_tokens: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens,
            completion_tokens,
        })
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "llama.cpp chat, include_usage",
                stream: llama_chat_sse(true),
                stripped: llama_chat_sse(false),
                usage: usage(33, 4),
                events: 7,
                chars: 14,
            },
            Case {
                name: "llama.cpp chat, no usage",
                stream: llama_chat_sse(false),
                stripped: llama_chat_sse(false),
                usage: None,
                events: 6,
                chars: 14,
            },
            Case {
                name: "llama.cpp completions, usage on the finish chunk",
                stream: LLAMA_COMPLETIONS_SSE.to_owned(),
                stripped: LLAMA_COMPLETIONS_SSE.to_owned(),
                usage: usage(5, 2),
                events: 4,
                chars: 7,
            },
            Case {
                name: "llama.cpp tool call",
                stream: llama_tool_sse(),
                stripped: llama_tool_sse().replace(
                    &llama_tool_sse()[llama_tool_sse()
                        .find("data: {\"choices\":[],")
                        .expect("usage chunk")..]
                        .split_inclusive("\n\n")
                        .next()
                        .expect("usage chunk")
                        .to_owned(),
                    "",
                ),
                usage: usage(210, 19),
                events: 12,
                chars: 28,
            },
            Case {
                name: "OpenAI-style, usage null on every chunk",
                stream: openai_sse(true),
                stripped: openai_sse(false),
                usage: usage(19, 10),
                events: 6,
                chars: 8,
            },
            Case {
                name: "proxy, usage on a chunk with choices",
                stream: PROXY_SSE.to_owned(),
                stripped: PROXY_SSE.to_owned(),
                usage: usage(12, 7),
                events: 4,
                chars: 3,
            },
        ]
    }

    /// The same stream with every `\n` line break written `eol` (JSON text has no raw breaks).
    fn with_eol(stream: &str, eol: &str) -> String {
        stream.replace('\n', eol)
    }

    const EOLS: [&str; 3] = ["\n", "\r\n", "\r"];

    // === Helpers ===

    /// What the observer reports, for comparing runs.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        usage: Option<Usage>,
        done: bool,
        events: u64,
        chars: u64,
        dropped: u64,
    }

    fn observe_frames<'a>(frames: impl IntoIterator<Item = &'a [u8]>, max: usize) -> Seen {
        let mut observer = SseObserver::new(max);
        for frame in frames {
            observer.observe(frame);
            assert!(
                observer.carry.len() <= max && observer.carry.capacity() <= 2 * max.max(8),
                "the carry-over stays within the cap ({} bytes held, {} allocated, cap {max})",
                observer.carry.len(),
                observer.carry.capacity()
            );
        }
        Seen {
            usage: observer.usage(),
            done: observer.saw_done(),
            events: observer.events(),
            chars: observer.completion_chars(),
            dropped: observer.dropped_lines(),
        }
    }

    fn strip_frames<'a>(frames: impl IntoIterator<Item = &'a [u8]>, max: usize) -> Vec<u8> {
        let mut stripper = UsageStripper::new(max);
        let mut out = Vec::new();
        for frame in frames {
            out.extend_from_slice(&stripper.rewrite(Bytes::copy_from_slice(frame)));
        }
        out.extend_from_slice(&stripper.finish());
        out
    }

    /// `bytes` cut at the given offsets (any order, duplicates allowed).
    fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
        cuts.sort_unstable();
        let mut frames = Vec::new();
        let mut start = 0;
        for c in cuts.into_iter().chain([bytes.len()]) {
            frames.push(&bytes[start..c]);
            start = c;
        }
        frames
    }

    fn show(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    // === JSON bodies ===

    #[test]
    fn json_bodies_give_usage_and_generated_chars() {
        assert_eq!(
            usage_from_json(LLAMA_CHAT_JSON.as_bytes()),
            usage(34, 16),
            "llama.cpp chat body"
        );
        assert_eq!(
            completion_chars_from_json(LLAMA_CHAT_JSON.as_bytes()),
            "1. Red: The most obvious colour, but there are many more.\n"
                .chars()
                .count() as u64,
            "chat message content, unescaped"
        );
        assert_eq!(
            usage_from_json(LLAMA_COMPLETIONS_JSON.as_bytes()),
            usage(5, 4),
            "llama.cpp completions body"
        );
        assert_eq!(
            completion_chars_from_json(LLAMA_COMPLETIONS_JSON.as_bytes()),
            9,
            "completions text \" Paris.\\n\\n\""
        );
        assert_eq!(
            usage_from_json(LLAMA_TOOL_JSON.as_bytes()),
            usage(210, 19),
            "tool call body"
        );
        assert_eq!(
            completion_chars_from_json(LLAMA_TOOL_JSON.as_bytes()),
            11 + 17,
            "tool call name and arguments"
        );
    }

    #[test]
    fn json_usage_absent_null_or_invalid_is_none() {
        for (body, why) in [
            (r#"{"choices":[]}"#, "absent"),
            (r#"{"choices":[],"usage":null}"#, "null"),
            (
                r#"{"usage":{"total_tokens":9}}"#,
                "no prompt or completion count",
            ),
            (r#"{"usage":{"prompt_tokens":-1}}"#, "negative count"),
            (r#"{"usage":{"prompt_tokens":1.5}}"#, "fractional count"),
            (r#"{"usage":"lots"}"#, "not an object"),
            (
                r#"{"usage":{"prompt_tokens":5,"completion_tokens":4}"#,
                "truncated JSON",
            ),
            ("not json", "not JSON"),
            ("", "empty body"),
        ] {
            assert_eq!(usage_from_json(body.as_bytes()), None, "{why}: {body}");
        }
        assert_eq!(
            usage_from_json(br#"{"usage":{"prompt_tokens":5.0,"completion_tokens":"x"}}"#),
            usage(5, 0),
            "an integral float counts; an unreadable count reads as 0 beside a readable one"
        );
        assert_eq!(
            usage_from_json(br#"{"choices":5,"usage":{"completion_tokens":3}}"#),
            usage(0, 3),
            "an odd `choices` does not hide the usage"
        );
    }

    // === The observer on real samples ===

    #[test]
    fn observer_reads_every_sample() {
        for case in cases() {
            for eol in EOLS {
                let stream = with_eol(&case.stream, eol);
                let seen = observe_frames([stream.as_bytes()], 1024);
                let expected = Seen {
                    usage: case.usage,
                    done: true,
                    events: case.events,
                    chars: case.chars,
                    dropped: 0,
                };
                assert_eq!(seen, expected, "{} with line breaks {eol:?}", case.name);
            }
        }
    }

    #[test]
    fn observer_keeps_the_last_usage() {
        // vLLM's continuous_usage_stats: a running total on every chunk.
        let stream = concat!(
            r#"data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"content":"c"}}],"usage":null}"#,
            "\n\n",
        );
        let seen = observe_frames([stream.as_bytes()], 1024);
        assert_eq!(seen.usage, usage(5, 2), "the last non-null usage wins");
        assert!(!seen.done, "no [DONE] in this stream");
        assert_eq!(seen.chars, 3, "one char per chunk");
    }

    #[test]
    fn observer_counts_every_kind_of_generated_text() {
        let stream = concat!(
            r#"data: {"choices":[{"index":0,"delta":{"reasoning_content":"think"}},{"index":1,"delta":{"reasoning":"ab"}}]}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"refusal":"no","function_call":{"name":"f","arguments":"{}"}}}]}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"content":[{"type":"text","text":"part"}]}}]}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"content":"\u00e9\ud83d\ude00\n"}}]}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"content":5,"tool_calls":null}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
            "\n\n",
        );
        let seen = observe_frames([stream.as_bytes()], 1024);
        assert_eq!(
            seen.chars,
            5 + 2 + 2 + 1 + 2 + 4 + 3,
            "reasoning, refusal, legacy function_call, content parts, escapes counted as chars"
        );
        assert_eq!(
            seen.usage,
            usage(1, 2),
            "an odd content type does not hide the usage"
        );
        assert_eq!(seen.events, 5, "five data events");
    }

    #[test]
    fn observer_skips_comments_and_other_fields() {
        let stream = concat!(
            ": ping\n\n",
            "retry: 1000\n\n",
            "event: message\nid: 7\n",
            r#"data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}"#,
            "\n\n",
            ":",
            r#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            "\n\n",
            r#"dataX: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":9}}"#,
            "\n\n",
            "data:[DONE]\n\n",
        );
        let seen = observe_frames([stream.as_bytes()], 1024);
        let expected = Seen {
            usage: None,
            done: true,
            events: 2,
            chars: 2,
            dropped: 0,
        };
        assert_eq!(seen, expected, "comments and unknown fields are not data");
    }

    #[test]
    fn observer_reads_a_split_crlf_as_one_line_break() {
        // Were the `\n` read as a second break, it would make a blank line that ends the event
        // between its two data lines, and the event would count twice.
        let stream = b"data: {\"a\":\r\ndata: 1}\r\n\r\n";
        for at in 0..=stream.len() {
            let seen = observe_frames(cut(stream, &[at]), 1024);
            assert_eq!(seen.events, 1, "one event with two data lines, cut at {at}");
        }
        let seen = observe_frames([&b"data: x\r"[..], b"\r", b"data: y\r\n\r\n"], 1024);
        assert_eq!(
            seen.events, 2,
            "a `\\r` after a `\\r` is a blank line: two events"
        );
    }

    #[test]
    fn observer_drops_an_over_long_line_and_carries_on() {
        let max = 512; // above every line of the sample, far below the long one
        let long = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(2000)
        );
        for eol in EOLS {
            let stream = with_eol(&(long.clone() + &llama_chat_sse(true)), eol);
            let expected = Seen {
                usage: usage(33, 4),
                done: true,
                events: 7, // the dropped line's event is not seen at all
                chars: 14,
                dropped: 1,
            };
            let whole = observe_frames([stream.as_bytes()], max);
            assert_eq!(whole, expected, "long line whole, line breaks {eol:?}");
            for frame_len in [1, 7, 100, 511, 512, 513, 1000] {
                let seen = observe_frames(stream.as_bytes().chunks(frame_len), max);
                assert_eq!(
                    seen, expected,
                    "long line in {frame_len}-byte frames, line breaks {eol:?}"
                );
            }
        }
        // A line of exactly the cap is kept, one byte more is dropped, however it is cut.
        let event = r#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        for (max, kept) in [(event.len(), true), (event.len() - 1, false)] {
            let stream = format!("{event}\n\n");
            for frame_len in [1, 2, 5, stream.len()] {
                let seen = observe_frames(stream.as_bytes().chunks(frame_len), max);
                assert_eq!(
                    seen.usage.is_some(),
                    kept,
                    "cap {max}, line {}, frames of {frame_len}",
                    event.len()
                );
                assert_eq!(
                    seen.dropped,
                    u64::from(!kept),
                    "cap {max}: dropped count, frames of {frame_len}"
                );
            }
        }
    }

    // === The stripper on real samples ===

    #[test]
    fn stripper_removes_exactly_what_include_usage_added() {
        for case in cases() {
            for eol in EOLS {
                let stream = with_eol(&case.stream, eol);
                let expected = with_eol(&case.stripped, eol);
                let out = strip_frames([stream.as_bytes()], 4096);
                assert_eq!(
                    show(&out),
                    expected,
                    "{} with line breaks {eol:?}",
                    case.name
                );
            }
        }
    }

    #[test]
    fn stripper_counts_what_it_removes() {
        let mut stripper = UsageStripper::new(4096);
        let _ = stripper.rewrite(Bytes::from(openai_sse(true)));
        let _ = stripper.finish();
        assert_eq!(stripper.events_removed(), 1, "one usage chunk");
        assert_eq!(stripper.fields_removed(), 4, "four `usage: null` members");
    }

    /// Rewrites one complete event on its own.
    fn strip_one(event: &str) -> String {
        show(&strip_frames([event.as_bytes()], 4096))
    }

    #[test]
    fn stripper_removes_usage_null_in_every_position_and_spacing() {
        for (event, expected) in [
            (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
            (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
            (r#"{"a":1,"usage":null,"b":2}"#, r#"{"a":1,"b":2}"#),
            (r#"{"a":1, "usage": null, "b":2}"#, r#"{"a":1, "b":2}"#),
            (r#"{ "usage" : null , "a" : 1 }"#, r#"{ "a" : 1 }"#),
            (r#"{"a":1 ,	"usage" :	null }"#, r#"{"a":1 }"#),
            (r#"{"usage":null}"#, r#"{}"#),
            (r#"{ "usage": null }"#, r#"{  }"#),
            (r#"{"choices":[],"usage":null}"#, r#"{"choices":[]}"#),
        ] {
            for eol in EOLS {
                let input = with_eol(&format!("data: {event}\n\n"), eol);
                let want = with_eol(&format!("data: {expected}\n\n"), eol);
                assert_eq!(strip_one(&input), want, "{event} with line breaks {eol:?}");
                serde_json::from_str::<serde_json::Value>(expected).expect("the result is JSON");
            }
        }
        assert_eq!(
            strip_one("data:{\"a\":1,\"usage\":null}\n\n"),
            "data:{\"a\":1}\n\n",
            "no space after `data:`"
        );
    }

    #[test]
    fn stripper_leaves_what_the_client_would_have_seen() {
        for (event, why) in [
            (r#"{"a":{"usage":null}}"#, "a nested usage member"),
            (r#"{"a":"\"usage\":null"}"#, "usage inside a string"),
            (r#"{"a":"x","usage":null"#, "not valid JSON"),
            (r#"{"a":1,"usage":null} x"#, "trailing garbage"),
            (r#"{"a":1,"usage":nul}"#, "a broken literal"),
            (
                r#"{"choices":[{"index":0}],"usage":{"prompt_tokens":1}}"#,
                "usage on a chunk with choices",
            ),
            (
                r#"{"usage":{"prompt_tokens":1}}"#,
                "usage on a chunk without choices",
            ),
            (
                r#"{"choices":[],"usage":{"prompt_tokens":1},"usage":null}"#,
                "usage twice",
            ),
            (r#"{"choices":[],"usage":5}"#, "usage that is not an object"),
            (r#"{"\u0075sage":null}"#, "an escaped key"),
            (r#"["usage",null]"#, "not an object"),
        ] {
            let input = format!("data: {event}\n\n");
            assert_eq!(strip_one(&input), input, "{why}: {event}");
        }
        let two_data_lines = "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":1}}\n\n";
        assert_eq!(
            strip_one(two_data_lines),
            two_data_lines,
            "a multi-line data field passes unchanged"
        );
    }

    #[test]
    fn stripper_drops_the_usage_chunk_with_its_other_lines() {
        let stream = concat!(
            ": ping\n\n",
            "event: message\nid: 3\n",
            r#"data: {"choices":[ ],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
            "\n\n",
            "id: 4\ndata: [DONE]\n\n",
        );
        assert_eq!(
            strip_one(stream),
            ": ping\n\nid: 4\ndata: [DONE]\n\n",
            "the whole usage event goes, everything else stays byte for byte"
        );
    }

    #[test]
    fn stripper_fast_path_returns_the_same_bytes() {
        let mut stripper = UsageStripper::new(4096);
        let stream = llama_chat_sse(false) + ": ping\n\n";
        for eol in EOLS {
            let stream = with_eol(&stream, eol);
            for event in stream.split_inclusive(&format!("{eol}{eol}")) {
                let frame = Bytes::copy_from_slice(event.as_bytes());
                let out = stripper.rewrite(frame.clone());
                assert_eq!(
                    out, frame,
                    "an event without usage is forwarded as is ({eol:?})"
                );
                assert_eq!(
                    out.as_ptr(),
                    frame.as_ptr(),
                    "the same bytes, not a copy ({eol:?})"
                );
            }
            let frame = Bytes::from(stream);
            let out = stripper.rewrite(frame.clone());
            assert_eq!(
                out.as_ptr(),
                frame.as_ptr(),
                "a frame of many events: the same bytes"
            );
            assert_eq!(out.len(), frame.len(), "a frame of many events: all of it");
        }
        assert!(stripper.finish().is_empty(), "nothing is held");
    }

    #[test]
    fn stripper_holds_only_an_incomplete_event() {
        let mut stripper = UsageStripper::new(4096);
        let stream = openai_sse(false);
        let second = stream.find("\n\n").expect("an event end") + 2;
        let split = second + 10;
        let frame = Bytes::copy_from_slice(&stream.as_bytes()[..split]);
        let out = stripper.rewrite(frame.clone());
        assert_eq!(show(&out), stream[..second], "complete events go at once");
        assert_eq!(out.as_ptr(), frame.as_ptr(), "as a slice of the frame");
        let out = stripper.rewrite(Bytes::copy_from_slice(&stream.as_bytes()[split..]));
        assert_eq!(
            show(&out),
            stream[second..],
            "the held event goes when it ends"
        );
        assert!(stripper.finish().is_empty(), "nothing is left");
    }

    #[test]
    fn stripper_finish_flushes_an_unterminated_event() {
        let mut stripper = UsageStripper::new(4096);
        assert!(
            stripper
                .rewrite(Bytes::from_static(b"data: [DO"))
                .is_empty(),
            "held"
        );
        assert_eq!(
            &stripper.finish()[..],
            b"data: [DO",
            "flushed unchanged at the end"
        );
        let mut stripper = UsageStripper::new(4096);
        let out = stripper.rewrite(Bytes::from_static(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n",
        ));
        assert!(out.is_empty(), "held until its blank line");
        assert!(
            stripper.finish().is_empty(),
            "a usage chunk cut short is still removed"
        );
    }

    #[test]
    fn stripper_forwards_an_over_long_event_unchanged() {
        let max = 64;
        let stream = openai_sse(true);
        for frame_len in [1, 10, 63, 64, 65, 500, stream.len()] {
            let out = strip_frames(stream.as_bytes().chunks(frame_len), max);
            assert_eq!(
                show(&out),
                stream,
                "events beyond the cap pass untouched ({frame_len}-byte frames)"
            );
        }
        let mut stripper = UsageStripper::new(max);
        for frame in stream.as_bytes().chunks(7) {
            let _ = stripper.rewrite(Bytes::copy_from_slice(frame));
            assert!(stripper.held.len() <= max, "held bytes stay within the cap");
        }
    }

    // === Cuts: the outcome must not depend on where frames end ===

    #[test]
    fn every_cut_point_gives_the_same_outcome() {
        for case in cases() {
            for eol in EOLS {
                let stream = with_eol(&case.stream, eol);
                let expected_out = with_eol(&case.stripped, eol);
                let bytes = stream.as_bytes();
                let whole = observe_frames([bytes], 4096);
                for at in 0..=bytes.len() {
                    let frames = cut(bytes, &[at]);
                    let seen = observe_frames(frames.iter().copied(), 4096);
                    assert_eq!(seen, whole, "{}, {eol:?}, cut at {at}", case.name);
                    let out = strip_frames(frames.iter().copied(), 4096);
                    assert_eq!(
                        show(&out),
                        expected_out,
                        "{}, {eol:?}, cut at {at}",
                        case.name
                    );
                }
                let bytewise = observe_frames(bytes.chunks(1), 4096);
                assert_eq!(bytewise, whole, "{}, {eol:?}, byte by byte", case.name);
                let out = strip_frames(bytes.chunks(1), 4096);
                assert_eq!(
                    show(&out),
                    expected_out,
                    "{}, {eol:?}, byte by byte",
                    case.name
                );
            }
        }
    }

    // === Properties ===

    /// One piece of a generated stream.
    #[derive(Debug, Clone)]
    enum Piece {
        Content(String),
        Reasoning(String),
        ToolArguments(String),
        Comment,
        NamedEvent(String),
    }

    fn piece() -> impl Strategy<Value = Piece> {
        prop_oneof![
            4 => any::<String>().prop_map(Piece::Content),
            1 => any::<String>().prop_map(Piece::Reasoning),
            1 => any::<String>().prop_map(Piece::ToolArguments),
            1 => Just(Piece::Comment),
            1 => any::<String>().prop_map(Piece::NamedEvent),
        ]
    }

    /// How a generated stream writes its `usage: null` members.
    #[derive(Debug, Clone, Copy)]
    struct Style {
        eol: &'static str,
        sep: &'static str,
        colon: &'static str,
        null_first: bool,
    }

    fn style() -> impl Strategy<Value = Style> {
        (0..3usize, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(eol, spaced_sep, spaced_colon, null_first)| Style {
                eol: EOLS[eol],
                sep: if spaced_sep { ", " } else { "," },
                colon: if spaced_colon { ": " } else { ":" },
                null_first,
            },
        )
    }

    /// Renders a stream as the upstream sends it with (`include_usage`) or without the flag.
    /// Returns the stream, its data events and its generated characters.
    fn render(pieces: &[Piece], style: Style, include_usage: bool) -> (String, u64, u64) {
        let Style {
            eol,
            sep,
            colon,
            null_first,
        } = style;
        let json = |text: &str| serde_json::to_string(text).expect("a string serializes");
        let data = |delta: String| {
            let members = [
                format!("\"id\"{colon}\"c1\""),
                format!("\"object\"{colon}\"chat.completion.chunk\""),
                format!(
                    "\"choices\"{colon}[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]"
                ),
            ];
            let null = format!("\"usage\"{colon}null");
            let members: Vec<&str> = match (include_usage, null_first) {
                (false, _) => members.iter().map(String::as_str).collect(),
                (true, true) => std::iter::once(null.as_str())
                    .chain(members.iter().map(String::as_str))
                    .collect(),
                (true, false) => members
                    .iter()
                    .map(String::as_str)
                    .chain([null.as_str()])
                    .collect(),
            };
            format!("data: {{{}}}{eol}", members.join(sep))
        };
        let (mut stream, mut events, mut chars) = (String::new(), 0, 0);
        for piece in pieces {
            match piece {
                Piece::Content(text) => {
                    stream += &data(format!("{{\"content\":{}}}", json(text)));
                    chars += text.chars().count() as u64;
                }
                Piece::Reasoning(text) => {
                    stream += &data(format!("{{\"reasoning_content\":{}}}", json(text)));
                    chars += text.chars().count() as u64;
                }
                Piece::ToolArguments(text) => {
                    stream += &data(format!(
                        "{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":{}}}}}]}}",
                        json(text)
                    ));
                    chars += text.chars().count() as u64;
                }
                Piece::Comment => {
                    stream += &format!(": ping{eol}{eol}");
                    continue;
                }
                Piece::NamedEvent(text) => {
                    stream += &format!("event: delta{eol}id: 1{eol}");
                    stream += &data(format!("{{\"content\":{}}}", json(text)));
                    chars += text.chars().count() as u64;
                }
            }
            stream += eol;
            events += 1;
        }
        if include_usage {
            stream += &format!(
                "data: {{\"id\"{colon}\"c1\"{sep}\"choices\"{colon}[]{sep}\"usage\"{colon}{{\"prompt_tokens\":11,\"completion_tokens\":{events}}}}}{eol}{eol}"
            );
            events += 1;
        }
        stream += &format!("data: [DONE]{eol}{eol}");
        (stream, events + 1, chars)
    }

    fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
        prop::collection::vec(any::<prop::sample::Index>(), 0..12)
    }

    fn positions(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
        cuts.iter().map(|c| c.index(len + 1)).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_cut_of_a_stream_reads_and_strips_the_same(
            pieces in prop::collection::vec(piece(), 0..8),
            style in style(),
            cuts in cuts(),
        ) {
            let (stream, events, chars) = render(&pieces, style, true);
            let (expected, _, _) = render(&pieces, style, false);
            let bytes = stream.as_bytes();
            let frames = cut(bytes, &positions(&cuts, bytes.len()));

            let whole = observe_frames([bytes], 1 << 16);
            let expected_seen = Seen {
                usage: usage(11, events - 2),
                done: true,
                events,
                chars,
                dropped: 0,
            };
            prop_assert_eq!(&whole, &expected_seen, "observer on the whole stream");
            let seen = observe_frames(frames.iter().copied(), 1 << 16);
            prop_assert_eq!(&seen, &whole, "observer on frames {:?}", frames.iter().map(|f| f.len()).collect::<Vec<_>>());

            let out = strip_frames(frames.iter().copied(), 1 << 16);
            prop_assert_eq!(show(&out), expected, "stripper output");
        }

        #[test]
        fn the_stripper_is_the_identity_on_a_stream_without_usage(
            pieces in prop::collection::vec(piece(), 0..8),
            style in style(),
            cuts in cuts(),
        ) {
            let (stream, _, _) = render(&pieces, style, false);
            let bytes = stream.as_bytes();
            let frames = cut(bytes, &positions(&cuts, bytes.len()));
            let out = strip_frames(frames.iter().copied(), 1 << 16);
            prop_assert_eq!(show(&out), stream.clone(), "byte-equal whatever the cuts");

            // Event by event, each complete event comes back as the very same bytes.
            let mut stripper = UsageStripper::new(1 << 16);
            let end = format!("{0}{0}", style.eol);
            for event in stream.split_inclusive(&end) {
                let frame = Bytes::copy_from_slice(event.as_bytes());
                let out = stripper.rewrite(frame.clone());
                prop_assert_eq!(out.as_ptr(), frame.as_ptr(), "the same Bytes for {:?}", event);
                prop_assert_eq!(out.len(), frame.len(), "all of {:?}", event);
            }
        }

        #[test]
        fn arbitrary_bytes_never_lose_a_byte_or_panic(
            bytes in prop::collection::vec(prop_oneof![
                Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), Just(b'{'), Just(b'}'), Just(b'"'),
                Just(b'd'), Just(b'a'), Just(b't'), any::<u8>(),
            ], 0..200),
            cuts in cuts(),
            max in 1usize..64,
        ) {
            let frames = cut(&bytes, &positions(&cuts, bytes.len()));
            let _ = observe_frames(frames.iter().copied(), max);
            let out = strip_frames(frames.iter().copied(), max);
            prop_assert_eq!(out, bytes.clone(), "no usage event in here: identity");
        }
    }

    // === The lexical walk against serde ===

    /// What the walk must count, computed on a parsed `Value` by the same rules.
    fn reference_chars(chunk: &serde_json::Value) -> u64 {
        use serde_json::Value;
        fn string(v: &Value) -> u64 {
            v.as_str().map_or(0, |s| s.chars().count() as u64)
        }
        fn part(v: &Value) -> u64 {
            match v {
                Value::Object(part) => part.get("text").map_or(0, string),
                other => string(other),
            }
        }
        fn text(v: &Value) -> u64 {
            match v {
                Value::Array(parts) => parts.iter().map(part).sum(),
                other => part(other),
            }
        }
        fn function(v: &Value) -> u64 {
            v.get("name").map_or(0, string) + v.get("arguments").map_or(0, string)
        }
        fn message(v: &Value) -> u64 {
            let Value::Object(m) = v else { return 0 };
            let texts: u64 = ["content", "reasoning_content", "reasoning", "refusal"]
                .iter()
                .filter_map(|k| m.get(*k))
                .map(text)
                .sum();
            let calls: u64 = m
                .get("tool_calls")
                .and_then(Value::as_array)
                .map_or(0, |calls| {
                    calls
                        .iter()
                        .filter_map(|c| c.get("function"))
                        .map(function)
                        .sum()
                });
            texts + calls + m.get("function_call").map_or(0, function)
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return 0;
        };
        choices
            .iter()
            .map(|c| {
                c.get("delta").map_or(0, message)
                    + c.get("message").map_or(0, message)
                    + c.get("text").map_or(0, text)
            })
            .sum()
    }

    const VOCABULARY: [&str; 18] = [
        "choices",
        "delta",
        "message",
        "text",
        "content",
        "reasoning_content",
        "reasoning",
        "refusal",
        "tool_calls",
        "function",
        "function_call",
        "name",
        "arguments",
        "usage",
        "type",
        "index",
        "logprobs",
        "x",
    ];

    /// Any JSON, with keys that mean something somewhere, to be skipped or misread.
    fn noise() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e9f64..1e9).prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(&VOCABULARY[..]), inner), 0..5)
                    .prop_map(|m| Value::Object(
                        m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
                    )),
            ]
        })
    }

    /// An object with some noise members and the given meaningful ones (which win on a clash).
    fn object(
        members: Vec<(&'static str, Option<serde_json::Value>)>,
        noise_members: Vec<(&'static str, serde_json::Value)>,
    ) -> serde_json::Value {
        let mut map: serde_json::Map<String, serde_json::Value> = noise_members
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        for (key, value) in members {
            if let Some(value) = value {
                map.insert(key.to_owned(), value);
            }
        }
        serde_json::Value::Object(map)
    }

    fn noise_members() -> impl Strategy<Value = Vec<(&'static str, serde_json::Value)>> {
        prop::collection::vec((prop::sample::select(&VOCABULARY[..]), noise()), 0..3)
    }

    fn text_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::{json, Value};
        let part = prop_oneof![
            any::<String>().prop_map(|t| json!({"type": "text", "text": t})),
            any::<String>().prop_map(Value::from),
            noise(),
        ];
        prop_oneof![
            3 => any::<String>().prop_map(Value::from),
            1 => prop::collection::vec(part.clone(), 0..4).prop_map(Value::Array),
            1 => part,
            1 => noise(),
        ]
    }

    fn function_value() -> impl Strategy<Value = serde_json::Value> {
        let opt = || prop::option::of(text_value());
        (opt(), opt(), noise_members()).prop_map(|(name, arguments, n)| {
            object(vec![("name", name), ("arguments", arguments)], n)
        })
    }

    fn message_value() -> impl Strategy<Value = serde_json::Value> {
        let opt = || prop::option::of(text_value());
        let call = (prop::option::of(function_value()), noise_members())
            .prop_map(|(function, n)| object(vec![("function", function)], n));
        let calls = prop_oneof![
            prop::collection::vec(call, 0..3).prop_map(serde_json::Value::Array),
            noise(),
        ];
        (
            (opt(), opt(), opt(), opt()),
            prop::option::of(calls),
            prop::option::of(function_value()),
            noise_members(),
        )
            .prop_map(
                |((content, reasoning_content, reasoning, refusal), calls, call, n)| {
                    object(
                        vec![
                            ("content", content),
                            ("reasoning_content", reasoning_content),
                            ("reasoning", reasoning),
                            ("refusal", refusal),
                            ("tool_calls", calls),
                            ("function_call", call),
                        ],
                        n,
                    )
                },
            )
    }

    fn chunk_value() -> impl Strategy<Value = serde_json::Value> {
        let choice = (
            prop::option::of(prop_oneof![3 => message_value(), 1 => noise()]),
            prop::option::of(message_value()),
            prop::option::of(text_value()),
            noise_members(),
        )
            .prop_map(|(delta, message, text, n)| {
                object(
                    vec![("delta", delta), ("message", message), ("text", text)],
                    n,
                )
            });
        let choices = prop_oneof![
            4 => prop::collection::vec(choice, 0..3).prop_map(serde_json::Value::Array),
            1 => noise(),
        ];
        (
            prop::option::of(choices),
            prop::option::of(noise()),
            noise_members(),
        )
            .prop_map(|(choices, usage, n)| object(vec![("choices", choices), ("usage", usage)], n))
    }

    /// `text` written with every non-ASCII character as `\uXXXX` (surrogate pairs beyond the
    /// BMP), in either case, as some servers write JSON.
    fn ascii_escaped(text: &str, upper: bool) -> String {
        let mut out = String::from("\"");
        for c in text.chars() {
            match c {
                '"' => out += "\\\"",
                '\\' => out += "\\\\",
                c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
                c => {
                    for unit in c.encode_utf16(&mut [0; 2]) {
                        out += &if upper {
                            format!("\\u{unit:04X}")
                        } else {
                            format!("\\u{unit:04x}")
                        };
                    }
                }
            }
        }
        out + "\""
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn the_walk_counts_what_serde_reads(chunk in chunk_value(), pretty in any::<bool>()) {
            let json = if pretty {
                serde_json::to_string_pretty(&chunk)
            } else {
                serde_json::to_string(&chunk)
            }
            .expect("a Value serializes");
            let scan = scan_chunk(json.as_bytes());
            prop_assert!(scan.is_some(), "a valid object is walked: {}", json);
            let scan = scan.expect("checked above");
            prop_assert_eq!(scan.chars, reference_chars(&chunk), "chars in {}", json);
            prop_assert_eq!(completion_chars_from_json(json.as_bytes()), scan.chars, "a body counts the same: {}", json);
            let usage_object = chunk.get("usage").is_some_and(serde_json::Value::is_object);
            prop_assert_eq!(scan.usage_object, usage_object, "usage object in {}", json);
        }

        #[test]
        fn escapes_count_as_the_characters_they_stand_for(text in any::<String>(), upper in any::<bool>()) {
            let serde_written = serde_json::to_string(&text).expect("a string serializes");
            let ascii_written = ascii_escaped(&text, upper);
            let parsed: String = serde_json::from_str(&ascii_written).expect("the test's escaping is JSON");
            prop_assert_eq!(&parsed, &text, "the test's escaping round-trips");
            for written in [serde_written, ascii_written] {
                let raw = &written.as_bytes()[1..written.len() - 1];
                prop_assert_eq!(escaped_chars(raw), text.chars().count() as u64, "{}", written);
            }
        }

        #[test]
        fn word_at_a_time_search_finds_the_first_match(
            bytes in prop::collection::vec(prop::sample::select(&b"usage\"\r\n\\gx\x80\xff"[..]), 0..80),
            start in 0usize..8,
        ) {
            let bytes = &bytes[start.min(bytes.len())..];
            let naive = |a: u8, b: u8| bytes.iter().position(|&x| x == a || x == b);
            prop_assert_eq!(find_either(bytes, b'\n', b'\r'), naive(b'\n', b'\r'), "line breaks in {:?}", bytes);
            prop_assert_eq!(find_either(bytes, b'"', b'\\'), naive(b'"', b'\\'), "string ends in {:?}", bytes);
            prop_assert_eq!(find_byte(bytes, b'\xff'), naive(b'\xff', b'\xff'), "0xff in {:?}", bytes);
            prop_assert_eq!(
                find_usage_key(bytes),
                bytes.windows(7).position(|w| w == b"\"usage\""),
                "the usage key in {:?}", bytes
            );
        }
    }

    #[test]
    fn escapes_in_generated_text() {
        for (raw, chars) in [
            (r#"plain"#, 5),
            (r#"a\"b\\c\n"#, 6),
            (r#"\u00e9\u00E9"#, 2),
            (r#"\ud83d\ude00 \uD83D\uDE00"#, 3),
            ("é😀", 2),
            (r#"\\u0041"#, 6),
        ] {
            assert_eq!(escaped_chars(raw.as_bytes()), chars, "{raw}");
        }
    }

    // === Estimates ===

    #[test]
    fn tokens_from_chars_round_up() {
        for (chars, tokens) in [
            (0, 0),
            (1, 1),
            (3, 1),
            (4, 1),
            (5, 2),
            (400, 100),
            (u64::MAX, u64::MAX / 4 + 1),
        ] {
            assert_eq!(estimate_tokens_from_chars(chars), tokens, "{chars} chars");
        }
    }

    #[test]
    fn prompt_estimates_for_chat_bodies() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"What is in"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"text","text":" this?"}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"look","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"1","content":"a cat"}
        ]}"#;
        // 9 + 10 + 6 + 4 + 2 + 5 = 36 chars -> 9 tokens; 4 messages * 4 + 3 = 19.
        assert_eq!(
            estimate_prompt_tokens(body),
            9 + 19,
            "chat text, content parts, tool calls"
        );

        let tools = r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]"#;
        let with_tools =
            format!(r#"{{"messages":[{{"role":"user","content":"Hi"}}],"tools":{tools}}}"#);
        let tools_chars =
            serde_json::to_string(&serde_json::from_str::<serde_json::Value>(tools).expect("JSON"))
                .expect("JSON")
                .len() as u64;
        assert_eq!(
            estimate_prompt_tokens(with_tools.as_bytes()),
            estimate_tokens_from_chars(2 + tools_chars) + 4 + 3,
            "tool definitions count by their JSON"
        );
    }

    #[test]
    fn prompt_estimates_for_completions_bodies() {
        for (body, tokens, why) in [
            (
                r#"{"prompt":"The capital of France is"}"#,
                6,
                "a string: 24 chars",
            ),
            (r#"{"prompt":["abcd","efgh"]}"#, 2, "strings"),
            (r#"{"prompt":[1,2,3]}"#, 3, "a token array counts exactly"),
            (
                r#"{"prompt":[[1,2],[3,4,5]]}"#,
                5,
                "token arrays count exactly",
            ),
            (
                r#"{"prompt":"def f(","suffix":"    return x"}"#,
                5,
                "a suffix counts too: 6 + 12 chars",
            ),
            (r#"{"prompt":""}"#, 0, "an empty prompt"),
        ] {
            assert_eq!(
                estimate_prompt_tokens(body.as_bytes()),
                tokens,
                "{why}: {body}"
            );
        }
    }

    #[test]
    fn prompt_estimate_falls_back_to_length() {
        assert_eq!(
            estimate_prompt_tokens(b"not json at all!!"),
            5,
            "17 bytes, rounded up"
        );
        assert_eq!(estimate_prompt_tokens(b""), 0, "an empty body");
        assert_eq!(
            estimate_prompt_tokens(br#"{"input":"abcdefgh"}"#),
            5,
            "JSON with neither messages nor prompt: its 20 chars"
        );
    }

    // === Cost ===

    /// `cargo test --release --lib usage::tests::cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a timing, not a check: run in release mode"]
    fn cost_per_event() {
        use std::hint::black_box;
        use std::time::Instant;

        let content = |text: &str| {
            format!(
                concat!(
                    r#"data: {{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":"{}"}}}}],"#,
                    r#""created":1795356677,"id":"chatcmpl-Cyy2aK3uGdbZ1Hq4","model":"smollm2-135m-instruct","#,
                    r#""system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}}"#,
                    "\n\n"
                ),
                text
            )
        };
        // 32 events each: the role chunk, 28 content chunks, the finish chunk, the usage chunk
        // and [DONE]; one event per frame, as servers flush them.
        let sample = llama_chat_sse(true);
        let sample: Vec<&str> = sample.split_inclusive("\n\n").collect();
        let mut llama = vec![sample[0].to_owned()];
        llama.extend((0..28).map(|i| content(&format!(" word{i}"))));
        llama.extend(sample[4..].iter().map(|e| (*e).to_owned()));
        let llama: Vec<Bytes> = llama.into_iter().map(Bytes::from).collect();
        let sample = openai_sse(true);
        let sample: Vec<&str> = sample.split_inclusive("\n\n").collect();
        let mut openai = vec![sample[0].to_owned()];
        openai.extend(std::iter::repeat_n(sample[1].to_owned(), 28));
        openai.extend(sample[3..].iter().map(|e| (*e).to_owned()));
        let openai: Vec<Bytes> = openai.into_iter().map(Bytes::from).collect();
        assert_eq!(
            (llama.len(), openai.len()),
            (32, 32),
            "32 events per stream"
        );
        // Best of several runs: the machine is shared, and the best run is the least disturbed.
        let rounds = 5_000u32;
        let best = |run: &mut dyn FnMut()| {
            (0..7)
                .map(|_| {
                    let start = Instant::now();
                    for _ in 0..rounds {
                        run();
                    }
                    start.elapsed()
                })
                .min()
                .unwrap_or_default()
        };
        for (name, frames) in [("llama.cpp chat", &llama), ("OpenAI usage:null", &openai)] {
            let events = frames.len() as u32;
            let bytes: usize = frames.iter().map(Bytes::len).sum();
            let observe = best(&mut || {
                let mut observer = SseObserver::new(DEFAULT_MAX_LINE_BYTES);
                for frame in frames {
                    observer.observe(black_box(frame));
                }
                black_box(observer.usage());
            }) / (rounds * events);
            let rewrite = best(&mut || {
                let mut stripper = UsageStripper::new(DEFAULT_MAX_LINE_BYTES);
                for frame in frames {
                    black_box(stripper.rewrite(black_box(frame.clone())));
                }
                black_box(stripper.finish());
            }) / (rounds * events);
            println!(
                "{name}: {events} events, {bytes} bytes: observe {} ns/event ({:.1} µs/stream), \
                 rewrite {} ns/event ({:.1} µs/stream)",
                observe.as_nanos(),
                (observe * events).as_secs_f64() * 1e6,
                rewrite.as_nanos(),
                (rewrite * events).as_secs_f64() * 1e6,
            );
        }
    }
}
