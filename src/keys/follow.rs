//! Following the managed keys that other replicas change (`redis` state): each change's
//! notification is applied as it comes (one read of that key), and every [`RESYNC_INTERVAL`]
//! the store's change number is compared with this table's; a difference — a notification
//! missed while the subscription was down, or one applied out of order — reads every record
//! again. So a change reaches every replica within about a second even when its notification
//! is lost.
//!
//! While Redis is unreachable the table stays as it is: replicas keep the keys they know, and
//! limits follow `state.on_error` as ever. A Redis that comes back without the keys (restarted
//! without persistence, flushed: its change number is behind this replica's) gets back the
//! records this replica knows — a key written meanwhile is kept — and the outage is logged.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use super::registry::KeyRegistry;
use crate::state::managed_keys::redis::RedisKeys;

/// How often the store's change number is compared with this table's.
pub(crate) const RESYNC_INTERVAL: Duration = Duration::from_secs(1);

type Notifications = Pin<Box<dyn Stream<Item = (u64, String)> + Send>>;

/// Runs until the process ends (nothing to do for the `local` state).
pub(crate) async fn run(registry: Arc<KeyRegistry>) {
    let Some(redis) = registry.vault.shared() else {
        return;
    };
    let mut ticker = tokio::time::interval(RESYNC_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut notifications: Option<Notifications> = None;
    loop {
        let next = async {
            match notifications.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            notice = next => match notice {
                Some((version, name)) => on_notice(&registry, redis, version, &name).await,
                // The subscription's connection ended: subscribe again at the next tick.
                None => notifications = None,
            },
            _ = ticker.tick() => {
                if notifications.is_none() {
                    notifications = redis.subscribe().await.ok().map(|s| Box::pin(s) as Notifications);
                }
                resync(&registry, redis).await;
            }
        }
    }
}

/// Change `version` of `name`: read that key and apply it, unless this table has it already.
async fn on_notice(registry: &KeyRegistry, redis: &RedisKeys, version: u64, name: &str) {
    if version <= registry.version() {
        return;
    }
    if let Ok(stored) = redis.get(name).await {
        registry.apply(version, name, stored);
    }
}

/// Reads every record again when the store's change number is not this table's.
pub(crate) async fn resync(registry: &KeyRegistry, redis: &RedisKeys) {
    // This table's number first: read after Redis's, a change made here meanwhile would look
    // like a Redis that went back.
    let seen = registry.version();
    let Ok(version) = redis.version().await else {
        return;
    };
    if version == seen {
        return;
    }
    if version < seen {
        let known = registry.known();
        tracing::error!(
            keys = known.len(),
            seen,
            found = version,
            "Redis has lost the managed keys (restarted without persistence, or flushed); writing back the ones this replica knows"
        );
        if redis.reseed(seen, &known).await.is_err() {
            return;
        }
    }
    if let Ok(snapshot) = redis.load().await {
        registry.replace_all(snapshot);
    }
}
