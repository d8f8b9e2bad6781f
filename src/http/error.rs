//! [`GatewayError`]: every answer the gateway makes itself, and the one place that turns it into
//! a response.
//!
//! The body has the seeds' `V1PromptModelError` fields (`type`, `title`, `status`, `detail`,
//! `code` where the seed defines one, `errors[]` for validation) plus an OpenAI-style
//! `error: {message, type, code}` object so that OpenAI SDKs raise the right exception with a
//! useful message. A 5xx body never carries internal details: those go to the log, where the
//! outer layer writes them from the [`ErrorSource`] response extension.

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::json;

use crate::http::body::{self, BoxError, GatewayBody};
use crate::observability::labels::Rejection;

/// Variants are grouped by who is at fault; the metric label is the variant's snake_case name.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum GatewayError {
    // --- the client's request ---
    #[error("no route for {path}")]
    NotFound { path: String },
    #[error("method not allowed; this path accepts {allow}")]
    MethodNotAllowed { allow: &'static str },
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("request line and header fields larger than {limit} bytes")]
    HeaderFieldsTooLarge { limit: usize },
    #[error("{0}")]
    BadRequest(String),
    #[error("the request body does not match the API schema ({total} problem(s)); see errors[]")]
    InvalidBody {
        #[expect(
            clippy::box_collection,
            reason = "one pointer, not a Vec's three words, keeps every Result<_, GatewayError> small"
        )]
        errors: Box<Vec<FieldError>>,
        total: usize,
    },
    #[error("model {model:?} is not available to this key")]
    ModelNotFound { model: String },
    /// No upstream pool's `models` match: the same code as the key's refusal.
    #[error("model {model:?} is not served by this gateway")]
    #[strum(serialize = "model_not_found")]
    ModelNotServed { model: String },
    #[error("{field} = {requested} exceeds this key's cap of {cap} tokens")]
    MaxTokensExceeded {
        field: &'static str,
        requested: u64,
        cap: u32,
    },
    #[error("{field} = {requested} exceeds this key's cap of {cap} answers per request")]
    TooManyChoices {
        field: &'static str,
        requested: u64,
        cap: u32,
    },
    #[error(
        "{field} must be a whole number on this key: its limits bound every field that sets how \
         long or how many the answers are (leave it out, or send a count)"
    )]
    UnboundedField { field: &'static str },

    /// The admin API: no key of that name.
    #[error("no key named {name:?}")]
    UnknownKey { name: String },
    /// The admin API: the change conflicts with what exists (`code`: `defined-in-config`,
    /// `key-exists`, `key-busy`).
    #[error("{detail}")]
    Conflict { code: &'static str, detail: String },

    // --- authentication and limits ---
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    MissingApiKey,
    #[error("malformed Authorization header: expected `Bearer <key>`")]
    MalformedApiKey,
    #[error("invalid API key")]
    InvalidApiKey,
    #[error("rate limit exceeded: {limit}; retry in {}s", retry_after_secs(*.retry_after))]
    RateLimitExceeded {
        limit: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    QuotaExceeded(Box<QuotaRefusal>),
    #[error("too many requests in flight for {scope} (limit {limit}); retry when one finishes")]
    ConcurrencyLimitExceeded {
        /// `this key` or `the group team-a`.
        scope: String,
        limit: u32,
    },

    // --- the upstream ---
    #[error("upstream unreachable")]
    UpstreamUnreachable(#[source] BoxError),
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    #[error("upstream connection failed")]
    UpstreamBroken(#[source] BoxError),

    // --- the shared state ---
    #[error("the gateway's shared state is unreachable; try again shortly")]
    StateUnavailable(#[source] BoxError),

    // --- the gateway itself ---
    #[error("internal error")]
    Internal(String),
}

/// A quota window without room for a request: whose it is, which, in what unit.
#[derive(Debug, thiserror::Error)]
#[error(
    "{unit} quota exceeded: the {window} window of {scope} has {used} of {limit} {units} in use \
     and this request may need {needed}; retry in {}s",
    retry_after_secs(*.retry_after)
)]
pub struct QuotaRefusal {
    /// `token` or `cost`.
    pub(crate) unit: &'static str,
    pub(crate) window: String,
    /// `key alice` or `group team-a`.
    pub(crate) scope: String,
    pub(crate) limit: String,
    pub(crate) used: String,
    pub(crate) needed: String,
    /// `tokens`, or the pricing's currency.
    pub(crate) units: String,
    pub(crate) retry_after: Duration,
}

/// One problem in a request body, as the seeds' `ErrorDetail`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FieldError {
    /// Where: `body.messages[2].role`.
    pub(crate) location: String,
    /// What was expected.
    pub(crate) message: String,
    /// What came (truncated when large).
    pub(crate) value: serde_json::Value,
}

/// What the access log should say about a gateway-made error whose details the client must not
/// see. Carried as a response extension so that turning an error into a response has no side
/// effects.
#[derive(Debug, Clone)]
pub struct ErrorSource(pub String);

/// The gateway's reason for an error answer (its metric label): a span's `error.type`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ErrorReason(pub(crate) &'static str);

impl GatewayError {
    /// The metric and log label of this error.
    pub(crate) fn reason(&self) -> &'static str {
        self.into()
    }

    /// Its `tollgate_rejections_total` reason, when it is a refusal of the auth, limit or policy
    /// layers. No wildcard: a new variant must say whether it is one.
    pub(crate) fn rejection(&self) -> Option<Rejection> {
        match self {
            GatewayError::MissingApiKey => Some(Rejection::MissingApiKey),
            GatewayError::MalformedApiKey => Some(Rejection::MalformedApiKey),
            GatewayError::InvalidApiKey => Some(Rejection::InvalidApiKey),
            GatewayError::RateLimitExceeded { .. } => Some(Rejection::Rate),
            GatewayError::ConcurrencyLimitExceeded { .. } => Some(Rejection::Concurrency),
            GatewayError::ModelNotFound { .. } | GatewayError::ModelNotServed { .. } => {
                Some(Rejection::ModelNotFound)
            }
            GatewayError::MaxTokensExceeded { .. } => Some(Rejection::MaxTokensExceeded),
            GatewayError::TooManyChoices { .. } => Some(Rejection::TooManyChoices),
            GatewayError::UnboundedField { .. } => Some(Rejection::UnboundedField),
            GatewayError::QuotaExceeded { .. } => Some(Rejection::Quota),
            GatewayError::StateUnavailable(_) => Some(Rejection::StateUnavailable),
            GatewayError::NotFound { .. }
            | GatewayError::MethodNotAllowed { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::RequestTimeout
            | GatewayError::HeaderFieldsTooLarge { .. }
            | GatewayError::BadRequest(_)
            | GatewayError::InvalidBody { .. }
            | GatewayError::Conflict { .. }
            | GatewayError::UnknownKey { .. }
            | GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamTimeout
            | GatewayError::UpstreamBroken(_)
            | GatewayError::Internal(_) => None,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            GatewayError::NotFound { .. } | GatewayError::UnknownKey { .. } => {
                StatusCode::NOT_FOUND
            }
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::HeaderFieldsTooLarge { .. } => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            GatewayError::BadRequest(_)
            | GatewayError::InvalidBody { .. }
            | GatewayError::ModelNotFound { .. }
            | GatewayError::ModelNotServed { .. }
            | GatewayError::MaxTokensExceeded { .. }
            | GatewayError::TooManyChoices { .. }
            | GatewayError::UnboundedField { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Conflict { .. } => StatusCode::CONFLICT,
            GatewayError::MissingApiKey
            | GatewayError::MalformedApiKey
            | GatewayError::InvalidApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::RateLimitExceeded { .. }
            | GatewayError::QuotaExceeded { .. }
            | GatewayError::ConcurrencyLimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UpstreamUnreachable(_) | GatewayError::UpstreamBroken(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::StateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type` for this class of error.
    fn openai_type(&self) -> &'static str {
        match self {
            GatewayError::NotFound { .. } | GatewayError::UnknownKey { .. } => "not_found_error",
            GatewayError::MethodNotAllowed { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::RequestTimeout
            | GatewayError::HeaderFieldsTooLarge { .. }
            | GatewayError::BadRequest(_)
            | GatewayError::InvalidBody { .. }
            | GatewayError::ModelNotFound { .. }
            | GatewayError::ModelNotServed { .. }
            | GatewayError::MaxTokensExceeded { .. }
            | GatewayError::TooManyChoices { .. }
            | GatewayError::UnboundedField { .. }
            | GatewayError::Conflict { .. } => "invalid_request_error",
            GatewayError::MissingApiKey
            | GatewayError::MalformedApiKey
            | GatewayError::InvalidApiKey => "authentication_error",
            GatewayError::RateLimitExceeded { .. }
            | GatewayError::QuotaExceeded { .. }
            | GatewayError::ConcurrencyLimitExceeded { .. } => "rate_limit_error",
            GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamTimeout
            | GatewayError::UpstreamBroken(_)
            | GatewayError::StateUnavailable(_)
            | GatewayError::Internal(_) => "api_error",
        }
    }

    /// The full chain of causes, for the log only.
    fn log_detail(&self) -> String {
        let mut detail = self.to_string();
        if let GatewayError::Internal(why) = self {
            detail = format!("{detail}: {why}");
        }
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            detail.push_str(": ");
            detail.push_str(&cause.to_string());
            source = cause.source();
        }
        detail
    }

    /// The seeds' own `code` values, where one applies.
    fn seed_code(&self) -> Option<&'static str> {
        match self {
            GatewayError::ModelNotFound { .. } | GatewayError::ModelNotServed { .. } => {
                Some("model-not-found")
            }
            GatewayError::MaxTokensExceeded { .. } => Some("max-tokens-exceeded"),
            GatewayError::Conflict { code, .. } => Some(code),
            GatewayError::UnknownKey { .. } => Some("key-not-found"),
            _ => None,
        }
    }

    /// The request field at fault, for OpenAI's `error.param`.
    fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::MaxTokensExceeded { field, .. }
            | GatewayError::TooManyChoices { field, .. }
            | GatewayError::UnboundedField { field } => Some(field),
            _ => None,
        }
    }

    /// The only place that picks a status code and shapes an error body.
    pub(crate) fn into_response(self) -> Response<GatewayBody> {
        let status = self.status();
        let title = status.canonical_reason().unwrap_or("Error");
        let mut detail = self.to_string();
        let code = self.reason();
        let mut payload = json!({
            "type": "about:blank",
            "title": title,
            "status": status.as_u16(),
            "detail": detail,
            "error": {
                "message": detail,
                "type": self.openai_type(),
                "code": code,
                "param": null,
            },
        });
        if let Some(seed_code) = self.seed_code() {
            payload["code"] = seed_code.into();
        }
        if let Some(param) = self.param() {
            payload["error"]["param"] = param.into();
        }
        if let GatewayError::InvalidBody { errors, .. } = &self {
            // The SDK message names the first problem, so that it is useful on its own.
            if let Some(first) = errors.first() {
                detail = format!("{detail}; first: {}: {}", first.location, first.message);
                payload["detail"] = detail.clone().into();
                payload["error"]["message"] = detail.into();
                payload["error"]["param"] =
                    first.location.trim_start_matches("body.").to_owned().into();
            }
            payload["errors"] = serde_json::to_value(errors).unwrap_or_default();
        }
        let mut response = Response::new(body::full(payload.to_string()));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let headers = response.headers_mut();
        match &self {
            GatewayError::MethodNotAllowed { allow } => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            GatewayError::MissingApiKey
            | GatewayError::MalformedApiKey
            | GatewayError::InvalidApiKey => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            GatewayError::RateLimitExceeded { retry_after, .. } => {
                headers.insert(header::RETRY_AFTER, retry_after_secs(*retry_after).into());
            }
            GatewayError::QuotaExceeded(refusal) => {
                headers.insert(
                    header::RETRY_AFTER,
                    retry_after_secs(refusal.retry_after).into(),
                );
            }
            GatewayError::ConcurrencyLimitExceeded { .. } | GatewayError::StateUnavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
            .extensions_mut()
            .insert(ErrorSource(self.log_detail()));
        response.extensions_mut().insert(ErrorReason(self.reason()));
        response
    }
}

/// `Retry-After` is whole seconds: round up, so that a client that waits that long succeeds.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs();
    if wait.subsec_nanos() > 0 || whole == 0 {
        whole + 1
    } else {
        whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<GatewayBody>) -> serde_json::Value {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("full body")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("error body is JSON")
    }

    #[tokio::test]
    async fn error_body_has_problem_and_openai_fields() {
        let response = GatewayError::NotFound {
            path: "/nope".into(),
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let body = body_json(response).await;
        assert_eq!(body["status"], 404);
        assert_eq!(body["title"], "Not Found");
        assert_eq!(body["error"]["type"], "not_found_error");
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(body["detail"], "no route for /nope");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(
            retry_after_secs(Duration::ZERO),
            1,
            "never 0: that invites a busy loop"
        );
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(5_500)), 6);
    }

    #[tokio::test]
    async fn upstream_details_stay_out_of_the_body() {
        let cause: BoxError = "dns error: secret-host.internal".into();
        let response = GatewayError::UpstreamUnreachable(cause).into_response();
        let logged = response
            .extensions()
            .get::<ErrorSource>()
            .expect("log detail attached")
            .0
            .clone();
        assert!(
            logged.contains("secret-host"),
            "log keeps the cause: {logged}"
        );
        let body = body_json(response).await.to_string();
        assert!(
            !body.contains("secret-host"),
            "body leaks the cause: {body}"
        );
    }
}
