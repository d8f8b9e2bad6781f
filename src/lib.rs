//! tollgate: a reverse proxy and policy gateway for OpenAI-compatible model endpoints.
//!
//! The request's way through the gateway is laid out in [`stack`]; each other module is one step
//! of it or a piece those steps share.

pub mod accounting;
pub mod admin;
pub mod auth;
pub mod body;
pub mod clock;
pub mod config;
pub mod error;
pub mod extensions;
pub mod first_bytes;
pub mod keys;
pub mod ledger;
pub mod log_format;
pub mod log_writer;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod proxy;
pub mod quota;
pub mod rate_limit;
pub mod reload;
pub mod report;
pub mod request_body;
pub mod route;
pub mod server;
pub mod stack;
pub mod state;
pub mod tls;
pub mod upstream_body;
pub mod usage;
pub mod validate;
pub mod worker;

pub use config::Config;
pub use server::{Server, ServerOptions};
pub use stack::build_stack;
