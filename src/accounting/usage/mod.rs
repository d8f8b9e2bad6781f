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
//! - [`prompt_tokens`] / [`estimate_tokens_from_chars`]: where no count exists — a prompt's upper
//!   bound (the quota reservation) and estimate (charged when no usage comes), and a stream that
//!   broke off before its usage.
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
//! - A usage object needs `prompt_tokens` or `completion_tokens`; each count is read as
//!   [`TokenCount::Reported`], [`TokenCount::Absent`] (missing or `null`) or
//!   [`TokenCount::Unreadable`] (negative, fractional, a string, …) — never as 0.
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
//! string ends found by `memchr`, a search for the `"usage"` key that lets the walk stop
//! right after `choices`, and the walk itself; serde only for the (about one) event with a usage
//! object, and to validate an event before an edit. Those figures predate two shortcuts, which
//! the gateway's count (`bench/instructions.sh`, a 32-event stream) puts at −12 %: the observer
//! walks a chunk whose bytes up to `choices` repeat the last chunk's from `choices` on (its
//! metadata, in all but the first chunk of a stream), and the stripper finds `"usage": null` as
//! the last member by its fixed shape, without walking the object.

mod cursor;
mod estimate;
mod json;
mod search;
mod sse;
mod strip;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use self::estimate::{
    estimate_prompt_tokens, estimate_prompt_tokens_json, estimate_tokens_from_chars,
    prompt_token_bound, prompt_tokens, PromptTokens, TEMPLATE_BOUND_PER_MESSAGE,
    TEMPLATE_BOUND_PER_REQUEST,
};
pub(crate) use self::json::{completion_chars_from_json, usage_from_json};
pub(crate) use self::sse::SseObserver;
pub(crate) use self::strip::UsageStripper;

/// A sensible cap on an SSE line (observer) or an incomplete event (stripper): chunks are a few
/// hundred bytes; a whole tool-call argument in one chunk can reach tens of KiB.
pub(crate) const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;

/// Token counts for one request, as an upstream's `usage` object gave them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: TokenCount,
    pub(crate) completion_tokens: TokenCount,
}

/// One count of a `usage` object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum TokenCount {
    /// Not there, or `null`.
    #[default]
    Absent,
    /// A non-negative integer (an integral float such as `16.0` included).
    Reported(u64),
    /// There, but not a non-negative integer: `"100"`, `-100`, `100.5`, `true`, an object. Never
    /// read as 0: the settlement estimates it, and counts it in
    /// `tollgate_usage_unreadable_counts_total`.
    Unreadable,
}

impl TokenCount {
    /// The count, when the upstream reported one that can be read.
    #[cfg(test)]
    pub(crate) fn reported(self) -> Option<u64> {
        match self {
            TokenCount::Reported(count) => Some(count),
            TokenCount::Absent | TokenCount::Unreadable => None,
        }
    }
}
