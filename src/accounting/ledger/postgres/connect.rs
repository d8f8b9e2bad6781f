//! Connections to PostgreSQL, for the ledger's writer and `tollgate usage`: the URL's settings,
//! TLS with rustls (the system's and the webpki roots, ring), a connect timeout when the URL
//! sets none, and `application_name = tollgate` so that operators see who is connected.
//!
//! TLS follows the URL's `sslmode`: `prefer` (the default) uses TLS when the server offers it,
//! `require` refuses a server without it, `disable` never asks.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How long a connection may take when the URL says nothing (`connect_timeout=`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The URL's settings, with the defaults above; `None` when it is not a PostgreSQL URL (the
/// parser's message may quote the URL, so it is not passed on).
pub(crate) fn parse(url: &str) -> Option<Config> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let mut config: Config = url.parse().ok().filter(|_| is_url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("tollgate");
    }
    Some(config)
}

/// Connects, and drives the connection on this runtime until the client is dropped.
pub(crate) async fn connect(
    config: &Config,
    tls: &MakeRustlsConnect,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tls.clone()).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// rustls with the trusted roots, as the upstream connector has them.
pub(crate) fn tls() -> Result<MakeRustlsConnect, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in rustls_native_certs::load_native_certs().certs {
        // A malformed system certificate is skipped, not fatal.
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// An error as the operator reads it: the server's own message when it sent one, the cause
/// beneath the client's summary, and what to do about an untrusted certificate.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return db.message().to_owned();
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    if text.contains("TLS") {
        text.push_str(" (the server's certificate must be trusted by this machine, for its host name: install its CA in the system's store or name it in SSL_CERT_FILE; on loopback, sslmode=disable in the URL turns TLS off)");
    }
    text
}
