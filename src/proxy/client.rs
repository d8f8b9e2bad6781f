//! The upstream client: connections made and driven with hyper's `client::conn` handshakes
//! directly from the request's task, pooled per worker and endpoint.
//!
//! Each worker (one thread, one runtime; see `server::worker`) has its own slot in every
//! endpoint's idle stack, so a request takes and gives back connections of its own thread: an
//! uncontended lock, no channel hop, no task spawned per request. An HTTP/1.1 connection has no
//! task either: the request's task drives it while it sends the request and reads the answer
//! ([`H1`]), and it goes back to its stack when its answer's last byte was read ([`Returned`]).
//! One HTTP/2 connection per worker and endpoint is shared by all its requests, and driven by a
//! task of its own on the worker that made it. HTTP/2 is spoken where TLS's ALPN offers it; plain `http://` endpoints speak
//! HTTP/1.1 with keep-alive.
//!
//! Edge cases:
//! - A pooled connection may have been closed by the upstream while it sat idle (llama.cpp's
//!   server closes after every stream while advertising keep-alive). One found closed when taken
//!   (an HTTP/1.1 one is polled once to read the EOF) is skipped; one that fails before any response byte is reported as [`SendError::Broken`] with
//!   `reused`, and the caller sends the request again on a fresh connection.
//! - Idle connections older than `pool_idle_timeout` are dropped when met, and at most
//!   `pool_max_idle_per_host` are kept per worker.
//! - The connect timeout covers TCP and TLS; DNS names resolve through tokio (the system
//!   resolver).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::either::Either;

use crate::config::UpstreamConfig;
use crate::http::body::BoxError;
use crate::proxy::answer::{Answer, Returned};
use crate::proxy::endpoint::Endpoint;
use crate::proxy::h1::{Io, H1};
use crate::proxy::idle::H2;

pub(crate) type UpstreamRequest = Request<Full<Bytes>>;

/// How a pool's connections are made: its timeouts, its pool limits and its TLS roots.
pub(crate) struct Connector {
    pub(crate) connect_timeout: Duration,
    pub(crate) pool_idle_timeout: Duration,
    pub(crate) pool_max_idle: usize,
    /// `None` when the pool has no `https://` endpoint.
    pub(crate) tls: Option<tokio_rustls::TlsConnector>,
}

/// Why a request got no answer.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection could be made: refused, timed out, TLS failed.
    Connect(BoxError),
    /// The connection failed before any response byte (reset, closed, or found dead).
    Broken {
        error: BoxError,
        /// The connection came from the pool (it may have died while idle).
        reused: bool,
    },
}

impl Connector {
    pub(crate) fn new(upstream: &UpstreamConfig, https: bool) -> Result<Connector, BoxError> {
        let tls = match https {
            true => Some(tokio_rustls::TlsConnector::from(tls_config(upstream)?)),
            false => None,
        };
        Ok(Connector {
            connect_timeout: upstream.connect_timeout,
            pool_idle_timeout: upstream.pool_idle_timeout,
            pool_max_idle: upstream.pool_max_idle_per_host,
            tls,
        })
    }

    /// Sends `request` to `endpoint` on a pooled connection of worker `slot` when there is one
    /// (and `fresh` is false), else on a new one. An HTTP/1.1 connection goes back to the pool
    /// when the answer's body was read to its end.
    pub(crate) async fn send(
        &self,
        endpoint: &Arc<Endpoint>,
        slot: usize,
        request: UpstreamRequest,
        fresh: bool,
    ) -> Result<Response<Answer>, SendError> {
        let pooled = if fresh {
            None
        } else {
            self.checkout(endpoint, slot)
        };
        let reused = pooled.is_some();
        let sender = match pooled {
            Some(sender) => sender,
            None => self
                .connect(endpoint, slot)
                .await
                .map_err(SendError::Connect)?,
        };
        let broken = |error: hyper::Error| SendError::Broken {
            error: error.into(),
            reused,
        };
        match sender {
            Sender::H1(mut conn) => {
                let mut request = request;
                origin_form(&mut request);
                let response = conn.send(request).await.map_err(broken)?;
                let returned = Returned {
                    conn,
                    endpoint: endpoint.clone(),
                    slot,
                    max_idle: self.pool_max_idle,
                };
                Ok(response.map(|incoming| Answer::new(incoming, Some(returned))))
            }
            Sender::H2(mut sender) => {
                sender.ready().await.map_err(broken)?;
                let response = sender
                    .try_send_request(request)
                    .await
                    .map_err(|e| broken(e.into_error()))?;
                Ok(response.map(|incoming| Answer::new(incoming, None)))
            }
        }
    }

    /// A live idle connection of this worker, if any.
    fn checkout(&self, endpoint: &Endpoint, slot: usize) -> Option<Sender> {
        let mut idle = endpoint.idle(slot);
        if let Some(h2) = &idle.h2 {
            if !h2.is_closed() {
                return Some(Sender::H2(h2.clone()));
            }
            idle.h2 = None;
        }
        while let Some((mut conn, since)) = idle.h1.pop() {
            if since.elapsed() < self.pool_idle_timeout && conn.is_open() {
                return Some(Sender::H1(conn));
            }
        }
        None
    }

    /// A new connection: TCP (and TLS, with ALPN) within the connect timeout, then the handshake
    /// of the protocol agreed; an HTTP/2 connection's I/O task runs on this worker.
    async fn connect(&self, endpoint: &Endpoint, slot: usize) -> Result<Sender, BoxError> {
        let url = &endpoint.url;
        let host = url.authority.host().trim_matches(['[', ']']).to_owned();
        let made = timeout(self.connect_timeout, async {
            let tcp = TcpStream::connect((host.as_str(), url.port())).await?;
            // Each SSE event must leave at once, not wait for a delayed ACK (Nagle).
            tcp.set_nodelay(true)?;
            match (&self.tls, url.is_https()) {
                (Some(tls), true) => {
                    let name = rustls_pki_types::ServerName::try_from(host.clone())?;
                    let stream = tls.connect(name, tcp).await?;
                    Ok::<_, BoxError>(match stream.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Made::H2(Box::new(stream)),
                        _ => Made::H1(Either::Right(Box::new(stream))),
                    })
                }
                _ => Ok(Made::H1(Either::Left(tcp))),
            }
        })
        .await
        .map_err(|_| format!("connect timed out after {:?}", self.connect_timeout))??;
        let sender = match made {
            Made::H1(io) => Sender::H1(H1::handshake(io).await?),
            Made::H2(stream) => handshake_h2(*stream).await?,
        };
        if let Sender::H2(h2) = &sender {
            endpoint.idle(slot).h2 = Some(h2.clone());
        }
        Ok(sender)
    }
}

/// HTTP/1.1 to an origin server names only the path in the request line (RFC 9112 §3.2.1);
/// the authority travels in `Host`, which the caller set. HTTP/2 keeps the absolute URI for its
/// `:scheme` and `:authority`.
fn origin_form(request: &mut UpstreamRequest) {
    if let Some(path) = request.uri().path_and_query().cloned() {
        *request.uri_mut() = http::Uri::from(path);
    }
}

enum Sender {
    H1(H1),
    H2(H2),
}

/// A connection made, before its protocol's handshake.
enum Made {
    H1(Io),
    /// TLS whose ALPN agreed on HTTP/2.
    H2(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Runs HTTP/2's handshake on `stream` and spawns the task that drives the connection.
async fn handshake_h2(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> Result<Sender, BoxError> {
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(Sender::H2(sender))
}

/// The TLS client config of a pool: [`client_tls`] with `upstream.ca_file`; ALPN offers HTTP/2
/// and HTTP/1.1.
fn tls_config(upstream: &UpstreamConfig) -> Result<Arc<rustls::ClientConfig>, BoxError> {
    let mut tls = client_tls(upstream.ca_file.as_deref(), "upstream.ca_file")?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// TLS for a client of this process (an upstream, or `tollgate keys` calling the admin API): the
/// webpki roots, the system's, and the PEM certificates in `ca_file` (`setting` names it in
/// errors).
pub(crate) fn client_tls(
    ca_file: Option<&std::path::Path>,
    setting: &str,
) -> Result<rustls::ClientConfig, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // System roots where the machine has them: a private CA installed there is trusted too.
    for cert in rustls_native_certs::load_native_certs().certs {
        // A malformed system certificate is skipped, not fatal.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        use rustls_pki_types::pem::PemObject;
        let failed = |e: &dyn std::fmt::Display| format!("{setting} {}: {e}", path.display());
        let certs =
            rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| failed(&e))?;
        for cert in certs {
            roots
                .add(cert.map_err(|e| failed(&e))?)
                .map_err(|e| failed(&e))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
