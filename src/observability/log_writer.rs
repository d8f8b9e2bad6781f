//! Where log lines go: into a buffer in memory, written to stdout by a thread of its own in
//! batches — at most [`FLUSH_INTERVAL`] after a line was logged, sooner once [`BATCH_BYTES`] have
//! gathered.
//!
//! Why not one `write` per line: the access log writes a line for every request, and a `write`
//! syscall per line (plus stdout's lock) was 5–7 % of the gateway's CPU under load
//! (bench/profile.sh); in batches it is a few hundred writes a second whatever the request rate.
//! Why not `tracing-appender`'s non-blocking writer: it wakes its thread for every line, which
//! costs the request a futex call instead of a `write`, and it drops lines when its queue is full.
//! Here a line costs one uncontended lock and a copy (the thread is woken only by the first line
//! after a quiet second, or by a full batch), and nothing is dropped: if stdout stops
//! taking bytes (a stuck pipe) and [`MAX_BUFFERED`] are waiting, loggers wait too, as they would
//! with a plain blocking stdout.
//!
//! The lines still buffered are written when the [`FlushGuard`] is dropped (the end of `main`);
//! what a SIGKILL or abort catches in the buffer, at most one interval's worth, is lost.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in memory.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// A batch this large is written without waiting for the interval.
pub(crate) const BATCH_BYTES: usize = 64 * 1024;
/// Past this, loggers wait for the writer thread.
pub(crate) const MAX_BUFFERED: usize = 8 * 1024 * 1024;
/// After this long without a line, the writer thread stops waking every interval.
pub(crate) const IDLE_AFTER: Duration = Duration::from_secs(1);

/// The `MakeWriter` for `tracing_subscriber::fmt`: every event's formatted line is appended to
/// the shared buffer.
#[derive(Clone)]
pub(crate) struct BatchedStdout {
    shared: Arc<Shared>,
}

/// Writes out what is still buffered, and stops the writer thread, when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer thread: the first line after a quiet spell, a full batch, or closing.
    wake_writer: Condvar,
    /// Wakes loggers waiting for room (only when stdout had stalled).
    room: Condvar,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    /// The writer thread sleeps until a line comes; the next line must wake it.
    writer_idle: bool,
    /// The writer thread is waiting out an interval; a full batch should wake it.
    writer_gathering: bool,
    closing: bool,
}

impl BatchedStdout {
    /// The writer and the guard that flushes it; starts the writer thread.
    pub(crate) fn start() -> std::io::Result<(BatchedStdout, FlushGuard)> {
        let guard = FlushGuard::start(std::io::stdout())?;
        let writer = BatchedStdout {
            shared: guard.shared.clone(),
        };
        Ok((writer, guard))
    }
}

impl FlushGuard {
    /// Starts the writer thread, writing to `out`.
    fn start(mut out: impl Write + Send + 'static) -> std::io::Result<FlushGuard> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake_writer: Condvar::new(),
            room: Condvar::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tollgate-log".into())
                .spawn(move || shared.run_writer(&mut out))?
        };
        Ok(FlushGuard {
            shared,
            thread: Some(thread),
        })
    }
}

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = LineSink<'a>;

    fn make_writer(&'a self) -> LineSink<'a> {
        LineSink {
            shared: &self.shared,
        }
    }
}

/// One event's writer (`tracing_subscriber` formats the whole line first, then writes it once).
pub(crate) struct LineSink<'a> {
    shared: &'a Shared,
}

impl Write for LineSink<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.shared.append(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves at worst a partial line: keep logging.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append(&self, bytes: &[u8]) {
        let mut state = self.lock();
        while state.buffer.len() >= MAX_BUFFERED && !state.closing {
            state = self
                .room
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.buffer.extend_from_slice(bytes);
        // Wake the writer only when it waits for exactly this: one futex call per batch at most.
        let wake = if state.writer_idle {
            state.writer_idle = false;
            true
        } else if state.writer_gathering && state.buffer.len() >= BATCH_BYTES {
            state.writer_gathering = false;
            true
        } else {
            false
        };
        drop(state);
        if wake {
            self.wake_writer.notify_one();
        }
    }

    /// The writer thread. While lines come, it wakes every interval and writes what has
    /// gathered, so that logging a line never has to wake it; after a quiet [`IDLE_AFTER`] it
    /// sleeps until a line wakes it. A full batch wakes it early. Ends when closing and empty.
    fn run_writer(&self, out: &mut impl Write) {
        let mut spare = Vec::new();
        let mut last_write = Instant::now();
        let mut state = self.lock();
        loop {
            if state.buffer.is_empty() && !state.closing && last_write.elapsed() >= IDLE_AFTER {
                state.writer_idle = true;
                while state.buffer.is_empty() && !state.closing {
                    state = self
                        .wake_writer
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                state.writer_idle = false;
            }
            if !state.closing && state.buffer.len() < BATCH_BYTES {
                state.writer_gathering = true;
                state = self
                    .wake_writer
                    .wait_timeout(state, FLUSH_INTERVAL)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                state.writer_gathering = false;
            }
            if state.buffer.is_empty() {
                if state.closing {
                    return;
                }
                continue;
            }
            std::mem::swap(&mut state.buffer, &mut spare);
            let stalled = spare.len() >= MAX_BUFFERED;
            drop(state);
            if stalled {
                self.room.notify_all();
            }
            // Nowhere to report a failing stdout; the lines are dropped rather than retried.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            // Do not keep a huge buffer after a burst.
            spare.shrink_to(MAX_BUFFERED / 8);
            last_write = Instant::now();
            state = self.lock();
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake_writer.notify_one();
        self.shared.room.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that records each `write` call, standing in for stdout.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Waits, boundedly, until something was written.
    fn wait_for_output(out: &Recorder) {
        let deadline = Instant::now() + FLUSH_INTERVAL * 20;
        while out.0.lock().expect("recorder").is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn start(out: Recorder) -> FlushGuard {
        FlushGuard::start(out).expect("writer thread starts")
    }

    #[test]
    fn lines_arrive_whole_in_order_in_few_writes() {
        let out = Recorder::default();
        let guard = start(out.clone());
        let shared = guard.shared.clone();
        let lines: Vec<String> = (0..10_000).map(|i| format!("line {i}\n")).collect();
        for line in &lines {
            shared.append(line.as_bytes());
        }
        drop(guard);
        let writes = out.0.lock().expect("recorder").clone();
        assert_eq!(writes.concat(), lines.concat().into_bytes());
        assert!(
            writes.len() < 100,
            "10,000 lines were written in {} writes",
            writes.len()
        );
    }

    #[test]
    fn a_line_is_written_within_the_interval_also_when_the_writer_slept() {
        let out = Recorder::default();
        let guard = start(out.clone());
        let shared = guard.shared.clone();
        shared.append(b"hello\n");
        wait_for_output(&out);
        assert_eq!(out.0.lock().expect("recorder").concat(), b"hello\n");

        std::thread::sleep(IDLE_AFTER + FLUSH_INTERVAL * 2);
        assert!(
            shared.lock().writer_idle,
            "the writer sleeps when nothing comes"
        );
        out.0.lock().expect("recorder").clear();
        shared.append(b"late\n");
        wait_for_output(&out);
        assert_eq!(out.0.lock().expect("recorder").concat(), b"late\n");
        drop(guard);
    }

    #[test]
    fn closing_writes_what_is_buffered() {
        let out = Recorder::default();
        let guard = start(out.clone());
        let shared = guard.shared.clone();
        for _ in 0..3 {
            shared.append(b"x\n");
        }
        drop(guard);
        assert_eq!(out.0.lock().expect("recorder").concat(), b"x\nx\nx\n");
    }
}
