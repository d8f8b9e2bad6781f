//! Integration tests: the gateway over real sockets, in front of a scripted upstream.

#[path = "../common/mod.rs"]
mod common;

mod binary;
mod openai_client;
mod proxy;
