//! An HTTP/1.1 upstream connection that the task using it drives itself: the handle requests are
//! sent on, and hyper's connection future, polled by the request's own task (while the request
//! is sent and while its answer is read), never by a task of its own.
//!
//! Why not a task per connection: hyper hands an answer's body from the connection to the reader
//! one chunk at a time through a one-slot channel. With the connection on a task of its own,
//! every SSE event costs a round trip between two tasks, and the reader, finding nothing ready
//! after each event, lets hyper's server write each event with a system call of its own. Driven
//! from the reader's task, every chunk already in the connection's read buffer is decoded on the
//! spot, so the events that are already there leave together ([`crate::proxy::answer`]).
//!
//! Edge cases:
//! - An idle connection is not polled: an upstream that closed it while it sat in the pool is
//!   found out when it is next taken (one poll reads the EOF), and one that closes it just then
//!   fails before any response byte, which the caller retries on a fresh connection.
//! - The connection future is dropped when it ends (closed, or failed): the body reading from it
//!   gets hyper's error, and the handle reads as closed.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::either::Either;

type Connection = http1::Connection<TokioIo<Io>, Full<Bytes>>;

/// An HTTP/1.1 connection to an upstream, driven by whoever holds it.
pub(crate) struct H1 {
    sender: http1::SendRequest<Full<Bytes>>,
    /// `None` once it ended. Boxed: it is large, and the handle moves in and out of the pool.
    conn: Option<Box<Connection>>,
}

impl H1 {
    /// Runs hyper's HTTP/1.1 handshake on `io` (nothing is sent yet).
    pub(crate) async fn handshake(io: Io) -> hyper::Result<H1> {
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
        Ok(H1 {
            sender,
            conn: Some(Box::new(conn)),
        })
    }

    /// Reads and writes what the connection can now, without waiting. `false` once it ended.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        match Pin::new(conn.as_mut()).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(error) = result {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
                self.conn = None;
                false
            }
        }
    }

    /// Whether the connection is still open: one poll (with no waker of use) reads an EOF or an
    /// error that came while it sat idle.
    pub(crate) fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.drive(&mut cx) && !self.sender.is_closed()
    }

    /// Whether it can no longer be used.
    pub(crate) fn is_closed(&self) -> bool {
        self.conn.is_none() || self.sender.is_closed()
    }

    /// Sends `request` once the connection is ready for it, and waits for the response head,
    /// driving the connection all along.
    pub(crate) async fn send(
        &mut self,
        request: Request<Full<Bytes>>,
    ) -> hyper::Result<Response<Incoming>> {
        std::future::poll_fn(|cx| {
            self.drive(cx);
            self.sender.poll_ready(cx)
        })
        .await?;
        let mut answer = pin!(self.sender.try_send_request(request));
        std::future::poll_fn(|cx| {
            self.drive(cx);
            answer.as_mut().poll(cx)
        })
        .await
        .map_err(|e| e.into_error())
    }
}

/// A connection's transport: plain TCP (left) or TLS over it (right); one type, so that the
/// connection's is one.
pub(crate) type Io = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;
