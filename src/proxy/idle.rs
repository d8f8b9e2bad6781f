//! One worker's idle connections to one endpoint: the stack an endpoint holds for each worker and
//! the client takes from and gives back to (its own module, so that the endpoint's state and the
//! client that drives the connections do not import each other).

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http2;
use tokio::time::Instant;

use crate::proxy::h1::H1;

pub(crate) type H2 = http2::SendRequest<Full<Bytes>>;

/// One worker's idle connections to one endpoint.
#[derive(Default)]
pub(crate) struct Idle {
    /// Most recently used last: taken from the top, so cold ones age out at the bottom.
    pub(crate) h1: Vec<(H1, Instant)>,
    pub(crate) h2: Option<H2>,
}
