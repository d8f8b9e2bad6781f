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
pub mod window;

pub use self::window::{Scope, Window, WindowId};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock as _;

use self::local::LocalState;
use self::redis::{Admit, Lease, RedisState, Reserved, Unavailable};
use crate::config::{OnError, Period, Unit};
use crate::keys::{GroupEntry, InflightGuard, KeyEntry, Limiter};
use crate::observability::metrics::Metrics;
use crate::state::clock::Clock;

/// What a request holds or used, in each unit: tokens, and nano-units of cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amounts {
    pub tokens: u64,
    pub cost: u64,
}

impl Amounts {
    pub(crate) fn of(self, unit: Unit) -> u64 {
        match unit {
            Unit::Tokens => self.tokens,
            Unit::Cost => self.cost,
        }
    }
}

/// What one request holds in each of its windows (its key's and its group's), until settled.
#[derive(Debug)]
pub struct Reservation {
    /// Each window reserved in, with the start of the window it was reserved in.
    pub(crate) windows: Vec<(WindowId, u64)>,
    pub(crate) amounts: Amounts,
}

/// Why a reservation was refused: the window that had no room.
#[derive(Debug, Clone)]
pub struct QuotaDenied {
    pub(crate) id: WindowId,
    pub(crate) limit: u64,
    /// Settled plus reserved, before this request.
    pub(crate) used: u64,
    /// What this request needed.
    pub(crate) needed: u64,
    pub(crate) retry_after: Duration,
    /// The window's length now (a month's is 28 to 31 days).
    pub(crate) length: Duration,
}

/// One window of a key or a group, now.
#[derive(Debug, Clone)]
pub struct WindowStatus {
    pub(crate) scope: Scope,
    pub(crate) unit: Unit,
    pub(crate) per: Period,
    pub(crate) limit: u64,
    /// Settled plus reserved.
    pub(crate) used: u64,
    /// Of `used`, what requests in flight hold for their worst case; `None` where it was not
    /// read (a refusal's or a Redis reservation's figures, which only the headers use).
    pub(crate) reserved: Option<u64>,
    pub(crate) remaining: u64,
    pub(crate) reset_after: Duration,
    /// The window's length now (a month's is 28 to 31 days).
    pub(crate) length: Duration,
}

impl WindowStatus {
    /// The status of `window` with `used` (settled + reserved) in the window `[start, end)`.
    pub(crate) fn new(
        window: &Window,
        used: u64,
        reserved: Option<u64>,
        (start, end): (u64, u64),
        now: u64,
    ) -> WindowStatus {
        WindowStatus {
            scope: window.id.scope,
            unit: window.id.unit,
            per: window.id.per,
            limit: window.limit,
            used,
            reserved,
            remaining: window.limit.saturating_sub(used),
            reset_after: Duration::from_secs(end.saturating_sub(now)),
            length: Duration::from_secs(end - start),
        }
    }
}

/// A request's place among its key's (and its group's) requests in flight: local counts always
/// (the in-flight gauges), and a Redis lease when a limit is shared.
pub(crate) struct Slot {
    _local: InflightGuard,
    _group: Option<InflightGuard>,
    _lease: Option<Lease>,
}

/// Why a request was not admitted, and whose limit refused it.
pub(crate) enum Refusal {
    Concurrency { scope: Scope },
    Rate { wait: Duration, scope: Scope },
    Unavailable(Unavailable),
}

/// A request admitted: its slot, and `(remaining, reset)` of its key's rate when it has one.
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

    pub(crate) fn amounts(&self) -> Amounts {
        self.reservation.amounts
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

    /// Takes a slot and a rate cell for `key`, and for its group when it has one: both or none.
    pub(crate) async fn admit(&self, key: &KeyEntry) -> Result<Admission, Refusal> {
        let group = key.group.as_deref();
        let shared = key.limits.concurrency.is_some()
            || key.limits.rate.is_some()
            || group.is_some_and(|g| g.config.concurrency.is_some() || g.config.rate.is_some());
        if let (Store::Redis { redis, .. }, true) = (&self.store, shared) {
            match redis.admit(key).await {
                Ok(Admit::Admitted { lease, rate }) => {
                    let local = key.inflight.try_acquire(None);
                    let group_local = group.map(|g| g.inflight.try_acquire(None));
                    return match (local, group_local) {
                        (Some(local), None) => Ok((local, None)),
                        (Some(local), Some(Some(group))) => Ok((local, Some(group))),
                        _ => Err(Refusal::Concurrency { scope: Scope::Key }),
                    }
                    .map(|(local, group)| Admission {
                        slot: Slot {
                            _local: local,
                            _group: group,
                            _lease: lease,
                        },
                        rate,
                    });
                }
                Ok(Admit::ConcurrencyFull { scope }) => return Err(Refusal::Concurrency { scope }),
                Ok(Admit::RateLimited { wait, scope }) => {
                    return Err(Refusal::Rate { wait, scope })
                }
                Err(unavailable) if redis.on_error() == OnError::FailClosed => {
                    return Err(Refusal::Unavailable(unavailable))
                }
                // fail_open: this replica's own limits stand in.
                Err(_) => {}
            }
        }
        self.admit_locally(key)
    }

    /// The key's slot, then its group's; the key's rate, then its group's. A request the group's
    /// rate refuses has spent one of its key's cells (governor cannot give one back): the error
    /// is on the side of admitting less, and falls on the key that asked, never on its group.
    fn admit_locally(&self, key: &KeyEntry) -> Result<Admission, Refusal> {
        let local = key
            .inflight
            .try_acquire(key.limits.concurrency)
            .ok_or(Refusal::Concurrency { scope: Scope::Key })?;
        let group = match key.group.as_deref() {
            Some(group) => Some(group.inflight.try_acquire(group.config.concurrency).ok_or(
                Refusal::Concurrency {
                    scope: Scope::Group,
                },
            )?),
            None => None,
        };
        let rate = match (&key.limiter, key.limits.rate) {
            (Some(limiter), Some(rate)) => {
                let remaining = self.check_rate(limiter, Scope::Key)?;
                let used = rate.burst.get().saturating_sub(remaining);
                Some((remaining, rate.per / rate.requests.get() * used))
            }
            _ => None,
        };
        if let Some(limiter) = key
            .group
            .as_deref()
            .and_then(|g: &GroupEntry| g.limiter.as_ref())
        {
            self.check_rate(limiter, Scope::Group)?;
        }
        Ok(Admission {
            slot: Slot {
                _local: local,
                _group: group,
                _lease: None,
            },
            rate,
        })
    }

    /// One cell of `limiter`: the burst capacity left, or the wait.
    fn check_rate(&self, limiter: &Limiter, scope: Scope) -> Result<u32, Refusal> {
        match limiter.check() {
            Ok(snapshot) => Ok(snapshot.remaining_burst_capacity()),
            Err(not_until) => Err(Refusal::Rate {
                wait: not_until.wait_time_from(self.clock.now()),
                scope,
            }),
        }
    }

    /// Reserves `need` in every window of `windows` (a key's and its group's, tokens and cost),
    /// or says which window has no room: all of them or none.
    pub async fn reserve(
        &self,
        windows: &[Window],
        need: Amounts,
    ) -> Result<Result<(Held, Vec<WindowStatus>), QuotaDenied>, Unavailable> {
        let in_process = |state: &LocalState| {
            let result = state.reserve(windows, need);
            result.map(|(reservation, status)| (Held::new(reservation, true, None), status))
        };
        let result = match &self.store {
            Store::Local(local) => in_process(local),
            Store::Redis { redis, fallback } => match redis.reserve(windows, need).await {
                Ok(result) => result
                    .map(|r: Reserved| (Held::new(r.reservation, false, Some(r.lease)), r.status)),
                Err(unavailable) if redis.on_error() == OnError::FailClosed => {
                    return Err(unavailable)
                }
                Err(_) => in_process(fallback),
            },
        };
        if let Ok((_, status)) = &result {
            self.set_gauges(windows, status.iter().map(|s| s.used));
        }
        Ok(result)
    }

    /// Replaces a reservation by what the request used. Never waits: a Redis settlement runs in
    /// the background (and is kept for later if Redis is away).
    pub fn settle(&self, held: Held, used: Amounts, windows: &[Window]) {
        match &self.store {
            Store::Local(local) => {
                let totals = local.settle(held.reservation, used);
                self.set_gauges(windows, totals.into_iter());
            }
            Store::Redis { redis, fallback } => {
                let redis = redis.clone();
                let metrics = self.metrics.clone();
                let windows = windows.to_vec();
                let member = held.lease.map(Lease::into_settled);
                let reservation = if held.local {
                    // Charged locally while Redis was away: settle here, and add the usage to
                    // Redis (now if it is back, or when it returns).
                    let reserved = held.reservation.windows.clone();
                    fallback.settle(held.reservation, used);
                    Reservation {
                        windows: reserved,
                        amounts: Amounts::default(),
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
                            set_gauges(&metrics, &windows, totals.into_iter());
                        }
                        settling.fetch_sub(1, Ordering::AcqRel);
                    });
                } else {
                    redis.keep_pending(&reservation, used);
                }
            }
        }
    }

    fn set_gauges(&self, windows: &[Window], used: impl Iterator<Item = u64>) {
        set_gauges(&self.metrics, windows, used);
    }

    /// Each window of `windows`, now (for the admin API).
    pub(crate) async fn status(
        &self,
        windows: &[Window],
    ) -> Result<Vec<WindowStatus>, Unavailable> {
        match &self.store {
            Store::Local(local) => Ok(local.status(windows)),
            Store::Redis { redis, .. } => redis.status(windows).await,
        }
    }

    /// Sets the used-in-window gauges of every window of `keys` and of `groups` from the state,
    /// so that each series exists, at its true value, before the first request (a restart with
    /// usage in the state file must not show 0). A window the state cannot tell now is left to
    /// the first request.
    pub(crate) async fn publish_windows(
        &self,
        keys: Vec<Arc<KeyEntry>>,
        groups: Vec<Arc<GroupEntry>>,
    ) {
        let own = keys
            .iter()
            .map(|key| Window::of(Scope::Key, &key.name, &key.limits.quotas));
        let shared = groups
            .iter()
            .map(|group| Window::of(Scope::Group, &group.name, &group.config.quotas));
        for windows in own.chain(shared) {
            if windows.is_empty() {
                continue;
            }
            if let Ok(status) = self.status(&windows).await {
                self.set_gauges(&windows, status.iter().map(|w| w.used));
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

/// Sets each window's used-in-window gauge: `tollgate_quota_used_tokens`,
/// `tollgate_quota_used_cost`, `tollgate_group_quota_used_tokens` or
/// `tollgate_group_quota_used_cost`.
fn set_gauges(metrics: &Metrics, windows: &[Window], used: impl Iterator<Item = u64>) {
    for (window, used) in windows.iter().zip(used) {
        metrics.set_window_used(window, used);
    }
}
