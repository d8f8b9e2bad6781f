//! The gateway's Prometheus metrics, registered into a registry this struct owns (so that tests
//! each get their own), and rendered in the text format for the admin port.
//!
//! Label values are bounded: `key` is a configured key name or `unauthenticated`, `model` a model
//! the key may use or `other`, `endpoint` and `status` come from fixed sets. A client can never
//! grow the metric set.
//!
//! Beside the registry it holds what the console reads and Prometheus does not: the per-second
//! [`Timeline`] and the [`RecentRequests`].

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use strum::IntoEnumIterator;

use super::labels::{
    LedgerErrorReason, Rejection, SpanDrop, StateOp, TokenKind, UpstreamErrorKind,
};
use super::timeline::Timeline;
use crate::config::Unit;
use crate::state::window::{Scope, UsedGauge, Window};

/// Nano-units per currency unit: cost figures are kept in nano-units, shown in units.
pub(crate) const NANO: f64 = 1e9;

/// The `key` label before (or without) authentication.
pub(crate) const UNAUTHENTICATED: &str = "unauthenticated";
/// The `model` label when the model is unknown or not one the key names.
pub(crate) const OTHER_MODEL: &str = "other";

/// Buckets for whole requests: from a cached short answer to a long generation.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets for the gateway's own added time: tens of microseconds when healthy.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1,
];

pub struct Metrics {
    registry: Registry,
    pub(crate) requests_total: IntCounterVec,
    pub(crate) request_duration_seconds: HistogramVec,
    pub(crate) overhead_seconds: Histogram,
    pub(crate) upstream_errors_total: IntCounterVec,
    pub(crate) upstream_requests_total: IntCounterVec,
    pub(crate) upstream_up: IntGaugeVec,
    pub(crate) upstream_inflight: IntGaugeVec,
    pub(crate) rejections_total: IntCounterVec,
    pub(crate) inflight_requests: IntGaugeVec,
    pub(crate) tokens_total: IntCounterVec,
    pub(crate) time_to_first_token_seconds: HistogramVec,
    pub(crate) quota_used_tokens: IntGaugeVec,
    pub(crate) quota_used_cost: GaugeVec,
    pub(crate) group_quota_used_tokens: IntGaugeVec,
    pub(crate) group_quota_used_cost: GaugeVec,
    pub(crate) group_inflight_requests: IntGaugeVec,
    pub(crate) cost_total: CounterVec,
    pub(crate) quota_overrun_tokens_total: IntCounterVec,
    pub(crate) usage_unreadable_counts_total: IntCounterVec,
    pub(crate) ledger_errors_total: IntCounterVec,
    pub(crate) ledger_spooled_lines: IntGauge,
    pub(crate) state_errors_total: IntCounterVec,
    pub(crate) trace_spans_dropped_total: IntCounterVec,
    /// The last 15 minutes, second by second, for the console (not exported to Prometheus).
    pub(crate) timeline: Timeline,
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registrar(Registry::new());
        let metrics = Metrics {
            // --- each request ---
            requests_total: r.counters(
                "tollgate_requests_total",
                "Requests answered, by key, model, endpoint and HTTP status.",
                &["key", "model", "endpoint", "status"],
            ),
            request_duration_seconds: r.histograms(
                "tollgate_request_duration_seconds",
                "Time from receiving a request to the last byte of its response.",
                DURATION_BUCKETS,
                &["key", "model", "endpoint"],
            ),
            overhead_seconds: r.histogram(
                "tollgate_overhead_seconds",
                "Time the gateway itself adds before the upstream sees the request.",
                OVERHEAD_BUCKETS,
            ),
            time_to_first_token_seconds: r.histograms(
                "tollgate_time_to_first_token_seconds",
                "Time from receiving a streamed request to the first byte of its answer.",
                DURATION_BUCKETS,
                &["key", "model"],
            ),
            // --- limits and usage, per key ---
            rejections_total: r.counters(
                "tollgate_rejections_total",
                "Requests the gateway refused itself, by key and reason.",
                &["key", "reason"],
            ),
            inflight_requests: r.gauges(
                "tollgate_inflight_requests",
                "Requests in flight per key, counted until the response's last byte.",
                &["key"],
            ),
            tokens_total: r.counters(
                "tollgate_tokens_total",
                "Tokens charged, by key, model, kind (prompt|completion) and source (reported|estimated).",
                &["key", "model", "kind", "source"],
            ),
            quota_used_tokens: r.gauges(
                "tollgate_quota_used_tokens",
                "Tokens used (settled plus reserved) in each key's current quota window.",
                &["key", "window"],
            ),
            quota_used_cost: r.float_gauges(
                "tollgate_quota_used_cost",
                "Cost (currency units; settled plus reserved) in each key's current cost window.",
                &["key", "window"],
            ),
            group_quota_used_tokens: r.gauges(
                "tollgate_group_quota_used_tokens",
                "Tokens used (settled plus reserved) in each group's current token window.",
                &["group", "window"],
            ),
            group_quota_used_cost: r.float_gauges(
                "tollgate_group_quota_used_cost",
                "Cost (currency units; settled plus reserved) in each group's current cost window.",
                &["group", "window"],
            ),
            group_inflight_requests: r.gauges(
                "tollgate_group_inflight_requests",
                "Requests in flight across each group's keys.",
                &["group"],
            ),
            cost_total: r.float_counters(
                "tollgate_cost_total",
                "Cost charged (currency units of [pricing] currency), by key and model.",
                &["key", "model"],
            ),
            quota_overrun_tokens_total: r.counters(
                "tollgate_quota_overrun_tokens_total",
                "Tokens an upstream produced beyond what the request reserved (it ignored max_tokens).",
                &["key"],
            ),
            usage_unreadable_counts_total: r.counters(
                "tollgate_usage_unreadable_counts_total",
                "Usage counts from the upstream that were not non-negative integers (\"100\", -100, 100.5), by kind (prompt|completion); each was estimated instead.",
                &["kind"],
            ),
            // --- what failed ---
            upstream_errors_total: r.counters(
                "tollgate_upstream_errors_total",
                "Upstream failures by pool and kind (connect, timeout, broken, body_idle_timeout, body_error, retried).",
                &["upstream", "kind"],
            ),
            // --- upstream pools, per endpoint ---
            upstream_requests_total: r.counters(
                "tollgate_upstream_requests_total",
                "Attempts sent to each upstream endpoint, by the status it answered (or connect, timeout, broken).",
                &["upstream", "endpoint", "status"],
            ),
            upstream_up: r.gauges(
                "tollgate_upstream_up",
                "1 while an upstream endpoint is up (not ejected, passing its health check), else 0.",
                &["upstream", "endpoint"],
            ),
            upstream_inflight: r.gauges(
                "tollgate_upstream_inflight",
                "Requests in flight on each upstream endpoint, until their answer's last byte.",
                &["upstream", "endpoint"],
            ),
            ledger_errors_total: r.counters(
                "tollgate_ledger_errors_total",
                "Ledger lines not written where they were sent: write (file: disk error, lost), queue_full (a writer too slow, lost), closed (lost), postgres (PostgreSQL did not take them: kept in the spool and sent later), spool (the spool could not be written or read back: lost).",
                &["reason"],
            ),
            ledger_spooled_lines: r.gauge(
                "tollgate_ledger_spooled_lines",
                "Ledger lines waiting in the spool for PostgreSQL.",
            ),
            state_errors_total: r.counters(
                "tollgate_state_errors_total",
                "Calls to the shared state backend (Redis) that failed, by operation.",
                &["op"],
            ),
            trace_spans_dropped_total: r.counters(
                "tollgate_trace_spans_dropped_total",
                "Finished spans that never reached the OpenTelemetry collector: queue_full (the export queue was full), export_failed (the collector refused them or did not answer in time), closed (exported after shutdown).",
                &["reason"],
            ),
            timeline: Timeline::new(),
            // Last: every field above is made through `r`.
            registry: r.0,
        };
        metrics.export_fixed_series();
        metrics
    }

    /// Creates every series whose labels are known from the start, at 0: a series that appears
    /// only with its first increment hides that increment from `increase()` and `rate()`.
    fn export_fixed_series(&self) {
        for reason in LedgerErrorReason::iter() {
            self.ledger_errors_total.with_label_values(&[label(reason)]);
        }
        for op in StateOp::iter() {
            self.state_errors_total.with_label_values(&[label(op)]);
        }
        for kind in TokenKind::iter() {
            self.usage_unreadable_counts_total
                .with_label_values(&[label(kind)]);
        }
        for reason in SpanDrop::iter() {
            self.trace_spans_dropped_total
                .with_label_values(&[label(reason)]);
        }
        for reason in Rejection::iter().filter(|r| !r.is_per_key()) {
            self.rejections_total
                .with_label_values(&[UNAUTHENTICATED, label(reason)]);
        }
    }

    /// Creates a configured key's counters at 0; called for every key at start and for the keys a
    /// reload adds (a key already known keeps its counts).
    pub(crate) fn add_key(&self, key: &str) {
        for reason in Rejection::iter().filter(|r| r.is_per_key()) {
            self.rejections_total
                .with_label_values(&[key, label(reason)]);
        }
        self.quota_overrun_tokens_total.with_label_values(&[key]);
        self.inflight_requests.with_label_values(&[key]);
    }

    /// Creates a pool's error counters at 0 (at start, and for a pool a reload adds).
    pub(crate) fn add_upstream(&self, upstream: &str) {
        for kind in UpstreamErrorKind::iter() {
            self.upstream_errors_total
                .with_label_values(&[upstream, label(kind)]);
        }
    }

    /// Creates an endpoint's series at 0: its gauges, and its answers and failures.
    pub(crate) fn add_endpoint(&self, upstream: &str, endpoint: &str) {
        self.upstream_up.with_label_values(&[upstream, endpoint]);
        self.upstream_inflight
            .with_label_values(&[upstream, endpoint]);
        let kinds = [
            UpstreamErrorKind::Connect,
            UpstreamErrorKind::Timeout,
            UpstreamErrorKind::Broken,
        ];
        for status in ["200"].into_iter().chain(kinds.into_iter().map(label)) {
            self.upstream_requests_total
                .with_label_values(&[upstream, endpoint, status]);
        }
    }

    /// Removes the gauges of an endpoint a reload removed (its counters keep their counts).
    pub(crate) fn remove_endpoint(&self, upstream: &str, endpoint: &str) {
        let _ = self.upstream_up.remove_label_values(&[upstream, endpoint]);
        let _ = self
            .upstream_inflight
            .remove_label_values(&[upstream, endpoint]);
    }

    /// Sets the used-in-window gauge of `window` (tokens, or nano-units of cost shown in units),
    /// through the handle the window keeps (looked up on its first use only).
    pub(crate) fn set_window_used(&self, window: &Window, used: u64) {
        let gauge = window.gauge.get_or_init(|| {
            let labels = [&*window.id.name, &*window.label];
            match (window.id.scope, window.id.unit) {
                (Scope::Key, Unit::Tokens) => {
                    UsedGauge::Tokens(self.quota_used_tokens.with_label_values(&labels))
                }
                (Scope::Group, Unit::Tokens) => {
                    UsedGauge::Tokens(self.group_quota_used_tokens.with_label_values(&labels))
                }
                (Scope::Key, Unit::Cost) => {
                    UsedGauge::Cost(self.quota_used_cost.with_label_values(&labels))
                }
                (Scope::Group, Unit::Cost) => {
                    UsedGauge::Cost(self.group_quota_used_cost.with_label_values(&labels))
                }
            }
        });
        match gauge {
            UsedGauge::Tokens(gauge) => gauge.set(i64::try_from(used).unwrap_or(i64::MAX)),
            UsedGauge::Cost(gauge) => gauge.set(used as f64 / NANO),
        }
    }

    /// Counts one failed state-backend call.
    pub(crate) fn state_error(&self, op: StateOp) {
        self.state_errors_total
            .with_label_values(&[label(op)])
            .inc();
    }

    /// Counts one usage count from the upstream that could not be read.
    pub(crate) fn usage_unreadable(&self, kind: TokenKind) {
        self.usage_unreadable_counts_total
            .with_label_values(&[label(kind)])
            .inc();
    }

    /// Counts `lines` ledger lines that were not written where they were sent.
    pub(crate) fn ledger_errors(&self, reason: LedgerErrorReason, lines: u64) {
        self.ledger_errors_total
            .with_label_values(&[label(reason)])
            .inc_by(lines);
    }

    /// Counts one request the gateway refused.
    pub(crate) fn rejection(&self, key: &str, reason: Rejection) {
        self.rejections_total
            .with_label_values(&[key, label(reason)])
            .inc();
    }

    /// Counts one failure of pool `upstream`, of the given kind.
    pub(crate) fn upstream_error(&self, upstream: &str, kind: UpstreamErrorKind) {
        self.upstream_errors_total
            .with_label_values(&[upstream, label(kind)])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        if let Err(err) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(%err, "cannot encode metrics");
        }
        out
    }
}

// === impl Registrar ===

/// Makes each metric and registers it into the registry it fills. The definitions are static, so
/// an error here is a bug in this file, found by every test.
struct Registrar(Registry);

impl Registrar {
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.register(IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.register(IntGaugeVec::new(Opts::new(name, help), labels))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.register(IntGauge::new(name, help))
    }

    fn float_gauges(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.register(GaugeVec::new(Opts::new(name, help), labels))
    }

    fn float_counters(&self, name: &str, help: &str, labels: &[&str]) -> CounterVec {
        self.register(CounterVec::new(Opts::new(name, help), labels))
    }

    fn histograms(&self, name: &str, help: &str, buckets: &[f64], labels: &[&str]) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, labels))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts))
    }

    fn register<C: Collector + Clone + 'static>(&self, made: prometheus::Result<C>) -> C {
        let collector = made.expect("static metric definition is valid");
        self.0
            .register(Box::new(collector.clone()))
            .expect("each metric is registered once into a fresh registry");
        collector
    }
}

/// A label enum's value (its snake_case name).
fn label(value: impl Into<&'static str>) -> &'static str {
    value.into()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
