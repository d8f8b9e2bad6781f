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
    /// What the answer said of itself: the model that answered, why its choices stopped.
    response_model: OnceLock<String>,
    finish_reasons: Mutex<Vec<String>>,
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
            response_model: OnceLock::new(),
            finish_reasons: Mutex::new(Vec::new()),
            answered: Mutex::new(None),
        }
    }

    /// Whether the request's span is sampled (kept and exported).
    pub(crate) fn is_recording(&self) -> bool {
        use opentelemetry::trace::TraceContextExt;
        self.cx.span().is_recording()
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

    pub(crate) fn response_model(&self) -> Option<&str> {
        self.response_model.get().map(String::as_str)
    }

    /// Set once, from the answer's first `model`.
    pub(crate) fn set_response_model(&self, model: &str) {
        let _ = self.response_model.set(model.to_owned());
    }

    /// The answer's distinct finish reasons, in the order they came.
    pub(crate) fn finish_reasons(&self) -> Vec<String> {
        self.finish_reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds `reason` unless it is known already or `max` are.
    pub(crate) fn add_finish_reason(&self, reason: &str, max: usize) {
        let mut reasons = self
            .finish_reasons
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if reasons.len() < max && !reasons.iter().any(|r| r == reason) {
            reasons.push(reason.to_owned());
        }
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
