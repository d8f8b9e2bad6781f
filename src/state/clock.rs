//! The clock the limiters and quota windows read: real time in production, a hand-driven one in
//! tests, so that a test can say "one second later" without sleeping.
//!
//! It gives monotonic time (for GCRA) and wall time (quota windows are aligned to UTC and survive
//! restarts); a manual clock moves both together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::nanos::Nanos;

#[derive(Debug, Clone)]
pub struct Clock {
    origin: Instant,
    /// Wall time at `origin`.
    wall_origin: SystemTime,
    /// Nanoseconds since `origin` when driven by hand.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// Real monotonic time.
    pub fn real() -> Clock {
        Clock {
            origin: Instant::now(),
            wall_origin: SystemTime::now(),
            manual: None,
        }
    }

    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual() -> Clock {
        Clock::manual_at(SystemTime::now())
    }

    /// A manual clock whose wall time starts at `wall`.
    pub fn manual_at(wall: SystemTime) -> Clock {
        Clock {
            origin: Instant::now(),
            wall_origin: wall,
            manual: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Wall time as seconds since the Unix epoch (UTC).
    pub(crate) fn unix_secs(&self) -> u64 {
        let wall = match &self.manual {
            Some(manual) => self.wall_origin + Duration::from_nanos(manual.load(Ordering::SeqCst)),
            None => SystemTime::now(),
        };
        wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    /// Moves a manual clock forward; a real clock cannot be moved and ignores this.
    pub fn advance(&self, by: Duration) {
        if let Some(manual) = &self.manual {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            manual.fetch_add(nanos, Ordering::SeqCst);
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::real()
    }
}

impl governor::clock::Clock for Clock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match &self.manual {
            Some(manual) => Nanos::from(manual.load(Ordering::SeqCst)),
            None => Nanos::from(self.origin.elapsed()),
        }
    }
}
