//! Where limits and token windows live, and what happens when that place cannot be reached.
//!
//! - `local` ([`local::LocalState`] plus each key's governor limiter and in-flight counter): this
//!   process only; windows saved to a file.
//! - `redis` ([`redis::RedisState`]): shared by every replica; when Redis is unreachable,
//!   `on_error = "fail_closed"` refuses with 503 and `"fail_open"` falls back to this replica's
//!   local limits and an in-memory window (see `state::redis` for what happens to that usage).
//!
//! [`Backend`] is the one place the layers call, so the choice is made here and nowhere else.

pub mod clock;
pub mod local;
pub(crate) mod managed_keys;
pub mod redis;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as _;

use self::local::LocalState;
use self::redis::{Admit, Lease, RedisState, Reserved, Unavailable};
use crate::config::{OnError, Quota};
use crate::keys::{InflightGuard, KeyEntry};
use crate::observability::metrics::Metrics;
use crate::state::clock::Clock;

/// Tokens held for one request in each of its key's windows, until settled.
#[derive(Debug)]
pub struct Reservation {
    pub(crate) key: Arc<str>,
    /// `(window length in seconds, window start)` for each window reserved in.
    pub(crate) windows: Vec<(u64, u64)>,
    pub(crate) amount: u64,
}

/// Why a reservation was refused: the window that had no room.
#[derive(Debug, Clone)]
pub struct QuotaDenied {
    pub(crate) per: Duration,
    pub(crate) limit: u64,
    /// Settled plus reserved, before this request.
    pub(crate) used: u64,
    /// What this request needed.
    pub(crate) needed: u64,
    pub(crate) retry_after: Duration,
}

/// One window of a key, now.
#[derive(Debug, Clone)]
pub struct WindowStatus {
    pub(crate) per: Duration,
    pub(crate) limit: u64,
    /// Settled plus reserved.
    pub(crate) used: u64,
    /// Of `used`, what requests in flight hold for their worst case; `None` where it was not
    /// read (a refusal's or a Redis reservation's figures, which only the headers use).
    pub(crate) reserved: Option<u64>,
    pub(crate) remaining: u64,
    pub(crate) reset_after: Duration,
}

/// A request's place among its key's requests in flight: a local count always (the
/// `tollgate_inflight_requests` gauge), and a Redis lease when the limit is shared.
pub(crate) struct Slot {
    _local: InflightGuard,
    _lease: Option<Lease>,
}

/// Why a request was not admitted.
pub(crate) enum Refusal {
    Concurrency,
    Rate { wait: Duration },
    Unavailable(Unavailable),
}

/// A request admitted: its slot, and `(remaining, reset)` of its rate when it has one.
pub(crate) struct Admission {
    pub(crate) slot: Slot,
    pub(crate) rate: Option<(u32, Duration)>,
}

/// Where a reservation was made, so that it is settled in the same place.
pub struct Held {
    pub(crate) reservation: Reservation,
    /// Made in this process (the local backend, or Redis's fail-open fallback).
    local: bool,
    /// What holds it in Redis (given back when dropped unsettled).
    lease: Option<Lease>,
}

impl Held {
    fn new(reservation: Reservation, local: bool, lease: Option<Lease>) -> Held {
        Held {
            reservation,
            local,
            lease,
        }
    }

    pub(crate) fn amount(&self) -> u64 {
        self.reservation.amount
    }
}

pub enum Store {
    Local(Arc<LocalState>),
    Redis {
        redis: Arc<RedisState>,
        /// In memory, for `fail_open` while Redis is away.
        fallback: Arc<LocalState>,
    },
}

pub struct Backend {
    pub(crate) store: Store,
    clock: Clock,
    metrics: Arc<Metrics>,
    /// Redis settlements running in the background, waited for at shutdown.
    settling: Arc<AtomicUsize>,
}

impl Backend {
    pub fn new(store: Store, clock: Clock, metrics: Arc<Metrics>) -> Backend {
        Backend {
            store,
            clock,
            metrics,
            settling: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Takes a slot and a rate cell for `key`.
    pub(crate) async fn admit(&self, key: &KeyEntry) -> Result<Admission, Refusal> {
        let shared = key.limits.concurrency.is_some() || key.limits.rate.is_some();
        if let (Store::Redis { redis, .. }, true) = (&self.store, shared) {
            let concurrency = key.limits.concurrency.map(|c| c.get());
            match redis.admit(&key.name, concurrency, key.limits.rate).await {
                Ok(Admit::Admitted { lease, rate }) => {
                    return key
                        .inflight
                        .try_acquire(None)
                        .map(|local| Admission {
                            slot: Slot {
                                _local: local,
                                _lease: lease,
                            },
                            rate,
                        })
                        .ok_or(Refusal::Concurrency);
                }
                Ok(Admit::ConcurrencyFull) => return Err(Refusal::Concurrency),
                Ok(Admit::RateLimited { wait }) => return Err(Refusal::Rate { wait }),
                Err(unavailable) if redis.on_error() == OnError::FailClosed => {
                    return Err(Refusal::Unavailable(unavailable))
                }
                // fail_open: this replica's own limits stand in.
                Err(_) => {}
            }
        }
        self.admit_locally(key)
    }

    fn admit_locally(&self, key: &KeyEntry) -> Result<Admission, Refusal> {
        let local = key
            .inflight
            .try_acquire(key.limits.concurrency)
            .ok_or(Refusal::Concurrency)?;
        let rate = match (&key.limiter, key.limits.rate) {
            (Some(limiter), Some(rate)) => match limiter.check() {
                Ok(snapshot) => {
                    let remaining = snapshot.remaining_burst_capacity();
                    let used = rate.burst.get().saturating_sub(remaining);
                    Some((remaining, rate.per / rate.requests.get() * used))
                }
                Err(not_until) => {
                    return Err(Refusal::Rate {
                        wait: not_until.wait_time_from(self.clock.now()),
                    })
                }
            },
            _ => None,
        };
        Ok(Admission {
            slot: Slot {
                _local: local,
                _lease: None,
            },
            rate,
        })
    }

    /// Reserves `amount` tokens in every window of `quotas`, or says which window has no room.
    pub async fn reserve(
        &self,
        key: &Arc<str>,
        quotas: &[Quota],
        amount: u64,
    ) -> Result<Result<(Held, Vec<WindowStatus>), QuotaDenied>, Unavailable> {
        let in_process = |state: &LocalState| {
            let result = state.reserve(key, quotas, amount);
            result.map(|(reservation, status)| (Held::new(reservation, true, None), status))
        };
        let result = match &self.store {
            Store::Local(local) => in_process(local),
            Store::Redis { redis, fallback } => match redis.reserve(key, quotas, amount).await {
                Ok(result) => result
                    .map(|r: Reserved| (Held::new(r.reservation, false, Some(r.lease)), r.status)),
                Err(unavailable) if redis.on_error() == OnError::FailClosed => {
                    return Err(unavailable)
                }
                Err(_) => in_process(fallback),
            },
        };
        if let Ok((_, status)) = &result {
            self.set_gauges(key, quotas, status.iter().map(|s| s.used));
        }
        Ok(result)
    }

    /// Replaces a reservation by what the request used. Never waits: a Redis settlement runs in
    /// the background (and is kept for later if Redis is away).
    pub(crate) fn settle(&self, held: Held, used: u64, quotas: &[Quota]) {
        let key = held.reservation.key.clone();
        match &self.store {
            Store::Local(local) => {
                local.settle(held.reservation, used);
                let status = local.status(&key, quotas);
                self.set_gauges(&key, quotas, status.iter().map(|s| s.used));
            }
            Store::Redis { redis, fallback } => {
                let redis = redis.clone();
                let metrics = self.metrics.clone();
                let quotas = quotas.to_vec();
                let member = held.lease.map(Lease::into_settled);
                let reservation = if held.local {
                    // Charged locally while Redis was away: settle here, and add the usage to
                    // Redis (now if it is back, or when it returns).
                    let windows = held.reservation.windows.clone();
                    fallback.settle(held.reservation, used);
                    Reservation {
                        key: key.clone(),
                        windows,
                        amount: 0,
                    }
                } else {
                    held.reservation
                };
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let settling = self.settling.clone();
                    settling.fetch_add(1, Ordering::AcqRel);
                    runtime.spawn(async move {
                        let settled = redis.settle(&reservation, member.as_deref(), used).await;
                        if let Ok(totals) = settled {
                            set_gauges(&metrics, &reservation.key, &quotas, totals.into_iter());
                        }
                        settling.fetch_sub(1, Ordering::AcqRel);
                    });
                } else {
                    redis.keep_pending(&reservation, used);
                }
            }
        }
    }

    fn set_gauges(&self, key: &str, quotas: &[Quota], used: impl Iterator<Item = u64>) {
        set_gauges(&self.metrics, key, quotas, used);
    }

    /// Each window of `quotas` for `key`, now (for the admin API).
    pub(crate) async fn status(
        &self,
        key: &Arc<str>,
        quotas: &[Quota],
    ) -> Result<Vec<WindowStatus>, Unavailable> {
        match &self.store {
            Store::Local(local) => Ok(local.status(key, quotas)),
            Store::Redis { redis, .. } => redis.status(key, quotas).await,
        }
    }

    /// Sets `tollgate_quota_used_tokens` for every window of `keys` from the state, so that each
    /// series exists, at its true value, before the key's first request (a restart with usage in
    /// the state file must not show 0). A window the state cannot tell now is left to the key's
    /// first request.
    pub(crate) async fn publish_windows(&self, keys: Vec<Arc<KeyEntry>>) {
        for key in keys {
            let quotas = &key.limits.quotas;
            if quotas.is_empty() {
                continue;
            }
            if let Ok(windows) = self.status(&key.name, quotas).await {
                self.set_gauges(&key.name, quotas, windows.iter().map(|w| w.used));
            }
        }
    }

    /// Waits (at most `timeout`) for background settlements, so that a shutdown loses none.
    pub(crate) async fn drain(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.settling.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How the state backend is doing, for `/readyz`: `(ready, description)`.
    pub(crate) async fn readiness(&self) -> (bool, String) {
        match &self.store {
            Store::Local(_) => (true, "local".to_owned()),
            Store::Redis { redis, .. } => match redis.ping().await {
                Ok(()) => (true, "redis: up".to_owned()),
                Err(error) => match redis.on_error() {
                    OnError::FailOpen => (
                        true,
                        format!("redis: down ({error}); fail_open: local limits"),
                    ),
                    OnError::FailClosed => (
                        false,
                        format!("redis: down ({error}); fail_closed: refusing"),
                    ),
                },
            },
        }
    }

    /// The Redis backend, when that is where state lives.
    pub(crate) fn redis(&self) -> Option<&Arc<RedisState>> {
        match &self.store {
            Store::Redis { redis, .. } => Some(redis),
            Store::Local(_) => None,
        }
    }

    /// The file-backed local state, when that is where state lives.
    pub(crate) fn local(&self) -> Option<&Arc<LocalState>> {
        match &self.store {
            Store::Local(local) => Some(local),
            Store::Redis { .. } => None,
        }
    }
}

/// Sets `tollgate_quota_used_tokens` for each of a key's windows.
fn set_gauges(metrics: &Metrics, key: &str, quotas: &[Quota], used: impl Iterator<Item = u64>) {
    for (quota, used) in quotas.iter().zip(used) {
        metrics
            .quota_used_tokens
            .with_label_values(&[key, quota.label().as_str()])
            .set(i64::try_from(used).unwrap_or(i64::MAX));
    }
}
