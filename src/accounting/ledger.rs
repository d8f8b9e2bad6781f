//! The usage ledger: one JSON line per finished request that reached the upstream, appended to
//! `[ledger] path`, written off the hot path.
//!
//! Requests hand their line to a bounded channel and move on; a dedicated thread appends the lines
//! and flushes whenever the channel runs dry, so a line is on disk within moments of its request
//! ending, and on shutdown every line is written before the process exits.
//!
//! [`Ledger::reopen`] (SIGHUP) makes the writer close the file and open `path` again, so that a
//! log rotation that moved the file away (`mv usage.jsonl usage.jsonl.1`) gets a new file from
//! the next line on: lines queued before the reopen go to the old file, later ones to the new.
//!
//! Edge cases: a failed write (a full disk) is logged once when it starts and once when it ends,
//! and every line it loses is counted in `tollgate_ledger_errors_total`; a channel that is full
//! (the disk cannot keep up) drops the line, counted and logged the same way. Neither ever blocks
//! or fails a request. A reopen that cannot open the path (a directory that went away) is logged
//! and the writer keeps the file it has, so that no line is lost to it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::accounting::cost::Cost;
use crate::observability::labels::LedgerErrorReason;
use crate::observability::metrics::Metrics;

/// Lines waiting for the writer at most; more are dropped (and counted).
const QUEUE: usize = 65_536;

/// One finished request.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LedgerEntry {
    /// RFC 3339, UTC, milliseconds.
    pub(crate) time: String,
    pub(crate) request_id: String,
    pub(crate) key: String,
    /// The key's group (`null` without one).
    pub(crate) group: Option<String>,
    pub(crate) model: String,
    pub(crate) endpoint: &'static str,
    pub(crate) status: u16,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// prompt × prompt price + completion × completion price, in currency units, printed exactly
    /// from nano-units (`0.000135`); `null` when the price table has no price for the model.
    pub(crate) cost: Option<Cost>,
    /// `reported` by the upstream, or `estimated` by the gateway.
    pub(crate) source: &'static str,
    pub(crate) duration_ms: f64,
    /// Time to the first byte of a streamed answer.
    pub(crate) ttft_ms: Option<f64>,
    /// `complete`, `client_gone`, `upstream_error`.
    pub(crate) outcome: &'static str,
}

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
}

/// What the writer thread is told.
enum Message {
    Line(Box<LedgerEntry>),
    /// Close the file and open the path again (log rotation).
    Reopen,
}

pub struct Ledger {
    sender: Mutex<Option<SyncSender<Message>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// Whether the last enqueue failed, so that a full queue is logged once, not per line.
    overflowing: AtomicBool,
    /// A reopen asked for while the queue was full: the writer does it after its next flush.
    reopen_requested: Arc<AtomicBool>,
}

impl Ledger {
    /// Opens (creating) the ledger file for appending and starts its writer thread.
    pub(crate) fn open(path: &Path, metrics: Arc<Metrics>) -> Result<Ledger, LedgerError> {
        let file = open_file(path)?;
        let (sender, receiver) = mpsc::sync_channel(QUEUE);
        let reopen_requested = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            path: path.to_owned(),
            metrics: metrics.clone(),
            reopen_requested: reopen_requested.clone(),
            failing: false,
            pending: 0,
        };
        let writer = std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || writer.run(file, receiver))
            .map_err(LedgerError::Spawn)?;
        Ok(Ledger {
            sender: Mutex::new(Some(sender)),
            writer: Mutex::new(Some(writer)),
            metrics,
            overflowing: AtomicBool::new(false),
            reopen_requested,
        })
    }

    /// Makes the writer open the ledger's path again, after the lines already queued; never
    /// blocks.
    pub fn reopen(&self) {
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = sender.as_ref() else {
            return;
        };
        if let Err(TrySendError::Full(_)) = sender.try_send(Message::Reopen) {
            self.reopen_requested.store(true, Ordering::Relaxed);
        }
    }

    /// Queues a line; never blocks.
    pub(crate) fn record(&self, entry: LedgerEntry) {
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = sender.as_ref() else {
            self.metrics.ledger_error(LedgerErrorReason::Closed);
            return;
        };
        match sender.try_send(Message::Line(Box::new(entry))) {
            Ok(()) => {
                if self.overflowing.swap(false, Ordering::Relaxed) {
                    tracing::info!("ledger queue has room again");
                }
            }
            Err(TrySendError::Full(_)) => {
                self.metrics.ledger_error(LedgerErrorReason::QueueFull);
                if !self.overflowing.swap(true, Ordering::Relaxed) {
                    tracing::error!("ledger queue full: the disk does not keep up; lines are being dropped (tollgate_ledger_errors_total)");
                }
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.ledger_error(LedgerErrorReason::Closed)
            }
        }
    }

    /// Writes every queued line and stops the writer (waits at most `timeout`).
    pub(crate) fn close(&self, timeout: Duration) {
        drop(
            self.sender
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let deadline = std::time::Instant::now() + timeout;
            while !writer.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                tracing::error!("the ledger writer did not finish in time");
            }
        }
    }
}

/// Creates the parent directory and opens `path` for appending.
fn open_file(path: &Path) -> Result<File, LedgerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| LedgerError::CreateDir {
            path: parent.to_owned(),
            source,
        })?;
    }
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
    reopen_requested: Arc<AtomicBool>,
    /// Whether writes are failing now, so that a failure is logged once, not per line.
    failing: bool,
    /// Lines written to the buffer since the last successful flush.
    pending: u64,
}

impl Writer {
    fn run(mut self, file: File, receiver: Receiver<Message>) {
        let mut out = BufWriter::with_capacity(64 * 1024, file);
        let mut line = Vec::with_capacity(512);
        while let Ok(first) = receiver.recv() {
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Line(entry) => {
                        line.clear();
                        if serde_json::to_writer(&mut line, &entry).is_ok() {
                            line.push(b'\n');
                            match out.write_all(&line) {
                                Ok(()) => self.pending += 1,
                                Err(error) => self.report(&error, 1),
                            }
                        }
                    }
                    Message::Reopen => out = self.reopen(out),
                }
                next = receiver.try_recv().ok();
            }
            // The queue ran dry: put what we have on disk.
            out = self.flush(out);
            if self.reopen_requested.swap(false, Ordering::Relaxed) {
                out = self.reopen(out);
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
        for _ in 0..lost {
            self.metrics.ledger_error(LedgerErrorReason::Write);
        }
        self.pending = 0;
    }
}

/// Now, as the ledger writes it.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// A ledger line for tests: request `r{n}` with `n` prompt tokens.
#[cfg(test)]
pub(crate) fn sample_entry(n: u64) -> LedgerEntry {
    LedgerEntry {
        time: now_rfc3339(),
        request_id: format!("r{n}"),
        key: "k".into(),
        group: None,
        model: "m".into(),
        endpoint: "chat_completions",
        status: 200,
        prompt_tokens: n,
        completion_tokens: 1,
        cost: None,
        source: "reported",
        duration_ms: 1.0,
        ttft_ms: None,
        outcome: "complete",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_is_on_disk_after_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger").join("usage.jsonl");
        let ledger = Ledger::open(&path, Arc::new(Metrics::new())).expect("open");
        for n in 0..1000 {
            ledger.record(sample_entry(n));
        }
        ledger.close(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 1000, "every line written");
        assert_eq!(lines[999]["prompt_tokens"], 999, "in order");
    }

    #[test]
    fn a_reopen_after_a_rename_starts_a_new_file_in_line_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("usage.jsonl");
        let ledger = Ledger::open(&path, Arc::new(Metrics::new())).expect("open");
        for n in 0..10 {
            ledger.record(sample_entry(n));
        }
        std::fs::rename(&path, dir.path().join("usage.jsonl.1")).expect("rotate");
        ledger.reopen();
        for n in 10..15 {
            ledger.record(sample_entry(n));
        }
        ledger.close(Duration::from_secs(5));
        let tokens = |name: &str| -> Vec<u64> {
            std::fs::read_to_string(dir.path().join(name))
                .expect("read")
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
                    v["prompt_tokens"].as_u64().expect("tokens")
                })
                .collect()
        };
        assert_eq!(
            tokens("usage.jsonl.1"),
            (0..10).collect::<Vec<_>>(),
            "before the reopen"
        );
        assert_eq!(
            tokens("usage.jsonl"),
            (10..15).collect::<Vec<_>>(),
            "after it"
        );
    }

    #[test]
    fn open_names_what_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").expect("write");
        let error = Ledger::open(&blocker.join("usage.jsonl"), Arc::new(Metrics::new()))
            .err()
            .expect("a file is no directory");
        assert!(
            matches!(error, LedgerError::CreateDir { .. }),
            "typed: {error:?}"
        );
        assert!(
            error.to_string().contains("cannot create the directory"),
            "{error}"
        );
    }

    #[test]
    fn a_full_disk_is_counted_not_fatal() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        if !Path::new("/dev/full").exists() {
            return;
        }
        let metrics = Arc::new(Metrics::new());
        let ledger = Ledger::open(Path::new("/dev/full"), metrics.clone()).expect("open");
        for n in 0..10 {
            ledger.record(sample_entry(n));
        }
        ledger.close(Duration::from_secs(5));
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        assert!(
            text.contains("tollgate_ledger_errors_total{reason=\"write\"} 10"),
            "every lost line counted: {text}"
        );
    }
}
