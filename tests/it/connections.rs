//! Client connections over real sockets: what an idle, a surplus or a greedy connection costs,
//! what a client that writes before it reads sees, the header cap, an upstream that took a
//! request and failed.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mock_upstream::MockUpstream;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::{self, chat_body, TestGateway, TEST_KEY};

const CHAT: &str = "/v1/chat/completions";
const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
const MIB: usize = 1024 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame, and the ACK of the peer's.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
const H2_SETTINGS_ACK: &[u8] = &[0, 0, 0, 4, 1, 0, 0, 0, 0];

async fn gateway(server: &str) -> (MockUpstream, TestGateway) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway =
        TestGateway::start_toml(&common::config_toml(&upstream.url(), server, "", "")).await;
    (upstream, gateway)
}

/// Reads until the peer closes (`Some(bytes)`), or `None` if it is still open after `wait`.
async fn closed_within(socket: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(bytes),
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one answer with a `content-length` (all the gateway's own have one), whether or not
/// the connection closes after it.
async fn read_answer(socket: &mut TcpStream, wait: Duration) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = find(&bytes, b"\r\n\r\n") {
            let length = content_length(&bytes[..end]);
            if bytes.len() >= end + 4 + length {
                return bytes;
            }
        }
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) | Ok(Ok(0) | Err(_)) => return bytes,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .unwrap_or(0)
}

fn head(bytes: &[u8]) -> String {
    let end = find(bytes, b"\r\n\r\n").unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn body(bytes: &[u8]) -> &[u8] {
    find(bytes, b"\r\n\r\n").map_or(&[][..], |end| &bytes[end + 4..])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The error shape every gateway-made answer has.
fn assert_error_shape(what: &str, status: u16, bytes: &[u8]) {
    let value: Value = serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", String::from_utf8_lossy(bytes)));
    assert_eq!(value["status"], status, "{what}: {value}");
    assert!(value["title"].is_string(), "{what}: {value}");
    assert!(value["error"]["message"].is_string(), "{what}: {value}");
}

fn get_models() -> Vec<u8> {
    format!("GET /v1/models HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {TEST_KEY}\r\n\r\n")
        .into_bytes()
}

// === idle connections ===

#[tokio::test]
async fn http2_connections_that_open_no_stream_are_closed_after_header_read_timeout() {
    let (upstream, gateway) = gateway("header_read_timeout = \"1s\"").await;
    // The preface and SETTINGS, then silence; and the same with the handshake completed.
    for complete in [false, true] {
        let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
        socket
            .write_all(&[H2_PREFACE, H2_SETTINGS].concat())
            .await
            .expect("send");
        if complete {
            let mut buf = [0u8; 9];
            socket.read_exact(&mut buf).await.expect("server SETTINGS");
            assert_eq!(buf[3], 4, "the gateway speaks h2 first with SETTINGS");
            socket.write_all(H2_SETTINGS_ACK).await.expect("send ACK");
        }
        let started = Instant::now();
        let closed = closed_within(&mut socket, Duration::from_secs(5)).await;
        assert!(
            closed.is_some(),
            "an h2 connection (handshake complete: {complete}) that opened no stream is closed \
             within header_read_timeout; still open after 5 s"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "not closed before the timeout: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn keep_alive_connections_with_nothing_in_flight_are_closed_after_idle_timeout() {
    let (_upstream, gateway) =
        gateway("header_read_timeout = \"10s\"\nidle_timeout = \"1s\"").await;
    let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
    socket.write_all(&get_models()).await.expect("send");
    let mut buf = vec![0u8; 64 * 1024];
    let n = socket.read(&mut buf).await.expect("answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", head(&buf[..n]));
    let closed = closed_within(&mut socket, Duration::from_secs(4)).await;
    assert!(
        closed.is_some(),
        "an idle keep-alive connection is closed after idle_timeout (1 s), not at \
         header_read_timeout (10 s)"
    );

    // A stream that lasts longer than idle_timeout is in flight all along: it is not cut.
    let response = common::client()
        .post(format!("{}{CHAT}", gateway.url()))
        .header("x-mock-chunks", "4")
        .header("x-mock-chunk-delay-ms", "600")
        .header("content-type", "application/json")
        .body(chat_body(true, false))
        .send()
        .await
        .expect("stream starts");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("the whole stream");
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "stream complete: {text}"
    );
}

// === the connection cap ===

#[tokio::test]
async fn connections_past_max_connections_are_closed_at_once() {
    let (_upstream, gateway) = gateway("max_connections = 3\nworkers = 2").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
        // A request answered proves the connection was accepted and counted.
        socket.write_all(&get_models()).await.expect("send");
        let mut buf = vec![0u8; 64 * 1024];
        let n = socket.read(&mut buf).await.expect("answer");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", head(&buf[..n]));
        held.push(socket);
    }
    let mut surplus = TcpStream::connect(gateway.addr).await.expect("connect");
    let _ = surplus.write_all(&get_models()).await;
    let answer = closed_within(&mut surplus, Duration::from_secs(2)).await;
    assert_eq!(
        answer.as_deref(),
        Some(&[][..]),
        "the fourth connection is closed at once, unanswered"
    );
    drop(held.pop());
    // The freed place is given to the next connection (the close takes a moment to be seen).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
        let _ = socket.write_all(&get_models()).await;
        let answer = closed_within(&mut socket, Duration::from_millis(500)).await;
        let bytes = match answer {
            None => break,
            Some(bytes) => bytes,
        };
        if bytes.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "a freed place is never reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gateway as a child process with only `nofile` descriptors; returns it and its ports.
async fn spawn_with_nofile(
    upstream: &str,
    nofile: u32,
    server: &str,
) -> (std::process::Child, u16, u16, tempfile::NamedTempFile) {
    let port = common::closed_port();
    let admin_port = common::closed_port();
    let mut config = tempfile::NamedTempFile::new().expect("temp file");
    std::io::Write::write_all(
        &mut config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nworkers = 2\n{server}\n\
             [upstream]\nurl = \"{upstream}\"\n[state]\npath = \"{}\"\n{}",
            common::state_path().display(),
            common::key_entry("test", TEST_KEY, "")
        )
        .as_bytes(),
    )
    .expect("write config");
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(BIN)
        .args(["serve", "--config"])
        .arg(config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway under prlimit");
    let client = common::client();
    for _ in 0..200 {
        if client
            .get(format!("http://127.0.0.1:{admin_port}/healthz"))
            .send()
            .await
            .is_ok()
        {
            return (child, port, admin_port, config);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("output");
    panic!(
        "the gateway did not come up under prlimit: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn out_of_descriptors_the_gateway_backs_off_logs_once_and_serves_again() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    // The cap is far above the descriptor limit, so the descriptors run out first.
    let (mut child, port, _admin, _config) = spawn_with_nofile(
        &upstream.url(),
        64,
        "max_connections = 1000\nheader_read_timeout = \"30s\"",
    )
    .await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut flood = Vec::new();
    for _ in 0..120 {
        match TcpStream::connect(addr).await {
            Ok(socket) => flood.push(socket),
            Err(_) => break,
        }
    }
    // Descriptors are exhausted for a while: accept fails over and over.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        child.try_wait().expect("wait").is_none(),
        "the gateway survives running out of descriptors"
    );
    drop(flood);

    let url = format!("http://127.0.0.1:{port}{CHAT}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let attempt = common::client()
            .post(&url)
            .header("content-type", "application/json")
            .body(chat_body(false, false))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match attempt {
            Ok(response) => break response.status().as_u16(),
            Err(error) => {
                assert!(Instant::now() < deadline, "never served again: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(status, 200, "the gateway serves again");
    let _ = child.kill();
    let output = child.wait_with_output().expect("output");
    let log = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let lines = log.lines().filter(|l| l.contains("accept failed")).count();
    assert!(
        (1..=4).contains(&lines),
        "one log line per episode of failing accepts, not one per attempt: {lines} lines\n{log}"
    );
}

// === the header cap ===

#[tokio::test]
async fn header_sections_past_max_header_bytes_get_a_431_in_the_error_shape() {
    let (upstream, gateway) = gateway("").await;
    let big = "v".repeat(100 * 1024);
    // HTTP/1.1: a 100 KiB header is within hyper's buffer, past the default 64 KiB cap.
    let request = format!(
        "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {TEST_KEY}\r\n\
         content-type: application/json\r\nx-big: {big}\r\ncontent-length: {}\r\n\r\n{}",
        chat_body(false, false).len(),
        chat_body(false, false)
    );
    let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
    socket.write_all(request.as_bytes()).await.expect("send");
    let answer = read_answer(&mut socket, Duration::from_secs(5)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "HTTP/1.1: {}",
        head(&answer)
    );
    assert_error_shape("HTTP/1.1", 431, body(&answer));

    // HTTP/2: past the cap is a 431 in the error shape; 32 KiB (past h2's usual 16 KiB) passes.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("h2 client");
    let send = |value: String| {
        h2.post(format!("{}{CHAT}", gateway.url()))
            .header("authorization", format!("Bearer {TEST_KEY}"))
            .header("content-type", "application/json")
            .header("x-big", value)
            .body(chat_body(false, false))
            .send()
    };
    let response = send(big.clone()).await.expect("h2 answer");
    assert_eq!(response.status(), 431, "HTTP/2");
    let bytes = response.bytes().await.expect("body");
    assert_error_shape("HTTP/2", 431, &bytes);
    let response = send("v".repeat(32 * 1024)).await.expect("h2 answer");
    assert_eq!(response.status(), 200, "HTTP/2 within the cap");
    assert_eq!(
        upstream.request_count(),
        1,
        "only the request within the cap"
    );
}

// === the 413 a client sees after sending its whole body ===

#[tokio::test]
async fn a_client_that_sends_its_whole_body_before_reading_sees_the_413() {
    let (upstream, gateway) = gateway("max_body_bytes = 1048576").await;
    let oversized = vec![b'x'; 8 * MIB];
    for chunked in [false, true] {
        let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
        let framing = if chunked {
            "transfer-encoding: chunked".to_owned()
        } else {
            format!("content-length: {}", oversized.len())
        };
        let head_bytes = format!(
            "POST {CHAT} HTTP/1.1\r\nhost: g\r\nauthorization: Bearer {TEST_KEY}\r\n\
             content-type: application/json\r\n{framing}\r\n\r\n"
        );
        let mut request = head_bytes.into_bytes();
        if chunked {
            for chunk in oversized.chunks(64 * 1024) {
                request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                request.extend_from_slice(chunk);
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"0\r\n\r\n");
        } else {
            request.extend_from_slice(&oversized);
        }
        // Like Python's http.client: the whole request first, then the answer.
        let written = socket.write_all(&request).await;
        assert!(
            written.is_ok(),
            "chunked {chunked}: the gateway took the whole body: {written:?}"
        );
        let answer = read_answer(&mut socket, Duration::from_secs(10)).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 413"),
            "chunked {chunked}: the client reads the 413: {}",
            head(&answer)
        );
        assert_error_shape("413", 413, body(&answer));
    }
    assert_eq!(upstream.request_count(), 0);
}

#[tokio::test]
async fn python_http_client_sees_the_413() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 not found; skipped");
        return;
    }
    let (_upstream, gateway) = gateway("max_body_bytes = 1048576").await;
    let script = format!(
        "import http.client\n\
         c = http.client.HTTPConnection('127.0.0.1', {port}, timeout=20)\n\
         c.request('POST', '{CHAT}', body=b'x' * (8 * 1024 * 1024), headers={{'authorization': 'Bearer {TEST_KEY}', 'content-type': 'application/json'}})\n\
         r = c.getresponse()\n\
         print(r.status)\n\
         print(r.read().decode())\n",
        port = gateway.addr.port()
    );
    let output =
        tokio::task::spawn_blocking(move || Command::new("python3").args(["-c", &script]).output())
            .await
            .expect("join")
            .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.starts_with("413\n"),
        "http.client reads the 413: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_error_shape("python", 413, stdout["413\n".len()..].trim().as_bytes());
}

// === an upstream that took the request and failed ===

/// An upstream that reads each request whole and closes without a byte of answer.
struct SwallowingUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl SwallowingUpstream {
    async fn start() -> SwallowingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        let Some(end) = find(&seen, b"\r\n\r\n") else {
                            continue;
                        };
                        if seen.len() >= end + 4 + content_length(&seen[..end]) {
                            r.fetch_add(1, Ordering::SeqCst);
                            // The request is in; close without answering.
                            return;
                        }
                    }
                });
            }
        });
        SwallowingUpstream {
            addr,
            connections,
            requests,
        }
    }
}

#[tokio::test]
async fn a_request_the_upstream_received_is_never_sent_again() {
    let upstream = SwallowingUpstream::start().await;
    let gateway = TestGateway::start(&format!("http://{}", upstream.addr)).await;
    let (status, _, bytes) = common::post(
        &format!("{}{CHAT}", gateway.url()),
        &chat_body(false, false),
        &[],
    )
    .await;
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&bytes));
    assert_error_shape("502", 502, &bytes);
    assert_eq!(
        (
            upstream.requests.load(Ordering::SeqCst),
            upstream.connections.load(Ordering::SeqCst)
        ),
        (1, 1),
        "the upstream got the request once, on one connection"
    );
}
