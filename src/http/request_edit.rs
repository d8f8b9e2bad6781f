//! The edits the gateway makes to a request body before it goes upstream, and nothing else:
//! `stream_options.include_usage` (so that a stream the client did not ask usage for still
//! reports it), and `max_tokens` (so that a key's cap binds an upstream that would otherwise
//! generate up to its own default).
//!
//! Each edit is one member inserted right after the body's opening brace: every byte the client
//! sent follows unchanged, whitespace and member order included. Only when an edit must change
//! what the client wrote — `stream_options` sent without the flag, or `"max_tokens": null` (a
//! second `max_tokens` member would be read as `null` by parsers that keep the last) — is the
//! object re-serialised with both edits made.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::Value;

/// What to change in a request body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Edits {
    /// Set `stream_options.include_usage` to `true`.
    pub(crate) include_usage: bool,
    /// Add `max_tokens` with this value (the request names neither `max_tokens` nor
    /// `max_completion_tokens`).
    ///
    /// Why `max_tokens` rather than `max_completion_tokens`: llama.cpp's server reads only
    /// `max_tokens` (and its own `n_predict`) and ignores `max_completion_tokens`, while vLLM,
    /// TGI, SGLang, Ollama and OpenAI's own chat models all read `max_tokens`. Never both: OpenAI
    /// refuses a request that sets the two at once, which is why nothing is added when the
    /// client named either. (OpenAI's reasoning models refuse `max_tokens`; their clients name
    /// `max_completion_tokens`, and then nothing is added.)
    pub(crate) max_tokens: Option<u64>,
}

impl Edits {
    pub(crate) fn is_empty(&self) -> bool {
        *self == Edits::default()
    }
}

/// `body` with `edits` made; `json` is the same body, parsed.
pub(crate) fn edited_body(body: &Bytes, json: &Value, edits: Edits) -> Bytes {
    if edits.is_empty() {
        return body.clone();
    }
    let rewrites = (edits.include_usage && json.get("stream_options").is_some())
        || (edits.max_tokens.is_some() && json.get("max_tokens").is_some());
    let brace = body.iter().position(|&b| b == b'{');
    match brace {
        Some(brace) if !rewrites => inserted(body, brace, edits),
        _ => reserialised(body, json, edits),
    }
}

/// The members inserted after the opening brace at `brace`.
fn inserted(body: &Bytes, brace: usize, edits: Edits) -> Bytes {
    const INCLUDE_USAGE: &[u8] = br#""stream_options":{"include_usage":true},"#;
    let mut out = BytesMut::with_capacity(body.len() + INCLUDE_USAGE.len() + 40);
    out.put_slice(&body[..=brace]);
    if edits.include_usage {
        out.put_slice(INCLUDE_USAGE);
    }
    if let Some(max_tokens) = edits.max_tokens {
        out.put_slice(br#""max_tokens":"#);
        out.put_slice(max_tokens.to_string().as_bytes());
        out.put_u8(b',');
    }
    // A request body is never an empty object (the schema requires `model`), so the comma
    // above always has a member after it.
    out.put_slice(&body[brace + 1..]);
    out.freeze()
}

/// The object re-serialised with `edits` made.
fn reserialised(body: &Bytes, json: &Value, edits: Edits) -> Bytes {
    let mut json = json.clone();
    if edits.include_usage {
        let options = &mut json["stream_options"];
        if !options.is_object() {
            *options = serde_json::json!({});
        }
        options["include_usage"] = true.into();
    }
    if let Some(max_tokens) = edits.max_tokens {
        json["max_tokens"] = max_tokens.into();
    }
    serde_json::to_vec(&json).map_or_else(|_| body.clone(), Bytes::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(body: &'static [u8], edits: Edits) -> Bytes {
        let body = Bytes::from_static(body);
        let json: Value = serde_json::from_slice(&body).expect("JSON");
        edited_body(&body, &json, edits)
    }

    const USAGE: Edits = Edits {
        include_usage: true,
        max_tokens: None,
    };
    const CAP: Edits = Edits {
        include_usage: false,
        max_tokens: Some(8),
    };
    const BOTH: Edits = Edits {
        include_usage: true,
        max_tokens: Some(8),
    };

    #[test]
    fn members_are_inserted_and_every_other_byte_kept() {
        let body = b"  {\"model\": \"m\",\n \"stream\": true, \"messages\": []}";
        assert_eq!(
            &edit(body, USAGE)[..],
            &b"  {\"stream_options\":{\"include_usage\":true},\"model\": \"m\",\n \"stream\": true, \"messages\": []}"[..]
        );
        assert_eq!(
            &edit(body, CAP)[..],
            &b"  {\"max_tokens\":8,\"model\": \"m\",\n \"stream\": true, \"messages\": []}"[..]
        );
        assert_eq!(
            &edit(body, BOTH)[..],
            &b"  {\"stream_options\":{\"include_usage\":true},\"max_tokens\":8,\"model\": \"m\",\n \"stream\": true, \"messages\": []}"[..],
            "the two edits compose"
        );
        assert_eq!(&edit(body, Edits::default())[..], &body[..], "no edits");
    }

    #[test]
    fn a_member_the_client_wrote_is_set_in_place() {
        for options in [
            "null",
            "{}",
            "{\"include_usage\":false,\"continuous_usage_stats\":true}",
        ] {
            let text = format!("{{\"model\":\"m\",\"stream\":true,\"stream_options\":{options}}}");
            let body = Bytes::from(text);
            let json: Value = serde_json::from_slice(&body).expect("JSON");
            let out: Value =
                serde_json::from_slice(&edited_body(&body, &json, BOTH)).expect("JSON");
            assert_eq!(out["stream_options"]["include_usage"], true, "{options}");
            assert_eq!(out["max_tokens"], 8, "{options}: both edits made");
            assert_eq!(out["model"], "m");
        }
        let out = edit(br#"{"model":"m","max_tokens":null,"stream":false}"#, CAP);
        let json: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(json["max_tokens"], 8);
        assert_eq!(
            out.windows(b"max_tokens".len())
                .filter(|w| *w == b"max_tokens")
                .count(),
            1,
            "one max_tokens member, never a second one: {out:?}"
        );
    }
}
