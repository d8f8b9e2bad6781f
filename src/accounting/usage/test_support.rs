//! Samples of real streams and bodies (llama.cpp b11434, OpenAI, a proxy), and helpers that run
//! the observer and the stripper over frames cut anywhere: shared by the tests of each piece.

use bytes::Bytes;

use super::{SseObserver, TokenCount, Usage, UsageStripper};

// === Samples: llama.cpp b11434 (shared/upstream/README.md), OpenAI, a proxy ===

pub(super) const LLAMA_CHAT_JSON: &str = concat!(
    r#"{"choices":[{"finish_reason":"length","index":0,"message":{"role":"assistant","#,
    r#""content":"1. Red: The most obvious colour, but there are many more.\n"}}],"#,
    r#""created":1795356673,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
    r#""object":"chat.completion","#,
    r#""usage":{"completion_tokens":16,"prompt_tokens":34,"total_tokens":50,"#,
    r#""prompt_tokens_details":{"cached_tokens":0}},"#,
    r#""id":"chatcmpl-LQXcd8MBSl3yOffpRHkmEzkeU8A4qSVK","#,
    r#""timings":{"cache_n":0,"prompt_n":34,"prompt_ms":262.59,"predicted_n":16,"predicted_ms":1166.7}}"#
);

pub(super) const LLAMA_COMPLETIONS_JSON: &str = concat!(
    r#"{"choices":[{"text":" Paris.\n\n","index":0,"logprobs":null,"finish_reason":"length"}],"#,
    r#""created":1795356680,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
    r#""object":"text_completion","#,
    r#""usage":{"completion_tokens":4,"prompt_tokens":5,"total_tokens":9,"prompt_tokens_details":{"cached_tokens":0}},"#,
    r#""id":"chatcmpl-AfhsYUCdwqvPLCdtHod5487KIk3CXYLE","timings":{"cache_n":0,"prompt_n":5}}"#
);

pub(super) const LLAMA_TOOL_JSON: &str = concat!(
    r#"{"choices":[{"finish_reason":"tool_calls","index":0,"message":{"role":"assistant","content":"","#,
    r#""tool_calls":[{"type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"},"#,
    r#""id":"67392dNF"}]}}],"object":"chat.completion","#,
    r#""usage":{"completion_tokens":19,"prompt_tokens":210,"total_tokens":229}}"#
);

/// llama.cpp chat stream, `include_usage` set: a final `choices: []` chunk carries usage.
/// Generated text: "Hello" + "! How" + " can" = 14 chars.
pub(super) const LLAMA_CHAT_SSE_USAGE_CHUNK: &str = concat!(
    r#"data: {"choices":[],"created":1795356677,"id":"chatcmpl-Cyy2aK3","model":"smollm2-135m-instruct","#,
    r#""system_fingerprint":"b0-unknown","object":"chat.completion.chunk","#,
    r#""usage":{"completion_tokens":4,"prompt_tokens":33,"total_tokens":37,"prompt_tokens_details":{"cached_tokens":32}},"#,
    r#""timings":{"cache_n":32,"prompt_n":1,"prompt_ms":9.5,"predicted_n":4,"predicted_ms":38.1}}"#,
    "\n\n"
);

pub(super) fn llama_chat_sse(include_usage: bool) -> String {
    let chunk = |choice: &str| {
        format!(
            concat!(
                r#"data: {{"choices":[{}],"created":1795356677,"id":"chatcmpl-Cyy2aK3","#,
                r#""model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
                r#""object":"chat.completion.chunk"}}"#,
                "\n\n"
            ),
            choice
        )
    };
    let mut stream = String::new();
    stream +=
        &chunk(r#"{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}"#);
    for piece in ["Hello", "! How", " can"] {
        stream += &chunk(&format!(
            r#"{{"finish_reason":null,"index":0,"delta":{{"content":"{piece}"}}}}"#
        ));
    }
    stream += &chunk(r#"{"finish_reason":"length","index":0,"delta":{}}"#);
    if include_usage {
        stream += LLAMA_CHAT_SSE_USAGE_CHUNK;
    }
    stream + "data: [DONE]\n\n"
}

/// llama.cpp legacy completions stream: usage on the finish chunk, asked or not.
/// Generated text: " Paris" + "." = 7 chars.
pub(super) const LLAMA_COMPLETIONS_SSE: &str = concat!(
    r#"data: {"choices":[{"text":" Paris","index":0,"logprobs":null,"finish_reason":null}],"#,
    r#""created":1795356680,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
    r#""object":"text_completion","id":"chatcmpl-OqhiLx"}"#,
    "\n\n",
    r#"data: {"choices":[{"text":".","index":0,"logprobs":null,"finish_reason":null}],"#,
    r#""created":1795356680,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
    r#""object":"text_completion","id":"chatcmpl-OqhiLx"}"#,
    "\n\n",
    r#"data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"#,
    r#""created":1795356680,"model":"smollm2-135m-instruct","system_fingerprint":"b0-unknown","#,
    r#""object":"text_completion","#,
    r#""usage":{"completion_tokens":2,"prompt_tokens":5,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":4}},"#,
    r#""id":"chatcmpl-OqhiLx","timings":{"cache_n":4,"prompt_n":1,"predicted_n":2}}"#,
    "\n\n",
    "data: [DONE]\n\n"
);

/// llama.cpp streamed tool call, `include_usage` set: name (11) + arguments (17) = 28 chars.
pub(super) fn llama_tool_sse() -> String {
    let tail = r#"],"created":1795356690,"id":"chatcmpl-T","model":"smollm2-135m-instruct","object":"chat.completion.chunk"}"#;
    let mut stream = format!(
        "data: {{\"choices\":[{}{tail}\n\n",
        r#"{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}"#
    );
    stream += &format!(
        "data: {{\"choices\":[{}{tail}\n\n",
        r#"{"finish_reason":null,"index":0,"delta":{"tool_calls":[{"index":0,"id":"zwUmZ7sq","type":"function","function":{"name":"get_weather","arguments":"{"}}]}}"#
    );
    for piece in [r#"\""#, "city", r#"\":"#, r#" \""#, "Paris", r#"\""#, "}"] {
        stream += &format!(
            "data: {{\"choices\":[{{\"finish_reason\":null,\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":\"{piece}\"}}}}]}}}}{tail}\n\n"
        );
    }
    stream += &format!(
        "data: {{\"choices\":[{}{tail}\n\n",
        r#"{"finish_reason":"tool_calls","index":0,"delta":{}}"#
    );
    stream += concat!(
        r#"data: {"choices":[],"created":1795356690,"id":"chatcmpl-T","model":"smollm2-135m-instruct","#,
        r#""object":"chat.completion.chunk","usage":{"completion_tokens":19,"prompt_tokens":210,"total_tokens":229}}"#,
        "\n\n"
    );
    stream + "data: [DONE]\n\n"
}

/// An OpenAI-style stream: with `include_usage`, `"usage":null` on every chunk and a final
/// usage chunk with `"choices":[]`. Generated text: "Hi" + " there" = 8 chars.
pub(super) fn openai_sse(include_usage: bool) -> String {
    let null = if include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let chunk = |delta: &str, finish: &str| {
        format!(
            concat!(
                r#"data: {{"id":"chatcmpl-B9MBs8","object":"chat.completion.chunk","created":1741570283,"#,
                r#""model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","#,
                r#""choices":[{{"index":0,"delta":{},"logprobs":null,"finish_reason":{}}}]{}}}"#,
                "\n\n"
            ),
            delta, finish, null
        )
    };
    let mut stream = chunk(
        r#"{"role":"assistant","content":"","refusal":null}"#,
        "null",
    );
    stream += &chunk(r#"{"content":"Hi"}"#, "null");
    stream += &chunk(r#"{"content":" there"}"#, "null");
    stream += &chunk("{}", r#""stop""#);
    if include_usage {
        stream += concat!(
            r#"data: {"id":"chatcmpl-B9MBs8","object":"chat.completion.chunk","created":1741570283,"#,
            r#""model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_f9f4fb6dbf","#,
            r#""choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"#,
            r#""prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"#,
            r#""completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0}}}"#,
            "\n\n"
        );
    }
    stream + "data: [DONE]\n\n"
}

/// A proxy that puts usage on a chunk that still has a choices entry. Text: "Yes" = 3 chars.
pub(super) const PROXY_SSE: &str = concat!(
    r#"data: {"id":"gen-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Yes"},"finish_reason":null}]}"#,
    "\n\n",
    r#"data: {"id":"gen-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}"#,
    "\n\n",
    r#"data: {"id":"gen-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":""},"finish_reason":null}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#,
    "\n\n",
    "data: [DONE]\n\n"
);

/// A stream, what the stripper must turn it into, and what the observer must find in it.
pub(super) struct Case {
    pub(super) name: &'static str,
    pub(super) stream: String,
    pub(super) stripped: String,
    pub(super) usage: Option<Usage>,
    pub(super) events: u64,
    pub(super) chars: u64,
}

pub(super) fn usage(prompt_tokens: u64, completion_tokens: u64) -> Option<Usage> {
    Some(Usage {
        prompt_tokens: TokenCount::Reported(prompt_tokens),
        completion_tokens: TokenCount::Reported(completion_tokens),
    })
}

pub(super) fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "llama.cpp chat, include_usage",
            stream: llama_chat_sse(true),
            stripped: llama_chat_sse(false),
            usage: usage(33, 4),
            events: 7,
            chars: 14,
        },
        Case {
            name: "llama.cpp chat, no usage",
            stream: llama_chat_sse(false),
            stripped: llama_chat_sse(false),
            usage: None,
            events: 6,
            chars: 14,
        },
        Case {
            name: "llama.cpp completions, usage on the finish chunk",
            stream: LLAMA_COMPLETIONS_SSE.to_owned(),
            stripped: LLAMA_COMPLETIONS_SSE.to_owned(),
            usage: usage(5, 2),
            events: 4,
            chars: 7,
        },
        Case {
            name: "llama.cpp tool call",
            stream: llama_tool_sse(),
            stripped: llama_tool_sse().replace(
                &llama_tool_sse()[llama_tool_sse()
                    .find("data: {\"choices\":[],")
                    .expect("usage chunk")..]
                    .split_inclusive("\n\n")
                    .next()
                    .expect("usage chunk")
                    .to_owned(),
                "",
            ),
            usage: usage(210, 19),
            events: 12,
            chars: 28,
        },
        Case {
            name: "OpenAI-style, usage null on every chunk",
            stream: openai_sse(true),
            stripped: openai_sse(false),
            usage: usage(19, 10),
            events: 6,
            chars: 8,
        },
        Case {
            name: "proxy, usage on a chunk with choices",
            stream: PROXY_SSE.to_owned(),
            stripped: PROXY_SSE.to_owned(),
            usage: usage(12, 7),
            events: 4,
            chars: 3,
        },
    ]
}

/// The same stream with every `\n` line break written `eol` (JSON text has no raw breaks).
pub(super) fn with_eol(stream: &str, eol: &str) -> String {
    stream.replace('\n', eol)
}

pub(super) const EOLS: [&str; 3] = ["\n", "\r\n", "\r"];

// === Helpers ===

/// What the observer reports, for comparing runs.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Seen {
    pub(super) usage: Option<Usage>,
    pub(super) done: bool,
    pub(super) events: u64,
    pub(super) chars: u64,
    pub(super) dropped: u64,
}

pub(super) fn observe_frames<'a>(frames: impl IntoIterator<Item = &'a [u8]>, max: usize) -> Seen {
    let mut observer = SseObserver::new(max);
    for frame in frames {
        observer.observe(frame);
        assert!(
            observer.carry().len() <= max && observer.carry().capacity() <= 2 * max.max(8),
            "the carry-over stays within the cap ({} bytes held, {} allocated, cap {max})",
            observer.carry().len(),
            observer.carry().capacity()
        );
    }
    Seen {
        usage: observer.usage(),
        done: observer.saw_done(),
        events: observer.events(),
        chars: observer.completion_chars(),
        dropped: observer.dropped_lines(),
    }
}

pub(super) fn strip_frames<'a>(frames: impl IntoIterator<Item = &'a [u8]>, max: usize) -> Vec<u8> {
    let mut stripper = UsageStripper::new(max);
    let mut out = Vec::new();
    for frame in frames {
        out.extend_from_slice(&stripper.rewrite(Bytes::copy_from_slice(frame)));
    }
    out.extend_from_slice(&stripper.finish());
    out
}

/// `bytes` cut at the given offsets (any order, duplicates allowed).
pub(super) fn cut<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    cuts.sort_unstable();
    let mut frames = Vec::new();
    let mut start = 0;
    for c in cuts.into_iter().chain([bytes.len()]) {
        frames.push(&bytes[start..c]);
        start = c;
    }
    frames
}

pub(super) fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
