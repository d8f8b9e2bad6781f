//! The fixed label values of the gateway's counters, as enums: callers can only count a value
//! that is declared here, and [`super::metrics::Metrics`] iterates them to export every series at
//! 0 from the start, so that `increase(…[15m]) > 0` fires on the first error, not the second.
//!
//! The label is the variant's snake_case name (`strum`); renaming a variant renames a series
//! that dashboards and alerts query.

use strum::{Display, EnumIter, IntoStaticStr};

/// `tollgate_upstream_errors_total{upstream, kind}`; the first three are also the `status` of
/// `tollgate_upstream_requests_total` for an attempt that got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Display, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum UpstreamErrorKind {
    /// No connection could be made.
    Connect,
    /// No response headers before `response_header_timeout`.
    Timeout,
    /// The connection failed after the request was sent.
    Broken,
    /// Silence between two body frames past `idle_timeout`.
    BodyIdleTimeout,
    /// The body failed mid-stream.
    BodyError,
    /// An attempt that could not be delivered, sent again: to another endpoint, or on a fresh
    /// connection when a pooled one was found dead.
    Retried,
}

/// `tollgate_ledger_errors_total{reason}`: why a ledger line was not written where it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Display, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum LedgerErrorReason {
    /// The disk refused the write to the ledger file (lost).
    Write,
    /// A writer did not keep up (lost).
    QueueFull,
    /// The ledger was already closed (lost).
    Closed,
    /// PostgreSQL did not take the line (unreachable, slow, refusing): it went to the spool, and
    /// is sent when the database is back.
    Postgres,
    /// The spool could not be written, or held a line that could not be read back (lost).
    Spool,
}

/// `tollgate_state_errors_total{op}`: the shared-state (Redis) call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Display, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum StateOp {
    Admit,
    Reserve,
    Settle,
    Status,
    Renew,
    Release,
    /// Reading, changing or following the keys made through the admin API.
    ManagedKeys,
}

/// Which count of a usage object: `kind` of `tollgate_usage_unreadable_counts_total` and of
/// `tollgate_tokens_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Display, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum TokenKind {
    Prompt,
    Completion,
}

/// `tollgate_rejections_total{key, reason}`: why the gateway refused a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Display, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum Rejection {
    // --- before a key is known: counted under `key="unauthenticated"` ---
    MissingApiKey,
    MalformedApiKey,
    InvalidApiKey,
    // --- a configured key's ---
    Rate,
    Concurrency,
    ModelNotFound,
    MaxTokensExceeded,
    TooManyChoices,
    UnboundedField,
    Quota,
    StateUnavailable,
}

impl Rejection {
    /// Whether this refusal is counted under a configured key (else under `unauthenticated`).
    pub(crate) fn is_per_key(self) -> bool {
        match self {
            Rejection::MissingApiKey | Rejection::MalformedApiKey | Rejection::InvalidApiKey => {
                false
            }
            Rejection::Rate
            | Rejection::Concurrency
            | Rejection::ModelNotFound
            | Rejection::MaxTokensExceeded
            | Rejection::TooManyChoices
            | Rejection::UnboundedField
            | Rejection::Quota
            | Rejection::StateUnavailable => true,
        }
    }
}

/// `tollgate_trace_spans_dropped_total{reason}`: why a finished span never reached the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Display, EnumIter, IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum SpanDrop {
    /// The export queue was full (the collector is slow or down, or spans come too fast).
    QueueFull,
    /// The collector refused the batch, or did not answer in time.
    ExportFailed,
    /// The exporter had already shut down.
    Closed,
}
