//! Where token windows live: `local` (in this process, persisted to a file) — and the types every
//! backend shares.

pub mod local;

use std::sync::Arc;
use std::time::Duration;

/// Tokens held for one request in each of its key's windows, until settled.
#[derive(Debug)]
pub struct Reservation {
    pub key: Arc<str>,
    /// `(window length in seconds, window start)` for each window reserved in.
    pub windows: Vec<(u64, u64)>,
    pub amount: u64,
}

/// Why a reservation was refused: the window that had no room.
#[derive(Debug, Clone)]
pub struct QuotaDenied {
    pub per: Duration,
    pub limit: u64,
    /// Settled plus reserved, before this request.
    pub used: u64,
    /// What this request needed.
    pub needed: u64,
    pub retry_after: Duration,
}

/// One window of a key, now.
#[derive(Debug, Clone)]
pub struct WindowStatus {
    pub per: Duration,
    pub limit: u64,
    /// Settled plus reserved.
    pub used: u64,
    pub remaining: u64,
    pub reset_after: Duration,
}
