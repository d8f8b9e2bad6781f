//! Token estimates for where no count exists: the prompt of a request before the upstream has
//! counted it (the quota reservation), and the text of a stream that broke off before its usage.
//!
//! Edge cases: images and audio parts count nothing (their cost depends on the model); token ids
//! in a completions prompt count exactly one each; a body that is not JSON counts by its length,
//! and a JSON body with neither `messages` nor `prompt` by the length of its JSON.

use super::search::utf8_chars;

/// Characters per token in the estimates: the usual figure for English text and code with BPE
/// tokenizers (OpenAI's own rule of thumb).
const CHARS_PER_TOKEN: u64 = 4;
/// Tokens a chat template spends on each message besides its text (role, start and end markers:
/// ChatML's `<|im_start|>role\n…<|im_end|>\n` is 4-5).
const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens a chat template spends to open the assistant's reply (`<|im_start|>assistant\n`).
const TOKENS_PER_REPLY: u64 = 3;

/// Tokens for `chars` characters of text: one per [`CHARS_PER_TOKEN`] (4) characters, rounded
/// up, so any non-empty text is at least 1 token and an empty one 0.
pub fn estimate_tokens_from_chars(chars: u64) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN)
}

/// Estimates the prompt tokens of a chat or completions request body, before the upstream has
/// counted them: see [`estimate_prompt_tokens_json`]. A body that is not JSON counts by its
/// length (a token per 4 bytes).
pub fn estimate_prompt_tokens(request_body: &[u8]) -> u64 {
    match serde_json::from_slice::<serde_json::Value>(request_body) {
        Ok(request) => estimate_prompt_tokens_json(&request),
        Err(_) => estimate_tokens_from_chars(request_body.len() as u64),
    }
}

/// Estimates the prompt tokens of an already parsed request:
/// - chat: the text of every message (`content` as a string, or the `text` of its content parts;
///   `name`; the name and arguments of assistant `tool_calls`), plus 4 tokens per message and 3
///   for the reply's opening; `tools` / `functions` by the length of their JSON;
/// - completions: `prompt` as a string, an array of strings, a token array or an array of token
///   arrays — token ids count exactly one each — plus `suffix`;
/// - text is counted by [`estimate_tokens_from_chars`]. Images and audio parts count nothing
///   (their cost depends on the model); a body with neither `messages` nor `prompt` counts by the
///   length of its JSON.
pub fn estimate_prompt_tokens_json(request: &serde_json::Value) -> u64 {
    use serde_json::Value;

    let mut chars = 0u64;
    let mut exact = 0u64;
    let mut known = false;
    if let Some(messages) = request.get("messages").and_then(Value::as_array) {
        known = true;
        exact += TOKENS_PER_REPLY + TOKENS_PER_MESSAGE * messages.len() as u64;
        for message in messages {
            chars += message.get("content").map_or(0, content_chars);
            chars += message.get("name").map_or(0, str_chars);
            for call in message
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(function) = call.get("function") {
                    chars += function.get("name").map_or(0, str_chars);
                    chars += function.get("arguments").map_or(0, str_chars);
                }
            }
        }
        for definitions in ["tools", "functions"] {
            if let Some(definitions) = request.get(definitions).filter(|v| !v.is_null()) {
                chars += json_chars(definitions);
            }
        }
    }
    if let Some(prompt) = request.get("prompt") {
        known = true;
        match prompt {
            Value::String(text) => chars += text.chars().count() as u64,
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::String(text) => chars += text.chars().count() as u64,
                        Value::Number(_) => exact += 1,
                        Value::Array(tokens) => exact += tokens.len() as u64,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        chars += request.get("suffix").map_or(0, str_chars);
    }
    if !known {
        chars = json_chars(request);
    }
    exact.saturating_add(estimate_tokens_from_chars(chars))
}

/// Characters of a string value; 0 for anything else.
fn str_chars(value: &serde_json::Value) -> u64 {
    value.as_str().map_or(0, |text| text.chars().count() as u64)
}

/// Characters of a message's `content`: a string, or the `text` of each content part.
fn content_chars(content: &serde_json::Value) -> u64 {
    match content {
        serde_json::Value::Array(parts) => parts
            .iter()
            .map(|part| part.get("text").map_or(0, str_chars))
            .sum(),
        other => str_chars(other),
    }
}

/// Characters of a value written as compact JSON, counted without building the string.
fn json_chars(value: &serde_json::Value) -> u64 {
    struct CharCounter(u64);
    impl std::io::Write for CharCounter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += utf8_chars(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = CharCounter(0);
    // Writing a `Value` to a writer that never fails cannot fail.
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => 0,
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
