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
//! Fixed windows are aligned to multiples of their length since the Unix epoch, in UTC: `1m`
//! resets on the minute, `1h` on the hour, `1d` at 00:00 UTC, `30d` every 30 days counted from
//! 1970-01-01 (so not on the 1st of a month); `week` resets on Monday 00:00 UTC and `month` on the
//! 1st at 00:00 UTC (see [`super::window`]). A key's windows and its group's are reserved in under
//! the one lock, all of them or none.

use std::collections::HashMap;

/// The windows' map: keyed by names from the config and the admin API, never by what a client
/// sends, so it needs no SipHash against collision floods, and foldhash hashes a window's id
/// several times faster (it is looked up twice per request).
type Windows = HashMap<WindowId, Counter, foldhash::fast::RandomState>;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{window, Amounts, QuotaDenied, Reservation, Scope, Window, WindowId, WindowStatus};
use crate::config::{Period, Unit};
use crate::state::clock::Clock;

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    /// Unix seconds at which this window began.
    start: u64,
    used: u64,
    reserved: u64,
}

pub struct LocalState {
    windows: Mutex<Windows>,
    clock: Clock,
    path: Option<PathBuf>,
    dirty: AtomicBool,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    windows: Vec<SnapshotWindow>,
}

/// One window in the file. Version 1 files (before groups, cost and calendar windows) have only
/// `key`, `per_secs`, `start` and `used`: the other fields default to a key's token window.
#[derive(Serialize, Deserialize)]
struct SnapshotWindow {
    /// The key's or the group's name.
    key: String,
    /// The length of a fixed window; 0 for a calendar one (`period`).
    per_secs: u64,
    start: u64,
    used: u64,
    #[serde(default, skip_serializing_if = "is_key")]
    group: bool,
    #[serde(default, skip_serializing_if = "is_tokens")]
    cost: bool,
    /// `week` or `month`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    period: Option<String>,
}

fn is_key(group: &bool) -> bool {
    !group
}

fn is_tokens(cost: &bool) -> bool {
    !cost
}

impl SnapshotWindow {
    fn new(id: &WindowId, counter: &Counter) -> SnapshotWindow {
        let (per_secs, period) = match id.per {
            Period::Fixed(secs) => (secs.get(), None),
            calendar => (0, Some(calendar.id())),
        };
        SnapshotWindow {
            key: id.name.to_string(),
            per_secs,
            start: counter.start,
            used: counter.used,
            group: id.scope == Scope::Group,
            cost: id.unit == Unit::Cost,
            period,
        }
    }

    /// Its window, or `None` for one this version cannot place (skipped).
    fn id(&self) -> Option<WindowId> {
        let per = match &self.period {
            Some(period) => Period::from_id(period)?,
            None => Period::from_id(&self.per_secs.to_string())?,
        };
        Some(WindowId {
            scope: if self.group { Scope::Group } else { Scope::Key },
            name: Arc::from(self.key.as_str()),
            unit: if self.cost { Unit::Cost } else { Unit::Tokens },
            per,
        })
    }
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

impl LocalState {
    /// Opens the state at `path` (or keeps it in memory only when `None`), loading what an earlier
    /// run saved.
    pub fn open(path: Option<PathBuf>, clock: Clock) -> Result<LocalState, LocalStateError> {
        let mut windows = Windows::default();
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
                        let Some(id) = w.id() else {
                            continue;
                        };
                        windows.insert(
                            id,
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

    /// Reserves `need` in every window of `windows` (each in its unit), or refuses with the
    /// window that is too full (of several, the one that resets last). All windows or none.
    pub(crate) fn reserve(
        &self,
        windows: &[Window],
        need: Amounts,
    ) -> Result<(Reservation, Vec<WindowStatus>), QuotaDenied> {
        let now = self.clock.unix_secs();
        let mut counters = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut denied: Option<QuotaDenied> = None;
        for window in windows {
            let (counter, (start, end)) = current(&mut counters, &window.id, now);
            let taken = counter.used.saturating_add(counter.reserved);
            let amount = need.of(window.id.unit);
            if taken.saturating_add(amount) > window.limit {
                let retry_after = Duration::from_secs(end - now);
                let worse = denied.as_ref().is_none_or(|d| retry_after > d.retry_after);
                if worse {
                    denied = Some(QuotaDenied {
                        id: window.id.clone(),
                        limit: window.limit,
                        used: taken,
                        needed: amount,
                        retry_after,
                        length: Duration::from_secs(end - start),
                    });
                }
            }
        }
        if let Some(denied) = denied {
            return Err(denied);
        }
        let mut starts = Vec::with_capacity(windows.len());
        let mut status = Vec::with_capacity(windows.len());
        for window in windows {
            let (counter, bounds) = current(&mut counters, &window.id, now);
            counter.reserved = counter.reserved.saturating_add(need.of(window.id.unit));
            starts.push((window.id.clone(), counter.start));
            status.push(status_of(window, counter, bounds, now));
        }
        Ok((
            Reservation {
                windows: starts,
                amounts: need,
            },
            status,
        ))
    }

    /// Replaces a reservation by what the request really used, and returns each window's used
    /// (settled + reserved) after it, in the reservation's order. A window that rolled over since
    /// the reservation simply forgets it; the usage lands in the window current now.
    pub(crate) fn settle(&self, reservation: Reservation, used: Amounts) -> Vec<u64> {
        let now = self.clock.unix_secs();
        let mut counters = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut totals = Vec::with_capacity(reservation.windows.len());
        for (id, start) in reservation.windows {
            let unit = id.unit;
            let (current_start, _) = window::bounds(id.per, now);
            let counter = counters.entry(id).or_default();
            if counter.start == start {
                counter.reserved = counter
                    .reserved
                    .saturating_sub(reservation.amounts.of(unit));
            }
            if counter.start != current_start {
                *counter = Counter {
                    start: current_start,
                    ..Counter::default()
                };
            }
            counter.used = counter.used.saturating_add(used.of(unit));
            totals.push(counter.used.saturating_add(counter.reserved));
        }
        self.dirty.store(true, Ordering::Release);
        totals
    }

    /// Used (settled + reserved) and remaining of each of `windows`, now.
    pub(crate) fn status(&self, windows: &[Window]) -> Vec<WindowStatus> {
        let now = self.clock.unix_secs();
        let mut counters = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        windows
            .iter()
            .map(|window| {
                let (counter, bounds) = current(&mut counters, &window.id, now);
                status_of(window, counter, bounds, now)
            })
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
                    .map(|(id, c)| SnapshotWindow::new(id, c))
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
            // Nothing charged since the last snapshot: no blocking thread to wake.
            if self.path.is_none() || !self.dirty.load(Ordering::Acquire) {
                continue;
            }
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

/// The counter of window `id` as of `now`, rolled over if its window has passed, and the bounds
/// of the window current now.
fn current<'a>(
    counters: &'a mut Windows,
    id: &WindowId,
    now: u64,
) -> (&'a mut Counter, (u64, u64)) {
    let bounds = window::bounds(id.per, now);
    let start = bounds.0;
    let counter = counters.entry(id.clone()).or_insert(Counter {
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
    (counter, bounds)
}

fn status_of(window: &Window, counter: &Counter, bounds: (u64, u64), now: u64) -> WindowStatus {
    let taken = counter.used.saturating_add(counter.reserved);
    WindowStatus::new(window, taken, Some(counter.reserved), bounds, now)
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

    use crate::config::Quota;

    fn quota(tokens: u64, per_secs: u64) -> Quota {
        Quota::tokens(tokens, Duration::from_secs(per_secs))
    }

    /// Key `k`'s windows of `quotas`.
    fn windows(quotas: &[Quota]) -> Vec<Window> {
        Window::of(Scope::Key, &Arc::from("k"), quotas)
    }

    fn tokens(tokens: u64) -> Amounts {
        Amounts { tokens, cost: 0 }
    }

    /// A manual clock at a whole minute, so windows line up with the test's arithmetic.
    fn clock() -> Clock {
        Clock::manual_at(UNIX_EPOCH + Duration::from_secs(1_800_000_000 / 3600 * 3600))
    }

    #[test]
    fn reservations_count_until_settled_and_never_overrun() {
        let state = LocalState::open(None, clock()).expect("memory state");
        let quotas = windows(&[quota(100, 60)]);
        let (a, _) = state.reserve(&quotas, tokens(60)).expect("60 of 100");
        let denied = state
            .reserve(&quotas, tokens(60))
            .expect_err("120 > 100 while a is in flight");
        assert_eq!((denied.used, denied.limit), (60, 100));
        state.settle(a, tokens(10));
        let (_, status) = state
            .reserve(&quotas, tokens(60))
            .expect("10 used + 60 fits");
        assert_eq!(status[0].used, 70, "settled usage plus the new reservation");
    }

    #[test]
    fn every_window_must_have_room_and_retry_after_is_the_latest_reset() {
        let clock = clock();
        let state = LocalState::open(None, clock.clone()).expect("memory state");
        let quotas = windows(&[quota(100, 60), quota(150, 3600)]);
        clock.advance(Duration::from_secs(15));
        let (r, _) = state.reserve(&quotas, tokens(100)).expect("fits both");
        state.settle(r, tokens(100));
        let denied = state
            .reserve(&quotas, tokens(1))
            .expect_err("minute window full");
        assert_eq!(
            denied.retry_after,
            Duration::from_secs(45),
            "the minute resets in 45 s"
        );
        clock.advance(Duration::from_secs(45));
        let (r, _) = state
            .reserve(&quotas, tokens(50))
            .expect("new minute, hour has 50 left");
        state.settle(r, tokens(50));
        let denied = state
            .reserve(&quotas, tokens(1))
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
        let quotas = windows(&[quota(1000, 86_400)]);
        {
            let state = LocalState::open(Some(path.clone()), clock.clone()).expect("open");
            let (r, _) = state.reserve(&quotas, tokens(300)).expect("reserve");
            state.settle(r, tokens(123));
            state.flush().expect("flush");
        }
        let state = LocalState::open(Some(path.clone()), clock.clone()).expect("reopen");
        assert_eq!(
            state.status(&quotas)[0].used,
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

    #[test]
    fn a_key_and_its_group_are_reserved_in_together_or_not_at_all() {
        let state = LocalState::open(None, clock()).expect("memory state");
        let group: Arc<str> = Arc::from("team");
        let cost = |limit| Quota {
            limit,
            unit: Unit::Cost,
            per: Period::Month,
        };
        let mut a = windows(&[quota(1000, 3600)]);
        a.extend(Window::of(Scope::Group, &group, &[cost(500)]));
        let mut b = Window::of(Scope::Key, &Arc::from("b"), &[cost(10_000)]);
        b.extend(Window::of(Scope::Group, &group, &[cost(500)]));
        let need = |tokens, cost| Amounts { tokens, cost };
        let (held, status) = state.reserve(&a, need(100, 300)).expect("room in both");
        assert_eq!((status[0].used, status[1].used), (100, 300));
        let denied = state
            .reserve(&b, need(1, 300))
            .expect_err("the group is full");
        assert_eq!(
            (denied.id.scope, denied.id.unit),
            (Scope::Group, Unit::Cost)
        );
        assert_eq!(
            state.status(&b)[0].used,
            0,
            "b's own window took nothing from the refused reservation"
        );
        state.settle(held, need(40, 120));
        let status = state.status(&a);
        assert_eq!((status[0].used, status[1].used), (40, 120), "both settled");
        let (_, status) = state.reserve(&b, need(1, 300)).expect("room again");
        assert_eq!(status[1].used, 420, "the group counts both keys");
    }

    #[test]
    fn calendar_and_group_windows_survive_a_restart_and_roll_over_on_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let wall = humantime::parse_rfc3339("2024-02-29T23:59:50Z").expect("time");
        let clock = Clock::manual_at(wall);
        let mut all = Window::of(
            Scope::Group,
            &Arc::from("team"),
            &[Quota {
                limit: 1_000,
                unit: Unit::Cost,
                per: Period::Month,
            }],
        );
        all.extend(windows(&[Quota {
            limit: 1_000,
            unit: Unit::Tokens,
            per: Period::Week,
        }]));
        {
            let state = LocalState::open(Some(path.clone()), clock.clone()).expect("open");
            let (held, status) = state
                .reserve(&all, Amounts { tokens: 5, cost: 7 })
                .expect("fits");
            assert_eq!(status[0].reset_after, Duration::from_secs(10), "March 1st");
            state.settle(held, Amounts { tokens: 3, cost: 6 });
            state.flush().expect("flush");
        }
        let state = LocalState::open(Some(path), clock.clone()).expect("reopen");
        let status = state.status(&all);
        assert_eq!((status[0].used, status[1].used), (6, 3), "both kept");
        clock.advance(Duration::from_secs(10));
        let status = state.status(&all);
        assert_eq!(status[0].used, 0, "a new month");
        assert_eq!(status[0].length, Duration::from_secs(31 * 86_400));
        assert_eq!(
            status[1].used, 3,
            "the same ISO week (Monday 26 Feb to 3 Mar)"
        );
    }
}
