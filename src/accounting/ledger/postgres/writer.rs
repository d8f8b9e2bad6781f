//! The PostgreSQL writer's loop: gather lines for [`BATCH_WINDOW`], insert them as one batch;
//! when that fails (no connection, an error, no answer within [`WRITE_TIMEOUT`]) append them to
//! the spool instead, and from then on append every batch there — so that lines reach the table
//! in the order they came — until a new connection (tried every [`RETRY`], beside the spooling)
//! has sent the whole spool, which is then emptied.
//!
//! The outage is logged once when it starts (with its cause) and once when it ends (with how
//! long it lasted and how many lines the spool sent); `tollgate_ledger_spooled_lines` shows what
//! waits. While the spool is being sent, lines that come meanwhile are appended to its end, so
//! the queue never fills during a long replay.
//!
//! Edge cases: a batch that timed out may still commit; sending it again from the spool inserts
//! nothing twice (`ON CONFLICT (id) DO NOTHING`). A spool that cannot be written (a full disk)
//! loses those lines, counted and logged once. At the end of the queue (shutdown) the last batch
//! goes to PostgreSQL, or to the spool for the next start.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_postgres::{Client, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::rows::{insert_sql, Columns};
use super::schema::{self, SchemaError};
use super::{connect, describe, LedgerError};
use crate::accounting::ledger::spool::Spool;
use crate::accounting::ledger::{LedgerEntry, IDLE_AFTER, WRITE_INTERVAL};
use crate::observability::labels::LedgerErrorReason;
use crate::observability::metrics::Metrics;

/// How long lines gather before a batch is written: the writer wakes once per window, not once
/// per request.
const BATCH_WINDOW: Duration = WRITE_INTERVAL;
/// The most lines in one insert.
const MAX_BATCH: usize = 4096;
/// A write that takes longer counts as failed ("slow"): its lines go to the spool.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a new connection is tried while PostgreSQL is away.
const RETRY: Duration = Duration::from_secs(1);
/// A connection, its schema check and its prepared statement must be done within this.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// What every connection is made from.
pub(super) struct Settings {
    pub(super) postgres: tokio_postgres::Config,
    pub(super) tls: MakeRustlsConnect,
    pub(super) table: String,
    pub(super) replica: String,
}

/// A connection whose table is checked, with its insert statement.
struct Link {
    client: Client,
    insert: Statement,
}

/// What ended a wait in [`Writer::gather`].
enum Woke {
    Line(Option<Arc<LedgerEntry>>),
    Connected(Result<Result<Link, SchemaError>, tokio::task::JoinError>),
    Retry,
}

/// An outage in progress: since when, and the last cause logged.
struct Outage {
    since: Instant,
    cause: String,
}

pub(super) struct Writer {
    settings: Arc<Settings>,
    receiver: mpsc::Receiver<Arc<LedgerEntry>>,
    spool: Spool,
    metrics: Arc<Metrics>,
    link: Option<Link>,
    /// A connection being made, beside the spooling.
    connecting: Option<JoinHandle<Result<Link, SchemaError>>>,
    next_retry: Instant,
    outage: Option<Outage>,
    /// Whether spool writes are failing, so that it is logged once.
    spool_failing: bool,
    /// When the last line was taken: the writer waits on its timer for a while after.
    last_line: Instant,
}

impl Writer {
    pub(super) fn new(
        settings: Arc<Settings>,
        receiver: mpsc::Receiver<Arc<LedgerEntry>>,
        spool: Spool,
        metrics: Arc<Metrics>,
    ) -> Writer {
        metrics.ledger_spooled_lines.set(gauge(spool.lines()));
        Writer {
            settings,
            receiver,
            spool,
            metrics,
            link: None,
            connecting: None,
            next_retry: Instant::now(),
            outage: None,
            spool_failing: false,
            last_line: Instant::now(),
        }
    }

    /// The first connection and schema check; says on `started` whether the gateway may start.
    /// A table that cannot be used stops it; a database that does not answer does not.
    pub(super) async fn start(
        mut self,
        started: oneshot::Sender<Result<(), LedgerError>>,
    ) -> Option<Writer> {
        match timeout(CONNECT_DEADLINE, link(self.settings.clone())).await {
            Ok(Ok(link)) => self.link = Some(link),
            Ok(Err(error)) if error.is_permanent() => {
                let _ = started.send(Err(error.into()));
                return None;
            }
            Ok(Err(error)) => self.lost_link(&error.to_string()),
            Err(_) => self.lost_link("no connection within 10s"),
        }
        let _ = started.send(Ok(()));
        Some(self)
    }

    pub(super) async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            let open = self.gather(&mut batch).await;
            if !batch.is_empty() {
                self.write(&mut batch).await;
            }
            if !self.spool.is_empty() {
                self.replay().await;
            }
            if !open {
                break;
            }
        }
    }

    /// Waits for lines and gathers a batch; also returns (empty) when a connection attempt
    /// ends or one is due while the spool holds lines. `false` at the end of the queue.
    ///
    /// While lines come and the table takes them, the writer wakes on its timer (every
    /// [`BATCH_WINDOW`]) and takes what gathered, so that a request never wakes it; after a quiet
    /// [`IDLE_AFTER`] it waits for the next line, which wakes it once.
    async fn gather(&mut self, batch: &mut Vec<Arc<LedgerEntry>>) -> bool {
        let first = if !self.spool.is_empty() || self.link.is_none() {
            let retry_armed = self.connecting.is_none() && !self.spool.is_empty();
            let retry = self.next_retry;
            let (receiver, connecting) = (&mut self.receiver, &mut self.connecting);
            let woke = tokio::select! {
                line = receiver.recv() => Woke::Line(line),
                done = async {
                    match connecting.as_mut() {
                        Some(handle) => handle.await,
                        None => std::future::pending().await,
                    }
                } => Woke::Connected(done),
                () = tokio::time::sleep_until(retry), if retry_armed => Woke::Retry,
            };
            match woke {
                Woke::Line(line) => line,
                Woke::Connected(done) => {
                    self.connecting = None;
                    self.connected(done);
                    return true;
                }
                Woke::Retry => return true,
            }
        } else if self.last_line.elapsed() < IDLE_AFTER {
            tokio::time::sleep(BATCH_WINDOW).await;
            return self.take_queued(batch);
        } else {
            self.receiver.recv().await
        };
        let Some(first) = first else {
            return false;
        };
        batch.push(first);
        tokio::time::sleep(BATCH_WINDOW).await;
        self.take_queued(batch)
    }

    /// Moves what is queued into `batch` (up to [`MAX_BATCH`]); `false` at the end of the queue.
    fn take_queued(&mut self, batch: &mut Vec<Arc<LedgerEntry>>) -> bool {
        let mut open = true;
        while batch.len() < MAX_BATCH {
            match self.receiver.try_recv() {
                Ok(line) => batch.push(line),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            self.last_line = Instant::now();
        }
        open
    }

    /// Inserts the batch, or spools it; empties `batch`.
    async fn write(&mut self, batch: &mut Vec<Arc<LedgerEntry>>) {
        if let (true, Some(link)) = (self.spool.is_empty(), &self.link) {
            let columns = Columns::of_entries(batch.iter().map(|entry| &**entry));
            let inserted = timeout(
                WRITE_TIMEOUT,
                columns.insert(&link.client, &link.insert, &self.settings.replica),
            )
            .await;
            let malformed = columns.malformed;
            self.metrics
                .ledger_errors(LedgerErrorReason::Spool, malformed);
            match inserted {
                Ok(Ok(_)) => {
                    batch.clear();
                    return;
                }
                Ok(Err(error)) => self.lost_link(&describe(&error)),
                Err(_) => self.lost_link("no answer within 5s"),
            }
        }
        self.start_connecting();
        self.metrics
            .ledger_errors(LedgerErrorReason::Postgres, batch.len() as u64);
        self.spool_batch(batch);
    }

    /// Sends the spool from its cursor, a chunk at a time, then empties it. Stops at the first
    /// failure (the rest is sent with the next connection).
    async fn replay(&mut self) {
        if self.link.is_none() {
            self.start_connecting();
            return;
        }
        let mut chunk = Vec::new();
        let mut sent = 0u64;
        loop {
            if let Err(error) = self.spool.read_chunk(&mut chunk) {
                tracing::error!(path = %self.spool.path().display(), %error, "cannot read the ledger spool; trying again later");
                self.next_retry = Instant::now() + RETRY;
                self.link = None;
                return;
            }
            if chunk.is_empty() {
                break;
            }
            let lines = memchr::memchr_iter(b'\n', &chunk).count().max(1) as u64;
            let Some(link) = &self.link else { return };
            let columns = Columns::parse(chunk.split_inclusive(|&b| b == b'\n'));
            let inserted = timeout(
                WRITE_TIMEOUT,
                columns.insert(&link.client, &link.insert, &self.settings.replica),
            )
            .await;
            let malformed = columns.malformed;
            match inserted {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return self.lost_link(&describe(&error)),
                Err(_) => return self.lost_link("no answer within 5s"),
            }
            self.metrics
                .ledger_errors(LedgerErrorReason::Spool, malformed);
            self.spool.advance(chunk.len(), lines);
            sent += lines;
            self.take_in_queued();
            self.metrics
                .ledger_spooled_lines
                .set(gauge(self.spool.lines()));
        }
        if let Err(error) = self.spool.clear() {
            // Its lines are sent; sent again next time, they insert nothing twice.
            tracing::error!(path = %self.spool.path().display(), %error, "cannot empty the ledger spool");
        }
        self.metrics.ledger_spooled_lines.set(0);
        self.outage_over(sent);
    }

    /// Logs the end of the outage (or, after a start with a spool, that the spool is sent).
    fn outage_over(&mut self, sent: u64) {
        match self.outage.take() {
            Some(outage) => tracing::info!(
                lasted = ?outage.since.elapsed(),
                sent_from_spool = sent,
                "PostgreSQL takes the ledger again; the spool is sent"
            ),
            None if sent > 0 => tracing::info!(sent_from_spool = sent, "the ledger spool is sent"),
            None => {}
        }
    }

    /// Lines that came while the spool was being sent go to its end, in order.
    fn take_in_queued(&mut self) {
        let mut batch = Vec::new();
        while let Ok(line) = self.receiver.try_recv() {
            batch.push(line);
            if batch.len() == MAX_BATCH {
                self.spool_batch(&mut batch);
            }
        }
        self.spool_batch(&mut batch);
    }

    /// Appends the batch's lines to the spool (fsynced); empties `batch`.
    fn spool_batch(&mut self, batch: &mut Vec<Arc<LedgerEntry>>) {
        if batch.is_empty() {
            return;
        }
        let lines: Vec<Bytes> = batch.iter().map(|entry| entry.to_line()).collect();
        match self.spool.append(&lines) {
            Ok(()) => {
                if self.spool_failing {
                    tracing::info!(path = %self.spool.path().display(), "ledger spool writes succeed again");
                    self.spool_failing = false;
                }
            }
            Err(error) => {
                if !self.spool_failing {
                    tracing::error!(path = %self.spool.path().display(), %error, "cannot write the ledger spool; lines are lost until it recovers (tollgate_ledger_errors_total)");
                    self.spool_failing = true;
                }
                self.metrics
                    .ledger_errors(LedgerErrorReason::Spool, batch.len() as u64);
            }
        }
        self.metrics
            .ledger_spooled_lines
            .set(gauge(self.spool.lines()));
        batch.clear();
    }

    /// The connection failed: drop it, and log the outage if it is a new one.
    fn lost_link(&mut self, cause: &str) {
        self.link = None;
        self.next_retry = Instant::now() + RETRY;
        if self.outage.is_none() {
            tracing::error!(
                table = %self.settings.table,
                spool = %self.spool.path().display(),
                cause,
                "cannot write the ledger to PostgreSQL; lines wait in the spool until it is back"
            );
            self.outage = Some(Outage {
                since: Instant::now(),
                cause: cause.to_owned(),
            });
        }
    }

    /// Starts a connection attempt beside the spooling, when none runs and one is due.
    fn start_connecting(&mut self) {
        if self.link.is_some() || self.connecting.is_some() || Instant::now() < self.next_retry {
            return;
        }
        self.next_retry = Instant::now() + RETRY;
        let settings = self.settings.clone();
        self.connecting = Some(tokio::spawn(async move {
            match timeout(CONNECT_DEADLINE, link(settings)).await {
                Ok(result) => result,
                Err(_) => Err(SchemaError::Timeout),
            }
        }));
    }

    /// A connection attempt ended.
    fn connected(&mut self, done: Result<Result<Link, SchemaError>, tokio::task::JoinError>) {
        match done {
            Ok(Ok(link)) => {
                self.link = Some(link);
                // With a spool, the outage ends once it is sent; without, now.
                if self.spool.is_empty() {
                    self.outage_over(0);
                }
            }
            Ok(Err(error)) => {
                let cause = error.to_string();
                // A table that cannot be used is said each time it changes; the rest is the
                // outage already logged.
                match &mut self.outage {
                    Some(outage) if error.is_permanent() && outage.cause != cause => {
                        tracing::error!(%cause, "the ledger table cannot be used; lines wait in the spool");
                        outage.cause = cause;
                    }
                    Some(_) => tracing::debug!(%cause, "PostgreSQL still away"),
                    None => self.lost_link(&cause),
                }
            }
            Err(error) => tracing::error!(%error, "the PostgreSQL connect task failed"),
        }
    }
}

/// Connects, brings the table to this schema, prepares the insert.
async fn link(settings: Arc<Settings>) -> Result<Link, SchemaError> {
    let mut client = connect(&settings.postgres, &settings.tls).await?;
    schema::ensure(&mut client, &settings.table).await?;
    let insert = client.prepare(&insert_sql(&settings.table)).await?;
    Ok(Link { client, insert })
}

fn gauge(lines: u64) -> i64 {
    i64::try_from(lines).unwrap_or(i64::MAX)
}
