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
//! - `{prefix}reservations:{name}:{seconds}` — the reservations counted in that window's
//!   `reserved`, a sorted set of leases as above (members `<id>:<tokens>`); expires with the hash.
//!   Each script that reads a window first gives back the reservations whose lease ended, so a
//!   replica killed mid-request holds its requests' tokens for at most `state.lease`, not until
//!   the window ends.
//!
//! Every script reads the time from Redis (`TIME`), so replicas with skewed clocks agree.
//!
//! Whatever a call takes (a slot, a reservation) is held by a [`Lease`] made before the call,
//! so a request dropped mid-call (its client left while Redis was slow) gives it back; a
//! reservation is given back exactly once — by its settlement, its release or its expiry,
//! whichever removes its lease first. A lease that fails to renew for `state.lease` (Redis
//! unreachable from this replica that long) ends even though its request still runs; until that
//! request settles, the window may then admit more than its quota.
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
use crate::observability::labels::StateOp;
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

/// Functions the token-window scripts share. A window is a hash `{start, used, reserved}` and a
/// sorted set of the reservations in it, members `<id>:<tokens>` scored by lease expiry (ms).
/// Invariant: a member in the set is counted in the hash's `reserved` for its current `start`
/// (a window that starts again empties both together), so a member removed exactly once gives its
/// tokens back exactly once, whoever removes it — its settlement, its release, or its expiry.
const WINDOW_FUNCTIONS: &str = r"
local function amount_of(member)
  return tonumber(string.match(member, ':(%d+)$') or '0')
end
local function give_back(hash, amount)
  if amount > 0 and redis.call('HINCRBY', hash, 'reserved', -amount) < 0 then
    redis.call('HSET', hash, 'reserved', 0)
  end
end
-- Reservations whose holder stopped renewing them (a replica that died) end here; at most 1000
-- per call, the rest at the next one.
local function expire(hash, leases, now_ms)
  local stale = redis.call('ZRANGEBYSCORE', leases, '-inf', now_ms, 'LIMIT', 0, 1000)
  if #stale == 0 then return end
  local freed = 0
  for _, member in ipairs(stale) do freed = freed + amount_of(member) end
  redis.call('ZREM', leases, unpack(stale))
  give_back(hash, freed)
end
local function restart(hash, leases, start)
  redis.call('HSET', hash, 'start', start, 'used', 0, 'reserved', 0)
  redis.call('DEL', leases)
end
-- Both expire together, two windows and a minute after their last use (renewals may keep the
-- set longer, never shorter: a set gone before its hash would strand what it counted).
local function keep(hash, leases, per)
  redis.call('EXPIRE', hash, per * 2 + 60)
  redis.call('EXPIRE', leases, per * 2 + 60)
end
local t = redis.call('TIME')
local now = tonumber(t[1])
local now_ms = now * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
";

/// Reserves ARGV[1] tokens as member ARGV[2] under a lease of ARGV[3] ms in every window
/// (KEYS[i] and its leases KEYS[n+i], length ARGV[3+i] s, limit ARGV[3+n+i]) or in none. Returns
/// `{0, i, used, reset}` for the window that refuses (the one resetting last), or
/// `{1, start_1, used_1, reset_1, …}`.
const RESERVE: &str = r"
local amount, member, lease_ms = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local starts, current, taken = {}, {}, {}
local denied, denied_reset, denied_used = 0, -1, 0
for i = 1, n do
  local per = tonumber(ARGV[3 + i])
  local limit = tonumber(ARGV[3 + n + i])
  local start = now - (now % per)
  local used = 0
  current[i] = tonumber(redis.call('HGET', KEYS[i], 'start') or '-1') == start
  if current[i] then
    expire(KEYS[i], KEYS[n + i], now_ms)
    local h = redis.call('HMGET', KEYS[i], 'used', 'reserved')
    used = tonumber(h[1] or '0') + tonumber(h[2] or '0')
  end
  starts[i], taken[i] = start, used
  if used + amount > limit and start + per - now > denied_reset then
    denied, denied_reset, denied_used = i, start + per - now, used
  end
end
if denied > 0 then return {0, denied, denied_used, denied_reset} end
local out = {1}
for i = 1, n do
  local per = tonumber(ARGV[3 + i])
  if not current[i] then restart(KEYS[i], KEYS[n + i], starts[i]) end
  redis.call('HINCRBY', KEYS[i], 'reserved', amount)
  redis.call('ZADD', KEYS[n + i], now_ms + lease_ms, member)
  keep(KEYS[i], KEYS[n + i], per)
  table.insert(out, starts[i])
  table.insert(out, taken[i] + amount)
  table.insert(out, starts[i] + per - now)
end
return out
";

/// Gives back the reservation ARGV[2] (none when empty) in every window (KEYS[i] and its leases
/// KEYS[n+i], length ARGV[2+i] s) if it is still held, and adds ARGV[1] used tokens to the window
/// current now. Returns `{used_1, reset_1, …}`.
const SETTLE: &str = r"
local used, member = tonumber(ARGV[1]), ARGV[2]
local out = {}
for i = 1, n do
  local hash, leases = KEYS[i], KEYS[n + i]
  local per = tonumber(ARGV[2 + i])
  local start = now - (now % per)
  if member ~= '' and redis.call('ZREM', leases, member) == 1 then
    give_back(hash, amount_of(member))
  end
  if tonumber(redis.call('HGET', hash, 'start') or '-1') == start then
    expire(hash, leases, now_ms)
  else
    restart(hash, leases, start)
  end
  local total = redis.call('HINCRBY', hash, 'used', used)
  keep(hash, leases, per)
  local reserved = tonumber(redis.call('HGET', hash, 'reserved') or '0')
  table.insert(out, total + reserved)
  table.insert(out, start + per - now)
end
return out
";

/// The current window of each KEYS[i] (leases KEYS[n+i], length ARGV[i] s):
/// `{used + reserved, reserved, reset, …}`.
const STATUS: &str = r"
local out = {}
for i = 1, n do
  local per = tonumber(ARGV[i])
  local start = now - (now % per)
  local used, reserved = 0, 0
  if tonumber(redis.call('HGET', KEYS[i], 'start') or '-1') == start then
    expire(KEYS[i], KEYS[n + i], now_ms)
    local h = redis.call('HMGET', KEYS[i], 'used', 'reserved')
    reserved = tonumber(h[2] or '0')
    used = tonumber(h[1] or '0') + reserved
  end
  table.insert(out, used)
  table.insert(out, reserved)
  table.insert(out, start + per - now)
end
return out
";

/// Moves the expiry of each lease (sorted set KEYS[i], member ARGV[1+i]) to now + ARGV[1] ms, if
/// it is still there, and keeps each set at least twice that long.
const RENEW: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now_ms + lease_ms, ARGV[1 + i])
  if redis.call('PTTL', KEYS[i]) < lease_ms * 2 then
    redis.call('PEXPIRE', KEYS[i], lease_ms * 2)
  end
end
return #KEYS
";

/// What Redis said about a request's concurrency and rate.
pub(crate) enum Admit {
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

/// Tokens reserved in Redis: what to settle, the lease that holds them, each window's status.
pub struct Reserved {
    pub reservation: Reservation,
    pub lease: Lease,
    pub(crate) status: Vec<WindowStatus>,
}

/// The backend could not answer.
#[derive(Debug, thiserror::Error)]
#[error("state backend unavailable: {0}")]
pub struct Unavailable(pub String);

pub struct RedisState {
    pub(super) conn: ConnectionManager,
    /// For the managed keys' change notifications, which need a connection of their own.
    pub(super) client: redis::Client,
    pub(super) prefix: String,
    lease: Duration,
    on_error: OnError,
    metrics: Arc<Metrics>,
    /// This process's name in lease ids.
    replica: String,
    next_lease: AtomicU64,
    /// Leases held now, renewed until released: member → the sorted sets it is in.
    leases: Mutex<HashMap<String, Vec<String>>>,
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

/// Why Redis could not be set up or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("state.redis_url: {0}")]
    Url(#[source] redis::RedisError),
    #[error("state: redis client: {0}")]
    Client(#[source] redis::RedisError),
    #[error("{0}")]
    Command(#[source] redis::RedisError),
    #[error("no answer within 1s")]
    NoAnswer,
}

impl RedisState {
    /// Sets up the client; the connection is made on first use and remade by itself, so the
    /// gateway starts (and, under `fail_open`, serves) while Redis is still away.
    pub fn connect(config: &RedisConfig, metrics: Arc<Metrics>) -> Result<RedisState, RedisError> {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(config.url.as_str())
                .map_err(RedisError::Url)?;
        if let Some(password) = &config.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(RedisError::Url)?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(RedisError::Client)?;
        let replica = uuid::Uuid::new_v4().simple().to_string();
        let window_script = |body: &str| Script::new(&format!("{WINDOW_FUNCTIONS}{body}"));
        Ok(RedisState {
            conn,
            client,
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
            reserve: window_script(RESERVE),
            settle: window_script(SETTLE),
            renew: Script::new(RENEW),
            status: window_script(STATUS),
        })
    }

    pub(crate) fn on_error(&self) -> OnError {
        self.on_error
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX)
    }

    /// A lease id no other request of any replica has.
    fn next_member(&self) -> String {
        format!(
            "{}-{}",
            self.replica,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn inflight_key(&self, name: &str) -> String {
        format!("{}inflight:{name}", self.prefix)
    }

    fn quota_key(&self, name: &str, per_secs: u64) -> String {
        format!("{}quota:{name}:{per_secs}", self.prefix)
    }

    /// The sorted set of the reservations held in a window.
    fn reservations_key(&self, name: &str, per_secs: u64) -> String {
        format!("{}reservations:{name}:{per_secs}", self.prefix)
    }

    /// Notes a failed call: counted, and logged when an outage begins.
    pub(super) fn failed(&self, op: StateOp, error: &redis::RedisError) -> Unavailable {
        self.metrics.state_error(op);
        if !self.down.swap(true, Ordering::AcqRel) {
            let mode = match self.on_error {
                OnError::FailOpen => "fail_open: admitting on this replica's local limits",
                OnError::FailClosed => "fail_closed: refusing requests with 503",
            };
            tracing::error!(%error, %op, "state backend unreachable; {mode}");
        }
        Unavailable(error.to_string())
    }

    /// Notes a successful call: logs the end of an outage and applies what it left pending.
    pub(super) fn succeeded(self: &Arc<Self>) {
        if self.down.swap(false, Ordering::AcqRel) {
            tracing::info!("state backend reachable again");
            let this = self.clone();
            tokio::spawn(async move { this.apply_pending().await });
        }
    }

    /// Takes a concurrency slot and a rate cell for `name`, in one round trip.
    pub(crate) async fn admit(
        self: &Arc<Self>,
        name: &str,
        concurrency: Option<u32>,
        rate: Option<RateLimit>,
    ) -> Result<Admit, Unavailable> {
        let zset = self.inflight_key(name);
        let member = self.next_member();
        let (period_us, burst) = rate.map_or((0, 0), |r| {
            let period = r.per / r.requests.get();
            (
                u64::try_from(period.as_micros()).unwrap_or(u64::MAX).max(1),
                r.burst.get(),
            )
        });
        let mut invocation = self.admit.prepare_invoke();
        invocation
            .key(&zset)
            .key(format!("{}rate:{name}", self.prefix))
            .arg(concurrency.unwrap_or(0))
            .arg(self.lease_ms())
            .arg(&member)
            .arg(period_us)
            .arg(burst);
        // Held from before the call: dropped with the request, it gives back what the call took.
        let lease = concurrency.map(|_| Lease::new(self, member, Leased::Slot { zset }));
        let mut conn = self.conn.clone();
        let reply = match invocation.invoke_async::<Vec<i64>>(&mut conn).await {
            Ok(reply) => reply,
            Err(error) => return Err(self.unanswered(StateOp::Admit, &error, lease)),
        };
        self.succeeded();
        Ok(admit_reply(&reply, lease))
    }

    /// Reserves `amount` tokens in every window of `quotas`, in one round trip.
    pub async fn reserve(
        self: &Arc<Self>,
        name: &Arc<str>,
        quotas: &[Quota],
        amount: u64,
    ) -> Result<Result<Reserved, QuotaDenied>, Unavailable> {
        let member = format!("{}:{amount}", self.next_member());
        let mut invocation = self.reserve.prepare_invoke();
        for quota in quotas {
            invocation.key(self.quota_key(name, quota.per_secs()));
        }
        for quota in quotas {
            invocation.key(self.reservations_key(name, quota.per_secs()));
        }
        invocation.arg(amount).arg(&member).arg(self.lease_ms());
        for quota in quotas {
            invocation.arg(quota.per_secs());
        }
        for quota in quotas {
            invocation.arg(quota.tokens);
        }
        // Held from before the call: dropped with the request, it gives back what the call took.
        let tokens = Leased::Tokens {
            name: name.clone(),
            windows: quotas.iter().map(Quota::per_secs).collect(),
        };
        let lease = Lease::new(self, member, tokens);
        let mut conn = self.conn.clone();
        let reply = match invocation.invoke_async::<Vec<i64>>(&mut conn).await {
            Ok(reply) => reply,
            Err(error) => return Err(self.unanswered(StateOp::Reserve, &error, Some(lease))),
        };
        self.succeeded();
        Ok(reserve_reply(&reply, name, quotas, amount, lease))
    }

    /// A call that would have taken something under `lease` failed. Whether it ran is unknown
    /// unless it was never sent: then the lease is forgotten, otherwise it is released.
    fn unanswered(
        &self,
        op: StateOp,
        error: &redis::RedisError,
        lease: Option<Lease>,
    ) -> Unavailable {
        if let (Some(lease), true) = (lease, error.is_connection_refusal()) {
            lease.forget();
        }
        self.failed(op, error)
    }

    /// Settles a reservation to `used` tokens, giving back the tokens `member` still holds (none
    /// for usage charged while Redis was away). On failure the usage is kept and applied later;
    /// the reservation, renewed no more, ends with its lease.
    pub async fn settle(
        self: &Arc<Self>,
        reservation: &Reservation,
        member: Option<&str>,
        used: u64,
    ) -> Result<Vec<u64>, Unavailable> {
        let windows = reservation.windows.iter().map(|(per_secs, _)| *per_secs);
        match self
            .invoke_settle(&reservation.key, windows, member.unwrap_or(""), used)
            .await
        {
            Ok(reply) => {
                self.succeeded();
                Ok(reply
                    .iter()
                    .step_by(2)
                    .map(|v| v.max(&0).unsigned_abs())
                    .collect())
            }
            Err(error) => {
                let unavailable = self.failed(StateOp::Settle, &error);
                self.keep_pending(reservation, used);
                Err(unavailable)
            }
        }
    }

    async fn invoke_settle(
        &self,
        name: &str,
        windows: impl Iterator<Item = u64> + Clone,
        member: &str,
        used: u64,
    ) -> redis::RedisResult<Vec<i64>> {
        let mut invocation = self.settle.prepare_invoke();
        for per_secs in windows.clone() {
            invocation.key(self.quota_key(name, per_secs));
        }
        for per_secs in windows.clone() {
            invocation.key(self.reservations_key(name, per_secs));
        }
        invocation.arg(used).arg(member);
        for per_secs in windows {
            invocation.arg(per_secs);
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async(&mut conn).await
    }

    /// Used (settled + reserved) tokens and time to reset of each window of `quotas`, now.
    pub(crate) async fn status(
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
        for quota in quotas {
            invocation.key(self.reservations_key(name, quota.per_secs()));
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(StateOp::Status, &e))?;
        self.succeeded();
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
        Ok(quotas
            .iter()
            .enumerate()
            .map(|(i, quota)| WindowStatus {
                per: quota.per,
                limit: quota.tokens,
                used: at(3 * i),
                reserved: Some(at(3 * i + 1)),
                remaining: quota.tokens.saturating_sub(at(3 * i)),
                reset_after: Duration::from_secs(at(3 * i + 2)),
            })
            .collect())
    }

    /// Remembers usage to apply when Redis returns.
    pub(crate) fn keep_pending(&self, reservation: &Reservation, used: u64) {
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
            if self.settle(&reservation, None, used).await.is_ok() {
                applied += used;
            }
        }
        tracing::info!(
            applied,
            dropped_for_ended_windows = expired,
            "usage charged during the state outage applied"
        );
    }

    /// Renews every lease this replica holds (slots and reservations), every third of the lease
    /// time, until the process ends.
    pub(crate) async fn run_renewer(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.lease / 3);
        loop {
            ticker.tick().await;
            let mut invocation = self.renew.prepare_invoke();
            invocation.arg(self.lease_ms());
            let mut any = false;
            for (member, zsets) in self
                .leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
            {
                for zset in zsets {
                    invocation.key(zset).arg(member);
                    any = true;
                }
            }
            if !any {
                continue;
            }
            let mut conn = self.conn.clone();
            match invocation.invoke_async::<i64>(&mut conn).await {
                Ok(_) => self.succeeded(),
                Err(error) => {
                    self.failed(StateOp::Renew, &error);
                }
            }
        }
    }

    /// Whether Redis answers a PING within a second (an answer also ends an outage).
    pub(crate) async fn ping(self: &Arc<Self>) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut conn);
        match tokio::time::timeout(Duration::from_secs(1), ping).await {
            Ok(Ok(_)) => {
                self.succeeded();
                Ok(())
            }
            Ok(Err(error)) => Err(RedisError::Command(error)),
            Err(_) => Err(RedisError::NoAnswer),
        }
    }

    /// Stops renewing `member`.
    fn unregister(&self, member: &str) {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(member);
    }

    /// Gives back what `member` holds, in the background. Outside a runtime (process exit), or
    /// when the call fails, the lease expires by itself within `state.lease`.
    fn release(self: &Arc<Self>, member: String, leased: Leased) {
        self.unregister(&member);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let state = self.clone();
        runtime.spawn(async move {
            let result = match leased {
                Leased::Slot { zset } => {
                    let mut conn = state.conn.clone();
                    redis::cmd("ZREM")
                        .arg(&zset)
                        .arg(&member)
                        .query_async::<i64>(&mut conn)
                        .await
                        .map(drop)
                }
                Leased::Tokens { name, windows } => state
                    .invoke_settle(&name, windows.into_iter(), &member, 0)
                    .await
                    .map(drop),
            };
            if result.is_err() {
                state.metrics.state_error(StateOp::Release);
            }
        });
    }
}

/// What the admission script's reply means; `lease` is kept only by an admitted request.
fn admit_reply(reply: &[i64], lease: Option<Lease>) -> Admit {
    let micros =
        |v: Option<&i64>| Duration::from_micros(v.copied().unwrap_or(0).max(0).unsigned_abs());
    match reply.first() {
        Some(0) => {
            let rate = match reply.get(1) {
                Some(&remaining) if remaining >= 0 => Some((
                    u32::try_from(remaining).unwrap_or(u32::MAX),
                    micros(reply.get(2)),
                )),
                _ => None,
            };
            Admit::Admitted { lease, rate }
        }
        refused => {
            // Refused: the script took nothing.
            if let Some(lease) = lease {
                lease.forget();
            }
            match refused {
                Some(1) => Admit::ConcurrencyFull,
                _ => Admit::RateLimited {
                    wait: micros(reply.get(1)),
                },
            }
        }
    }
}

/// What the reservation script's reply means; `lease` is kept only by a reservation made.
fn reserve_reply(
    reply: &[i64],
    name: &Arc<str>,
    quotas: &[Quota],
    amount: u64,
    lease: Lease,
) -> Result<Reserved, QuotaDenied> {
    let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
    if reply.first() == Some(&0) {
        lease.forget();
        let window = quotas
            .get(usize::try_from(at(1)).unwrap_or(1).saturating_sub(1))
            .copied()
            .unwrap_or(quotas[0]);
        return Err(QuotaDenied {
            per: window.per,
            limit: window.tokens,
            used: at(2),
            needed: amount,
            retry_after: Duration::from_secs(at(3)),
        });
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
            reserved: None,
            remaining: quota.tokens.saturating_sub(used),
            reset_after: Duration::from_secs(reset),
        });
    }
    let reservation = Reservation {
        key: name.clone(),
        windows,
        amount,
    };
    Ok(Reserved {
        reservation,
        lease,
        status,
    })
}

/// Something this replica holds in Redis: a concurrency slot, or a reservation's tokens in each
/// of its windows. Renewed every third of `state.lease` while held; given back (in the
/// background) when dropped or settled, and by Redis itself once nobody renews it — a replica
/// killed mid-request leaves nothing behind for longer than `state.lease`.
///
/// A lease exists from *before* the round trip that takes it, so that a request dropped while
/// Redis has not answered yet (its client left) still gives back whatever that round trip took:
/// the release goes out on the same connection after the call, and takes nothing if the call
/// took nothing.
pub struct Lease {
    state: Arc<RedisState>,
    member: String,
    /// `None` once nothing is left to give back.
    held: Option<Leased>,
}

enum Leased {
    Slot { zset: String },
    Tokens { name: Arc<str>, windows: Vec<u64> },
}

impl Lease {
    fn new(state: &Arc<RedisState>, member: String, leased: Leased) -> Lease {
        let zsets = match &leased {
            Leased::Slot { zset } => vec![zset.clone()],
            Leased::Tokens { name, windows } => windows
                .iter()
                .map(|per_secs| state.reservations_key(name, *per_secs))
                .collect(),
        };
        state
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(member.clone(), zsets);
        Lease {
            state: state.clone(),
            member,
            held: Some(leased),
        }
    }

    /// The call took nothing (refused, or never sent): nothing to give back.
    fn forget(mut self) {
        self.held = None;
        self.state.unregister(&self.member);
    }

    /// Hands the reservation over to its settlement, which gives its tokens back along with the
    /// usage: the lease id to settle.
    pub fn into_settled(mut self) -> String {
        self.held = None;
        self.state.unregister(&self.member);
        std::mem::take(&mut self.member)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(leased) = self.held.take() {
            self.state.release(std::mem::take(&mut self.member), leased);
        }
    }
}
