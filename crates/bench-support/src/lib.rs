//! What tollgate's benches (`benches/overhead/`, `backends.rs`, `soak.rs`, `components.rs`)
//! share, so that none of them writes it again:
//!
//! - [`ports`]: a free local port for a child to listen on;
//! - [`process`]: a child process stopped when dropped, waiting for it to listen, its log's tail;
//! - [`procfs`]: CPU time (`/proc/<pid>/stat`, of a process or of one thread) and memory
//!   (`/proc/<pid>/status`), the kernel's clock tick, a process's children;
//! - [`stats`]: nearest-rank percentiles, medians, per-round differences;
//! - [`table`]: fixed-width text tables, the number formats the reports use, and a figure held
//!   against another row's (a ratio or a difference within a limit);
//! - [`args`]: the argument `cargo bench` passes to every bench binary, for clap.
//!
//! Linux only (it reads `/proc`), and std only: no runtime, so a bench uses it from any thread.

pub mod args;
pub mod ports;
pub mod process;
pub mod procfs;
pub mod stats;
pub mod table;
