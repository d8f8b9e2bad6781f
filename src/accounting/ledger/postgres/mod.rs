//! The ledger in PostgreSQL (`[ledger] postgres_url_env`): every finished request is one row of
//! `postgres_table`, exactly once, and no request ever waits for the database.
//!
//! Requests hand their line to a bounded queue; a writer of its own — a thread running its own
//! single-threaded runtime, so that nothing it does competes with the workers' event loops —
//! inserts them in batches ([`rows`]). While PostgreSQL is unreachable, slow or refusing, lines
//! go to the [`super::spool`] on local disk instead, and are sent in order when it is back
//! ([`writer`]). At start the writer opens the spool, checks the table's schema ([`schema`]:
//! created, upgraded, or the start stops with a message), and sends what the spool holds.
//!
//! Edge cases: PostgreSQL unreachable at start is no error (the gateway starts and spools, and
//! checks the schema when it connects); a table it cannot use is, when it can tell.

mod connect;
mod rows;
pub(crate) mod schema;
mod writer;

pub(crate) use self::connect::{connect, describe, parse as parse_url, tls};

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::spool::Spool;
use super::LedgerEntry;
use super::{Intake, LedgerError, QUEUE};
use crate::config::PostgresLedger;
use crate::observability::labels::LedgerErrorReason;
use crate::observability::metrics::Metrics;

/// The handle of the PostgreSQL writer.
pub(super) struct PostgresSink {
    sender: Intake<mpsc::Sender<Arc<LedgerEntry>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl PostgresSink {
    /// Opens the spool, starts the writer and waits for its first look at the database.
    pub(super) async fn start(
        config: &PostgresLedger,
        metrics: Arc<Metrics>,
    ) -> Result<PostgresSink, LedgerError> {
        let tls = tls().map_err(|e| LedgerError::Tls(e.to_string()))?;
        let settings = Arc::new(writer::Settings {
            postgres: parse_url(config.url.expose())
                .ok_or_else(|| LedgerError::Url(config.url_env.clone()))?,
            tls,
            table: config.table.clone(),
            replica: config.replica.clone(),
        });
        let (spool, torn) = Spool::open(&config.spool_path)?;
        if torn {
            metrics.ledger_errors(LedgerErrorReason::Spool, 1);
            tracing::warn!(path = %config.spool_path.display(), "the ledger spool ended in half a line (a crash while it was written); that line is dropped");
        }
        let (sender, receiver) = mpsc::channel(QUEUE);
        let (started, starting) = oneshot::channel();
        let thread_metrics = metrics.clone();
        let writer = std::thread::Builder::new()
            .name("tollgate-ledger-pg".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = started.send(Err(LedgerError::Spawn(error)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let writer = writer::Writer::new(settings, receiver, spool, thread_metrics);
                    if let Some(writer) = writer.start(started).await {
                        writer.run().await;
                    }
                });
            })
            .map_err(LedgerError::Spawn)?;
        match starting.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                let _ = writer.join();
                return Err(error);
            }
            Err(_) => {
                return Err(LedgerError::Spawn(std::io::Error::other(
                    "the PostgreSQL ledger writer stopped at start",
                )))
            }
        }
        Ok(PostgresSink {
            sender: Intake::new(sender, metrics, "PostgreSQL"),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues an entry; never blocks.
    pub(super) fn send(&self, entry: Arc<LedgerEntry>) {
        self.sender.send(|sender| match sender.try_send(entry) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(LedgerErrorReason::QueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(LedgerErrorReason::Closed),
        });
    }

    /// Stops taking lines: the writer writes (or spools) what it has and ends.
    pub(super) fn close(&self) -> Option<JoinHandle<()>> {
        self.sender.close();
        super::take(&self.writer)
    }
}
