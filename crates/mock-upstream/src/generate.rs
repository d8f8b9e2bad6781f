//! The deterministic completions: the answer's text, usage, JSON and SSE events, all derived
//! from the request (see the crate docs for the rules).

use serde_json::Value;

use crate::fault::Knobs;

/// The endpoint a request is for: what its answer is generated as.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Chat,
    Completions,
    Models,
}

/// `created` of every generated object.
const CREATED: u64 = 1_700_000_000;
/// Default number of completion tokens.
const DEFAULT_TOKENS: usize = 8;
/// Cap for `max_tokens` / `max_completion_tokens`.
const MAX_TOKENS_CAP: u64 = 4096;
/// The tool call arguments, streamed in these pieces.
const TOOL_ARG_PIECES: [&str; 4] = ["{\"city", "\": \"", "Paris", "\"}"];

/// `s` as a JSON string literal (quoted and escaped).
pub(crate) fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// 64-bit FNV-1a.
/// The hash the `id` comes from: of the request without its `stream_options`, so that a gateway
/// that asks for usage on the client's behalf still gets the same answer.
fn conversation_hash(request: &Value, body: &[u8]) -> u64 {
    match request {
        Value::Object(map) if map.contains_key("stream_options") => {
            let mut rest = map.clone();
            rest.remove("stream_options");
            fnv1a(Value::Object(rest).to_string().as_bytes())
        }
        Value::Object(map) => fnv1a(Value::Object(map.clone()).to_string().as_bytes()),
        _ => fnv1a(body),
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn count_words(s: &str) -> usize {
    s.split_whitespace().count()
}

/// Words in a chat message `content` (a string or an array of parts).
fn content_words(content: Option<&Value>) -> usize {
    match content {
        Some(Value::String(s)) => count_words(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match part {
                Value::String(s) => count_words(s),
                Value::Object(_) => part
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, count_words),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

fn prompt_tokens(route: Route, request: &Value) -> usize {
    let n = match route {
        Route::Chat => request
            .get("messages")
            .and_then(Value::as_array)
            .map_or(0, |messages| {
                messages
                    .iter()
                    .map(|m| content_words(m.get("content")))
                    .sum()
            }),
        _ => match request.get("prompt") {
            Some(Value::String(s)) => count_words(s),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => count_words(s),
                    Value::Number(_) => 1,
                    Value::Array(tokens) => tokens.len(),
                    _ => 0,
                })
                .sum(),
            _ => 0,
        },
    };
    n.max(1)
}

/// Everything that determines a generated answer.
pub(crate) struct Generation {
    /// Hex hash of the request body.
    hash: String,
    /// The model name as a JSON string literal.
    model: String,
    n: usize,
    finish: &'static str,
    prompt_tokens: usize,
    tools: bool,
    /// The `usage` object's text, when `x-mock-usage` scripts it.
    usage: Option<String>,
}

/// SSE events packed into one buffer; `ends[i]` is where event `i` ends.
pub(crate) struct Events {
    pub(crate) buf: String,
    pub(crate) ends: Vec<usize>,
}

impl Events {
    fn with_capacity(events: usize, bytes: usize) -> Events {
        Events {
            buf: String::with_capacity(bytes),
            ends: Vec::with_capacity(events),
        }
    }

    /// Appends `data: <parts...>\n\n` as one event.
    fn event(&mut self, parts: &[&str]) {
        self.buf.push_str("data: ");
        for p in parts {
            self.buf.push_str(p);
        }
        self.buf.push_str("\n\n");
        self.ends.push(self.buf.len());
    }
}

impl Generation {
    pub(crate) fn new(
        route: Route,
        request: &Value,
        body: &[u8],
        knobs: &Knobs,
        default_tokens: Option<usize>,
    ) -> Generation {
        let max_tokens = request
            .get("max_tokens")
            .and_then(Value::as_u64)
            .or_else(|| request.get("max_completion_tokens").and_then(Value::as_u64));
        let (n, finish) = match (knobs.chunks, max_tokens) {
            (Some(n), _) => (n, "stop"),
            // Bounded by MAX_TOKENS_CAP, so the cast cannot truncate.
            (None, Some(max)) => (max.min(MAX_TOKENS_CAP) as usize, "length"),
            (None, None) => (default_tokens.unwrap_or(DEFAULT_TOKENS), "stop"),
        };
        let tools = knobs.tools && route == Route::Chat;
        Generation {
            hash: format!("{:016x}", conversation_hash(request, body)),
            model: json_string(
                request
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or("mock-model"),
            ),
            n,
            finish: if tools { "tool_calls" } else { finish },
            prompt_tokens: knobs
                .prompt_tokens
                .unwrap_or_else(|| prompt_tokens(route, request)),
            tools,
            usage: knobs.usage.clone(),
        }
    }

    /// The counts of the usage object it generates; `None` when `x-mock-usage` scripts it.
    pub(crate) fn generated_usage(&self) -> Option<(u64, u64)> {
        self.usage
            .is_none()
            .then_some((self.prompt_tokens as u64, self.n as u64))
    }

    fn usage(&self) -> String {
        if let Some(usage) = &self.usage {
            return usage.clone();
        }
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{}}}"#,
            self.prompt_tokens,
            self.n,
            self.prompt_tokens + self.n
        )
    }

    fn text(&self) -> String {
        let mut text = String::with_capacity(self.n * 7);
        for i in 0..self.n {
            text.push_str("tok");
            text.push_str(&i.to_string());
            text.push(' ');
        }
        text
    }

    /// `{"id":"call_...","type":"function","function":{"name":"get_weather","arguments":""`
    fn tool_call_head(&self) -> String {
        format!(
            r#""id":"call_{}","type":"function","function":{{"name":"get_weather","arguments":"#,
            self.hash
        )
    }

    pub(crate) fn chat_json(&self) -> String {
        let message = if self.tools {
            let args = json_string(&TOOL_ARG_PIECES.concat());
            format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{{{}{args}}}}}]}}"#,
                self.tool_call_head()
            )
        } else {
            format!(
                r#"{{"role":"assistant","content":{}}}"#,
                json_string(&self.text())
            )
        };
        format!(
            r#"{{"id":"chatcmpl-{}","object":"chat.completion","created":{CREATED},"model":{},"system_fingerprint":"fp_mock","choices":[{{"index":0,"message":{message},"logprobs":null,"finish_reason":"{}"}}],"usage":{}}}"#,
            self.hash,
            self.model,
            self.finish,
            self.usage()
        )
    }

    pub(crate) fn completion_json(&self) -> String {
        format!(
            r#"{{"id":"cmpl-{}","object":"text_completion","created":{CREATED},"model":{},"system_fingerprint":"fp_mock","choices":[{{"text":{},"index":0,"logprobs":null,"finish_reason":"{}"}}],"usage":{}}}"#,
            self.hash,
            self.model,
            json_string(&self.text()),
            self.finish,
            self.usage()
        )
    }

    pub(crate) fn chat_events(&self, include_usage: bool) -> Events {
        let head = format!(
            r#"{{"id":"chatcmpl-{}","object":"chat.completion.chunk","created":{CREATED},"model":{},"system_fingerprint":"fp_mock","choices":"#,
            self.hash, self.model
        );
        const OPEN: &str = r#"[{"index":0,"delta":"#;
        const NO_FINISH: &str = r#","logprobs":null,"finish_reason":null}]}"#;
        let pieces = if self.tools {
            TOOL_ARG_PIECES.len()
        } else {
            self.n
        };
        let mut ev = Events::with_capacity(pieces + 4, (pieces + 4) * (head.len() + 96));
        if self.tools {
            let first = format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{{"index":0,{}""}}}}]}}"#,
                self.tool_call_head()
            );
            ev.event(&[&head, OPEN, &first, NO_FINISH]);
            for piece in TOOL_ARG_PIECES {
                let delta = format!(
                    r#"{{"tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}}"#,
                    json_string(piece)
                );
                ev.event(&[&head, OPEN, &delta, NO_FINISH]);
            }
        } else {
            ev.event(&[
                &head,
                OPEN,
                r#"{"role":"assistant","content":""}"#,
                NO_FINISH,
            ]);
            for i in 0..self.n {
                let delta = format!(r#"{{"content":"tok{i} "}}"#);
                ev.event(&[&head, OPEN, &delta, NO_FINISH]);
            }
        }
        let finish = format!(r#","logprobs":null,"finish_reason":"{}"}}]}}"#, self.finish);
        ev.event(&[&head, OPEN, "{}", &finish]);
        if include_usage {
            let usage = format!(r#"[],"usage":{}}}"#, self.usage());
            ev.event(&[&head, &usage]);
        }
        ev.event(&["[DONE]"]);
        ev
    }

    pub(crate) fn completion_events(&self, include_usage: bool) -> Events {
        let head = format!(
            r#"{{"id":"cmpl-{}","object":"text_completion","created":{CREATED},"model":{},"system_fingerprint":"fp_mock","choices":"#,
            self.hash, self.model
        );
        let mut ev = Events::with_capacity(self.n + 3, (self.n + 3) * (head.len() + 80));
        for i in 0..self.n {
            let choice = format!(
                r#"[{{"text":"tok{i} ","index":0,"logprobs":null,"finish_reason":null}}]}}"#
            );
            ev.event(&[&head, &choice]);
        }
        let finish = format!(
            r#"[{{"text":"","index":0,"logprobs":null,"finish_reason":"{}"}}]}}"#,
            self.finish
        );
        ev.event(&[&head, &finish]);
        if include_usage {
            let usage = format!(r#"[],"usage":{}}}"#, self.usage());
            ev.event(&[&head, &usage]);
        }
        ev.event(&["[DONE]"]);
        ev
    }
}
