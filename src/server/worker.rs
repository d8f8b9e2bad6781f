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
//!
//! What a connection may cost: at most `server.max_connections` are open at once across all
//! workers (one more is closed as soon as it is accepted); one with nothing in flight is closed
//! after `server.idle_timeout` (after `server.header_read_timeout` before its first request; see
//! `idle`). When `accept` fails — out of descriptors (EMFILE) most often — the worker backs off
//! briefly and tries again, and says so once per episode, not once per attempt.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::Service;

use crate::http::body::BoxError;
use crate::server::first_bytes::FirstBytesDeadline;
use crate::server::idle::{Activity, Tracked};

/// How long a worker waits before it tries `accept` again after it failed.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a connection being closed with nothing in flight may take to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Where the server is in its life; workers watch it. Ordered: each phase implies the ones
/// before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Serve,
    /// Stop accepting; let open connections finish their requests.
    Drain,
    /// The shutdown deadline passed: close the connections still open.
    Cut,
    /// Every connection is closed and settled: end the thread.
    Exit,
}

/// The request stack as a worker serves it (what `stack::build_stack` returns).
pub(crate) trait Stack<B>:
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
pub(crate) trait ResponseBody:
    Body<Data = Bytes, Error = BoxError> + Send + 'static
{
}

impl<B> ResponseBody for B where B: Body<Data = Bytes, Error = BoxError> + Send + 'static {}

/// How every client connection is served, the same on every worker.
pub(crate) struct ConnectionSettings {
    pub(crate) builder: auto::Builder<TokioExecutor>,
    pub(crate) tls: Option<TlsAcceptor>,
    /// The client must show which protocol it speaks, and send its first request, within this
    /// time (see `first_bytes` and `idle`).
    pub(crate) head_timeout: Duration,
    /// A connection with nothing in flight for this long is closed.
    pub(crate) idle_timeout: Duration,
    pub(crate) limit: ConnectionLimit,
}

/// Client connections open across all workers, against `server.max_connections`.
#[derive(Debug)]
pub(crate) struct ConnectionLimit {
    max: usize,
    open: Arc<AtomicUsize>,
    /// Whether new connections are being turned away, and whether `accept` is failing: each
    /// is logged when it starts and when it ends.
    refusing: AtomicBool,
    accept_failing: AtomicBool,
}

/// One open connection's place under the cap; its drop gives the place back.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionLimit {
    pub(crate) fn new(max: std::num::NonZeroUsize) -> Self {
        ConnectionLimit {
            max: max.get(),
            open: Arc::new(AtomicUsize::new(0)),
            refusing: AtomicBool::new(false),
            accept_failing: AtomicBool::new(false),
        }
    }

    fn admit(&self) -> Option<Slot> {
        let open = self.open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.open.clone());
        if open < self.max {
            if self.refusing.swap(false, Ordering::Relaxed) {
                tracing::info!(max = self.max, "accepting new connections again");
            }
            return Some(slot);
        }
        if !self.refusing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max = self.max,
                "server.max_connections reached: new connections are closed until some end"
            );
        }
        None
    }

    fn accept_failed(&self, error: &std::io::Error) {
        if !self.accept_failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "accept failed; retrying every {ACCEPT_BACKOFF:?} until it works");
        }
    }

    fn accepted(&self) {
        if self.accept_failing.swap(false, Ordering::Relaxed) {
            tracing::info!("accept works again");
        }
    }
}

/// A running worker thread.
pub(crate) struct Worker {
    thread: std::thread::JoinHandle<()>,
    /// Completes (or fails, if the thread died) once the worker has no connection left.
    pub(crate) closed: oneshot::Receiver<()>,
}

impl Worker {
    /// Starts worker `index` on its own thread. It serves until `phase` moves on, or until its
    /// sender is dropped (the server is gone), which counts as `Exit`.
    pub(crate) fn spawn<S, B>(
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
    pub(crate) fn join(self) {
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
    let mut connections = JoinSet::new();
    match TcpListener::from_std(listener) {
        Ok(listener) => loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        settings.limit.accepted();
                        // Past the cap, the stream is dropped here: closed at once.
                        if let Some(slot) = settings.limit.admit() {
                            connections.spawn(serve_connection(
                                stream,
                                stack.clone(),
                                settings.clone(),
                                phase.clone(),
                                slot,
                            ));
                        }
                    }
                    Err(error) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        settings.limit.accept_failed(&error);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
                // Finished connections leave the set as they end, so it holds only open ones.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                () = reached(&mut phase, Phase::Drain) => break,
            }
        },
        Err(error) => tracing::error!(%error, "a worker cannot use the listener"),
    }
    // Each connection saw `Drain` too, and is finishing its requests.
    let finished = tokio::select! {
        () = async { while connections.join_next().await.is_some() {} } => true,
        () = reached(&mut phase, Phase::Cut) => false,
    };
    if !finished {
        connections.shutdown().await;
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
    stack: S,
    settings: Arc<ConnectionSettings>,
    phase: watch::Receiver<Phase>,
    _slot: Slot,
) where
    S: Stack<B>,
    B: ResponseBody,
{
    // Each SSE event must leave at once, not wait for a delayed ACK (Nagle).
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let result = match &settings.tls {
        None => serve_http(stream, stack, &settings, phase).await,
        Some(acceptor) => match crate::server::tls::accept(acceptor, stream).await {
            Some(stream) => serve_http(stream, stack, &settings, phase).await,
            None => return,
        },
    };
    if let Err(error) = result {
        tracing::debug!(error = %error, "client connection ended with an error");
    }
}

/// HTTP/1.1 or h2c over `io` (plain TCP or TLS), until the connection ends, drains, or has been
/// idle too long. Both of the last two close it gracefully: hyper finishes what is in flight
/// (on HTTP/2 after a GOAWAY), then closes.
async fn serve_http<I, S, B>(
    io: I,
    stack: S,
    settings: &ConnectionSettings,
    mut phase: watch::Receiver<Phase>,
) -> Result<(), BoxError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Stack<B>,
    B: ResponseBody,
{
    let io = FirstBytesDeadline::new(io, settings.head_timeout);
    let activity = Activity::new();
    let service = TowerToHyperService::new(Tracked::new(stack, activity.clone()));
    let connection = settings.builder.serve_connection(TokioIo::new(io), service);
    let idle = activity.idle(settings.head_timeout, settings.idle_timeout);
    let drain = reached(&mut phase, Phase::Drain);
    tokio::pin!(connection, idle, drain);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => return result,
            () = &mut drain, if !closing => {}
            () = &mut idle, if !closing => {}
            // An HTTP/2 graceful close waits for the peer to answer a PING, which a silent peer
            // never does: with nothing in flight, there is nothing to wait for.
            () = tokio::time::sleep(CLOSE_GRACE), if closing => {
                if !activity.busy() {
                    return Ok(());
                }
                continue;
            }
        }
        closing = true;
        connection.as_mut().graceful_shutdown();
    }
}
