//! The `tollgate` command: parse arguments, load the config, set up logging, run.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc: allocation and freeing were ~10 % of the gateway's CPU under load with the system
/// allocator (perf, bench/profile.sh); every request allocates its header maps and futures.
/// Built with `no_thp`: otherwise it asks for transparent huge pages on its arenas, and every
/// touched arena costs 2 MB of RSS (peak RSS at 64 streams 33–39 MB instead of 24).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tollgate::config::{is_valid_key_name, Config, DEFAULT_CONFIG};
use tollgate::keys::{generate_token, hash_token};
use tollgate::log_format::PlainText;
use tollgate::log_writer::{BatchedStdout, FlushGuard};
use tollgate::report::{self, GroupBy};
use tollgate::{Server, ServerOptions};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Reverse proxy and policy gateway for OpenAI-compatible model endpoints"
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line for machines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Config file; without it, the embedded default config (config/tollgate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print what it would enforce.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a new random key: print it once, and the [[keys]] entry that holds only its hash.
    Keygen {
        /// The key's name: its label in metrics and logs.
        #[arg(long)]
        name: String,
    },
    /// Report usage from the ledger: requests, tokens, errors and latency per key, model or day.
    Usage {
        /// The ledger file (`[ledger] path`), one JSON line per request; `-` reads stdin.
        #[arg(long)]
        ledger: PathBuf,
        /// Only requests that ended within this long before now (`7d`, `12h`, `30m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// One row per key, model, or UTC day.
        #[arg(long, value_enum, default_value_t = GroupBy::Key)]
        by: GroupBy,
        /// A table for the terminal, or CSV / JSON for scripts.
        #[arg(long, value_enum, default_value_t = report::Format::Table)]
        format: report::Format,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _flush_logs = match init_tracing(cli.log_format) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("tollgate: cannot start the log writer: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::Check { config } => check(&config),
        Command::Keygen { name } => keygen(&name),
        Command::Usage {
            ledger,
            since,
            by,
            format,
        } => usage(&ledger, since, by, format),
    }
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => Config::parse(DEFAULT_CONFIG, "<embedded config/tollgate.toml>")
            .map_err(|e| e.to_string()),
    }
}

fn serve(path: Option<PathBuf>) -> ExitCode {
    let config = match load(path.as_ref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tollgate: {error}");
            return ExitCode::FAILURE;
        }
    };
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // The control plane only: signals, reloads, the admin port, state flushes. Client
    // connections are served by `server.workers` threads with runtimes of their own (worker.rs).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tollgate: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let options = ServerOptions {
        config_path: path,
        ..ServerOptions::default()
    };
    let result = runtime.block_on(async {
        let server = Server::bind_with(config, options).await?;
        server.run(shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("tollgate: {error}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &PathBuf) -> ExitCode {
    let config = match load(Some(path)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tollgate: {error}");
            return ExitCode::FAILURE;
        }
    };
    let server = &config.server;
    let upstream = &config.upstream;
    println!("{}: ok", path.display());
    println!("  listen            {}", server.listen);
    println!(
        "  admin_listen      {}  (/metrics, /healthz, /readyz)",
        server.admin_listen
    );
    println!("  max_body_bytes    {}", server.max_body_bytes);
    println!("  shutdown_timeout  {:?}", server.shutdown_timeout);
    println!("  upstream          {}", upstream.base_url());
    println!(
        "  credential        {}",
        match (&upstream.api_key, &upstream.api_key_source) {
            (Some(_), Some(source)) => format!("from {source} (set)"),
            (None, Some(source)) => format!("from {source} (NOT SET)"),
            _ => "none: requests go upstream without Authorization".into(),
        }
    );
    println!(
        "  timeouts          connect {:?}, response headers {:?}, idle between frames {:?}",
        upstream.connect_timeout, upstream.response_header_timeout, upstream.idle_timeout
    );
    println!("  keys              {}", config.keys.len());
    for key in &config.keys {
        let concurrency = key
            .limits
            .concurrency
            .map_or("unlimited".to_owned(), |c| c.to_string());
        let rate = key.limits.rate.map_or("unlimited".to_owned(), |r| {
            format!(
                "{} per {} (burst {})",
                r.requests,
                humantime::format_duration(r.per),
                r.burst
            )
        });
        println!(
            "    {:<20} concurrency {concurrency}, rate {rate}",
            key.name
        );
    }
    for warning in config.warnings() {
        println!("warning: {warning}");
    }
    ExitCode::SUCCESS
}

/// The token goes to stderr (the terminal), the `[[keys]]` entry to stdout, so that
/// `tollgate keygen --name x >> tollgate.toml` stores the hash and never the key.
fn keygen(name: &str) -> ExitCode {
    if !is_valid_key_name(name) {
        eprintln!("tollgate: key name {name:?}: use 1-64 letters, digits, '-', '_' or '.'");
        return ExitCode::FAILURE;
    }
    let token = match generate_token() {
        Ok(token) => token,
        Err(_) => {
            eprintln!("tollgate: the system random source failed");
            return ExitCode::FAILURE;
        }
    };
    let digest = hex::encode(hash_token(token.as_bytes()));
    eprintln!("key for {name} (shown once; hand it to the client, store it nowhere):");
    eprintln!("{token}");
    println!("[[keys]]");
    println!("name = \"{name}\"");
    println!("sha256 = \"{digest}\"");
    ExitCode::SUCCESS
}

/// The report on stdout; malformed lines are counted on stderr. A missing or unreadable ledger
/// is an error (non-zero exit).
fn usage(path: &Path, since: Option<Duration>, by: GroupBy, format: report::Format) -> ExitCode {
    use std::io::Write;
    let input: Box<dyn std::io::Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        match std::fs::File::open(path) {
            Ok(file) => Box::new(file),
            Err(error) => {
                eprintln!(
                    "tollgate: cannot open the ledger {}: {error}",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
        }
    };
    let options = report::Options {
        by,
        since,
        now: SystemTime::now(),
    };
    let reader = std::io::BufReader::with_capacity(256 * 1024, input);
    let result = match report::aggregate(reader, &options) {
        Ok(result) => result,
        Err(error) => {
            eprintln!(
                "tollgate: cannot read the ledger {}: {error}",
                path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = report::write(&result, format, &mut out).and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        // `tollgate usage … | head` is not an error.
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(error) => {
            eprintln!("tollgate: cannot write the report: {error}");
            return ExitCode::FAILURE;
        }
    }
    if result.skipped > 0 {
        eprintln!(
            "tollgate: skipped {} malformed line{} (the first is line {})",
            result.skipped,
            if result.skipped == 1 { "" } else { "s" },
            result.first_skipped.unwrap_or(0)
        );
    }
    ExitCode::SUCCESS
}

/// Logs go to stdout through the batched writer (log_writer.rs); the guard writes out what is
/// still buffered when `main` returns.
fn init_tracing(format: LogFormat) -> std::io::Result<FlushGuard> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = BatchedStdout::start()?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text if ansi => builder.init(),
        LogFormat::Text => builder.event_format(PlainText).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(guard)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
