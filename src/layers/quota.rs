//! Token quotas on the way in, and accounting on the way out.
//!
//! Before forwarding, the request's worst case — the prompt's upper bound (its text's UTF-8
//! bytes plus the template allowances: see [`prompt_tokens`]) plus its `max_tokens` (or the
//! key's cap when it names none) for each answer it asks for (`n`, `best_of`, each prompt of a
//! completions list; see [`completion_bound`]), in tokens and in cost (each bound at its price,
//! [`Rate`]) — is reserved in every window of the key's quotas and of its group's, all at once
//! or none; a window without room refuses it with 429 naming the scope (key or group), the
//! window and the unit, `Retry-After` at that window's reset, and the `x-ratelimit-*-tokens`
//! headers of the tightest token window of key and group (every window, cost ones as
//! `"cost-month"`, group ones as `"group-tokens-1d"`, in `RateLimit-Policy`). After the answer, the request's [`Settlement`] (run by its end
//! hook) charges the reservation to what was really used, read from the answer by
//! [`WatchedBody`]. Reserved tokens count as used while a request runs, so any number of
//! concurrent requests can never together run past a quota (except an upstream that ignores
//! `max_tokens`: that excess is counted in `tollgate_quota_overrun_tokens_total`).
//!
//! [`completion_bound`]: crate::http::generation::Generation::completion_bound
//!
//! Usage injection: a streamed request whose client did not ask for `stream_options.include_usage`
//! is sent upstream with it (unless `upstream.inject_usage = false`), and the answer goes back
//! through the [`crate::accounting::usage::UsageStripper`], so the client sees what it would have seen
//! without the gateway while the gateway still gets exact usage.
//!
//! The cap binds the upstream: a request that names neither `max_tokens` nor
//! `max_completion_tokens` is sent with the key's cap as `max_tokens`, so that an upstream cannot
//! generate past what was reserved with its own default (llama.cpp's is "until the context is
//! full"). Both edits are members inserted after the opening brace ([`edited_body`]); every other
//! byte goes as the client sent it, and the answer comes back as it is.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::response::Parts;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::accounting::cost::{self, Rate};
use crate::accounting::ledger::Ledger;
use crate::accounting::recent::RecentRequests;
use crate::accounting::usage::{prompt_tokens, PromptTokens};
use crate::accounting::Accounting;
use crate::accounting::{Settlement, UsageWatch, WatchedBody};
use crate::config::Unit;
use crate::http::body::GatewayBody;
use crate::http::context::{ParsedRequest, RequestContext};
use crate::http::error::{retry_after_secs, ErrorSource, GatewayError, QuotaRefusal};
use crate::http::headers::{
    LIMIT_TOKENS, RATELIMIT, RATELIMIT_POLICY, REMAINING_TOKENS, RESET_TOKENS,
};
use crate::http::request_edit::{edited_body, Edits};
use crate::keys::KeyEntry;
use crate::observability::labels::Rejection;
use crate::observability::metrics::Metrics;
use crate::state::window::{PolicyHeader, Window};
use crate::state::{Amounts, Backend, Held, QuotaDenied, Scope, WindowStatus};

#[derive(Clone)]
pub(crate) struct QuotaLayer {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Arc<Backend>,
    ledger: Option<Arc<Ledger>>,
    recent: Arc<RecentRequests>,
    metrics: Arc<Metrics>,
}

impl QuotaLayer {
    pub(crate) fn new(accounting: Accounting, metrics: Arc<Metrics>) -> Self {
        let Accounting {
            backend,
            ledger,
            recent,
        } = accounting;
        QuotaLayer {
            shared: Arc::new(Shared {
                backend,
                ledger,
                recent,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for QuotaLayer {
    type Service = QuotaService<S>;

    fn layer(&self, inner: S) -> QuotaService<S> {
        QuotaService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct QuotaService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Request<Bytes>> for QuotaService<S>
where
    S: Service<Request<Bytes>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        // Take the service that poll_ready made ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(shared.account(inner, request))
    }
}

impl Shared {
    async fn account<S>(
        self: Arc<Self>,
        mut inner: S,
        mut request: Request<Bytes>,
    ) -> Result<Response<GatewayBody>, Infallible>
    where
        S: Service<Request<Bytes>, Response = Response<GatewayBody>, Error = Infallible>,
    {
        let Some(context) = RequestContext::of(&request).cloned() else {
            return Ok(
                GatewayError::Internal("quota reached without a request context".into())
                    .into_response(),
            );
        };
        let (Some(key), Some(parsed)) = (
            context.key().cloned(),
            request.extensions().get::<Arc<ParsedRequest>>().cloned(),
        ) else {
            // Nothing to account (GET /v1/models).
            return inner.call(request).await;
        };
        let prompt = prompt_tokens(&parsed.json);
        let rate = key.pricing.price(&parsed.model).map(Rate::of);
        let (held, headers) = match self.reserve(&key, &parsed, prompt, rate).await {
            Ok(reserved) => reserved,
            Err(refusal) => return Ok(refusal),
        };
        // The pool's `inject_usage`; on by default (a request without a pool is not sent).
        let inject_usage = context
            .pool()
            .is_none_or(|pool| pool.config.upstream.inject_usage);
        let strip = inject_usage && parsed.stream && !parsed.include_usage;
        let edits = Edits {
            include_usage: strip,
            max_tokens: parsed.generation.max_tokens_to_add(cap(&key)),
        };
        if !edits.is_empty() {
            let body = edited_body(request.body(), &parsed.json, edits);
            *request.body_mut() = body;
        }
        // Registered before the request goes upstream: a client that leaves before the answer
        // is still charged, by the request's end hook.
        let watch = Arc::new(UsageWatch::default());
        context.at_end(Settlement {
            backend: self.backend.clone(),
            ledger: self.ledger.clone(),
            recent: self.recent.clone(),
            metrics: self.metrics.clone(),
            held,
            rate,
            prompt_estimate: prompt.estimate,
            watch: watch.clone(),
        });

        let Ok(response) = inner.call(request).await;
        let (mut parts, body) = response.into_parts();
        for (name, value) in &headers {
            parts.headers.append(name, value.clone());
        }
        let body = watch_answer(&mut parts, body, watch, strip);
        Ok(Response::from_parts(parts, body))
    }

    /// Reserves the request's worst case in every window of the key's and its group's quotas:
    /// what is held, and the token headers for the answer; or the refusal to send.
    async fn reserve(
        &self,
        key: &KeyEntry,
        parsed: &ParsedRequest,
        prompt: PromptTokens,
        rate: Option<Rate>,
    ) -> Result<(Option<Held>, HeaderMap), Response<GatewayBody>> {
        let mut headers = HeaderMap::new();
        if key.windows.is_empty() {
            return Ok((None, headers));
        }
        let completion = parsed.generation.completion_bound(cap(key));
        let need = Amounts {
            tokens: prompt.bound.saturating_add(completion),
            cost: rate.map_or(0, |rate| rate.cost(prompt.bound, completion)),
        };
        match self.backend.reserve(&key.windows, need).await {
            Ok(Ok((held, windows))) => {
                token_headers(&mut headers, &windows, Some(&key.windows));
                Ok((Some(held), headers))
            }
            Ok(Err(denied)) => {
                self.metrics.rejection(&key.name, Rejection::Quota);
                Err(refusal(denied, &key.pricing.currency))
            }
            Err(unavailable) => {
                self.metrics
                    .rejection(&key.name, Rejection::StateUnavailable);
                Err(GatewayError::StateUnavailable(unavailable.into()).into_response())
            }
        }
    }
}

/// The 429 for a window without room, with its reset and token headers.
fn refusal(denied: QuotaDenied, currency: &str) -> Response<GatewayBody> {
    let unit = denied.id.unit;
    let amount = |n: u64| match unit {
        Unit::Tokens => n.to_string(),
        Unit::Cost => cost::decimal(u128::from(n)),
    };
    let mut response = GatewayError::QuotaExceeded(Box::new(QuotaRefusal {
        unit: match unit {
            Unit::Tokens => "token",
            Unit::Cost => "cost",
        },
        window: denied.id.per.label(),
        scope: format!("{} {}", denied.id.scope.label(), denied.id.name),
        limit: amount(denied.limit),
        used: amount(denied.used),
        needed: amount(denied.needed),
        units: match unit {
            Unit::Tokens => "tokens".to_owned(),
            Unit::Cost => currency.to_owned(),
        },
        retry_after: denied.retry_after,
    }))
    .into_response();
    let status = WindowStatus {
        scope: denied.id.scope,
        unit,
        per: denied.id.per,
        limit: denied.limit,
        used: denied.used,
        reserved: None,
        remaining: denied.limit.saturating_sub(denied.used),
        reset_after: denied.retry_after,
        length: denied.length,
    };
    token_headers(response.headers_mut(), &[status], None);
    response
}

/// The answer's body, watched for usage into `watch` — unless it is the gateway's own error
/// (502/504), which has none worth watching.
fn watch_answer(
    parts: &mut Parts,
    body: GatewayBody,
    watch: Arc<UsageWatch>,
    strip: bool,
) -> GatewayBody {
    if parts.extensions.get::<ErrorSource>().is_some() {
        return body;
    }
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
    if strip && sse {
        // The stripped body is shorter: its length is no longer the upstream's.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    WatchedBody::new(body, watch, sse, strip && sse).boxed_unsync()
}

/// The key's cap on `max_tokens`, if it has one.
fn cap(key: &KeyEntry) -> Option<u64> {
    key.limits.max_tokens.map(|cap| u64::from(cap.get()))
}

/// OpenAI's `x-ratelimit-*-tokens` for the tightest token window of key and group, and every
/// window in the IETF fields (`"tokens-1h"`, `"cost-month"`, `"group-tokens-1d"`); a cost
/// window's quota is in currency units (at most 3 decimals).
///
/// `cache`, the windows of `windows` in the same order, keeps each window's `RateLimit-Policy`
/// value: it changes only with the window's length.
fn token_headers(headers: &mut HeaderMap, windows: &[WindowStatus], cache: Option<&[Window]>) {
    headers.reserve(windows.len() + 4);
    // The tightest token window, and its name (it is in two fields).
    let mut tightest: Option<(&WindowStatus, String)> = None;
    for (i, window) in windows.iter().enumerate() {
        let kept = cache
            .and_then(|c| c.get(i))
            .map(|w| w.policy_header.get_or_init(|| policy_header(window)))
            .filter(|kept| kept.length == window.length);
        let fresh;
        let policy = match kept {
            Some(kept) => kept,
            None => {
                fresh = policy_header(window);
                &fresh
            }
        };
        if let Some(value) = &policy.value {
            headers.append(RATELIMIT_POLICY, value.clone());
        }
        let tighter = tightest
            .as_ref()
            .is_none_or(|(t, _)| window.remaining < t.remaining);
        if window.unit == Unit::Tokens && tighter {
            tightest = Some((window, policy.name.clone()));
        }
    }
    let Some((tightest, name)) = tightest else {
        return;
    };
    headers.insert(LIMIT_TOKENS, tightest.limit.into());
    headers.insert(REMAINING_TOKENS, tightest.remaining.into());
    if let Ok(value) =
        HeaderValue::try_from(crate::layers::rate_limit::go_duration(tightest.reset_after))
    {
        headers.insert(RESET_TOKENS, value);
    }
    if let Ok(value) = HeaderValue::try_from(format!(
        "\"{name}\";r={};t={}",
        tightest.remaining,
        retry_after_secs(tightest.reset_after)
    )) {
        headers.append(RATELIMIT, value);
    }
}

/// A window's name and its `RateLimit-Policy` value (`"tokens-1h";q=100000;w=3600`).
fn policy_header(window: &WindowStatus) -> PolicyHeader {
    let quota = match window.unit {
        Unit::Tokens => window.limit.to_string(),
        // Structured-field decimals have at most 3 decimals: shown to the thousandth, down.
        Unit::Cost => cost::decimal(u128::from(window.limit / 1_000_000 * 1_000_000)),
    };
    let name = policy_name(window);
    let text = format!("\"{name}\";q={quota};w={}", window.length.as_secs());
    PolicyHeader {
        value: HeaderValue::try_from(text).ok(),
        name,
        length: window.length,
    }
}

/// A window's name in `RateLimit-Policy`: `tokens-1h`, `cost-month`, `group-tokens-1d`.
fn policy_name(window: &WindowStatus) -> String {
    let scope = match window.scope {
        Scope::Key => "",
        Scope::Group => "group-",
    };
    format!("{scope}{}-{}", window.unit.label(), window.per.label())
}
