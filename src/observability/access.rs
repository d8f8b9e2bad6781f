//! What every request leaves behind when it ends, once: the access-log line
//! (`target=tollgate::access`), the request metrics (`tollgate_requests_total`, and for routed
//! requests `tollgate_request_duration_seconds`) and its count in the console's timeline (with
//! its latency when it reached the upstream), read from the request context.
//!
//! Edge cases: a request that never reached a route has no duration sample (its `endpoint` label
//! would be `none`); the client's request id and path are printed with Debug's quoting and
//! escaping, so that they cannot forge a field or a line.

use crate::http::context::{Ending, RequestContext};
use crate::observability::metrics::Metrics;
use crate::observability::timeline::Sample;

/// Counts and logs the request `context`, which ended as `ending`.
pub(crate) fn record(metrics: &Metrics, context: &RequestContext, ending: &Ending) {
    let elapsed = context.start().elapsed();
    let endpoint = context.endpoint_label();
    let key = context.key_label();
    let model = context.model_label();

    match (context.key(), context.endpoint()) {
        // The key's own handles: no label lookup.
        (Some(entry), Some(_)) => entry.series.model(model).answered(
            metrics,
            (key, model),
            (endpoint, ending.status),
            elapsed.as_secs_f64(),
        ),
        (_, route) => {
            metrics
                .requests_total
                .with_label_values(&[key, model, endpoint, ending.status.as_str()])
                .inc();
            if route.is_some() {
                metrics
                    .request_duration_seconds
                    .with_label_values(&[key, model, endpoint])
                    .observe(elapsed.as_secs_f64());
            }
        }
    }
    metrics.timeline.record(Sample {
        status: ending.status.as_u16(),
        latency: ending.upstream_reached.then_some(elapsed),
    });

    // Whole microseconds: a short number to print ("0.412", not "0.41200000000000003").
    // Display (`%`) for names from known, safe sets.
    tracing::info!(
        target: "tollgate::access",
        request_id = context.id(),
        method = %context.method(),
        path = ?context.path(),
        endpoint = %endpoint,
        status = ending.status.as_u16(),
        duration_ms = elapsed.as_micros() as f64 / 1000.0,
        key = %key,
        model = %model,
        upstream = %context.upstream_label(),
        outcome = %ending.outcome.log_label(),
        error = ending.error.as_ref().map(|e| e.0.as_str()),
    );
}

#[cfg(test)]
mod tests {
    use crate::http::context::Endpoint;
    use crate::observability::key_series::ENDPOINTS;

    /// Every routed endpoint counts through a key's handles, none by label lookups.
    #[test]
    fn every_endpoint_has_a_kept_handle() {
        for endpoint in [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Models,
        ] {
            assert!(ENDPOINTS.contains(&endpoint.label()), "{endpoint:?}");
        }
    }
}
