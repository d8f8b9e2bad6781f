//! The response body on its way out, watched for token usage ([`body`]), and the one settlement
//! of each request ([`settlement`]): quota windows charged, metrics counted, ledger line written
//! — exactly once, by the request's end hook: at the end of the body, on a body error, or when
//! the client left (before or after the response headers). The settlement's ledger line also
//! goes to the ring of [`recent`] requests that the console shows.
//!
//! Frames pass through untouched (the same `Bytes`), except when the gateway asked the upstream
//! for stream usage on the client's behalf: then [`UsageStripper`] takes out of the client's
//! stream what only that request added.
//!
//! What is charged:
//! - the upstream's `usage` when one came (from the JSON body, or any SSE event) — `reported`;
//!   a count it lacks, or holds in a form that is not a non-negative integer, is estimated as
//!   below (and an unreadable one counted), never charged as 0;
//! - otherwise, for a 2xx answer, the prompt estimate plus an estimate of the text forwarded —
//!   `estimated` (client gone, upstream broke off, or an upstream that never reports);
//! - otherwise (an upstream error status without usage, or the upstream never reached) nothing.

pub(crate) mod body;
pub mod cost;
pub(crate) mod ledger;
pub mod recent;
pub(crate) mod settlement;
pub mod usage;

use std::sync::Arc;

use self::ledger::Ledger;
use self::recent::RecentRequests;
use crate::state::Backend;

pub use self::body::{UsageWatch, WatchedBody};
pub use self::settlement::Settlement;

/// Where usage is charged (the state backend) and written (the ledger, the ring of recent
/// requests): what the quota layer hands each request's settlement.
#[derive(Clone)]
pub struct Accounting {
    pub(crate) backend: Arc<Backend>,
    pub(crate) ledger: Option<Arc<Ledger>>,
    /// The last ledger lines, for the console.
    pub(crate) recent: Arc<RecentRequests>,
}
