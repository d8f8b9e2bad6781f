//! Authentication: the presented key → the key in the request context, or 401.
//!
//! The key is read from `Authorization: Bearer <key>`, or from `api-key:` / `x-api-key:` (which
//! some clients send). It is hashed and looked up in the live key table; it is never logged,
//! echoed in an error, or forwarded (the proxy removes all three headers).
//!
//! Edge cases: an `Authorization` header with another scheme, or `Bearer` with nothing after it, is
//! "malformed", not "missing"; a key removed by a reload is refused from the next request on.

use std::sync::Arc;

use http::{header, HeaderMap, Request, Response};
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use crate::http::body::GatewayBody;
use crate::http::context::RequestContext;
use crate::http::error::GatewayError;
use crate::http::headers::{bearer_token, CLIENT_CREDENTIALS};
use crate::keys::SharedKeys;
use crate::observability::metrics::{Metrics, UNAUTHENTICATED};

#[derive(Clone)]
pub(crate) struct Authenticate {
    keys: SharedKeys,
    metrics: Arc<Metrics>,
}

/// The auth layer: tower-http's request validation with our key lookup.
pub(crate) fn auth_layer(
    keys: SharedKeys,
    metrics: Arc<Metrics>,
) -> ValidateRequestHeaderLayer<Authenticate> {
    ValidateRequestHeaderLayer::custom(Authenticate { keys, metrics })
}

impl<B> ValidateRequest<B> for Authenticate {
    type ResponseBody = GatewayBody;

    fn validate(&mut self, request: &mut Request<B>) -> Result<(), Response<GatewayBody>> {
        let Some(context) = RequestContext::of(request) else {
            return Err(
                GatewayError::Internal("auth reached without a request context".into())
                    .into_response(),
            );
        };
        let entry = presented_key(request.headers())
            .and_then(|token| {
                self.keys
                    .load()
                    .lookup(token)
                    .cloned()
                    .ok_or(GatewayError::InvalidApiKey)
            })
            .map_err(|error| {
                if let Some(reason) = error.rejection() {
                    self.metrics.rejection(UNAUTHENTICATED, reason);
                }
                error.into_response()
            })?;
        context.set_key(entry);
        Ok(())
    }
}

/// The key bytes the client presented. More than one credential header line (of any of the
/// three names) is ambiguous, and refused rather than guessed at.
fn presented_key(headers: &HeaderMap) -> Result<&[u8], GatewayError> {
    let lines: usize = CLIENT_CREDENTIALS
        .iter()
        .map(|name| headers.get_all(name).iter().count())
        .sum();
    if lines > 1 {
        // The same key sent twice (say, as Authorization and x-api-key) is not ambiguous.
        let mut values: Vec<&[u8]> = CLIENT_CREDENTIALS
            .iter()
            .flat_map(|name| headers.get_all(name).iter())
            .map(|v| bearer_token(v.as_bytes()).unwrap_or(v.as_bytes().trim_ascii()))
            .collect();
        values.sort_unstable();
        values.dedup();
        if values.len() > 1 {
            return Err(GatewayError::MalformedApiKey);
        }
    }
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        return bearer_token(value.as_bytes()).ok_or(GatewayError::MalformedApiKey);
    }
    for name in &CLIENT_CREDENTIALS[1..] {
        if let Some(value) = headers.get(name) {
            let token = value.as_bytes().trim_ascii();
            if token.is_empty() {
                return Err(GatewayError::MalformedApiKey);
            }
            return Ok(token);
        }
    }
    Err(GatewayError::MissingApiKey)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn bearer_and_api_key_headers_are_read() {
        assert_eq!(
            presented_key(&with("authorization", "Bearer tg-1")).ok(),
            Some(&b"tg-1"[..])
        );
        assert_eq!(
            presented_key(&with("authorization", "bearer  tg-1 ")).ok(),
            Some(&b"tg-1"[..])
        );
        assert_eq!(
            presented_key(&with("x-api-key", "tg-2")).ok(),
            Some(&b"tg-2"[..])
        );
        assert_eq!(
            presented_key(&with("api-key", "tg-3")).ok(),
            Some(&b"tg-3"[..])
        );
    }

    #[test]
    fn two_different_credentials_are_refused_the_same_one_twice_is_not() {
        let mut headers = HeaderMap::new();
        headers.append("authorization", HeaderValue::from_static("Bearer tg-1"));
        headers.append("authorization", HeaderValue::from_static("Bearer tg-2"));
        assert!(
            matches!(presented_key(&headers), Err(GatewayError::MalformedApiKey)),
            "ambiguous"
        );
        let mut headers = HeaderMap::new();
        headers.append("authorization", HeaderValue::from_static("Bearer tg-1"));
        headers.append("x-api-key", HeaderValue::from_static("tg-1"));
        assert_eq!(
            presented_key(&headers).ok(),
            Some(&b"tg-1"[..]),
            "the same key in two headers"
        );
    }

    #[test]
    fn missing_and_malformed_are_told_apart() {
        assert!(matches!(
            presented_key(&HeaderMap::new()),
            Err(GatewayError::MissingApiKey)
        ));
        for bad in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "tg-1"] {
            assert!(
                matches!(
                    presented_key(&with("authorization", bad)),
                    Err(GatewayError::MalformedApiKey)
                ),
                "{bad:?} is malformed"
            );
        }
    }
}
