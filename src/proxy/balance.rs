//! Which endpoint of a pool serves the next attempt of a request.
//!
//! `least_requests` is the power of two random choices (tower's `p2c`, Mitzenmacher): two
//! endpoints drawn at random among those up, and the one with fewer requests in flight wins, so
//! a slow endpoint, whose requests pile up, is picked less. `round_robin` takes the endpoints
//! that are up in turn.
//!
//! Edge cases: endpoints a request already tried are skipped; with one candidate there is no
//! draw; when no untried endpoint is up, the one out longest is tried anyway (Envoy's panic
//! mode) rather than refusing all traffic; `None` only when every endpoint was tried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::Balance;
use crate::proxy::endpoint::{millis_now, Endpoint};

/// The index in `endpoints` of the endpoint for the next attempt, skipping those in `tried`.
/// Allocates nothing: candidates are counted, then the drawn ones found again.
pub(crate) fn choose(
    balance: Balance,
    endpoints: &[Arc<Endpoint>],
    tried: &[usize],
    turn: &AtomicUsize,
) -> Option<usize> {
    let now_ms = millis_now();
    let candidates = || {
        (0..endpoints.len())
            .filter(move |index| !tried.contains(index) && endpoints[*index].is_up_at(now_ms))
    };
    let count = candidates().count();
    let nth = |k: usize| candidates().nth(k);
    match count {
        0 => out_longest(endpoints, tried),
        1 => nth(0),
        _ => match balance {
            Balance::LeastRequests => {
                let first = fastrand::usize(..count);
                let mut second = fastrand::usize(..count - 1);
                if second >= first {
                    second += 1;
                }
                let (a, b) = (nth(first)?, nth(second)?);
                Some(if endpoints[b].inflight() < endpoints[a].inflight() {
                    b
                } else {
                    a
                })
            }
            Balance::RoundRobin => nth(turn.fetch_add(1, Ordering::Relaxed) % count),
        },
    }
}

/// No untried endpoint is up: the untried one that went down first.
fn out_longest(endpoints: &[Arc<Endpoint>], tried: &[usize]) -> Option<usize> {
    endpoints
        .iter()
        .enumerate()
        .filter(|(index, _)| !tried.contains(index))
        .min_by_key(|(_, endpoint)| endpoint.down_since())
        .map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::observability::metrics::Metrics;

    fn endpoints(n: usize) -> (Vec<Arc<Endpoint>>, crate::config::PoolConfig) {
        let urls: Vec<String> = (1..=n)
            .map(|i| format!("\"http://127.0.0.1:{i}\""))
            .collect();
        let text = format!(
            "[server]\n[[upstreams]]\nname = \"p\"\nmodels = [\"*\"]\nendpoints = [{}]\neject_after = 1\n",
            urls.join(", ")
        );
        let pool = Config::parse(&text, "test.toml").expect("valid").upstreams[0].clone();
        let metrics = Metrics::new();
        let endpoints = pool
            .endpoints
            .iter()
            .map(|url| Arc::new(Endpoint::new(url.clone(), pool.name.clone(), 1, &metrics)))
            .collect();
        (endpoints, pool)
    }

    #[test]
    fn least_requests_never_picks_the_busiest_of_two() {
        let (endpoints, _) = endpoints(2);
        let _busy: Vec<_> = (0..5).map(|_| endpoints[1].start()).collect();
        let turn = AtomicUsize::new(0);
        for _ in 0..100 {
            assert_eq!(
                choose(Balance::LeastRequests, &endpoints, &[], &turn),
                Some(0)
            );
        }
    }

    #[test]
    fn ejected_and_tried_endpoints_are_skipped_and_the_out_longest_tried_last() {
        let (endpoints, pool) = endpoints(3);
        let turn = AtomicUsize::new(0);
        endpoints[0].failed(&pool);
        for _ in 0..50 {
            let chosen = choose(Balance::RoundRobin, &endpoints, &[1], &turn);
            assert_eq!(chosen, Some(2), "0 is out, 1 was tried");
        }
        endpoints[2].failed(&pool);
        assert_eq!(
            choose(Balance::LeastRequests, &endpoints, &[1], &turn),
            Some(0),
            "none up: the one out longest"
        );
        assert_eq!(
            choose(Balance::LeastRequests, &endpoints, &[0, 1, 2], &turn),
            None
        );
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let (endpoints, _) = endpoints(3);
        let turn = AtomicUsize::new(0);
        let picks: Vec<_> = (0..6)
            .filter_map(|_| choose(Balance::RoundRobin, &endpoints, &[], &turn))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }
}
