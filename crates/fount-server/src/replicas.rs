//! Replicas of one service: several `fount serve` processes behind one address, on one store.
//!
//! - The adapter registry: adapters registered through the API are written to the store and
//!   every replica picks changes up within [`REGISTRY_POLL`] (the store's registry version is
//!   read that often; a registration on this replica applies here at once).
//! - On PostgreSQL, shared quotas and the sweep: requests are admitted against the store's
//!   rate windows ([`crate::tenancy::Tenancy::share`]); every replica renews its heartbeat each
//!   [`BEAT`] and records, as abandoned, the open requests of any replica silent for
//!   [`DEAD_AFTER`] (a replica killed with SIGKILL). A replica that stops cleanly leaves.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fount_store::{now_ms, AdapterEntry, Backend, Store};

use crate::state::AppState;

/// How often the store's registry version is read.
pub const REGISTRY_POLL: Duration = Duration::from_millis(200);

/// How often a replica renews its heartbeat and sweeps.
pub const BEAT: Duration = Duration::from_secs(1);

/// A replica silent this long is taken for dead and its open requests are recorded.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);

/// What this replica has applied of the store's adapter registry.
#[derive(Debug, Default)]
pub struct Registry {
    /// The registry version applied.
    version: Mutex<i64>,
    /// Adapters applied here: name → (location, digest).
    known: Mutex<HashMap<String, (String, Option<String>)>>,
    /// Set when this replica left at a clean stop: its heartbeat stops.
    left: Arc<AtomicBool>,
}

impl Registry {
    /// Notes `name` as applied at `location` (so the poll does not apply it again).
    pub(crate) fn applied(&self, name: &str, location: &str, digest: Option<&str>) {
        if let Ok(mut k) = self.known.lock() {
            k.insert(
                name.to_string(),
                (location.to_string(), digest.map(str::to_string)),
            );
        }
    }

    /// Notes `name` as removed here.
    pub(crate) fn forget(&self, name: &str) {
        if let Ok(mut k) = self.known.lock() {
            k.remove(name);
        }
    }

    /// Where adapter `name` was registered from, when through the registry.
    pub(crate) fn location(&self, name: &str) -> Option<(String, Option<String>)> {
        self.known.lock().ok()?.get(name).cloned()
    }

    fn is_applied(&self, e: &AdapterEntry) -> bool {
        self.known.lock().is_ok_and(|k| {
            k.get(&e.name)
                .is_some_and(|(l, d)| *l == e.location && *d == e.digest)
        })
    }
}

/// Applies the registry's changes since the last version applied.
async fn sync(state: &AppState, store: &Store) -> Result<(), fount_store::Error> {
    let seen = state.registry.version.lock().map_or(0, |v| *v);
    if store.registry_version().await? == seen {
        return Ok(());
    }
    let mut last = seen;
    for e in store.registry_since(seen).await? {
        last = last.max(e.version);
        if e.removed {
            if state
                .registry
                .known
                .lock()
                .is_ok_and(|k| k.contains_key(&e.name))
            {
                state.engine.adapters().remove(&e.name);
                if let Ok(mut t) = state.adapter_times.lock() {
                    t.remove(&e.name);
                }
                state.registry.forget(&e.name);
            }
            continue;
        }
        if state.registry.is_applied(&e) {
            continue;
        }
        state.register_location(&e.name, &e.location, e.digest.as_deref());
        tracing::info!(adapter = %e.name, version = e.version, "registry: adapter registered");
    }
    if let Ok(mut v) = state.registry.version.lock() {
        *v = last;
    }
    Ok(())
}

impl AppState {
    /// Where adapter files at `location` are read from here: a local directory as it is, an
    /// artifacts key in the local cache (fetched on first use, [`AppState::fetch_adapter`]).
    pub(crate) fn adapter_dir(&self, location: &str, digest: Option<&str>) -> PathBuf {
        match (crate::artifacts::key_of(location), self.artifacts()) {
            (Some(_), Some(a)) => a.cache_dir(digest.unwrap_or("unknown")),
            _ => PathBuf::from(location),
        }
    }

    /// Joins the replicas on this store: applies the adapter registry now and follows it; on
    /// PostgreSQL also shares quotas with every other replica, renews this replica's heartbeat
    /// and sweeps dead replicas' requests. Returns this replica's id on PostgreSQL. Needs
    /// tenancy ([`AppState::enable_tenancy`]); once.
    pub async fn enable_replicas(
        self: &Arc<Self>,
        address: &str,
    ) -> Result<Option<String>, fount_store::Error> {
        let Some(tenancy) = self.tenancy() else {
            return Ok(None);
        };
        let store = tenancy.store().clone();
        sync(self, &store).await?;
        let me = Arc::downgrade(self);
        let poll_store = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REGISTRY_POLL).await;
                let Some(state) = me.upgrade() else { return };
                if let Err(e) = sync(&state, &poll_store).await {
                    tracing::error!(error = %e, "reading the adapter registry");
                }
            }
        });
        if store.backend() != Backend::Postgres {
            return Ok(None);
        }
        let id = format!(
            "rep_{}",
            crate::answer::random_id("r").trim_start_matches("r-")
        );
        store.join_replica(&id, address, now_ms()).await?;
        tenancy.share(&id);
        let (beat_id, address) = (id.clone(), address.to_string());
        let left = self.registry.left.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(BEAT).await;
                if left.load(Ordering::SeqCst) {
                    return;
                }
                let now = now_ms();
                match store.heartbeat(&beat_id, now).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // silent for too long (a stalled process): the others recorded its
                        // open requests; it joins again and goes on
                        tracing::error!(replica = %beat_id, "this replica was taken for dead; joining again");
                        if let Err(e) = store.join_replica(&beat_id, &address, now).await {
                            tracing::error!(error = %e, "joining the replicas again");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "renewing this replica's heartbeat"),
                }
                let dead_before = now - i64::try_from(DEAD_AFTER.as_millis()).unwrap_or(5_000);
                match store.sweep(dead_before, now).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        records = n,
                        "recorded a dead replica's open requests as abandoned"
                    ),
                    Err(e) => tracing::error!(error = %e, "sweeping dead replicas"),
                }
            }
        });
        tracing::info!(replica = %id, "replica joined: quotas shared through PostgreSQL");
        Ok(Some(id))
    }

    /// Leaves the replicas at a clean stop, after the last usage record is written.
    pub async fn leave_replicas(&self) {
        let Some(t) = self.tenancy() else { return };
        if let Some(id) = t.replica() {
            self.registry.left.store(true, Ordering::SeqCst);
            if let Err(e) = t.store().leave_replica(id).await {
                tracing::warn!(error = %e, "leaving the replicas");
            }
        }
    }
}
