//! `tollgate check`: validate a config file and print what it would enforce; a non-zero exit with
//! the first problem when it does not load.

use std::path::Path;
use std::process::ExitCode;

pub fn run(path: &Path) -> ExitCode {
    let config = match super::load(Some(path)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("tollgate: {error}");
            return ExitCode::FAILURE;
        }
    };
    let server = &config.server;
    println!("{}: ok", path.display());
    println!("  listen            {}", server.listen);
    println!(
        "  admin_listen      {}  (/metrics, /healthz, /readyz)",
        server.admin_listen
    );
    println!("  max_body_bytes    {}", server.max_body_bytes);
    println!("  shutdown_timeout  {:?}", server.shutdown_timeout);
    println!(
        "  connections       at most {}, closed after {:?} idle; heads up to {} bytes",
        server.max_connections, server.idle_timeout, server.max_header_bytes
    );
    for pool in &config.upstreams {
        print_pool(pool);
    }
    if let Some(telemetry) = &config.telemetry {
        println!(
            "  traces            to {} as {:?}, sample_ratio {}, queue {}",
            telemetry.endpoint,
            telemetry.service_name,
            telemetry.sample_ratio,
            telemetry.queue_size
        );
    }
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

/// One upstream pool: what it serves, where, and how it is spoken to.
fn print_pool(pool: &crate::config::PoolConfig) {
    let upstream = &pool.upstream;
    let endpoints: Vec<String> = pool.endpoints.iter().map(|e| e.base_url()).collect();
    println!(
        "  upstream {:<8} models {}; endpoints {}",
        &*pool.name,
        pool.models.join(", "),
        endpoints.join(", ")
    );
    let balance: &str = pool.balance.into();
    println!(
        "    balance         {balance}, {} retries, out after {} failures for {:?} (doubling){}",
        pool.retries,
        pool.eject_after,
        pool.eject_for,
        match &pool.health_check {
            Some(check) => format!(
                ", health check GET {} every {:?}",
                check.path, check.interval
            ),
            None => String::new(),
        }
    );
    println!(
        "    credential      {}",
        match (&upstream.api_key, &upstream.api_key_source) {
            (Some(_), Some(source)) => format!("from {source} (set)"),
            (None, Some(source)) => format!("from {source} (NOT SET)"),
            _ => "none: requests go upstream without Authorization".into(),
        }
    );
    println!(
        "    timeouts        connect {:?}, response headers {:?}, idle between frames {:?}",
        upstream.connect_timeout, upstream.response_header_timeout, upstream.idle_timeout
    );
}
