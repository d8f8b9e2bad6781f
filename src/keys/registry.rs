//! The key registry: the keys of the config file and the keys made through the admin API, put
//! into the one live table the auth layer reads ([`KeyStore`]), rebuilt whenever either changes.
//!
//! A managed key is stored as the fields a `[[keys]]` entry would hold and resolved against the
//! policies in force by the config's own code ([`Policies::resolve`]): the API accepts what the
//! file accepts and refuses it in the file's words, and a reload that changes a policy changes
//! the managed keys that use it. A reload that would break one (its policy removed) or take its
//! name (a file key of the same name) is refused, as an invalid file is.
//!
//! Changes are made in the store first and applied here after: what the API answers is what
//! is stored. Each change carries its number in the store; applying change N+1 on top of N
//! keeps this replica in step, a gap is left to the follower's full read ([`super::follow`]).
//! Key names are their usage's identity (quota windows, limiter, in-flight count): a patched key
//! keeps them all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::config::{ConfigError, KeyConfig, Policies};
use crate::keys::{generate_token, hash_token, KeyOrigin, KeySpec, KeyStore, SharedKeys};
use crate::observability::metrics::Metrics;
use crate::state::clock::Clock;
use crate::state::managed_keys::{ManagedKey, Snapshot, Stored, StoredHash, Vault, VaultError};

/// Attempts at a change that other replicas keep changing under it.
const ATTEMPTS: usize = 5;

/// Why a change through the admin API was not made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("key {0:?} is defined in the config file; change it there")]
    InConfig(String),
    #[error("a key named {0:?} exists already")]
    Exists(String),
    #[error("no managed key named {0:?}")]
    NotFound(String),
    /// The config's own message.
    #[error("{0}")]
    Invalid(String),
    #[error("the managed keys cannot be stored: {0}")]
    Unavailable(String),
    #[error("key {0:?} kept changing meanwhile; try again")]
    Busy(String),
    #[error("the system random source failed")]
    Random,
}

pub(crate) struct KeyRegistry {
    live: SharedKeys,
    clock: Clock,
    metrics: Arc<Metrics>,
    pub(crate) vault: Vault,
    inner: Mutex<Inner>,
}

struct Inner {
    config_keys: Vec<KeyConfig>,
    policies: Policies,
    managed: BTreeMap<String, Managed>,
    /// The number of the store's last change this table includes.
    version: u64,
}

struct Managed {
    stored: Stored,
    /// `None` while it does not resolve against this replica's config (logged).
    resolved: Option<(KeyConfig, Vec<Option<u64>>)>,
}

impl KeyRegistry {
    pub(crate) fn new(
        live: SharedKeys,
        clock: Clock,
        metrics: Arc<Metrics>,
        vault: Vault,
        config_keys: Vec<KeyConfig>,
        policies: Policies,
    ) -> KeyRegistry {
        KeyRegistry {
            live,
            clock,
            metrics,
            vault,
            inner: Mutex::new(Inner {
                config_keys,
                policies,
                managed: BTreeMap::new(),
                version: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn now(&self) -> u64 {
        self.clock.unix_secs()
    }

    /// Takes every managed key from `snapshot` (the store read whole) in place of those known.
    pub(crate) fn replace_all(&self, snapshot: Snapshot) {
        let mut inner = self.lock();
        if snapshot.version < inner.version {
            // Read before a change this replica has applied since: the next resync reads again.
            return;
        }
        let mut managed = BTreeMap::new();
        for stored in snapshot.keys {
            let name = stored.key.name.clone();
            let entry = match inner.managed.remove(&name) {
                Some(known) if known.stored.raw == stored.raw => known,
                _ => resolve(&inner.policies, stored),
            };
            managed.insert(name, entry);
        }
        inner.managed = managed;
        inner.version = snapshot.version;
        self.rebuild(&inner);
    }

    /// Applies change number `version` of the store: `name` is now `stored` (`None`: gone).
    /// A change this table already includes is ignored; one past a gap is applied, and the gap
    /// left for the follower's full read to close.
    pub(crate) fn apply(&self, version: u64, name: &str, stored: Option<Stored>) {
        let mut inner = self.lock();
        if version <= inner.version {
            return;
        }
        if version == inner.version + 1 {
            inner.version = version;
        }
        match stored {
            Some(stored) => {
                let entry = resolve(&inner.policies, stored);
                inner.managed.insert(name.to_owned(), entry);
            }
            None => {
                inner.managed.remove(name);
            }
        }
        self.rebuild(&inner);
    }

    /// The number of the store's last change this table includes.
    pub(crate) fn version(&self) -> u64 {
        self.lock().version
    }

    /// A reload's keys and policies, with the managed keys resolved against them; refused
    /// (nothing changes) when a managed key would not resolve or a file key takes its name.
    /// Returns the table before and after.
    pub(crate) fn set_config(
        &self,
        config_keys: Vec<KeyConfig>,
        policies: Policies,
    ) -> Result<(Arc<KeyStore>, Arc<KeyStore>), ConfigError> {
        let mut inner = self.lock();
        let mut managed = BTreeMap::new();
        for (name, known) in &inner.managed {
            if config_keys.iter().any(|key| &*key.name == name) {
                return Err(ConfigError::new(format!(
                    "key {name:?} is in the file and also a managed key (made through the admin \
                     API); revoke the managed key first (tollgate keys revoke {name}) or rename one"
                )));
            }
            let config = resolve_stored(&policies, &known.stored.key, self.now()).map_err(|e| {
                ConfigError::new(format!(
                    "managed key {name:?} would no longer resolve: {e}; change it through the \
                     admin API first, or keep what it uses"
                ))
            })?;
            let entry = Managed {
                stored: known.stored.clone(),
                resolved: Some(config),
            };
            managed.insert(name.clone(), entry);
        }
        inner.config_keys = config_keys;
        inner.policies = policies;
        inner.managed = managed;
        let before = self.live.load_full();
        self.rebuild(&inner);
        Ok((before, self.live.load_full()))
    }

    /// Puts every key into a new live table.
    fn rebuild(&self, inner: &Inner) {
        let old = self.live.load();
        let config = inner.config_keys.iter().map(|config| KeySpec {
            config,
            origin: KeyOrigin::Config,
            until: &[],
        });
        let managed = inner
            .managed
            .iter()
            // A file key of the same name (another replica's config) wins here.
            .filter(|(name, _)| !inner.config_keys.iter().any(|k| &*k.name == *name))
            .filter_map(|(_, managed)| managed.resolved.as_ref())
            .map(|(config, until)| KeySpec {
                config,
                origin: KeyOrigin::Api,
                until,
            });
        let specs: Vec<KeySpec<'_>> = config.chain(managed).collect();
        let store = KeyStore::assemble(
            &specs,
            inner.policies.budgets(),
            Some(&old),
            old.clock(),
            &self.metrics,
        );
        self.live.store(Arc::new(store));
    }

    /// Every managed key as stored, as this replica knows them.
    pub(crate) fn known(&self) -> Vec<Stored> {
        self.lock()
            .managed
            .values()
            .map(|m| m.stored.clone())
            .collect()
    }

    /// The stored record of a managed key, for the admin API.
    pub(crate) fn managed(&self, name: &str) -> Option<ManagedKey> {
        self.lock().managed.get(name).map(|m| m.stored.key.clone())
    }

    fn refuse_config_key(&self, name: &str) -> Result<(), KeyError> {
        let inner = self.lock();
        if inner.config_keys.iter().any(|key| &*key.name == name) {
            return Err(KeyError::InConfig(name.to_owned()));
        }
        Ok(())
    }

    /// Checks a record against the policies in force, in the config's words.
    fn validate(&self, key: &ManagedKey) -> Result<(), KeyError> {
        let policies = self.lock().policies.clone();
        resolve_stored(&policies, key, self.now())
            .map(drop)
            .map_err(|e| KeyError::Invalid(e.to_string()))
    }

    /// A new key of `fields`; its token, shown this once.
    pub(crate) async fn create(
        &self,
        name: &str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, KeyError> {
        self.refuse_config_key(name)?;
        let token = generate_token().map_err(|_| KeyError::Random)?;
        let now = self.now();
        let key = ManagedKey {
            name: name.to_owned(),
            fields,
            hashes: vec![StoredHash {
                sha256: hex::encode(hash_token(token.as_bytes())),
                until: None,
            }],
            created_at: now,
            updated_at: now,
        };
        self.validate(&key)?;
        let stored = Stored::new(key);
        match self.vault.swap(name, None, Some(&stored)).await {
            Ok(version) => self.apply(version, name, Some(stored)),
            Err(VaultError::Changed) => return Err(KeyError::Exists(name.to_owned())),
            Err(VaultError::Unavailable(why)) => return Err(KeyError::Unavailable(why)),
        }
        Ok(token)
    }

    /// Sets the fields in `changes` on `name` (a null removes the key's own value).
    pub(crate) async fn patch(
        &self,
        name: &str,
        changes: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), KeyError> {
        self.change(name, |key| {
            for (field, value) in changes {
                if value.is_null() {
                    key.fields.remove(field);
                } else {
                    key.fields.insert(field.clone(), value.clone());
                }
            }
            Ok(())
        })
        .await
    }

    /// A new token for `name`; the ones it had keep working for `grace` (none: they stop now).
    /// Returns the new token and when the old ones stop.
    pub(crate) async fn rotate(
        &self,
        name: &str,
        grace: Duration,
    ) -> Result<(String, Option<u64>), KeyError> {
        let token = generate_token().map_err(|_| KeyError::Random)?;
        let sha256 = hex::encode(hash_token(token.as_bytes()));
        let now = self.now();
        let until = (!grace.is_zero()).then(|| now.saturating_add(grace.as_secs().max(1)));
        self.change(name, |key| {
            let mut hashes = vec![StoredHash {
                sha256: sha256.clone(),
                until: None,
            }];
            if let Some(until) = until {
                hashes.extend(key.hashes.iter().map(|old| StoredHash {
                    sha256: old.sha256.clone(),
                    until: Some(old.until.map_or(until, |u| u.min(until))),
                }));
            }
            key.hashes = hashes;
            Ok(())
        })
        .await?;
        Ok((token, until))
    }

    /// Removes `name`: refused from its next request.
    pub(crate) async fn revoke(&self, name: &str) -> Result<(), KeyError> {
        self.refuse_config_key(name)?;
        for _ in 0..ATTEMPTS {
            let current = self.current(name).await?;
            match self.vault.swap(name, Some(&current.raw), None).await {
                Ok(version) => {
                    self.apply(version, name, None);
                    return Ok(());
                }
                Err(VaultError::Changed) => continue,
                Err(VaultError::Unavailable(why)) => return Err(KeyError::Unavailable(why)),
            }
        }
        Err(KeyError::Busy(name.to_owned()))
    }

    /// The record as stored now.
    async fn current(&self, name: &str) -> Result<Stored, KeyError> {
        match self.vault.get(name).await {
            Ok(Some(stored)) => Ok(stored),
            Ok(None) => Err(KeyError::NotFound(name.to_owned())),
            Err(error) => Err(KeyError::Unavailable(error.to_string())),
        }
    }

    /// Reads `name`, changes it with `edit`, checks it, and stores it if nobody changed it
    /// meanwhile (else reads it again).
    async fn change(
        &self,
        name: &str,
        edit: impl Fn(&mut ManagedKey) -> Result<(), KeyError>,
    ) -> Result<(), KeyError> {
        self.refuse_config_key(name)?;
        for _ in 0..ATTEMPTS {
            let current = self.current(name).await?;
            let mut key = current.key.clone();
            let now = self.now();
            key.prune(now);
            edit(&mut key)?;
            key.updated_at = now;
            self.validate(&key)?;
            let stored = Stored::new(key);
            match self
                .vault
                .swap(name, Some(&current.raw), Some(&stored))
                .await
            {
                Ok(version) => {
                    self.apply(version, name, Some(stored));
                    return Ok(());
                }
                Err(VaultError::Changed) => continue,
                Err(VaultError::Unavailable(why)) => return Err(KeyError::Unavailable(why)),
            }
        }
        Err(KeyError::Busy(name.to_owned()))
    }
}

/// A stored key resolved against `policies`, with the end of each token's grace.
fn resolve_stored(
    policies: &Policies,
    key: &ManagedKey,
    now: u64,
) -> Result<(KeyConfig, Vec<Option<u64>>), ConfigError> {
    let mut key = key.clone();
    key.prune(now);
    let (digests, until) = key.digests();
    let config = policies.resolve(&key.name, &key.fields, &digests)?;
    Ok((config, until))
}

/// A record read from the store, resolved; one that does not resolve here is logged and kept
/// out of the table until it does.
fn resolve(policies: &Policies, stored: Stored) -> Managed {
    // The table checks each token's grace at lookup; expired ones need no pruning here.
    let resolved = match resolve_stored(policies, &stored.key, 0) {
        Ok(resolved) => Some(resolved),
        Err(error) => {
            tracing::error!(
                key = %stored.key.name,
                %error,
                "managed key does not resolve against this replica's config; refused here until it does"
            );
            None
        }
    };
    Managed { stored, resolved }
}
