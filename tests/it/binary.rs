//! The `tollgate` binary itself: config checking, and signals on a real process.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::upstream::MockUpstream;
use crate::common::{self, chat_body};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(text.as_bytes()).expect("write config");
    file
}

#[test]
fn check_accepts_the_shipped_config_and_names_key_and_line_of_errors() {
    let shipped = Command::new(BIN)
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/tollgate.toml"),
        ])
        .output()
        .expect("run check");
    assert!(
        shipped.status.success(),
        "shipped config passes: {shipped:?}"
    );
    let out = String::from_utf8_lossy(&shipped.stdout);
    assert!(
        out.contains("upstream          http://127.0.0.1:8000"),
        "{out}"
    );

    let bad = write_config("[server]\nlisten = \"127.0.0.1:1\"\n\n[upstream]\nurl = \"http://a\"\nconect_timeout = \"1s\"\n");
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(bad.path())
        .output()
        .expect("run check");
    assert!(!output.status.success(), "a bad config exits non-zero");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains(":6: upstream.conect_timeout"),
        "key and line named: {err}"
    );

    let missing = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/tollgate.toml"])
        .output()
        .expect("run serve");
    assert!(!missing.status.success(), "a missing config exits non-zero");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read config"));
}

#[tokio::test]
async fn sigterm_drains_a_running_stream_then_exits_cleanly() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let port = common::closed_port();
    let admin_port = common::closed_port();
    let config = write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nshutdown_timeout = \"10s\"\n[upstream]\nurl = \"{}\"\n[state]\npath = \"{}\"\n{}",
        upstream.url(),
        common::state_path().display(),
        common::key_entry("test", common::TEST_KEY, "")
    ));
    let child = Command::new(BIN)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gateway");

    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let client = common::client();
    let mut ready = false;
    for _ in 0..100 {
        if client
            .get(format!("http://127.0.0.1:{admin_port}/healthz"))
            .send()
            .await
            .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "gateway came up");

    let response = client
        .post(&url)
        .header("x-mock-chunks", "8")
        .header("x-mock-chunk-delay-ms", "100")
        .header("content-type", "application/json")
        .body(chat_body(true, false))
        .send()
        .await
        .expect("stream starts");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let body = response
        .bytes()
        .await
        .expect("stream finishes after SIGTERM");
    assert!(
        String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"),
        "stream complete"
    );

    let exit = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("gateway exits");
    assert!(exit.status.success(), "clean exit after drain: {exit:?}");
    let log = String::from_utf8_lossy(&exit.stdout);
    assert!(
        log.contains("\"target\":\"tollgate::access\""),
        "JSON access log written: {log}"
    );
    assert!(log.contains("SIGTERM received"), "{log}");
}

#[tokio::test]
async fn sighup_reloads_keys_in_a_running_process() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let port = common::closed_port();
    let admin_port = common::closed_port();
    let state = common::state_path();
    let config_for = |name: &str, token: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n[upstream]\nurl = \"{}\"\n[state]\npath = \"{}\"\n{}",
            upstream.url(),
            state.display(),
            common::key_entry(name, token, "")
        )
    };
    let config = write_config(&config_for("old1", "tg-old1"));
    let reference = write_config(&config_for("old1", "tg-old1"));
    // Keep the same length and modification time, so that only the signal can trigger a reload.
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(config.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gateway");
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let status_with = |token: &'static str| {
        let request = client
            .post(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(chat_body(false, false))
            .send();
        async move { request.await.map(|r| r.status().as_u16()).unwrap_or(0) }
    };
    let mut up = false;
    for _ in 0..100 {
        if status_with("tg-old1").await == 200 {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "gateway serves the old key");

    std::fs::write(config.path(), config_for("new1", "tg-new1")).expect("rewrite config");
    let touched = Command::new("touch")
        .arg("-r")
        .arg(reference.path())
        .arg(config.path())
        .status()
        .expect("touch");
    assert!(touched.success());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status_with("tg-new1").await,
        401,
        "no reload without the signal"
    );

    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("send SIGHUP");
    assert!(hup.success());
    let mut reloaded = false;
    for _ in 0..100 {
        if status_with("tg-new1").await == 200 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reloaded, "SIGHUP applied the new key");
    assert_eq!(
        status_with("tg-old1").await,
        401,
        "the removed key is refused"
    );

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let output = tokio::task::spawn_blocking(move || {
        let _ = child.wait();
        let mut log = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut log);
        }
        log
    })
    .await
    .expect("join");
    assert!(output.contains("config reloaded"), "{output}");
    assert!(
        output.contains("SIGHUP"),
        "reload was triggered by the signal: {output}"
    );
}
