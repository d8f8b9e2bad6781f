//! `GET /v1/models`: the union of what every pool's upstream lists, in OpenAI's list shape
//! (`{"object": "list", "data": [...]}`), keeping only the models the pool's `models` patterns
//! and the caller's key allow.
//!
//! Each pool's list is asked of one endpoint that is up (the balance's pick), with the pool's
//! credential, and kept for [`CACHE_FOR`]; a model listed by two pools is shown once, as the
//! first pool in file order lists it (that pool is the one that serves it).
//!
//! Edge cases: a pool whose upstream does not answer, or answers something that is not a model
//! list, is left out of the union (and logged) while the others are shown; when no pool could be
//! asked at all the answer is 502, as an unreachable upstream's is. A failed ask is not cached.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::config::model_matches;
use crate::http::body::GatewayBody;
use crate::http::context::{RequestContext, UpstreamReached};
use crate::http::error::GatewayError;
use crate::proxy::pool::{Pool, Pools};

/// How long one pool's list is reused.
pub(crate) const CACHE_FOR: Duration = Duration::from_secs(10);
/// The most of a model list read from an upstream.
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

/// The filtered union for the caller of `context`, asked through worker `slot`'s connections.
pub(crate) async fn answer(
    pools: &Pools,
    context: &RequestContext,
    slot: usize,
) -> Result<Response<GatewayBody>, GatewayError> {
    let allowed = context.key().and_then(|key| key.limits.models.clone());
    let mut data: Vec<Value> = Vec::new();
    let mut answered = false;
    for pool in pools.iter() {
        let listed = match list(pool, slot).await {
            Ok(listed) => listed,
            Err(error) => {
                tracing::warn!(upstream = %pool.config.name, %error, "cannot list the upstream's models");
                continue;
            }
        };
        answered = true;
        for model in listed.iter() {
            let Some(id) = model.get("id").and_then(Value::as_str) else {
                continue;
            };
            let key_allows = allowed
                .as_ref()
                .is_none_or(|patterns| patterns.iter().any(|p| model_matches(p, id)));
            let seen = data
                .iter()
                .any(|m| m.get("id").and_then(Value::as_str) == Some(id));
            if key_allows && !seen {
                data.push(model.clone());
            }
        }
    }
    if !answered {
        return Err(GatewayError::UpstreamUnreachable(
            "no upstream answered GET /v1/models".into(),
        ));
    }
    let body = json!({"object": "list", "data": data}).to_string();
    let mut response = Response::new(crate::http::body::full(body));
    *response.status_mut() = StatusCode::OK;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response.extensions_mut().insert(UpstreamReached);
    Ok(response)
}

/// The pool's models that its patterns allow: from the cache, or asked now.
async fn list(pool: &Arc<Pool>, slot: usize) -> Result<Arc<Vec<Value>>, String> {
    if let Some((at, listed)) = &*lock(pool) {
        if at.elapsed() < CACHE_FOR {
            return Ok(listed.clone());
        }
    }
    let index = pool.choose(&[]).ok_or("the pool has no endpoint")?;
    let endpoint = &pool.endpoints[index];
    let path = format!("{}/v1/models", endpoint.url.base_path);
    let request = crate::proxy::health::get(pool, endpoint, &path)?;
    let ask = async {
        let response = pool
            .connector
            .send(endpoint, slot, request, false)
            .await
            .map_err(|e| format!("{e:?}"))?;
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_LIST_BYTES)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(body)
    };
    let body = tokio::time::timeout(pool.config.upstream.response_header_timeout, ask)
        .await
        .map_err(|_| "timed out".to_owned())??;
    let parsed: Value = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
    let models = parsed
        .get("data")
        .and_then(Value::as_array)
        .ok_or("not a model list (no data array)")?;
    let listed: Vec<Value> = models
        .iter()
        .filter(|m| {
            m.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| pool.serves(id))
        })
        .cloned()
        .collect();
    let listed = Arc::new(listed);
    *lock(pool) = Some((Instant::now(), listed.clone()));
    Ok(listed)
}

fn lock(pool: &Pool) -> std::sync::MutexGuard<'_, Option<(Instant, Arc<Vec<Value>>)>> {
    pool.models
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
