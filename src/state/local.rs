//! Token windows kept in this process, persisted to an atomically replaced file.
//!
//! Why a file and not an embedded database: the state is small (one counter per key and window),
//! written as a whole at most once per `flush_interval`, and read once at start. Writing a
//! temporary file, fsyncing it and renaming it over the old one gives crash-safe snapshots with
//! no dependency and nothing to compact; a database would add a storage engine for a few KB.
//!
//! What survives what:
//! - SIGTERM / SIGINT: in-flight requests finish and settle, then a final snapshot is written:
//!   nothing charged is lost.
//! - SIGKILL or a crash: usage settled since the last snapshot is lost — at most
//!   `flush_interval` (default 1 s) of it. Reservations of requests in flight are never persisted
//!   (they die with the process).
//! - A corrupt or unreadable state file stops the start with a clear error ([`LocalStateError`],
//!   which callers put in context); it is never silently replaced by zero usage.
//!
//! Windows are fixed and aligned to multiples of their length since the Unix epoch, in UTC: `1m`
//! resets on the minute, `1h` on the hour, `1d` at 00:00 UTC, `30d` every 30 days counted from
//! 1970-01-01 (so not on the 1st of a month).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{QuotaDenied, Reservation, WindowStatus};
use crate::config::Quota;
use crate::state::clock::Clock;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WindowKey {
    key: Arc<str>,
    per_secs: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    /// Unix seconds at which this window began.
    start: u64,
    used: u64,
    reserved: u64,
}

pub struct LocalState {
    windows: Mutex<HashMap<WindowKey, Counter>>,
    clock: Clock,
    path: Option<PathBuf>,
    dirty: AtomicBool,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    windows: Vec<SnapshotWindow>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotWindow {
    key: String,
    per_secs: u64,
    start: u64,
    used: u64,
}

const SNAPSHOT_VERSION: u32 = 1;

/// Why the state file could not be opened or written. Each names the file and says the cause
/// (the cause is in the message, not also behind `source()`, so that it prints once).
#[derive(Debug, thiserror::Error)]
pub enum LocalStateError {
    #[error("cannot create the folder {}: {error}", .path.display())]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{} is corrupt ({error}); usage would be lost. Move it aside to start with empty usage, \
         or restore a backup",
        .path.display()
    )]
    Corrupt {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{} has version {found}, this tollgate reads {SNAPSHOT_VERSION}", .path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write next to {}: {error}", .path.display())]
    NotWritable {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write {}: {error}", .path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot encode the snapshot: {0}")]
    Encode(serde_json::Error),
}

/// The start of the window of length `per_secs` that contains `now`.
fn window_start(now: u64, per_secs: u64) -> u64 {
    now - now % per_secs
}

impl LocalState {
    /// Opens the state at `path` (or keeps it in memory only when `None`), loading what an earlier
    /// run saved.
    pub fn open(path: Option<PathBuf>, clock: Clock) -> Result<LocalState, LocalStateError> {
        let mut windows = HashMap::new();
        if let Some(path) = &path {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|error| LocalStateError::CreateDir {
                    path: parent.to_owned(),
                    error,
                })?;
            }
            match std::fs::read(path) {
                Ok(bytes) => {
                    let snapshot: Snapshot = serde_json::from_slice(&bytes).map_err(|error| {
                        LocalStateError::Corrupt {
                            path: path.clone(),
                            error,
                        }
                    })?;
                    if snapshot.version != SNAPSHOT_VERSION {
                        return Err(LocalStateError::Version {
                            path: path.clone(),
                            found: snapshot.version,
                        });
                    }
                    for w in snapshot.windows {
                        if w.per_secs == 0 {
                            continue;
                        }
                        windows.insert(
                            WindowKey {
                                key: Arc::from(w.key),
                                per_secs: w.per_secs,
                            },
                            Counter {
                                start: w.start,
                                used: w.used,
                                reserved: 0,
                            },
                        );
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(LocalStateError::Read {
                        path: path.clone(),
                        error,
                    });
                }
            }
            // Fail now, not at the first flush, if the folder is not writable.
            probe_writable(path)?;
        }
        Ok(LocalState {
            windows: Mutex::new(windows),
            clock,
            path,
            dirty: AtomicBool::new(false),
        })
    }

    /// Reserves `amount` tokens in every window of `quotas`, or refuses with the window that is
    /// too full. All windows or none.
    pub(crate) fn reserve(
        &self,
        key: &Arc<str>,
        quotas: &[Quota],
        amount: u64,
    ) -> Result<(Reservation, Vec<WindowStatus>), QuotaDenied> {
        let now = self.clock.unix_secs();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut denied: Option<QuotaDenied> = None;
        for quota in quotas {
            let counter = current(&mut windows, key, quota, now);
            let taken = counter.used.saturating_add(counter.reserved);
            if taken.saturating_add(amount) > quota.tokens {
                let retry_after = Duration::from_secs(counter.start + quota.per_secs() - now);
                let worse = denied.as_ref().is_none_or(|d| retry_after > d.retry_after);
                if worse {
                    denied = Some(QuotaDenied {
                        per: quota.per,
                        limit: quota.tokens,
                        used: taken,
                        needed: amount,
                        retry_after,
                    });
                }
            }
        }
        if let Some(denied) = denied {
            return Err(denied);
        }
        let mut starts = Vec::with_capacity(quotas.len());
        let mut status = Vec::with_capacity(quotas.len());
        for quota in quotas {
            let counter = current(&mut windows, key, quota, now);
            counter.reserved = counter.reserved.saturating_add(amount);
            starts.push((quota.per_secs(), counter.start));
            status.push(status_of(quota, counter, now));
        }
        Ok((
            Reservation {
                key: key.clone(),
                windows: starts,
                amount,
            },
            status,
        ))
    }

    /// Replaces a reservation by what the request really used. A window that rolled over since
    /// the reservation simply forgets it; the usage lands in the window current now.
    pub(crate) fn settle(&self, reservation: Reservation, used: u64) {
        let now = self.clock.unix_secs();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        for (per_secs, start) in &reservation.windows {
            let id = WindowKey {
                key: reservation.key.clone(),
                per_secs: *per_secs,
            };
            let counter = windows.entry(id).or_default();
            if counter.start == *start {
                counter.reserved = counter.reserved.saturating_sub(reservation.amount);
            }
            let current_start = window_start(now, *per_secs);
            if counter.start != current_start {
                *counter = Counter {
                    start: current_start,
                    ..Counter::default()
                };
            }
            counter.used = counter.used.saturating_add(used);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Used (settled + reserved) and remaining tokens of each of `quotas` for `key`, now.
    pub(crate) fn status(&self, key: &Arc<str>, quotas: &[Quota]) -> Vec<WindowStatus> {
        let now = self.clock.unix_secs();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        quotas
            .iter()
            .map(|quota| status_of(quota, current(&mut windows, key, quota, now), now))
            .collect()
    }

    /// Writes a snapshot if anything was charged since the last one.
    pub(crate) fn flush(&self) -> Result<(), LocalStateError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let snapshot = {
            let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
            Snapshot {
                version: SNAPSHOT_VERSION,
                windows: windows
                    .iter()
                    .filter(|(_, c)| c.used > 0)
                    .map(|(id, c)| SnapshotWindow {
                        key: id.key.to_string(),
                        per_secs: id.per_secs,
                        start: c.start,
                        used: c.used,
                    })
                    .collect(),
            }
        };
        write_atomically(path, &snapshot).inspect_err(|_| {
            // Try again at the next flush.
            self.dirty.store(true, Ordering::Release);
        })
    }

    /// Flushes every `interval` until the process ends.
    pub(crate) async fn run_flusher(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        let mut failing = false;
        loop {
            ticker.tick().await;
            let state = self.clone();
            let result = tokio::task::spawn_blocking(move || state.flush()).await;
            match result {
                Ok(Ok(())) if failing => {
                    tracing::info!("state file written again");
                    failing = false;
                }
                Ok(Ok(())) => {}
                Ok(Err(error)) if !failing => {
                    tracing::error!(%error, "cannot write the state file; usage is kept in memory and retried");
                    failing = true;
                }
                Ok(Err(_)) => {}
                Err(error) => tracing::error!(%error, "state flush task failed"),
            }
        }
    }
}

/// The counter of `key`'s window for `quota` as of `now`, rolled over if its window has passed.
fn current<'a>(
    windows: &'a mut HashMap<WindowKey, Counter>,
    key: &Arc<str>,
    quota: &Quota,
    now: u64,
) -> &'a mut Counter {
    let per_secs = quota.per_secs();
    let start = window_start(now, per_secs);
    let counter = windows
        .entry(WindowKey {
            key: key.clone(),
            per_secs,
        })
        .or_insert(Counter {
            start,
            ..Counter::default()
        });
    if counter.start != start {
        // A new window: what was used is forgotten; reservations of requests still running
        // belonged to the old window and are released there by `settle`.
        *counter = Counter {
            start,
            ..Counter::default()
        };
    }
    counter
}

fn status_of(quota: &Quota, counter: &Counter, now: u64) -> WindowStatus {
    let taken = counter.used.saturating_add(counter.reserved);
    WindowStatus {
        per: quota.per,
        limit: quota.tokens,
        used: taken,
        reserved: Some(counter.reserved),
        remaining: quota.tokens.saturating_sub(taken),
        reset_after: Duration::from_secs(counter.start + quota.per_secs() - now),
    }
}

fn probe_writable(path: &Path) -> Result<(), LocalStateError> {
    let probe = path.with_extension("probe");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|error| LocalStateError::NotWritable {
            path: path.to_owned(),
            error,
        })
}

fn write_atomically(path: &Path, snapshot: &Snapshot) -> Result<(), LocalStateError> {
    let bytes = serde_json::to_vec(snapshot).map_err(LocalStateError::Encode)?;
    replace_file(path, &bytes).map_err(|error| LocalStateError::Write {
        path: path.to_owned(),
        error,
    })
}

/// Temporary file, fsync, rename over the old one, fsync the folder: the file on disk is always
/// either the old content or the new one, whole.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn quota(tokens: u64, per_secs: u64) -> Quota {
        Quota {
            tokens,
            per: Duration::from_secs(per_secs),
        }
    }

    /// A manual clock at a whole minute, so windows line up with the test's arithmetic.
    fn clock() -> Clock {
        Clock::manual_at(UNIX_EPOCH + Duration::from_secs(1_800_000_000 / 3600 * 3600))
    }

    #[test]
    fn reservations_count_until_settled_and_never_overrun() {
        let state = LocalState::open(None, clock()).expect("memory state");
        let key: Arc<str> = Arc::from("k");
        let quotas = [quota(100, 60)];
        let (a, _) = state.reserve(&key, &quotas, 60).expect("60 of 100");
        let denied = state
            .reserve(&key, &quotas, 60)
            .expect_err("120 > 100 while a is in flight");
        assert_eq!((denied.used, denied.limit), (60, 100));
        state.settle(a, 10);
        let (_, status) = state.reserve(&key, &quotas, 60).expect("10 used + 60 fits");
        assert_eq!(status[0].used, 70, "settled usage plus the new reservation");
    }

    #[test]
    fn every_window_must_have_room_and_retry_after_is_the_latest_reset() {
        let clock = clock();
        let state = LocalState::open(None, clock.clone()).expect("memory state");
        let key: Arc<str> = Arc::from("k");
        let quotas = [quota(100, 60), quota(150, 3600)];
        clock.advance(Duration::from_secs(15));
        let (r, _) = state.reserve(&key, &quotas, 100).expect("fits both");
        state.settle(r, 100);
        let denied = state
            .reserve(&key, &quotas, 1)
            .expect_err("minute window full");
        assert_eq!(
            denied.retry_after,
            Duration::from_secs(45),
            "the minute resets in 45 s"
        );
        clock.advance(Duration::from_secs(45));
        let (r, _) = state
            .reserve(&key, &quotas, 50)
            .expect("new minute, hour has 50 left");
        state.settle(r, 50);
        let denied = state
            .reserve(&key, &quotas, 1)
            .expect_err("hour window full");
        assert_eq!(
            denied.retry_after,
            Duration::from_secs(3600 - 60),
            "the hour resets later"
        );
    }

    #[test]
    fn snapshots_survive_a_restart_and_corruption_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join("tollgate.db");
        let clock = clock();
        let key: Arc<str> = Arc::from("k");
        let quotas = [quota(1000, 86_400)];
        {
            let state = LocalState::open(Some(path.clone()), clock.clone()).expect("open");
            let (r, _) = state.reserve(&key, &quotas, 300).expect("reserve");
            state.settle(r, 123);
            state.flush().expect("flush");
        }
        let state = LocalState::open(Some(path.clone()), clock.clone()).expect("reopen");
        assert_eq!(
            state.status(&key, &quotas)[0].used,
            123,
            "usage survived the restart"
        );

        std::fs::write(&path, b"{ not json").expect("corrupt it");
        let err = LocalState::open(Some(path.clone()), clock)
            .err()
            .expect("corrupt file refused");
        assert!(
            matches!(&err, LocalStateError::Corrupt { path: named, .. } if *named == path),
            "{err}"
        );
        assert!(err.to_string().contains("is corrupt"), "{err}");
    }
}
