//! [`AccountedBody`]: the response body on its way out, watched for token usage — the SSE stream
//! event by event, a JSON answer read whole at its end — and settled once when it ends, errors or
//! is dropped. Frames pass through untouched (the same `Bytes`), except what [`UsageStripper`]
//! takes out when the gateway asked for stream usage on the client's behalf.
//!
//! Edge cases: end of stream may come with the last data frame (checked after every frame); a
//! JSON answer over [`MAX_JSON_BYTES`] is not kept and is estimated instead.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::accounting::settlement::{Outcome, Settlement};
use crate::accounting::usage::{
    completion_chars_from_json, usage_from_json, SseObserver, Usage, UsageStripper,
    DEFAULT_MAX_LINE_BYTES,
};
use crate::http::body::{BoxError, GatewayBody};

/// A JSON answer larger than this is not kept for its usage; it is estimated instead.
const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;

enum Watch {
    Sse(Box<SseObserver>),
    /// The frames of a JSON answer (shared `Bytes`, not copies), read whole at the end.
    Json {
        frames: Vec<Bytes>,
        len: usize,
        overflow: bool,
    },
}

pin_project! {
    pub struct AccountedBody {
        #[pin]
        inner: GatewayBody,
        watch: Watch,
        stripper: Option<UsageStripper>,
        settlement: Option<Settlement>,
        ttft: Option<f64>,
        // The stripper's held-back tail, sent before the end of stream.
        flushed: bool,
    }

    impl PinnedDrop for AccountedBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(settlement) = this.settlement.take() {
                let (usage, chars) = read(this.watch);
                settlement.settle(usage, chars, *this.ttft, Outcome::ClientGone);
            }
        }
    }
}

impl AccountedBody {
    pub fn new(inner: GatewayBody, sse: bool, strip: bool, settlement: Settlement) -> Self {
        let watch = if sse {
            Watch::Sse(Box::new(SseObserver::new(DEFAULT_MAX_LINE_BYTES)))
        } else {
            Watch::Json {
                frames: Vec::new(),
                len: 0,
                overflow: false,
            }
        };
        AccountedBody {
            inner,
            watch,
            stripper: strip.then(|| UsageStripper::new(DEFAULT_MAX_LINE_BYTES)),
            settlement: Some(settlement),
            ttft: None,
            flushed: false,
        }
    }
}

/// The usage and generated-text size seen so far.
fn read(watch: &Watch) -> (Option<Usage>, u64) {
    match watch {
        Watch::Sse(observer) => (observer.usage(), observer.completion_chars()),
        Watch::Json {
            frames, overflow, ..
        } => {
            if *overflow {
                return (None, 0);
            }
            let whole: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
            (usage_from_json(&whole), completion_chars_from_json(&whole))
        }
    }
}

impl Body for AccountedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        loop {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        // Trailers and other frames: nothing to read, nothing to change.
                        continue;
                    };
                    if this.ttft.is_none() {
                        if let (Some(settlement), Watch::Sse(_)) =
                            (this.settlement.as_ref(), &*this.watch)
                        {
                            *this.ttft = Some(settlement.start.elapsed().as_secs_f64());
                        }
                    }
                    match this.watch {
                        Watch::Sse(observer) => observer.observe(&data),
                        Watch::Json {
                            frames,
                            len,
                            overflow,
                        } => {
                            *len += data.len();
                            if *len > MAX_JSON_BYTES {
                                *overflow = true;
                                frames.clear();
                            } else if !*overflow {
                                frames.push(data.clone());
                            }
                        }
                    }
                    let mut out = match this.stripper.as_mut() {
                        Some(stripper) => stripper.rewrite(data),
                        None => data,
                    };
                    // The end may come with the last data frame (a Content-Length body): the
                    // consumer need not poll again, so settle now.
                    if this.inner.is_end_stream() {
                        *this.flushed = true;
                        if let Some(rest) = this.stripper.as_mut().map(UsageStripper::finish) {
                            if !rest.is_empty() {
                                let mut joined = bytes::BytesMut::from(&out[..]);
                                joined.extend_from_slice(&rest);
                                out = joined.freeze();
                            }
                        }
                        if let Some(settlement) = this.settlement.take() {
                            let (usage, chars) = read(this.watch);
                            settlement.settle(usage, chars, *this.ttft, Outcome::Complete);
                        }
                    }
                    if out.is_empty() {
                        if this.settlement.is_none() {
                            return Poll::Ready(None);
                        }
                        // All of it was held back or removed: wait for more.
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Some(Err(error)) => {
                    if let Some(settlement) = this.settlement.take() {
                        let (usage, chars) = read(this.watch);
                        settlement.settle(usage, chars, *this.ttft, Outcome::UpstreamError);
                    }
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    if !*this.flushed {
                        *this.flushed = true;
                        let rest = this.stripper.as_mut().map(UsageStripper::finish);
                        if let Some(rest) = rest.filter(|r| !r.is_empty()) {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                    }
                    if let Some(settlement) = this.settlement.take() {
                        let (usage, chars) = read(this.watch);
                        settlement.settle(usage, chars, *this.ttft, Outcome::Complete);
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Settled means the last frame has been handed out (or the body failed).
        self.settlement.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.stripper.is_some() {
            // The stripped stream is shorter than the upstream's.
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
