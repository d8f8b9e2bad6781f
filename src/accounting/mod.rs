//! The response body on its way out, watched for token usage, and the one settlement of each
//! request: quota windows charged, metrics counted, ledger line written — exactly once, at the end
//! of the body, on a body error, or when the body is dropped because the client left (or the
//! request itself, when the client left before the response headers).
//!
//! Frames pass through untouched (the same `Bytes`), except when the gateway asked the upstream
//! for stream usage on the client's behalf: then [`UsageStripper`] takes out of the client's
//! stream what only that request added.
//!
//! What is charged:
//! - the upstream's `usage` when one came (from the JSON body, or any SSE event) — `reported`;
//! - otherwise, for a 2xx answer, the prompt estimate plus an estimate of the text forwarded —
//!   `estimated` (client gone, upstream broke off, or an upstream that never reports);
//! - otherwise (an upstream error status without usage, or the upstream never reached) nothing.

pub mod ledger;
pub mod usage;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::accounting::ledger::{now_rfc3339, Ledger, LedgerEntry};
use crate::accounting::usage::{
    completion_chars_from_json, estimate_tokens_from_chars, usage_from_json, SseObserver, Usage,
    UsageStripper, DEFAULT_MAX_LINE_BYTES,
};
use crate::http::body::{BoxError, GatewayBody};
use crate::keys::KeyEntry;
use crate::observability::metrics::Metrics;
use crate::state::{Backend, Held};

/// A JSON answer larger than this is not kept for its usage; it is estimated instead.
const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;

/// Everything needed to settle one request once its answer is over.
pub struct Settlement {
    pub backend: Arc<Backend>,
    pub ledger: Option<Arc<Ledger>>,
    pub metrics: Arc<Metrics>,
    pub key: Arc<KeyEntry>,
    pub model: Arc<str>,
    pub endpoint: &'static str,
    pub request_id: Option<HeaderValue>,
    pub start: Instant,
    pub held: Option<Held>,
    pub prompt_estimate: u64,
    pub status: u16,
    /// Whether the upstream saw the request at all.
    pub reached_upstream: bool,
    /// Charged already: a later drop has nothing left to do.
    pub settled: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Complete,
    ClientGone,
    UpstreamError,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamError => "upstream_error",
        }
    }
}

/// The most one request is charged for its prompt, and for its completion: far beyond any real
/// request, and small enough that a window's sums of used and reserved tokens cannot overflow.
/// An upstream that reports more (a bug, or `u64::MAX`) made the quota arithmetic overflow — a
/// panic that cut the answer off (debug builds), or a wrapped sum that emptied the window
/// (release builds).
const MAX_TOKENS_PER_REQUEST: u64 = 1 << 32;

/// nginx's "client closed request": the status recorded for a request whose client left before
/// the response headers came.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

impl Settlement {
    /// Charges what the request used. Consumes the settlement: it cannot happen twice.
    pub fn settle(
        mut self,
        usage: Option<Usage>,
        completion_chars: u64,
        ttft: Option<f64>,
        outcome: Outcome,
    ) {
        self.charge(usage, completion_chars, ttft, outcome);
    }

    fn charge(
        &mut self,
        usage: Option<Usage>,
        completion_chars: u64,
        ttft: Option<f64>,
        outcome: Outcome,
    ) {
        let success = (200..300).contains(&self.status);
        // A client that left before the answer leaves the prompt charged, as one that leaves
        // mid-stream does: the upstream had it.
        let answered = success || self.status == CLIENT_CLOSED_REQUEST;
        let (prompt, completion, source) = match usage {
            Some(usage) => (usage.prompt_tokens, usage.completion_tokens, "reported"),
            None if answered && self.reached_upstream => (
                self.prompt_estimate,
                estimate_tokens_from_chars(completion_chars),
                "estimated",
            ),
            None => (0, 0, "estimated"),
        };
        if prompt.max(completion) > MAX_TOKENS_PER_REQUEST {
            tracing::warn!(
                key = &*self.key.name,
                prompt,
                completion,
                "implausible usage from the upstream; charging {MAX_TOKENS_PER_REQUEST} at most"
            );
        }
        let prompt = prompt.min(MAX_TOKENS_PER_REQUEST);
        let completion = completion.min(MAX_TOKENS_PER_REQUEST);
        let total = prompt.saturating_add(completion);
        let name: &str = &self.key.name;
        if let Some(held) = self.held.take() {
            if total > held.amount() {
                self.metrics
                    .quota_overrun_tokens_total
                    .with_label_values(&[name])
                    .inc_by(total - held.amount());
            }
            self.backend.settle(held, total, &self.key.limits.quotas);
        }
        let model: &str = &self.model;
        for (kind, tokens) in [("prompt", prompt), ("completion", completion)] {
            if tokens > 0 {
                self.metrics
                    .tokens_total
                    .with_label_values(&[name, model, kind, source])
                    .inc_by(tokens);
            }
        }
        if let Some(ttft) = ttft {
            self.metrics
                .time_to_first_token_seconds
                .with_label_values(&[name, model])
                .observe(ttft);
        }
        if let Some(ledger) = &self.ledger {
            ledger.record(LedgerEntry {
                time: now_rfc3339(),
                request_id: self
                    .request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned(),
                key: name.to_owned(),
                model: model.to_owned(),
                endpoint: self.endpoint,
                status: self.status,
                prompt_tokens: prompt,
                completion_tokens: completion,
                source,
                duration_ms: self.start.elapsed().as_secs_f64() * 1000.0,
                ttft_ms: ttft.map(|t| t * 1000.0),
                outcome: outcome.label(),
            });
        }
        self.settled = true;
    }
}

impl Drop for Settlement {
    /// Dropped unsettled: the future that held it was dropped while the request was with the
    /// upstream — its client left before the response headers (hyper drops the service future of
    /// a closed connection). Without this, such a request was never charged, had no ledger line,
    /// and its quota reservation stayed held until its window ended.
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if std::thread::panicking() {
            // Unwinding from a panic below: the client gets a 500 (CatchPanic), not a 499.
            self.status = 500;
        } else if self.status == 0 {
            self.status = CLIENT_CLOSED_REQUEST;
        }
        // The proxy had the request: it sends at once, and holds nothing back.
        self.reached_upstream = true;
        self.charge(None, 0, None, Outcome::ClientGone);
    }
}

enum Watch {
    Sse(Box<SseObserver>),
    /// The frames of a JSON answer (shared `Bytes`, not copies), read whole at the end.
    Json {
        frames: Vec<Bytes>,
        len: usize,
        overflow: bool,
    },
}

pin_project! {
    pub struct AccountedBody {
        #[pin]
        inner: GatewayBody,
        watch: Watch,
        stripper: Option<UsageStripper>,
        settlement: Option<Settlement>,
        ttft: Option<f64>,
        // The stripper's held-back tail, sent before the end of stream.
        flushed: bool,
    }

    impl PinnedDrop for AccountedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(settlement) = this.settlement.take() {
                let (usage, chars) = read(this.watch);
                settlement.settle(usage, chars, *this.ttft, Outcome::ClientGone);
            }
        }
    }
}

impl AccountedBody {
    pub fn new(inner: GatewayBody, sse: bool, strip: bool, settlement: Settlement) -> Self {
        let watch = if sse {
            Watch::Sse(Box::new(SseObserver::new(DEFAULT_MAX_LINE_BYTES)))
        } else {
            Watch::Json {
                frames: Vec::new(),
                len: 0,
                overflow: false,
            }
        };
        AccountedBody {
            inner,
            watch,
            stripper: strip.then(|| UsageStripper::new(DEFAULT_MAX_LINE_BYTES)),
            settlement: Some(settlement),
            ttft: None,
            flushed: false,
        }
    }
}

/// The usage and generated-text size seen so far.
fn read(watch: &Watch) -> (Option<Usage>, u64) {
    match watch {
        Watch::Sse(observer) => (observer.usage(), observer.completion_chars()),
        Watch::Json {
            frames, overflow, ..
        } => {
            if *overflow {
                return (None, 0);
            }
            let whole: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
            (usage_from_json(&whole), completion_chars_from_json(&whole))
        }
    }
}

impl Body for AccountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        // Trailers and other frames: nothing to read, nothing to change.
                        continue;
                    };
                    if this.ttft.is_none() {
                        if let (Some(settlement), Watch::Sse(_)) =
                            (this.settlement.as_ref(), &*this.watch)
                        {
                            *this.ttft = Some(settlement.start.elapsed().as_secs_f64());
                        }
                    }
                    match this.watch {
                        Watch::Sse(observer) => observer.observe(&data),
                        Watch::Json {
                            frames,
                            len,
                            overflow,
                        } => {
                            *len += data.len();
                            if *len > MAX_JSON_BYTES {
                                *overflow = true;
                                frames.clear();
                            } else if !*overflow {
                                frames.push(data.clone());
                            }
                        }
                    }
                    let mut out = match this.stripper.as_mut() {
                        Some(stripper) => stripper.rewrite(data),
                        None => data,
                    };
                    // The end may come with the last data frame (a Content-Length body): the
                    // consumer need not poll again, so settle now.
                    if this.inner.is_end_stream() {
                        *this.flushed = true;
                        if let Some(rest) = this.stripper.as_mut().map(UsageStripper::finish) {
                            if !rest.is_empty() {
                                let mut joined = bytes::BytesMut::from(&out[..]);
                                joined.extend_from_slice(&rest);
                                out = joined.freeze();
                            }
                        }
                        if let Some(settlement) = this.settlement.take() {
                            let (usage, chars) = read(this.watch);
                            settlement.settle(usage, chars, *this.ttft, Outcome::Complete);
                        }
                    }
                    if out.is_empty() {
                        if this.settlement.is_none() {
                            return Poll::Ready(None);
                        }
                        // All of it was held back or removed: wait for more.
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Some(Err(error)) => {
                    if let Some(settlement) = this.settlement.take() {
                        let (usage, chars) = read(this.watch);
                        settlement.settle(usage, chars, *this.ttft, Outcome::UpstreamError);
                    }
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    if !*this.flushed {
                        *this.flushed = true;
                        let rest = this.stripper.as_mut().map(UsageStripper::finish);
                        if let Some(rest) = rest.filter(|r| !r.is_empty()) {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                    }
                    if let Some(settlement) = this.settlement.take() {
                        let (usage, chars) = read(this.watch);
                        settlement.settle(usage, chars, *this.ttft, Outcome::Complete);
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Settled means the last frame has been handed out (or the body failed).
        self.settlement.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.stripper.is_some() {
            // The stripped stream is shorter than the upstream's.
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
