//! The accept loop and one task per connection (HTTP/1.1 and h2c on the same port), obeying its
//! [`ConnCtl`](crate::conn::ConnCtl): an answer can close its connection after the response
//! (close-after-stream) or drop it at once, with an RST (reset-before-headers).

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::conn::ConnCtl;
use crate::respond::handle;
use crate::Shared;

pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    shared.connections.fetch_add(1, Ordering::SeqCst);
                    // Best effort; a failure only costs latency.
                    let _ = tcp.set_nodelay(true);
                    conns.spawn(serve_connection(tcp, Arc::clone(&shared), Arc::clone(&builder)));
                }
                // E.g. EMFILE: back off briefly instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
) {
    let ctl = Arc::new(ConnCtl::default());
    let io = TokioIo::new(MockIo {
        tcp,
        ctl: Arc::clone(&ctl),
    });
    let svc_ctl = Arc::clone(&ctl);
    let service = service_fn(move |req| handle(Arc::clone(&shared), Arc::clone(&svc_ctl), req));
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            () = ctl.kill.notified() => break,
            () = ctl.close.notified(), if !closing => {
                closing = true;
                // Finishes the in-flight response, then closes; the response
                // head was already written, so it never says `Connection: close`.
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The TCP stream, plus "reset on drop" for `reset-before-headers`.
struct MockIo {
    tcp: TcpStream,
    ctl: Arc<ConnCtl>,
}

impl Drop for MockIo {
    fn drop(&mut self) {
        if self.ctl.reset.load(Ordering::SeqCst) {
            // Best effort: makes the close an RST instead of a FIN.
            let _ = self.tcp.set_zero_linger();
        }
    }
}

impl AsyncRead for MockIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for MockIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
