//! Limits and token windows shared by replicas through Redis, changed only by Lua scripts, so
//! that N replicas enforce exactly one limit.
//!
//! Keys (all under `state.prefix`, none holding a secret — key *names*, never tokens):
//! - `{prefix}rate:{name}` — the GCRA theoretical arrival time (µs, Redis clock); expires when idle.
//! - `{prefix}inflight:{name}` — a sorted set of leases, scored by their expiry (ms). A lease is
//!   renewed while its request runs; a replica that dies stops renewing, and its slots come back
//!   within `state.lease`.
//! - `{prefix}quota:{name}:{seconds}` — a hash `{start, used, reserved}` per window; expires two
//!   windows after its last use.
//!
//! Every script reads the time from Redis (`TIME`), so replicas with skewed clocks agree.
//!
//! When Redis cannot be reached, `on_error` decides: `fail_closed` refuses with 503;
//! `fail_open` admits on this replica's local limits, and the usage it charges meanwhile is kept
//! and applied to Redis when it returns — to the window it belongs to if that window is still
//! current, otherwise dropped (it would only change a window that has already ended). An outage is
//! logged once when it starts and once when it ends, and every failed call is counted in
//! `tollgate_state_errors_total{op}`. The connection manager reconnects by itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;

use super::{QuotaDenied, Reservation, WindowStatus};
use crate::config::{OnError, Quota, RateLimit, RedisConfig};
use crate::observability::metrics::Metrics;

/// Concurrency and rate in one call. Returns `{0, remaining, reset_us}` when admitted (remaining
/// is -1 when the key has no rate), `{1}` when the key has no free slot, `{2, wait_us}` when the
/// rate refuses.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[1]) >= limit then
    return {1}
  end
end
local remaining, reset_us = -1, 0
local period = tonumber(ARGV[4])
if period > 0 then
  local burst = tonumber(ARGV[5])
  local tau = (burst - 1) * period
  local tat = tonumber(redis.call('GET', KEYS[2]) or '0')
  if tat < now_us then tat = now_us end
  if tat - now_us > tau then
    return {2, tat - now_us - tau}
  end
  local new_tat = tat + period
  redis.call('SET', KEYS[2], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now_us) / 1000) + 1000)
  remaining = math.floor((burst * period - (new_tat - now_us)) / period)
  if remaining < 0 then remaining = 0 end
  reset_us = new_tat - now_us
end
if limit > 0 then
  redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
end
return {0, remaining, reset_us}
";

/// Reserves ARGV[1] tokens in every window (KEYS[i], length ARGV[1+i] s, limit ARGV[1+n+i]) or
/// none. Returns `{0, i, used, reset}` for the window that refuses (the one resetting last), or
/// `{1, start_1, used_1, reset_1, …}`.
const RESERVE: &str = r"
local now = tonumber(redis.call('TIME')[1])
local amount = tonumber(ARGV[1])
local n = #KEYS
local starts, taken = {}, {}
local denied, denied_reset, denied_used = 0, -1, 0
for i = 1, n do
  local per = tonumber(ARGV[1 + i])
  local limit = tonumber(ARGV[1 + n + i])
  local start = now - (now % per)
  local h = redis.call('HMGET', KEYS[i], 'start', 'used', 'reserved')
  local used = 0
  if tonumber(h[1]) == start then used = tonumber(h[2] or '0') + tonumber(h[3] or '0') end
  starts[i], taken[i] = start, used
  if used + amount > limit and start + per - now > denied_reset then
    denied, denied_reset, denied_used = i, start + per - now, used
  end
end
if denied > 0 then return {0, denied, denied_used, denied_reset} end
local out = {1}
for i = 1, n do
  local per = tonumber(ARGV[1 + i])
  if tonumber(redis.call('HGET', KEYS[i], 'start') or '-1') ~= starts[i] then
    redis.call('HSET', KEYS[i], 'start', starts[i], 'used', 0, 'reserved', 0)
  end
  redis.call('HINCRBY', KEYS[i], 'reserved', amount)
  redis.call('EXPIRE', KEYS[i], per * 2 + 60)
  table.insert(out, starts[i])
  table.insert(out, taken[i] + amount)
  table.insert(out, starts[i] + per - now)
end
return out
";

/// Releases ARGV[1] reserved tokens from the window that started at ARGV[2+i] and adds ARGV[2]
/// used tokens to the window current now. Returns `{used_1, reset_1, …}`.
const SETTLE: &str = r"
local now = tonumber(redis.call('TIME')[1])
local amount = tonumber(ARGV[1])
local used = tonumber(ARGV[2])
local n = #KEYS
local out = {}
for i = 1, n do
  local start = tonumber(ARGV[2 + i])
  local per = tonumber(ARGV[2 + n + i])
  local current = now - (now % per)
  local hstart = tonumber(redis.call('HGET', KEYS[i], 'start') or '-1')
  if hstart == start and amount > 0 then
    local left = redis.call('HINCRBY', KEYS[i], 'reserved', -amount)
    if left < 0 then redis.call('HSET', KEYS[i], 'reserved', 0) end
  end
  if hstart ~= current then
    redis.call('HSET', KEYS[i], 'start', current, 'used', 0, 'reserved', 0)
  end
  local total = redis.call('HINCRBY', KEYS[i], 'used', used)
  redis.call('EXPIRE', KEYS[i], per * 2 + 60)
  local reserved = tonumber(redis.call('HGET', KEYS[i], 'reserved') or '0')
  table.insert(out, total + reserved)
  table.insert(out, current + per - now)
end
return out
";

/// The current window of each KEYS[i] (length ARGV[i] s): `{used + reserved, reset, …}`.
const STATUS: &str = r"
local now = tonumber(redis.call('TIME')[1])
local out = {}
for i = 1, #KEYS do
  local per = tonumber(ARGV[i])
  local start = now - (now % per)
  local h = redis.call('HMGET', KEYS[i], 'start', 'used', 'reserved')
  local used = 0
  if tonumber(h[1]) == start then used = tonumber(h[2] or '0') + tonumber(h[3] or '0') end
  table.insert(out, used)
  table.insert(out, start + per - now)
end
return out
";

/// Moves the expiry of each lease (KEYS[i], member ARGV[1+i]) to now + ARGV[1] ms, if it still
/// exists.
const RENEW: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now_ms + lease_ms, ARGV[1 + i])
  redis.call('PEXPIRE', KEYS[i], lease_ms * 2)
end
return #KEYS
";

/// What Redis said about a request's concurrency and rate.
pub enum Admit {
    /// Admitted, holding `lease` when the key has a concurrency limit; `rate` is
    /// `(remaining, reset)` when it has a rate.
    Admitted {
        lease: Option<Lease>,
        rate: Option<(u32, Duration)>,
    },
    ConcurrencyFull,
    RateLimited {
        wait: Duration,
    },
}

/// The backend could not answer.
#[derive(Debug, thiserror::Error)]
#[error("state backend unavailable: {0}")]
pub struct Unavailable(pub String);

pub struct RedisState {
    conn: ConnectionManager,
    prefix: String,
    lease: Duration,
    on_error: OnError,
    metrics: Arc<Metrics>,
    /// This process's name in lease ids.
    replica: String,
    next_lease: AtomicU64,
    /// Leases held now, renewed until released: id → sorted-set key.
    leases: Mutex<HashMap<String, String>>,
    /// Whether the last call failed, to log an outage once at each end.
    down: AtomicBool,
    /// Usage charged while Redis was away, per `(quota key, window length, window start)`.
    pending: Mutex<HashMap<(String, u64, u64), u64>>,
    admit: Script,
    reserve: Script,
    settle: Script,
    renew: Script,
    status: Script,
}

impl RedisState {
    /// Sets up the client; the connection is made on first use and remade by itself, so the
    /// gateway starts (and, under `fail_open`, serves) while Redis is still away.
    pub fn connect(config: &RedisConfig, metrics: Arc<Metrics>) -> Result<RedisState, String> {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(config.url.as_str())
                .map_err(|e| format!("state.redis_url: {e}"))?;
        if let Some(password) = &config.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| format!("state.redis_url: {e}"))?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| format!("state: redis client: {e}"))?;
        let replica = uuid::Uuid::new_v4().simple().to_string();
        Ok(RedisState {
            conn,
            prefix: config.prefix.clone(),
            lease: config.lease,
            on_error: config.on_error,
            metrics,
            replica,
            next_lease: AtomicU64::new(0),
            leases: Mutex::new(HashMap::new()),
            down: AtomicBool::new(false),
            pending: Mutex::new(HashMap::new()),
            admit: Script::new(ADMIT),
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
            renew: Script::new(RENEW),
            status: Script::new(STATUS),
        })
    }

    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    fn inflight_key(&self, name: &str) -> String {
        format!("{}inflight:{name}", self.prefix)
    }

    fn quota_key(&self, name: &str, per_secs: u64) -> String {
        format!("{}quota:{name}:{per_secs}", self.prefix)
    }

    /// Notes a failed call: counted, and logged when an outage begins.
    fn failed(&self, op: &str, error: &redis::RedisError) -> Unavailable {
        self.metrics.state_error(op);
        if !self.down.swap(true, Ordering::AcqRel) {
            let mode = match self.on_error {
                OnError::FailOpen => "fail_open: admitting on this replica's local limits",
                OnError::FailClosed => "fail_closed: refusing requests with 503",
            };
            tracing::error!(%error, op, "state backend unreachable; {mode}");
        }
        Unavailable(error.to_string())
    }

    /// Notes a successful call: logs the end of an outage and applies what it left pending.
    fn succeeded(self: &Arc<Self>) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("state backend reachable again");
            let this = self.clone();
            tokio::spawn(async move { this.apply_pending().await });
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Takes a concurrency slot and a rate cell for `name`, in one round trip.
    pub async fn admit(
        self: &Arc<Self>,
        name: &str,
        concurrency: Option<u32>,
        rate: Option<RateLimit>,
    ) -> Result<Admit, Unavailable> {
        let id = format!(
            "{}-{}",
            self.replica,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let zset = self.inflight_key(name);
        let (period_us, burst) = rate.map_or((0, 0), |r| {
            let period = r.per / r.requests.get();
            (
                u64::try_from(period.as_micros()).unwrap_or(u64::MAX).max(1),
                r.burst.get(),
            )
        });
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self
            .admit
            .key(&zset)
            .key(format!("{}rate:{name}", self.prefix))
            .arg(concurrency.unwrap_or(0))
            .arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX))
            .arg(&id)
            .arg(period_us)
            .arg(burst)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed("admit", &e))?;
        self.succeeded();
        let micros =
            |v: Option<&i64>| Duration::from_micros(v.copied().unwrap_or(0).max(0).unsigned_abs());
        match reply.first() {
            Some(0) => {
                let lease = concurrency.map(|_| {
                    self.leases
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(id.clone(), zset.clone());
                    Lease {
                        state: self.clone(),
                        zset,
                        id,
                    }
                });
                let rate = match reply.get(1) {
                    Some(&remaining) if remaining >= 0 => Some((
                        u32::try_from(remaining).unwrap_or(u32::MAX),
                        micros(reply.get(2)),
                    )),
                    _ => None,
                };
                Ok(Admit::Admitted { lease, rate })
            }
            Some(1) => Ok(Admit::ConcurrencyFull),
            _ => Ok(Admit::RateLimited {
                wait: micros(reply.get(1)),
            }),
        }
    }

    /// Reserves `amount` tokens in every window of `quotas`, in one round trip.
    pub async fn reserve(
        self: &Arc<Self>,
        name: &Arc<str>,
        quotas: &[Quota],
        amount: u64,
    ) -> Result<Result<(Reservation, Vec<WindowStatus>), QuotaDenied>, Unavailable> {
        let mut invocation = self.reserve.prepare_invoke();
        for quota in quotas {
            invocation.key(self.quota_key(name, quota.per_secs()));
        }
        invocation.arg(amount);
        for quota in quotas {
            invocation.arg(quota.per_secs());
        }
        for quota in quotas {
            invocation.arg(quota.tokens);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed("reserve", &e))?;
        self.succeeded();
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
        if reply.first() == Some(&0) {
            let window = quotas
                .get(usize::try_from(at(1)).unwrap_or(1).saturating_sub(1))
                .copied()
                .unwrap_or(quotas[0]);
            return Ok(Err(QuotaDenied {
                per: window.per,
                limit: window.tokens,
                used: at(2),
                needed: amount,
                retry_after: Duration::from_secs(at(3)),
            }));
        }
        let mut windows = Vec::with_capacity(quotas.len());
        let mut status = Vec::with_capacity(quotas.len());
        for (i, quota) in quotas.iter().enumerate() {
            let (start, used, reset) = (at(1 + 3 * i), at(2 + 3 * i), at(3 + 3 * i));
            windows.push((quota.per_secs(), start));
            status.push(WindowStatus {
                per: quota.per,
                limit: quota.tokens,
                used,
                remaining: quota.tokens.saturating_sub(used),
                reset_after: Duration::from_secs(reset),
            });
        }
        Ok(Ok((
            Reservation {
                key: name.clone(),
                windows,
                amount,
            },
            status,
        )))
    }

    /// Settles a reservation to `used` tokens (a `reservation.amount` of 0 releases nothing: used
    /// for usage charged while Redis was away). On failure the usage is kept and applied later.
    pub async fn settle(
        self: &Arc<Self>,
        reservation: &Reservation,
        used: u64,
    ) -> Result<Vec<u64>, Unavailable> {
        let mut invocation = self.settle.prepare_invoke();
        for (per_secs, _) in &reservation.windows {
            invocation.key(self.quota_key(&reservation.key, *per_secs));
        }
        invocation.arg(reservation.amount).arg(used);
        for (_, start) in &reservation.windows {
            invocation.arg(*start);
        }
        for (per_secs, _) in &reservation.windows {
            invocation.arg(*per_secs);
        }
        let mut conn = self.conn.clone();
        match invocation.invoke_async::<Vec<i64>>(&mut conn).await {
            Ok(reply) => {
                self.succeeded();
                Ok(reply
                    .iter()
                    .step_by(2)
                    .map(|v| v.max(&0).unsigned_abs())
                    .collect())
            }
            Err(error) => {
                let unavailable = self.failed("settle", &error);
                self.keep_pending(reservation, used);
                Err(unavailable)
            }
        }
    }

    /// Used (settled + reserved) tokens and time to reset of each window of `quotas`, now.
    pub async fn status(
        self: &Arc<Self>,
        name: &str,
        quotas: &[Quota],
    ) -> Result<Vec<WindowStatus>, Unavailable> {
        let mut invocation = self.status.prepare_invoke();
        for quota in quotas {
            invocation
                .key(self.quota_key(name, quota.per_secs()))
                .arg(quota.per_secs());
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed("status", &e))?;
        self.succeeded();
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
        Ok(quotas
            .iter()
            .enumerate()
            .map(|(i, quota)| WindowStatus {
                per: quota.per,
                limit: quota.tokens,
                used: at(2 * i),
                remaining: quota.tokens.saturating_sub(at(2 * i)),
                reset_after: Duration::from_secs(at(2 * i + 1)),
            })
            .collect())
    }

    /// Remembers usage to apply when Redis returns.
    pub fn keep_pending(&self, reservation: &Reservation, used: u64) {
        if used == 0 {
            return;
        }
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for (per_secs, start) in &reservation.windows {
            *pending
                .entry((reservation.key.to_string(), *per_secs, *start))
                .or_default() += used;
        }
    }

    /// Applies usage charged during an outage, to windows that are still current.
    async fn apply_pending(self: Arc<Self>) {
        let drained: Vec<((String, u64, u64), u64)> = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        if drained.is_empty() {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut applied = 0u64;
        let mut expired = 0u64;
        for ((key, per_secs, start), used) in drained {
            if start + per_secs <= now {
                expired += used;
                continue;
            }
            let reservation = Reservation {
                key: Arc::from(key),
                windows: vec![(per_secs, start)],
                amount: 0,
            };
            if self.settle(&reservation, used).await.is_ok() {
                applied += used;
            }
        }
        tracing::info!(
            applied,
            dropped_for_ended_windows = expired,
            "usage charged during the state outage applied"
        );
    }

    /// Renews every lease this replica holds, every third of the lease time, until the process
    /// ends.
    pub async fn run_renewer(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.lease / 3);
        loop {
            ticker.tick().await;
            let leases: Vec<(String, String)> = self
                .leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(id, zset)| (id.clone(), zset.clone()))
                .collect();
            if leases.is_empty() {
                continue;
            }
            let mut invocation = self.renew.prepare_invoke();
            invocation.arg(u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX));
            for (id, zset) in &leases {
                invocation.key(zset).arg(id);
            }
            let mut conn = self.conn.clone();
            match invocation.invoke_async::<i64>(&mut conn).await {
                Ok(_) => self.succeeded(),
                Err(error) => {
                    self.failed("renew", &error);
                }
            }
        }
    }

    /// Whether Redis answers a PING within a second (an answer also ends an outage).
    pub async fn ping(self: &Arc<Self>) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut conn);
        match tokio::time::timeout(Duration::from_secs(1), ping).await {
            Ok(Ok(_)) => {
                self.succeeded();
                Ok(())
            }
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("no answer within 1s".into()),
        }
    }

    fn release(&self, zset: String, id: String) {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let mut conn = self.conn.clone();
        let metrics = self.metrics.clone();
        // Dropped outside a runtime (process exit): the lease expires by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let result: redis::RedisResult<i64> = redis::cmd("ZREM")
                    .arg(&zset)
                    .arg(&id)
                    .query_async(&mut conn)
                    .await;
                if result.is_err() {
                    // The lease expires by itself within `state.lease`.
                    metrics.state_error("release");
                }
            });
        }
    }
}

/// A concurrency slot held in Redis; released when dropped.
pub struct Lease {
    state: Arc<RedisState>,
    zset: String,
    id: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state
            .release(std::mem::take(&mut self.zset), std::mem::take(&mut self.id));
    }
}
