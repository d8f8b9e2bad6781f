//! The response body on its way out, watched for token usage, and the one settlement of each
//! request: quota windows charged, metrics counted, ledger line written — exactly once, at the end
//! of the body, on a body error, or when the body is dropped because the client left (or the
//! request itself, when the client left before the response headers).
//!
//! Frames pass through untouched (the same `Bytes`), except when the gateway asked the upstream
//! for stream usage on the client's behalf: then [`UsageStripper`] takes out of the client's
//! stream what only that request added.
//!
//! What is charged:
//! - the upstream's `usage` when one came (from the JSON body, or any SSE event) — `reported`;
//! - otherwise, for a 2xx answer, the prompt estimate plus an estimate of the text forwarded —
//!   `estimated` (client gone, upstream broke off, or an upstream that never reports);
//! - otherwise (an upstream error status without usage, or the upstream never reached) nothing.

pub mod body;
pub mod ledger;
pub mod settlement;
pub mod usage;

pub use self::body::AccountedBody;
pub use self::settlement::{Outcome, Settlement};
