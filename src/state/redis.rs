//! Limits and token windows shared by replicas through Redis, changed only by Lua scripts, so
//! that N replicas enforce exactly one limit.
//!
//! Keys (all under `state.prefix`, none holding a secret — key *names*, never tokens):
//! - `{prefix}rate:{name}` — the GCRA theoretical arrival time (µs, Redis clock); expires when idle.
//! - `{prefix}inflight:{name}` — a sorted set of leases, scored by their expiry (ms). A lease is
//!   renewed while its request runs; a replica that dies stops renewing, and its slots come back
//!   within `state.lease`.
//! - `{prefix}quota:{name}:{window}` — a hash `{start, used, reserved}` per token window of a key
//!   (`window`: its length in seconds, `week` or `month`); expires two windows after its last use.
//!   A key's cost windows are `{prefix}cost:{name}:{window}` (nano-units of currency), a group's
//!   `{prefix}group-quota:{group}:{window}` and `{prefix}group-cost:{group}:{window}`.
//! - `{prefix}reservations:{name}:{window}` (and `cost-reservations:`, `group-reservations:`,
//!   `group-cost-reservations:`) — the reservations counted in that window's `reserved`, a sorted
//!   set of leases as above (members `<id>:<amount>`); expires with the hash.
//! - `{prefix}group-inflight:{group}`, `{prefix}group-rate:{group}` — a group's slots and rate,
//!   taken in the same script as its key's, both or neither.
//!   Each script that reads a window first gives back the reservations whose lease ended, so a
//!   replica killed mid-request holds its requests' tokens for at most `state.lease`, not until
//!   the window ends.
//!
//! Every script reads the time from Redis (`TIME`), so replicas with skewed clocks agree; the
//! windows' bounds (weeks and calendar months too) are computed in the script from that time
//! ([`super::window::LUA_BOUNDS`]). A request's reservation covers all the windows of its key and
//! of its group, tokens and cost, in one script: all of them or none.
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

use super::window::LUA_BOUNDS;
use super::{Amounts, QuotaDenied, Reservation, Scope, Window, WindowId, WindowStatus};
use crate::config::{OnError, RateLimit, RedisConfig, Unit};
use crate::keys::KeyEntry;
use crate::observability::labels::StateOp;
use crate::observability::metrics::Metrics;

/// Concurrency and rate of a key and of its group in one call: each scope `j` (1 the key, 2 its
/// group) has KEYS[2j-1] (its slots) and KEYS[2j] (its GCRA cell), and ARGV[3j] (concurrency, 0
/// for none), ARGV[3j+1] (the rate's period in µs, 0 for none), ARGV[3j+2] (its burst); ARGV[1]
/// is the lease in ms and ARGV[2] the slot's member. Nothing is taken unless every limit admits.
/// Returns `{0, remaining, reset_us}` when admitted (the key's rate; remaining is -1 when the key
/// has none), `{1, j}` when scope j has no free slot, `{2, wait_us, j}` when its rate refuses.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease_ms, member = tonumber(ARGV[1]), ARGV[2]
local n = #KEYS / 2
for j = 1, n do
  local limit = tonumber(ARGV[3 * j])
  if limit > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * j - 1], '-inf', now_ms)
    if redis.call('ZCARD', KEYS[2 * j - 1]) >= limit then
      return {1, j}
    end
  end
end
local tats = {}
local remaining, reset_us = -1, 0
for j = 1, n do
  local period = tonumber(ARGV[3 * j + 1])
  if period > 0 then
    local burst = tonumber(ARGV[3 * j + 2])
    local tau = (burst - 1) * period
    local tat = tonumber(redis.call('GET', KEYS[2 * j]) or '0')
    if tat < now_us then tat = now_us end
    if tat - now_us > tau then
      return {2, tat - now_us - tau, j}
    end
    tats[j] = tat + period
    if j == 1 then
      remaining = math.floor((burst * period - (tats[j] - now_us)) / period)
      if remaining < 0 then remaining = 0 end
      reset_us = tats[j] - now_us
    end
  end
end
for j = 1, n do
  if tats[j] then
    redis.call('SET', KEYS[2 * j], string.format('%.0f', tats[j]), 'PX', math.ceil((tats[j] - now_us) / 1000) + 1000)
  end
  if tonumber(ARGV[3 * j]) > 0 then
    redis.call('ZADD', KEYS[2 * j - 1], now_ms + lease_ms, member)
    redis.call('PEXPIRE', KEYS[2 * j - 1], lease_ms * 2)
  end
end
return {0, remaining, reset_us}
";

/// Functions the window scripts share. A window is a hash `{start, used, reserved}` and a
/// sorted set of the reservations in it, members `<id>:<amount>` scored by lease expiry (ms).
/// Invariant: a member in the set is counted in the hash's `reserved` for its current `start`
/// (a window that starts again empties both together), so a member removed exactly once gives its
/// amount back exactly once, whoever removes it — its settlement, its release, or its expiry.
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
local function keep(hash, leases, length)
  redis.call('EXPIRE', hash, length * 2 + 60)
  redis.call('EXPIRE', leases, length * 2 + 60)
end
local t = redis.call('TIME')
local now = tonumber(t[1])
local now_ms = now * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS / 2
";

/// Reserves in every window (KEYS[i] and its leases KEYS[n+i]; ARGV[3i] its id — seconds, `week`
/// or `month` —, ARGV[3i+1] its limit, ARGV[3i+2] the amount to reserve in it, as member
/// `ARGV[1]:<amount>` under a lease of ARGV[2] ms) or in none. Returns `{0, i, used, reset,
/// length}` for the window that refuses (the one resetting last), or `{1, start_1, used_1,
/// reset_1, length_1, …}`.
const RESERVE: &str = r"
local base, lease_ms = ARGV[1], tonumber(ARGV[2])
local starts, ends, current, taken = {}, {}, {}, {}
local denied, denied_reset, denied_used = 0, -1, 0
for i = 1, n do
  local per, limit, amount = ARGV[3 * i], tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  local start, finish = bounds(per, now)
  local used = 0
  current[i] = tonumber(redis.call('HGET', KEYS[i], 'start') or '-1') == start
  if current[i] then
    expire(KEYS[i], KEYS[n + i], now_ms)
    local h = redis.call('HMGET', KEYS[i], 'used', 'reserved')
    used = tonumber(h[1] or '0') + tonumber(h[2] or '0')
  end
  starts[i], ends[i], taken[i] = start, finish, used
  if used + amount > limit and finish - now > denied_reset then
    denied, denied_reset, denied_used = i, finish - now, used
  end
end
if denied > 0 then
  return {0, denied, denied_used, denied_reset, ends[denied] - starts[denied]}
end
local out = {1}
for i = 1, n do
  local amount = tonumber(ARGV[3 * i + 2])
  if not current[i] then restart(KEYS[i], KEYS[n + i], starts[i]) end
  redis.call('HINCRBY', KEYS[i], 'reserved', amount)
  redis.call('ZADD', KEYS[n + i], now_ms + lease_ms, base .. ':' .. amount)
  keep(KEYS[i], KEYS[n + i], ends[i] - starts[i])
  table.insert(out, starts[i])
  table.insert(out, taken[i] + amount)
  table.insert(out, ends[i] - now)
  table.insert(out, ends[i] - starts[i])
end
return out
";

/// Gives back the reservation `ARGV[1]:<ARGV[3i]>` (none when ARGV[1] is empty) in every window
/// (KEYS[i] and its leases KEYS[n+i], id ARGV[3i-1]) if it is still held, and adds ARGV[3i+1]
/// used to the window current now. Returns `{used_1, reset_1, …}`.
const SETTLE: &str = r"
local base = ARGV[1]
local out = {}
for i = 1, n do
  local hash, leases = KEYS[i], KEYS[n + i]
  local per, held, used = ARGV[3 * i - 1], ARGV[3 * i], tonumber(ARGV[3 * i + 1])
  local start, finish = bounds(per, now)
  if base ~= '' and redis.call('ZREM', leases, base .. ':' .. held) == 1 then
    give_back(hash, tonumber(held))
  end
  if tonumber(redis.call('HGET', hash, 'start') or '-1') == start then
    expire(hash, leases, now_ms)
  else
    restart(hash, leases, start)
  end
  local total = redis.call('HINCRBY', hash, 'used', used)
  keep(hash, leases, finish - start)
  local reserved = tonumber(redis.call('HGET', hash, 'reserved') or '0')
  table.insert(out, total + reserved)
  table.insert(out, finish - now)
end
return out
";

/// The current window of each KEYS[i] (leases KEYS[n+i], id ARGV[i]):
/// `{used + reserved, reserved, start, end, …}`; and the time, last.
const STATUS: &str = r"
local out = {}
for i = 1, n do
  local start, finish = bounds(ARGV[i], now)
  local used, reserved = 0, 0
  if tonumber(redis.call('HGET', KEYS[i], 'start') or '-1') == start then
    expire(KEYS[i], KEYS[n + i], now_ms)
    local h = redis.call('HMGET', KEYS[i], 'used', 'reserved')
    reserved = tonumber(h[2] or '0')
    used = tonumber(h[1] or '0') + reserved
  end
  table.insert(out, used)
  table.insert(out, reserved)
  table.insert(out, start)
  table.insert(out, finish)
end
table.insert(out, now)
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
    /// Admitted, holding `lease` when the key or its group has a concurrency limit; `rate` is
    /// `(remaining, reset)` when the key has a rate.
    Admitted {
        lease: Option<Lease>,
        rate: Option<(u32, Duration)>,
    },
    ConcurrencyFull {
        scope: Scope,
    },
    RateLimited {
        wait: Duration,
        scope: Scope,
    },
}

/// A reservation made in Redis: what to settle, the lease that holds it, each window's status.
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
    /// Leases held now, renewed until released: lease id → each sorted set it is in, with its
    /// member there.
    leases: Mutex<HashMap<String, Vec<(String, String)>>>,
    /// Whether the last call failed, to log an outage once at each end.
    down: AtomicBool,
    /// Usage charged while Redis was away, per window and window start.
    pending: Mutex<HashMap<(WindowId, u64), u64>>,
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
        let window_script =
            |body: &str| Script::new(&format!("{LUA_BOUNDS}{WINDOW_FUNCTIONS}{body}"));
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

    fn inflight_key(&self, scope: Scope, name: &str) -> String {
        match scope {
            Scope::Key => format!("{}inflight:{name}", self.prefix),
            Scope::Group => format!("{}group-inflight:{name}", self.prefix),
        }
    }

    fn rate_key(&self, scope: Scope, name: &str) -> String {
        match scope {
            Scope::Key => format!("{}rate:{name}", self.prefix),
            Scope::Group => format!("{}group-rate:{name}", self.prefix),
        }
    }

    /// A window's hash and the sorted set of the reservations held in it.
    fn window_keys(&self, id: &WindowId) -> (String, String) {
        let (hash, leases) = match (id.scope, id.unit) {
            (Scope::Key, Unit::Tokens) => ("quota", "reservations"),
            (Scope::Key, Unit::Cost) => ("cost", "cost-reservations"),
            (Scope::Group, Unit::Tokens) => ("group-quota", "group-reservations"),
            (Scope::Group, Unit::Cost) => ("group-cost", "group-cost-reservations"),
        };
        let (prefix, name, per) = (&self.prefix, &id.name, id.per.id());
        (
            format!("{prefix}{hash}:{name}:{per}"),
            format!("{prefix}{leases}:{name}:{per}"),
        )
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

    /// Takes a concurrency slot and a rate cell for `key` and for its group, in one round trip:
    /// both or neither.
    pub(crate) async fn admit(self: &Arc<Self>, key: &KeyEntry) -> Result<Admit, Unavailable> {
        let member = self.next_member();
        let mut invocation = self.admit.prepare_invoke();
        invocation.arg(self.lease_ms()).arg(&member);
        let mut scopes = vec![(
            Scope::Key,
            &key.name,
            key.limits.concurrency,
            key.limits.rate,
        )];
        if let Some(group) = &key.group {
            scopes.push((
                Scope::Group,
                &group.name,
                group.config.concurrency,
                group.config.rate,
            ));
        }
        let mut zsets = Vec::new();
        for (scope, name, concurrency, rate) in scopes {
            let (period_us, burst) = rate.map_or((0, 0), |r: RateLimit| {
                let period = r.per / r.requests.get();
                (
                    u64::try_from(period.as_micros()).unwrap_or(u64::MAX).max(1),
                    r.burst.get(),
                )
            });
            let zset = self.inflight_key(scope, name);
            invocation
                .key(&zset)
                .key(self.rate_key(scope, name))
                .arg(concurrency.map_or(0, |c| c.get()))
                .arg(period_us)
                .arg(burst);
            if concurrency.is_some() {
                zsets.push(zset);
            }
        }
        // Held from before the call: dropped with the request, it gives back what the call took.
        let lease = (!zsets.is_empty()).then(|| Lease::new(self, member, Leased::Slot { zsets }));
        let mut conn = self.conn.clone();
        let reply = match invocation.invoke_async::<Vec<i64>>(&mut conn).await {
            Ok(reply) => reply,
            Err(error) => return Err(self.unanswered(StateOp::Admit, &error, lease)),
        };
        self.succeeded();
        Ok(admit_reply(&reply, lease))
    }

    /// Reserves `need` in every window of `windows` (each in its unit), in one round trip: all of
    /// them or none.
    pub async fn reserve(
        self: &Arc<Self>,
        windows: &[Window],
        need: Amounts,
    ) -> Result<Result<Reserved, QuotaDenied>, Unavailable> {
        let base = self.next_member();
        let mut invocation = self.reserve.prepare_invoke();
        let keys: Vec<(String, String)> = windows.iter().map(|w| self.window_keys(&w.id)).collect();
        for (hash, _) in &keys {
            invocation.key(hash);
        }
        for (_, leases) in &keys {
            invocation.key(leases);
        }
        invocation.arg(&base).arg(self.lease_ms());
        for window in windows {
            invocation
                .arg(window.id.per.id())
                .arg(window.limit)
                .arg(need.of(window.id.unit));
        }
        // Held from before the call: dropped with the request, it gives back what the call took.
        let held = windows
            .iter()
            .map(|w| (w.id.clone(), need.of(w.id.unit)))
            .collect();
        let lease = Lease::new(self, base, Leased::Windows(held));
        let mut conn = self.conn.clone();
        let reply = match invocation.invoke_async::<Vec<i64>>(&mut conn).await {
            Ok(reply) => reply,
            Err(error) => return Err(self.unanswered(StateOp::Reserve, &error, Some(lease))),
        };
        self.succeeded();
        Ok(reserve_reply(&reply, windows, need, lease))
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

    /// Settles a reservation to what was `used`, giving back what lease `base` still holds
    /// (nothing for usage charged while Redis was away). On failure the usage is kept and
    /// applied later; the reservation, renewed no more, ends with its lease.
    pub async fn settle(
        self: &Arc<Self>,
        reservation: &Reservation,
        base: Option<&str>,
        used: Amounts,
    ) -> Result<Vec<u64>, Unavailable> {
        let windows: Vec<(&WindowId, u64, u64)> = reservation
            .windows
            .iter()
            .map(|(id, _)| (id, reservation.amounts.of(id.unit), used.of(id.unit)))
            .collect();
        match self.invoke_settle(&windows, base.unwrap_or("")).await {
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

    /// SETTLE over `(window, amount held, amount used)`.
    async fn invoke_settle(
        &self,
        windows: &[(&WindowId, u64, u64)],
        base: &str,
    ) -> redis::RedisResult<Vec<i64>> {
        let mut invocation = self.settle.prepare_invoke();
        let keys: Vec<(String, String)> = windows
            .iter()
            .map(|(id, _, _)| self.window_keys(id))
            .collect();
        for (hash, _) in &keys {
            invocation.key(hash);
        }
        for (_, leases) in &keys {
            invocation.key(leases);
        }
        invocation.arg(base);
        for (id, held, used) in windows {
            invocation.arg(id.per.id()).arg(*held).arg(*used);
        }
        let mut conn = self.conn.clone();
        invocation.invoke_async(&mut conn).await
    }

    /// Used (settled + reserved) and time to reset of each of `windows`, now.
    pub(crate) async fn status(
        self: &Arc<Self>,
        windows: &[Window],
    ) -> Result<Vec<WindowStatus>, Unavailable> {
        let mut invocation = self.status.prepare_invoke();
        let keys: Vec<(String, String)> = windows.iter().map(|w| self.window_keys(&w.id)).collect();
        for ((hash, _), window) in keys.iter().zip(windows) {
            invocation.key(hash).arg(window.id.per.id());
        }
        for (_, leases) in &keys {
            invocation.key(leases);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(StateOp::Status, &e))?;
        self.succeeded();
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
        let now = at(4 * windows.len());
        Ok(windows
            .iter()
            .enumerate()
            .map(|(i, window)| {
                let bounds = (at(4 * i + 2), at(4 * i + 3));
                WindowStatus::new(window, at(4 * i), Some(at(4 * i + 1)), bounds, now)
            })
            .collect())
    }

    /// Remembers usage to apply when Redis returns.
    pub(crate) fn keep_pending(&self, reservation: &Reservation, used: Amounts) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, start) in &reservation.windows {
            let amount = used.of(id.unit);
            if amount > 0 {
                *pending.entry((id.clone(), *start)).or_default() += amount;
            }
        }
    }

    /// Applies usage charged during an outage, to windows that are still current.
    async fn apply_pending(self: Arc<Self>) {
        let drained: Vec<((WindowId, u64), u64)> = self
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
        for ((id, start), used) in drained {
            let (current, _) = super::window::bounds(id.per, now);
            if start != current {
                expired += used;
                continue;
            }
            let windows = [(&id, 0, used)];
            match self.invoke_settle(&windows, "").await {
                Ok(_) => applied += used,
                Err(error) => {
                    self.failed(StateOp::Settle, &error);
                }
            }
        }
        tracing::info!(
            applied,
            dropped_for_ended_windows = expired,
            "usage charged during the state outage applied (tokens and nano-units of cost)"
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
            for held in self
                .leases
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
            {
                for (zset, member) in held {
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

    /// Gives back what lease `base` holds, in the background. Outside a runtime (process exit),
    /// or when the call fails, the lease expires by itself within `state.lease`.
    fn release(self: &Arc<Self>, base: String, leased: Leased) {
        self.unregister(&base);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let state = self.clone();
        runtime.spawn(async move {
            let result = match leased {
                Leased::Slot { zsets } => {
                    let mut pipe = redis::pipe();
                    for zset in &zsets {
                        pipe.cmd("ZREM").arg(zset).arg(&base).ignore();
                    }
                    let mut conn = state.conn.clone();
                    pipe.query_async::<()>(&mut conn).await
                }
                Leased::Windows(windows) => {
                    let windows: Vec<(&WindowId, u64, u64)> =
                        windows.iter().map(|(id, held)| (id, *held, 0)).collect();
                    state.invoke_settle(&windows, &base).await.map(drop)
                }
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
    let scope = |v: Option<&i64>| match v {
        Some(2) => Scope::Group,
        _ => Scope::Key,
    };
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
                Some(1) => Admit::ConcurrencyFull {
                    scope: scope(reply.get(1)),
                },
                _ => Admit::RateLimited {
                    wait: micros(reply.get(1)),
                    scope: scope(reply.get(2)),
                },
            }
        }
    }
}

/// What the reservation script's reply means; `lease` is kept only by a reservation made.
fn reserve_reply(
    reply: &[i64],
    windows: &[Window],
    need: Amounts,
    lease: Lease,
) -> Result<Reserved, QuotaDenied> {
    let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0).unsigned_abs();
    let secs = |i: usize| Duration::from_secs(at(i));
    if reply.first() == Some(&0) {
        lease.forget();
        let index = usize::try_from(at(1)).unwrap_or(1).saturating_sub(1);
        let window = windows.get(index).or(windows.first());
        let Some(window) = window else {
            return Err(QuotaDenied {
                id: WindowId {
                    scope: Scope::Key,
                    name: Arc::from(""),
                    unit: Unit::Tokens,
                    per: crate::config::Period::Month,
                },
                limit: 0,
                used: 0,
                needed: 0,
                retry_after: Duration::ZERO,
                length: Duration::ZERO,
            });
        };
        return Err(QuotaDenied {
            id: window.id.clone(),
            limit: window.limit,
            used: at(2),
            needed: need.of(window.id.unit),
            retry_after: secs(3),
            length: secs(4),
        });
    }
    let mut starts = Vec::with_capacity(windows.len());
    let mut status = Vec::with_capacity(windows.len());
    for (i, window) in windows.iter().enumerate() {
        let (start, used) = (at(1 + 4 * i), at(2 + 4 * i));
        let (reset, length) = (at(3 + 4 * i), at(4 + 4 * i));
        starts.push((window.id.clone(), start));
        status.push(WindowStatus {
            scope: window.id.scope,
            unit: window.id.unit,
            per: window.id.per,
            limit: window.limit,
            used,
            reserved: None,
            remaining: window.limit.saturating_sub(used),
            reset_after: Duration::from_secs(reset),
            length: Duration::from_secs(length),
        });
    }
    let reservation = Reservation {
        windows: starts,
        amounts: need,
    };
    Ok(Reserved {
        reservation,
        lease,
        status,
    })
}

/// Something this replica holds in Redis: a concurrency slot (its key's and its group's), or a
/// reservation in each of its windows. Renewed every third of `state.lease` while held; given
/// back (in the background) when dropped or settled, and by Redis itself once nobody renews it —
/// a replica killed mid-request leaves nothing behind for longer than `state.lease`.
///
/// A lease exists from *before* the round trip that takes it, so that a request dropped while
/// Redis has not answered yet (its client left) still gives back whatever that round trip took:
/// the release goes out on the same connection after the call, and takes nothing if the call
/// took nothing.
pub struct Lease {
    state: Arc<RedisState>,
    /// The lease id: a slot's member, a reservation's members' prefix (`<id>:<amount>`).
    base: String,
    /// `None` once nothing is left to give back.
    held: Option<Leased>,
}

enum Leased {
    /// Slots in these sorted sets.
    Slot { zsets: Vec<String> },
    /// Each window reserved in, with the amount held there.
    Windows(Vec<(WindowId, u64)>),
}

impl Lease {
    fn new(state: &Arc<RedisState>, base: String, leased: Leased) -> Lease {
        let members = match &leased {
            Leased::Slot { zsets } => zsets.iter().map(|z| (z.clone(), base.clone())).collect(),
            Leased::Windows(windows) => windows
                .iter()
                .map(|(id, amount)| (state.window_keys(id).1, format!("{base}:{amount}")))
                .collect(),
        };
        state
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(base.clone(), members);
        Lease {
            state: state.clone(),
            base,
            held: Some(leased),
        }
    }

    /// The call took nothing (refused, or never sent): nothing to give back.
    fn forget(mut self) {
        self.held = None;
        self.state.unregister(&self.base);
    }

    /// Hands the reservation over to its settlement, which gives it back along with the usage:
    /// the lease id to settle.
    pub fn into_settled(mut self) -> String {
        self.held = None;
        self.state.unregister(&self.base);
        std::mem::take(&mut self.base)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(leased) = self.held.take() {
            self.state.release(std::mem::take(&mut self.base), leased);
        }
    }
}
