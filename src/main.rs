//! The `tollgate` command: parse the arguments, set up logging, and hand over to the subcommand
//! (`tollgate::cli`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// mimalloc: allocation and freeing were ~10 % of the gateway's CPU under load with the system
/// allocator (perf, bench/profile.sh); every request allocates its header maps and futures.
/// Built with `no_thp`: otherwise it asks for transparent huge pages on its arenas, and every
/// touched arena costs 2 MB of RSS (peak RSS at 64 streams 33–39 MB instead of 24).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tollgate::cli::demo::{self, DemoOptions};
use tollgate::cli::report::{self, GroupBy};
use tollgate::cli::usage;
use tollgate::cli::{check, keygen, keys, serve};
use tollgate::observability::{init_tracing, LogFormat};

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

#[derive(Subcommand)]
enum Command {
    /// Try the gateway: a demo config with two keys, in front of a built-in model server, until
    /// Ctrl-C. Prints the keys, lines to try, and the console's URL and token.
    Demo {
        /// The client port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The admin port: /metrics and the console (/ui/).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// A real model server (its base URL, as `upstream.url`) instead of the built-in one.
        #[arg(long, value_name = "URL")]
        upstream: Option<String>,
        /// The model the printed lines ask for.
        #[arg(long, default_value = "mock-model")]
        model: String,
    },
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
    /// Make, change, rotate and revoke keys of a running gateway, through its admin API (the
    /// admin token from TOLLGATE_ADMIN_TOKEN).
    Keys(keys::KeysArgs),
    /// Report usage from the ledger: requests, tokens, cost, errors and latency per key, group,
    /// model or day.
    Usage {
        /// The ledger file (`[ledger] path`), one JSON line per request; `-` reads stdin.
        #[arg(
            long,
            required_unless_present = "postgres_url_env",
            conflicts_with = "postgres_url_env"
        )]
        ledger: Option<PathBuf>,
        /// Report from the PostgreSQL ledger table instead: the environment variable holding its
        /// postgres:// URL (`[ledger] postgres_url_env`).
        #[arg(long, value_name = "VAR")]
        postgres_url_env: Option<String>,
        /// The ledger table (`[ledger] postgres_table`).
        #[arg(long, value_name = "TABLE", requires = "postgres_url_env")]
        table: Option<String>,
        /// Only requests that ended within this long before now (`7d`, `12h`, `30m`).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// One row per key, group, model, or UTC day.
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
        Command::Demo {
            listen,
            admin_listen,
            upstream,
            model,
        } => demo::run(DemoOptions {
            listen,
            admin_listen,
            upstream,
            model,
        }),
        Command::Serve { config } => serve::run(config),
        Command::Check { config } => check::run(&config),
        Command::Keygen { name } => keygen::run(&name),
        Command::Keys(args) => keys::run(args),
        Command::Usage {
            ledger,
            postgres_url_env,
            table,
            since,
            by,
            format,
        } => {
            let source = match (ledger, postgres_url_env) {
                (Some(path), _) => usage::Source::File(path),
                (None, Some(url_env)) => usage::Source::Postgres {
                    url_env,
                    table: table.unwrap_or_else(|| "tollgate_usage".to_owned()),
                },
                // clap requires one of the two.
                (None, None) => return ExitCode::FAILURE,
            };
            usage::run(&source, since, by, format)
        }
    }
}
