//! Integration tests: the gateway over real sockets, in front of a scripted upstream.

#[path = "../common/mod.rs"]
mod common;

mod accounting;
mod binary;
mod budgets;
mod connections;
mod console;
mod dashboard;
mod demo;
mod hardening;
mod keys;
mod managed_keys;
mod openai_client;
mod operators;
mod pg_ledger;
mod pools;
mod proxy;
mod quota_caps;
mod real_upstream;
mod redis;
mod report;
mod traces;
mod upstream_answer;
mod validate;
