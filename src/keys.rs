//! The live key table: bearer token → the key's name, limits and limiter state.
//!
//! Tokens are looked up by their SHA-256 in a hash map, so the cost of a lookup does not grow with
//! the number of keys, and the table holds no token. On reload a new table is built and swapped in
//! atomically; a key whose name and rate are unchanged keeps its limiter (and so its state), and
//! every key keeps its in-flight count by name, so streams running across a reload are still
//! counted against the new limits. The counts live in a registry that every table hands on to
//! the next and that holds them only weakly: a key removed while its requests still run, then
//! added back, finds the count they hold; a count nothing holds any more is forgotten.
//!
//! Keys come from the config file and from the admin API ([`registry`], which puts both into
//! one table); a token of a key being rotated may carry the Unix second at which it stops
//! working, checked at every lookup so that the grace ends on time without a rebuild.

pub(crate) mod follow;
pub(crate) mod registry;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::ArcSwap;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use prometheus::IntGauge;
use ring::rand::SecureRandom;

use crate::config::{Budgets, GroupConfig, KeyConfig, Limits, Pricing, RateLimit, TOKEN_PREFIX};
use crate::observability::key_series::KeySeries;
use crate::observability::metrics::Metrics;
use crate::state::clock::Clock;
use crate::state::window::{Scope, Window};

/// The SHA-256 of a bearer token.
pub fn hash_token(token: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A new random key: `tg-` and 192 random bits in hex.
pub(crate) fn generate_token() -> Result<String, ring::error::Unspecified> {
    let mut secret = [0u8; 24];
    ring::rand::SystemRandom::new().fill(&mut secret)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(secret)))
}

pub(crate) type Limiter = RateLimiter<NotKeyed, InMemoryState, Clock, StateInformationMiddleware>;

/// Where a key is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum KeyOrigin {
    /// The config file: read-only through the admin API.
    Config,
    /// The admin API (stored where the state lives).
    Api,
}

/// One configured key, as the request layers see it.
pub struct KeyEntry {
    pub name: Arc<str>,
    pub(crate) origin: KeyOrigin,
    pub(crate) limits: Limits,
    /// Present when the key has a rate limit.
    pub(crate) limiter: Option<Arc<Limiter>>,
    pub(crate) inflight: Arc<Inflight>,
    /// The group whose limits it shares.
    pub(crate) group: Option<Arc<GroupEntry>>,
    /// Every window a request of this key reserves in: the key's own, then its group's.
    pub(crate) windows: Vec<Window>,
    /// The key's own windows alone (the first of `windows`).
    own_windows: usize,
    /// The price table of the config this entry was built from.
    pub(crate) pricing: Arc<Pricing>,
    /// Its metric series, looked up once (kept across reloads while its models are unchanged).
    pub(crate) series: Arc<KeySeries>,
    /// Its rate's `RateLimit-Policy` value (`"requests";q=600;w=60`), made by the first answer:
    /// it is on every answer and changes only with the config (a new entry).
    pub(crate) rate_policy: std::sync::OnceLock<Option<http::HeaderValue>>,
}

impl KeyEntry {
    /// The key's own windows, without its group's.
    pub(crate) fn own_windows(&self) -> &[Window] {
        &self.windows[..self.own_windows]
    }
}

/// One group (`[groups.NAME]`): limits its keys share, and their state in this process.
pub struct GroupEntry {
    pub name: Arc<str>,
    pub(crate) config: GroupConfig,
    /// Present when the group has a rate limit.
    pub(crate) limiter: Option<Arc<Limiter>>,
    /// Requests in flight across the group's keys.
    pub(crate) inflight: Arc<Inflight>,
    /// Its keys' names, sorted.
    pub(crate) members: Vec<Arc<str>>,
    pub(crate) windows: Vec<Window>,
}

/// The table the auth layer reads; replaced whole on reload.
pub struct KeyStore {
    by_hash: HashMap<[u8; 32], Token>,
    by_name: HashMap<Arc<str>, Arc<KeyEntry>>,
    groups: HashMap<Arc<str>, Arc<GroupEntry>>,
    inflight: Arc<InflightRegistry>,
    /// The groups' in-flight counts, carried over like the keys'.
    group_inflight: Arc<InflightRegistry>,
    pricing: Arc<Pricing>,
    clock: Clock,
}

/// Every key's in-flight count by name, held weakly: by the tables that have the key, and by the
/// guards of its requests in flight.
#[derive(Default)]
struct InflightRegistry(Mutex<HashMap<Arc<str>, Weak<Inflight>>>);

impl InflightRegistry {
    /// The count of `name`, the one its running requests hold if any do.
    fn get(&self, name: &Arc<str>, gauge: impl FnOnce() -> IntGauge) -> Arc<Inflight> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get(name).and_then(Weak::upgrade) {
            return count;
        }
        let count = Arc::new(Inflight {
            count: AtomicU32::new(0),
            gauge: gauge(),
        });
        counts.insert(name.clone(), Arc::downgrade(&count));
        count
    }

    /// Forgets counts that nothing holds any more (keys removed, their requests over).
    fn prune(&self) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, count| count.strong_count() > 0);
    }
}

pub(crate) type SharedKeys = Arc<ArcSwap<KeyStore>>;

/// One token of a key, by its hash.
struct Token {
    key: Arc<KeyEntry>,
    /// The Unix second from which it is refused (the end of a rotation's grace); `u64::MAX`:
    /// never.
    until: u64,
}

/// A key as a table is built from it: its config, where it is defined, and for each of its
/// hashes (in the order of `config.sha256`) the Unix second it stops working, where it does.
pub(crate) struct KeySpec<'a> {
    pub(crate) config: &'a KeyConfig,
    pub(crate) origin: KeyOrigin,
    /// Empty: every hash works until the key is removed.
    pub(crate) until: &'a [Option<u64>],
}

impl KeyStore {
    /// Builds the table for `keys` (without prices or groups): see [`KeyStore::build_with`].
    pub fn build(
        keys: &[KeyConfig],
        previous: Option<&KeyStore>,
        clock: &Clock,
        metrics: &Metrics,
    ) -> KeyStore {
        KeyStore::build_with(keys, &Budgets::default(), previous, clock, metrics)
    }

    /// Builds the table for the file's `keys` and the groups and prices of `budgets`: see
    /// [`KeyStore::assemble`].
    pub fn build_with(
        keys: &[KeyConfig],
        budgets: &Budgets,
        previous: Option<&KeyStore>,
        clock: &Clock,
        metrics: &Metrics,
    ) -> KeyStore {
        let specs: Vec<KeySpec<'_>> = keys
            .iter()
            .map(|config| KeySpec {
                config,
                origin: KeyOrigin::Config,
                until: &[],
            })
            .collect();
        KeyStore::assemble(&specs, budgets, previous, clock, metrics)
    }

    /// Builds the table for keys of any origin and the groups and prices of `budgets`, carrying
    /// over limiter state from `previous` where a key (or group) of the same name and rate is in
    /// both, and in-flight counts from every earlier table (see the module doc).
    pub(crate) fn assemble(
        keys: &[KeySpec<'_>],
        budgets: &Budgets,
        previous: Option<&KeyStore>,
        clock: &Clock,
        metrics: &Metrics,
    ) -> KeyStore {
        let mut by_hash = HashMap::with_capacity(keys.len());
        let mut by_name = HashMap::with_capacity(keys.len());
        let registry = previous.map_or_else(Arc::default, |store| store.inflight.clone());
        registry.prune();
        let group_registry =
            previous.map_or_else(Arc::default, |store| store.group_inflight.clone());
        group_registry.prune();
        let pricing = Arc::new(budgets.pricing.clone());
        let configs = keys.iter().map(|spec| spec.config);
        let groups = build_groups(configs, budgets, previous, &group_registry, clock, metrics);
        for spec in keys {
            let key = spec.config;
            let old = previous.and_then(|store| store.by_name.get(&key.name));
            let limiter = carried_limiter(
                key.limits.rate,
                old.map(|o| (o.limits.rate, &o.limiter)),
                clock,
            );
            if old.is_none() {
                // A key of the previous table has its series already: a change to one of 10 000
                // managed keys does not look up 10 000 keys' series again.
                metrics.add_key(&key.name);
            }
            let inflight = registry.get(&key.name, || {
                metrics.inflight_requests.with_label_values(&[&*key.name])
            });
            let group = key
                .limits
                .group
                .as_ref()
                .and_then(|name| groups.get(name))
                .cloned();
            let mut windows = Window::of(Scope::Key, &key.name, &key.limits.quotas);
            let own_windows = windows.len();
            if let Some(group) = &group {
                windows.extend(group.windows.iter().cloned());
            }
            let models = key.limits.models.as_deref();
            let series = match old {
                Some(old) if old.series.fits(models) => old.series.clone(),
                _ => Arc::new(KeySeries::new(models)),
            };
            let entry = Arc::new(KeyEntry {
                series,
                rate_policy: std::sync::OnceLock::new(),
                name: key.name.clone(),
                origin: spec.origin,
                limits: key.limits.clone(),
                limiter,
                inflight,
                group,
                windows,
                own_windows,
                pricing: pricing.clone(),
            });
            for (i, digest) in key.sha256.iter().enumerate() {
                let until = spec.until.get(i).copied().flatten().unwrap_or(u64::MAX);
                let token = Token {
                    key: entry.clone(),
                    until,
                };
                by_hash.insert(*digest, token);
            }
            by_name.insert(key.name.clone(), entry);
        }
        KeyStore {
            by_hash,
            by_name,
            groups,
            inflight: registry,
            group_inflight: group_registry,
            pricing,
            clock: clock.clone(),
        }
    }

    /// The group named `name`.
    pub(crate) fn group(&self, name: &str) -> Option<&Arc<GroupEntry>> {
        self.groups.get(name)
    }

    /// Every group.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &Arc<GroupEntry>> {
        self.groups.values()
    }

    /// The price table in force.
    pub(crate) fn pricing(&self) -> &Pricing {
        &self.pricing
    }

    /// Number of distinct keys (by name).
    pub(crate) fn key_count(&self) -> usize {
        self.by_name.len()
    }

    /// The key a bearer token belongs to.
    pub(crate) fn lookup(&self, token: &[u8]) -> Option<&Arc<KeyEntry>> {
        let found = self.by_hash.get(&hash_token(token))?;
        // Only a token in a rotation's grace reads the clock.
        let valid = found.until == u64::MAX || self.clock.unix_secs() < found.until;
        valid.then_some(&found.key)
    }

    pub(crate) fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Key names in this table, for reload summaries.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.by_name.keys()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<KeyEntry>> {
        self.by_name.get(name)
    }

    /// Every key.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &Arc<KeyEntry>> {
        self.by_name.values()
    }
}

/// Each group of `budgets`, with the names of the keys in it.
fn build_groups<'a>(
    keys: impl Iterator<Item = &'a KeyConfig> + Clone,
    budgets: &Budgets,
    previous: Option<&KeyStore>,
    registry: &InflightRegistry,
    clock: &Clock,
    metrics: &Metrics,
) -> HashMap<Arc<str>, Arc<GroupEntry>> {
    let mut groups = HashMap::with_capacity(budgets.groups.len());
    for config in &budgets.groups {
        let old = previous.and_then(|store| store.groups.get(&config.name));
        let limiter = carried_limiter(config.rate, old.map(|o| (o.config.rate, &o.limiter)), clock);
        let mut members: Vec<Arc<str>> = keys
            .clone()
            .filter(|k| k.limits.group.as_ref() == Some(&config.name))
            .map(|k| k.name.clone())
            .collect();
        members.sort();
        let inflight = registry.get(&config.name, || {
            metrics
                .group_inflight_requests
                .with_label_values(&[&*config.name])
        });
        let entry = GroupEntry {
            name: config.name.clone(),
            windows: Window::of(Scope::Group, &config.name, &config.quotas),
            config: config.clone(),
            limiter,
            inflight,
            members,
        };
        groups.insert(config.name.clone(), Arc::new(entry));
    }
    groups
}

/// The limiter for `rate`: the previous one's (and so its state) when the rate is unchanged.
fn carried_limiter(
    rate: Option<RateLimit>,
    old: Option<(Option<RateLimit>, &Option<Arc<Limiter>>)>,
    clock: &Clock,
) -> Option<Arc<Limiter>> {
    match (rate, old) {
        (None, _) => None,
        (Some(rate), Some((old_rate, old_limiter))) if old_rate == Some(rate) => {
            old_limiter.clone()
        }
        (Some(rate), _) => Some(Arc::new(new_limiter(rate, clock))),
    }
}

fn new_limiter(rate: RateLimit, clock: &Clock) -> Limiter {
    // One request's worth of the window replenishes every `per / requests`.
    let period = rate.per / rate.requests.get();
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(rate.burst);
    RateLimiter::direct_with_clock(quota, clock.clone())
        .with_middleware::<StateInformationMiddleware>()
}

/// Requests of one key in flight now: counted from admission until the response's last byte is
/// sent or the client leaves.
pub(crate) struct Inflight {
    count: AtomicU32,
    gauge: IntGauge,
}

impl Inflight {
    /// Admits one more request unless `limit` are already in flight.
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        limit: Option<NonZeroU32>,
    ) -> Option<InflightGuard> {
        let admitted = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| match limit {
                Some(limit) if now >= limit.get() => None,
                _ => now.checked_add(1),
            });
        admitted.ok().map(|_| {
            self.gauge.inc();
            InflightGuard(self.clone())
        })
    }

    pub(crate) fn current(&self) -> u32 {
        self.count.load(Ordering::Acquire)
    }
}

/// Releases its request's in-flight slot when dropped.
pub(crate) struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(name: &str, token: &str, limits: Limits) -> KeyConfig {
        KeyConfig {
            name: Arc::from(name),
            sha256: vec![hash_token(token.as_bytes())],
            limits,
        }
    }

    fn rate(requests: u32, per_secs: u64, burst: u32) -> Limits {
        Limits {
            rate: Some(RateLimit {
                requests: NonZeroU32::new(requests).expect("nonzero"),
                per: Duration::from_secs(per_secs),
                burst: NonZeroU32::new(burst).expect("nonzero"),
            }),
            ..Limits::default()
        }
    }

    #[test]
    fn generated_tokens_are_prefixed_random_and_hashable() {
        let a = generate_token().expect("random");
        let b = generate_token().expect("random");
        assert!(a.starts_with("tg-") && a.len() == 3 + 48, "{a}");
        assert_ne!(a, b, "tokens differ");
        assert_ne!(hash_token(a.as_bytes()), hash_token(b.as_bytes()));
    }

    #[test]
    fn lookup_finds_by_token_only() {
        let metrics = Metrics::new();
        let store = KeyStore::build(
            &[key("a", "tg-a", Limits::default())],
            None,
            &Clock::manual(),
            &metrics,
        );
        assert_eq!(store.lookup(b"tg-a").map(|k| &*k.name), Some("a"));
        assert!(store.lookup(b"tg-b").is_none(), "unknown token");
        assert!(store.lookup(b"a").is_none(), "a name is not a token");
    }

    #[test]
    fn a_token_in_its_grace_works_until_the_second_it_ends() {
        let metrics = Metrics::new();
        let clock = Clock::manual();
        let config = KeyConfig {
            name: Arc::from("a"),
            sha256: vec![hash_token(b"tg-new"), hash_token(b"tg-old")],
            limits: Limits::default(),
        };
        let until = [None, Some(clock.unix_secs() + 2)];
        let spec = KeySpec {
            config: &config,
            origin: KeyOrigin::Api,
            until: &until,
        };
        let store = KeyStore::assemble(&[spec], &Budgets::default(), None, &clock, &metrics);
        assert!(store.lookup(b"tg-old").is_some(), "in its grace");
        clock.advance(Duration::from_secs(1));
        assert!(store.lookup(b"tg-old").is_some(), "still");
        clock.advance(Duration::from_secs(1));
        assert!(store.lookup(b"tg-old").is_none(), "the grace has ended");
        let new = store.lookup(b"tg-new").expect("the new token works on");
        assert_eq!(new.origin, KeyOrigin::Api);
    }

    #[test]
    fn gcra_admits_the_burst_then_the_steady_rate() {
        let metrics = Metrics::new();
        let clock = Clock::manual();
        let store = KeyStore::build(&[key("a", "t", rate(60, 60, 3))], None, &clock, &metrics);
        let limiter = store
            .get("a")
            .and_then(|k| k.limiter.clone())
            .expect("limited");
        for i in 0..3 {
            assert!(limiter.check().is_ok(), "burst request {i} admitted");
        }
        assert!(limiter.check().is_err(), "burst exhausted");
        clock.advance(Duration::from_millis(999));
        assert!(limiter.check().is_err(), "not yet one period later");
        clock.advance(Duration::from_millis(1));
        assert!(limiter.check().is_ok(), "one more after one period (1 s)");
        assert!(limiter.check().is_err(), "and only one");
    }

    #[test]
    fn reload_keeps_state_of_unchanged_keys_and_resets_changed_ones() {
        let metrics = Metrics::new();
        let clock = Clock::manual();
        let first = KeyStore::build(
            &[
                key("a", "ta", rate(1, 60, 1)),
                key("b", "tb", rate(1, 60, 1)),
            ],
            None,
            &clock,
            &metrics,
        );
        for name in ["a", "b"] {
            let limiter = first
                .get(name)
                .and_then(|k| k.limiter.clone())
                .expect("limited");
            assert!(limiter.check().is_ok(), "{name} first request");
        }
        let held = first.get("a").expect("a").inflight.try_acquire(None);
        let second = KeyStore::build(
            &[
                key("a", "ta", rate(1, 60, 1)),
                key("b", "tb", rate(2, 60, 2)),
            ],
            Some(&first),
            &clock,
            &metrics,
        );
        let a = second.get("a").expect("a kept");
        assert!(
            a.limiter.as_ref().expect("limited").check().is_err(),
            "unchanged key keeps its state"
        );
        assert_eq!(a.inflight.current(), 1, "in-flight count carried over");
        drop(held);
        assert_eq!(a.inflight.current(), 0, "released into the same counter");
        let b = second.get("b").expect("b kept");
        assert!(
            b.limiter.as_ref().expect("limited").check().is_ok(),
            "changed rate starts afresh"
        );
    }

    #[test]
    fn a_key_removed_and_added_back_keeps_the_count_its_requests_hold() {
        let metrics = Metrics::new();
        let clock = Clock::manual();
        let with = [key("a", "ta", Limits::default())];
        let first = KeyStore::build(&with, None, &clock, &metrics);
        let held = first.get("a").expect("a").inflight.try_acquire(None);
        let without = KeyStore::build(&[], Some(&first), &clock, &metrics);
        drop(first);
        let again = KeyStore::build(&with, Some(&without), &clock, &metrics);
        let a = again.get("a").expect("a back");
        assert_eq!(a.inflight.current(), 1, "the running request still counts");
        drop(held);
        assert_eq!(
            a.inflight.current(),
            0,
            "and is released into the same count"
        );

        let idle = KeyStore::build(&[], Some(&again), &clock, &metrics);
        drop(again);
        let later = KeyStore::build(&[], Some(&idle), &clock, &metrics);
        assert!(
            later.inflight.0.lock().expect("registry").is_empty(),
            "a count nothing holds any more is forgotten at the next build"
        );
    }

    #[test]
    fn inflight_is_capped_and_released_on_drop() {
        let metrics = Metrics::new();
        let store = KeyStore::build(
            &[key("a", "t", Limits::default())],
            None,
            &Clock::manual(),
            &metrics,
        );
        let inflight = store.get("a").expect("a").inflight.clone();
        let limit = NonZeroU32::new(2);
        let one = inflight.try_acquire(limit).expect("first");
        let _two = inflight.try_acquire(limit).expect("second");
        assert!(inflight.try_acquire(limit).is_none(), "third refused");
        drop(one);
        assert!(inflight.try_acquire(limit).is_some(), "slot freed by drop");
    }
}
