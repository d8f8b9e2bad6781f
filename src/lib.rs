//! tollgate: a reverse proxy and policy gateway for OpenAI-compatible model endpoints.
//!
//! The request's way through the gateway is laid out in [`stack`]; each other module is one step
//! of it or a piece those steps share.

pub mod admin;
pub mod body;
pub mod config;
pub mod error;
pub mod extensions;
pub mod metrics;
pub mod observe;
pub mod proxy;
pub mod request_body;
pub mod route;
pub mod server;
pub mod stack;
pub mod upstream_body;

pub use config::Config;
pub use server::Server;
pub use stack::build_stack;
