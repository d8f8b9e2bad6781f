//! A worker: one OS thread with its own single-threaded tokio runtime, which accepts client
//! connections from the shared listener and serves them with its own copy of the request stack,
//! and so its own upstream connection pool.
//!
//! Why threads with their own runtimes rather than one work-stealing runtime: a proxied request
//! is a chain of small hand-offs (client connection → stack → upstream connection task → back to
//! the client connection). On a work-stealing runtime each hand-off can cross threads, and a
//! cross-thread wake is a futex call, a context switch and cold caches: perf put the scheduler's
//! switches at ~18 % of the gateway's CPU (bench/profile.sh). Here every task of a request stays
//! on the thread that accepted its connection, as in nginx's worker model. Every worker waits on
//! the same listening socket, and whichever is free first accepts, so new connections go where
//! there is time for them.
//!
//! Shutdown runs in [`Phase`]s that the server announces to all workers at once: stop accepting
//! and let connections finish (`Drain`), cut what is left (`Cut`), and end the thread (`Exit`).
//! Between `Cut` and `Exit` the runtime still runs, so what a cut request does as it drops
//! (settling its usage) completes.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use crate::http::body::BoxError;
use crate::server::first_bytes::FirstBytesDeadline;

/// A client must finish its TLS handshake within this time.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server is in its life; workers watch it. Ordered: each phase implies the ones
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serve,
    /// Stop accepting; let open connections finish their requests.
    Drain,
    /// The shutdown deadline passed: close the connections still open.
    Cut,
    /// Every connection is closed and settled: end the thread.
    Exit,
}

/// The request stack as a worker serves it (what `stack::build_stack` returns).
pub trait Stack<B>:
    Service<Request<Incoming>, Response = Response<B>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S, B> Stack<B> for S where
    S: Service<
            Request<Incoming>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A response body as a worker sends it.
pub trait ResponseBody: Body<Data = Bytes, Error = BoxError> + Send + 'static {}

impl<B> ResponseBody for B where B: Body<Data = Bytes, Error = BoxError> + Send + 'static {}

/// How every client connection is served, the same on every worker.
pub struct ConnectionSettings {
    pub builder: auto::Builder<TokioExecutor>,
    pub tls: Option<TlsAcceptor>,
    /// The client must show which protocol it speaks within this time (see `first_bytes`).
    pub head_timeout: Duration,
}

/// A running worker thread.
pub struct Worker {
    thread: std::thread::JoinHandle<()>,
    /// Completes (or fails, if the thread died) once the worker has no connection left.
    pub closed: oneshot::Receiver<()>,
}

impl Worker {
    /// Starts worker `index` on its own thread. It serves until `phase` moves on, or until its
    /// sender is dropped (the server is gone), which counts as `Exit`.
    pub fn spawn<S, B>(
        index: usize,
        listener: std::net::TcpListener,
        stack: S,
        settings: Arc<ConnectionSettings>,
        phase: watch::Receiver<Phase>,
    ) -> std::io::Result<Worker>
    where
        S: Stack<B>,
        B: ResponseBody,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (closed_tx, closed) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("tollgate-worker-{index}"))
            .spawn(move || {
                runtime.block_on(serve(listener, stack, settings, phase, closed_tx));
            })?;
        Ok(Worker { thread, closed })
    }

    /// Waits for the thread to end (after [`Phase::Exit`]).
    pub fn join(self) {
        if self.thread.join().is_err() {
            tracing::error!("a worker thread panicked");
        }
    }
}

async fn serve<S, B>(
    listener: std::net::TcpListener,
    stack: S,
    settings: Arc<ConnectionSettings>,
    mut phase: watch::Receiver<Phase>,
    closed: oneshot::Sender<()>,
) where
    S: Stack<B>,
    B: ResponseBody,
{
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    match TcpListener::from_std(listener) {
        Ok(listener) => loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let service = TowerToHyperService::new(stack.clone());
                        connections.spawn(serve_connection(
                            stream,
                            service,
                            settings.clone(),
                            graceful.watcher(),
                        ));
                    }
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                // Finished connections leave the set as they end, so it holds only open ones.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                () = reached(&mut phase, Phase::Drain) => break,
            }
        },
        Err(error) => tracing::error!(%error, "a worker cannot use the listener"),
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = reached(&mut phase, Phase::Cut) => connections.shutdown().await,
    }
    let _ = closed.send(());
    reached(&mut phase, Phase::Exit).await;
}

/// Completes once the server has reached `target`, or is gone.
async fn reached(phase: &mut watch::Receiver<Phase>, target: Phase) {
    let _ = phase.wait_for(|now| *now >= target).await;
}

async fn serve_connection<S, B>(
    stream: TcpStream,
    service: TowerToHyperService<S>,
    settings: Arc<ConnectionSettings>,
    watcher: Watcher,
) where
    S: Stack<B>,
    B: ResponseBody,
{
    // Each SSE event must leave at once, not wait for a delayed ACK (Nagle).
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let result = match &settings.tls {
        None => serve_http(stream, service, &settings, watcher).await,
        // The handshake runs in the connection's task: a slow client delays only itself.
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => serve_http(stream, service, &settings, watcher).await,
                Ok(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(error = %error, "client connection ended with an error");
    }
}

/// HTTP/1.1 or h2c over `io` (plain TCP or TLS), until the connection ends or drains.
async fn serve_http<I, S, B>(
    io: I,
    service: TowerToHyperService<S>,
    settings: &ConnectionSettings,
    watcher: Watcher,
) -> Result<(), BoxError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Stack<B>,
    B: ResponseBody,
{
    let io = FirstBytesDeadline::new(io, settings.head_timeout);
    let connection = settings.builder.serve_connection(TokioIo::new(io), service);
    watcher.watch(connection.into_owned()).await
}
