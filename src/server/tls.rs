//! TLS on the client listener: rustls, TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
//!
//! The certificate is served through a resolver that holds it behind an `ArcSwap`, so a reload
//! (SIGHUP, or the config file changing) swaps in a new certificate for new handshakes while
//! connections already open keep theirs. Files that do not load are an error at start and on
//! reload — where the certificate in force stays.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::tls::load;

/// Serves whichever certificate was loaded last.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(cert: &Path, key: &Path) -> Result<CertResolver, String> {
        Ok(CertResolver {
            current: ArcSwap::from_pointee(load(cert, key)?),
        })
    }

    /// Loads new files and serves them to new handshakes, or keeps the old ones.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), String> {
        self.current.store(Arc::new(load(cert, key)?));
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The acceptor for the client listener.
pub fn acceptor(resolver: Arc<CertResolver>) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
