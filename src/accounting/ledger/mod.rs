//! The usage ledger: one JSON line per finished request that reached the upstream, written off
//! the hot path to a file (`[ledger] path`, [`file`]), to a PostgreSQL table
//! (`[ledger] postgres_url_env`, [`postgres`]), or both.
//!
//! A request makes its entry once ([`line`]) and hands it to each sink's bounded queue — as its
//! JSON line to the file, as itself to PostgreSQL, which makes its row from the fields without
//! reading JSON back — and moves on: it never waits for a disk or a database. Each sink has a writer of its
//! own. The PostgreSQL sink keeps lines it cannot write in a [`spool`] on local disk and sends
//! them when the database is back, so that every request is in the table exactly once.
//!
//! Edge cases: a queue that is full (its writer cannot keep up) drops the line, counted in
//! `tollgate_ledger_errors_total{reason="queue_full"}` and logged once when it starts and once
//! when it ends; neither ever blocks or fails a request. On shutdown every queued line is
//! written (to PostgreSQL, or to the spool) before the process exits.

mod file;
pub(crate) mod line;
pub(crate) mod postgres;
mod spool;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[cfg(test)]
pub(crate) use self::line::sample_entry;
pub(crate) use self::line::{now_rfc3339, LedgerEntry};

use self::file::FileSink;
use self::postgres::PostgresSink;
use crate::config::LedgerConfig;
use crate::observability::labels::LedgerErrorReason;
use crate::observability::metrics::Metrics;

/// Lines waiting for a sink's writer at most; more are dropped (and counted). At one write per
/// [`WRITE_INTERVAL`] that is over a million lines a second.
const QUEUE: usize = 65_536;
/// How often a writer takes what gathered while lines come: it wakes on this timer, so that a
/// request only queues its line and never wakes a thread (a futex call, and a cold thread
/// competing with the worker, at every request of a quiet gateway).
const WRITE_INTERVAL: Duration = Duration::from_millis(50);
/// After this long without a line, a writer stops waking every interval; the next line wakes it.
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// Why the ledger could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger: cannot create the directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger: cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ledger: cannot start the writer thread: {0}")]
    Spawn(std::io::Error),
    #[error("ledger.spool_path: {0}")]
    Spool(#[from] spool::SpoolError),
    #[error("ledger.postgres_url_env: environment variable {0} does not hold a postgres:// URL")]
    Url(String),
    #[error("ledger: cannot set up TLS for PostgreSQL: {0}")]
    Tls(String),
    #[error("ledger.postgres_table: {0}")]
    Schema(#[from] postgres::schema::SchemaError),
}

/// The ledger's sinks, as configured.
pub struct Ledger {
    file: Option<FileSink>,
    postgres: Option<PostgresSink>,
}

impl Ledger {
    /// Opens the file and starts its writer; opens the spool, checks (or creates, or upgrades)
    /// the PostgreSQL table when the database answers, and starts the PostgreSQL writer.
    pub(crate) async fn open(
        config: &LedgerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Ledger, LedgerError> {
        let file = match &config.path {
            Some(path) => Some(FileSink::open(path, metrics.clone())?),
            None => None,
        };
        let postgres = match &config.postgres {
            Some(postgres) => Some(PostgresSink::start(postgres, metrics).await?),
            None => None,
        };
        Ok(Ledger { file, postgres })
    }

    /// Makes the file's writer open its path again (SIGHUP), after the lines already queued;
    /// never blocks.
    pub fn reopen(&self) {
        if let Some(file) = &self.file {
            file.reopen();
        }
    }

    /// Whether there is a file to reopen on SIGHUP.
    pub(crate) fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// Queues the entry for every sink — its line for the file, the entry itself for
    /// PostgreSQL, which makes its row from it; never blocks.
    pub(crate) fn record(&self, entry: &Arc<LedgerEntry>) {
        if let Some(file) = &self.file {
            file.send(entry.to_line());
        }
        if let Some(postgres) = &self.postgres {
            postgres.send(entry.clone());
        }
    }

    /// Writes every queued line and stops the writers (waits at most `timeout` for them all).
    pub(crate) fn close(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let writers = [
            self.file.as_ref().and_then(FileSink::close),
            self.postgres.as_ref().and_then(PostgresSink::close),
        ];
        for writer in writers.into_iter().flatten() {
            while !writer.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                tracing::error!("a ledger writer did not finish in time");
            }
        }
    }
}

/// A sink's queue as the requests see it: sends that never block, a full queue counted and
/// logged once when it starts and once when it ends, and sends after the close counted.
struct Intake<S> {
    sender: Mutex<Option<S>>,
    metrics: Arc<Metrics>,
    /// Whether the last send found the queue full, so that it is logged once, not per line.
    overflowing: AtomicBool,
    /// The sink, in log messages.
    name: &'static str,
}

impl<S> Intake<S> {
    fn new(sender: S, metrics: Arc<Metrics>, name: &'static str) -> Intake<S> {
        Intake {
            sender: Mutex::new(Some(sender)),
            metrics,
            overflowing: AtomicBool::new(false),
            name,
        }
    }

    /// Sends with `try_send`, which says why a line could not be queued.
    fn send(&self, try_send: impl FnOnce(&S) -> Result<(), LedgerErrorReason>) {
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = sender.as_ref() else {
            self.metrics.ledger_errors(LedgerErrorReason::Closed, 1);
            return;
        };
        match try_send(sender) {
            Ok(()) => {
                if self.overflowing.swap(false, Ordering::Relaxed) {
                    tracing::info!(sink = self.name, "ledger queue has room again");
                }
            }
            Err(reason) => {
                self.metrics.ledger_errors(reason, 1);
                if reason == LedgerErrorReason::QueueFull
                    && !self.overflowing.swap(true, Ordering::Relaxed)
                {
                    tracing::error!(sink = self.name, "ledger queue full: its writer does not keep up; lines are being dropped (tollgate_ledger_errors_total)");
                }
            }
        }
    }

    /// Runs `f` on the sender, unless closed.
    fn with(&self, f: impl FnOnce(&S)) {
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = sender.as_ref() {
            f(sender);
        }
    }

    /// Drops the sender: the writer sees the end of its queue.
    fn close(&self) {
        drop(
            self.sender
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

/// The writer thread, once.
fn take(writer: &Mutex<Option<JoinHandle<()>>>) -> Option<JoinHandle<()>> {
    writer.lock().unwrap_or_else(PoisonError::into_inner).take()
}

/// Creates the parent directory of `path`.
fn create_parent(path: &Path) -> Result<(), LedgerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| LedgerError::CreateDir {
            path: parent.to_owned(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
