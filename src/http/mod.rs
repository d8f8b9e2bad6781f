//! What every layer shares about a request and its answer: the one response body type
//! ([`body`]), the one error answer ([`error`]), the request context the layers fill and the end
//! reads ([`context`]), the one end-of-request hook ([`end`]), the response headers the gateway
//! owns ([`headers`]), what a request asks to generate ([`generation`]), and the edits the gateway
//! makes to a request body before it goes upstream ([`request_edit`]), and what a traced request's
//! spans are built from ([`trace`]).

pub mod body;
pub mod context;
pub mod end;
pub(crate) mod error;
pub(crate) mod generation;
pub(crate) mod headers;
pub(crate) mod request_edit;
pub(crate) mod trace;

/// nginx's "client closed request": the status recorded for a request whose client left before
/// the response headers came.
pub(crate) const CLIENT_CLOSED_REQUEST: u16 = 499;
