//! Picks the upstream pool that serves the request's `model`: the first pool, in file order,
//! whose `models` patterns match it. A model no pool serves is refused with 400
//! `model-not-found` (as a key's allow-list refuses one), and nothing is forwarded.
//!
//! It sits after the policy (the key's own allow-list speaks first) and before the quota (a
//! request no pool serves reserves nothing). The pools are read as they are now, so a reload's
//! new routes apply from the next request; a request keeps the pool it got until it ends.
//!
//! Edge cases: a request with no parsed body (`GET /v1/models`) gets no pool: the proxy answers
//! it from every pool.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use crate::http::body::GatewayBody;
use crate::http::context::RequestContext;
use crate::http::error::GatewayError;
use crate::observability::metrics::Metrics;
use crate::proxy::pool::SharedPools;

pub(crate) fn pick_pool_layer(
    pools: SharedPools,
    metrics: Arc<Metrics>,
) -> ValidateRequestHeaderLayer<PickPool> {
    ValidateRequestHeaderLayer::custom(PickPool { pools, metrics })
}

#[derive(Clone)]
pub(crate) struct PickPool {
    pools: SharedPools,
    metrics: Arc<Metrics>,
}

impl ValidateRequest<Bytes> for PickPool {
    type ResponseBody = GatewayBody;

    fn validate(&mut self, request: &mut Request<Bytes>) -> Result<(), Response<GatewayBody>> {
        let Some((context, parsed)) = RequestContext::with_parsed(request) else {
            return Ok(());
        };
        let pools = self.pools.load();
        match pools.route(&parsed.model) {
            Some(pool) => {
                context.set_pool(pool.clone());
                Ok(())
            }
            None => {
                let error = GatewayError::ModelNotServed {
                    model: parsed.model.clone(),
                };
                if let Some(reason) = error.rejection() {
                    self.metrics.rejection(context.key_label(), reason);
                }
                Err(error.into_response())
            }
        }
    }
}
