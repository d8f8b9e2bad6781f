//! [`Answer`] read from a real socket: a scripted HTTP/1.1 upstream writes its answer in the
//! pieces a test chooses, and the frames the answer gives are checked, not their timing.

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::*;
use crate::config::{Config, PoolConfig};
use crate::observability::metrics::Metrics;
use crate::proxy::client::Connector;

const HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

fn event(i: usize) -> String {
    format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"token {i}\"}}}}]}}\n\n")
}

/// `data` as one HTTP chunk.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// An upstream that answers one request: it reads the request's head, then writes each piece
/// with one `write` once the test lets it (the first piece at once).
async fn scripted_upstream(
    pieces: Vec<String>,
) -> (u16, Vec<oneshot::Sender<()>>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let mut gates = Vec::new();
    let mut waits = Vec::new();
    for _ in 1..pieces.len() {
        let (tx, rx) = oneshot::channel();
        gates.push(tx);
        waits.push(rx);
    }
    let task = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.expect("accept");
        read_head(&mut tcp).await;
        let mut waits = waits.into_iter();
        for (i, piece) in pieces.into_iter().enumerate() {
            if i > 0 {
                let wait = waits.next().expect("a gate per piece");
                if wait.await.is_err() {
                    return;
                }
            }
            tcp.write_all(piece.as_bytes()).await.expect("write");
        }
        // Hold the connection open: the client decides when it is done.
        let _ = tcp.read(&mut [0; 1]).await;
    });
    (port, gates, task)
}

async fn read_head(tcp: &mut TcpStream) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(n > 0, "the client closed before its request's head");
        seen.extend_from_slice(&buf[..n]);
    }
}

fn pool(port: u16) -> PoolConfig {
    let text = format!("[server]\n[upstream]\nurl = \"http://127.0.0.1:{port}\"\n");
    Config::parse(&text, "test.toml").expect("valid").upstreams[0].clone()
}

/// Sends a GET to the scripted upstream on port `port` through the client; the endpoint's
/// idle stack tells whether the connection came back.
async fn get(port: u16) -> (Answer, Arc<Endpoint>) {
    let pool = pool(port);
    let metrics = Metrics::new();
    let endpoint = Arc::new(Endpoint::new(
        pool.endpoints[0].clone(),
        pool.name.clone(),
        1,
        &metrics,
    ));
    let connector = Connector::new(&pool.upstream, false).expect("connector");
    let request = http::Request::builder()
        .uri(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .header(http::header::HOST, "upstream")
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    let response = connector
        .send(&endpoint, 0, request, false)
        .await
        .expect("an answer");
    assert_eq!(response.status(), 200);
    (response.into_body(), endpoint)
}

/// The next frame's data as text, failing the test (not hanging it) if none comes.
async fn next_data(answer: &mut Answer) -> Option<String> {
    let frame = tokio::time::timeout(Duration::from_secs(10), answer.frame())
        .await
        .expect("a frame comes without more being sent")?;
    let data = frame.expect("no error").into_data().expect("a data frame");
    Some(String::from_utf8(data.to_vec()).expect("UTF-8"))
}

#[tokio::test]
async fn chunks_read_together_come_as_one_frame_and_the_connection_goes_back() {
    let events: Vec<String> = (0..32).map(event).collect();
    let mut piece = HEAD.to_owned();
    for event in &events {
        piece += &chunk(event);
    }
    piece += "0\r\n\r\n";
    let (port, _gates, _upstream) = scripted_upstream(vec![piece]).await;
    let (mut answer, endpoint) = get(port).await;
    let first = next_data(&mut answer).await.expect("data");
    assert_eq!(
        first,
        events.concat(),
        "the 32 events already read are one frame"
    );
    assert!(answer.is_end_stream(), "the end was read with them");
    assert!(answer.frame().await.is_none(), "nothing after the end");
    assert_eq!(
        endpoint.idle(0).h1.len(),
        1,
        "the connection read to its end is back in the pool"
    );
}

#[tokio::test]
async fn an_event_that_comes_alone_is_handed_on_without_waiting_for_the_next() {
    let (first, second) = (event(1), event(2));
    let pieces = vec![
        format!("{HEAD}{}", chunk(&first)),
        format!("{}0\r\n\r\n", chunk(&second)),
    ];
    let (port, gates, _upstream) = scripted_upstream(pieces).await;
    let (mut answer, _endpoint) = get(port).await;
    // The upstream sends the second event only once the first was handed on.
    assert_eq!(next_data(&mut answer).await.as_deref(), Some(&first[..]));
    let mut gates = gates.into_iter();
    gates
        .next()
        .expect("gate")
        .send(())
        .expect("upstream waits");
    assert_eq!(next_data(&mut answer).await.as_deref(), Some(&second[..]));
    assert!(answer.frame().await.is_none(), "then the end");
}

#[tokio::test]
async fn data_read_before_a_broken_chunk_is_handed_on_before_the_error() {
    let (first, second) = (event(1), event(2));
    let piece = format!("{HEAD}{}{}zz\r\n", chunk(&first), chunk(&second));
    let (port, _gates, _upstream) = scripted_upstream(vec![piece]).await;
    let (mut answer, endpoint) = get(port).await;
    assert_eq!(
        next_data(&mut answer).await,
        Some(format!("{first}{second}")),
        "what came whole comes first, joined"
    );
    let after = answer.frame().await.expect("a frame");
    assert!(after.is_err(), "then the broken chunk's error");
    assert!(answer.frame().await.is_none(), "and nothing more");
    assert!(
        endpoint.idle(0).h1.is_empty(),
        "a broken connection is not given back"
    );
}

#[tokio::test]
async fn an_error_waits_one_turn_so_that_what_came_before_is_flushed_first() {
    // The head and a broken chunk in one read: the error must not be the body's first answer,
    // or hyper's server would abort the connection before flushing the head it buffered.
    let piece = format!("{HEAD}zz\r\n");
    let (port, _gates, _upstream) = scripted_upstream(vec![piece]).await;
    let (mut answer, _endpoint) = get(port).await;
    let woken = std::sync::Arc::new(Woken::default());
    let waker = std::task::Waker::from(woken.clone());
    let mut cx = Context::from_waker(&waker);
    let mut pending = 0;
    let error = loop {
        match Pin::new(&mut answer).poll_frame(&mut cx) {
            Poll::Ready(Some(Err(error))) => break error,
            Poll::Ready(other) => panic!("expected the error, got {:?}", other.map(|f| f.is_ok())),
            Poll::Pending => {
                pending += 1;
                assert!(pending < 1_000, "the error never came");
                tokio::task::yield_now().await;
            }
        }
    };
    drop(error);
    assert!(pending >= 1, "the error waited a turn");
    assert!(
        woken.0.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "and the task was woken for it, not left waiting"
    );
}

/// A waker that counts its wakes.
#[derive(Default)]
struct Woken(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Woken {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}
