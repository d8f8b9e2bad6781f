//! `tollgate keygen`: a new random key, shown once, and the `[[keys]]` entry that holds only its
//! SHA-256.

use std::process::ExitCode;

use crate::config::is_valid_key_name;
use crate::keys::{generate_token, hash_token};

/// The token goes to stderr (the terminal), the `[[keys]]` entry to stdout, so that
/// `tollgate keygen --name x >> tollgate.toml` stores the hash and never the key.
pub fn run(name: &str) -> ExitCode {
    if !is_valid_key_name(name) {
        eprintln!("tollgate: key name {name:?}: use 1-64 letters, digits, '-', '_' or '.'");
        return ExitCode::FAILURE;
    }
    let token = match generate_token() {
        Ok(token) => token,
        Err(_) => {
            eprintln!("tollgate: the system random source failed");
            return ExitCode::FAILURE;
        }
    };
    let digest = hex::encode(hash_token(token.as_bytes()));
    eprintln!("key for {name} (shown once; hand it to the client, store it nowhere):");
    eprintln!("{token}");
    println!("[[keys]]");
    println!("name = \"{name}\"");
    println!("sha256 = \"{digest}\"");
    ExitCode::SUCCESS
}
