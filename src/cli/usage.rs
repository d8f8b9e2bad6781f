//! `tollgate usage`: the usage report ([`super::report`]) over a ledger file, or over its
//! PostgreSQL table ([`super::report_sql`]), printed in the format asked for.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use super::report::{aggregate, write, Format, GroupBy, Options, Report};

/// Where `tollgate usage` reads the ledger.
pub enum Source {
    /// A ledger file; `-` is stdin.
    File(PathBuf),
    /// The PostgreSQL table `table`, at the URL the environment variable `url_env` holds.
    Postgres { url_env: String, table: String },
}

/// The report on stdout; malformed lines are counted on stderr. A missing or unreadable ledger
/// is an error (non-zero exit).
pub fn run(source: &Source, since: Option<Duration>, by: GroupBy, format: Format) -> ExitCode {
    let now = SystemTime::now();
    let result = match source {
        Source::File(path) => from_file(path, &Options { by, since, now }),
        Source::Postgres { url_env, table } => {
            let table = super::report_sql::Table { url_env, table };
            super::control_runtime()
                .map_err(|_| "cannot start the runtime".to_owned())
                .and_then(|runtime| {
                    runtime.block_on(super::report_sql::aggregate(&table, by, since, now))
                })
        }
    };
    let result = match result {
        Ok(result) => result,
        Err(message) => {
            eprintln!("tollgate: {message}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = write(&result, format, &mut out).and_then(|()| out.flush());
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

/// The report over a ledger file, or the message for the user.
fn from_file(path: &Path, options: &Options) -> Result<Report, String> {
    let input: Box<dyn std::io::Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        let file = std::fs::File::open(path)
            .map_err(|error| format!("cannot open the ledger {}: {error}", path.display()))?;
        Box::new(file)
    };
    let reader = std::io::BufReader::with_capacity(256 * 1024, input);
    aggregate(reader, options)
        .map_err(|error| format!("cannot read the ledger {}: {error}", path.display()))
}
