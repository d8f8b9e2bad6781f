//! A traced request's share of the request context: its SERVER span (inside an OpenTelemetry
//! [`Context`], which children are started from), the tracer that made it, and the facts its
//! attributes are read from at the end — set by the layers that learn them, and only for a
//! request that is traced, so that a gateway without `[telemetry]` does no work for spans.
//!
//! Plain data: what spans are made of and when is [`crate::observability::traces`]'s job.
//!
//! Edge cases: the request's model is the client's (it names no secret; the metric label is
//! not used, since it folds unknown models into `other`); the upstream attempt that answered is
//! kept here until the answer's body ends, so that its span covers the whole answer.

use std::sync::{Mutex, OnceLock, PoisonError};

use opentelemetry::Context;
use opentelemetry_sdk::trace::{SdkTracer, Span};
use tokio::time::Instant;

/// What a traced request's spans are built from.
pub(crate) struct RequestTrace {
    pub(crate) tracer: SdkTracer,
    /// Holds the SERVER span: the parent of every upstream attempt's span.
    pub(crate) cx: Context,
    requested: OnceLock<Requested>,
    charged: OnceLock<Charged>,
    /// The CLIENT span of the attempt that answered, ended with the request.
    answered: Mutex<Option<Span>>,
}

/// What the request body asked for.
#[derive(Debug, Clone)]
pub(crate) struct Requested {
    pub(crate) model: String,
    pub(crate) max_tokens: Option<u64>,
    pub(crate) stream: bool,
}

/// What the request was charged, as the settlement counted it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Charged {
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
    /// `reported` or `estimated`.
    pub(crate) source: &'static str,
    /// When the answer's first byte came.
    pub(crate) first_data: Option<Instant>,
}

impl RequestTrace {
    pub(crate) fn new(tracer: SdkTracer, cx: Context) -> RequestTrace {
        RequestTrace {
            tracer,
            cx,
            requested: OnceLock::new(),
            charged: OnceLock::new(),
            answered: Mutex::new(None),
        }
    }

    pub(crate) fn requested(&self) -> Option<&Requested> {
        self.requested.get()
    }

    /// Set once, by the validate layer.
    pub(crate) fn set_requested(&self, requested: Requested) {
        let _ = self.requested.set(requested);
    }

    pub(crate) fn charged(&self) -> Option<&Charged> {
        self.charged.get()
    }

    /// Set once, by the settlement.
    pub(crate) fn set_charged(&self, charged: Charged) {
        let _ = self.charged.set(charged);
    }

    /// Keeps the span of the attempt whose answer the client gets.
    pub(crate) fn keep_answered(&self, span: Span) {
        *self.answered.lock().unwrap_or_else(PoisonError::into_inner) = Some(span);
    }

    pub(crate) fn take_answered(&self) -> Option<Span> {
        self.answered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}
