use crate::accounting::usage::test_support::*;

// === The observer on real samples ===

#[test]
fn observer_reads_every_sample() {
    for case in cases() {
        for eol in EOLS {
            let stream = with_eol(&case.stream, eol);
            let seen = observe_frames([stream.as_bytes()], 1024);
            let expected = Seen {
                usage: case.usage,
                done: true,
                events: case.events,
                chars: case.chars,
                dropped: 0,
            };
            assert_eq!(seen, expected, "{} with line breaks {eol:?}", case.name);
        }
    }
}

#[test]
fn observer_keeps_the_last_usage() {
    // vLLM's continuous_usage_stats: a running total on every chunk.
    let stream = concat!(
        r#"data: {"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{"content":"b"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{"content":"c"}}],"usage":null}"#,
        "\n\n",
    );
    let seen = observe_frames([stream.as_bytes()], 1024);
    assert_eq!(seen.usage, usage(5, 2), "the last non-null usage wins");
    assert!(!seen.done, "no [DONE] in this stream");
    assert_eq!(seen.chars, 3, "one char per chunk");
}

#[test]
fn observer_counts_every_kind_of_generated_text() {
    let stream = concat!(
        r#"data: {"choices":[{"index":0,"delta":{"reasoning_content":"think"}},{"index":1,"delta":{"reasoning":"ab"}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{"refusal":"no","function_call":{"name":"f","arguments":"{}"}}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{"content":[{"type":"text","text":"part"}]}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{"content":"\u00e9\ud83d\ude00\n"}}]}"#,
        "\n\n",
        r#"data: {"choices":[{"index":0,"delta":{"content":5,"tool_calls":null}}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        "\n\n",
    );
    let seen = observe_frames([stream.as_bytes()], 1024);
    assert_eq!(
        seen.chars,
        5 + 2 + 2 + 1 + 2 + 4 + 3,
        "reasoning, refusal, legacy function_call, content parts, escapes counted as chars"
    );
    assert_eq!(
        seen.usage,
        usage(1, 2),
        "an odd content type does not hide the usage"
    );
    assert_eq!(seen.events, 5, "five data events");
}

#[test]
fn observer_skips_comments_and_other_fields() {
    let stream = concat!(
        ": ping\n\n",
        "retry: 1000\n\n",
        "event: message\nid: 7\n",
        r#"data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}"#,
        "\n\n",
        ":",
        r#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        "\n\n",
        r#"dataX: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":9}}"#,
        "\n\n",
        "data:[DONE]\n\n",
    );
    let seen = observe_frames([stream.as_bytes()], 1024);
    let expected = Seen {
        usage: None,
        done: true,
        events: 2,
        chars: 2,
        dropped: 0,
    };
    assert_eq!(seen, expected, "comments and unknown fields are not data");
}

#[test]
fn observer_reads_a_split_crlf_as_one_line_break() {
    // Were the `\n` read as a second break, it would make a blank line that ends the event
    // between its two data lines, and the event would count twice.
    let stream = b"data: {\"a\":\r\ndata: 1}\r\n\r\n";
    for at in 0..=stream.len() {
        let seen = observe_frames(cut(stream, &[at]), 1024);
        assert_eq!(seen.events, 1, "one event with two data lines, cut at {at}");
    }
    let seen = observe_frames([&b"data: x\r"[..], b"\r", b"data: y\r\n\r\n"], 1024);
    assert_eq!(
        seen.events, 2,
        "a `\\r` after a `\\r` is a blank line: two events"
    );
}

#[test]
fn observer_drops_an_over_long_line_and_carries_on() {
    let max = 512; // above every line of the sample, far below the long one
    let long = format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
        "x".repeat(2000)
    );
    for eol in EOLS {
        let stream = with_eol(&(long.clone() + &llama_chat_sse(true)), eol);
        let expected = Seen {
            usage: usage(33, 4),
            done: true,
            events: 7, // the dropped line's event is not seen at all
            chars: 14,
            dropped: 1,
        };
        let whole = observe_frames([stream.as_bytes()], max);
        assert_eq!(whole, expected, "long line whole, line breaks {eol:?}");
        for frame_len in [1, 7, 100, 511, 512, 513, 1000] {
            let seen = observe_frames(stream.as_bytes().chunks(frame_len), max);
            assert_eq!(
                seen, expected,
                "long line in {frame_len}-byte frames, line breaks {eol:?}"
            );
        }
    }
    // A line of exactly the cap is kept, one byte more is dropped, however it is cut.
    let event = r#"data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
    for (max, kept) in [(event.len(), true), (event.len() - 1, false)] {
        let stream = format!("{event}\n\n");
        for frame_len in [1, 2, 5, stream.len()] {
            let seen = observe_frames(stream.as_bytes().chunks(frame_len), max);
            assert_eq!(
                seen.usage.is_some(),
                kept,
                "cap {max}, line {}, frames of {frame_len}",
                event.len()
            );
            assert_eq!(
                seen.dropped,
                u64::from(!kept),
                "cap {max}: dropped count, frames of {frame_len}"
            );
        }
    }
}
