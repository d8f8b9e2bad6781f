//! Active health checks, and the `tollgate_upstream_up` gauges kept true.
//!
//! One task for all pools: every [`TICK`] it reads the pools in force (so a reload's new pools
//! and endpoints are checked from its next tick), refreshes each endpoint's up gauge (an ejection
//! that ran out is a change no request marks), and starts the checks that are due: a GET of the
//! pool's `health_check.path` on the endpoint, with the pool's credential, within
//! `health_check.timeout`. A 2xx brings the endpoint up (clearing an ejection too); anything else
//! or no answer in time marks it down until the next 2xx.
//!
//! Edge cases: checks run as tasks of their own, so one slow endpoint delays no other; the body
//! of a check's answer is read and dropped, so its connection is reused by the next check; checks
//! use the background slot of each endpoint's idle connections, never a worker's.

use std::sync::Arc;
use std::time::Duration;

use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};

use crate::proxy::endpoint::Endpoint;
use crate::proxy::pool::{Pool, SharedPools};

/// How often the task looks at the pools.
const TICK: Duration = Duration::from_millis(100);

/// Runs until aborted; `slot` is the background slot of the endpoints' idle connections.
pub(crate) async fn run(pools: SharedPools, slot: usize) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let current = pools.load_full();
        for pool in current.iter() {
            for endpoint in &pool.endpoints {
                endpoint.refresh_gauge();
                let Some(check) = &pool.config.health_check else {
                    continue;
                };
                if endpoint.check_due(check.interval) {
                    tokio::spawn(check_one(pool.clone(), endpoint.clone(), slot));
                }
            }
        }
    }
}

/// One check of one endpoint; the result marks it up or down.
async fn check_one(pool: Arc<Pool>, endpoint: Arc<Endpoint>, slot: usize) {
    let Some(check) = &pool.config.health_check else {
        return;
    };
    let passed = tokio::time::timeout(check.timeout, async {
        let request = get(&pool, &endpoint, &check.path)?;
        let response = pool
            .connector
            .send(&endpoint, slot, request, false)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status();
        // Read to the end, so that the connection can serve the next check.
        let _ = response.into_body().collect().await;
        Ok::<_, String>(status.is_success())
    })
    .await;
    match passed {
        Ok(Ok(true)) => endpoint.check_passed(),
        Ok(Ok(false)) | Ok(Err(_)) | Err(_) => endpoint.check_failed(),
    }
}

/// A GET of `path` (from the server's root: `/health`, or the base path's `/openai/v1/models`)
/// on `endpoint`, with the pool's credential.
pub(crate) fn get(
    pool: &Pool,
    endpoint: &Endpoint,
    path: &str,
) -> Result<crate::proxy::client::UpstreamRequest, String> {
    let url = &endpoint.url;
    let mut request = Request::builder()
        .method(Method::GET)
        .uri(format!("{}://{}{path}", url.scheme, url.authority))
        .header(header::HOST, url.authority.as_str())
        .header(header::ACCEPT_ENCODING, "identity")
        .body(Full::default())
        .map_err(|e| e.to_string())?;
    if let Some(authorization) = &pool.authorization {
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, authorization.clone());
    }
    Ok(request)
}
