//! Runs the deterministic mock OpenAI-compatible upstream used by the tests
//! and benches (see `tests/common/upstream.rs` for the routes and the
//! `x-mock-*` request headers it obeys).
//!
//! ```text
//! cargo run --example mock_upstream -- --listen 127.0.0.1:8000 [--prefix /openai] \
//!     [--close-after-stream] [--require-key KEY]
//! ```

#[path = "../tests/common/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::process::ExitCode;

use upstream::{MockOptions, MockUpstream};

const USAGE: &str = "\
usage: mock_upstream [--listen ADDR] [--prefix PREFIX] [--close-after-stream] [--require-key KEY]

  --listen ADDR           address to listen on (default 127.0.0.1:8000)
  --prefix PREFIX         serve under PREFIX/v1/... (e.g. /openai)
  --close-after-stream    close the connection after every SSE response (llama.cpp quirk)
  --require-key KEY       require `Authorization: Bearer KEY`";

struct Args {
    listen: SocketAddr,
    opts: MockOptions,
}

enum Parsed {
    Run(Args),
    Help,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Parsed, String> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 8000));
    let mut opts = MockOptions::default();
    while let Some(arg) = args.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg, None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--listen" => {
                let v = value("--listen")?;
                listen = v
                    .parse()
                    .map_err(|e| format!("invalid --listen address {v:?}: {e}"))?;
            }
            "--prefix" => opts.prefix = value("--prefix")?,
            "--require-key" => opts.require_key = Some(value("--require-key")?),
            "--close-after-stream" => opts.close_after_stream = true,
            "-h" | "--help" => return Ok(Parsed::Help),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Parsed::Run(Args { listen, opts }))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mock = match MockUpstream::start_on(args.listen, args.opts).await {
        Ok(mock) => mock,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    // A long-running server must not keep every request in memory.
    mock.set_recording(false);
    println!("listening on {}", mock.url());
    if let Err(e) = tokio::signal::ctrl_c().await {
        eprintln!("error: cannot wait for Ctrl-C: {e}");
        return ExitCode::FAILURE;
    }
    println!(
        "shutting down after {} requests on {} connections",
        mock.request_count(),
        mock.connections()
    );
    ExitCode::SUCCESS
}
