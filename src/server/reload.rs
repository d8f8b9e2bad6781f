//! Reloading the config without a restart: on SIGHUP, and when the config file changes.
//!
//! What a reload changes: the keys and their limits (those of the managed keys too, resolved
//! against the new policies), prices and groups, for new requests (in-flight requests and streams
//! run on undisturbed, and settle at the prices they reserved at); the upstream pools — pools and
//! endpoints added or removed, their models, balance, ejection, health checks and client settings
//! — for new requests (a request in flight on a removed endpoint finishes there; an endpoint that
//! stays keeps its state and its connections); and the certificates of both listeners, for new
//! handshakes. A key removed is refused from the next request; a key (or group) whose name and
//! rate are unchanged keeps its limiter state; a quota window keeps its usage when its limit
//! changes (the usage is counted by window, not by limit). A reload that would break a managed
//! key (a policy or group it uses removed, its name taken by a file key) is refused. Every other
//! setting is read only at start: each one that changed is logged,
//! one warning naming it, and left as it was ([`super::restart_only`]). An invalid new config is
//! refused with its reason logged, and the running config stays in force.
//!
//! The file is watched by polling its modification time and length every
//! [`FILE_POLL_INTERVAL`]: no platform notify machinery, and editors that replace the file by
//! rename are seen like any other write.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::config::{Config, ConfigError};
use crate::keys::registry::KeyRegistry;
use crate::observability::metrics::Metrics;
use crate::proxy::pool::{Pools, SharedPools};
use crate::server::restart_only;
use crate::server::tls::CertResolver;
use crate::state::Backend;

pub(crate) const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What a successful reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub(crate) keys: usize,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// The config keys of settings that changed but need a restart (each logged).
    pub(crate) not_applied: Vec<&'static str>,
    /// The upstream pools now in force, by name.
    pub upstreams: Vec<String>,
}

pub struct Reloader {
    path: PathBuf,
    /// The file's keys and the managed ones, put together into the live table.
    registry: Arc<KeyRegistry>,
    /// The upstream pools in force, and the idle-connection slots each new endpoint needs.
    pools: (SharedPools, usize),
    /// The certificates of the client and the admin listener, re-read on every reload.
    tls: [Option<Arc<CertResolver>>; 2],
    /// For the series of pools and endpoints a reload adds.
    metrics: Arc<Metrics>,
    /// Where the windows of keys a reload adds are read, for their gauges.
    backend: Arc<Backend>,
    /// The config in force, to tell what a new one changes.
    current: Mutex<Config>,
}

impl Reloader {
    pub(crate) fn new(
        path: PathBuf,
        registry: Arc<KeyRegistry>,
        pools: (SharedPools, usize),
        tls: [Option<Arc<CertResolver>>; 2],
        metrics: Arc<Metrics>,
        backend: Arc<Backend>,
        current: Config,
    ) -> Self {
        Reloader {
            path,
            registry,
            pools,
            tls,
            metrics,
            backend,
            current: Mutex::new(current),
        }
    }

    /// Reads the config file again and applies it, or leaves everything as it was.
    pub fn reload(&self) -> Result<ReloadSummary, ConfigError> {
        let new = Config::load(&self.path)?;
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Certificates first: files that do not load refuse the whole reload.
        let [client, admin] = &self.tls;
        let pairs = [
            (client, &new.server.tls, "server.tls"),
            (admin, &new.server.admin_tls, "server.admin_tls"),
        ];
        for (resolver, files, key) in pairs {
            if let (Some(resolver), Some(files)) = (resolver, files) {
                resolver
                    .reload(&files.cert, &files.key)
                    .map_err(|e| ConfigError::new(format!("{key}: {e}")))?;
            }
        }
        // The pools next: a TLS root file that does not load refuses the whole reload too.
        let (shared_pools, slots) = &self.pools;
        let pools = Pools::build(
            &new.upstreams,
            Some(&shared_pools.load()),
            *slots,
            &self.metrics,
        )
        .map_err(|e| ConfigError::new(format!("upstreams: {e}")))?;
        let not_applied = restart_only::changed(&current, &new);
        for setting in &not_applied {
            tracing::warn!("config reload: {setting} changed but is read only at start; not applied until a restart");
        }
        let (old_store, store) = self
            .registry
            .set_config(new.keys.clone(), new.policies.clone())?;
        let mut summary = ReloadSummary {
            keys: store.key_count(),
            added: store
                .names()
                .filter(|name| old_store.get(name).is_none())
                .map(|name| name.to_string())
                .collect(),
            removed: old_store
                .names()
                .filter(|name| store.get(name).is_none())
                .map(|name| name.to_string())
                .collect(),
            not_applied,
            upstreams: new.upstreams.iter().map(|p| p.name.to_string()).collect(),
        };
        shared_pools.store(Arc::new(pools));
        summary.added.sort();
        summary.removed.sort();
        let added = summary
            .added
            .iter()
            .filter_map(|name| store.get(name).cloned())
            .collect();
        // Every group's gauges: a group added, or whose quotas changed, has new series.
        let groups = store.groups().cloned().collect();
        // A reload is run from the runtime (SIGHUP, the file watcher) or from a test's.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let backend = self.backend.clone();
            runtime.spawn(async move { backend.publish_windows(added, groups).await });
        }
        current.keys = new.keys;
        current.upstreams = new.upstreams;
        current.budgets = new.budgets;
        Ok(summary)
    }

    /// Reloads and logs the outcome; an error keeps the running config.
    pub(crate) fn reload_and_log(&self, trigger: &str) {
        match self.reload() {
            Ok(summary) => tracing::info!(
                trigger,
                keys = summary.keys,
                added = ?summary.added,
                removed = ?summary.removed,
                not_applied = summary.not_applied.len(),
                upstreams = ?summary.upstreams,
                "config reloaded"
            ),
            Err(error) => tracing::error!(
                trigger,
                %error,
                "config reload refused; the running config stays in force"
            ),
        }
    }

    /// Runs until the process ends: reloads on SIGHUP and when the file changes.
    pub(crate) async fn watch(self: Arc<Self>) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGHUP; reload on file change only");
                None
            }
        };
        let mut seen = file_stamp(&self.path);
        let mut poll = tokio::time::interval(FILE_POLL_INTERVAL);
        loop {
            let hangup_received = async {
                match hangup.as_mut() {
                    Some(stream) => stream.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = hangup_received => {
                    seen = file_stamp(&self.path);
                    self.reload_and_log("SIGHUP");
                }
                _ = poll.tick() => {
                    let stamp = file_stamp(&self.path);
                    if stamp != seen {
                        seen = stamp;
                        self.reload_and_log("file changed");
                    }
                }
            }
        }
    }
}

/// Modification time and length: enough to notice a write or a replacement.
fn file_stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
