//! One endpoint of a pool: its URL, the requests in flight on it, whether it is up, and each
//! worker's idle connections to it.
//!
//! Up or out (Envoy's outlier detection, consecutive failures): `eject_after` failures in a row
//! take the endpoint out for `eject_for`; when that ends it is on probation, and one more failure
//! before a success takes it out again for twice as long (up to [`MAX_EJECTION`]). A success, or a
//! passed health check, clears it. A failed health check marks it down until the next passed one.
//!
//! Edge cases: the hot path reads only atomics (in flight, ejected-until, checked-down); the
//! mutex is taken on a failure, and on a success only when there is something to clear. The
//! `tollgate_upstream_up` gauge follows each change, and the health task refreshes it when an
//! ejection runs out (a moment no request marks).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus::{IntCounter, IntGauge};
use tokio::time::Instant;

use crate::config::{EndpointUrl, PoolConfig};
use crate::observability::metrics::Metrics;
use crate::proxy::idle::Idle;

/// The longest an ejection lasts, however often the endpoint failed.
pub(crate) const MAX_EJECTION: Duration = Duration::from_secs(300);

pub(crate) struct Endpoint {
    pub(crate) url: EndpointUrl,
    /// `host:port`: the `endpoint` label.
    pub(crate) label: Arc<str>,
    /// The pool's name: the `upstream` label.
    pub(crate) upstream: Arc<str>,
    inflight: AtomicUsize,
    /// Milliseconds since [`epoch`] until which the endpoint is out; 0: not ejected.
    ejected_until: AtomicU64,
    /// A health check failed and none passed since.
    checked_down: AtomicBool,
    /// Nothing for a success to clear (no failures, not on probation).
    clean: AtomicBool,
    outlier: Mutex<Outlier>,
    /// Idle connections, one stack per worker (and one for the gateway's own background calls).
    idle: Box<[Mutex<Idle>]>,
    /// When the next health check is due (milliseconds since [`epoch`]).
    pub(crate) next_check: AtomicU64,
    gauges: Gauges,
}

/// What only failures and the admin API touch.
#[derive(Default)]
struct Outlier {
    failures: u32,
    /// Ejections since the last success: each doubles the next.
    ejections: u32,
    /// Ejected until then (wall clock, for the admin API).
    ejected_until: Option<SystemTime>,
    /// When it last went down (ejected or failing its check): the one out longest is tried when
    /// none is up.
    down_since: Option<Instant>,
}

struct Gauges {
    inflight: IntGauge,
    up: IntGauge,
    /// `tollgate_upstream_requests_total{status="200"}`: the common case, without a lookup.
    ok: IntCounter,
}

/// What the admin API shows of an endpoint.
pub(crate) struct Snapshot {
    pub(crate) up: bool,
    pub(crate) inflight: usize,
    pub(crate) failures: u32,
    pub(crate) ejected_until: Option<SystemTime>,
}

/// A request in flight on an endpoint, until dropped (the answer's last byte, or its failure).
pub(crate) struct InFlight(Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.gauges.inflight.dec();
    }
}

impl InFlight {
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

/// The instant the gateway's millisecond clocks count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(crate) fn millis_now() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn millis_at(instant: Instant) -> u64 {
    u64::try_from(instant.saturating_duration_since(epoch()).as_millis()).unwrap_or(u64::MAX)
}

impl Endpoint {
    /// A fresh endpoint of pool `upstream`, with `slots` idle stacks (workers + 1).
    pub(crate) fn new(
        url: EndpointUrl,
        upstream: Arc<str>,
        slots: usize,
        metrics: &Metrics,
    ) -> Self {
        let label: Arc<str> = Arc::from(url.label());
        let gauges = Gauges {
            inflight: metrics
                .upstream_inflight
                .with_label_values(&[&upstream, &label]),
            up: metrics.upstream_up.with_label_values(&[&upstream, &label]),
            ok: metrics
                .upstream_requests_total
                .with_label_values(&[&upstream, &label, "200"]),
        };
        metrics.add_endpoint(&upstream, &label);
        gauges.up.set(1);
        Endpoint {
            url,
            label,
            upstream,
            inflight: AtomicUsize::new(0),
            ejected_until: AtomicU64::new(0),
            checked_down: AtomicBool::new(false),
            clean: AtomicBool::new(true),
            outlier: Mutex::new(Outlier::default()),
            idle: (0..slots).map(|_| Mutex::new(Idle::default())).collect(),
            next_check: AtomicU64::new(0),
            gauges,
        }
    }

    /// Counts a request in flight here until the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.gauges.inflight.inc();
        InFlight(self.clone())
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Neither ejected nor failing its health check.
    pub(crate) fn is_up(&self) -> bool {
        self.is_up_at(millis_now())
    }

    pub(crate) fn is_up_at(&self, now_ms: u64) -> bool {
        !self.checked_down.load(Ordering::Relaxed)
            && self.ejected_until.load(Ordering::Relaxed) <= now_ms
    }

    /// How long it has been out; `None` when it is not (or never went down).
    pub(crate) fn down_since(&self) -> Option<Instant> {
        self.lock().down_since
    }

    /// The idle connections of worker slot `slot`.
    pub(crate) fn idle(&self, slot: usize) -> MutexGuard<'_, Idle> {
        let slot = slot.min(self.idle.len().saturating_sub(1));
        self.idle[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts an answer with `status` in `tollgate_upstream_requests_total`.
    pub(crate) fn count_status(&self, metrics: &Metrics, status: &str) {
        if status == "200" {
            self.gauges.ok.inc();
        } else {
            metrics
                .upstream_requests_total
                .with_label_values(&[&self.upstream, &self.label, status])
                .inc();
        }
    }

    /// An answer that was not a failure: clears failures, probation and ejection.
    pub(crate) fn succeeded(&self) {
        if self.clean.load(Ordering::Relaxed) {
            return;
        }
        let mut outlier = self.lock();
        *outlier = Outlier::default();
        self.ejected_until.store(0, Ordering::Relaxed);
        self.clean.store(true, Ordering::Relaxed);
        self.refresh_gauge();
    }

    /// A failure (connect error, reset before any response byte, header timeout, 502/503):
    /// `eject_after` in a row, or one while on probation, take the endpoint out.
    pub(crate) fn failed(&self, pool: &PoolConfig) {
        let mut outlier = self.lock();
        self.clean.store(false, Ordering::Relaxed);
        outlier.failures = outlier.failures.saturating_add(1);
        let now_ms = millis_now();
        let ejected = self.ejected_until.load(Ordering::Relaxed);
        if ejected > now_ms {
            // Already out (a request that started before the ejection): nothing more to decide.
            return;
        }
        let on_probation = outlier.ejections > 0;
        if !on_probation && outlier.failures < pool.eject_after.get() {
            return;
        }
        let length = pool
            .eject_for
            .saturating_mul(1 << outlier.ejections.min(16))
            .min(MAX_EJECTION);
        outlier.ejections = outlier.ejections.saturating_add(1);
        outlier.ejected_until = Some(SystemTime::now() + length);
        outlier.down_since.get_or_insert_with(Instant::now);
        self.ejected_until
            .store(millis_at(Instant::now() + length).max(1), Ordering::Relaxed);
        self.gauges.up.set(0);
        tracing::warn!(
            upstream = %self.upstream,
            endpoint = %self.label,
            failures = outlier.failures,
            ejected_for = ?length,
            "upstream endpoint ejected"
        );
    }

    /// A health check passed: the endpoint is up, whatever it did before.
    pub(crate) fn check_passed(&self) {
        let was_down = self.checked_down.swap(false, Ordering::Relaxed);
        if was_down || !self.clean.load(Ordering::Relaxed) {
            tracing::info!(upstream = %self.upstream, endpoint = %self.label, "upstream endpoint up");
        }
        self.clean.store(false, Ordering::Relaxed);
        self.succeeded();
    }

    /// A health check failed or timed out: down until one passes.
    pub(crate) fn check_failed(&self) {
        if !self.checked_down.swap(true, Ordering::Relaxed) {
            tracing::warn!(upstream = %self.upstream, endpoint = %self.label, "upstream endpoint failed its health check");
            self.lock().down_since.get_or_insert_with(Instant::now);
            self.clean.store(false, Ordering::Relaxed);
        }
        self.gauges.up.set(0);
    }

    /// Sets `tollgate_upstream_up` from the state (an ejection may have run out).
    pub(crate) fn refresh_gauge(&self) {
        self.gauges.up.set(i64::from(self.is_up()));
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let now_ms = millis_now();
        let outlier = self.lock();
        let ejected = self.ejected_until.load(Ordering::Relaxed) > now_ms;
        Snapshot {
            up: self.is_up_at(now_ms),
            inflight: self.inflight(),
            failures: outlier.failures,
            ejected_until: outlier.ejected_until.filter(|_| ejected),
        }
    }

    /// Whether a health check is due, and if so, books the next one `interval` from now.
    pub(crate) fn check_due(&self, interval: Duration) -> bool {
        let now = millis_now();
        let due = self.next_check.load(Ordering::Relaxed);
        if due > now {
            return false;
        }
        let next = now.saturating_add(u64::try_from(interval.as_millis()).unwrap_or(u64::MAX));
        self.next_check.store(next, Ordering::Relaxed);
        true
    }

    fn lock(&self) -> MutexGuard<'_, Outlier> {
        self.outlier.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(eject_after: u32) -> PoolConfig {
        let text = format!(
            "[server]\n[upstream]\nurl = \"http://127.0.0.1:1\"\neject_after = {eject_after}\neject_for = \"10s\"\n"
        );
        let config = crate::config::Config::parse(&text, "test.toml").expect("valid");
        config.upstreams[0].clone()
    }

    fn endpoint(pool: &PoolConfig, metrics: &Metrics) -> Endpoint {
        Endpoint::new(pool.endpoints[0].clone(), pool.name.clone(), 2, metrics)
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_clears() {
        let (pool, metrics) = (pool(3), Metrics::new());
        let endpoint = endpoint(&pool, &metrics);
        endpoint.failed(&pool);
        endpoint.succeeded();
        endpoint.failed(&pool);
        endpoint.failed(&pool);
        assert!(endpoint.is_up(), "a success in between restarts the count");
        endpoint.failed(&pool);
        let snapshot = endpoint.snapshot();
        assert!(!snapshot.up, "three in a row take it out");
        assert_eq!(snapshot.failures, 3);
        let until = snapshot.ejected_until.expect("ejected until a time");
        let length = until.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(
            length > Duration::from_secs(8) && length <= Duration::from_secs(10),
            "eject_for: {length:?}"
        );
        endpoint.succeeded();
        assert!(endpoint.is_up() && endpoint.snapshot().ejected_until.is_none());
    }

    #[test]
    fn a_failed_check_holds_it_down_until_one_passes() {
        let (pool, metrics) = (pool(3), Metrics::new());
        let endpoint = endpoint(&pool, &metrics);
        endpoint.check_failed();
        assert!(!endpoint.is_up());
        endpoint.succeeded();
        assert!(!endpoint.is_up(), "only a passed check brings it back");
        endpoint.check_passed();
        assert!(endpoint.is_up());
    }
}
