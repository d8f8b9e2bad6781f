//! The one settlement of each request: its quota reservation charged to what was used, its token
//! metrics counted, its ledger line written. A [`Settlement`] is registered in the request
//! context by the quota layer before the request goes upstream, and run once by the request's
//! end hook ([`AtEnd`]) — at the end of the answer, on a body error, or when the client left,
//! before or after the response headers. The request's id, start, key, model and endpoint are
//! read from the context: the settlement holds only what is its own. The ledger line also goes to
//! the console's ring of recent requests, ledger file or not.
//!
//! Edge cases: counts an upstream reports beyond [`MAX_TOKENS_PER_REQUEST`] are capped, so the
//! quota arithmetic cannot overflow; a count the usage object lacks, or holds in a form that is
//! not a non-negative integer (`"100"`, `-100`, `100.5`), is estimated like a missing usage — never
//! charged as 0 — and an unreadable one is counted in `tollgate_usage_unreadable_counts_total`; a
//! request without a key in its context (which the quota layer never registers) charges nothing.

use std::sync::Arc;

use crate::accounting::body::{Observed, UsageWatch};
use crate::accounting::cost::{Cost, Rate};
use crate::accounting::ledger::{now_rfc3339, Ledger, LedgerEntry};
use crate::accounting::recent::RecentRequests;
use crate::accounting::usage::{estimate_tokens_from_chars, TokenCount, Usage};
use crate::http::context::{AtEnd, Ending, RequestContext};
use crate::http::CLIENT_CLOSED_REQUEST;
use crate::keys::KeyEntry;
use crate::observability::labels::TokenKind;
use crate::observability::metrics::Metrics;
use crate::state::{Amounts, Backend, Held};

/// Everything needed to settle one request once its answer is over, besides its context.
pub struct Settlement {
    pub backend: Arc<Backend>,
    pub ledger: Option<Arc<Ledger>>,
    /// The console's ring of the last ledger lines, kept with or without a ledger file.
    pub recent: Arc<RecentRequests>,
    pub metrics: Arc<Metrics>,
    pub held: Option<Held>,
    /// The model's price when the request was admitted (a reload does not change what a request
    /// in flight costs); `None` when the price table has none for it.
    pub rate: Option<Rate>,
    pub prompt_estimate: u64,
    /// What the answer's body showed of its usage (nothing, when no body was watched).
    pub watch: Arc<UsageWatch>,
}

/// The most one request is charged for its prompt, and for its completion: far beyond any real
/// request, and small enough that a window's sums of used and reserved tokens cannot overflow.
/// An upstream that reports more (a bug, or `u64::MAX`) made the quota arithmetic overflow — a
/// panic that cut the answer off (debug builds), or a wrapped sum that emptied the window
/// (release builds).
const MAX_TOKENS_PER_REQUEST: u64 = 1 << 32;

/// What one request is charged.
struct Charge {
    prompt: u64,
    completion: u64,
    /// `reported` (the upstream's count) or `estimated`, for each.
    prompt_source: &'static str,
    completion_source: &'static str,
}

impl Charge {
    /// The ledger's one word: `reported` when both counts were.
    fn source(&self) -> &'static str {
        if self.prompt_source == REPORTED && self.completion_source == REPORTED {
            REPORTED
        } else {
            ESTIMATED
        }
    }
}

const REPORTED: &str = "reported";
const ESTIMATED: &str = "estimated";

impl AtEnd for Settlement {
    fn at_end(mut self: Box<Self>, context: &RequestContext, ending: &Ending) {
        let Some(key) = context.key() else {
            return;
        };
        let observed = self.watch.observed();
        let charge = self.charge(key, &observed, ending);
        let cost = self
            .rate
            .map(|rate| rate.cost(charge.prompt, charge.completion));
        self.settle_quota(key, &charge, cost.unwrap_or(0));
        let ttft = observed
            .first_data
            .map(|first| (first - context.start()).as_secs_f64());
        self.count(context, &charge, cost, ttft);
        if let Some(trace) = context.trace() {
            trace.set_charged(crate::http::trace::Charged {
                input_tokens: charge.prompt,
                output_tokens: charge.completion,
                source: charge.source(),
                first_data: observed.first_data,
            });
        }
        let group = key.group.as_ref().map(|g| g.name.to_string());
        let entry = Arc::new(ledger_entry(context, ending, &charge, (group, cost), ttft));
        if let Some(ledger) = &self.ledger {
            ledger.record(&entry);
        }
        self.recent.push(entry);
    }
}

impl Settlement {
    /// The tokens to charge: the upstream's counts; else, for an answer that came (or a client
    /// that left once the upstream had the prompt), an estimate; else nothing. A usage object
    /// with a count missing or unreadable has the estimate for that count.
    fn charge(&self, key: &KeyEntry, observed: &Observed, ending: &Ending) -> Charge {
        let status = ending.status.as_u16();
        // A client that left before the answer leaves the prompt charged, as one that leaves
        // mid-stream does: the upstream had it.
        let answered = (200..300).contains(&status) || status == CLIENT_CLOSED_REQUEST;
        let estimate = (
            self.prompt_estimate,
            estimate_tokens_from_chars(observed.completion_chars),
        );
        let usage = match observed.usage {
            Some(usage) => usage,
            None if answered && ending.upstream_reached => Usage::default(),
            None => {
                return Charge {
                    prompt: 0,
                    completion: 0,
                    prompt_source: ESTIMATED,
                    completion_source: ESTIMATED,
                }
            }
        };
        let (prompt, prompt_source) =
            self.charged_count(key, TokenKind::Prompt, usage.prompt_tokens, estimate.0);
        let (completion, completion_source) = self.charged_count(
            key,
            TokenKind::Completion,
            usage.completion_tokens,
            estimate.1,
        );
        if prompt.max(completion) > MAX_TOKENS_PER_REQUEST {
            tracing::warn!(
                key = &*key.name,
                prompt,
                completion,
                "implausible usage from the upstream; charging {MAX_TOKENS_PER_REQUEST} at most"
            );
        }
        Charge {
            prompt: prompt.min(MAX_TOKENS_PER_REQUEST),
            completion: completion.min(MAX_TOKENS_PER_REQUEST),
            prompt_source,
            completion_source,
        }
    }

    /// One count as charged: the upstream's, or `estimate` when it gave none that can be read
    /// (an unreadable one is counted).
    fn charged_count(
        &self,
        key: &KeyEntry,
        kind: TokenKind,
        count: TokenCount,
        estimate: u64,
    ) -> (u64, &'static str) {
        match count {
            TokenCount::Reported(count) => (count, REPORTED),
            TokenCount::Absent => (estimate, ESTIMATED),
            TokenCount::Unreadable => {
                self.metrics.usage_unreadable(kind);
                tracing::debug!(
                    key = &*key.name,
                    kind = %kind,
                    "the upstream's usage count is not a non-negative integer; estimated"
                );
                (estimate, ESTIMATED)
            }
        }
    }

    /// Replaces the reservation by what was used (tokens and `cost`); counts what went past it.
    fn settle_quota(&mut self, key: &KeyEntry, charge: &Charge, cost: u64) {
        let Some(held) = self.held.take() else {
            return;
        };
        let total = charge.prompt.saturating_add(charge.completion);
        let reserved = held.amounts().tokens;
        if total > reserved {
            key.series
                .overrun(&self.metrics, &key.name)
                .inc_by(total - reserved);
        }
        let used = Amounts {
            tokens: total,
            cost,
        };
        self.backend.settle(held, used, &key.windows);
    }

    /// The token, cost and time-to-first-token metrics.
    fn count(
        &self,
        context: &RequestContext,
        charge: &Charge,
        cost: Option<u64>,
        ttft: Option<f64>,
    ) {
        let Some(entry) = context.key() else {
            return;
        };
        let labels = (context.key_label(), context.model_label());
        // The key's own handles: no label lookup.
        let series = entry.series.model(labels.1);
        if let Some(cost) = cost.filter(|c| *c > 0) {
            series.add_cost(&self.metrics, labels, cost);
        }
        for (kind, tokens, source) in [
            (TokenKind::Prompt, charge.prompt, charge.prompt_source),
            (
                TokenKind::Completion,
                charge.completion,
                charge.completion_source,
            ),
        ] {
            if tokens > 0 {
                series.add_tokens(&self.metrics, labels, (kind, source), tokens);
            }
        }
        self.metrics
            .timeline
            .record_tokens(charge.prompt.saturating_add(charge.completion));
        if let Some(ttft) = ttft {
            series.time_to_first_token(&self.metrics, labels, ttft);
        }
    }
}

/// The request's ledger line. A gateway-made upstream error (502/504) is `upstream_error`
/// however its short body ended.
fn ledger_entry(
    context: &RequestContext,
    ending: &Ending,
    charge: &Charge,
    (group, cost): (Option<String>, Option<u64>),
    ttft: Option<f64>,
) -> LedgerEntry {
    let outcome = match ending.error {
        Some(_) => "upstream_error",
        None => ending.outcome.ledger_label(),
    };
    LedgerEntry {
        id: uuid::Uuid::new_v4(),
        time: now_rfc3339(),
        request_id: context.id().to_owned(),
        key: context.key_label().to_owned(),
        group,
        model: context.model_label().to_owned(),
        endpoint: context.endpoint_label(),
        upstream: context.upstream_label().to_owned(),
        status: ending.status.as_u16(),
        prompt_tokens: charge.prompt,
        completion_tokens: charge.completion,
        cost: cost.map(Cost),
        source: charge.source(),
        duration_ms: context.start().elapsed().as_secs_f64() * 1000.0,
        ttft_ms: ttft.map(|t| t * 1000.0),
        outcome,
    }
}
