//! The upstream pools as they run: each pool's endpoints (with their state), its connector and
//! credential, behind one [`SharedPools`] that a reload swaps whole.
//!
//! A reload builds new pools from the new config, and keeps the [`Endpoint`] of every endpoint
//! that stays (same pool name, same base URL) with its state, in-flight count and idle
//! connections. A request holds its pool (and so its endpoints) by `Arc` for its whole life:
//! requests in flight on a removed endpoint finish there, and its connections close when the last
//! of them ends.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::time::Instant;

use crate::config::model_matches;
use crate::config::PoolConfig;
use crate::http::body::BoxError;
use crate::observability::metrics::Metrics;
use crate::proxy::balance;
use crate::proxy::client::Connector;
use crate::proxy::endpoint::Endpoint;

/// The pools in force; swapped whole by a reload.
pub(crate) type SharedPools = Arc<ArcSwap<Pools>>;

pub(crate) struct Pools {
    pools: Vec<Arc<Pool>>,
}

pub(crate) struct Pool {
    pub(crate) config: PoolConfig,
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    pub(crate) connector: Connector,
    /// `Bearer <credential>`, marked sensitive.
    pub(crate) authorization: Option<HeaderValue>,
    /// Round-robin's turn.
    turn: AtomicUsize,
    /// The models the upstream listed (already filtered by the pool's patterns), and when.
    pub(crate) models: Mutex<Option<(Instant, Arc<Vec<serde_json::Value>>)>>,
}

impl Pools {
    /// Pools for `configs`, keeping the endpoints of `previous` that stay; `slots` idle stacks per
    /// endpoint (one per worker, and one for background calls).
    pub(crate) fn build(
        configs: &[PoolConfig],
        previous: Option<&Pools>,
        slots: usize,
        metrics: &Metrics,
    ) -> Result<Pools, BoxError> {
        let mut pools = Vec::with_capacity(configs.len());
        for config in configs {
            let kept = previous.and_then(|p| p.get(&config.name));
            pools.push(Arc::new(Pool::build(config, kept, slots, metrics)?));
        }
        let pools = Pools { pools };
        if let Some(previous) = previous {
            previous.forget_removed(&pools, metrics);
        }
        Ok(pools)
    }

    /// The first pool, in file order, whose models match `model`.
    pub(crate) fn route(&self, model: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|pool| pool.serves(model))
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|pool| &*pool.config.name == name)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.iter()
    }

    /// Removes the gauges of endpoints that `new` no longer has: a series that stays would show
    /// an endpoint that is gone as up (or down) forever.
    fn forget_removed(&self, new: &Pools, metrics: &Metrics) {
        for pool in &self.pools {
            for endpoint in &pool.endpoints {
                let stays = new
                    .get(&pool.config.name)
                    .is_some_and(|p| p.endpoints.iter().any(|e| Arc::ptr_eq(e, endpoint)));
                if !stays {
                    metrics.remove_endpoint(&endpoint.upstream, &endpoint.label);
                }
            }
        }
    }
}

impl Pool {
    fn build(
        config: &PoolConfig,
        previous: Option<&Arc<Pool>>,
        slots: usize,
        metrics: &Metrics,
    ) -> Result<Pool, BoxError> {
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| {
                let kept = previous.and_then(|p| p.endpoints.iter().find(|e| e.url == *url));
                match kept {
                    Some(endpoint) => endpoint.clone(),
                    None => Arc::new(Endpoint::new(
                        url.clone(),
                        config.name.clone(),
                        slots,
                        metrics,
                    )),
                }
            })
            .collect();
        metrics.add_upstream(&config.name);
        let https = config.endpoints.iter().any(|url| url.is_https());
        let authorization = match &config.upstream.api_key {
            Some(key) => {
                let mut value = HeaderValue::try_from(format!("Bearer {}", key.expose()))
                    .map_err(|_| "the upstream credential is not a valid header value")?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Pool {
            connector: Connector::new(&config.upstream, https)?,
            config: config.clone(),
            endpoints,
            authorization,
            turn: AtomicUsize::new(0),
            models: Mutex::new(None),
        })
    }

    /// Whether this pool's `models` patterns match `model`.
    pub(crate) fn serves(&self, model: &str) -> bool {
        self.config.models.iter().any(|p| model_matches(p, model))
    }

    /// The endpoint for the next attempt of a request that already tried `tried`.
    pub(crate) fn choose(&self, tried: &[usize]) -> Option<usize> {
        balance::choose(self.config.balance, &self.endpoints, tried, &self.turn)
    }
}
