//! The `tollgate` subcommands, each behind one `run` function that `main` dispatches to after
//! parsing the arguments: [`demo`] (the gateway on a demo config, in front of a built-in model
//! server), [`serve`] (the gateway), [`check`] (validate a config and print what it would
//! enforce), [`keygen`] (a new key and its `[[keys]]` entry), [`keys`] (the managed keys of a
//! running gateway, through its admin API), [`report`] (`tollgate usage`, the usage report over
//! the ledger file, or over its PostgreSQL table with `report_sql`).
//!
//! Each prints its own errors (`tollgate: …` on stderr) and returns the process's exit code.

pub mod check;
pub mod demo;
pub mod keygen;
pub mod keys;
pub mod report;
mod report_sql;
pub mod serve;
pub mod usage;

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, DEFAULT_CONFIG};

/// The config at `path`, or the embedded default config; the error as the user reads it.
fn load(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => Config::parse(DEFAULT_CONFIG, "<embedded config/tollgate.toml>")
            .map_err(|e| e.to_string()),
    }
}

/// The control plane's runtime: signals, reloads, the admin port, state flushes. Client
/// connections are served by `server.workers` threads with runtimes of their own
/// (`server::worker`).
fn control_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("tollgate: cannot start the runtime: {error}");
            ExitCode::FAILURE
        })
}
