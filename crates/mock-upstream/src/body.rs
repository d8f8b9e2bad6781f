//! The mock's response body: frames sliced out of one buffer (or one frame repeated, for a
//! flood), with an optional delay between frames and an optional fault at the end, counted as
//! the server's [`Shared`](crate::Shared) counters say.
//!
//! Edge cases: a body dropped before its end counts as cancelled (the receiver went away); an
//! aborting body pauses before it fails, so that what it sent reaches the socket first; a stalled
//! body is never woken again.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::conn::ConnCtl;
use crate::fault::{Fault, Knobs};
use crate::Shared;

/// Pause between the last frame and the failure of an `abort-after` body.
const ABORT_FLUSH_PAUSE: Duration = Duration::from_millis(10);

/// Error used to make hyper drop a connection (no response / broken body).
#[derive(Debug)]
pub(crate) struct MockAbort(pub(crate) &'static str);

impl fmt::Display for MockAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mock upstream: {}", self.0)
    }
}

impl std::error::Error for MockAbort {}

/// What happens once the frames to send are exhausted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// End the body normally.
    Finish,
    /// Hang forever.
    Stall,
    /// Fail the body, making hyper drop the connection mid-body.
    Abort,
}

/// Counting and close-after-stream hooks of a completion body.
pub(crate) struct Track {
    pub(crate) shared: Arc<Shared>,
    pub(crate) ctl: Arc<ConnCtl>,
    pub(crate) sse: bool,
}

/// The frames of a body.
pub(crate) enum Frames {
    /// Sliced out of one buffer: frame `i` ends at `ends[i]`.
    Slices { data: Bytes, ends: Vec<usize> },
    /// `frame` again and again, `total` bytes in all (the last one cut short), each made only
    /// when asked for.
    Repeat { frame: Bytes, total: u64 },
}

impl Frames {
    /// Frames packed one after another in `parts`.
    pub(crate) fn packed(parts: &[Bytes]) -> Frames {
        let mut data = Vec::with_capacity(parts.iter().map(Bytes::len).sum());
        let mut ends = Vec::with_capacity(parts.len());
        for part in parts {
            data.extend_from_slice(part);
            ends.push(data.len());
        }
        Frames::Slices {
            data: Bytes::from(data),
            ends,
        }
    }

    fn count(&self) -> usize {
        match self {
            Frames::Slices { ends, .. } => ends.len(),
            Frames::Repeat { frame, total } => {
                let per = frame.len().max(1) as u64;
                usize::try_from(total.div_ceil(per)).unwrap_or(usize::MAX)
            }
        }
    }

    /// Frame `i`; `i` is below [`count`](Self::count).
    fn get(&self, i: usize) -> Bytes {
        match self {
            Frames::Slices { data, ends } => {
                let start = if i == 0 { 0 } else { ends[i - 1] };
                data.slice(start..ends[i])
            }
            Frames::Repeat { frame, total } => {
                let sent = frame.len() as u64 * i as u64;
                let len = total.saturating_sub(sent).min(frame.len() as u64);
                // `len` is at most the frame's length, so it fits a usize.
                frame.slice(..usize::try_from(len).unwrap_or(0))
            }
        }
    }
}

/// A body of pre-built frames, with optional delay between frames and an optional fault at the
/// end.
pub(crate) struct MockBody {
    frames: Frames,
    /// Index of the next frame.
    next: usize,
    /// Number of frames to send before `tail`.
    limit: usize,
    tail: Tail,
    /// Content-Length to advertise (non-stream bodies).
    exact_len: Option<u64>,
    delay: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
    track: Option<Track>,
    /// The pause before `Tail::Abort` has been started.
    abort_armed: bool,
    done: bool,
}

impl MockBody {
    /// A single-frame body with a Content-Length.
    pub(crate) fn full(data: Bytes) -> MockBody {
        let len = data.len();
        MockBody {
            exact_len: Some(len as u64),
            frames: Frames::Slices {
                data,
                ends: vec![len],
            },
            limit: 1,
            next: 0,
            tail: Tail::Finish,
            delay: None,
            sleep: None,
            track: None,
            abort_armed: false,
            done: false,
        }
    }

    /// A streamed (chunked) body sending `frames` one by one.
    pub(crate) fn stream(frames: Frames) -> MockBody {
        MockBody {
            limit: frames.count(),
            frames,
            next: 0,
            tail: Tail::Finish,
            exact_len: None,
            delay: None,
            sleep: None,
            track: None,
            abort_armed: false,
            done: false,
        }
    }

    /// Applies the body faults and the chunk delay of `knobs`. For a
    /// non-stream body a fault splits it in two halves and sends only the
    /// first (none for `abort-after=0`).
    pub(crate) fn with_faults(mut self, knobs: &Knobs, sse: bool) -> MockBody {
        self.delay = knobs.chunk_delay;
        let (keep, tail) = match knobs.fault {
            Some(Fault::StallBody) => (if sse { 2 } else { 1 }, Tail::Stall),
            Some(Fault::AbortAfter(k)) => (if sse { k } else { k.min(1) }, Tail::Abort),
            _ => return self,
        };
        if let (false, Frames::Slices { data, ends }) = (sse, &mut self.frames) {
            let len = data.len();
            *ends = vec![len / 2, len];
        }
        self.limit = keep.min(self.frames.count());
        self.tail = tail;
        self
    }

    pub(crate) fn tracked(mut self, track: Track) -> MockBody {
        self.track = Some(track);
        self
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(track) = &self.track {
            if track.sse {
                track.shared.completed.fetch_add(1, Ordering::SeqCst);
                if track.shared.opts.close_after_stream {
                    track.ctl.close.notify_one();
                }
            }
        }
    }
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = MockAbort;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, MockAbort>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if this.next >= this.limit {
            return match this.tail {
                Tail::Finish => {
                    this.finish();
                    Poll::Ready(None)
                }
                // Never woken: the body hangs until the connection goes away.
                Tail::Stall => Poll::Pending,
                Tail::Abort => {
                    // Pause briefly first so the head and the frames sent so
                    // far reach the socket: hyper (HTTP/1) flushes while the
                    // body is pending, and h2 would discard queued DATA frames
                    // on the reset.
                    if !this.abort_armed {
                        this.abort_armed = true;
                        this.sleep = Some(Box::pin(tokio::time::sleep(ABORT_FLUSH_PAUSE)));
                    }
                    if let Some(pause) = this.sleep.as_mut() {
                        if pause.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    this.sleep = None;
                    this.done = true;
                    Poll::Ready(Some(Err(MockAbort("abort-after"))))
                }
            };
        }
        if this.next > 0 {
            if let Some(delay) = this.delay {
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
        }
        let frame = this.frames.get(this.next);
        this.next += 1;
        if let Some(track) = &this.track {
            track
                .shared
                .body_bytes
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
        if this.next >= this.limit && this.tail == Tail::Finish {
            this.finish();
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        self.exact_len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Drop for MockBody {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(track) = &self.track {
            track.shared.cancelled.fetch_add(1, Ordering::SeqCst);
            track.shared.cancel_notify.notify_waiters();
        }
    }
}
