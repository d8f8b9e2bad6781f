//! CPU time and memory of processes and threads, read from `/proc`.
//!
//! CPU times come in clock ticks (`getconf CLK_TCK`, 100 on every common Linux build): a figure
//! over a short phase is only as precise as a few ticks. A process's `/proc/<pid>/stat` counts
//! all its threads, dead ones included; `/proc/self/task/<tid>/stat` counts one thread. Memory
//! lines of `/proc/<pid>/status` are in kB (KiB). A process that is gone reads as `None`.

use std::fs;
use std::process::{Command, Stdio};

/// Clock ticks per second of `/proc/*/stat` times, from `getconf CLK_TCK`; 100 when getconf is
/// missing or says nothing usable. The flag says whether it was assumed.
pub fn clk_tck() -> (f64, bool) {
    let read = Command::new("getconf")
        .arg("CLK_TCK")
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|&hz| hz > 0.0);
    match read {
        Some(hz) => (hz, false),
        None => (100.0, true),
    }
}

/// CPU time in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ticks {
    pub user: u64,
    pub system: u64,
}

impl Ticks {
    pub fn total(self) -> u64 {
        self.user + self.system
    }

    /// What was spent from `before` to `self`.
    pub fn since(self, before: Ticks) -> Ticks {
        Ticks {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }

    /// In seconds, at `clk_tck` ticks per second.
    pub fn seconds(self, clk_tck: f64) -> f64 {
        self.total() as f64 / clk_tck
    }
}

impl std::ops::Add for Ticks {
    type Output = Ticks;

    fn add(self, other: Ticks) -> Ticks {
        Ticks {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

/// The fields of a `/proc/…/stat` line after the command name (field 2), which may hold spaces
/// and parentheses: they are counted from the last `)`. `[0]` is field 3 (state).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(
        stat.get(stat.rfind(')')? + 1..)?
            .split_whitespace()
            .collect(),
    )
}

/// utime and stime of a `/proc/…/stat` file (fields 14 and 15).
pub fn stat_ticks(path: &str) -> Option<Ticks> {
    let stat = fs::read_to_string(path).ok()?;
    let fields = stat_fields(&stat)?;
    Some(Ticks {
        user: fields.get(11)?.parse().ok()?,
        system: fields.get(12)?.parse().ok()?,
    })
}

/// CPU time of process `pid`, all its threads.
pub fn process_ticks(pid: u32) -> Option<Ticks> {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`; `Threads` is a plain count), as the
/// number it holds.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS")
}

/// The processes whose parent is `parent` (nginx's workers), sorted.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat_fields(&stat)?.get(1)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect();
    children.sort_unstable();
    children
}

/// The calling thread's kernel id, from `/proc/thread-self` (`<pid>/task/<tid>`).
pub fn current_tid() -> Option<u32> {
    fs::read_link("/proc/thread-self")
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

/// One thread of this process, for its CPU time.
#[derive(Clone, Copy, Debug)]
pub struct ThreadCpu {
    pub tid: Option<u32>,
}

impl ThreadCpu {
    /// The calling thread.
    pub fn current() -> ThreadCpu {
        ThreadCpu { tid: current_tid() }
    }

    pub fn ticks(&self) -> Option<Ticks> {
        let tid = self.tid?;
        stat_ticks(&format!("/proc/self/task/{tid}/stat"))
    }
}

/// The processes of one server: tollgate's one, or nginx's master and workers.
#[derive(Clone, Debug)]
pub struct Procs {
    pub pids: Vec<u32>,
}

impl Procs {
    /// CPU time summed over the processes; `None` if one of them cannot be read.
    pub fn cpu_ticks(&self) -> Option<Ticks> {
        self.pids.iter().try_fold(Ticks::default(), |sum, &pid| {
            Some(sum + process_ticks(pid)?)
        })
    }

    /// A `/proc/<pid>/status` line summed over the processes (for nginx this counts shared pages
    /// once per process).
    pub fn status_kb(&self, field: &str) -> Option<u64> {
        self.pids.iter().map(|&pid| status_kb(pid, field)).sum()
    }

    /// Resets VmHWM to the current RSS (`echo 5 > /proc/<pid>/clear_refs`, Linux ≥ 4.0), so that
    /// a later VmHWM is the peak of what happened since. False if the kernel refused.
    pub fn reset_peak(&self) -> bool {
        self.pids
            .iter()
            .all(|pid| fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok())
    }
}
