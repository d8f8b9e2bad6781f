//! Finished spans on their way to the collector: a bounded queue, and one task that sends them
//! in batches over OTLP/HTTP.
//!
//! Why our own [`SpanProcessor`] rather than the SDK's `BatchSpanProcessor`: that one drops
//! spans on a full queue with only a log line, and we owe operators an exact count
//! (`tollgate_trace_spans_dropped_total`). Here `on_end` — called on the request's thread as its
//! span ends — only tries to queue the span (`try_send`: no lock held while exporting, no wait),
//! and counts it when the queue is full. The task sends what the queue holds once the batch delay
//! has passed since the first span waiting, or as soon as a batch is full; a collector that is
//! down or slow only makes the queue fill, and the spans beyond it are counted, never waited for.
//!
//! Edge cases: a batch the collector refuses, or that takes longer than the export timeout, is
//! counted as `export_failed` span by span; spans ended after shutdown are counted as `closed`;
//! at shutdown what is queued is sent once more, within the time the caller allows.

use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use prometheus::IntCounter;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, timeout_at, Instant};

/// Spans sent in one request to the collector, at most (the SDKs' default).
const MAX_BATCH: usize = 512;
/// How long one export may take before its spans are given up (the SDKs' default).
pub(super) const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The dropped-span counters, one per reason.
#[derive(Debug, Clone)]
pub(super) struct Dropped {
    pub(super) queue_full: IntCounter,
    pub(super) export_failed: IntCounter,
    pub(super) closed: IntCounter,
}

/// Queues each finished, sampled span for the export task.
#[derive(Debug)]
pub(super) struct QueueProcessor {
    queue: mpsc::Sender<SpanData>,
    dropped: Dropped,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.queue.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped.queue_full.inc(),
            Err(mpsc::error::TrySendError::Closed(_)) => self.dropped.closed.inc(),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        // The task sends on its own schedule; shutdown ([`Exporting::stop`]) sends the rest.
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// The export task, and how to stop it.
pub(super) struct Exporting {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Exporting {
    /// Sends what is still queued, waiting at most `within`.
    pub(super) async fn stop(self, within: Duration) {
        let _ = self.stop.send(());
        let _ = timeout(within, self.task).await;
    }
}

/// The processor that feeds `exporter`, and the task (spawned now) that drives it.
pub(super) fn start<E: SpanExporter + 'static>(
    exporter: E,
    queue_size: usize,
    batch_delay: Duration,
    dropped: Dropped,
) -> (QueueProcessor, Exporting) {
    let (queue, spans) = mpsc::channel(queue_size);
    let (stop, stopped) = oneshot::channel();
    let sender = Sender {
        exporter,
        failed: dropped.export_failed.clone(),
    };
    let task = tokio::spawn(sender.run(spans, batch_delay, stopped));
    (QueueProcessor { queue, dropped }, Exporting { stop, task })
}

struct Sender<E> {
    exporter: E,
    failed: IntCounter,
}

impl<E: SpanExporter> Sender<E> {
    async fn run(
        self,
        mut spans: mpsc::Receiver<SpanData>,
        delay: Duration,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut stopping = false;
        while !stopping {
            // Wait for a first span, then up to `delay` for more.
            tokio::select! {
                got = spans.recv_many(&mut batch, MAX_BATCH) => if got == 0 { break },
                _ = &mut stopped => break,
            }
            let deadline = Instant::now() + delay;
            while batch.len() < MAX_BATCH {
                let room = MAX_BATCH - batch.len();
                tokio::select! {
                    got = timeout_at(deadline, spans.recv_many(&mut batch, room)) => match got {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    },
                    _ = &mut stopped => {
                        stopping = true;
                        break;
                    }
                }
            }
            self.export(&mut batch).await;
        }
        // Shutting down: refuse new spans, send those queued.
        spans.close();
        while spans.recv_many(&mut batch, MAX_BATCH).await > 0 {
            self.export(&mut batch).await;
        }
        self.export(&mut batch).await;
        let _ = self.exporter.shutdown();
    }

    async fn export(&self, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(MAX_BATCH));
        let count = spans.len() as u64;
        let sent = timeout(EXPORT_TIMEOUT, self.exporter.export(spans)).await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                self.failed.inc_by(count);
                tracing::debug!(%error, spans = count, "the collector did not take the spans");
            }
            Err(_elapsed) => {
                self.failed.inc_by(count);
                tracing::debug!(spans = count, "the collector did not answer in time");
            }
        }
    }
}
