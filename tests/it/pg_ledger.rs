//! The ledger in PostgreSQL, through gateway processes as operators run them: rows equal to the
//! file's lines, the schema created, upgraded or refused, `tollgate usage` from the table equal
//! to the report from the file, an outage under two replicas that loses nothing and doubles
//! nothing, and a SIGKILL while the database is away.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bench_support::process::ChildGuard;
use mock_upstream::MockUpstream;
use serde_json::Value;

use crate::common::postgres_server::{connect, PrivatePostgres, TestDatabase};
use crate::common::{self, chat_body, key_entry, TEST_KEY};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
/// The environment variable the gateways under test read their URL from.
const URL_ENV: &str = "TOLLGATE_TEST_LEDGER_URL";

/// A gateway process with a PostgreSQL ledger (and `extra` more `[ledger]` lines).
struct Gateway {
    child: ChildGuard,
    addr: SocketAddr,
    admin: SocketAddr,
    spool: PathBuf,
}

impl Gateway {
    fn start(dir: &Path, upstream: &str, url: &str, extra: &str) -> Gateway {
        Gateway::start_env(dir, upstream, url, extra, &[])
    }

    /// With more environment variables.
    fn start_env(
        dir: &Path,
        upstream: &str,
        url: &str,
        extra: &str,
        env: &[(&str, &Path)],
    ) -> Gateway {
        std::fs::create_dir_all(dir).expect("the gateway's directory");
        let (addr, admin) = (free_addr(), free_addr());
        let spool = dir.join("spool");
        let config = format!(
            "[server]\nlisten = \"{addr}\"\nadmin_listen = \"{admin}\"\n[upstream]\nurl = \"{upstream}\"\n\
             [state]\npath = \"{}\"\n[ledger]\npostgres_url_env = \"{URL_ENV}\"\nspool_path = \"{}\"\n{extra}\n{}",
            dir.join("state.db").display(),
            spool.display(),
            key_entry("test", TEST_KEY, "")
        );
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, config).expect("write the config");
        let log = std::fs::File::create(dir.join("gateway.log")).expect("log file");
        let mut child = ChildGuard::spawn(
            Command::new(BIN)
                .args(["serve", "--config"])
                .arg(&path)
                .env(URL_ENV, url)
                .envs(env.iter().copied())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log),
        )
        .expect("start tollgate");
        if let Err(error) = child.wait_listening(admin, Duration::from_secs(20)) {
            let log = std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default();
            panic!("the gateway did not come up ({error}): {log}");
        }
        Gateway {
            child,
            addr,
            admin,
            spool,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/chat/completions", self.addr)
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
    }

    /// Until the spool is empty (the gauge at 0) and `rows` are in `table`, or `timeout`.
    async fn wait_sent(&self, client: &tokio_postgres::Client, rows: i64, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spooled = self.metric("tollgate_ledger_spooled_lines").await;
            if spooled == Some(0.0) && count(client).await >= rows {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill(self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.pid().to_string()])
            .status();
        // The guard's SIGTERM then finds the process gone.
        drop(self.child);
    }
}

fn free_addr() -> SocketAddr {
    bench_support::ports::free_addr().expect("a free port")
}

async fn count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM tollgate_usage", &[])
        .await
        .map_or(0, |row| row.get(0))
}

/// A database on the private server, made fresh.
async fn private_database(server: &PrivatePostgres) -> String {
    let admin = connect(&server.url()).await.expect("connect");
    admin
        .batch_execute("CREATE DATABASE ledger")
        .await
        .expect("create database");
    format!(
        "postgres://postgres@127.0.0.1:{}/ledger?sslmode=disable",
        server.port
    )
}

/// POSTs a chat request; its status.
async fn chat(client: &reqwest::Client, url: &str, headers: &[(&str, String)]) -> u16 {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(chat_body(false, false));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            match response.bytes().await {
                Ok(_) => status,
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    }
}

/// Every row, as JSON objects keyed by id (the table's own JSON of each row).
async fn rows_by_id(client: &tokio_postgres::Client) -> HashMap<String, Value> {
    client
        .query(
            "SELECT id::text, to_jsonb(u)::text FROM tollgate_usage u",
            &[],
        )
        .await
        .expect("select rows")
        .iter()
        .map(|row| {
            let json: String = row.get(1);
            let value = serde_json::from_str(&json).expect("a row as JSON");
            (row.get::<_, String>(0), value)
        })
        .collect()
}

#[tokio::test]
async fn each_request_is_one_row_equal_to_its_file_line_and_usage_reports_the_same_from_both() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("usage.jsonl");
    let gateway = Gateway::start(
        dir.path(),
        &upstream.url(),
        &db.url(),
        &format!("path = \"{}\"\nreplica = \"gw-test\"", file.display()),
    );
    let client = common::client();
    let mut statuses = Vec::new();
    for i in 0..24u32 {
        let mut headers = vec![
            ("x-mock-chunks", (i % 7 + 1).to_string()),
            ("x-mock-prompt-tokens", (i * 3).to_string()),
        ];
        // Two requests share a client's x-request-id: still two rows.
        if i == 3 || i == 4 {
            headers.push(("x-request-id", "client-chosen-id".to_owned()));
        }
        if i == 5 {
            headers.push(("x-mock-status", "503".to_owned()));
        }
        if i % 4 == 0 {
            headers.push(("x-mock-header-delay-ms", (i * 2).to_string()));
        }
        statuses.push(chat(&client, &gateway.url(), &headers).await);
    }
    let (stream_status, _, _) = common::post(&gateway.url(), &chat_body(true, true), &[]).await;
    assert_eq!(stream_status, 200);
    drop(gateway); // SIGTERM: every line written before exit

    let pg = db.client().await;
    let rows = rows_by_id(&pg).await;
    let lines = common::read_ledger(&file);
    assert_eq!(lines.len(), 25, "one file line per request: {statuses:?}");
    assert_eq!(
        rows.len(),
        upstream.request_count(),
        "one row per upstream request"
    );
    assert_eq!(rows.len(), lines.len(), "one row per line");
    for line in &lines {
        let id = line["id"].as_str().expect("every line has an id");
        let row = rows.get(id).expect("the line's row, by its id");
        for field in [
            "request_id",
            "key",
            "model",
            "endpoint",
            "status",
            "prompt_tokens",
            "completion_tokens",
            "source",
            "duration_ms",
            "ttft_ms",
            "outcome",
        ] {
            assert_eq!(row[field], line[field], "{field} of {id}");
        }
        let time = humantime::parse_rfc3339(line["time"].as_str().expect("time")).expect("rfc3339");
        let row_time: std::time::SystemTime = pg
            .query_one(
                "SELECT time FROM tollgate_usage WHERE id = $1::text::uuid",
                &[&id],
            )
            .await
            .expect("time")
            .get(0);
        assert_eq!(row_time, time, "time of {id}");
        assert_eq!(row["replica"], "gw-test");
        assert_eq!(row["group"], Value::Null, "no budgets on these lines");
    }
    let shared: Vec<_> = rows
        .values()
        .filter(|row| row["request_id"] == "client-chosen-id")
        .collect();
    assert_eq!(shared.len(), 2, "a shared x-request-id stays two rows");

    // The same report from the file and from the table, in every grouping and format.
    for by in ["key", "model", "day"] {
        for format in ["table", "csv", "json"] {
            for since in [None, Some("1h")] {
                let mut args = vec!["--by", by, "--format", format];
                args.extend(since.iter().flat_map(|s| ["--since", *s]));
                let from_file = usage(
                    &["--ledger", file.to_str().expect("utf-8")],
                    &args,
                    &db.url(),
                );
                let from_table = usage(
                    &["--postgres-url-env", URL_ENV, "--table", "tollgate_usage"],
                    &args,
                    &db.url(),
                );
                assert_eq!(
                    from_table, from_file,
                    "--by {by} --format {format} --since {since:?}"
                );
            }
        }
    }
}

/// `tollgate usage SOURCE ARGS`: its stdout (it must succeed).
fn usage(source: &[&str], args: &[&str], url: &str) -> String {
    let output = Command::new(BIN)
        .arg("usage")
        .args(source)
        .args(args)
        .env(URL_ENV, url)
        .output()
        .expect("run tollgate usage");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The first table tollgate made had no budgets or upstream columns: a newer gateway upgrades it and keeps
/// its rows; a version it does not know, or a table it did not make, stop the start.
#[tokio::test]
async fn an_older_table_is_upgraded_and_one_it_does_not_understand_stops_the_start() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let pg = db.client().await;
    pg.batch_execute(
        "CREATE TABLE tollgate_schema (table_name text PRIMARY KEY, version integer NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO tollgate_schema VALUES ('tollgate_usage', 1);
         CREATE TABLE tollgate_usage (id uuid PRIMARY KEY, time timestamptz NOT NULL, request_id text NOT NULL,
           replica text NOT NULL, key text NOT NULL, model text NOT NULL, endpoint text NOT NULL, status integer NOT NULL,
           prompt_tokens bigint NOT NULL, completion_tokens bigint NOT NULL, source text NOT NULL,
           duration_ms double precision NOT NULL, ttft_ms double precision, outcome text NOT NULL);
         INSERT INTO tollgate_usage VALUES (gen_random_uuid(), now(), 'old', 'gw-0', 'test', 'm', 'chat_completions', 200, 1, 2, 'reported', 1.5, NULL, 'complete');
         CREATE TABLE not_ours (id int);",
    )
    .await
    .expect("a version-1 table");
    // A spool left by a budgets-era gateway: sent at start, group and cost filled.
    let dir = tempfile::tempdir().expect("tempdir");
    let line = r#"{"id":"6f1c2f7e-2f57-4a53-9d55-0c8e6f0a1b2c","time":"2025-06-10T11:00:00.000Z","request_id":"spooled","key":"test","model":"m","endpoint":"chat_completions","status":200,"prompt_tokens":10,"completion_tokens":5,"source":"reported","duration_ms":12.5,"ttft_ms":null,"outcome":"complete","group":"team-a","cost":0.000123456}"#;
    std::fs::write(dir.path().join("spool"), format!("{line}\n")).expect("spool");
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let gateway = Gateway::start(dir.path(), &upstream.url(), &db.url(), "");
    gateway.wait_sent(&pg, 2, Duration::from_secs(20)).await;
    drop(gateway);
    let version: i32 = pg
        .query_one(
            "SELECT version FROM tollgate_schema WHERE table_name = 'tollgate_usage'",
            &[],
        )
        .await
        .expect("version")
        .get(0);
    assert_eq!(version, 3, "upgraded");
    let row = pg
        .query_one(
            "SELECT \"group\", cost::text, upstream FROM tollgate_usage WHERE request_id = 'spooled'",
            &[],
        )
        .await
        .expect("the spooled line is a row");
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("team-a"));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("0.000123456"),
        "cost exact"
    );
    assert_eq!(
        row.get::<_, Option<String>>(2),
        None,
        "a line from before upstream pools names none"
    );
    assert_eq!(count(&pg).await, 2, "the old row is kept");
    assert_eq!(
        std::fs::metadata(dir.path().join("spool"))
            .expect("spool")
            .len(),
        0,
        "the spool is emptied once sent"
    );

    pg.batch_execute("UPDATE tollgate_schema SET version = 99")
        .await
        .expect("a newer version");
    let refused = serve_output(dir.path(), &upstream.url(), &db.url(), "");
    assert!(
        refused.contains("schema version 99, newer than this tollgate knows (3)"),
        "{refused}"
    );
    let foreign = serve_output(
        dir.path(),
        &upstream.url(),
        &db.url(),
        "postgres_table = \"not_ours\"",
    );
    assert!(
        foreign.contains("a table not_ours exists that tollgate did not make"),
        "{foreign}"
    );
}

/// `tollgate serve` that must fail at start: its stderr.
fn serve_output(dir: &Path, upstream: &str, url: &str, extra: &str) -> String {
    let config = format!(
        "[server]\nlisten = \"{}\"\nadmin_listen = \"{}\"\n[upstream]\nurl = \"{upstream}\"\n\
         [state]\npath = \"{}\"\n[ledger]\npostgres_url_env = \"{URL_ENV}\"\nspool_path = \"{}\"\n{extra}\n",
        free_addr(),
        free_addr(),
        dir.join("state.db").display(),
        dir.join("spool-refused").display(),
    );
    let path = dir.join("refused.toml");
    std::fs::write(&path, config).expect("config");
    let output = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env(URL_ENV, url)
        .output()
        .expect("run tollgate serve");
    assert!(!output.status.success(), "the start stops");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// 3,000 requests through two replicas while their PostgreSQL is stopped for seconds and comes
/// back: every request once in the table, the tokens the upstream reported, empty spools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_under_two_replicas_loses_nothing_and_doubles_nothing() {
    const REQUESTS: u64 = 3_000;
    let Some(server) = PrivatePostgres::start() else {
        return;
    };
    let url = private_database(&server).await;
    let upstream = MockUpstream::start().await.expect("mock upstream");
    upstream.set_recording(false);
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let replicas: Vec<Gateway> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            Gateway::start(
                dir.path(),
                &upstream.url(),
                &url,
                &format!("replica = \"gw-{i}\""),
            )
        })
        .collect();
    let urls: Vec<String> = replicas.iter().map(Gateway::url).collect();

    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|worker| {
            let (done, failed, next) = (done.clone(), failed.clone(), next.clone());
            let url = urls[worker % 2].clone();
            tokio::spawn(async move {
                let client = common::client();
                while next.fetch_add(1, Ordering::SeqCst) < REQUESTS {
                    let n = done.load(Ordering::SeqCst);
                    let headers = [
                        ("x-mock-chunks", (n % 13 + 1).to_string()),
                        ("x-mock-prompt-tokens", (n % 29 + 1).to_string()),
                    ];
                    if chat(&client, &url, &headers).await != 200 {
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    // About 500 requests a second: the outage falls in the middle of the run.
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        })
        .collect();
    while done.load(Ordering::SeqCst) < REQUESTS / 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .expect("stop");
    let at_stop = done.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spooled_while_down = replicas[0]
        .metric("tollgate_ledger_spooled_lines")
        .await
        .unwrap_or(0.0);
    let at_restart = done.load(Ordering::SeqCst);
    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .expect("restart");
    for client in clients {
        client.await.expect("client task");
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no request failed");
    assert!(
        at_restart > at_stop,
        "requests were answered while PostgreSQL was down ({at_stop} → {at_restart}): none waited for it"
    );
    assert!(
        spooled_while_down > 0.0,
        "replica gw-0 spooled while PostgreSQL was down"
    );

    let pg = connect(&url).await.expect("connect");
    for replica in &replicas {
        replica
            .wait_sent(&pg, REQUESTS as i64, Duration::from_secs(60))
            .await;
    }
    let errors = replicas[0]
        .metric("tollgate_ledger_errors_total{reason=\"postgres\"}")
        .await;
    for (replica, dir) in replicas.into_iter().zip(&dirs) {
        let spool = replica.spool.clone();
        drop(replica);
        assert_eq!(
            std::fs::metadata(&spool).expect("spool").len(),
            0,
            "spool empty"
        );
        let log = std::fs::read_to_string(dir.path().join("gateway.log")).expect("log");
        let said = |text: &str| log.matches(text).count();
        assert_eq!(
            (
                said("cannot write the ledger to PostgreSQL"),
                said("PostgreSQL takes the ledger again")
            ),
            (1, 1),
            "the outage logged once when it starts and once when it ends: {log}"
        );
    }
    assert!(
        errors.is_some_and(|n| n > 0.0),
        "failed writes counted: {errors:?}"
    );
    let row = pg
        .query_one(
            "SELECT count(*), count(DISTINCT id), sum(prompt_tokens)::int8, sum(completion_tokens)::int8,
                    count(DISTINCT replica) FROM tollgate_usage",
            &[],
        )
        .await
        .expect("sums");
    let (reported_prompt, reported_completion) = upstream.reported_tokens();
    assert_eq!(
        row.get::<_, i64>(0) as usize,
        upstream.request_count(),
        "one row per upstream request"
    );
    assert_eq!(row.get::<_, i64>(0), REQUESTS as i64);
    assert_eq!(row.get::<_, i64>(1), REQUESTS as i64, "no id twice");
    assert_eq!(
        row.get::<_, i64>(2) as u64,
        reported_prompt,
        "prompt tokens as the upstream reported"
    );
    assert_eq!(
        row.get::<_, i64>(3) as u64,
        reported_completion,
        "completion tokens too"
    );
    assert_eq!(row.get::<_, i64>(4), 2, "both replicas wrote");
    drop(server);
}

/// A replica killed while PostgreSQL is away loses only what it had not spooled yet; its
/// restart sends the spool, and sending the same spool again doubles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_while_postgres_is_away_loses_only_the_unspooled_and_never_doubles() {
    let Some(server) = PrivatePostgres::start() else {
        return;
    };
    let url = private_database(&server).await;
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = Gateway::start(dir.path(), &upstream.url(), &url, "");
    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .expect("stop");
    // Requests in flight until the very moment of the kill.
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (answered, stop, url) = (answered.clone(), stop.clone(), gateway.url());
            tokio::spawn(async move {
                let client = common::client();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let id = format!("w{worker}-{n}");
                    if chat(&client, &url, &[("x-request-id", id)]).await == 200 {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    while answered.load(Ordering::SeqCst) < 400 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let spool = gateway.spool.clone();
    gateway.kill();
    stop.store(true, Ordering::SeqCst);
    for task in load {
        let _ = task.await;
    }
    let answered = answered.load(Ordering::SeqCst);
    let spooled = std::fs::read_to_string(&spool).expect("spool");
    let spooled_lines = spooled.lines().count() as u64;
    let kept = dir.path().join("spool-at-kill");
    std::fs::write(&kept, &spooled).expect("keep a copy");

    let server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .expect("restart");
    let pg = connect(&url).await.expect("connect");
    let restarted = Gateway::start(dir.path(), &upstream.url(), &url, "");
    restarted
        .wait_sent(&pg, spooled_lines as i64, Duration::from_secs(30))
        .await;
    drop(restarted);
    let rows = count(&pg).await as u64;
    let lost = answered - rows.min(answered);
    println!("SIGKILL while PostgreSQL was away: {answered} answered, {spooled_lines} spooled, {rows} rows, {lost} lost");
    assert!(spooled_lines > 0, "the outage spooled lines");
    assert_eq!(
        rows, spooled_lines,
        "every spooled line is a row after the restart"
    );
    assert!(
        rows <= answered,
        "no row for a request that was not answered"
    );

    // The same spool sent once more (a crash just before it was emptied): nothing twice.
    std::fs::copy(&kept, &spool).expect("put the spool back");
    let again = Gateway::start(dir.path(), &upstream.url(), &url, "");
    again
        .wait_sent(&pg, rows as i64, Duration::from_secs(30))
        .await;
    drop(again);
    let distinct: HashSet<String> = rows_by_id(&pg)
        .await
        .into_values()
        .map(|row| row["request_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(count(&pg).await as u64, rows, "no row doubled");
    assert_eq!(distinct.len() as u64, rows, "each request once");
    drop(server);
}

/// TLS to PostgreSQL: with the server's certificate trusted (`SSL_CERT_FILE`) the rows arrive
/// over an encrypted connection; with it untrusted the gateway still serves, spooling, and says
/// why it cannot connect.
#[tokio::test]
async fn the_ledger_speaks_tls_to_postgres_and_refuses_an_untrusted_certificate() {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let Some(server) =
        PrivatePostgres::start_tls(&made.cert.pem(), &made.signing_key.serialize_pem())
    else {
        return;
    };
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=require",
        server.port
    );
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, made.cert.pem()).expect("write the CA");

    let trusted = dir.path().join("trusted");
    let gateway = Gateway::start_env(
        &trusted,
        &upstream.url(),
        &url,
        "",
        &[("SSL_CERT_FILE", ca.as_path())],
    );
    let client = common::client();
    for _ in 0..3 {
        assert_eq!(chat(&client, &gateway.url(), &[]).await, 200);
    }
    let pg = connect(&server.url()).await.expect("connect");
    gateway.wait_sent(&pg, 3, Duration::from_secs(20)).await;
    let encrypted: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'tollgate' AND s.ssl",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get(0);
    drop(gateway);
    assert_eq!(count(&pg).await, 3, "the rows arrived");
    assert_eq!(encrypted, 1, "over TLS");

    let untrusted = dir.path().join("untrusted");
    let gateway = Gateway::start_env(
        &untrusted,
        &upstream.url(),
        &url,
        "",
        &[("SSL_CERT_FILE", Path::new("/nonexistent"))],
    );
    assert_eq!(
        chat(&client, &gateway.url(), &[]).await,
        200,
        "requests go on"
    );
    let mut spooled = None;
    for _ in 0..100 {
        spooled = gateway.metric("tollgate_ledger_spooled_lines").await;
        if spooled == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(gateway);
    assert_eq!(spooled, Some(1.0), "the line waits in the spool");
    assert_eq!(
        count(&pg).await,
        3,
        "nothing written without a trusted certificate"
    );
    let log = std::fs::read_to_string(untrusted.join("gateway.log")).expect("log");
    assert!(log.contains("invalid peer certificate"), "{log}");
}
