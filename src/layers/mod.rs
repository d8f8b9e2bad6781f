//! The request's steps, one tower layer per file, in the order [`crate::stack`] puts them
//! (outermost first):
//!
//! 1. [`observe`]: the request's context (id, clock) and its one end: settlement, slot, access
//!    line and request metrics, once
//! 2. [`request_head`]: the request line and header fields within `max_header_bytes`, or 431
//! 3. [`route`]: the path → an endpoint, or 404/405
//! 4. [`auth`]: the bearer key → the key's principal, or 401
//! 5. [`rate_limit`]: in-flight slot and request rate per key, or 429
//! 6. [`request_body`]: the body read whole under a size cap, or 413
//! 7. [`validate`]: JSON parse and the route's schema, or 400
//! 8. [`policy`]: model allow-list and `max_tokens` cap, or 400
//! 9. [`pick_pool`]: the upstream pool that serves the model, or 400 `model-not-found`
//! 10. [`quota`]: the token reservation on the way in, accounting on the way out, or 429

pub(crate) mod auth;
pub(crate) mod observe;
pub(crate) mod pick_pool;
pub(crate) mod policy;
pub(crate) mod quota;
pub(crate) mod rate_limit;
pub(crate) mod request_body;
pub(crate) mod request_head;
pub(crate) mod route;
pub mod validate;
