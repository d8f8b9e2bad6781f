//! [`WatchedBody`]: the response body on its way out, watched for token usage — the SSE stream
//! event by event, a JSON answer's frames kept to be read whole — into a [`UsageWatch`] it
//! shares with the request's settlement. The body only observes; what happens at the end (the
//! settlement reading the watch) is the request's end hook's to run, once, however the answer
//! ended.
//!
//! Frames pass through untouched (the same `Bytes`), trailers included, except what
//! [`UsageStripper`] takes out when the gateway asked for stream usage on the client's behalf.
//!
//! Edge cases:
//! - End of stream may come with the last data frame (checked after every frame): the
//!   stripper's held-back tail goes out with that frame, since the consumer need not poll again.
//! - Trailers end the stream: the stripper's tail is sent before them.
//! - A JSON answer over [`MAX_JSON_BYTES`] is not kept, and is estimated instead.

use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::accounting::usage::{
    completion_chars_from_json, usage_from_json, SseObserver, Usage, UsageStripper,
    DEFAULT_MAX_LINE_BYTES,
};
use crate::http::body::{BoxError, GatewayBody};

/// A JSON answer larger than this is not kept for its usage; it is estimated instead.
const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;

/// What the answer showed of its usage so far; written by the body, read once at the end.
#[derive(Default)]
pub struct UsageWatch {
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// `None` until an answer is watched (a gateway-made error is not).
    watch: Option<Watch>,
    /// When the first data frame of a stream passed (time to first token).
    first_data: Option<Instant>,
}

enum Watch {
    Sse(Box<SseObserver>),
    /// The frames of a JSON answer (shared `Bytes`, not copies), read whole at the end.
    Json {
        frames: Vec<Bytes>,
        len: usize,
        overflow: bool,
    },
}

/// What the settlement charges from: the upstream's usage when it came, and the generated text's
/// size (for an estimate when it did not).
#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub(crate) usage: Option<Usage>,
    pub(crate) completion_chars: u64,
    /// Of a stream: when its first data frame passed.
    pub(crate) first_data: Option<Instant>,
}

impl UsageWatch {
    /// What was seen, read whole (a JSON answer is parsed here).
    pub(crate) fn observed(&self) -> Observed {
        let seen = self.lock();
        let (usage, completion_chars) = match &seen.watch {
            None => (None, 0),
            Some(Watch::Sse(observer)) => (observer.usage(), observer.completion_chars()),
            Some(Watch::Json { overflow: true, .. }) => (None, 0),
            Some(Watch::Json { frames, .. }) => {
                let whole: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
                (usage_from_json(&whole), completion_chars_from_json(&whole))
            }
        };
        Observed {
            usage,
            completion_chars,
            first_data: seen.first_data,
        }
    }

    fn start(&self, sse: bool) {
        self.lock().watch = Some(if sse {
            Watch::Sse(Box::new(SseObserver::new(DEFAULT_MAX_LINE_BYTES)))
        } else {
            Watch::Json {
                frames: Vec::new(),
                len: 0,
                overflow: false,
            }
        });
    }

    fn observe(&self, data: &Bytes) {
        let mut seen = self.lock();
        let Seen { watch, first_data } = &mut *seen;
        match watch {
            None => {}
            Some(Watch::Sse(observer)) => {
                first_data.get_or_insert_with(Instant::now);
                observer.observe(data);
            }
            Some(Watch::Json {
                frames,
                len,
                overflow,
            }) => {
                *len += data.len();
                if *len > MAX_JSON_BYTES {
                    *overflow = true;
                    frames.clear();
                } else if !*overflow {
                    frames.push(data.clone());
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Seen> {
        // Only this request's body and its end touch the watch; a panic in one leaves what was
        // seen intact.
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pin_project! {
    pub struct WatchedBody {
        #[pin]
        inner: GatewayBody,
        watch: std::sync::Arc<UsageWatch>,
        stripper: Option<UsageStripper>,
        // The stripper's held-back tail has been sent (or there is none).
        flushed: bool,
        // Trailers that came while the stripper still held a tail: sent right after it.
        trailers: Option<Frame<Bytes>>,
    }
}

impl WatchedBody {
    /// Watches `inner` — an SSE stream when `sse`, else a JSON answer — into `watch`; with
    /// `strip`, takes the usage the gateway asked for out of the client's stream.
    pub fn new(
        inner: GatewayBody,
        watch: std::sync::Arc<UsageWatch>,
        sse: bool,
        strip: bool,
    ) -> Self {
        watch.start(sse);
        WatchedBody {
            inner,
            watch,
            stripper: strip.then(|| UsageStripper::new(DEFAULT_MAX_LINE_BYTES)),
            flushed: !strip,
            trailers: None,
        }
    }
}

impl Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        loop {
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => return Poll::Ready(tail(this.stripper, this.flushed).map(data_frame)),
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                // Trailers (or another frame kind): nothing to read; they end the stream, so the
                // stripper's tail goes first.
                Err(frame) => {
                    return Poll::Ready(Some(Ok(match tail(this.stripper, this.flushed) {
                        Some(rest) => {
                            *this.trailers = Some(frame);
                            Frame::data(rest)
                        }
                        None => frame,
                    })))
                }
            };
            this.watch.observe(&data);
            let mut out = match this.stripper.as_mut() {
                Some(stripper) => stripper.rewrite(data),
                None => data,
            };
            let at_end = this.inner.is_end_stream();
            if at_end {
                if let Some(rest) = tail(this.stripper, this.flushed) {
                    out = joined(out, &rest);
                }
            }
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if at_end {
                return Poll::Ready(None);
            }
            // All of it was held back or removed: wait for more.
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers.is_none() && self.flushed && self.inner.is_end_stream()
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

/// The stripper's held-back tail, once, when it holds anything.
fn tail(stripper: &mut Option<UsageStripper>, flushed: &mut bool) -> Option<Bytes> {
    if std::mem::replace(flushed, true) {
        return None;
    }
    stripper
        .as_mut()
        .map(UsageStripper::finish)
        .filter(|rest| !rest.is_empty())
}

fn joined(out: Bytes, rest: &[u8]) -> Bytes {
    if out.is_empty() {
        return Bytes::copy_from_slice(rest);
    }
    let mut joined = BytesMut::from(&out[..]);
    joined.extend_from_slice(rest);
    joined.freeze()
}

fn data_frame(data: Bytes) -> Result<Frame<Bytes>, BoxError> {
    Ok(Frame::data(data))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn scripted(frames: Vec<Frame<Bytes>>) -> GatewayBody {
        StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(Ok::<_, BoxError>),
        ))
        .boxed_unsync()
    }

    fn trailers() -> Frame<Bytes> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-t", http::HeaderValue::from_static("1"));
        Frame::trailers(trailers)
    }

    /// Every frame the body gives, in order: data as text, trailers as `<trailers>`.
    async fn frames(mut body: WatchedBody) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("no error");
            match frame.into_data() {
                Ok(data) => out.push(String::from_utf8_lossy(&data).into_owned()),
                Err(frame) => {
                    assert!(frame.is_trailers(), "only data and trailers");
                    out.push("<trailers>".to_owned());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn trailers_pass_through_after_the_data_and_the_usage_is_read() {
        let json = r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let inner = scripted(vec![
            Frame::data(Bytes::from_static(json.as_bytes())),
            trailers(),
        ]);
        let watch = Arc::new(UsageWatch::default());
        let out = frames(WatchedBody::new(inner, watch.clone(), false, false)).await;
        assert_eq!(
            out,
            [json, "<trailers>"],
            "data, then the trailers, unchanged"
        );
        let usage = watch.observed().usage.expect("usage read");
        assert_eq!(
            (
                usage.prompt_tokens.reported(),
                usage.completion_tokens.reported()
            ),
            (Some(3), Some(1)),
            "the JSON answer's usage"
        );
    }

    #[tokio::test]
    async fn the_strippers_held_back_tail_goes_out_before_the_trailers() {
        let inner = scripted(vec![
            Frame::data(Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\"")),
            trailers(),
        ]);
        let watch = Arc::new(UsageWatch::default());
        let out = frames(WatchedBody::new(inner, watch, true, true)).await;
        assert_eq!(
            out,
            ["data: {\"a\":1}\n\n", "data: {\"b\"", "<trailers>"],
            "the unfinished event is sent before the trailers end the stream"
        );
    }

    #[test]
    fn nothing_watched_reads_as_nothing_seen() {
        let observed = UsageWatch::default().observed();
        assert!(observed.usage.is_none(), "no usage");
        assert_eq!(observed.completion_chars, 0, "no text");
        assert!(observed.first_data.is_none(), "no first frame");
    }
}
