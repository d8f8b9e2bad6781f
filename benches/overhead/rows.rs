//! Starting the rows: the direct row needs nothing; a tollgate row is a child process on a
//! config written for it, an nginx row a child on `bench/nginx.conf` filled in. A row that fails
//! to start stops the bench, except nginx, which is skipped with a note. Every child is stopped
//! when its row is dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bench_support::ports::free_addr;
use bench_support::process::{file_tail, ChildGuard};
use bench_support::procfs::{children_of, status_kb, Procs};
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;

use crate::client::{connect, exchange, Endpoint};
use crate::mock::Mock;
use crate::options::Options;
use crate::targets::{Kind, Target, Variant, MOCK_URL, TARGETS, UPSTREAM_KEY, UPSTREAM_KEY_ENV};

const NGINX_TEMPLATE: &str = include_str!("../../bench/nginx.conf");

/// A running row.
pub struct Row {
    pub name: &'static str,
    /// A tollgate row of this build: the goals are checked on it.
    pub gateway: bool,
    pub ep: Arc<Endpoint>,
    /// The proxy's processes; `None` for the direct row.
    pub procs: Option<Procs>,
    pub describe: String,
    /// Where the proxy's access log goes.
    pub log: Option<PathBuf>,
    _child: Option<ChildGuard>,
}

/// Whether `target` runs with these options.
fn wanted(target: &Target, opts: &Options) -> bool {
    match (&target.kind, &opts.only) {
        (Kind::Direct, _) => true,
        (Kind::OldBinary(_), _) => opts.old_bin.is_some(),
        (_, None) => target.by_default,
        (_, Some(only)) => only.iter().any(|name| name == target.name),
    }
}

/// Starts every row these options want, in table order. Returns the rows and a note for each
/// row that was skipped (for the report's header).
pub async fn start_all(
    opts: &Options,
    mock: &Mock,
    dir: &Path,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for target in TARGETS.iter().filter(|t| wanted(t, opts)) {
        let headers = target
            .headers
            .iter()
            .map(|(name, value)| {
                Ok((
                    HeaderName::from_bytes(name.as_bytes())?,
                    HeaderValue::from_str(value)?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .with_context(|| format!("row {}: headers", target.name))?;
        let tollgate = |variant, bin: &Path, this_build| Tollgate {
            name: target.name,
            variant,
            bin: bin.to_owned(),
            this_build,
        };
        let start = match &target.kind {
            Kind::Direct => {
                rows.push(Row {
                    name: target.name,
                    gateway: false,
                    ep: Arc::new(Endpoint::new(mock.addr, headers)),
                    procs: None,
                    describe: format!("{}  the mock upstream itself (baseline)", mock.addr),
                    log: None,
                    _child: None,
                });
                continue;
            }
            Kind::Nginx { endpoints } => {
                let nginx = Nginx {
                    name: target.name,
                    endpoints: *endpoints,
                };
                rows.extend(
                    nginx
                        .start_or_skip(headers, opts, mock, dir, &mut skipped)
                        .await,
                );
                continue;
            }
            Kind::Tollgate(variant) => {
                tollgate(variant, Path::new(env!("CARGO_BIN_EXE_tollgate")), true)
            }
            Kind::OldBinary(variant) => {
                let bin = opts.old_bin.as_deref().context("no --old-bin")?;
                tollgate(variant, bin, false)
            }
        };
        let row = start
            .start(headers, opts, mock, dir)
            .await
            .with_context(|| format!("row {}", target.name))?;
        rows.push(row);
    }
    Ok((rows, skipped))
}

fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A tollgate row to start.
struct Tollgate<'a> {
    name: &'static str,
    variant: &'a Variant,
    bin: PathBuf,
    /// The binary this bench was built with (else `--old-bin`'s).
    this_build: bool,
}

impl Tollgate<'_> {
    async fn start(
        self,
        headers: Vec<(HeaderName, HeaderValue)>,
        opts: &Options,
        mock: &Mock,
        dir: &Path,
    ) -> anyhow::Result<Row> {
        let Tollgate {
            name,
            variant,
            bin,
            this_build,
        } = self;
        let home = dir.join(safe_name(name));
        fs::create_dir_all(&home)?;
        let listen = free_addr()?;
        let admin = free_addr()?;
        let upstream = match variant.endpoints {
            1 => format!("[upstream]\nurl = \"{}\"\n", mock.url),
            n => {
                let endpoints: Vec<String> = mock.replicas[..n]
                    .iter()
                    .map(|addr| format!("\"http://{addr}\""))
                    .collect();
                format!(
                    "[[upstreams]]\nname = \"bench\"\nmodels = [\"*\"]\nendpoints = [{}]\n",
                    endpoints.join(", ")
                )
            }
        };
        let config = format!(
            "# Written by benches/overhead/ for row {name:?}.\n\
             [server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n{server}\n\
             {upstream}api_key_env = \"{UPSTREAM_KEY_ENV}\"\n{lines}\n\
             {tables}",
            server = variant.server,
            lines = variant.upstream,
            tables = (variant.tables)().replace(MOCK_URL, &mock.url),
        );
        let config_path = home.join("tollgate.toml");
        fs::write(&config_path, config)?;
        let log = home.join("tollgate.log");
        let out = fs::File::create(&log)?;
        // RUST_LOG is set either way, so that the caller's environment cannot change what is
        // measured.
        let rust_log = if opts.access_log() { "info" } else { "warn" };
        let mut child = ChildGuard::spawn(
            Command::new(&bin)
                .arg("serve")
                .arg("--config")
                .arg(&config_path)
                .current_dir(&home)
                .env("RUST_LOG", rust_log)
                .env(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out),
        )
        .with_context(|| format!("cannot start {}", bin.display()))?;
        let ep = Arc::new(Endpoint::new(listen, headers));
        if let Err(error) = wait_ready(&ep, &mut child).await {
            let tail = file_tail(&log, 20);
            bail!(
                "tollgate did not come up: {error:#}\n--- {} ---\n{tail}",
                log.display()
            );
        }
        let pid = child.pid();
        let binary = if this_build {
            String::new()
        } else {
            format!("{}, ", bin.display())
        };
        Ok(Row {
            name,
            gateway: this_build,
            ep,
            procs: Some(Procs { pids: vec![pid] }),
            describe: format!(
                "{listen}  pid {pid}, {binary}{} threads, RUST_LOG={rust_log}: {}",
                status_kb(pid, "Threads").map_or("?".to_owned(), |n| n.to_string()),
                if opts.access_log() {
                    "access log ON, one line per request to a file"
                } else {
                    "access log off"
                }
            ),
            log: Some(log),
            _child: Some(child),
        })
    }
}

fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("nginx"))
        .find(|candidate| candidate.is_file())
}

/// An nginx row to start: in front of the mock, or of its first `endpoints` replicas.
struct Nginx {
    name: &'static str,
    endpoints: usize,
}

impl Nginx {
    /// The row, or `None` with a note in `skipped` when nginx is not installed or does not start.
    async fn start_or_skip(
        self,
        headers: Vec<(HeaderName, HeaderValue)>,
        opts: &Options,
        mock: &Mock,
        dir: &Path,
        skipped: &mut Vec<String>,
    ) -> Option<Row> {
        let name = self.name;
        let Some(bin) = find_nginx() else {
            skipped.push(format!(
                "row {name}: nginx is not installed (e.g. `apt-get install -y nginx`): skipped"
            ));
            return None;
        };
        match self.start(&bin, headers, opts, mock, dir).await {
            Ok(row) => Some(row),
            Err(error) => {
                skipped.push(format!(
                    "row {name}: nginx did not start: {error:#}: skipped"
                ));
                None
            }
        }
    }

    /// The `upstream` block's `server` lines, and its balance (`least_conn` for a pool).
    fn servers(&self, mock: &Mock) -> String {
        let servers: Vec<String> = mock.replicas[..self.endpoints]
            .iter()
            .map(|addr| format!("server {addr};"))
            .collect();
        let balance = if self.endpoints > 1 {
            "least_conn;\n        "
        } else {
            ""
        };
        format!("{balance}{}", servers.join("\n        "))
    }

    async fn start(
        self,
        bin: &Path,
        headers: Vec<(HeaderName, HeaderValue)>,
        opts: &Options,
        mock: &Mock,
        dir: &Path,
    ) -> anyhow::Result<Row> {
        let name = self.name;
        let home = dir.join(safe_name(name));
        fs::create_dir_all(&home)?;
        let listen = free_addr()?;
        let log = home.join("access.log");
        let access_log = if opts.access_log() {
            format!("{} combined", log.display())
        } else {
            "off".to_owned()
        };
        let config = NGINX_TEMPLATE
            .replace("@WORKERS@", &opts.nginx_workers)
            .replace("@DIR@", &home.display().to_string())
            .replace("@ACCESS_LOG@", &access_log)
            .replace("@SERVERS@", &self.servers(mock))
            .replace("@LISTEN@", &listen.to_string())
            .replace("@UPSTREAM_KEY@", UPSTREAM_KEY);
        let config_path = home.join("nginx.conf");
        fs::write(&config_path, config)?;
        let stderr_path = home.join("stderr.log");
        let mut child = ChildGuard::spawn(
            Command::new(bin)
                .arg("-p")
                .arg(&home)
                .arg("-e")
                .arg(home.join("error.log"))
                .arg("-c")
                .arg(&config_path)
                .args(["-g", "daemon off;"])
                .current_dir(&home)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&stderr_path)?),
        )
        .with_context(|| format!("cannot run {}", bin.display()))?;
        if let Err(error) = wait_ready(&Endpoint::new(listen, Vec::new()), &mut child).await {
            let errors = format!(
                "{}{}",
                file_tail(&stderr_path, 10),
                file_tail(&home.join("error.log"), 10)
            );
            bail!("{error:#}\n{errors}");
        }
        let master = child.pid();
        let workers = children_of(master);
        let version = Command::new(bin)
            .arg("-v")
            .output()
            .ok()
            .map(|out| String::from_utf8_lossy(&out.stderr).trim().to_owned())
            .and_then(|v| v.rsplit(' ').next().map(str::to_owned))
            .unwrap_or_else(|| "nginx".to_owned());
        let describe = format!(
        "{listen}  {version}, master pid {master} + {} worker(s) {:?} (worker_processes {}), {}",
        workers.len(),
        workers,
        opts.nginx_workers,
        if opts.access_log() {
            "access_log ON (combined) to a file"
        } else {
            "access_log off"
        }
    );
        let mut pids = vec![master];
        pids.extend(workers);
        Ok(Row {
            name,
            gateway: false,
            ep: Arc::new(Endpoint::new(listen, headers)),
            procs: Some(Procs { pids }),
            describe,
            log: opts.access_log().then_some(log),
            _child: Some(child),
        })
    }
}

/// Until `GET /v1/models` through the row answers 200, the child exits, or 15 s pass.
async fn wait_ready(ep: &Endpoint, child: &mut ChildGuard) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last_error = anyhow!("no answer yet");
    while Instant::now() < deadline {
        if let Some(status) = child.exited() {
            bail!("exited with {status}");
        }
        let attempt = async {
            let mut sender = connect(ep.addr).await?;
            let (status, _) = exchange(&mut sender, ep.get_models()).await?;
            anyhow::Ok(status)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(StatusCode::OK)) => return Ok(()),
            Ok(Ok(status)) => last_error = anyhow!("GET /v1/models answered {status}"),
            Ok(Err(error)) => last_error = error,
            Err(_) => last_error = anyhow!("GET /v1/models timed out"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last_error)
}
