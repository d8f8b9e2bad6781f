//! The `x-mock-*` request headers, read into the knobs of one answer, and [`Fault`], the faults
//! and canned answers a request can ask for by `x-mock-fault`.
//!
//! A header that does not parse is ignored (`x-mock-chunks: many` means the default), except
//! `x-mock-fault`: an unknown value sets `bad_fault`, and the request gets a 400, so that a typo
//! in a test shows instead of passing as "no fault".

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

/// The request header that picks a [`Fault`].
pub const FAULT_HEADER: &str = "x-mock-fault";

/// Cap for the `x-mock-chunks` header (keeps memory bounded on odd input).
const HEADER_CHUNKS_CAP: usize = 1_000_000;

/// A fault or a canned answer, asked for per request with `x-mock-fault: <Display of it>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `reset-before-headers`: read the request, then reset the connection without an answer.
    ResetBeforeHeaders,
    /// `stall-headers`: never answer.
    StallHeaders,
    /// `stall-body`: the head and 2 SSE events (half the JSON), then hang.
    StallBody,
    /// `abort-after=K`: the head and `K` SSE events (half the JSON if `K > 0`), then drop the
    /// connection mid-body.
    AbortAfter(usize),
    /// `not-json`: 200 `application/json`, body `this is not json`.
    NotJson,
    /// `garbage-json`: 200 `application/json`, [`crate::canned::garbage_json`].
    GarbageJson,
    /// `garbage-sse`: 200 `text/event-stream`, the frames of [`crate::canned::garbage_sse`].
    GarbageSse,
    /// `absurd-usage`: 200, [`crate::canned::ABSURD_USAGE`] (usage of `u64::MAX` tokens).
    AbsurdUsage,
    /// `flood=BYTES`: 200 SSE, `BYTES` of chunk events in 64 KiB frames, each made only when the
    /// previous one was taken (so a reader that stops reading stops the mock too).
    Flood(u64),
}

impl Fault {
    /// Answers that replace the generated one whole (the others break the exchange).
    pub(crate) fn is_canned(self) -> bool {
        matches!(
            self,
            Fault::NotJson
                | Fault::GarbageJson
                | Fault::GarbageSse
                | Fault::AbsurdUsage
                | Fault::Flood(_)
        )
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::ResetBeforeHeaders => f.write_str("reset-before-headers"),
            Fault::StallHeaders => f.write_str("stall-headers"),
            Fault::StallBody => f.write_str("stall-body"),
            Fault::AbortAfter(k) => write!(f, "abort-after={k}"),
            Fault::NotJson => f.write_str("not-json"),
            Fault::GarbageJson => f.write_str("garbage-json"),
            Fault::GarbageSse => f.write_str("garbage-sse"),
            Fault::AbsurdUsage => f.write_str("absurd-usage"),
            Fault::Flood(bytes) => write!(f, "flood={bytes}"),
        }
    }
}

/// An `x-mock-fault` value that names no [`Fault`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseFaultError(String);

impl fmt::Display for ParseFaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown {FAULT_HEADER} value {:?}", self.0)
    }
}

impl std::error::Error for ParseFaultError {}

impl FromStr for Fault {
    type Err = ParseFaultError;

    fn from_str(value: &str) -> Result<Fault, ParseFaultError> {
        let number = |prefix: &str| {
            value
                .strip_prefix(prefix)
                .and_then(|n| n.trim().parse::<u64>().ok())
        };
        let fault = match value {
            "reset-before-headers" => Fault::ResetBeforeHeaders,
            "stall-headers" => Fault::StallHeaders,
            "stall-body" => Fault::StallBody,
            "not-json" => Fault::NotJson,
            "garbage-json" => Fault::GarbageJson,
            "garbage-sse" => Fault::GarbageSse,
            "absurd-usage" => Fault::AbsurdUsage,
            _ => match (number("abort-after="), number("flood=")) {
                (Some(k), _) => Fault::AbortAfter(usize::try_from(k).unwrap_or(usize::MAX)),
                (_, Some(bytes)) => Fault::Flood(bytes),
                _ => return Err(ParseFaultError(value.to_owned())),
            },
        };
        Ok(fault)
    }
}

/// What the request headers ask of one answer.
#[derive(Debug, Default)]
pub(crate) struct Knobs {
    pub(crate) chunks: Option<usize>,
    pub(crate) prompt_tokens: Option<usize>,
    pub(crate) usage: Option<String>,
    pub(crate) tools: bool,
    pub(crate) status: Option<StatusCode>,
    pub(crate) header_delay: Option<Duration>,
    pub(crate) chunk_delay: Option<Duration>,
    pub(crate) fault: Option<Fault>,
    /// `x-mock-fault` was present but not understood.
    pub(crate) bad_fault: bool,
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn header_ms(headers: &HeaderMap, name: &str) -> Option<Duration> {
    header_str(headers, name)
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

impl Knobs {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Knobs {
        let mut knobs = Knobs {
            chunks: header_str(headers, "x-mock-chunks")
                .and_then(|v| v.parse::<usize>().ok())
                .map(|n| n.min(HEADER_CHUNKS_CAP)),
            prompt_tokens: header_str(headers, "x-mock-prompt-tokens")
                .and_then(|v| v.parse::<usize>().ok()),
            usage: header_str(headers, "x-mock-usage").map(str::to_owned),
            tools: matches!(
                header_str(headers, "x-mock-tools"),
                Some("1" | "true" | "yes")
            ),
            status: header_str(headers, "x-mock-status")
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|s| (400..=599).contains(s))
                .and_then(|s| StatusCode::from_u16(s).ok()),
            header_delay: header_ms(headers, "x-mock-header-delay-ms"),
            chunk_delay: header_ms(headers, "x-mock-chunk-delay-ms"),
            ..Knobs::default()
        };
        if let Some(fault) = header_str(headers, FAULT_HEADER) {
            knobs.fault = fault.parse().ok();
            knobs.bad_fault = knobs.fault.is_none();
        }
        knobs
    }
}
