//! Token counts for where the upstream has not counted: a request's prompt before it is sent —
//! as an upper bound (what the quota reservation holds) and as an estimate (what is charged when
//! no usage ever comes) — and the text of a stream that broke off before its usage.
//!
//! The bound must never run low, whatever the script: it counts the UTF-8 bytes of the prompt's
//! text, because no tokenizer in use makes more than one token of a byte — byte-level BPE (GPT-2,
//! tiktoken, Llama 3, Qwen, SmolLM) merges bytes into tokens, and SentencePiece with byte fallback
//! (Llama 2, Mistral, Gemma) makes a character it has no token for into one token per byte. A
//! character count is no bound (a CJK character is one to three tokens, an emoji up to four), and
//! ~4 characters a token runs low by 3-4x on CJK text. Around the text it adds what a chat
//! template spends: [`TEMPLATE_BOUND_PER_MESSAGE`] per message, [`TEMPLATE_BOUND_PER_REQUEST`]
//! once (BOS, the reply's opening, a default system prompt). The price: English text is bounded
//! at ~4x its tokens, held only while the request runs.
//!
//! The estimate stays a fair guess: ~4 characters a token, plus ChatML's overheads.
//!
//! Edge cases: images and audio parts count nothing (their cost depends on the model, and neither
//! count bounds it); token ids in a completions prompt count exactly one each; a body that is not
//! JSON counts by its length, and a JSON body with neither `messages` nor `prompt` by its JSON.

use super::search::utf8_chars;

/// Characters per token in the estimates: the usual figure for English text and code with BPE
/// tokenizers (OpenAI's own rule of thumb).
const CHARS_PER_TOKEN: u64 = 4;
/// Tokens a chat template spends on each message besides its text (role, start and end markers:
/// ChatML's `<|im_start|>role\n…<|im_end|>\n` is 4-5).
const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens a chat template spends to open the assistant's reply (`<|im_start|>assistant\n`).
const TOKENS_PER_REPLY: u64 = 3;
/// The bound's allowance for what a chat template wraps each message in: 5 tokens in ChatML,
/// Llama 3 and Gemma, about 8 in Llama 2's `[INST] … [/INST]`.
pub const TEMPLATE_BOUND_PER_MESSAGE: u64 = 8;
/// The bound's allowance for what a chat template adds once: BOS, the reply's opening, and the
/// default system prompt some templates add when the request has none (SmolLM2's is 20 tokens
/// with its markers, Qwen 2.5's 24).
pub const TEMPLATE_BOUND_PER_REQUEST: u64 = 32;
/// The bound's allowance for each prompt of a completions request (BOS, EOS).
const BOUND_PER_PROMPT: u64 = 2;

/// Tokens for `chars` characters of text: one per [`CHARS_PER_TOKEN`] (4) characters, rounded
/// up, so any non-empty text is at least 1 token and an empty one 0.
pub fn estimate_tokens_from_chars(chars: u64) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN)
}

/// A request's prompt, counted two ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptTokens {
    /// At least what any tokenizer makes of it (with the template allowances): what a quota
    /// reservation holds.
    pub(crate) bound: u64,
    /// A fair guess, charged when the upstream reports no usage.
    pub(crate) estimate: u64,
}

/// Estimates the prompt tokens of a chat or completions request body: see [`prompt_tokens`]. A
/// body that is not JSON counts by its length (a token per 4 bytes).
pub fn estimate_prompt_tokens(request_body: &[u8]) -> u64 {
    prompt_tokens_of_body(request_body).estimate
}

/// The upper bound on the prompt tokens of a request body: see [`prompt_tokens`]. A body that is
/// not JSON counts a token per byte.
pub fn prompt_token_bound(request_body: &[u8]) -> u64 {
    prompt_tokens_of_body(request_body).bound
}

fn prompt_tokens_of_body(request_body: &[u8]) -> PromptTokens {
    match serde_json::from_slice::<serde_json::Value>(request_body) {
        Ok(request) => prompt_tokens(&request),
        Err(_) => PromptTokens {
            bound: request_body.len() as u64,
            estimate: estimate_tokens_from_chars(request_body.len() as u64),
        },
    }
}

/// Estimates the prompt tokens of an already parsed request: [`prompt_tokens`]'s estimate.
pub fn estimate_prompt_tokens_json(request: &serde_json::Value) -> u64 {
    prompt_tokens(request).estimate
}

/// The prompt of an already parsed request, bounded and estimated in one walk of its text:
/// - chat: every message's text (`content` as a string, or the `text` of its content parts;
///   `name`; the name and arguments of assistant `tool_calls`), and `tools` / `functions` by the
///   length of their JSON; the estimate adds 4 tokens per message and 3 for the reply's opening,
///   the bound [`TEMPLATE_BOUND_PER_MESSAGE`] and [`TEMPLATE_BOUND_PER_REQUEST`];
/// - completions: `prompt` as a string, an array of strings, a token array or an array of token
///   arrays — token ids count exactly one each — plus `suffix`; the bound adds 2 per prompt;
/// - text counts ~4 characters a token in the estimate, a token per UTF-8 byte in the bound.
///   Images and audio parts count nothing; a body with neither `messages` nor `prompt` counts by
///   its JSON.
pub fn prompt_tokens(request: &serde_json::Value) -> PromptTokens {
    use serde_json::Value;

    let mut text = Size::default();
    let mut exact = 0u64;
    let (mut estimate_overhead, mut bound_overhead) = (0u64, 0u64);
    let mut known = false;
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        known = true;
        let count = messages.len() as u64;
        estimate_overhead += TOKENS_PER_REPLY + TOKENS_PER_MESSAGE * count;
        bound_overhead += TEMPLATE_BOUND_PER_REQUEST + TEMPLATE_BOUND_PER_MESSAGE * count;
        for message in messages {
            text += message
                .get("content")
                .map_or_else(Size::default, content_size);
            text += message.get("name").map_or_else(Size::default, str_size);
            for call in message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(function) = call.get("function") {
                    text += function.get("name").map_or_else(Size::default, str_size);
                    text += function
                        .get("arguments")
                        .map_or_else(Size::default, str_size);
                }
            }
        }
        for definitions in ["tools", "functions"] {
            if let Some(definitions) = request.get(definitions).filter(|v| !v.is_null()) {
                text += json_size(definitions);
            }
        }
    }
    if let Some(prompt) = request.get("prompt") {
        known = true;
        let mut prompts = 1u64;
        match prompt {
            Value::String(prompt) => text += Size::of(prompt),
            Value::Array(items) => {
                if !items.iter().any(Value::is_number) {
                    prompts = (items.len() as u64).max(1);
                }
                for item in items {
                    match item {
                        Value::String(prompt) => text += Size::of(prompt),
                        Value::Number(_) => exact += 1,
                        Value::Array(tokens) => exact += tokens.len() as u64,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        text += request.get("suffix").map_or_else(Size::default, str_size);
        bound_overhead += BOUND_PER_PROMPT * prompts;
    }
    if !known {
        text = json_size(request);
    }
    PromptTokens {
        bound: exact
            .saturating_add(text.bytes)
            .saturating_add(bound_overhead),
        estimate: exact
            .saturating_add(estimate_tokens_from_chars(text.chars))
            .saturating_add(estimate_overhead),
    }
}

/// Characters and UTF-8 bytes of some text.
#[derive(Debug, Default, Clone, Copy)]
struct Size {
    chars: u64,
    bytes: u64,
}

impl Size {
    fn of(text: &str) -> Size {
        Size {
            chars: text.chars().count() as u64,
            bytes: text.len() as u64,
        }
    }
}

impl std::ops::AddAssign for Size {
    fn add_assign(&mut self, other: Size) {
        self.chars = self.chars.saturating_add(other.chars);
        self.bytes = self.bytes.saturating_add(other.bytes);
    }
}

/// The size of a string value; nothing for anything else.
fn str_size(value: &serde_json::Value) -> Size {
    value.as_str().map_or_else(Size::default, Size::of)
}

/// The size of a message's `content`: a string, or the `text` of each content part.
fn content_size(content: &serde_json::Value) -> Size {
    match content {
        serde_json::Value::Array(parts) => {
            let mut size = Size::default();
            for part in parts {
                size += part.get("text").map_or_else(Size::default, str_size);
            }
            size
        }
        other => str_size(other),
    }
}

/// The size of a value written as compact JSON, counted without building the string.
fn json_size(value: &serde_json::Value) -> Size {
    struct Counter(Size);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += Size {
                chars: utf8_chars(buf),
                bytes: buf.len() as u64,
            };
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(Size::default());
    // Writing a `Value` to a writer that never fails cannot fail.
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => Size::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_chars_round_up() {
        for (chars, tokens) in [
            (0, 0),
            (1, 1),
            (3, 1),
            (4, 1),
            (5, 2),
            (400, 100),
            (u64::MAX, u64::MAX / 4 + 1),
        ] {
            assert_eq!(estimate_tokens_from_chars(chars), tokens, "{chars} chars");
        }
    }

    #[test]
    fn prompt_estimates_for_chat_bodies() {
        let body = br#"{"model":"m","messages":[
            {"role":"system","content":"Be brief."},
            {"role":"user","content":[{"type":"text","text":"What is in"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},{"type":"text","text":" this?"}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"1","type":"function","function":{"name":"look","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"1","content":"a cat"}
        ]}"#;
        // 9 + 10 + 6 + 4 + 2 + 5 = 36 chars -> 9 tokens; 4 messages * 4 + 3 = 19.
        assert_eq!(
            estimate_prompt_tokens(body),
            9 + 19,
            "chat text, content parts, tool calls"
        );

        let tools = r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]"#;
        let with_tools =
            format!(r#"{{"messages":[{{"role":"user","content":"Hi"}}],"tools":{tools}}}"#);
        let tools_chars =
            serde_json::to_string(&serde_json::from_str::<serde_json::Value>(tools).expect("JSON"))
                .expect("JSON")
                .len() as u64;
        assert_eq!(
            estimate_prompt_tokens(with_tools.as_bytes()),
            estimate_tokens_from_chars(2 + tools_chars) + 4 + 3,
            "tool definitions count by their JSON"
        );
    }

    #[test]
    fn prompt_estimates_for_completions_bodies() {
        for (body, tokens, why) in [
            (
                r#"{"prompt":"The capital of France is"}"#,
                6,
                "a string: 24 chars",
            ),
            (r#"{"prompt":["abcd","efgh"]}"#, 2, "strings"),
            (r#"{"prompt":[1,2,3]}"#, 3, "a token array counts exactly"),
            (
                r#"{"prompt":[[1,2],[3,4,5]]}"#,
                5,
                "token arrays count exactly",
            ),
            (
                r#"{"prompt":"def f(","suffix":"    return x"}"#,
                5,
                "a suffix counts too: 6 + 12 chars",
            ),
            (r#"{"prompt":""}"#, 0, "an empty prompt"),
        ] {
            assert_eq!(
                estimate_prompt_tokens(body.as_bytes()),
                tokens,
                "{why}: {body}"
            );
        }
    }

    #[test]
    fn prompt_bounds_count_every_utf8_byte() {
        let cjk = "漢".repeat(300);
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{cjk}"}}]}}"#);
        let tokens = prompt_tokens(&serde_json::from_str(&body).expect("JSON"));
        assert_eq!(
            tokens.bound,
            900 + TEMPLATE_BOUND_PER_MESSAGE + TEMPLATE_BOUND_PER_REQUEST,
            "300 CJK characters are 900 bytes: never fewer tokens than real tokenizers' ~300"
        );
        assert_eq!(
            tokens.estimate,
            75 + 4 + 3,
            "the estimate stays ~4 characters a token"
        );

        for (body, bound, why) in [
            (r#"{"prompt":"😀 ok"}"#, 7 + 2, "an emoji is 4 bytes"),
            (
                r#"{"prompt":["ab","cd"]}"#,
                4 + 2 * 2,
                "each prompt of a list",
            ),
            (
                r#"{"prompt":[[1,2],[3]]}"#,
                3 + 2 * 2,
                "token ids count exactly",
            ),
            (r#"{"prompt":[1,2,3]}"#, 3 + 2, "one token list"),
            (
                r#"{"prompt":"def f(","suffix":"é"}"#,
                6 + 2 + 2,
                "a suffix counts too",
            ),
            (
                r#"{"input":"abcdefgh"}"#,
                20,
                "neither messages nor prompt: its JSON",
            ),
            ("not json at all!!", 17, "not JSON: its bytes"),
        ] {
            assert_eq!(prompt_token_bound(body.as_bytes()), bound, "{why}: {body}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_bound_covers_the_bytes_and_the_estimate(
            contents in proptest::collection::vec(".{0,40}", 0..6),
            tools in proptest::option::of(".{0,40}"),
        ) {
            let messages: Vec<_> = contents
                .iter()
                .map(|text| serde_json::json!({"role": "user", "content": text}))
                .collect();
            let mut request = serde_json::json!({"model": "m", "messages": messages});
            if let Some(tools) = &tools {
                request["tools"] = serde_json::json!([{"description": tools}]);
            }
            let tokens = prompt_tokens(&request);
            let bytes: usize = contents.iter().map(String::len).sum();
            proptest::prop_assert!(tokens.bound >= bytes as u64, "{tokens:?} for {bytes} bytes");
            proptest::prop_assert!(tokens.bound >= tokens.estimate, "{tokens:?}");
        }
    }

    #[test]
    fn prompt_estimate_falls_back_to_length() {
        assert_eq!(
            estimate_prompt_tokens(b"not json at all!!"),
            5,
            "17 bytes, rounded up"
        );
        assert_eq!(estimate_prompt_tokens(b""), 0, "an empty body");
        assert_eq!(
            estimate_prompt_tokens(br#"{"input":"abcdefgh"}"#),
            5,
            "JSON with neither messages nor prompt: its 20 chars"
        );
    }
}
