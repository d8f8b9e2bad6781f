//! The headers the gateway owns, spelled once: the client credential headers and the one bearer
//! parser (auth and the admin API both use it), the request id, and the rate-limit fields
//! (OpenAI's `x-ratelimit-*` names, and the IETF `RateLimit-Policy` / `RateLimit` of
//! draft-ietf-httpapi-ratelimit-headers).
//!
//! The upstream's own values of these never reach the client: its `x-request-id` is returned as
//! `x-upstream-request-id`, and its rate-limit fields — which describe the gateway's credential,
//! shared by every key, not the client's allowance — are removed ([`own_upstream_headers`]).

use http::{header, HeaderMap, HeaderName};

/// Where a client presents its key: `Authorization: Bearer <key>`, or `api-key:` / `x-api-key:`
/// (which some clients send). The gateway's business, never the upstream's.
pub(crate) const CLIENT_CREDENTIALS: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
];

/// The token of an `Authorization: Bearer <token>` value: the scheme in any case (RFC 9110
/// §11.1), the token without surrounding whitespace. `None` for another scheme or an empty token.
pub(crate) fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = (&value[..space], value[space + 1..].trim_ascii());
    (scheme.eq_ignore_ascii_case(b"bearer") && !token.is_empty()).then_some(token)
}

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The upstream's own request id, kept for support requests to the upstream's operator.
pub(crate) const X_UPSTREAM_REQUEST_ID: HeaderName =
    HeaderName::from_static("x-upstream-request-id");

pub(crate) const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
pub(crate) const REMAINING_REQUESTS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-requests");
pub(crate) const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
pub(crate) const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
pub(crate) const REMAINING_TOKENS: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-tokens");
pub(crate) const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");
pub(crate) const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub(crate) const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Whether `name` is a rate-limit field: one the gateway sets from its own limits.
pub(crate) fn is_rate_limit(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-ratelimit-") || name == RATELIMIT || name == RATELIMIT_POLICY
}

/// Makes the upstream's response headers the gateway's: its request id moves to
/// `x-upstream-request-id` (the gateway's own is set by the outer layer), and its rate-limit
/// fields are removed (the limit layers set the key's).
pub(crate) fn own_upstream_headers(headers: &mut HeaderMap) {
    let ids: Vec<_> = headers.get_all(X_REQUEST_ID).iter().cloned().collect();
    headers.remove(X_REQUEST_ID);
    for id in ids {
        headers.append(X_UPSTREAM_REQUEST_ID, id);
    }
    let limits: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_rate_limit(n))
        .cloned()
        .collect();
    for name in limits {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn a_bearer_token_is_read_in_any_case_of_the_scheme() {
        assert_eq!(bearer_token(b"Bearer tg-1"), Some(&b"tg-1"[..]));
        assert_eq!(bearer_token(b"bEaReR   tg-1 "), Some(&b"tg-1"[..]));
        assert_eq!(bearer_token(b"Bearer "), None, "an empty token");
        assert_eq!(bearer_token(b"Bearer"), None, "no token at all");
        assert_eq!(bearer_token(b"Basic dTpw"), None, "another scheme");
        assert_eq!(
            bearer_token(b"tg-1"),
            None,
            "a bare token is not a bearer value"
        );
    }

    #[test]
    fn the_upstreams_id_is_renamed_and_its_limits_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("x-request-id", "req_up"),
            ("x-ratelimit-remaining-tokens", "99885"),
            ("x-ratelimit-limit-requests", "5000"),
            ("ratelimit", "\"up\";r=1;t=1"),
            ("ratelimit-policy", "\"up\";q=5;w=60"),
            ("retry-after", "3"),
            ("content-type", "application/json"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        own_upstream_headers(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["content-type", "retry-after", "x-upstream-request-id"],
            "only the upstream's own id (renamed) and unrelated headers remain"
        );
        assert_eq!(headers["x-upstream-request-id"], "req_up");
    }
}
