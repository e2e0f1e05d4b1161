//! `fount-artifacts`: artifacts in object storage for fount's replicas: models, adapters, curated shards, fine-tuning files and
//! checkpoints at `s3://bucket/prefix` (AWS S3 or any S3-compatible server; the endpoint and
//! credentials come from the `AWS_*` environment: `AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`) or in a local directory
//! (`file:///dir` or a path), through one code path (`object_store`).
//!
//! A directory is stored as its files under a key plus `fount-manifest.json`: each file's
//! SHA-256 and the directory's digest (SHA-256 of the sorted `path\0sha256\n` lines). A fetch
//! downloads into a local cache named by the digest, checks every file against the manifest
//! (and the digest against the one expected, when given) and only then makes the directory
//! visible, so a cached directory is always whole and what was stored.
//!
//! ```no_run
//! # async fn run() -> fount_artifacts::Result<()> {
//! use fount_artifacts::Artifacts;
//! let a = Artifacts::open("s3://models/fount", "cache")?;
//! let stored = a.put_dir("adapters/sql".as_ref(), "adapters/sql").await?;
//! let local = a.fetch_dir("adapters/sql", Some(&stored.digest)).await?;
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Everything that can go wrong with artifacts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object store failed an operation.
    #[error("object store: {0}")]
    Store(String),
    /// A local file or directory could not be used.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A key, URL or stored artifact fount cannot use (a digest that does not match included).
    #[error("{0}")]
    Invalid(String),
    /// No such artifact.
    #[error("{0} not found")]
    NotFound(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The manifest stored beside a directory's files.
pub const MANIFEST: &str = "fount-manifest.json";

/// Where the artifacts are, and the local cache.
#[derive(Debug, Clone)]
pub struct Artifacts {
    inner: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    url: String,
    cache: PathBuf,
}

/// A stored directory's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The directory's digest.
    pub digest: String,
    /// `(path relative to the directory, SHA-256)`, sorted by path.
    pub files: Vec<(String, String)>,
}

impl Manifest {
    fn of(mut files: Vec<(String, String)>) -> Manifest {
        files.sort();
        let mut h = Sha256::new();
        for (path, sha) in &files {
            h.update(path.as_bytes());
            h.update([0]);
            h.update(sha.as_bytes());
            h.update(b"\n");
        }
        Manifest {
            digest: hex(&h.finalize()),
            files,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn store_error(e: object_store::Error) -> Error {
    Error::Store(e.to_string())
}

/// A key or relative path fount accepts: no empty, `.` or `..` parts, no backslashes.
fn checked(key: &str) -> Result<&str> {
    let key = key.trim_matches('/');
    if key.is_empty()
        || key.contains('\\')
        || key
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(Error::Invalid(format!("{key:?} is not an artifact key")));
    }
    Ok(key)
}

/// Refuses a key fount does not accept (what every operation checks), for callers that want to
/// know before they start long work.
pub fn check_key(key: &str) -> Result<()> {
    checked(key).map(|_| ())
}

/// The SHA-256 of a file, read in chunks.
fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = fs_err::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Every file under `dir`, as paths relative to it with `/` between parts.
fn files_under(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs_err::read_dir(&d)? {
            let e = e?;
            let path = e.path();
            if e.file_type()?.is_dir() {
                todo.push(path);
            } else if let Ok(rel) = path.strip_prefix(dir) {
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The manifest of a local directory.
pub fn manifest_of(dir: &Path) -> Result<Manifest> {
    let mut files = Vec::new();
    for rel in files_under(dir)? {
        if rel == MANIFEST {
            continue;
        }
        files.push((rel.clone(), sha256_file(&dir.join(&rel))?));
    }
    if files.is_empty() {
        return Err(Error::Invalid(format!("{} has no files", dir.display())));
    }
    Ok(Manifest::of(files))
}

impl Artifacts {
    /// Artifacts at `url` (`s3://bucket[/prefix]`, `file:///dir` or a directory path), with
    /// fetched directories cached under `cache`.
    pub fn open(url: &str, cache: impl Into<PathBuf>) -> Result<Artifacts> {
        let (inner, prefix): (Arc<dyn ObjectStore>, ObjectPath) = if let Some(rest) =
            url.strip_prefix("s3://")
        {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(Error::Invalid(format!("{url:?} names no bucket")));
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(store_error)?;
            (Arc::new(s3), ObjectPath::from(prefix.trim_matches('/')))
        } else if url.contains("://") && !url.starts_with("file://") {
            return Err(Error::Invalid(format!(
                    "unsupported artifacts URL {url:?} (s3://bucket/prefix, file:///dir or a directory)"
                )));
        } else {
            let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
            fs_err::create_dir_all(&dir)?;
            let fs =
                object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(store_error)?;
            (Arc::new(fs), ObjectPath::from(""))
        };
        Ok(Artifacts {
            inner,
            prefix,
            url: url.to_string(),
            cache: cache.into(),
        })
    }

    /// The URL the artifacts were opened at.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where the directory of `digest` is cached.
    pub fn cache_dir(&self, digest: &str) -> PathBuf {
        self.cache.join(digest)
    }

    fn path(&self, key: &str) -> Result<ObjectPath> {
        let key = checked(key)?;
        Ok(self
            .prefix
            .parts()
            .chain(ObjectPath::from(key).parts())
            .collect())
    }

    /// Uploads `file` to `key` (streamed, in parts when large).
    pub async fn put_file(&self, file: &Path, key: &str) -> Result<()> {
        let mut from = tokio::fs::File::open(file).await?;
        let mut to = object_store::buffered::BufWriter::new(self.inner.clone(), self.path(key)?);
        if let Err(e) = tokio::io::copy(&mut from, &mut to).await {
            let _ = to.abort().await;
            return Err(e.into());
        }
        to.shutdown().await?;
        Ok(())
    }

    /// Downloads `key` to `to` (written beside it first, then renamed: never half there).
    pub async fn fetch_file(&self, key: &str, to: &Path) -> Result<()> {
        let got = self
            .inner
            .get(&self.path(key)?)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => {
                    Error::NotFound(format!("artifact {key:?}"))
                }
                e => store_error(e),
            })?;
        if let Some(parent) = to.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let partial = to.with_extension(format!("partial-{:08x}", rand::random::<u32>()));
        let written = async {
            let mut out = tokio::fs::File::create(&partial).await?;
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk.map_err(store_error)?).await?;
            }
            out.sync_all().await?;
            tokio::fs::rename(&partial, to).await?;
            Ok::<(), Error>(())
        }
        .await;
        if written.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        written
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        match self.inner.head(&self.path(key)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Deletes `key` (a missing key is not an error).
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&self.path(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Keys under `key`, relative to it, sorted.
    pub async fn list(&self, key: &str) -> Result<Vec<String>> {
        let base = self.path(key)?;
        let mut out = Vec::new();
        let mut stream = self.inner.list(Some(&base));
        while let Some(meta) = stream.next().await {
            let meta = meta.map_err(store_error)?;
            let rel = meta
                .location
                .prefix_match(&base)
                .map(|rel| rel.map(|p| p.as_ref().to_string()).collect::<Vec<_>>());
            if let Some(rel) = rel {
                out.push(rel.join("/"));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Uploads the files of `dir` under `key` and its manifest last (a directory without a
    /// manifest is incomplete and never fetched).
    pub async fn put_dir(&self, dir: &Path, key: &str) -> Result<Manifest> {
        let manifest = {
            let dir = dir.to_path_buf();
            tokio::task::spawn_blocking(move || manifest_of(&dir))
                .await
                .map_err(|e| Error::Store(e.to_string()))??
        };
        for (rel, _) in &manifest.files {
            self.put_file(&dir.join(rel), &format!("{key}/{rel}"))
                .await?;
        }
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
        self.inner
            .put(
                &self.path(&format!("{key}/{MANIFEST}"))?,
                PutPayload::from(json),
            )
            .await
            .map_err(store_error)?;
        Ok(manifest)
    }

    /// The manifest of the directory stored at `key`.
    pub async fn manifest(&self, key: &str) -> Result<Manifest> {
        let path = self.path(&format!("{key}/{MANIFEST}"))?;
        let bytes = match self.inner.get(&path).await {
            Ok(g) => g.bytes().await.map_err(store_error)?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::NotFound(format!(
                    "artifact directory {key:?} (no {MANIFEST})"
                )))
            }
            Err(e) => return Err(store_error(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(format!("{key}/{MANIFEST}: {e}")))
    }

    /// The directory stored at `key`, in the local cache: downloaded unless cached, each file
    /// checked against the manifest and the digest against `expected` (when given).
    pub async fn fetch_dir(&self, key: &str, expected: Option<&str>) -> Result<PathBuf> {
        if let Some(d) = expected {
            let cached = self.cache_dir(d);
            if cached.join(MANIFEST).exists() {
                return Ok(cached);
            }
        }
        let manifest = self.manifest(key).await?;
        let recomputed = Manifest::of(manifest.files.clone());
        if recomputed.digest != manifest.digest {
            return Err(Error::Invalid(format!(
                "artifact {key:?}: its manifest's digest {} is not its files' {}",
                manifest.digest, recomputed.digest
            )));
        }
        if let Some(d) = expected {
            if d != manifest.digest {
                return Err(Error::Invalid(format!(
                    "artifact {key:?} has digest {}, not the {d} expected",
                    manifest.digest
                )));
            }
        }
        let done = self.cache_dir(&manifest.digest);
        if done.join(MANIFEST).exists() {
            return Ok(done);
        }
        let partial = self.cache.join(format!(
            ".{}.partial-{:08x}",
            manifest.digest,
            rand::random::<u32>()
        ));
        let fetched = async {
            for (rel, sha) in &manifest.files {
                checked(rel)?;
                let to = partial.join(rel);
                self.fetch_file(&format!("{key}/{rel}"), &to).await?;
                let got = {
                    let to = to.clone();
                    tokio::task::spawn_blocking(move || sha256_file(&to))
                        .await
                        .map_err(|e| Error::Store(e.to_string()))??
                };
                if got != *sha {
                    return Err(Error::Invalid(format!(
                        "artifact {key}/{rel} has SHA-256 {got}, not its manifest's {sha}"
                    )));
                }
            }
            let json =
                serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Invalid(e.to_string()))?;
            tokio::fs::write(partial.join(MANIFEST), json).await?;
            match tokio::fs::rename(&partial, &done).await {
                Ok(()) => Ok(()),
                // fetched at once by another task: theirs is as good
                Err(_) if done.join(MANIFEST).exists() => {
                    let _ = tokio::fs::remove_dir_all(&partial).await;
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }
        .await;
        if fetched.is_err() {
            let _ = tokio::fs::remove_dir_all(&partial).await;
        }
        fetched.map(|()| done)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_round_trips_and_a_changed_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs_err::create_dir_all(src.join("sub")).unwrap();
        fs_err::write(src.join("adapter_config.json"), b"{}").unwrap();
        fs_err::write(src.join("sub/w.bin"), vec![7u8; 3 << 20]).unwrap();
        let a = Artifacts::open(
            tmp.path().join("bucket").to_str().unwrap(),
            tmp.path().join("cache"),
        )
        .unwrap();
        let m = a.put_dir(&src, "adapters/x").await.unwrap();
        assert_eq!(m.files.len(), 2);
        assert_eq!(m, manifest_of(&src).unwrap());
        let got = a.fetch_dir("adapters/x", Some(&m.digest)).await.unwrap();
        assert_eq!(
            fs_err::read(got.join("sub/w.bin")).unwrap(),
            vec![7u8; 3 << 20]
        );
        assert_eq!(manifest_of(&got).unwrap().digest, m.digest);
        assert_eq!(
            a.fetch_dir("adapters/x", Some(&m.digest)).await.unwrap(),
            got
        );
        assert!(matches!(
            a.fetch_dir("adapters/y", None).await,
            Err(Error::NotFound(_))
        ));
        // another digest expected than stored
        let other = tmp.path().join("cache2");
        let b = Artifacts::open(tmp.path().join("bucket").to_str().unwrap(), &other).unwrap();
        let e = b.fetch_dir("adapters/x", Some("ab")).await.unwrap_err();
        assert!(e.to_string().contains("not the ab expected"), "{e}");
        // a file changed in the store after its manifest: refused, nothing cached
        fs_err::write(tmp.path().join("bucket/adapters/x/sub/w.bin"), b"tampered").unwrap();
        let e = b.fetch_dir("adapters/x", None).await.unwrap_err();
        assert!(e.to_string().contains("not its manifest's"), "{e}");
        assert_eq!(fs_err::read_dir(&other).unwrap().count(), 0);
        assert!(a
            .list("adapters/x")
            .await
            .unwrap()
            .contains(&MANIFEST.to_string()));
        assert!(Artifacts::open("gs://b", tmp.path()).is_err());
        assert!(a.exists("adapters/../x").await.is_err());
    }
}
