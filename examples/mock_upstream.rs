//! Runs the deterministic mock OpenAI-compatible upstream used by the tests
//! and benches (the workspace's `mock-upstream` crate documents the routes and
//! the `x-mock-*` request headers it obeys).
//!
//! ```text
//! cargo run --example mock_upstream -- --listen 127.0.0.1:8000 [--prefix /openai] \
//!     [--close-after-stream] [--require-key KEY]
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use mock_upstream::{MockOptions, MockUpstream};

/// The mock OpenAI-compatible upstream, until Ctrl-C.
#[derive(Parser)]
#[command(name = "mock_upstream")]
struct Args {
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Serve under PREFIX/v1/... (e.g. /openai).
    #[arg(long, value_name = "PREFIX", default_value = "")]
    prefix: String,
    /// Close the connection after every SSE response (llama.cpp quirk).
    #[arg(long)]
    close_after_stream: bool,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long, value_name = "KEY")]
    require_key: Option<String>,
    /// Wait this many milliseconds before every answer (a slow replica).
    #[arg(long, value_name = "MS")]
    delay_ms: Option<u64>,
    /// Tokens generated when a request names no max_tokens (default 8).
    #[arg(long, value_name = "N")]
    default_tokens: Option<usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let opts = MockOptions {
        prefix: args.prefix,
        close_after_stream: args.close_after_stream,
        require_key: args.require_key,
        default_tokens: args.default_tokens,
        delay: args.delay_ms.map(std::time::Duration::from_millis),
        models: Vec::new(),
    };
    let mock = match MockUpstream::start_on(args.listen, opts).await {
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
