//! The bytes of the canned answers ([`crate::Fault`]'s `not-json` … `flood`): answers no model
//! server should give, for testing what a gateway does with them. Public so that a test can
//! compare what reached its client with what the mock sent.

use bytes::Bytes;

/// The body of `not-json`.
pub const NOT_JSON: &str = "this is not json";

/// The body of `absurd-usage`: a chat answer whose usage no request could have, the largest
/// counts JSON can carry.
pub const ABSURD_USAGE: &str = r#"{"object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615,"total_tokens":18446744073709551615}}"#;

/// The event a `flood` repeats.
pub const FLOOD_EVENT: &[u8] = b"data: {\"id\":\"flood\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"flood \"},\"finish_reason\":null}]}\n\n";

/// The size a `flood` frame is made up to (whole events, so a little less).
const FLOOD_FRAME: usize = 64 * 1024;

/// The frames of `garbage-sse`, sent one by one: bytes that are not UTF-8, a lone surrogate,
/// nesting and a string past any sane limit, an event cut in two frames, control characters, a
/// number out of range and a `data:` line that never ends.
pub fn garbage_sse() -> Vec<Bytes> {
    vec![
        Bytes::from_static(b"\xff\xfe\x00 not SSE at all\r\r\n"),
        Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"\\ud800\"}}]}\n\n"),
        Bytes::from(format!("data: {}\n\n", "[".repeat(100_000))),
        Bytes::from(format!(
            "data: {{\"choices\":[{{\"text\":\"{}",
            "y".repeat(3_000_000)
        )),
        Bytes::from_static(b"\"}]}\n\n: a comment\n\nevent: \x01\x02\ndata: [DONE]\n\n"),
        Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":1e999}}]}\r\n\r\ndata:"),
    ]
}

/// The body of `garbage-json`: a `usage` object nested past any parser's limit, never closed.
pub fn garbage_json() -> Bytes {
    Bytes::from(format!("{{\"usage\":{}", "[".repeat(200_000)))
}

/// One frame of a `flood`: [`FLOOD_EVENT`] as many whole times as fit in 64 KiB.
pub(crate) fn flood_frame() -> Bytes {
    Bytes::from(FLOOD_EVENT.repeat(FLOOD_FRAME / FLOOD_EVENT.len()))
}
