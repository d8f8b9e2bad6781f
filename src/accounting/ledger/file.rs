//! The ledger file (`[ledger] path`): a dedicated thread appends the lines it is handed, in
//! batches: a line is on disk at most [`WRITE_INTERVAL`] after its request ended, and on shutdown
//! every line is written before the process exits. The thread wakes on its timer, not per line
//! (see [`Writer::run`]): a request never has to wake it.
//!
//! [`FileSink::reopen`] (SIGHUP) makes the writer close the file and open `path` again, so that a
//! log rotation that moved the file away (`mv usage.jsonl usage.jsonl.1`) gets a new file from
//! the next line on: lines queued before the reopen go to the old file, later ones to the new.
//!
//! Edge cases: a failed write (a full disk) is logged once when it starts and once when it ends,
//! and every line it loses is counted in `tollgate_ledger_errors_total`; a reopen that cannot
//! open the path (a directory that went away) is logged and the writer keeps the file it has, so
//! that no line is lost to it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;

use super::{Intake, LedgerError, IDLE_AFTER, QUEUE, WRITE_INTERVAL};
use crate::observability::labels::LedgerErrorReason;
use crate::observability::metrics::Metrics;

/// What the writer thread is told.
enum Message {
    Line(Bytes),
    /// Close the file and open the path again (log rotation).
    Reopen,
}

/// The handle of the file's writer thread.
pub(super) struct FileSink {
    sender: Intake<Sender<Message>>,
    writer: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Lines queued and not yet taken by the writer: the queue's bound. Counted beside an
    /// unbounded channel because `sync_channel(QUEUE)` allocates and touches all its slots up
    /// front (~3 MB of resident memory for a queue that is almost always nearly empty).
    queued: Arc<AtomicUsize>,
}

impl FileSink {
    /// Opens (creating) the ledger file for appending and starts its writer thread.
    pub(super) fn open(path: &Path, metrics: Arc<Metrics>) -> Result<FileSink, LedgerError> {
        let file = open_file(path)?;
        let (sender, receiver) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let writer = Writer {
            path: path.to_owned(),
            metrics: metrics.clone(),
            queued: queued.clone(),
            failing: false,
            pending: 0,
        };
        let writer = std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || writer.run(file, receiver))
            .map_err(LedgerError::Spawn)?;
        Ok(FileSink {
            sender: Intake::new(sender, metrics, "the ledger file"),
            writer: std::sync::Mutex::new(Some(writer)),
            queued,
        })
    }

    /// Queues a line; never blocks.
    pub(super) fn send(&self, line: Bytes) {
        self.sender.send(|sender| {
            if self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                return Err(LedgerErrorReason::QueueFull);
            }
            sender.send(Message::Line(line)).map_err(|_| {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                LedgerErrorReason::Closed
            })
        });
    }

    /// Makes the writer open the path again, after the lines already queued; never blocks.
    pub(super) fn reopen(&self) {
        self.sender.with(|sender| {
            // Fails only once the writer is gone, when there is nothing left to reopen.
            let _ = sender.send(Message::Reopen);
        });
    }

    /// Stops taking lines: the writer writes what it has and ends.
    pub(super) fn close(&self) -> Option<JoinHandle<()>> {
        self.sender.close();
        super::take(&self.writer)
    }
}

/// Creates the parent directory and opens `path` for appending.
fn open_file(path: &Path) -> Result<File, LedgerError> {
    super::create_parent(path)?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| LedgerError::Open {
            path: path.to_owned(),
            source,
        })
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    metrics: Arc<Metrics>,
    /// The sink's count of queued lines, taken down as the writer takes them.
    queued: Arc<AtomicUsize>,
    /// Whether writes are failing now, so that a failure is logged once, not per line.
    failing: bool,
    /// Lines written to the buffer since the last successful flush.
    pending: u64,
}

impl Writer {
    /// While lines come, wakes every [`WRITE_INTERVAL`] and writes what gathered, so that a
    /// request never wakes it; after a quiet [`IDLE_AFTER`] it sleeps until the next line does
    /// (one wake-up then, not one per line). Ends when the queue is closed and empty.
    fn run(mut self, file: File, receiver: Receiver<Message>) {
        let mut out = BufWriter::with_capacity(64 * 1024, file);
        let mut last_line = Instant::now();
        let mut open = true;
        while open {
            let mut next = None;
            if last_line.elapsed() >= IDLE_AFTER {
                match receiver.recv() {
                    Ok(message) => next = Some(message),
                    Err(_) => break,
                }
            } else {
                std::thread::sleep(WRITE_INTERVAL);
            }
            let mut wrote = false;
            loop {
                let message = match next.take().map_or_else(|| receiver.try_recv(), Ok) {
                    Ok(message) => message,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                };
                wrote = true;
                match message {
                    Message::Line(line) => {
                        self.queued.fetch_sub(1, Ordering::Relaxed);
                        match out.write_all(&line) {
                            Ok(()) => self.pending += 1,
                            Err(error) => self.report(&error, 1),
                        }
                    }
                    Message::Reopen => out = self.reopen(out),
                }
            }
            if wrote {
                // What gathered is on disk at most one interval after its request ended.
                out = self.flush(out);
                last_line = Instant::now();
            }
        }
        self.flush(out);
    }

    /// Flushes the buffer; on failure drops what it held (counted) rather than retry it forever
    /// against a full disk.
    fn flush(&mut self, mut out: BufWriter<File>) -> BufWriter<File> {
        match out.flush() {
            Ok(()) => {
                if self.failing {
                    tracing::info!(path = %self.path.display(), "ledger writes succeed again");
                    self.failing = false;
                }
                self.pending = 0;
                out
            }
            Err(error) => {
                self.report(&error, self.pending);
                BufWriter::with_capacity(64 * 1024, out.into_parts().0)
            }
        }
    }

    /// Flushes into the old file and opens the path again; keeps the old file if that fails.
    fn reopen(&mut self, out: BufWriter<File>) -> BufWriter<File> {
        let out = self.flush(out);
        match open_file(&self.path) {
            Ok(file) => {
                tracing::info!(path = %self.path.display(), "ledger reopened");
                BufWriter::with_capacity(64 * 1024, file)
            }
            Err(error) => {
                tracing::error!(%error, "cannot reopen the ledger; writing on to the file it had");
                out
            }
        }
    }

    fn report(&mut self, error: &std::io::Error, lost: u64) {
        if !self.failing {
            tracing::error!(path = %self.path.display(), %error, "cannot write the ledger; lines are lost until it recovers (tollgate_ledger_errors_total)");
            self.failing = true;
        }
        self.metrics.ledger_errors(LedgerErrorReason::Write, lost);
        self.pending = 0;
    }
}
