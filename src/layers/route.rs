//! Routing: the only paths the gateway serves, each mapped to an [`Endpoint`]. Everything else
//! is answered here (404, or 405 with `Allow`) and never forwarded.
//!
//! Edge cases: `/openai/v1/…` and `/v1/…` are the same endpoint; the query string plays no part
//! in matching (the proxy keeps it); a trailing slash or any other spelling is a different path.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Method, Request, Response};
use tower::{Layer, Service};

use crate::http::body::GatewayBody;
use crate::http::context::{Endpoint, RequestContext};
use crate::http::error::GatewayError;

/// Matches a request's method and path to an endpoint.
pub(crate) fn resolve(method: &Method, path: &str) -> Result<Endpoint, GatewayError> {
    let api_path = path.strip_prefix("/openai").unwrap_or(path);
    let (endpoint, allowed, allow) = match api_path {
        "/v1/chat/completions" => (Endpoint::ChatCompletions, Method::POST, "POST"),
        "/v1/completions" => (Endpoint::Completions, Method::POST, "POST"),
        "/v1/models" => (Endpoint::Models, Method::GET, "GET"),
        _ => {
            return Err(GatewayError::NotFound {
                path: path.to_owned(),
            })
        }
    };
    if *method == allowed {
        Ok(endpoint)
    } else {
        Err(GatewayError::MethodNotAllowed { allow })
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RouteLayer;

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Route<S> {
        Route { inner }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Route<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Route<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>, Error = Infallible>,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<GatewayBody>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(context) = RequestContext::of(&request) else {
            let error = GatewayError::Internal("route reached without a request context".into());
            return Either::Left(ready(Ok(error.into_response())));
        };
        match resolve(request.method(), request.uri().path()) {
            Ok(endpoint) => {
                context.set_endpoint(endpoint);
                Either::Right(self.inner.call(request))
            }
            Err(error) => Either::Left(ready(Ok(error.into_response()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_prefixes_reach_the_same_endpoint() {
        for path in ["/openai/v1/chat/completions", "/v1/chat/completions"] {
            assert_eq!(
                resolve(&Method::POST, path).ok(),
                Some(Endpoint::ChatCompletions),
                "{path}"
            );
        }
        assert_eq!(
            resolve(&Method::GET, "/openai/v1/models").ok(),
            Some(Endpoint::Models)
        );
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        for path in [
            "/",
            "/v1/chat/completions/",
            "/v2/completions",
            "/openai/openai/v1/models",
            "/v1/embeddings",
        ] {
            assert!(
                matches!(
                    resolve(&Method::POST, path),
                    Err(GatewayError::NotFound { .. })
                ),
                "{path} must be 404"
            );
        }
        assert!(matches!(
            resolve(&Method::GET, "/v1/chat/completions"),
            Err(GatewayError::MethodNotAllowed { allow: "POST" })
        ));
        assert!(matches!(
            resolve(&Method::DELETE, "/v1/models"),
            Err(GatewayError::MethodNotAllowed { allow: "GET" })
        ));
    }
}
