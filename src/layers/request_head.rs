//! Caps the request head: the request line and header fields together may hold at most
//! `server.max_header_bytes`, or the answer is 431 in the error shape.
//!
//! Counted the way HTTP/1.1 writes a head — `METHOD URI HTTP/1.1\r\n`, then `name: value\r\n`
//! per field — so that HTTP/1.1 and HTTP/2 requests meet the same limit. hyper's own limits (its
//! HTTP/1.1 read buffer, h2's `max_header_list_size`) are set well above this one (see
//! `server`), so it is this layer that answers, not hyper's bodiless 431.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::task::{Context, Poll};

use futures_util::future::Either;
use http::{Request, Response};
use tower::{Layer, Service};

use crate::http::body::GatewayBody;
use crate::http::error::GatewayError;

/// `" "` twice and `" HTTP/1.1\r\n"` around the request line.
const REQUEST_LINE_OVERHEAD: usize = 12;
/// `": "` and `"\r\n"` around each field's name and value.
const FIELD_OVERHEAD: usize = 4;

/// The size of a request's head as HTTP/1.1 would write it.
pub(crate) fn head_bytes<B>(request: &Request<B>) -> usize {
    let uri = request.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + FIELD_OVERHEAD)
        .sum();
    request.method().as_str().len() + target + REQUEST_LINE_OVERHEAD + fields
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestHeadLayer {
    limit: usize,
}

impl RequestHeadLayer {
    pub(crate) fn new(limit: usize) -> Self {
        RequestHeadLayer { limit }
    }
}

impl<S> Layer<S> for RequestHeadLayer {
    type Service = RequestHead<S>;

    fn layer(&self, inner: S) -> RequestHead<S> {
        RequestHead {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RequestHead<S> {
    inner: S,
    limit: usize,
}

impl<S, B> Service<Request<B>> for RequestHead<S>
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
        if head_bytes(&request) > self.limit {
            let error = GatewayError::HeaderFieldsTooLarge { limit: self.limit };
            return Either::Left(ready(Ok(error.into_response())));
        }
        Either::Right(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn counts_the_head_as_http1_writes_it() {
        let request = Request::post("/v1/models?x=1")
            .header("ab", "cde")
            .body(())
            .expect("request");
        // "POST /v1/models?x=1 HTTP/1.1\r\n" + "ab: cde\r\n"
        assert_eq!(head_bytes(&request), 30 + 9);
    }

    #[tokio::test]
    async fn a_head_past_the_limit_is_answered_431() {
        let inner = tower::service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(crate::http::body::full("ok")))
        });
        let service = RequestHeadLayer::new(100).layer(inner);
        let small = Request::get("/").body(()).expect("request");
        let response = service.clone().oneshot(small).await.expect("infallible");
        assert_eq!(response.status(), 200);
        let big = Request::get("/")
            .header("x-big", "v".repeat(100))
            .body(())
            .expect("request");
        let response = service.oneshot(big).await.expect("infallible");
        assert_eq!(response.status(), 431);
    }
}
