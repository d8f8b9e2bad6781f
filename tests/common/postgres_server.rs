//! PostgreSQL for the ledger's tests: a database of the test's own on the machine's server
//! (127.0.0.1:5432, trust auth, user `postgres`), dropped when the test ends; or a private
//! server (`initdb` + `pg_ctl` from the installed PostgreSQL, run as the `postgres` user) on a
//! free port, that the test can stop and start again. Under CI (`CI` set) a missing PostgreSQL
//! is a failure, not a skip: `.ci/run` installs and starts it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The machine's server, where [`TestDatabase`] makes its databases.
const SHARED: &str = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable";

/// Fails under CI, says the test skips outside it, when PostgreSQL is not there.
fn unavailable(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("PostgreSQL must be available under CI: {what}");
    }
    eprintln!("PostgreSQL unavailable ({what}); skipping outside CI");
}

/// Connects with the test's plain client (no TLS: loopback).
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A database of this test's own on the machine's server, dropped on drop.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub async fn create() -> Option<TestDatabase> {
        let admin = match connect(SHARED).await {
            Ok(client) => client,
            Err(error) => {
                unavailable(&format!("{SHARED}: {error}"));
                return None;
            }
        };
        let name = format!("tollgate_test_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        Some(TestDatabase { name })
    }

    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:5432/{}?sslmode=disable",
            self.name
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url())
            .await
            .expect("connect to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime: a thread of its own with a runtime of its own.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                if let Ok(admin) = connect(SHARED).await {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// A PostgreSQL server of the test's own, in a temporary directory, on a free port.
pub struct PrivatePostgres {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    /// More server settings (`-c name=value …`).
    options: String,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Initialises and starts one, or returns `None` (outside CI) without PostgreSQL.
    pub fn start() -> Option<PrivatePostgres> {
        PrivatePostgres::start_with(None)
    }

    /// One that speaks TLS with this certificate and key (PEM).
    pub fn start_tls(cert: &str, key: &str) -> Option<PrivatePostgres> {
        PrivatePostgres::start_with(Some((cert, key)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Option<PrivatePostgres> {
        let Some(bin) = server_bin() else {
            unavailable("no initdb under /usr/lib/postgresql/*/bin");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // initdb refuses to run as root: the directory is the postgres user's.
        if running_as_root() {
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(chown.success(), "chown the server's directory to postgres");
        }
        let mut server = PrivatePostgres {
            port: super::closed_port(),
            bin,
            data,
            options: String::new(),
            _dir: dir,
        };
        let init = server
            .as_postgres(&server.bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&server.data)
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(init.success(), "initdb");
        if let Some((cert, key)) = tls {
            let (cert_path, key_path) = (
                server.data.join("server.crt"),
                server.data.join("server.key"),
            );
            std::fs::write(&cert_path, cert).expect("write the certificate");
            std::fs::write(&key_path, key).expect("write the key");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod the key");
            if running_as_root() {
                let chown = Command::new("chown")
                    .arg("postgres:postgres")
                    .args([&cert_path, &key_path])
                    .status()
                    .expect("chown");
                assert!(chown.success(), "chown the certificate to postgres");
            }
            server.options =
                " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key".to_owned();
        }
        server.pg_ctl(&["start", "-w"]);
        Some(server)
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Stops it (fast: connections are cut) and waits until it is down.
    pub fn stop(&self) {
        self.pg_ctl(&["stop", "-m", "fast", "-w"]);
    }

    /// Starts it again on the same port, with the same data.
    pub fn restart(&self) {
        self.pg_ctl(&["start", "-w"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off{}",
            self.port,
            self.data.display(),
            self.options
        );
        let status = self
            .as_postgres(&self.bin.join("pg_ctl"))
            .args(args)
            .arg("-D")
            .arg(&self.data)
            .args(["-o", &options, "-l"])
            .arg(self.data.join("server.log"))
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(status.success(), "pg_ctl {args:?}");
    }

    /// `program`, as the postgres user when this runs as root.
    fn as_postgres(&self, program: &Path) -> Command {
        if running_as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The installed server's bin directory (the newest version).
fn server_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists() && bin.join("pg_ctl").exists())
        .collect();
    versions.sort();
    versions.pop()
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}
