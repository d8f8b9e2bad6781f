//! A deadline on a new client connection's first bytes: it must tell HTTP/1.1 from h2c within
//! `server.header_read_timeout`.
//!
//! hyper's own `header_read_timeout` starts only once hyper-util's `auto` builder has decided
//! which protocol a connection speaks; until then nothing times out, so a connection that sends
//! nothing, one byte, or part of the h2 preface was held open forever (a slowloris that costs one
//! socket and no bytes). Past the deadline, reads fail with `TimedOut` until the protocol is
//! known; after that this is a pass-through.

use std::time::Duration;

/// The first bytes of an HTTP/2 connection; hyper-util's `auto` builder reads until the bytes seen
/// differ from it (HTTP/1.1) or all of it has come (h2c).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection that must tell HTTP/1.1 from h2c within `server.header_read_timeout`.
/// hyper's own `header_read_timeout` starts only once hyper-util's `auto` builder has decided,
/// and until then nothing times out: a connection that sends nothing, one byte, or part of the
/// h2 preface was held open forever (a slowloris that costs one socket and no bytes). Reads fail
/// with `TimedOut` past the deadline until the protocol is known; then this is a pass-through.
pub(crate) struct FirstBytesDeadline<I> {
    io: I,
    /// Until the protocol is known: the deadline, and how many leading bytes matched the preface.
    pending: Option<(std::pin::Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl<I> FirstBytesDeadline<I> {
    pub(crate) fn new(io: I, timeout: Duration) -> Self {
        FirstBytesDeadline {
            io,
            pending: Some((Box::pin(tokio::time::sleep(timeout)), 0)),
        }
    }
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FirstBytesDeadline<I> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        let Some((deadline, matched)) = this.pending.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                // EOF, a byte off the preface, or the whole preface: the protocol is known.
                let mut known = new.is_empty();
                for &byte in new {
                    if *matched == H2_PREFACE.len() || byte != H2_PREFACE[*matched] {
                        known = true;
                        break;
                    }
                    *matched += 1;
                }
                if known || *matched == H2_PREFACE.len() {
                    this.pending = None;
                }
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no request within server.header_read_timeout",
                )));
            }
            _ => {}
        }
        polled
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FirstBytesDeadline<I> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
