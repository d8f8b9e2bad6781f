//! TLS on the client listener (`[server] tls`: rustls, TLS 1.2 and 1.3, ALPN `h2` and
//! `http/1.1`) and on the admin listener (`[server] admin_tls`: ALPN `http/1.1`, all it serves).
//!
//! The certificate is served through a resolver that holds it behind an `ArcSwap`, so a reload
//! (SIGHUP, or the config file changing) swaps in a new certificate for new handshakes while
//! connections already open keep theirs. Files that do not load are an error at start and on
//! reload — where the certificate in force stays.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::tls::{load, TlsError};

/// A client must finish its TLS handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves whichever certificate was loaded last.
#[derive(Debug)]
pub(crate) struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub(crate) fn new(cert: &Path, key: &Path) -> Result<CertResolver, TlsError> {
        Ok(CertResolver {
            current: ArcSwap::from_pointee(load(cert, key)?),
        })
    }

    /// Loads new files and serves them to new handshakes, or keeps the old ones.
    pub(crate) fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        self.current.store(Arc::new(load(cert, key)?));
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// An acceptor serving `resolver`'s certificate, offering `alpn` (most preferred first).
pub(crate) fn acceptor(
    resolver: Arc<CertResolver>,
    alpn: &[&[u8]],
) -> Result<TlsAcceptor, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The server side of a TLS handshake on `stream`, within [`HANDSHAKE_TIMEOUT`]; `None` (logged
/// at debug) when it fails or takes too long. Run it in the connection's own task: a slow
/// client then delays only itself.
pub(crate) async fn accept<IO>(acceptor: &TlsAcceptor, stream: IO) -> Option<TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}
