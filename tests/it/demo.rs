//! `tollgate demo` as a newcomer runs it: the binary starts on free ports, every curl line it
//! prints works as printed (run by a shell, with the system's curl), its metrics and console
//! URLs answer, and Ctrl-C (SIGINT) ends it cleanly, leaving no state behind.

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// Runs one printed line in a shell; its stdout.
async fn run_line(line: &str) -> String {
    let output = Command::new("bash")
        .args(["-c", line])
        .output()
        .await
        .expect("bash runs");
    assert!(
        output.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}

/// The text after `label` on the banner's line that starts with it, up to the next space.
fn after<'a>(banner: &'a str, label: &str) -> &'a str {
    banner
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {label:?} in the banner:\n{banner}"))
}

#[tokio::test]
async fn the_demo_starts_its_printed_lines_work_and_ctrl_c_ends_it() {
    assert!(
        std::process::Command::new("curl")
            .arg("--version")
            .output()
            .is_ok(),
        "the demo's lines need curl (.ci/run installs it)"
    );
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("tollgate demo starts");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut banner = String::new();
    while let Some(line) = stdout.next_line().await.expect("read stdout") {
        banner.push_str(&line);
        banner.push('\n');
        if line.starts_with("Ctrl-C stops the demo") {
            break;
        }
    }
    // The access log follows on stdout; read it so the demo never blocks on a full pipe.
    let log = tokio::spawn(async move {
        let mut log = String::new();
        while let Ok(Some(line)) = stdout.next_line().await {
            log.push_str(&line);
            log.push('\n');
        }
        log
    });

    let lines: Vec<&str> = banner
        .lines()
        .filter(|l| l.starts_with("curl ") || l.starts_with("for "))
        .collect();
    assert_eq!(lines.len(), 3, "three lines to try:\n{banner}");

    let answer: Value = serde_json::from_str(&run_line(lines[0]).await).expect("a JSON answer");
    assert_eq!(answer["object"], "chat.completion", "{answer}");
    assert!(answer["usage"]["total_tokens"]
        .as_u64()
        .is_some_and(|t| t > 0));

    let stream = run_line(lines[1]).await;
    assert!(
        stream.starts_with("data: {") && stream.ends_with("data: [DONE]\n\n"),
        "a stream of events: {stream}"
    );

    let refusal = run_line(lines[2]).await;
    let codes: Vec<&str> = refusal
        .lines()
        .filter_map(|l| l.rsplit(" -> ").next())
        .collect();
    assert_eq!(codes, ["200", "200", "200", "429"], "{refusal}");
    assert!(
        refusal.contains("rate_limit_exceeded"),
        "the refusal says why: {refusal}"
    );

    let metrics = reqwest::get(after(&banner, "Metrics:"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for series in [
        // The tight key's model by name: its allow-list names it.
        "tollgate_requests_total{endpoint=\"completions\",key=\"demo-tight\",model=\"mock-model\",status=\"200\"} 3",
        // Refused by the rate before the body (and its model) was read.
        "tollgate_requests_total{endpoint=\"completions\",key=\"demo-tight\",model=\"other\",status=\"429\"} 1",
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    let console = after(&banner, "Console:");
    let token = banner
        .lines()
        .find(|l| l.starts_with("Console:"))
        .and_then(|l| l.rsplit(' ').next())
        .expect("the admin token ends the console's line");
    assert!(token.starts_with("admin-"), "{banner}");
    let page = reqwest::get(console).await.expect("console");
    assert_eq!(page.status(), 200);
    let keys: Value = reqwest::Client::new()
        .get(console.replace("/ui/", "/admin/keys"))
        .bearer_auth(token)
        .send()
        .await
        .expect("admin API")
        .json()
        .await
        .expect("JSON");
    let names: Vec<&str> = keys["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["demo-open", "demo-tight"]);
    let used = keys["keys"][1]["windows"][0]["used"].as_u64().unwrap_or(0);
    assert!(
        used > 0,
        "the tight key's three answers are charged: {keys}"
    );

    let state = banner_state_dir(&child);
    let interrupted = std::process::Command::new("kill")
        .args(["-INT", &child.id().expect("running").to_string()])
        .status()
        .expect("send SIGINT");
    assert!(interrupted.success());
    let status = child.wait().await.expect("the demo exits");
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        tokio::io::AsyncReadExt::read_to_string(&mut err, &mut stderr)
            .await
            .expect("stderr");
    }
    assert!(status.success(), "Ctrl-C ends the demo cleanly: {stderr}");
    assert!(stderr.contains("tollgate demo: stopped"), "{stderr}");
    let log = log.await.expect("log reader");
    assert!(log.contains("SIGINT received"), "{log}");
    assert!(
        !state.exists(),
        "the demo's state is removed at exit: {}",
        state.display()
    );
}

/// The folder the demo keeps its state in (named by its process id).
fn banner_state_dir(child: &tokio::process::Child) -> std::path::PathBuf {
    let pid = child.id().expect("running");
    let prefix = format!("tollgate-demo-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .expect("temp dir")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .unwrap_or_else(|| panic!("the demo keeps its state in {prefix}…"))
}
