//! `local` state: the managed keys in a file beside the state file (`state/tollgate.db` →
//! `state/tollgate.keys.json`), replaced atomically (temporary file, fsync, rename) on every
//! change and read at start. Small (a few hundred bytes per key) and written only when a key
//! changes, so the whole file is rewritten each time: nothing to compact, never half-written.
//!
//! A file that cannot be read or is not a key file stops the start with a clear error: starting
//! without the keys would refuse every client that holds one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::sync::Mutex;

use super::{ManagedKey, Snapshot, Stored, VaultError};
use crate::state::local::replace_file;

const FILE_VERSION: u32 = 1;

/// The managed keys file, and what it holds.
pub(crate) struct KeyFile {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Each record as stored, by name: the text only (the registry holds them read), so that
    /// 10 000 keys are not held twice.
    keys: BTreeMap<String, String>,
    /// Changes made since the start: the number of the last one.
    version: u64,
}

#[derive(Deserialize)]
struct Contents {
    version: u32,
    keys: Vec<ManagedKey>,
}

/// The managed keys file that belongs to the state file at `state_path`.
pub(crate) fn path_beside(state_path: &Path) -> PathBuf {
    state_path.with_extension("keys.json")
}

impl KeyFile {
    /// Reads the file at `path`; no file is no keys.
    pub(crate) fn open(path: PathBuf) -> Result<KeyFile, String> {
        let keys = match std::fs::read(&path) {
            Ok(bytes) => {
                let contents: Contents = serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "{} is not a managed keys file ({e}); the keys made through the admin API \
                         would be lost. Restore it, or move it aside to start without them",
                        path.display()
                    )
                })?;
                if contents.version != FILE_VERSION {
                    return Err(format!(
                        "{} has version {}, this tollgate reads {FILE_VERSION}",
                        path.display(),
                        contents.version
                    ));
                }
                contents
                    .keys
                    .into_iter()
                    .map(|key| (key.name.clone(), Stored::new(key).raw))
                    .collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        Ok(KeyFile {
            path,
            inner: Mutex::new(Inner { keys, version: 0 }),
        })
    }

    pub(crate) async fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock().await;
        Snapshot {
            keys: inner.keys.values().filter_map(|raw| read(raw)).collect(),
            version: inner.version,
        }
    }

    pub(crate) async fn get(&self, name: &str) -> Option<Stored> {
        self.inner
            .lock()
            .await
            .keys
            .get(name)
            .and_then(|raw| read(raw))
    }

    /// See [`super::Vault::swap`]. The file is written before the change counts: a change that
    /// cannot be saved is not made.
    pub(crate) async fn swap(
        &self,
        name: &str,
        expected: Option<&str>,
        new: Option<&Stored>,
    ) -> Result<u64, VaultError> {
        let mut inner = self.inner.lock().await;
        let current = inner.keys.get(name).map(String::as_str);
        if current != expected {
            return Err(VaultError::Changed);
        }
        let mut keys = inner.keys.clone();
        match new {
            Some(stored) => keys.insert(name.to_owned(), stored.raw.clone()),
            None => keys.remove(name),
        };
        let bytes = encode(&keys);
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || replace_file(&path, &bytes)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return Err(VaultError::Unavailable(format!(
                    "cannot write {}: {error}",
                    self.path.display()
                )))
            }
            Err(error) => return Err(VaultError::Unavailable(error.to_string())),
        }
        inner.keys = keys;
        inner.version += 1;
        Ok(inner.version)
    }
}

/// A record this file wrote (and so can read).
fn read(raw: &str) -> Option<Stored> {
    Stored::parse(raw.to_owned()).ok()
}

/// The file's text: each record as stored, in name order.
fn encode(keys: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = format!("{{\"version\":{FILE_VERSION},\"keys\":[\n").into_bytes();
    for (i, raw) in keys.values().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",\n");
        }
        out.extend_from_slice(raw.as_bytes());
    }
    out.extend_from_slice(b"\n]}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::managed_keys::StoredHash;

    fn record(name: &str) -> Stored {
        Stored::new(ManagedKey {
            name: name.to_owned(),
            fields: serde_json::Map::new(),
            hashes: vec![StoredHash {
                sha256: "ab".repeat(32),
                until: None,
            }],
            created_at: 1,
            updated_at: 1,
        })
    }

    #[tokio::test]
    async fn changes_are_compared_saved_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = path_beside(&dir.path().join("tollgate.db"));
        assert!(path.ends_with("tollgate.keys.json"), "{}", path.display());
        let file = KeyFile::open(path.clone()).expect("no file is no keys");
        let a = record("a");
        assert_eq!(file.swap("a", None, Some(&a)).await.ok(), Some(1));
        assert!(
            matches!(
                file.swap("a", None, Some(&a)).await,
                Err(VaultError::Changed)
            ),
            "a second create finds the first"
        );
        file.swap("b", None, Some(&record("b"))).await.expect("b");
        file.swap("b", Some(&record("b").raw), None)
            .await
            .expect("b removed");
        let again = KeyFile::open(path.clone()).expect("reopened");
        let names: Vec<String> = again
            .snapshot()
            .await
            .keys
            .into_iter()
            .map(|s| s.key.name)
            .collect();
        assert_eq!(names, ["a"]);

        std::fs::write(&path, b"{ not json").expect("corrupt it");
        let error = KeyFile::open(path).err().expect("refused");
        assert!(error.contains("not a managed keys file"), "{error}");
    }
}
