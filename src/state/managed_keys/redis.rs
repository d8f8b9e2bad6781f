//! `redis` state: the managed keys in Redis, shared by every replica.
//!
//! Keys (under `state.prefix`): `{prefix}managed_keys`, a hash of name → record (JSON: name,
//! fields, hashes, times — never a token); `{prefix}managed_keys:version`, the number of the
//! last change. Every change is one script — compare the record with what the caller read, write
//! or delete it, count the change, publish `"<number> <name>"` on `{prefix}managed_keys:changed`
//! — so a change and its notification are never apart. A replica follows the notifications and
//! also reads the number every second ([`crate::keys::follow`]): a notification missed (a
//! replica that was not subscribed at that moment) shows as a number it has not seen, and it
//! reads every record again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use redis::Script;

use super::{Snapshot, Stored, VaultError};
use crate::observability::labels::StateOp;
use crate::state::redis::RedisState;

/// KEYS[1] the hash, KEYS[2] the counter; ARGV: name, the record expected ('' for none), the new
/// record ('' to delete), the channel. Returns the change's number, or -1 when the record is not
/// the one expected.
const SWAP: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then current = '' end
if current ~= ARGV[2] then return -1 end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[4], version .. ' ' .. ARGV[1])
return version
";

/// Puts back records a Redis that lost its data (restarted without persistence, flushed) no
/// longer has: KEYS[1] the hash, KEYS[2] the counter; ARGV[1] the number the caller had seen,
/// then name and record pairs. A record written since is kept. The counter moves past both
/// numbers, so that every replica reads the whole hash again. Returns the new number.
const RESEED: &str = r"
for i = 2, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
local version = tonumber(redis.call('GET', KEYS[2]) or '0')
local seen = tonumber(ARGV[1])
if version < seen then version = seen end
version = version + 1
redis.call('SET', KEYS[2], version)
return version
";

/// How long a subscription may take to set up before the follower tries again later.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct RedisKeys {
    state: Arc<RedisState>,
    hash: String,
    counter: String,
    channel: String,
    swap: Script,
    reseed: Script,
}

impl RedisKeys {
    pub(crate) fn new(state: Arc<RedisState>) -> RedisKeys {
        let prefix = &state.prefix;
        RedisKeys {
            hash: format!("{prefix}managed_keys"),
            counter: format!("{prefix}managed_keys:version"),
            channel: format!("{prefix}managed_keys:changed"),
            swap: Script::new(SWAP),
            reseed: Script::new(RESEED),
            state,
        }
    }

    fn failed(&self, error: &redis::RedisError) -> VaultError {
        VaultError::Unavailable(self.state.failed(StateOp::ManagedKeys, error).0)
    }

    /// Every record and the number of the last change, read together.
    pub(crate) async fn load(&self) -> Result<Snapshot, VaultError> {
        let mut conn = self.state.conn.clone();
        let (records, version): (HashMap<String, String>, Option<u64>) = redis::pipe()
            .atomic()
            .hgetall(&self.hash)
            .get(&self.counter)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(&e))?;
        self.state.succeeded();
        let keys = records
            .into_iter()
            .filter_map(|(name, raw)| parse(&name, raw))
            .collect();
        Ok(Snapshot {
            keys,
            version: version.unwrap_or(0),
        })
    }

    pub(crate) async fn get(&self, name: &str) -> Result<Option<Stored>, VaultError> {
        let mut conn = self.state.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(&self.hash)
            .arg(name)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(&e))?;
        self.state.succeeded();
        Ok(raw.and_then(|raw| parse(name, raw)))
    }

    /// The number of the last change.
    pub(crate) async fn version(&self) -> Result<u64, VaultError> {
        let mut conn = self.state.conn.clone();
        let version: Option<u64> = redis::cmd("GET")
            .arg(&self.counter)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.failed(&e))?;
        self.state.succeeded();
        Ok(version.unwrap_or(0))
    }

    /// See [`super::Vault::swap`].
    pub(crate) async fn swap(
        &self,
        name: &str,
        expected: Option<&str>,
        new: Option<&Stored>,
    ) -> Result<u64, VaultError> {
        let mut invocation = self.swap.prepare_invoke();
        invocation
            .key(&self.hash)
            .key(&self.counter)
            .arg(name)
            .arg(expected.unwrap_or(""))
            .arg(new.map_or("", |stored| stored.raw.as_str()))
            .arg(&self.channel);
        let mut conn = self.state.conn.clone();
        let version: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(&e))?;
        self.state.succeeded();
        u64::try_from(version).map_err(|_| VaultError::Changed)
    }

    /// Writes back `keys`, known to this replica up to change `seen`, where Redis has lost them.
    pub(crate) async fn reseed(&self, seen: u64, keys: &[Stored]) -> Result<u64, VaultError> {
        let mut invocation = self.reseed.prepare_invoke();
        invocation.key(&self.hash).key(&self.counter).arg(seen);
        for stored in keys {
            invocation.arg(&stored.key.name).arg(&stored.raw);
        }
        let mut conn = self.state.conn.clone();
        let version: u64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.failed(&e))?;
        self.state.succeeded();
        Ok(version)
    }

    /// The change notifications, `(number, name)`, from now until the subscription's
    /// connection ends.
    pub(crate) async fn subscribe(
        &self,
    ) -> Result<impl Stream<Item = (u64, String)> + Send + 'static, VaultError> {
        let subscribe = async {
            let mut pubsub = self.state.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe).await {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => return Err(self.failed(&error)),
            Err(_) => return Err(VaultError::Unavailable("subscribe timed out".into())),
        };
        Ok(pubsub.into_on_message().filter_map(|message| async move {
            let payload: String = message.get_payload().ok()?;
            let (version, name) = payload.split_once(' ')?;
            Some((version.parse().ok()?, name.to_owned()))
        }))
    }
}

/// A record read back; one that is not a record (written by something else) is logged and
/// skipped.
fn parse(name: &str, raw: String) -> Option<Stored> {
    match Stored::parse(raw) {
        Ok(stored) if stored.key.name == name => Some(stored),
        Ok(_) => {
            tracing::error!(key = name, "managed key record holds another name; skipped");
            None
        }
        Err(error) => {
            tracing::error!(key = name, %error, "managed key record is not readable; skipped");
            None
        }
    }
}
