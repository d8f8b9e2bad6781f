//! The one settlement of each request: its quota reservation charged to what was used, its
//! metrics counted, its ledger line written — exactly once, by [`Settlement::settle`] at the end of
//! the answer, or on drop when the client left before the response headers.
//!
//! Edge cases: a request dropped while a panic unwinds is recorded as a 500 (what `CatchPanic`
//! answers), one dropped before any status as a 499; counts an upstream reports beyond
//! [`MAX_TOKENS_PER_REQUEST`] are capped, so the quota arithmetic cannot overflow.

use std::sync::Arc;

use http::HeaderValue;
use tokio::time::Instant;

use crate::accounting::ledger::{now_rfc3339, Ledger, LedgerEntry};
use crate::accounting::usage::{estimate_tokens_from_chars, Usage};
use crate::http::CLIENT_CLOSED_REQUEST;
use crate::keys::KeyEntry;
use crate::observability::metrics::Metrics;
use crate::state::{Backend, Held};

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
