//! Artifacts in object storage on the server ([`fount_artifacts`]): adapters registered
//! through the API are uploaded and registered by their key, fine-tuned models and checkpoints
//! are uploaded when made, tenants' files are kept there as well as on local disk, and every
//! replica fetches an adapter the first time a request needs it, into its cache checked by
//! digest.
//!
//! A location is a local directory or `artifacts:{key}`.

use std::path::Path;

use fount_artifacts::Artifacts;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The prefix of a location in the artifacts store.
pub const SCHEME: &str = "artifacts:";

/// The key of an `artifacts:{key}` location.
pub fn key_of(location: &str) -> Option<&str> {
    location.strip_prefix(SCHEME)
}

/// The key a tenant's file is kept at.
pub fn file_key(tenant_id: &str, file_id: &str) -> String {
    format!("files/{tenant_id}/{file_id}")
}

impl AppState {
    /// Keeps adapters, fine-tuned models and tenants' files in `artifacts` too (once).
    pub fn enable_artifacts(&self, artifacts: Artifacts) {
        let _ = self.artifacts.set(artifacts);
    }

    /// The artifacts store, when configured.
    pub fn artifacts(&self) -> Option<&Artifacts> {
        self.artifacts.get()
    }

    /// Registers adapter `name` at `location` here (an artifacts key is read from the local
    /// cache, fetched on first use).
    pub(crate) fn register_location(&self, name: &str, location: &str, digest: Option<&str>) {
        self.register_adapter(name, self.adapter_dir(location, digest));
        self.registry.applied(name, location, digest);
    }

    /// Makes sure adapter `name`'s files are on local disk: an adapter kept in the artifacts
    /// store is fetched into the cache (its digest checked) the first time a request needs it.
    pub(crate) async fn ready_adapter(&self, name: &str) -> ApiResult<()> {
        let Some((location, digest)) = self.registry.location(name) else {
            return Ok(());
        };
        let (Some(key), Some(a)) = (key_of(&location), self.artifacts()) else {
            return Ok(());
        };
        let dir = a.cache_dir(digest.as_deref().unwrap_or("unknown"));
        if dir.join(fount_artifacts::MANIFEST).exists() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        a.fetch_dir(key, digest.as_deref()).await.map_err(|e| {
            tracing::error!(adapter = %name, error = %e, "fetching an adapter from the artifacts store");
            ApiError::Internal(format!("the adapter's files could not be fetched: {e}"))
        })?;
        tracing::info!(adapter = %name, key, ms = started.elapsed().as_millis() as u64, "adapter fetched from the artifacts store");
        Ok(())
    }

    /// Uploads the adapter in `dir` under `adapters/{name}/{digest}`; returns its location and
    /// digest.
    pub(crate) async fn upload_adapter(
        &self,
        a: &Artifacts,
        name: &str,
        dir: &Path,
    ) -> Result<(String, String), fount_artifacts::Error> {
        let m = {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || fount_artifacts::manifest_of(&dir))
                .await
                .map_err(|e| fount_artifacts::Error::Store(e.to_string()))??
        };
        let key = format!("adapters/{name}/{}", m.digest);
        if a.manifest(&key).await.is_err() {
            a.put_dir(dir, &key).await?;
        }
        Ok((format!("{SCHEME}{key}"), m.digest))
    }
}
