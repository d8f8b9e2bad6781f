//! [`UsageStripper`]: when the gateway set `stream_options.include_usage` upstream although the
//! client did not ask for it, removes from the client's stream what only that flag added. The
//! rule and its edge cases are in the [`super`] module doc ("The stripping rule").

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::de::IgnoredAny;

use super::cursor::Cursor;
use super::search::find_usage_key;
use super::sse::{data_value, line_end, LineEnd};

// === impl UsageStripper ===

/// Removes from a client's SSE stream what the gateway's own `include_usage` added (see the
/// module doc for the rule). Holds back only an incomplete event, with its own carry-over.
#[derive(Debug)]
pub(crate) struct UsageStripper {
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
    /// What was removed, for the tests; not kept in a release build (nothing else reads it).
    #[cfg(test)]
    removed: (u64, u64),
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
    pub(crate) fn new(max_line_bytes: usize) -> Self {
        UsageStripper {
            max_event_bytes: max_line_bytes,
            held: Vec::new(),
            line_has_bytes: false,
            pending_lf: false,
            drop_lf: false,
            passthrough: false,
            #[cfg(test)]
            removed: (0, 0),
        }
    }

    /// Takes a frame and returns the bytes to forward now. A frame of complete events with
    /// nothing to remove comes back as the same `Bytes` (no copy); a frame that ends inside an
    /// event returns the events before it as a slice of the frame and holds the rest until the
    /// event's end arrives. The result may be empty: there is nothing to send yet.
    pub(crate) fn rewrite(&mut self, frame: Bytes) -> Bytes {
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
    pub(crate) fn finish(&mut self) -> Bytes {
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
    #[cfg(test)]
    pub(crate) fn events_removed(&self) -> u64 {
        self.removed.0
    }

    /// `"usage": null` members removed so far.
    #[cfg(test)]
    pub(crate) fn fields_removed(&self) -> u64 {
        self.removed.1
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

    /// Decides an event's fate (and, under test, counts what is removed).
    fn fate(&mut self, event: &[u8]) -> Fate {
        let fate = event_fate(event);
        #[cfg(test)]
        match fate {
            Fate::Keep => {}
            Fate::Drop => self.removed.0 += 1,
            Fate::Cut(_) => self.removed.1 += 1,
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
    if let Some(cut) = null_usage_last(json) {
        // OpenAI's `"usage":null` on every chunk: its fixed shape, without the walk.
        return match serde_json::from_slice::<IgnoredAny>(json) {
            Ok(_) => Fate::Cut(data.start + cut.start..data.start + cut.end),
            Err(_) => Fate::Keep,
        };
    }
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

/// The cut [`TopLevel::scan`] would make for `"usage": null` as the last member of `json`, found
/// from the end without walking the object: `None` (the walk decides) for any other shape.
///
/// Why this is the walk's answer whenever `json` is valid JSON (the caller checks): the first
/// `"usage"` byte run is followed only by `: null }`, so it is the only one and no other member is
/// written `usage`; `choices` is written at most once, so it is not doubled; the opening quote
/// follows `{` or `,` (so it is no escaped quote, and opens a string that `:` makes a key); and
/// the `}` after `null` is the text's last byte, so it closes the outermost object, whose member
/// this is. Other shapes (`usage` not last, as no server sends it) are left to the walk.
fn null_usage_last(json: &[u8]) -> Option<Range<usize>> {
    const KEY: &[u8] = b"\"usage\"";
    let key_start = find_usage_key(json)?;
    let value = json[key_start + KEY.len()..]
        .trim_ascii_start()
        .strip_prefix(b":")?;
    let value = value.trim_ascii_start();
    if value.strip_prefix(b"null")?.trim_ascii() != b"}" {
        return None;
    }
    let value_end = json.len() - value.len() + b"null".len();
    if find_choices_twice(json) {
        return None;
    }
    let before = json[..key_start].trim_ascii_end();
    match before.split_last()? {
        (b',', prev) => Some(prev.trim_ascii_end().len()..value_end),
        (b'{', opening) if opening.trim_ascii().is_empty() => Some(key_start..value_end),
        _ => None,
    }
}

/// Whether `"choices"` occurs twice or more in `json` (so it may be a doubled key).
fn find_choices_twice(json: &[u8]) -> bool {
    let finder = memchr::memmem::find_iter(json, b"\"choices\"");
    finder.take(2).count() == 2
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
            let value_start = c.pos();
            c.skip_value()?;
            let value_end = value_start + json[value_start..c.pos()].trim_ascii_end().len();
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
#[path = "strip_tests.rs"]
mod tests;
