//! Command-line arguments every bench accepts.
//!
//! `cargo bench` runs each bench binary with `--bench` after the user's arguments; a bench's
//! clap `Parser` flattens [`CargoBench`] so that the flag is taken and ignored instead of being
//! refused as unknown.

/// The flag `cargo bench` adds; flatten it into a bench's arguments.
#[derive(clap::Args, Debug, Default, Clone, Copy)]
pub struct CargoBench {
    /// Passed by `cargo bench` to every bench binary; ignored.
    #[arg(long = "bench", hide = true)]
    pub bench: bool,
}
