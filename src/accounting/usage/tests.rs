//! The observer and the stripper together: the outcome must not depend on where frames are cut,
//! for the samples and for generated streams; and what each costs per event.

use bytes::Bytes;
use proptest::prelude::*;

use super::test_support::*;
use super::*;

// === Cuts: the outcome must not depend on where frames end ===

#[test]
fn every_cut_point_gives_the_same_outcome() {
    for case in cases() {
        for eol in EOLS {
            let stream = with_eol(&case.stream, eol);
            let expected_out = with_eol(&case.stripped, eol);
            let bytes = stream.as_bytes();
            let whole = observe_frames([bytes], 4096);
            for at in 0..=bytes.len() {
                let frames = cut(bytes, &[at]);
                let seen = observe_frames(frames.iter().copied(), 4096);
                assert_eq!(seen, whole, "{}, {eol:?}, cut at {at}", case.name);
                let out = strip_frames(frames.iter().copied(), 4096);
                assert_eq!(
                    show(&out),
                    expected_out,
                    "{}, {eol:?}, cut at {at}",
                    case.name
                );
            }
            let bytewise = observe_frames(bytes.chunks(1), 4096);
            assert_eq!(bytewise, whole, "{}, {eol:?}, byte by byte", case.name);
            let out = strip_frames(bytes.chunks(1), 4096);
            assert_eq!(
                show(&out),
                expected_out,
                "{}, {eol:?}, byte by byte",
                case.name
            );
        }
    }
}

// === Properties ===

/// One piece of a generated stream.
#[derive(Debug, Clone)]
enum Piece {
    Content(String),
    Reasoning(String),
    ToolArguments(String),
    Comment,
    NamedEvent(String),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => any::<String>().prop_map(Piece::Content),
        1 => any::<String>().prop_map(Piece::Reasoning),
        1 => any::<String>().prop_map(Piece::ToolArguments),
        1 => Just(Piece::Comment),
        1 => any::<String>().prop_map(Piece::NamedEvent),
    ]
}

/// How a generated stream writes its `usage: null` members.
#[derive(Debug, Clone, Copy)]
struct Style {
    eol: &'static str,
    sep: &'static str,
    colon: &'static str,
    null_first: bool,
}

fn style() -> impl Strategy<Value = Style> {
    (0..3usize, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(eol, spaced_sep, spaced_colon, null_first)| Style {
            eol: EOLS[eol],
            sep: if spaced_sep { ", " } else { "," },
            colon: if spaced_colon { ": " } else { ":" },
            null_first,
        },
    )
}

/// Renders a stream as the upstream sends it with (`include_usage`) or without the flag.
/// Returns the stream, its data events and its generated characters.
fn render(pieces: &[Piece], style: Style, include_usage: bool) -> (String, u64, u64) {
    let Style {
        eol,
        sep,
        colon,
        null_first,
    } = style;
    let json = |text: &str| serde_json::to_string(text).expect("a string serializes");
    let data = |delta: String| {
        let members = [
            format!("\"id\"{colon}\"c1\""),
            format!("\"object\"{colon}\"chat.completion.chunk\""),
            format!("\"choices\"{colon}[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]"),
        ];
        let null = format!("\"usage\"{colon}null");
        let members: Vec<&str> = match (include_usage, null_first) {
            (false, _) => members.iter().map(String::as_str).collect(),
            (true, true) => std::iter::once(null.as_str())
                .chain(members.iter().map(String::as_str))
                .collect(),
            (true, false) => members
                .iter()
                .map(String::as_str)
                .chain([null.as_str()])
                .collect(),
        };
        format!("data: {{{}}}{eol}", members.join(sep))
    };
    let (mut stream, mut events, mut chars) = (String::new(), 0, 0);
    for piece in pieces {
        match piece {
            Piece::Content(text) => {
                stream += &data(format!("{{\"content\":{}}}", json(text)));
                chars += text.chars().count() as u64;
            }
            Piece::Reasoning(text) => {
                stream += &data(format!("{{\"reasoning_content\":{}}}", json(text)));
                chars += text.chars().count() as u64;
            }
            Piece::ToolArguments(text) => {
                stream += &data(format!(
                    "{{\"tool_calls\":[{{\"index\":0,\"function\":{{\"arguments\":{}}}}}]}}",
                    json(text)
                ));
                chars += text.chars().count() as u64;
            }
            Piece::Comment => {
                stream += &format!(": ping{eol}{eol}");
                continue;
            }
            Piece::NamedEvent(text) => {
                stream += &format!("event: delta{eol}id: 1{eol}");
                stream += &data(format!("{{\"content\":{}}}", json(text)));
                chars += text.chars().count() as u64;
            }
        }
        stream += eol;
        events += 1;
    }
    if include_usage {
        stream += &format!(
            "data: {{\"id\"{colon}\"c1\"{sep}\"choices\"{colon}[]{sep}\"usage\"{colon}{{\"prompt_tokens\":11,\"completion_tokens\":{events}}}}}{eol}{eol}"
        );
        events += 1;
    }
    stream += &format!("data: [DONE]{eol}{eol}");
    (stream, events + 1, chars)
}

fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
    prop::collection::vec(any::<prop::sample::Index>(), 0..12)
}

fn positions(cuts: &[prop::sample::Index], len: usize) -> Vec<usize> {
    cuts.iter().map(|c| c.index(len + 1)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_cut_of_a_stream_reads_and_strips_the_same(
        pieces in prop::collection::vec(piece(), 0..8),
        style in style(),
        cuts in cuts(),
    ) {
        let (stream, events, chars) = render(&pieces, style, true);
        let (expected, _, _) = render(&pieces, style, false);
        let bytes = stream.as_bytes();
        let frames = cut(bytes, &positions(&cuts, bytes.len()));

        let whole = observe_frames([bytes], 1 << 16);
        let expected_seen = Seen {
            usage: usage(11, events - 2),
            done: true,
            events,
            chars,
            dropped: 0,
        };
        prop_assert_eq!(&whole, &expected_seen, "observer on the whole stream");
        let seen = observe_frames(frames.iter().copied(), 1 << 16);
        prop_assert_eq!(&seen, &whole, "observer on frames {:?}", frames.iter().map(|f| f.len()).collect::<Vec<_>>());

        let out = strip_frames(frames.iter().copied(), 1 << 16);
        prop_assert_eq!(show(&out), expected, "stripper output");
    }

    #[test]
    fn the_stripper_is_the_identity_on_a_stream_without_usage(
        pieces in prop::collection::vec(piece(), 0..8),
        style in style(),
        cuts in cuts(),
    ) {
        let (stream, _, _) = render(&pieces, style, false);
        let bytes = stream.as_bytes();
        let frames = cut(bytes, &positions(&cuts, bytes.len()));
        let out = strip_frames(frames.iter().copied(), 1 << 16);
        prop_assert_eq!(show(&out), stream.clone(), "byte-equal whatever the cuts");

        // Event by event, each complete event comes back as the very same bytes.
        let mut stripper = UsageStripper::new(1 << 16);
        let end = format!("{0}{0}", style.eol);
        for event in stream.split_inclusive(&end) {
            let frame = Bytes::copy_from_slice(event.as_bytes());
            let out = stripper.rewrite(frame.clone());
            prop_assert_eq!(out.as_ptr(), frame.as_ptr(), "the same Bytes for {:?}", event);
            prop_assert_eq!(out.len(), frame.len(), "all of {:?}", event);
        }
    }

    #[test]
    fn arbitrary_bytes_never_lose_a_byte_or_panic(
        bytes in prop::collection::vec(prop_oneof![
            Just(b'\n'), Just(b'\r'), Just(b':'), Just(b' '), Just(b'{'), Just(b'}'), Just(b'"'),
            Just(b'd'), Just(b'a'), Just(b't'), any::<u8>(),
        ], 0..200),
        cuts in cuts(),
        max in 1usize..64,
    ) {
        let frames = cut(&bytes, &positions(&cuts, bytes.len()));
        let _ = observe_frames(frames.iter().copied(), max);
        let out = strip_frames(frames.iter().copied(), max);
        prop_assert_eq!(out, bytes.clone(), "no usage event in here: identity");
    }
}

// === Cost ===

/// `cargo test --release --lib usage::tests::cost -- --ignored --nocapture`
#[test]
#[ignore = "a timing, not a check: run in release mode"]
fn cost_per_event() {
    use std::hint::black_box;
    use std::time::Instant;

    let content = |text: &str| {
        format!(
            concat!(
                r#"data: {{"choices":[{{"finish_reason":null,"index":0,"delta":{{"content":"{}"}}}}],"#,
                r#""created":1795356677,"id":"chatcmpl-Cyy2aK3uGdbZ1Hq4","model":"smollm2-135m-instruct","#,
                r#""system_fingerprint":"b0-unknown","object":"chat.completion.chunk"}}"#,
                "\n\n"
            ),
            text
        )
    };
    // 32 events each: the role chunk, 28 content chunks, the finish chunk, the usage chunk
    // and [DONE]; one event per frame, as servers flush them.
    let sample = llama_chat_sse(true);
    let sample: Vec<&str> = sample.split_inclusive("\n\n").collect();
    let mut llama = vec![sample[0].to_owned()];
    llama.extend((0..28).map(|i| content(&format!(" word{i}"))));
    llama.extend(sample[4..].iter().map(|e| (*e).to_owned()));
    let llama: Vec<Bytes> = llama.into_iter().map(Bytes::from).collect();
    let sample = openai_sse(true);
    let sample: Vec<&str> = sample.split_inclusive("\n\n").collect();
    let mut openai = vec![sample[0].to_owned()];
    openai.extend(std::iter::repeat_n(sample[1].to_owned(), 28));
    openai.extend(sample[3..].iter().map(|e| (*e).to_owned()));
    let openai: Vec<Bytes> = openai.into_iter().map(Bytes::from).collect();
    assert_eq!(
        (llama.len(), openai.len()),
        (32, 32),
        "32 events per stream"
    );
    // Best of several runs: the machine is shared, and the best run is the least disturbed.
    let rounds = 5_000u32;
    let best = |run: &mut dyn FnMut()| {
        (0..7)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..rounds {
                    run();
                }
                start.elapsed()
            })
            .min()
            .unwrap_or_default()
    };
    for (name, frames) in [("llama.cpp chat", &llama), ("OpenAI usage:null", &openai)] {
        let events = frames.len() as u32;
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        let observe = best(&mut || {
            let mut observer = SseObserver::new(DEFAULT_MAX_LINE_BYTES);
            for frame in frames {
                observer.observe(black_box(frame));
            }
            black_box(observer.usage());
        }) / (rounds * events);
        let rewrite = best(&mut || {
            let mut stripper = UsageStripper::new(DEFAULT_MAX_LINE_BYTES);
            for frame in frames {
                black_box(stripper.rewrite(black_box(frame.clone())));
            }
            black_box(stripper.finish());
        }) / (rounds * events);
        println!(
            "{name}: {events} events, {bytes} bytes: observe {} ns/event ({:.1} µs/stream), \
             rewrite {} ns/event ({:.1} µs/stream)",
            observe.as_nanos(),
            (observe * events).as_secs_f64() * 1e6,
            rewrite.as_nanos(),
            (rewrite * events).as_secs_f64() * 1e6,
        );
    }
}
