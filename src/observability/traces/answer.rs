//! What a traced answer says of itself, for its span: the model that answered
//! (`gen_ai.response.model`) and why each choice stopped (`gen_ai.response.finish_reasons`). Read
//! from the answer's bytes as they pass — a JSON body or an SSE stream alike — by looking for the
//! `"model":` and `"finish_reason":` members; frames pass on untouched.
//!
//! Only a sampled request's answer is wrapped: an untraced or unsampled one pays nothing.
//!
//! Edge cases: a member split across two frames is found, because the end of each frame is kept
//! and searched again with the next; JSON escaping keeps a member name inside a string (the
//! answer's text) from matching (its quotes are `\"`); `"finish_reason":null` (every chunk but
//! the last) is skipped; values longer than [`MAX_VALUE`] bytes, and reasons beyond
//! [`MAX_REASONS`], are ignored.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use memchr::memmem;
use pin_project_lite::pin_project;

use crate::http::body::BoxError;
use crate::http::context::SharedContext;

/// Longer values are not a model name or a finish reason.
const MAX_VALUE: usize = 128;
/// Distinct finish reasons kept (one per choice, at most).
const MAX_REASONS: usize = 16;
/// What is kept of a frame's end: a member name, its colon, spaces and a value.
const CARRY: usize = 160;

pin_project! {
    /// An answer body whose model and finish reasons go to its request's trace.
    pub(crate) struct AnswerScan<B> {
        #[pin]
        inner: B,
        context: SharedContext,
        carry: Vec<u8>,
        model_found: bool,
    }
}

impl<B> AnswerScan<B> {
    pub(crate) fn new(inner: B, context: SharedContext) -> Self {
        AnswerScan {
            inner,
            context,
            carry: Vec::new(),
            model_found: false,
        }
    }
}

impl<B: Body<Data = Bytes, Error = BoxError>> Body for AnswerScan<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &polled {
            if let Some(data) = frame.data_ref() {
                scan(this.context, this.carry, this.model_found, data);
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Looks for the members in what was kept of the last frame and `data`, and keeps its end.
fn scan(context: &SharedContext, carry: &mut Vec<u8>, model_found: &mut bool, data: &[u8]) {
    let Some(trace) = context.trace() else {
        return;
    };
    carry.extend_from_slice(data);
    let text = &carry[..];
    if !*model_found {
        if let Some(model) = values(text, b"\"model\":").next() {
            trace.set_response_model(model);
            *model_found = true;
        }
    }
    for reason in values(text, b"\"finish_reason\":") {
        trace.add_finish_reason(reason, MAX_REASONS);
    }
    let keep = carry.len().saturating_sub(CARRY);
    carry.drain(..keep);
}

/// The string values of every complete `name` member in `text`.
fn values<'a>(text: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a str> + 'a {
    memmem::find_iter(text, name).filter_map(move |at| {
        let rest = &text[at + name.len()..];
        let rest = rest.strip_prefix(b" ").unwrap_or(rest);
        let rest = rest.strip_prefix(b"\"")?;
        let end = memchr::memchr(b'"', &rest[..rest.len().min(MAX_VALUE + 1)])?;
        std::str::from_utf8(&rest[..end]).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_read_whole_and_null_or_unfinished_ones_skipped() {
        let text = br#"{"model":"m-1","choices":[{"finish_reason":null},{"finish_reason": "stop"},{"finish_reason":"len"#;
        assert_eq!(values(text, b"\"model\":").collect::<Vec<_>>(), ["m-1"]);
        assert_eq!(
            values(text, b"\"finish_reason\":").collect::<Vec<_>>(),
            ["stop"],
            "null skipped, the unfinished one left for the next frame"
        );
        let quoted = br#"{"content":"say \"finish_reason\":\"x\""}"#;
        assert_eq!(
            values(quoted, b"\"finish_reason\":").count(),
            0,
            "text in a string is no member"
        );
    }
}
