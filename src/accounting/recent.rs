//! The last [`RECENT`] finished requests, as their ledger lines: what the console's "Recent
//! requests" page shows (`GET /admin/requests`), kept in memory whether or not a ledger file is
//! configured.
//!
//! A ledger line holds no prompt, no answer and no token, so neither does this. Pushing is one
//! short lock and a move into a bounded ring; the oldest line falls out.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use super::ledger::LedgerEntry;

/// How many finished requests are kept.
pub const RECENT: usize = 200;

pub struct RecentRequests {
    ring: Mutex<VecDeque<Arc<LedgerEntry>>>,
}

impl RecentRequests {
    pub fn new() -> RecentRequests {
        RecentRequests {
            ring: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }

    /// Keeps `entry` (shared with the ledger's queue: no copy).
    pub(crate) fn push(&self, entry: Arc<LedgerEntry>) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest = (ring.len() == RECENT).then(|| ring.pop_front());
        ring.push_back(entry);
        drop(ring);
        // The oldest is freed after the lock, which other workers wait for.
        drop(oldest);
    }

    /// The kept lines, newest first.
    pub(crate) fn newest_first(&self) -> Vec<LedgerEntry> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter()
            .rev()
            .map(|entry| LedgerEntry::clone(entry))
            .collect()
    }
}

impl Default for RecentRequests {
    fn default() -> Self {
        RecentRequests::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::ledger::sample_entry;

    #[test]
    fn keeps_the_last_two_hundred_newest_first() {
        let recent = RecentRequests::new();
        for n in 0..RECENT + 50 {
            recent.push(Arc::new(sample_entry(n as u64)));
        }
        let kept = recent.newest_first();
        assert_eq!(kept.len(), RECENT, "bounded");
        assert_eq!(
            kept[0].request_id,
            format!("r{}", RECENT + 49),
            "newest first"
        );
        assert_eq!(kept[RECENT - 1].request_id, "r50", "the oldest fell out");
    }
}
