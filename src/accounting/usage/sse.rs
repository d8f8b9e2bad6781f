//! [`SseObserver`]: watches an SSE stream frame by frame, and keeps the last usage object seen,
//! whether `[DONE]` came, and how much text was generated. See the [`super`] module doc for where
//! usage rides in each server's streams and the edge cases of line breaks and cuts.

use super::json::{scan_chunk_after, Prefix, UsageField, UsageOnly};
use super::search::find_either;
use super::Usage;

// === impl SseObserver ===

/// Watches an SSE stream frame by frame: feed it every data frame's bytes as they pass (it only
/// borrows them, and copies only a frame's unfinished last line).
#[derive(Debug)]
pub(crate) struct SseObserver {
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
    completion_chars: u64,
    /// The last chunk's bytes before `choices`, which the next chunk's walk need not pass again.
    prefix: Prefix,
    /// What the tests check the scan by; not kept in a release build (nothing else reads it).
    #[cfg(test)]
    seen: Seen,
}

/// What the unit tests count of a scan.
#[cfg(test)]
#[derive(Debug, Default)]
struct Seen {
    saw_done: bool,
    events: u64,
    dropped_lines: u64,
}

impl SseObserver {
    /// `max_line_bytes` caps one line (and so the carried-over bytes); a longer line is dropped.
    /// [`DEFAULT_MAX_LINE_BYTES`] suits model streams.
    pub(crate) fn new(max_line_bytes: usize) -> Self {
        SseObserver {
            max_line_bytes,
            carry: Vec::new(),
            skipping: false,
            pending_lf: false,
            in_event: false,
            usage: None,
            completion_chars: 0,
            prefix: Prefix::default(),
            #[cfg(test)]
            seen: Seen::default(),
        }
    }

    /// Reads one frame of the stream. Events may span frames; a frame may hold many events.
    pub(crate) fn observe(&mut self, frame: &[u8]) {
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
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether `data: [DONE]` was seen: the upstream finished the stream properly.
    #[cfg(test)]
    pub(crate) fn saw_done(&self) -> bool {
        self.seen.saw_done
    }

    /// Characters of generated text seen so far: `choices[].delta.content` (a string or content
    /// parts' `text`), `choices[].text`, `delta.reasoning_content` / `delta.reasoning`,
    /// `delta.refusal`, and the name and arguments of `delta.tool_calls[].function` (and of the
    /// legacy `delta.function_call`). For [`estimate_tokens_from_chars`] when no usage arrives.
    pub(crate) fn completion_chars(&self) -> u64 {
        self.completion_chars
    }

    /// Data events seen, `[DONE]` included.
    #[cfg(test)]
    pub(crate) fn events(&self) -> u64 {
        self.seen.events
    }

    /// Lines dropped because they were longer than the cap.
    #[cfg(test)]
    pub(crate) fn dropped_lines(&self) -> u64 {
        self.seen.dropped_lines
    }

    /// The unfinished line carried over, for the tests of its cap.
    #[cfg(test)]
    pub(super) fn carry(&self) -> &Vec<u8> {
        &self.carry
    }

    /// A line is complete: `line` is its end (or all of it), without the line break.
    fn end_line(&mut self, line: &[u8]) {
        if self.skipping {
            self.skipping = false;
            return;
        }
        if self.carry.len() + line.len() > self.max_line_bytes {
            // Dropped whether it came whole or in pieces, so the outcome does not depend on cuts.
            #[cfg(test)]
            {
                self.seen.dropped_lines += 1;
            }
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
            #[cfg(test)]
            {
                self.seen.dropped_lines += 1;
            }
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
            #[cfg(test)]
            {
                self.seen.events += 1;
            }
        }
        let value = value.trim_ascii();
        if value == b"[DONE]" {
            #[cfg(test)]
            {
                self.seen.saw_done = true;
            }
        } else if let Some(scan) = scan_chunk_after(value, Some(&mut self.prefix)) {
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
pub(super) struct LineEnd {
    pub(super) len: usize,
    pub(super) term: usize,
}

/// The first line break in `bytes`: `\n`, `\r\n` or a lone `\r`.
pub(super) fn line_end(bytes: &[u8]) -> Option<LineEnd> {
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
pub(super) fn data_value(line: &[u8]) -> Option<&[u8]> {
    let value = line.strip_prefix(b"data")?;
    if value.is_empty() {
        return Some(value);
    }
    let value = value.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

#[cfg(test)]
#[path = "sse_tests.rs"]
mod tests;
