use proptest::prelude::*;

use super::*;
use crate::accounting::usage::test_support::*;

// === JSON bodies ===

#[test]
fn json_bodies_give_usage_and_generated_chars() {
    assert_eq!(
        usage_from_json(LLAMA_CHAT_JSON.as_bytes()),
        usage(34, 16),
        "llama.cpp chat body"
    );
    assert_eq!(
        completion_chars_from_json(LLAMA_CHAT_JSON.as_bytes()),
        "1. Red: The most obvious colour, but there are many more.\n"
            .chars()
            .count() as u64,
        "chat message content, unescaped"
    );
    assert_eq!(
        usage_from_json(LLAMA_COMPLETIONS_JSON.as_bytes()),
        usage(5, 4),
        "llama.cpp completions body"
    );
    assert_eq!(
        completion_chars_from_json(LLAMA_COMPLETIONS_JSON.as_bytes()),
        9,
        "completions text \" Paris.\\n\\n\""
    );
    assert_eq!(
        usage_from_json(LLAMA_TOOL_JSON.as_bytes()),
        usage(210, 19),
        "tool call body"
    );
    assert_eq!(
        completion_chars_from_json(LLAMA_TOOL_JSON.as_bytes()),
        11 + 17,
        "tool call name and arguments"
    );
}

#[test]
fn json_usage_absent_null_or_invalid_is_none() {
    for (body, why) in [
        (r#"{"choices":[]}"#, "absent"),
        (r#"{"choices":[],"usage":null}"#, "null"),
        (
            r#"{"usage":{"total_tokens":9}}"#,
            "no prompt or completion count",
        ),
        (r#"{"usage":"lots"}"#, "not an object"),
        (
            r#"{"usage":{"prompt_tokens":5,"completion_tokens":4}"#,
            "truncated JSON",
        ),
        ("not json", "not JSON"),
        ("", "empty body"),
    ] {
        assert_eq!(usage_from_json(body.as_bytes()), None, "{why}: {body}");
    }
    assert_eq!(
        usage_from_json(br#"{"choices":5,"usage":{"completion_tokens":3}}"#),
        Some(Usage {
            prompt_tokens: TokenCount::Absent,
            completion_tokens: TokenCount::Reported(3),
        }),
        "an odd `choices` does not hide the usage; a missing count is absent, not 0"
    );
}

#[test]
fn json_counts_that_are_not_non_negative_integers_are_unreadable_never_zero() {
    for count in [r#""100""#, "-100", "100.5", "true", "{}", "[1]", "1e30"] {
        let body = format!(r#"{{"usage":{{"prompt_tokens":5.0,"completion_tokens":{count}}}}}"#);
        assert_eq!(
            usage_from_json(body.as_bytes()),
            Some(Usage {
                prompt_tokens: TokenCount::Reported(5),
                completion_tokens: TokenCount::Unreadable,
            }),
            "{count}: an integral float counts, the other is unreadable"
        );
    }
    assert_eq!(
        usage_from_json(br#"{"usage":{"prompt_tokens":-1,"completion_tokens":null}}"#),
        Some(Usage {
            prompt_tokens: TokenCount::Unreadable,
            completion_tokens: TokenCount::Absent,
        }),
        "null is absent"
    );
}

// === The lexical walk against serde ===

/// What the walk must count, computed on a parsed `Value` by the same rules.
fn reference_chars(chunk: &serde_json::Value) -> u64 {
    use serde_json::Value;
    fn string(v: &Value) -> u64 {
        v.as_str().map_or(0, |s| s.chars().count() as u64)
    }
    fn part(v: &Value) -> u64 {
        match v {
            Value::Object(part) => part.get("text").map_or(0, string),
            other => string(other),
        }
    }
    fn text(v: &Value) -> u64 {
        match v {
            Value::Array(parts) => parts.iter().map(part).sum(),
            other => part(other),
        }
    }
    fn function(v: &Value) -> u64 {
        v.get("name").map_or(0, string) + v.get("arguments").map_or(0, string)
    }
    fn message(v: &Value) -> u64 {
        let Value::Object(m) = v else { return 0 };
        let texts: u64 = ["content", "reasoning_content", "reasoning", "refusal"]
            .iter()
            .filter_map(|k| m.get(*k))
            .map(text)
            .sum();
        let calls: u64 = m
            .get("tool_calls")
            .and_then(Value::as_array)
            .map_or(0, |calls| {
                calls
                    .iter()
                    .filter_map(|c| c.get("function"))
                    .map(function)
                    .sum()
            });
        texts + calls + m.get("function_call").map_or(0, function)
    }
    let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
        return 0;
    };
    choices
        .iter()
        .map(|c| {
            c.get("delta").map_or(0, message)
                + c.get("message").map_or(0, message)
                + c.get("text").map_or(0, text)
        })
        .sum()
}

const VOCABULARY: [&str; 18] = [
    "choices",
    "delta",
    "message",
    "text",
    "content",
    "reasoning_content",
    "reasoning",
    "refusal",
    "tool_calls",
    "function",
    "function_call",
    "name",
    "arguments",
    "usage",
    "type",
    "index",
    "logprobs",
    "x",
];

/// Any JSON, with keys that mean something somewhere, to be skipped or misread.
fn noise() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(&VOCABULARY[..]), inner), 0..5).prop_map(
                |m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            ),
        ]
    })
}

/// An object with some noise members and the given meaningful ones (which win on a clash).
fn object(
    members: Vec<(&'static str, Option<serde_json::Value>)>,
    noise_members: Vec<(&'static str, serde_json::Value)>,
) -> serde_json::Value {
    let mut map: serde_json::Map<String, serde_json::Value> = noise_members
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    for (key, value) in members {
        if let Some(value) = value {
            map.insert(key.to_owned(), value);
        }
    }
    serde_json::Value::Object(map)
}

fn noise_members() -> impl Strategy<Value = Vec<(&'static str, serde_json::Value)>> {
    prop::collection::vec((prop::sample::select(&VOCABULARY[..]), noise()), 0..3)
}

fn text_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value};
    let part = prop_oneof![
        any::<String>().prop_map(|t| json!({"type": "text", "text": t})),
        any::<String>().prop_map(Value::from),
        noise(),
    ];
    prop_oneof![
        3 => any::<String>().prop_map(Value::from),
        1 => prop::collection::vec(part.clone(), 0..4).prop_map(Value::Array),
        1 => part,
        1 => noise(),
    ]
}

fn function_value() -> impl Strategy<Value = serde_json::Value> {
    let opt = || prop::option::of(text_value());
    (opt(), opt(), noise_members())
        .prop_map(|(name, arguments, n)| object(vec![("name", name), ("arguments", arguments)], n))
}

fn message_value() -> impl Strategy<Value = serde_json::Value> {
    let opt = || prop::option::of(text_value());
    let call = (prop::option::of(function_value()), noise_members())
        .prop_map(|(function, n)| object(vec![("function", function)], n));
    let calls = prop_oneof![
        prop::collection::vec(call, 0..3).prop_map(serde_json::Value::Array),
        noise(),
    ];
    (
        (opt(), opt(), opt(), opt()),
        prop::option::of(calls),
        prop::option::of(function_value()),
        noise_members(),
    )
        .prop_map(
            |((content, reasoning_content, reasoning, refusal), calls, call, n)| {
                object(
                    vec![
                        ("content", content),
                        ("reasoning_content", reasoning_content),
                        ("reasoning", reasoning),
                        ("refusal", refusal),
                        ("tool_calls", calls),
                        ("function_call", call),
                    ],
                    n,
                )
            },
        )
}

fn chunk_value() -> impl Strategy<Value = serde_json::Value> {
    let choice = (
        prop::option::of(prop_oneof![3 => message_value(), 1 => noise()]),
        prop::option::of(message_value()),
        prop::option::of(text_value()),
        noise_members(),
    )
        .prop_map(|(delta, message, text, n)| {
            object(
                vec![("delta", delta), ("message", message), ("text", text)],
                n,
            )
        });
    let choices = prop_oneof![
        4 => prop::collection::vec(choice, 0..3).prop_map(serde_json::Value::Array),
        1 => noise(),
    ];
    (
        prop::option::of(choices),
        prop::option::of(noise()),
        noise_members(),
    )
        .prop_map(|(choices, usage, n)| object(vec![("choices", choices), ("usage", usage)], n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_walk_counts_what_serde_reads(chunk in chunk_value(), pretty in any::<bool>()) {
        let json = if pretty {
            serde_json::to_string_pretty(&chunk)
        } else {
            serde_json::to_string(&chunk)
        }
        .expect("a Value serializes");
        let scan = scan_chunk(json.as_bytes());
        prop_assert!(scan.is_some(), "a valid object is walked: {}", json);
        let scan = scan.expect("checked above");
        prop_assert_eq!(scan.chars, reference_chars(&chunk), "chars in {}", json);
        prop_assert_eq!(completion_chars_from_json(json.as_bytes()), scan.chars, "a body counts the same: {}", json);
        let usage_object = chunk.get("usage").is_some_and(serde_json::Value::is_object);
        prop_assert_eq!(scan.usage_object, usage_object, "usage object in {}", json);
    }
}

/// A chunk that starts like `a` (up to `a`'s first `"choices"`, or its first `cut` bytes) and
/// goes on like `c`: the next chunk of a stream, whose metadata repeats, or nearly does.
fn next_chunk(a: &[u8], c: &[u8], cut: usize, at_choices: bool, pad: &str) -> Vec<u8> {
    let find = |json: &[u8]| json.windows(9).position(|w| w == b"\"choices\"");
    let (head, tail) = match (at_choices, find(a), find(c)) {
        (true, Some(in_a), Some(in_c)) => (&a[..in_a], &c[in_c..]),
        _ => (&a[..cut.min(a.len())], &c[cut.min(c.len())..]),
    };
    [head, pad.as_bytes(), tail].concat()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// Skipping the repeated metadata before `choices` finds what the whole walk finds, chunk
    /// after chunk, whether the metadata repeats exactly, nearly (a space more) or not at all.
    #[test]
    fn a_walk_resumed_at_choices_finds_what_the_whole_walk_finds(
        chunks in prop::collection::vec((chunk_value(), any::<bool>()), 1..4),
        cuts in prop::collection::vec((0usize..200, any::<bool>(), prop::sample::select(&["", "", " ", "\n"][..])), 4),
    ) {
        let written: Vec<Vec<u8>> = chunks
            .iter()
            .map(|(chunk, pretty)| {
                if *pretty { serde_json::to_vec_pretty(chunk) } else { serde_json::to_vec(chunk) }
                    .expect("a Value serializes")
            })
            .collect();
        let mut stream = vec![written[0].clone()];
        for (i, (cut, at_choices, pad)) in cuts.iter().enumerate() {
            let previous = stream.last().expect("one chunk at least").clone();
            let next = &written[i % written.len()];
            stream.push(previous.clone());
            stream.push(next_chunk(&previous, next, *cut, *at_choices, pad));
        }
        let mut prefix = Prefix::default();
        for json in &stream {
            let whole = scan_chunk(json).map(|s| (s.chars, s.usage_object));
            let resumed = scan_chunk_after(json, Some(&mut prefix)).map(|s| (s.chars, s.usage_object));
            prop_assert_eq!(resumed, whole, "{}", show(json));
        }
    }
}

#[test]
fn a_walk_resumed_at_choices_sees_what_differs_after_the_metadata() {
    let first = br#"{"id":"c1","model":"m","choices":[{"delta":{"content":"ab"}}]}"#;
    let mut prefix = Prefix::default();
    let scan = scan_chunk_after(first, Some(&mut prefix)).map(|s| s.chars);
    assert_eq!(scan, Some(2));
    assert_eq!(
        show(&prefix.0),
        r#"{"id":"c1","model":"m",""#,
        "kept up to the key's quote"
    );
    for (json, chars) in [
        (
            &br#"{"id":"c1","model":"m","choices":[{"delta":{"content":"xyz"}}]}"#[..],
            Some(3),
        ),
        (
            br#"{"id":"c1","model":"m", "choices":[{"delta":{"content":"xyz"}}]}"#,
            Some(3),
        ),
        (
            br#"{"id":"c1","model":"m","usage":{"prompt_tokens":1},"choices":[]}"#,
            Some(0),
        ),
        // Nothing after `choices` is read without a usage object: the broken end is not seen.
        (
            br#"{"id":"c1","model":"m","choices":[{"delta":{"content":"xyz"}}],"#,
            Some(3),
        ),
        (
            br#"{"id":"c1","model":"m","choices":[{"delta":{"content":"xyz"}}"#,
            None,
        ),
        (
            br#"{"id":"c2","model":"m","choices":[{"text":"xy"}]}"#,
            Some(2),
        ),
    ] {
        let resumed = scan_chunk_after(json, Some(&mut prefix)).map(|s| s.chars);
        assert_eq!(resumed, chars, "{}", show(json));
        assert_eq!(resumed, scan_chunk(json).map(|s| s.chars), "{}", show(json));
    }
}
