//! The usage ledger: one JSON line per finished request that reached the upstream, appended to
//! `[ledger] path`, written off the hot path.
//!
//! Requests hand their line to a bounded channel and move on; a dedicated thread appends the lines
//! and flushes whenever the channel runs dry, so a line is on disk within moments of its request
//! ending, and on shutdown every line is written before the process exits.
//!
//! Edge cases: a failed write (a full disk) is logged once when it starts and once when it ends,
//! and every line it loses is counted in `tollgate_ledger_errors_total`; a channel that is full
//! (the disk cannot keep up) drops the line, counted and logged the same way. Neither ever blocks
//! or fails a request.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

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
    pub(crate) model: String,
    pub(crate) endpoint: &'static str,
    pub(crate) status: u16,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    /// `reported` by the upstream, or `estimated` by the gateway.
    pub(crate) source: &'static str,
    pub(crate) duration_ms: f64,
    /// Time to the first byte of a streamed answer.
    pub(crate) ttft_ms: Option<f64>,
    /// `complete`, `client_gone`, `upstream_error`.
    pub(crate) outcome: &'static str,
}

pub struct Ledger {
    sender: Mutex<Option<SyncSender<LedgerEntry>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    /// Whether the last enqueue failed, so that a full queue is logged once, not per line.
    overflowing: std::sync::atomic::AtomicBool,
}

impl Ledger {
    /// Opens (creating) the ledger file for appending and starts its writer thread.
    pub(crate) fn open(path: &Path, metrics: Arc<Metrics>) -> Result<Ledger, String> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("ledger: cannot create {}: {e}", parent.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("ledger: cannot open {}: {e}", path.display()))?;
        let (sender, receiver) = mpsc::sync_channel(QUEUE);
        let writer_metrics = metrics.clone();
        let path = path.to_owned();
        let writer = std::thread::Builder::new()
            .name("tollgate-ledger".into())
            .spawn(move || write_lines(file, &path, receiver, &writer_metrics))
            .map_err(|e| format!("ledger: cannot start the writer: {e}"))?;
        Ok(Ledger {
            sender: Mutex::new(Some(sender)),
            writer: Mutex::new(Some(writer)),
            metrics,
            overflowing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Queues a line; never blocks.
    pub(crate) fn record(&self, entry: LedgerEntry) {
        use std::sync::atomic::Ordering;
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = sender.as_ref() else {
            self.metrics.ledger_error(LedgerErrorReason::Closed);
            return;
        };
        match sender.try_send(entry) {
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

fn write_lines(file: File, path: &Path, receiver: Receiver<LedgerEntry>, metrics: &Metrics) {
    let mut out = BufWriter::with_capacity(64 * 1024, file);
    let mut failing = false;
    let mut pending = 0u64;
    let mut line = Vec::with_capacity(512);
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        while let Some(entry) = next.take() {
            line.clear();
            if serde_json::to_writer(&mut line, &entry).is_ok() {
                line.push(b'\n');
                match out.write_all(&line) {
                    Ok(()) => pending += 1,
                    Err(error) => report(&mut failing, &mut pending, path, &error, metrics, 1),
                }
            }
            next = receiver.try_recv().ok();
        }
        // The queue ran dry: put what we have on disk.
        match out.flush() {
            Ok(()) => {
                if failing {
                    tracing::info!(path = %path.display(), "ledger writes succeed again");
                    failing = false;
                }
                pending = 0;
            }
            Err(error) => {
                let lost = pending;
                report(&mut failing, &mut pending, path, &error, metrics, lost);
                // Drop what is buffered rather than retry it forever against a full disk.
                out = BufWriter::with_capacity(64 * 1024, out.into_parts().0);
            }
        }
    }
    if let Err(error) = out.flush() {
        let lost = pending;
        report(&mut failing, &mut pending, path, &error, metrics, lost);
    }
}

fn report(
    failing: &mut bool,
    pending: &mut u64,
    path: &Path,
    error: &std::io::Error,
    metrics: &Metrics,
    lost: u64,
) {
    if !*failing {
        tracing::error!(path = %path.display(), %error, "cannot write the ledger; lines are lost until it recovers (tollgate_ledger_errors_total)");
        *failing = true;
    }
    for _ in 0..lost {
        metrics.ledger_error(LedgerErrorReason::Write);
    }
    *pending = 0;
}

/// Now, as the ledger writes it.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u64) -> LedgerEntry {
        LedgerEntry {
            time: now_rfc3339(),
            request_id: format!("r{n}"),
            key: "k".into(),
            model: "m".into(),
            endpoint: "chat_completions",
            status: 200,
            prompt_tokens: n,
            completion_tokens: 1,
            source: "reported",
            duration_ms: 1.0,
            ttft_ms: None,
            outcome: "complete",
        }
    }

    #[test]
    fn every_line_is_on_disk_after_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger").join("usage.jsonl");
        let ledger = Ledger::open(&path, Arc::new(Metrics::new())).expect("open");
        for n in 0..1000 {
            ledger.record(entry(n));
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
    fn a_full_disk_is_counted_not_fatal() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        if !Path::new("/dev/full").exists() {
            return;
        }
        let metrics = Arc::new(Metrics::new());
        let ledger = Ledger::open(Path::new("/dev/full"), metrics.clone()).expect("open");
        for n in 0..10 {
            ledger.record(entry(n));
        }
        ledger.close(Duration::from_secs(5));
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        assert!(
            text.contains("tollgate_ledger_errors_total{reason=\"write\"} 10"),
            "every lost line counted: {text}"
        );
    }
}
