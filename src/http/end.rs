//! The one end-of-request hook: a callback held in an `Option` and taken exactly once, told how
//! the answer ended — its last frame, its trailers, an error, or dropped before its end
//! (cancelled). The same [`Hook`] is first held by the outer layer's response future, so a
//! request whose client leaves before the response headers (hyper drops the future) fires it
//! too; when the headers come, it moves into the response body ([`HookBody`]).
//!
//! Modelled on linkerd2-proxy's `http-body-eos`. Edge cases:
//! - End of stream can come with the last data frame: `is_end_stream` is checked after every
//!   frame, because the consumer need not poll again.
//! - A body already at its end when wrapped (an empty answer) fires at once: hyper may never
//!   poll it.
//! - [`HookBody`] drops its inner body before the hook fires on drop (fields drop in order), so
//!   that everything below has let go of what it held when the callback runs.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::http::body::BoxError;

/// How an answer ended.
#[derive(Debug, Clone, Copy)]
pub enum End<'a> {
    /// The last frame was sent.
    Complete,
    /// The trailers were sent: the last frame of a stream that has them.
    Trailers(&'a HeaderMap),
    /// The body failed (the upstream broke off, or went idle too long).
    Error(&'a (dyn std::error::Error + Send + Sync + 'static)),
    /// Dropped before its end: the client left, before or after the response headers.
    Cancelled,
}

/// What runs once when a request ends.
pub trait OnEnd {
    fn on_end(self, end: End<'_>);
}

impl<F: FnOnce(End<'_>)> OnEnd for F {
    fn on_end(self, end: End<'_>) {
        self(end)
    }
}

/// The callback, fired at most once: by [`Hook::fire`], or with [`End::Cancelled`] on drop.
pub struct Hook<C: OnEnd> {
    callback: Option<C>,
}

impl<C: OnEnd> Hook<C> {
    pub fn new(callback: C) -> Self {
        Hook {
            callback: Some(callback),
        }
    }

    /// A hook with nothing left to fire: what stays behind when a hook is moved on.
    pub(crate) fn fired() -> Self {
        Hook { callback: None }
    }

    /// The callback, while it has not fired: to tell it what was learnt (the response head).
    pub(crate) fn get_mut(&mut self) -> Option<&mut C> {
        self.callback.as_mut()
    }

    pub(crate) fn fire(&mut self, end: End<'_>) {
        if let Some(callback) = self.callback.take() {
            callback.on_end(end);
        }
    }

    pub(crate) fn has_fired(&self) -> bool {
        self.callback.is_none()
    }
}

impl<C: OnEnd> Drop for Hook<C> {
    fn drop(&mut self) {
        self.fire(End::Cancelled);
    }
}

pin_project! {
    /// A response body that fires its [`Hook`] when it ends, fails or is dropped. Frames pass
    /// through untouched.
    pub struct HookBody<B, C>
    where
        C: OnEnd,
    {
        // Declared first: dropped before the hook fires on drop.
        #[pin]
        inner: B,
        hook: Hook<C>,
    }
}

impl<B: Body<Error = BoxError>, C: OnEnd> HookBody<B, C> {
    pub fn new(inner: B, mut hook: Hook<C>) -> Self {
        if inner.is_end_stream() {
            hook.fire(End::Complete);
        }
        HookBody { inner, hook }
    }
}

impl<B: Body<Error = BoxError>, C: OnEnd> Body for HookBody<B, C> {
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let mut this = self.project();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        match &polled {
            None => this.hook.fire(End::Complete),
            Some(Err(error)) => this.hook.fire(End::Error(&**error)),
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.hook.fire(End::Trailers(trailers));
                } else if this.inner.is_end_stream() {
                    this.hook.fire(End::Complete);
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.hook.has_fired()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;
    use crate::http::body::GatewayBody;

    /// A hook that notes every way it was told the body ended.
    fn recorder() -> (Arc<Mutex<Vec<String>>>, impl FnOnce(End<'_>) + Send) {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let seen = ends.clone();
        let callback = move |end: End<'_>| {
            let what = match end {
                End::Complete => "complete".to_owned(),
                End::Trailers(t) => format!("trailers:{}", t.len()),
                End::Error(e) => format!("error:{e}"),
                End::Cancelled => "cancelled".to_owned(),
            };
            seen.lock().expect("not poisoned").push(what);
        };
        (ends, callback)
    }

    fn scripted(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> GatewayBody {
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    fn ends(ends: &Mutex<Vec<String>>) -> Vec<String> {
        ends.lock().expect("not poisoned").clone()
    }

    #[tokio::test]
    async fn fires_once_at_the_last_frame_and_never_again() {
        let (seen, callback) = recorder();
        let inner = Full::new(Bytes::from_static(b"whole")).map_err(|never| match never {});
        let mut body = HookBody::new(inner, Hook::new(callback));
        assert!(ends(&seen).is_empty(), "nothing before the body is read");
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.data_ref().map(|d| &d[..]), Some(&b"whole"[..]));
        assert_eq!(
            ends(&seen),
            ["complete"],
            "the end came with the last data frame"
        );
        assert!(body.frame().await.is_none(), "nothing after the end");
        drop(body);
        assert_eq!(ends(&seen), ["complete"], "fired once, not again on drop");
    }

    #[tokio::test]
    async fn trailers_errors_and_drops_are_each_told() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", http::HeaderValue::from_static("1"));
        let (seen, callback) = recorder();
        let inner = scripted(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let body = HookBody::new(inner, Hook::new(callback));
        let collected = body.collect().await.expect("whole body");
        assert!(collected.trailers().is_some(), "trailers pass through");
        assert_eq!(ends(&seen), ["trailers:1"], "the trailers end the body");

        let (seen, callback) = recorder();
        let inner = scripted(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err("upstream broke off".into()),
        ]);
        let mut body = HookBody::new(inner, Hook::new(callback));
        assert!(body.frame().await.expect("frame").is_ok(), "data first");
        assert!(
            body.frame().await.expect("frame").is_err(),
            "then the error"
        );
        assert_eq!(
            ends(&seen),
            ["error:upstream broke off"],
            "the error is told"
        );

        let (seen, callback) = recorder();
        let inner = scripted(vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Ok(Frame::data(Bytes::from_static(b"b"))),
        ]);
        let mut body = HookBody::new(inner, Hook::new(callback));
        assert!(body.frame().await.is_some(), "one frame read");
        drop(body);
        assert_eq!(ends(&seen), ["cancelled"], "dropped mid-body");
    }

    #[test]
    fn a_hook_never_moved_into_a_body_fires_cancelled_and_an_empty_body_fires_at_once() {
        let (seen, callback) = recorder();
        drop(Hook::new(callback));
        assert_eq!(ends(&seen), ["cancelled"], "dropped before the headers");

        let (seen, callback) = recorder();
        let body = HookBody::new(crate::http::body::empty(), Hook::new(callback));
        assert_eq!(ends(&seen), ["complete"], "an empty body is over already");
        assert!(body.is_end_stream(), "and says so");
    }
}
