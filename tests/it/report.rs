//! `tollgate usage`: the report over a ledger of known content, in each format, run as a user
//! would run it.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

/// When a line happened: 10 minutes ago (inside `--since 7d`), or a fixed old time.
#[derive(Clone, Copy)]
enum When {
    Recent,
    At(&'static str),
}

/// time, key, model, status, prompt, completion, source, duration_ms, ttft_ms, outcome.
type Entry = (
    When,
    &'static str,
    &'static str,
    u16,
    u64,
    u64,
    &'static str,
    f64,
    Option<f64>,
    &'static str,
);

#[rustfmt::skip]
const ENTRIES: [Entry; 7] = [
    (When::Recent, "alice", "m1", 200, 100, 50, "reported", 120.0, None, "complete"),
    (When::Recent, "alice", "m1", 200, 200, 100, "reported", 250.0, Some(40.0), "complete"),
    // The client left: an error, charged an estimate.
    (When::Recent, "alice", "m2", 200, 10, 30, "estimated", 900.0, Some(35.0), "client_gone"),
    // An upstream error status passed through: an error.
    (When::Recent, "bob", "m1", 503, 0, 0, "reported", 15.0, None, "complete"),
    // The upstream broke off mid-stream: an error, estimated.
    (When::Recent, "bob", "m2", 200, 20, 20, "estimated", 1500.0, Some(300.0), "upstream_error"),
    (When::At("2024-01-15T08:00:00.000Z"), "alice", "m1", 200, 1000, 500, "reported", 60.0, None, "complete"),
    // 2345.6 ms and 1234.5 ms show as 2340 and 1230: 3 significant digits.
    (When::At("2024-01-16T23:59:59.999Z"), "carol", "m2", 200, 40, 60, "reported", 2345.6, Some(1234.5), "complete"),
];

/// The ledger: the entries, with malformed and blank lines among them; returns the recent
/// lines' UTC day.
fn write_ledger(path: &Path) -> String {
    let recent = SystemTime::now() - Duration::from_secs(600);
    let recent = humantime::format_rfc3339_millis(recent).to_string();
    let mut lines: Vec<String> = ENTRIES
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let time = match e.0 {
                When::Recent => recent.clone(),
                When::At(time) => time.to_owned(),
            };
            // Groups as a config would give them; costs at 1 and 2 per million tokens, written
            // as the gateway writes them (an exact decimal); carol's line predates both fields.
            let group = if e.1 == "carol" { None } else { Some("team-a") };
            let mut line = json!({
                "time": time, "request_id": format!("r{i}"), "key": e.1, "group": group,
                "model": e.2, "endpoint": "chat_completions", "status": e.3,
                "prompt_tokens": e.4, "completion_tokens": e.5, "source": e.6,
                "duration_ms": e.7, "ttft_ms": e.8, "outcome": e.9,
            })
            .to_string();
            if e.1 != "carol" {
                line = line.replace(
                    "\"endpoint\"",
                    &format!(
                        "\"cost\":{},\"endpoint\"",
                        nano_text(e.4 * 1000 + e.5 * 2000)
                    ),
                );
            } else {
                line = line.replace("\"group\":null,", "");
            }
            line
        })
        .collect();
    let malformed = [
        (2, "this is not json".to_owned()),
        (
            4,
            r#"{"time":"2024-01-15T08:00:00.000Z","key":"alice""#.to_owned(),
        ),
        (6, lines[0].replace("\"status\":200", "\"status\":\"200\"")),
        (8, lines[0].replace(&recent, "last tuesday")),
        (9, String::new()),
    ];
    for (at, line) in malformed {
        lines.insert(at, line);
    }
    std::fs::write(path, lines.join("\n") + "\n").expect("write the ledger");
    recent[..10].to_owned()
}

/// Nano-units as the ledger writes them: an exact decimal without trailing zeros.
fn nano_text(nano: u64) -> String {
    let fraction = format!("{:09}", nano % 1_000_000_000);
    let fraction = fraction.trim_end_matches('0');
    if fraction.is_empty() {
        (nano / 1_000_000_000).to_string()
    } else {
        format!("{}.{fraction}", nano / 1_000_000_000)
    }
}

/// Runs `tollgate usage --ledger PATH ARGS…`: (success, stdout, stderr).
fn usage(ledger: &Path, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("usage")
        .arg("--ledger")
        .arg(ledger)
        .args(args)
        .output()
        .expect("run tollgate usage");
    (
        output.status.success(),
        String::from_utf8(output.stdout).expect("utf-8 stdout"),
        String::from_utf8(output.stderr).expect("utf-8 stderr"),
    )
}

fn ledger() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.jsonl");
    let today = write_ledger(&path);
    (dir, path, today)
}

#[test]
fn the_table_by_key_has_exact_figures_a_total_row_and_counts_malformed_lines() {
    let (_dir, path, _) = ledger();
    let (ok, stdout, stderr) = usage(&path, &[]);
    assert!(ok, "{stderr}");
    // alice: durations 60, 120, 250, 900 → p50 120, p99 900; 1 error of 4; 40 of 1990 tokens
    // estimated; 1310 × 1000 + 680 × 2000 nano-units. total: 3 errors of 7; 80 of 2130 tokens
    // estimated; carol's line has no cost.
    let expected = "\
key    requests  errors  error_pct  prompt_tokens  completion_tokens         cost  estimated_pct  p50_ms  p99_ms  ttft_p50_ms  ttft_p99_ms
-----  --------  ------  ---------  -------------  -----------------  -----------  -------------  ------  ------  -----------  -----------
alice         4       1       25.0           1310                680  0.002670000            2.0     120     900           35           40
bob           2       2      100.0             20                 20  0.000060000          100.0      15    1500          300          300
carol         1       0        0.0             40                 60  0.000000000            0.0    2340    2340         1230         1230
-----  --------  ------  ---------  -------------  -----------------  -----------  -------------  ------  ------  -----------  -----------
total         7       3       42.9           1370                760  0.002730000            3.8     250    2340           40         1230
";
    assert_eq!(stdout, expected);
    assert!(
        stderr.contains("skipped 4 malformed lines (the first is line 3)"),
        "blank lines are not malformed: {stderr}"
    );
}

#[test]
fn since_leaves_out_older_lines() {
    let (_dir, path, _) = ledger();
    let (ok, stdout, stderr) = usage(&path, &["--since", "7d"]);
    assert!(ok, "{stderr}");
    // alice: 120, 250, 900; 40 of 490 tokens estimated. total: 15, 120, 250, 900, 1500.
    let expected = "\
key    requests  errors  error_pct  prompt_tokens  completion_tokens         cost  estimated_pct  p50_ms  p99_ms  ttft_p50_ms  ttft_p99_ms
-----  --------  ------  ---------  -------------  -----------------  -----------  -------------  ------  ------  -----------  -----------
alice         3       1       33.3            310                180  0.000670000            8.2     250     900           35           40
bob           2       2      100.0             20                 20  0.000060000          100.0      15    1500          300          300
-----  --------  ------  ---------  -------------  -----------------  -----------  -------------  ------  ------  -----------  -----------
total         5       3       60.0            330                200  0.000730000           15.1     250    1500           40          300
";
    assert_eq!(stdout, expected);
}

#[test]
fn csv_by_day_parses_with_a_header_and_empty_fields_for_missing_figures() {
    let (_dir, path, today) = ledger();
    let (ok, stdout, stderr) = usage(&path, &["--by", "day", "--format", "csv"]);
    assert!(ok, "{stderr}");
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header row").split(',').collect();
    assert_eq!(
        header.join(","),
        "day,requests,errors,error_pct,prompt_tokens,completion_tokens,cost,estimated_pct,\
         p50_ms,p99_ms,ttft_p50_ms,ttft_p99_ms"
    );
    let records: Vec<HashMap<&str, &str>> = lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), header.len(), "{line}");
            header.iter().copied().zip(fields).collect()
        })
        .collect();
    let days: Vec<&str> = records.iter().map(|r| r["day"]).collect();
    assert_eq!(
        days,
        ["2024-01-15", "2024-01-16", today.as_str()],
        "days in order, no total row"
    );
    let figures = |r: &HashMap<&str, &str>| -> Vec<String> {
        header[1..].iter().map(|h| r[h].to_owned()).collect()
    };
    // No stream on 2024-01-15: empty time-to-first-token fields.
    assert_eq!(
        figures(&records[0]).join(","),
        "1,0,0.0,1000,500,0.002000000,0.0,60,60,,"
    );
    assert_eq!(
        figures(&records[1]).join(","),
        "1,0,0.0,40,60,0.000000000,0.0,2340,2340,1230,1230"
    );
    assert_eq!(
        figures(&records[2]).join(","),
        "5,3,60.0,330,200,0.000730000,15.1,250,1500,40,300"
    );
}

#[test]
fn json_by_model_is_an_array_of_objects() {
    let (_dir, path, _) = ledger();
    let (ok, stdout, stderr) = usage(&path, &["--by", "model", "--format", "json"]);
    assert!(ok, "{stderr}");
    let rows: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(
        rows,
        json!([
            {
                "model": "m1", "requests": 4, "errors": 1, "error_pct": 25.0,
                "prompt_tokens": 1300, "completion_tokens": 650, "cost": 0.0026, "estimated_pct": 0.0,
                "p50_ms": 60.0, "p99_ms": 250.0, "ttft_p50_ms": 40.0, "ttft_p99_ms": 40.0
            },
            {
                "model": "m2", "requests": 3, "errors": 2, "error_pct": 66.67,
                "prompt_tokens": 70, "completion_tokens": 110, "cost": 0.00013, "estimated_pct": 44.44,
                "p50_ms": 1500.0, "p99_ms": 2340.0, "ttft_p50_ms": 300.0, "ttft_p99_ms": 1230.0
            }
        ])
    );
}

#[test]
fn the_ledger_can_come_on_stdin() {
    use std::io::Write;
    use std::process::Stdio;
    let (_dir, path, _) = ledger();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["usage", "--ledger", "-", "--since", "7d", "--format", "csv"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tollgate usage");
    let ledger = std::fs::read(&path).expect("read the ledger");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&ledger)
        .expect("write stdin");
    let output = child.wait_with_output().expect("finish");
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    assert_eq!(
        stdout.lines().skip(1).collect::<Vec<_>>(),
        [
            "alice,3,1,33.3,310,180,0.000670000,8.2,250,900,35,40",
            "bob,2,2,100.0,20,20,0.000060000,100.0,15,1500,300,300"
        ]
    );
}

#[test]
fn by_group_sums_each_teams_cost_exactly_and_puts_keys_without_one_under_none() {
    let (_dir, path, _) = ledger();
    let (ok, stdout, stderr) = usage(&path, &["--by", "group", "--format", "csv"]);
    assert!(ok, "{stderr}");
    let rows: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        rows,
        [
            "group,requests,errors,error_pct,prompt_tokens,completion_tokens,cost,estimated_pct,p50_ms,p99_ms,ttft_p50_ms,ttft_p99_ms",
            "(none),1,0,0.0,40,60,0.000000000,0.0,2340,2340,1230,1230",
            "team-a,6,3,50.0,1330,700,0.002730000,3.9,120,1500,40,300",
        ]
    );
}

#[test]
fn a_missing_ledger_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.jsonl");
    let (ok, stdout, stderr) = usage(&path, &[]);
    assert!(!ok, "non-zero exit");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("cannot open the ledger") && stderr.contains("nope.jsonl"),
        "{stderr}"
    );
    let (ok, _, stderr) = usage(&path, &["--since", "a week"]);
    assert!(!ok, "a bad --since is refused: {stderr}");
}
