//! What every layer shares about a request and its answer: the one response body type
//! ([`body`]), the one error answer ([`error`]), and the typed request extensions by which the
//! layers hand facts to one another ([`context`]).

pub mod body;
pub mod context;
pub mod error;

/// nginx's "client closed request": the status recorded for a request whose client left before
/// the response headers came.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;
