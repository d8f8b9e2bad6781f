//! tollgate: a reverse proxy and policy gateway for OpenAI-compatible model endpoints.
//!
//! The request's way through the gateway is laid out in [`stack`]; each folder below is one part
//! of it or a piece those parts share.

pub mod accounting; // usage read from answers, settlement of each request, the usage ledger
pub mod cli; // the `tollgate` subcommands besides `serve`: check, keygen, usage report
pub mod config; // the config file: raw serde types, validation into the runtime `Config`
pub mod http; // the response body type, the error answer, the request context between layers
pub mod keys; // the live key table: token hash → key, limiter, in-flight count
pub mod layers; // one tower layer per step of the request, in stack order
pub mod observability; // Prometheus metrics, the log line format and the batched log writer
pub mod proxy; // upstream pools, endpoint choice, health checks, the client, the streamed answer
pub mod server; // listeners, worker threads, TLS, the admin port, config reloads
pub mod stack; // the one ServiceBuilder that puts the layers together
pub mod state; // where limits and token windows live: local or Redis; the clock

pub use config::Config;
pub use server::{Server, ServerOptions};
