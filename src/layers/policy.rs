//! The key's policy on the request itself: which models it may ask for (400 `model-not-found`),
//! how many tokens it may ask for at most (400 `max-tokens-exceeded`, checked against
//! `max_tokens`, `max_completion_tokens` and the vendors' length fields: llama.cpp's `n_predict`,
//! TGI's and SGLang's `max_new_tokens`, Ollama's `options.num_predict`), and how many answers
//! (`max_n`: 400 `too_many_choices`, checked against `n`, `best_of` and llama.cpp's `n_cmpl`).
//!
//! On a key with either cap, a length or choice field that is not a whole number (`"n_predict":
//! -1`, "no limit" to llama.cpp; `"n_cmpl": 2.5`, which llama.cpp reads as 2) is refused with 400
//! `unbounded_field`: neither the cap nor the reservation could bound it.
//!
//! It also settles the request's `model` metric label: the model when the key's allow-list names
//! it exactly, `other` otherwise — so clients cannot grow the metric set with made-up names.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use crate::config::{model_matches, Limits};
use crate::http::body::GatewayBody;
use crate::http::context::{ParsedRequest, RequestContext};
use crate::http::error::GatewayError;
use crate::http::generation::{Generation, Named};
use crate::observability::metrics::Metrics;

pub(crate) fn policy_layer(metrics: Arc<Metrics>) -> ValidateRequestHeaderLayer<EnforcePolicy> {
    ValidateRequestHeaderLayer::custom(EnforcePolicy { metrics })
}

#[derive(Clone)]
pub(crate) struct EnforcePolicy {
    metrics: Arc<Metrics>,
}

impl ValidateRequest<Bytes> for EnforcePolicy {
    type ResponseBody = GatewayBody;

    fn validate(&mut self, request: &mut Request<Bytes>) -> Result<(), Response<GatewayBody>> {
        let Some((context, parsed)) = RequestContext::with_parsed(request) else {
            // No body to judge (GET /v1/models).
            return Ok(());
        };
        let Some(key) = context.key() else {
            // The auth layer must run first; never let a request through unjudged.
            return Err(
                GatewayError::Internal("policy reached without a key".into()).into_response(),
            );
        };
        if let Err(error) = check(&key.limits, parsed) {
            if let Some(reason) = error.rejection() {
                self.metrics.rejection(&key.name, reason);
            }
            return Err(error.into_response());
        }
        if let Some(label) = model_label(&key.limits, &parsed.model) {
            context.set_model_label(label);
        }
        Ok(())
    }
}

fn check(limits: &Limits, parsed: &ParsedRequest) -> Result<(), GatewayError> {
    if let Some(models) = &limits.models {
        if !models
            .iter()
            .any(|pattern| model_matches(pattern, &parsed.model))
        {
            return Err(GatewayError::ModelNotFound {
                model: parsed.model.clone(),
            });
        }
    }
    check_lengths(limits, &parsed.generation)?;
    check_choices(limits, &parsed.generation)
}

/// Every length field within the key's `max_tokens`: the API's own, and the vendors' that change
/// the length as much (llama.cpp's `n_predict` overrides `max_tokens`, so `max_tokens = 8` with
/// `n_predict = 100000` would run past the cap); whole numbers only (`-1` is "no limit" to
/// llama.cpp and Ollama).
fn check_lengths(limits: &Limits, generation: &Generation) -> Result<(), GatewayError> {
    let Some(cap) = limits.max_tokens else {
        return Ok(());
    };
    for (field, value) in generation.lengths() {
        match value {
            Named::Count(requested) if requested > u64::from(cap.get()) => {
                return Err(GatewayError::MaxTokensExceeded {
                    field: field.name,
                    requested,
                    cap: cap.get(),
                });
            }
            Named::NotACount => return Err(GatewayError::UnboundedField { field: field.name }),
            _ => {}
        }
    }
    Ok(())
}

/// `n`, `best_of` and `n_cmpl` within the key's `max_n`; whole numbers on a capped key.
fn check_choices(limits: &Limits, generation: &Generation) -> Result<(), GatewayError> {
    let capped = limits.max_tokens.is_some() || limits.max_n.is_some();
    for (field, value) in generation.choices() {
        match (value, limits.max_n) {
            (Named::Count(requested), Some(cap)) if requested > u64::from(cap.get()) => {
                return Err(GatewayError::TooManyChoices {
                    field: field.name,
                    requested,
                    cap: cap.get(),
                });
            }
            (Named::NotACount, _) if capped => {
                return Err(GatewayError::UnboundedField { field: field.name });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The model as a metric label, when the key's allow-list names it exactly.
fn model_label<'a>(limits: &Limits, model: &'a str) -> Option<&'a str> {
    limits
        .models
        .as_ref()
        .filter(|models| models.iter().any(|m| m == model))
        .map(|_| model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn parsed(json: serde_json::Value) -> ParsedRequest {
        ParsedRequest::new(json)
    }

    #[test]
    fn allow_list_takes_exact_names_and_prefixes() {
        let limits = Limits {
            models: Some(vec!["gpt-4o".into(), "llama-*".into()]),
            ..Limits::default()
        };
        for (model, ok) in [
            ("gpt-4o", true),
            ("gpt-4o-mini", false),
            ("llama-3-8b", true),
            ("other", false),
        ] {
            let result = check(&limits, &parsed(serde_json::json!({"model": model})));
            assert_eq!(result.is_ok(), ok, "{model}");
        }
        assert_eq!(model_label(&limits, "gpt-4o"), Some("gpt-4o"));
        assert_eq!(
            model_label(&limits, "llama-3-8b"),
            None,
            "patterns do not make labels"
        );
    }

    #[test]
    fn the_cap_applies_to_both_fields() {
        let limits = Limits {
            max_tokens: NonZeroU32::new(100),
            ..Limits::default()
        };
        assert!(check(
            &limits,
            &parsed(serde_json::json!({"model": "m", "max_tokens": 100}))
        )
        .is_ok());
        for field in ["max_tokens", "max_completion_tokens"] {
            let err = check(
                &limits,
                &parsed(serde_json::json!({"model": "m", field: 101})),
            )
            .expect_err("over the cap");
            assert!(err.to_string().starts_with(field), "{err}");
        }
        assert!(
            check(&limits, &parsed(serde_json::json!({"model": "m"}))).is_ok(),
            "no request, no cap breach"
        );
    }

    #[test]
    fn the_cap_applies_to_vendor_length_fields() {
        let limits = Limits {
            max_tokens: NonZeroU32::new(100),
            ..Limits::default()
        };
        for body in [
            serde_json::json!({"model": "m", "max_tokens": 8, "n_predict": 100000}),
            serde_json::json!({"model": "m", "max_new_tokens": 101}),
            serde_json::json!({"model": "m", "options": {"num_predict": 101}}),
        ] {
            let err = check(&limits, &parsed(body.clone())).expect_err("over the cap");
            assert_eq!(err.reason(), "max_tokens_exceeded", "{body}");
        }
        for body in [
            serde_json::json!({"model": "m", "n_predict": -1}),
            serde_json::json!({"model": "m", "options": {"num_predict": -2}}),
            serde_json::json!({"model": "m", "max_new_tokens": "50"}),
        ] {
            let err = check(&limits, &parsed(body.clone())).expect_err("no count");
            assert_eq!(err.reason(), "unbounded_field", "{body}");
        }
        assert!(check(
            &limits,
            &parsed(serde_json::json!({"model": "m", "n_predict": 100, "options": {"num_predict": null}}))
        )
        .is_ok());
        assert!(
            check(
                &Limits::default(),
                &parsed(serde_json::json!({"model": "m", "n_predict": -1}))
            )
            .is_ok(),
            "no cap, nothing to bind"
        );
    }

    #[test]
    fn max_n_caps_every_choice_field() {
        let limits = Limits {
            max_n: NonZeroU32::new(2),
            ..Limits::default()
        };
        for field in ["n", "best_of", "n_cmpl"] {
            let ok = parsed(serde_json::json!({"model": "m", field: 2}));
            assert!(check(&limits, &ok).is_ok(), "{field} = 2");
            let err = check(
                &limits,
                &parsed(serde_json::json!({"model": "m", field: 3})),
            )
            .expect_err("over the cap");
            assert_eq!(err.reason(), "too_many_choices", "{field}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
        let err = check(
            &limits,
            &parsed(serde_json::json!({"model": "m", "n_cmpl": 2.5})),
        )
        .expect_err("not a count");
        assert_eq!(err.reason(), "unbounded_field");
        assert!(
            check(
                &Limits::default(),
                &parsed(serde_json::json!({"model": "m", "n_cmpl": 2.5, "n": 500}))
            )
            .is_ok(),
            "a key without caps takes any"
        );
    }
}
