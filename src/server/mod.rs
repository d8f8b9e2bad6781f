//! The client listener and its connections: HTTP/1.1 and h2c on one port (hyper-util's `auto`
//! builder), keep-alive, TCP_NODELAY, and graceful shutdown — stop accepting, let in-flight
//! requests and streams finish for up to `server.shutdown_timeout`, then close what is left.
//!
//! The admin listener runs beside it until the client side has drained, so that metrics can be
//! scraped during a shutdown; with `[server] admin_tls` it speaks HTTPS, so that the admin token
//! never crosses the network in the clear.

pub(crate) mod admin;
pub(crate) mod console;
pub(crate) mod first_bytes;
pub(crate) mod idle;
pub mod reload;
pub(crate) mod restart_only;
pub(crate) mod tls;
pub(crate) mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::join_all;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::accounting::ledger::Ledger;
use crate::accounting::recent::RecentRequests;
use crate::accounting::Accounting;
use crate::config::Config;
use crate::http::body::BoxError;
use crate::keys::registry::KeyRegistry;
use crate::keys::{KeyStore, SharedKeys};
use crate::layers::validate::Schemas;
use crate::observability::metrics::Metrics;
use crate::observability::traces::{SharedTraces, Traces};
use crate::proxy::pool::{Pools, SharedPools};
use crate::server::admin::Admin;
use crate::server::reload::Reloader;
use crate::server::tls::CertResolver;
use crate::server::worker::{
    ConnectionLimit, ConnectionSettings, Phase, ResponseBody, Stack, Worker,
};
use crate::stack::build_stack;
use crate::state::clock::Clock;
use crate::state::local::LocalState;
use crate::state::managed_keys::{self, Vault};
use crate::state::redis::RedisState;
use crate::state::{Backend, Store};

/// How long a start waits for Redis to hand over the managed keys before it goes on without
/// them (the follower loads them when Redis answers).
const MANAGED_KEYS_LOAD_TIMEOUT: Duration = Duration::from_secs(3);

/// HTTP/2 connections are pinged after this long without a frame, and closed when the ping is
/// not answered within [`H2_KEEP_ALIVE_TIMEOUT`]: a peer that vanished does not hold a socket.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// hyper's own HTTP/1.1 read buffer (~400 KiB), which also bounds a request head.
const H1_DEFAULT_BUF: usize = 8192 + 4096 * 100;
const ALPN_CLIENT: &[&[u8]] = &[b"h2", b"http/1.1"];
const ALPN_ADMIN: &[&[u8]] = &[b"http/1.1"];

/// A bound, not yet running, gateway: both listeners are open, so their addresses are known
/// (useful with port 0 in tests).
pub struct Server {
    config: Config,
    metrics: Arc<Metrics>,
    keys: SharedKeys,
    pools: SharedPools,
    registry: Arc<KeyRegistry>,
    schemas: Arc<Schemas>,
    accounting: Accounting,
    tls: Option<Arc<CertResolver>>,
    admin_tls: Option<Arc<CertResolver>>,
    reloader: Option<Arc<Reloader>>,
    /// Spans, when `[telemetry]` is set.
    traces: SharedTraces,
    listener: TcpListener,
    admin_listener: TcpListener,
}

/// How a server is set up besides its config.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// The file the config came from: reloaded on SIGHUP and when it changes.
    pub config_path: Option<PathBuf>,
    /// The clock the rate limiters read (a manual one in tests).
    pub clock: Clock,
}

impl Server {
    pub async fn bind(config: Config) -> Result<Server, BoxError> {
        Server::bind_with(config, ServerOptions::default()).await
    }

    pub async fn bind_with(config: Config, options: ServerOptions) -> Result<Server, BoxError> {
        // `Config::load` refuses this already; a config built in code is checked here, before the
        // second bind fails with a bare "address in use".
        if let Some(clash) = config.server.listener_clash() {
            return Err(clash.to_string().into());
        }
        let listener = TcpListener::bind(config.server.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
        let admin_listener = TcpListener::bind(config.server.admin_listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", config.server.admin_listen))?;
        let metrics = Arc::new(Metrics::new());
        let store = KeyStore::build_with(
            &config.keys,
            &config.budgets,
            None,
            &options.clock,
            &metrics,
        );
        let keys: SharedKeys = Arc::new(ArcSwap::from_pointee(store));
        // Every endpoint has one idle-connection slot per worker, and one for background calls
        // (health checks).
        let slots = config.server.workers.get() + 1;
        let pools = Pools::build(&config.upstreams, None, slots, &metrics)?;
        let pools: SharedPools = Arc::new(ArcSwap::from_pointee(pools));
        let resolver = |files: &Option<crate::config::tls::TlsFiles>| match files {
            Some(files) => CertResolver::new(&files.cert, &files.key).map(|r| Some(Arc::new(r))),
            None => Ok(None),
        };
        let tls = resolver(&config.server.tls)?;
        let admin_tls = resolver(&config.server.admin_tls)?;
        let schemas = Arc::new(Schemas::compile()?);
        let store = open_state(&config, &options.clock, &metrics)?;
        let backend = Arc::new(Backend::new(store, options.clock.clone(), metrics.clone()));
        let ledger = match &config.ledger {
            Some(ledger) => Some(Arc::new(Ledger::open(ledger, metrics.clone()).await?)),
            None => None,
        };
        let registry = Arc::new(KeyRegistry::new(
            keys.clone(),
            options.clock.clone(),
            metrics.clone(),
            open_vault(&config, &backend)?,
            config.keys.clone(),
            config.policies.clone(),
        ));
        load_managed_keys(&registry).await;
        let reloader = options.config_path.map(|path| {
            Arc::new(Reloader::new(
                path,
                registry.clone(),
                (pools.clone(), slots),
                [tls.clone(), admin_tls.clone()],
                metrics.clone(),
                backend.clone(),
                config.clone(),
            ))
        });
        let accounting = Accounting {
            backend,
            ledger,
            recent: Arc::new(RecentRequests::new()),
        };
        let traces = match &config.telemetry {
            Some(telemetry) => Some(Arc::new(Traces::start(telemetry, &metrics)?)),
            None => None,
        };
        Ok(Server {
            traces,
            config,
            metrics,
            keys,
            pools,
            registry,
            schemas,
            accounting,
            tls,
            admin_tls,
            reloader,
            listener,
            admin_listener,
        })
    }

    /// Reloads the config file, as SIGHUP does; `None` when the config did not come from a file.
    pub fn reloader(&self) -> Option<Arc<Reloader>> {
        self.reloader.clone()
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin_listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BoxError> {
        // Everything that can fail is built before anything starts. One stack per worker, each
        // with its own slot of every endpoint's idle connections.
        let workers = self.config.server.workers.get();
        let stacks = (0..workers)
            .map(|worker| {
                build_stack(
                    &self.config,
                    self.pools.clone(),
                    worker,
                    self.keys.clone(),
                    self.schemas.clone(),
                    self.accounting.clone(),
                    self.metrics.clone(),
                    self.traces.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let settings = self.connection_settings()?;
        let admin_tls = match &self.admin_tls {
            Some(resolver) => Some(crate::server::tls::acceptor(resolver.clone(), ALPN_ADMIN)?),
            None => None,
        };
        let (listen_addr, admin_addr) = (self.local_addr()?, self.admin_addr()?);
        let background = self.spawn_background();
        // Every quota window's gauge, at its value in the state, before the first request.
        let backend = self.accounting.backend.clone();
        let store = self.keys.load();
        let keys: Vec<_> = store.entries().cloned().collect();
        let groups: Vec<_> = store.groups().cloned().collect();
        tokio::spawn(async move { backend.publish_windows(keys, groups).await });
        let admin = self.admin();
        let admin_task = tokio::spawn(serve_admin(self.admin_listener, admin, admin_tls));

        // Dropping `phase` (an error below, or this future dropped) ends every worker.
        let (phase, watching) = watch::channel(Phase::Serve);
        let mut workers = spawn_workers(self.listener, stacks, &settings, &watching)?;
        let upstreams: Vec<String> = self
            .config
            .upstreams
            .iter()
            .map(|pool| {
                let urls: Vec<String> = pool.endpoints.iter().map(|e| e.base_url()).collect();
                format!("{}={}", pool.name, urls.join(","))
            })
            .collect();
        tracing::info!(
            listen = %listen_addr,
            admin = %admin_addr,
            upstreams = %upstreams.join(" "),
            workers = workers.len(),
            "tollgate serving"
        );
        shutdown.await;

        drain_connections(&phase, &mut workers, self.config.server.shutdown_timeout).await;
        admin_task.abort();
        for task in [
            &background.reload,
            &background.reopen,
            &background.health,
            &background.follow,
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
        // Every request has settled (or was cut at the deadline, and settled as it dropped):
        // write what was charged, and the ledger's last lines.
        self.accounting.backend.drain(Duration::from_secs(5)).await;
        if let Some(traces) = &self.traces {
            traces.shutdown(Duration::from_secs(5)).await;
        }
        phase.send_replace(Phase::Exit);
        let _ =
            tokio::task::spawn_blocking(move || workers.into_iter().for_each(Worker::join)).await;
        for task in [background.flusher, background.renewer]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        save_state(&self.accounting).await;
        Ok(())
    }

    fn connection_settings(&self) -> Result<Arc<ConnectionSettings>, BoxError> {
        let server = &self.config.server;
        let tls = match &self.tls {
            Some(resolver) => Some(crate::server::tls::acceptor(resolver.clone(), ALPN_CLIENT)?),
            None => None,
        };
        Ok(Arc::new(ConnectionSettings {
            builder: connection_builder(server),
            tls,
            head_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            limit: ConnectionLimit::new(server.max_connections),
        }))
    }

    /// The state flusher, the Redis lease renewer and the config watcher, as configured.
    fn spawn_background(&self) -> Background {
        let backend = &self.accounting.backend;
        let flush_interval = self.config.state.flush_interval;
        Background {
            flusher: backend
                .local()
                .map(|local| tokio::spawn(local.clone().run_flusher(flush_interval))),
            renewer: backend
                .redis()
                .map(|redis| tokio::spawn(redis.clone().run_renewer())),
            reload: self
                .reloader
                .clone()
                .map(|reloader| tokio::spawn(reloader.watch())),
            reopen: self
                .accounting
                .ledger
                .clone()
                .filter(|ledger| ledger.has_file())
                .map(|ledger| tokio::spawn(reopen_on_hangup(ledger))),
            // The last slot of each endpoint's idle connections is the background one.
            health: Some(tokio::spawn(crate::proxy::health::run(
                self.pools.clone(),
                self.config.server.workers.get(),
            ))),
            follow: self
                .registry
                .vault
                .shared()
                .map(|_| tokio::spawn(crate::keys::follow::run(self.registry.clone()))),
        }
    }

    fn admin(&self) -> Admin {
        Admin {
            metrics: self.metrics.clone(),
            pools: self.pools.clone(),
            backend: self.accounting.backend.clone(),
            recent: self.accounting.recent.clone(),
            keys: self.keys.clone(),
            registry: self.registry.clone(),
            token_digest: self
                .config
                .server
                .admin_token
                .as_ref()
                .map(|t| crate::keys::hash_token(t.expose().as_bytes())),
        }
    }
}

/// Tasks that run beside the listeners until shutdown.
struct Background {
    flusher: Option<tokio::task::JoinHandle<()>>,
    renewer: Option<tokio::task::JoinHandle<()>>,
    reload: Option<tokio::task::JoinHandle<()>>,
    /// Reopens the ledger file on SIGHUP.
    reopen: Option<tokio::task::JoinHandle<()>>,
    /// Health checks, and the endpoints' up gauges.
    health: Option<tokio::task::JoinHandle<()>>,
    /// Follows the managed keys other replicas change (Redis).
    follow: Option<tokio::task::JoinHandle<()>>,
}

/// One worker thread per stack, all accepting on clones of one listener.
fn spawn_workers<S: Stack<B>, B: ResponseBody>(
    listener: TcpListener,
    stacks: Vec<S>,
    settings: &Arc<ConnectionSettings>,
    phase: &watch::Receiver<Phase>,
) -> Result<Vec<Worker>, BoxError> {
    let listener = listener.into_std()?;
    let mut workers = Vec::with_capacity(stacks.len());
    for (index, stack) in stacks.into_iter().enumerate() {
        let listener = listener.try_clone()?;
        workers.push(Worker::spawn(
            index,
            listener,
            stack,
            settings.clone(),
            phase.clone(),
        )?);
    }
    Ok(workers)
}

/// Stops accepting and waits for open connections to finish, for up to `deadline`; then cuts
/// the ones still open.
async fn drain_connections(
    phase: &watch::Sender<Phase>,
    workers: &mut [Worker],
    deadline: Duration,
) {
    tracing::info!(
        ?deadline,
        "shutting down: no new connections; waiting for in-flight requests"
    );
    phase.send_replace(Phase::Drain);
    let mut closed = join_all(workers.iter_mut().map(|worker| &mut worker.closed));
    match tokio::time::timeout(deadline, &mut closed).await {
        Ok(_) => tracing::info!("all connections finished"),
        Err(_) => {
            tracing::warn!(
                ?deadline,
                "shutdown deadline passed; closing the connections still open"
            );
            phase.send_replace(Phase::Cut);
            closed.await;
        }
    }
}

/// Reopens the ledger file on every SIGHUP, so that log rotation (logrotate's `postrotate`
/// sends the signal) gets a new file. Runs beside the config reload, which SIGHUP also asks for.
async fn reopen_on_hangup(ledger: Arc<Ledger>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; the ledger is never reopened");
            return;
        }
    };
    while hangup.recv().await.is_some() {
        ledger.reopen();
    }
}

/// Saves the local usage state and writes the ledger's last lines.
async fn save_state(accounting: &Accounting) {
    if let Some(local) = accounting.backend.local().cloned() {
        match tokio::task::spawn_blocking(move || local.flush()).await {
            Ok(Ok(())) => tracing::info!("usage state saved"),
            Ok(Err(error)) => {
                tracing::error!(%error, "cannot save the usage state at shutdown")
            }
            Err(error) => tracing::error!(%error, "usage state flush failed"),
        }
    }
    if let Some(ledger) = accounting.ledger.clone() {
        let _ = tokio::task::spawn_blocking(move || ledger.close(Duration::from_secs(10))).await;
    }
}

/// The usage state `config` asks for: the local file, or Redis with an in-memory fallback.
fn open_state(config: &Config, clock: &Clock, metrics: &Arc<Metrics>) -> Result<Store, BoxError> {
    Ok(match &config.state.redis {
        None => {
            let local = LocalState::open(Some(config.state.path.clone()), clock.clone())
                .map_err(|error| format!("state.path: {error}"))?;
            Store::Local(Arc::new(local))
        }
        Some(redis) => Store::Redis {
            redis: Arc::new(RedisState::connect(redis, metrics.clone())?),
            // In memory only: nothing to open that could fail, but say where if it does.
            fallback: Arc::new(
                LocalState::open(None, clock.clone())
                    .map_err(|error| format!("the fail_open fallback state: {error}"))?,
            ),
        },
    })
}

/// Where the managed keys are kept: beside the state file, or in the state's Redis.
fn open_vault(config: &Config, backend: &Backend) -> Result<Vault, BoxError> {
    Ok(match backend.redis() {
        Some(redis) => Vault::Redis(managed_keys::redis::RedisKeys::new(redis.clone())),
        None => {
            let path = managed_keys::local::path_beside(&config.state.path);
            Vault::Local(
                managed_keys::local::KeyFile::open(path)
                    .map_err(|error| format!("state.path: {error}"))?,
            )
        }
    })
}

/// Puts the managed keys into the table before the first request. Redis away: the gateway
/// starts with the file's keys, and the follower adds the managed ones when Redis answers.
async fn load_managed_keys(registry: &KeyRegistry) {
    match tokio::time::timeout(MANAGED_KEYS_LOAD_TIMEOUT, registry.vault.load()).await {
        Ok(Ok(snapshot)) => {
            if !snapshot.keys.is_empty() {
                tracing::info!(keys = snapshot.keys.len(), "managed keys loaded");
            }
            registry.replace_all(snapshot);
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "managed keys not loaded yet; retried every second")
        }
        Err(_) => tracing::warn!("managed keys not loaded yet (no answer); retried every second"),
    }
}

/// How client connections speak HTTP. A request head past `server.max_header_bytes` is answered
/// 431 in the error shape by the stack (`request_head`); hyper's own limits sit at twice that,
/// so that only heads far past it meet hyper's bare 431.
fn connection_builder(server: &crate::config::ServerConfig) -> auto::Builder<TokioExecutor> {
    let hard_limit = server.max_header_bytes.saturating_mul(2);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(hard_limit.max(H1_DEFAULT_BUF));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_header_list_size(u32::try_from(hard_limit).unwrap_or(u32::MAX));
    builder
}

async fn serve_admin(listener: TcpListener, admin: Admin, tls: Option<TlsAcceptor>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let admin = admin.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match &tls {
                None => serve_admin_connection(stream, admin, peer).await,
                Some(acceptor) => match crate::server::tls::accept(acceptor, stream).await {
                    Some(stream) => serve_admin_connection(stream, admin, peer).await,
                    None => return,
                },
            };
            if let Err(error) = result {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

async fn serve_admin_connection<I>(
    io: I,
    admin: Admin,
    peer: SocketAddr,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| admin.clone().handle(request, peer));
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), service)
        .await
}
