//! `tollgate serve`: load the config, start the control-plane runtime, and run the [`Server`]
//! until SIGTERM or SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::server::{Server, ServerOptions};

pub fn run(path: Option<PathBuf>) -> ExitCode {
    let config = match super::load(path.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tollgate: {error}");
            return ExitCode::FAILURE;
        }
    };
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let runtime = match super::control_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
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

/// Completes on SIGTERM or SIGINT.
pub(super) async fn shutdown_signal() {
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
