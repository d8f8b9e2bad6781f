use std::path::Path;

use super::*;
use crate::accounting::ledger::sample_entry;

fn file_only(path: &Path) -> LedgerConfig {
    LedgerConfig {
        path: Some(path.to_owned()),
        postgres: None,
    }
}

#[tokio::test]
async fn every_line_is_on_disk_after_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ledger").join("usage.jsonl");
    let ledger = Ledger::open(&file_only(&path), Arc::new(Metrics::new()))
        .await
        .expect("open");
    let entries: Vec<Arc<LedgerEntry>> = (0..1000).map(|n| Arc::new(sample_entry(n))).collect();
    for entry in &entries {
        ledger.record(entry);
    }
    ledger.close(Duration::from_secs(5));
    let text = std::fs::read_to_string(&path).expect("read");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 1000, "every line written");
    assert_eq!(lines[999]["prompt_tokens"], 999, "in order");
    assert_eq!(
        lines[999]["id"],
        entries[999].id.to_string(),
        "each line has its request's id"
    );
}

#[tokio::test]
async fn a_reopen_after_a_rename_starts_a_new_file_in_line_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.jsonl");
    let ledger = Ledger::open(&file_only(&path), Arc::new(Metrics::new()))
        .await
        .expect("open");
    for n in 0..10 {
        ledger.record(&Arc::new(sample_entry(n)));
    }
    std::fs::rename(&path, dir.path().join("usage.jsonl.1")).expect("rotate");
    ledger.reopen();
    for n in 10..15 {
        ledger.record(&Arc::new(sample_entry(n)));
    }
    ledger.close(Duration::from_secs(5));
    let tokens = |name: &str| -> Vec<u64> {
        std::fs::read_to_string(dir.path().join(name))
            .expect("read")
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
                v["prompt_tokens"].as_u64().expect("tokens")
            })
            .collect()
    };
    assert_eq!(
        tokens("usage.jsonl.1"),
        (0..10).collect::<Vec<_>>(),
        "before the reopen"
    );
    assert_eq!(
        tokens("usage.jsonl"),
        (10..15).collect::<Vec<_>>(),
        "after it"
    );
}

#[tokio::test]
async fn open_names_what_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "").expect("write");
    let error = Ledger::open(
        &file_only(&blocker.join("usage.jsonl")),
        Arc::new(Metrics::new()),
    )
    .await
    .err()
    .expect("a file is no directory");
    assert!(
        matches!(error, LedgerError::CreateDir { .. }),
        "typed: {error:?}"
    );
    assert!(
        error.to_string().contains("cannot create the directory"),
        "{error}"
    );
}

#[tokio::test]
async fn a_full_disk_is_counted_not_fatal() {
    // /dev/full accepts the open and fails every write with ENOSPC.
    if !Path::new("/dev/full").exists() {
        return;
    }
    let metrics = Arc::new(Metrics::new());
    let ledger = Ledger::open(&file_only(Path::new("/dev/full")), metrics.clone())
        .await
        .expect("open");
    for n in 0..10 {
        ledger.record(&Arc::new(sample_entry(n)));
    }
    ledger.close(Duration::from_secs(5));
    let text = String::from_utf8(metrics.render()).expect("utf-8");
    assert!(
        text.contains("tollgate_ledger_errors_total{reason=\"write\"} 10"),
        "every lost line counted: {text}"
    );
}

/// The lines of the ledger file at `path`, once it has `n` (waiting boundedly for the writer).
fn wait_for_lines(path: &Path, n: usize) -> usize {
    let deadline = Instant::now() + WRITE_INTERVAL * 40;
    loop {
        let lines = std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
        if lines >= n || Instant::now() >= deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test]
async fn lines_reach_the_file_on_the_writers_timer_also_after_it_went_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("usage.jsonl");
    let ledger = Ledger::open(&file_only(&path), Arc::new(Metrics::new()))
        .await
        .expect("open");
    // While lines come, the writer takes them on its timer (no request wakes it).
    for n in 0..3 {
        ledger.record(&Arc::new(sample_entry(n)));
    }
    assert_eq!(wait_for_lines(&path, 3), 3, "on disk without a close");
    // Quiet for longer than IDLE_AFTER: the writer sleeps until a line wakes it.
    std::thread::sleep(IDLE_AFTER + WRITE_INTERVAL * 2);
    ledger.record(&Arc::new(sample_entry(3)));
    assert_eq!(
        wait_for_lines(&path, 4),
        4,
        "the first line after a quiet spell"
    );
    ledger.close(Duration::from_secs(5));
    assert_eq!(wait_for_lines(&path, 4), 4, "nothing doubled by the close");
}
