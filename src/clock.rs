//! The clock the rate limiters read: real time in production, a hand-driven one in tests, so that
//! a test can say "one second later" without sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::nanos::Nanos;

#[derive(Debug, Clone)]
pub struct Clock {
    origin: Instant,
    /// Nanoseconds since `origin` when driven by hand.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// Real monotonic time.
    pub fn real() -> Clock {
        Clock {
            origin: Instant::now(),
            manual: None,
        }
    }

    /// A clock that stands still until [`Clock::advance`] moves it.
    pub fn manual() -> Clock {
        Clock {
            origin: Instant::now(),
            manual: Some(Arc::new(AtomicU64::new(0))),
        }
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
