//! One key's per-request series, looked up in the registry once — by the first request that
//! counts each — and then kept with the key's entry ([`crate::keys::KeyEntry`]). A label lookup
//! (`with_label_values`) hashes every label value and takes the metric family's lock, a dozen
//! times per request otherwise; a handle here is an atomic load.
//!
//! Lazily, not at key creation: a key made at run time, or 10 000 of them, registers no series
//! it never uses (a series appears with its first count, as before). A reload that keeps a key
//! and its models keeps its handles; series are never removed, so a handle never goes stale.
//!
//! Edge cases: a status other than 200 (rare: refusals and errors) is looked up by its labels
//! each time; so is anything counted before a key is known (`key="unauthenticated"`).

use std::sync::{Arc, OnceLock};

use prometheus::{Counter, Histogram, IntCounter};

use super::labels::TokenKind;
use super::metrics::{Metrics, OTHER_MODEL};

/// The series of one key.
pub(crate) struct KeySeries {
    /// The key's exact model names: the `model` labels it can have besides `other`.
    models: Box<[Arc<str>]>,
    /// Per model label, in `models`' order, then `other`.
    by_model: Box<[ModelSeries]>,
    /// `tollgate_quota_overrun_tokens_total{key}`.
    overrun: OnceLock<IntCounter>,
}

/// The series of one key and model label.
#[derive(Default)]
pub(crate) struct ModelSeries {
    /// `tollgate_tokens_total` by kind (in [`TokenKind`]'s order) and source (in `SOURCES`').
    tokens: [[OnceLock<IntCounter>; 2]; 2],
    time_to_first_token: OnceLock<Histogram>,
    cost: OnceLock<Counter>,
    /// Per endpoint label (in [`ENDPOINTS`]' order): `tollgate_requests_total{status="200"}`
    /// and `tollgate_request_duration_seconds`.
    answered_200: [OnceLock<IntCounter>; ENDPOINTS.len()],
    duration: [OnceLock<Histogram>; ENDPOINTS.len()],
}

/// The `endpoint` labels of routed requests (`Endpoint::label`); another is looked up by its
/// labels each time.
pub(crate) const ENDPOINTS: [&str; 3] = ["chat_completions", "completions", "models"];

/// The labels of a charge's source, with their indexes (a token kind is its [`TokenKind`]).
const SOURCES: [&str; 2] = ["reported", "estimated"];

impl KeySeries {
    /// The (empty) handles of a key whose allow-list is `models` (`None`: any model, all
    /// labelled `other`): a model is labelled by its name when the list names it exactly.
    pub(crate) fn new(models: Option<&[String]>) -> KeySeries {
        let models: Box<[Arc<str>]> = models
            .unwrap_or_default()
            .iter()
            .map(|m| Arc::from(m.as_str()))
            .collect();
        let by_model = (0..=models.len()).map(|_| ModelSeries::default()).collect();
        KeySeries {
            models,
            by_model,
            overrun: OnceLock::new(),
        }
    }

    /// Whether these handles are the ones for a key with `models` (a reload may keep them).
    pub(crate) fn fits(&self, models: Option<&[String]>) -> bool {
        let models = models.unwrap_or_default();
        self.models.len() == models.len() && self.models.iter().zip(models).all(|(a, b)| **a == **b)
    }

    /// The handles of model label `model` (a name of the key's list, or `other`).
    pub(crate) fn model(&self, model: &str) -> &ModelSeries {
        let index = if model == OTHER_MODEL {
            None
        } else {
            self.models.iter().position(|m| &**m == model)
        };
        // `other`, and (never, but harmlessly) a label not in the list, are the last.
        &self.by_model[index.unwrap_or(self.models.len())]
    }

    /// `tollgate_quota_overrun_tokens_total{key}`.
    pub(crate) fn overrun(&self, metrics: &Metrics, key: &str) -> &IntCounter {
        self.overrun
            .get_or_init(|| metrics.quota_overrun_tokens_total.with_label_values(&[key]))
    }
}

impl ModelSeries {
    /// Counts `tokens` of `kind` charged as `source` (`reported` or `estimated`), for `key` and
    /// `model`.
    pub(crate) fn add_tokens(
        &self,
        metrics: &Metrics,
        (key, model): (&str, &str),
        (kind, source): (TokenKind, &str),
        tokens: u64,
    ) {
        let k = kind as usize;
        let kind: &'static str = kind.into();
        let Some(s) = SOURCES.iter().position(|x| *x == source) else {
            metrics
                .tokens_total
                .with_label_values(&[key, model, kind, source])
                .inc_by(tokens);
            return;
        };
        self.tokens[k][s]
            .get_or_init(|| {
                metrics
                    .tokens_total
                    .with_label_values(&[key, model, kind, source])
            })
            .inc_by(tokens);
    }

    /// Counts one request's cost (nano-units).
    pub(crate) fn add_cost(&self, metrics: &Metrics, (key, model): (&str, &str), nano: u64) {
        self.cost
            .get_or_init(|| metrics.cost_total.with_label_values(&[key, model]))
            .inc_by(nano as f64 / super::metrics::NANO);
    }

    /// Records one time to first token, in seconds.
    pub(crate) fn time_to_first_token(
        &self,
        metrics: &Metrics,
        (key, model): (&str, &str),
        seconds: f64,
    ) {
        self.time_to_first_token
            .get_or_init(|| {
                metrics
                    .time_to_first_token_seconds
                    .with_label_values(&[key, model])
            })
            .observe(seconds);
    }

    /// Counts one answered request of the endpoint labelled `label` with `status`, and its
    /// duration.
    pub(crate) fn answered(
        &self,
        metrics: &Metrics,
        (key, model): (&str, &str),
        (label, status): (&str, http::StatusCode),
        seconds: f64,
    ) {
        let Some(i) = ENDPOINTS.iter().position(|e| *e == label) else {
            metrics
                .requests_total
                .with_label_values(&[key, model, label, status.as_str()])
                .inc();
            metrics
                .request_duration_seconds
                .with_label_values(&[key, model, label])
                .observe(seconds);
            return;
        };
        if status == http::StatusCode::OK {
            self.answered_200[i]
                .get_or_init(|| {
                    metrics
                        .requests_total
                        .with_label_values(&[key, model, label, "200"])
                })
                .inc();
        } else {
            metrics
                .requests_total
                .with_label_values(&[key, model, label, status.as_str()])
                .inc();
        }
        self.duration[i]
            .get_or_init(|| {
                metrics
                    .request_duration_seconds
                    .with_label_values(&[key, model, label])
            })
            .observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(metrics: &Metrics) -> String {
        String::from_utf8(metrics.render()).expect("utf-8")
    }

    #[test]
    fn handles_count_into_the_same_series_as_label_lookups() {
        let metrics = Metrics::new();
        let series = KeySeries::new(Some(&["gpt-4o".to_owned(), "llama-*".to_owned()]));
        let labels = ("k", "gpt-4o");
        for _ in 0..3 {
            series.model("gpt-4o").add_tokens(
                &metrics,
                labels,
                (TokenKind::Prompt, "reported"),
                10,
            );
        }
        series.model("other").add_tokens(
            &metrics,
            ("k", "other"),
            (TokenKind::Completion, "estimated"),
            4,
        );
        let answered = ("chat_completions", http::StatusCode::OK);
        series
            .model("gpt-4o")
            .answered(&metrics, labels, answered, 0.002);
        let refused = ("chat_completions", http::StatusCode::BAD_GATEWAY);
        series
            .model("gpt-4o")
            .answered(&metrics, labels, refused, 0.002);
        series.overrun(&metrics, "k").inc_by(5);
        // The same series a label lookup reaches.
        metrics
            .tokens_total
            .with_label_values(&["k", "gpt-4o", "prompt", "reported"])
            .inc_by(1);
        let text = rendered(&metrics);
        for line in [
            r#"tollgate_tokens_total{key="k",kind="prompt",model="gpt-4o",source="reported"} 31"#,
            r#"tollgate_tokens_total{key="k",kind="completion",model="other",source="estimated"} 4"#,
            r#"tollgate_requests_total{endpoint="chat_completions",key="k",model="gpt-4o",status="200"} 1"#,
            r#"tollgate_requests_total{endpoint="chat_completions",key="k",model="gpt-4o",status="502"} 1"#,
            r#"tollgate_request_duration_seconds_count{endpoint="chat_completions",key="k",model="gpt-4o"} 2"#,
            r#"tollgate_quota_overrun_tokens_total{key="k"} 5"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains(r#"model="llama-*""#),
            "no series before its first count"
        );
    }

    #[test]
    fn a_reload_keeps_handles_only_for_the_same_models() {
        let models = ["a".to_owned(), "b".to_owned()];
        let series = KeySeries::new(Some(&models));
        assert!(series.fits(Some(&models)));
        assert!(!series.fits(Some(&models[..1])));
        assert!(!series.fits(None));
        assert!(KeySeries::new(None).fits(None));
    }
}
