use bytes::Bytes;

use super::*;
use crate::accounting::usage::test_support::*;

// === The stripper on real samples ===

#[test]
fn stripper_removes_exactly_what_include_usage_added() {
    for case in cases() {
        for eol in EOLS {
            let stream = with_eol(&case.stream, eol);
            let expected = with_eol(&case.stripped, eol);
            let out = strip_frames([stream.as_bytes()], 4096);
            assert_eq!(
                show(&out),
                expected,
                "{} with line breaks {eol:?}",
                case.name
            );
        }
    }
}

#[test]
fn stripper_counts_what_it_removes() {
    let mut stripper = UsageStripper::new(4096);
    let _ = stripper.rewrite(Bytes::from(openai_sse(true)));
    let _ = stripper.finish();
    assert_eq!(stripper.events_removed(), 1, "one usage chunk");
    assert_eq!(stripper.fields_removed(), 4, "four `usage: null` members");
}

/// Rewrites one complete event on its own.
fn strip_one(event: &str) -> String {
    show(&strip_frames([event.as_bytes()], 4096))
}

#[test]
fn stripper_removes_usage_null_in_every_position_and_spacing() {
    for (event, expected) in [
        (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
        (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
        (r#"{"a":1,"usage":null,"b":2}"#, r#"{"a":1,"b":2}"#),
        (r#"{"a":1, "usage": null, "b":2}"#, r#"{"a":1, "b":2}"#),
        (r#"{ "usage" : null , "a" : 1 }"#, r#"{ "a" : 1 }"#),
        (r#"{"a":1 ,	"usage" :	null }"#, r#"{"a":1 }"#),
        (r#"{"usage":null}"#, r#"{}"#),
        (r#"{ "usage": null }"#, r#"{  }"#),
        (r#"{"choices":[],"usage":null}"#, r#"{"choices":[]}"#),
    ] {
        for eol in EOLS {
            let input = with_eol(&format!("data: {event}\n\n"), eol);
            let want = with_eol(&format!("data: {expected}\n\n"), eol);
            assert_eq!(strip_one(&input), want, "{event} with line breaks {eol:?}");
            serde_json::from_str::<serde_json::Value>(expected).expect("the result is JSON");
        }
    }
    assert_eq!(
        strip_one("data:{\"a\":1,\"usage\":null}\n\n"),
        "data:{\"a\":1}\n\n",
        "no space after `data:`"
    );
}

#[test]
fn stripper_leaves_what_the_client_would_have_seen() {
    for (event, why) in [
        (r#"{"a":{"usage":null}}"#, "a nested usage member"),
        (r#"{"a":"\"usage\":null"}"#, "usage inside a string"),
        (r#"{"a":"x","usage":null"#, "not valid JSON"),
        (r#"{"a":1,"usage":null} x"#, "trailing garbage"),
        (r#"{"a":1,"usage":nul}"#, "a broken literal"),
        (
            r#"{"choices":[{"index":0}],"usage":{"prompt_tokens":1}}"#,
            "usage on a chunk with choices",
        ),
        (
            r#"{"usage":{"prompt_tokens":1}}"#,
            "usage on a chunk without choices",
        ),
        (
            r#"{"choices":[],"usage":{"prompt_tokens":1},"usage":null}"#,
            "usage twice",
        ),
        (r#"{"choices":[],"usage":5}"#, "usage that is not an object"),
        (r#"{"\u0075sage":null}"#, "an escaped key"),
        (r#"["usage",null]"#, "not an object"),
    ] {
        let input = format!("data: {event}\n\n");
        assert_eq!(strip_one(&input), input, "{why}: {event}");
    }
    let two_data_lines = "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":1}}\n\n";
    assert_eq!(
        strip_one(two_data_lines),
        two_data_lines,
        "a multi-line data field passes unchanged"
    );
}

#[test]
fn stripper_drops_the_usage_chunk_with_its_other_lines() {
    let stream = concat!(
        ": ping\n\n",
        "event: message\nid: 3\n",
        r#"data: {"choices":[ ],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        "\n\n",
        "id: 4\ndata: [DONE]\n\n",
    );
    assert_eq!(
        strip_one(stream),
        ": ping\n\nid: 4\ndata: [DONE]\n\n",
        "the whole usage event goes, everything else stays byte for byte"
    );
}

#[test]
fn stripper_fast_path_returns_the_same_bytes() {
    let mut stripper = UsageStripper::new(4096);
    let stream = llama_chat_sse(false) + ": ping\n\n";
    for eol in EOLS {
        let stream = with_eol(&stream, eol);
        for event in stream.split_inclusive(&format!("{eol}{eol}")) {
            let frame = Bytes::copy_from_slice(event.as_bytes());
            let out = stripper.rewrite(frame.clone());
            assert_eq!(
                out, frame,
                "an event without usage is forwarded as is ({eol:?})"
            );
            assert_eq!(
                out.as_ptr(),
                frame.as_ptr(),
                "the same bytes, not a copy ({eol:?})"
            );
        }
        let frame = Bytes::from(stream);
        let out = stripper.rewrite(frame.clone());
        assert_eq!(
            out.as_ptr(),
            frame.as_ptr(),
            "a frame of many events: the same bytes"
        );
        assert_eq!(out.len(), frame.len(), "a frame of many events: all of it");
    }
    assert!(stripper.finish().is_empty(), "nothing is held");
}

#[test]
fn stripper_holds_only_an_incomplete_event() {
    let mut stripper = UsageStripper::new(4096);
    let stream = openai_sse(false);
    let second = stream.find("\n\n").expect("an event end") + 2;
    let split = second + 10;
    let frame = Bytes::copy_from_slice(&stream.as_bytes()[..split]);
    let out = stripper.rewrite(frame.clone());
    assert_eq!(show(&out), stream[..second], "complete events go at once");
    assert_eq!(out.as_ptr(), frame.as_ptr(), "as a slice of the frame");
    let out = stripper.rewrite(Bytes::copy_from_slice(&stream.as_bytes()[split..]));
    assert_eq!(
        show(&out),
        stream[second..],
        "the held event goes when it ends"
    );
    assert!(stripper.finish().is_empty(), "nothing is left");
}

#[test]
fn stripper_finish_flushes_an_unterminated_event() {
    let mut stripper = UsageStripper::new(4096);
    assert!(
        stripper
            .rewrite(Bytes::from_static(b"data: [DO"))
            .is_empty(),
        "held"
    );
    assert_eq!(
        &stripper.finish()[..],
        b"data: [DO",
        "flushed unchanged at the end"
    );
    let mut stripper = UsageStripper::new(4096);
    let out = stripper.rewrite(Bytes::from_static(
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n",
    ));
    assert!(out.is_empty(), "held until its blank line");
    assert!(
        stripper.finish().is_empty(),
        "a usage chunk cut short is still removed"
    );
}

#[test]
fn stripper_forwards_an_over_long_event_unchanged() {
    let max = 64;
    let stream = openai_sse(true);
    for frame_len in [1, 10, 63, 64, 65, 500, stream.len()] {
        let out = strip_frames(stream.as_bytes().chunks(frame_len), max);
        assert_eq!(
            show(&out),
            stream,
            "events beyond the cap pass untouched ({frame_len}-byte frames)"
        );
    }
    let mut stripper = UsageStripper::new(max);
    for frame in stream.as_bytes().chunks(7) {
        let _ = stripper.rewrite(Bytes::copy_from_slice(frame));
        assert!(stripper.held.len() <= max, "held bytes stay within the cap");
    }
}

// === The `"usage": null` fast path against the walk ===

/// The cut the full walk makes for a top-level `"usage": null`, as [`event_fate`] did before the
/// fast path.
fn walked_null_cut(json: &[u8]) -> Option<Range<usize>> {
    let usage = TopLevel::scan(json)?.usage?;
    (&json[usage.value.clone()] == b"null").then(|| usage.cut())
}

/// Members of a chunk, the tricky ones included: `usage` inside strings (escaped quotes and
/// all), nested, doubled, with an escaped quote before it in a key, and whitespace variants.
const MEMBERS: &[&str] = &[
    r#""usage":null"#,
    r#""usage" : null"#,
    "\"usage\"\t: \t null",
    r#""usage":{"prompt_tokens":1}"#,
    r#""usage":"null""#,
    r#""choices":[]"#,
    r#""choices":[{"index":0,"delta":{"content":"\"usage\":null}"}}]"#,
    r#""x\"usage":null"#,
    r#""a":"say \"usage""#,
    r#""a":"\\","b":"usage""#,
    r#""a":{"usage":null}"#,
    r#""a":["usage",null]"#,
    r#""content":"\"usage\": null }""#,
    r#""\u0075sage":null"#,
    r#""id":"chatcmpl-1""#,
    r#""n":1"#,
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]

    #[test]
    fn null_usage_fast_path_agrees_with_the_walk(
        picks in proptest::collection::vec(0..MEMBERS.len(), 0..5),
        spaces in proptest::collection::vec(proptest::sample::select(&["", " ", "\t "][..]), 8),
        unclosed in proptest::bool::ANY,
    ) {
        let space = |i: usize| spaces[i % spaces.len()];
        let mut json = format!("{}{{{}", space(0), space(1));
        for (i, &pick) in picks.iter().enumerate() {
            if i > 0 {
                json += &format!("{},{}", space(i + 2), space(i + 3));
            }
            json += MEMBERS[pick];
        }
        json += &format!("{}{}{}", space(2), if unclosed { "" } else { "}" }, space(3));
        let json = json.as_bytes();
        let fast = null_usage_last(json);
        if serde_json::from_slice::<IgnoredAny>(json).is_ok() {
            if let Some(cut) = fast.clone() {
                proptest::prop_assert_eq!(Some(cut), walked_null_cut(json), "{}", show(json));
            }
        }
        // And the stripper's output as a whole: the fast path only ever saves the walk.
        let event = format!("data: {}\n\n", show(json));
        let out = show(&strip_frames([event.as_bytes()], 4096));
        let want = match (serde_json::from_slice::<IgnoredAny>(json).is_ok(), walked_null_cut(json)) {
            (true, Some(cut)) => format!(
                "data: {}{}\n\n",
                show(&json[..cut.start]),
                show(&json[cut.end..])
            ),
            _ if fast.is_some() => event.clone(),
            _ => out.clone(), // another rule (a usage chunk dropped): not this test's business
        };
        proptest::prop_assert_eq!(out, want, "{}", show(json));
    }
}

#[test]
fn null_usage_fast_path_takes_only_the_fixed_shape() {
    for (json, fast) in [
        (r#"{"a":1,"usage":null}"#, true),
        (r#"{"a":1 , "usage" : null }"#, true),
        (r#"{ "usage": null } "#, true),
        (r#"{"usage":null,"a":1}"#, false),
        (r#"{"a":"\"usage\"","usage":null}"#, true),
        ("{\"a\":1,\r\n\"usage\"\r\n:\nnull\r\n}", true),
        (r#"{"a":"say \"usage","usage":null}"#, false),
        (r#"{"x\"usage":null}"#, false),
        (r#"{"a":{"usage":null}}"#, false),
        (r#"{"choices":[],"choices":[],"usage":null}"#, false),
        (r#"{"a":1,"usage":nulls}"#, false),
    ] {
        let cut = null_usage_last(json.as_bytes());
        assert_eq!(cut.is_some(), fast, "{json}");
        if let Some(cut) = cut {
            assert_eq!(Some(cut), walked_null_cut(json.as_bytes()), "{json}");
        }
    }
}
