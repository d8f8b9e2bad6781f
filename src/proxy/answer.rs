//! [`Answer`]: an upstream's response body as it comes off the connection, with every frame
//! that is already there joined into one; and [`Returned`], the HTTP/1.1 connection it comes on,
//! which goes back to its worker's pool once the answer was read to its end.
//!
//! Why join frames: an upstream sends one HTTP chunk per SSE event, and hyper gives one body frame
//! per chunk. Passed on one by one, each event would cost a trip through every body layer above
//! (usage watch, end hook) and a write to the client of its own. A read from the upstream socket
//! usually brings many events at once, so the answer hands on, in one frame, everything that can
//! be had without waiting: it drives the HTTP/1.1 connection itself ([`H1::drive`]) to decode the
//! chunks already read, and stops at the first that is not there yet. Nothing ever waits to make
//! a batch: an event that arrives alone leaves alone, as soon as it is read.
//!
//! Edge cases:
//! - A frame is passed on as it came (the same `Bytes`) when nothing else is ready; joining
//!   copies, and stops at [`MAX_JOINED_BYTES`] so a flood cannot grow one frame without bound.
//! - An error, trailers or the end that come right after data in the same poll are kept for the
//!   next poll, after the data; `is_end_stream` is true with the last data frame when the end
//!   was seen with it, so the client's last chunk and the end of the body can leave together.
//! - An error is handed on one turn after it came (the task is woken at once, nothing waits on
//!   a timer): hyper's server writes the response head, and the data before the break, into its
//!   buffer and flushes only when the body is not ready, but aborts the connection on a body
//!   error without flushing. Read inline, the break can come in the same poll as the head: the
//!   client would get a closed connection and no answer at all, instead of the 200 and the
//!   broken body that reached it before.
//! - HTTP/2 answers have no connection here to drive (their connection has a task of its own,
//!   which queues what it reads on the stream): the frames queued are joined the same way.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::proxy::endpoint::Endpoint;
use crate::proxy::h1::H1;

/// Frames already there are joined up to this size; the rest goes in the next frame.
pub(crate) const MAX_JOINED_BYTES: usize = 64 * 1024;

/// What a joined frame makes room for when it starts.
const JOIN_ROOM: usize = 8 * 1024;

/// An HTTP/1.1 connection lent to a request, to go back to its stack once the answer is read.
pub(crate) struct Returned {
    pub(crate) conn: H1,
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) slot: usize,
    pub(crate) max_idle: usize,
}

impl Returned {
    /// Puts the connection back for the next request of this worker.
    fn give_back(self) {
        if self.conn.is_closed() {
            return;
        }
        let mut idle = self.endpoint.idle(self.slot);
        if idle.h1.len() < self.max_idle {
            idle.h1.push((self.conn, Instant::now()));
        }
    }
}

/// An upstream's response body: frames already there come joined, and an HTTP/1.1 connection
/// read to the answer's end goes back to its pool.
pub(crate) struct Answer {
    incoming: Incoming,
    /// The HTTP/1.1 connection the answer comes on (`None` for HTTP/2, and once given back).
    conn: Option<Returned>,
    /// What came after the data of the last frame handed on: trailers or an error.
    after: Option<Result<Frame<Bytes>, hyper::Error>>,
    /// The upstream's body ended (it may still have `after` to hand on).
    ended: bool,
    /// An error in `after` waited its one turn, so that what came before it was flushed.
    error_waited: bool,
}

impl Answer {
    pub(crate) fn new(incoming: Incoming, conn: Option<Returned>) -> Self {
        let mut answer = Answer {
            incoming,
            conn,
            after: None,
            ended: false,
            error_waited: false,
        };
        if answer.incoming.is_end_stream() {
            answer.end();
        }
        answer
    }

    /// The answer was read to its end: the connection can serve the next request.
    fn end(&mut self) {
        self.ended = true;
        if let Some(returned) = self.conn.take() {
            returned.give_back();
        }
    }

    /// The next frame of the upstream's body, driving its connection first.
    fn poll_incoming(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(returned) = self.conn.as_mut() {
            returned.conn.drive(cx);
        }
        let polled = Pin::new(&mut self.incoming).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.end(),
            Poll::Ready(Some(Ok(_))) if self.incoming.is_end_stream() => self.end(),
            // A broken answer leaves its connection unusable: it is dropped, never given back.
            Poll::Ready(Some(Err(_))) => {
                self.conn = None;
                self.ended = true;
            }
            _ => {}
        }
        polled
    }
}

impl Answer {
    /// Hands on the trailers or the error kept in `after`; an error only after one turn in which
    /// the body is not ready (and the task woken at once), so that the server flushes first.
    fn hand_on_after(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if matches!(self.after, Some(Err(_))) && !self.error_waited {
            self.error_waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.after.take())
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if this.after.is_some() {
            return this.hand_on_after(cx);
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let mut joined = Joined::default();
        while joined.len() < MAX_JOINED_BYTES {
            match this.poll_incoming(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => joined.push(data),
                    Err(other) => {
                        this.after = Some(Ok(other));
                        break;
                    }
                },
                Poll::Ready(Some(Err(error))) => {
                    this.after = Some(Err(error));
                    break;
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
            if this.ended {
                break;
            }
        }
        match joined.into_bytes() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None if this.after.is_some() => this.hand_on_after(cx),
            None if this.ended => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.after.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

/// Data frames joined into one: the first kept as it came, a copy once a second one joins it.
#[derive(Default)]
struct Joined {
    first: Option<Bytes>,
    more: Option<BytesMut>,
}

impl Joined {
    fn len(&self) -> usize {
        match (&self.more, &self.first) {
            (Some(more), _) => more.len(),
            (None, Some(first)) => first.len(),
            (None, None) => 0,
        }
    }

    fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        if let Some(more) = self.more.as_mut() {
            more.extend_from_slice(&data);
            return;
        }
        match self.first.take() {
            None => self.first = Some(data),
            Some(first) => {
                // Room for a read buffer's worth at once (hyper reads 8 KiB at first).
                let room = (first.len() + data.len()).max(JOIN_ROOM);
                let mut more = BytesMut::with_capacity(room);
                more.extend_from_slice(&first);
                more.extend_from_slice(&data);
                self.more = Some(more);
            }
        }
    }

    fn into_bytes(self) -> Option<Bytes> {
        match (self.more, self.first) {
            (Some(more), _) => Some(more.freeze()),
            (None, first) => first,
        }
    }
}

#[cfg(test)]
#[path = "answer_tests.rs"]
mod tests;
