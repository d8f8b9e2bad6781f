//! Child processes of a bench: started, waited for until they listen, and stopped when the bench
//! is done with them, even when it fails half-way.
//!
//! Stopping sends SIGTERM (tollgate drains with nothing in flight; nginx's master stops its
//! workers; redis-server exits), then SIGKILL if the child is still there after 5 s. The signal
//! goes through the `kill` command: the workspace forbids `unsafe`, so no `libc::kill`.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a stopped child gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// A child process that is stopped when dropped.
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Spawns `command`.
    pub fn spawn(command: &mut Command) -> io::Result<ChildGuard> {
        Ok(ChildGuard {
            child: command.spawn()?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Until something accepts TCP connections on `addr`; an error if the child exits first or
    /// `timeout` passes.
    pub fn wait_listening(&mut self, addr: SocketAddr, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(io::Error::other(format!("exited with {status}")));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing listens on {addr} after {timeout:?}"),
                ));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of a (log) file; empty if it cannot be read.
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
