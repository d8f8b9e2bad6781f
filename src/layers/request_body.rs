//! Reads the request body into one `Bytes`, capped at `server.max_body_bytes`.
//!
//! The body is needed whole by the layers after this one (validation, quota estimates), and a
//! buffered body can be sent again if the upstream drops a pooled connection before answering.
//!
//! Edge cases:
//! - A `Content-Length` above the cap is refused with 413 before a byte of the body is read.
//! - A chunked body is counted as it arrives and refused with 413 the moment it passes the cap,
//!   so the gateway never holds more than the cap in memory.
//! - A client that breaks off while sending its body gets a 400 (if it is still there to read it).
//! - A client that trickles its body slower than `server.body_read_timeout` allows gets a 408.
//! - Each of these answers carries `Connection: close`: the unread rest of the body would be
//!   taken for the next request, and a client that reuses the connection would see it closed.
//! - After a 413 on HTTP/1.1 the rest of the body is read and dropped for a while ([`linger`],
//!   nginx's lingering close), so that a client that sends its whole body before it reads (as
//!   Python's `http.client` and `urllib` do) reads the 413 rather than a reset connection.

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{header, HeaderValue, Request, Response, Version};
use http_body::Body;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::{Layer, Service};

use crate::http::body::{BoxError, GatewayBody};
use crate::http::error::GatewayError;

/// How long, and how much, of a refused body is read and dropped before the connection closes.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestBodyLayer {
    limit: usize,
    timeout: Duration,
}

impl RequestBodyLayer {
    pub(crate) fn new(limit: usize, timeout: Duration) -> Self {
        RequestBodyLayer { limit, timeout }
    }
}

impl<S> Layer<S> for RequestBodyLayer {
    type Service = RequestBody<S>;

    fn layer(&self, inner: S) -> RequestBody<S> {
        RequestBody {
            inner,
            limit: self.limit,
            timeout: self.timeout,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RequestBody<S> {
    inner: S,
    limit: usize,
    timeout: Duration,
}

impl<S, B> Service<Request<B>> for RequestBody<S>
where
    S: Service<Request<Bytes>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Take the service that poll_ready made ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (limit, timeout) = (self.limit, self.timeout);
        Box::pin(async move {
            let error = match tokio::time::timeout(timeout, read_capped(request, limit)).await {
                Ok(Ok(request)) => return inner.call(request).await,
                Ok(Err((error, rest))) => {
                    if let Some(rest) = rest {
                        tokio::spawn(linger(rest));
                    }
                    error
                }
                Err(_) => GatewayError::RequestTimeout,
            };
            // The body was not read to its end, so the rest of it is still on the connection:
            // tell the client not to send another request on it (hyper then closes it, and
            // drops the header on HTTP/2, where it does not apply).
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Ok(response)
        })
    }
}

/// The body read whole, or why not — with the unread rest of a body too large, when it is to be
/// drained ([`linger`]).
async fn read_capped<B>(
    request: Request<B>,
    limit: usize,
) -> Result<Request<Bytes>, (GatewayError, Option<B>)>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (parts, mut body) = request.into_parts();
    // HTTP/2 ends a stream whose body is not read without closing the connection: no need.
    let lingers = parts.version <= Version::HTTP_11;
    let too_large = |rest: B| {
        (
            GatewayError::PayloadTooLarge { limit },
            lingers.then_some(rest),
        )
    };
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large(body));
    }
    match Limited::new(&mut body, limit).collect().await {
        Ok(collected) => Ok(Request::from_parts(parts, collected.to_bytes())),
        Err(error) if error.is::<LengthLimitError>() => Err(too_large(body)),
        Err(error) => Err((
            GatewayError::BadRequest(format!("could not read the request body: {error}")),
            None,
        )),
    }
}

/// Reads and drops what is left of a refused body, for at most [`LINGER_TIME`] and
/// [`LINGER_BYTES`]. Closing a socket with unread data in it resets the connection, and the
/// reset throws away the answer on its way to a client still busy sending; once the body is
/// read, hyper closes the connection (the answer said `Connection: close`) with a clean FIN.
async fn linger<B>(mut body: B)
where
    B: Body<Data = Bytes> + Unpin,
{
    let drain = async {
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => drained += frame.data_ref().map_or(0, Bytes::len),
                Some(Err(_)) | None => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use tower::ServiceExt;

    fn echo_len() -> impl Service<
        Request<Bytes>,
        Response = Response<GatewayBody>,
        Error = Infallible,
        Future = impl Send,
    > + Clone
           + Send
           + 'static {
        tower::service_fn(|request: Request<Bytes>| async move {
            Ok::<_, Infallible>(Response::new(crate::http::body::full(
                request.body().len().to_string(),
            )))
        })
    }

    async fn text(response: Response<GatewayBody>) -> String {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn body_within_the_cap_reaches_the_inner_service() {
        let svc = RequestBodyLayer::new(10, Duration::from_secs(5)).layer(echo_len());
        let response = svc
            .oneshot(Request::new(Full::new(Bytes::from_static(b"0123456789"))))
            .await
            .expect("infallible");
        assert_eq!(response.status(), 200);
        assert_eq!(text(response).await, "10");
    }

    #[tokio::test]
    async fn declared_length_over_the_cap_is_refused_unread() {
        let svc = RequestBodyLayer::new(10, Duration::from_secs(5)).layer(echo_len());
        let request = Request::builder()
            .header(header::CONTENT_LENGTH, "11")
            .body(Full::new(Bytes::from_static(b"0123456789a")))
            .expect("request");
        let response = svc.oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), 413);
    }

    #[tokio::test]
    async fn chunked_body_is_cut_at_the_cap() {
        let chunks = (0..5)
            .map(|_| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"abcd"))));
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let svc = RequestBodyLayer::new(10, Duration::from_secs(5)).layer(echo_len());
        let response = svc.oneshot(Request::new(body)).await.expect("infallible");
        assert_eq!(response.status(), 413);
    }
}
