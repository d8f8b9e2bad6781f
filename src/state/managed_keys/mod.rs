//! Where the keys made through the admin API are kept: beside the state, as the state is —
//! a file next to the state file (`local`), or a hash in Redis that every replica follows
//! (`redis`). What is kept per key is its name, the fields a `[[keys]]` entry would hold (as
//! given, so that they are resolved again against the policies in force), the SHA-256 of each
//! token with the end of its grace where it has one, and when it was made and last changed.
//! Never a token.
//!
//! Every change is a compare-and-set on the record as last read ([`Vault::swap`]), so that two
//! replicas changing one key at once cannot lose either change: one of them is told the record
//! changed meanwhile and reads it again. Each change carries a number that grows by one with
//! every change, so that a replica that follows the changes can tell whether it missed one.

pub(crate) mod local;
pub(crate) mod redis;

use serde::{Deserialize, Serialize};

/// One key made through the admin API, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ManagedKey {
    pub(crate) name: String,
    /// What a `[[keys]]` entry would hold besides `name` and `sha256` (`policy`, `models`,
    /// `max_tokens`, `rate`, …), as the API was given them.
    #[serde(default)]
    pub(crate) fields: serde_json::Map<String, serde_json::Value>,
    /// The key's tokens, by their SHA-256: the current one first, then any still in a grace.
    pub(crate) hashes: Vec<StoredHash>,
    /// Unix seconds.
    pub(crate) created_at: u64,
    pub(crate) updated_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredHash {
    /// 64 hex digits.
    pub(crate) sha256: String,
    /// The Unix second from which this token is refused; absent: until the key is revoked or
    /// rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) until: Option<u64>,
}

impl ManagedKey {
    /// The hashes as bytes (a hash that is not hex is skipped: it could match no token anyway)
    /// and the end of each one's grace, in the same order.
    pub(crate) fn digests(&self) -> (Vec<[u8; 32]>, Vec<Option<u64>>) {
        let mut digests = Vec::with_capacity(self.hashes.len());
        let mut until = Vec::with_capacity(self.hashes.len());
        for hash in &self.hashes {
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(&hash.sha256, &mut digest).is_ok() {
                digests.push(digest);
                until.push(hash.until);
            }
        }
        (digests, until)
    }

    /// Forgets the tokens whose grace has ended by `now`.
    pub(crate) fn prune(&mut self, now: u64) {
        self.hashes
            .retain(|hash| hash.until.is_none_or(|until| until > now));
    }

    /// When the grace of the previous token ends, while one runs at `now`.
    pub(crate) fn grace_until(&self, now: u64) -> Option<u64> {
        self.hashes
            .iter()
            .filter_map(|hash| hash.until)
            .filter(|until| *until > now)
            .max()
    }
}

/// A record and the exact text it is stored as (what a compare-and-set compares).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) key: ManagedKey,
    pub(crate) raw: String,
}

impl Stored {
    pub(crate) fn new(key: ManagedKey) -> Stored {
        // A struct of strings, numbers and JSON values always encodes.
        let raw = serde_json::to_string(&key).unwrap_or_default();
        Stored { key, raw }
    }

    /// A record as read back; `None` (logged by the caller) when it is not one.
    pub(crate) fn parse(raw: String) -> Result<Stored, serde_json::Error> {
        let key = serde_json::from_str(&raw)?;
        Ok(Stored { key, raw })
    }
}

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VaultError {
    /// The record is not what the caller last read (or a record exists where none was expected).
    #[error("the key was changed meanwhile")]
    Changed,
    #[error("{0}")]
    Unavailable(String),
}

/// Every managed key and the number of the last change they include.
pub(crate) struct Snapshot {
    pub(crate) keys: Vec<Stored>,
    pub(crate) version: u64,
}

/// The managed keys' store, where the state lives.
pub(crate) enum Vault {
    Local(local::KeyFile),
    Redis(redis::RedisKeys),
}

impl Vault {
    /// Everything stored now.
    pub(crate) async fn load(&self) -> Result<Snapshot, VaultError> {
        match self {
            Vault::Local(file) => Ok(file.snapshot().await),
            Vault::Redis(redis) => redis.load().await,
        }
    }

    /// The record of `name` as stored now.
    pub(crate) async fn get(&self, name: &str) -> Result<Option<Stored>, VaultError> {
        match self {
            Vault::Local(file) => Ok(file.get(name).await),
            Vault::Redis(redis) => redis.get(name).await,
        }
    }

    /// Replaces the record of `name` — which must be `expected` as stored (`None`: no record) —
    /// by `new` (`None`: removes it). Returns the number of this change.
    pub(crate) async fn swap(
        &self,
        name: &str,
        expected: Option<&str>,
        new: Option<&Stored>,
    ) -> Result<u64, VaultError> {
        match self {
            Vault::Local(file) => file.swap(name, expected, new).await,
            Vault::Redis(redis) => redis.swap(name, expected, new).await,
        }
    }

    /// The Redis store, which other replicas change too.
    pub(crate) fn shared(&self) -> Option<&redis::RedisKeys> {
        match self {
            Vault::Redis(redis) => Some(redis),
            Vault::Local(_) => None,
        }
    }
}
