//! `fount artifacts`: puts directories and files (models, adapters, curated shards) into the
//! object store replicas share, lists and fetches them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fount_artifacts::Artifacts;

/// Where the artifacts are.
#[derive(Debug, Args)]
pub struct ArtifactsArgs {
    /// `s3://bucket/prefix` (endpoint and credentials from the `AWS_*` environment) or a
    /// directory.
    #[arg(long, env = "FOUNT_ARTIFACTS")]
    pub artifacts: String,
    /// Where fetched directories are cached.
    #[arg(long, env = "FOUNT_DATA_DIR", default_value = "fount-data")]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub command: ArtifactsCommand,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// Upload a directory (with its manifest of SHA-256s) or a file under KEY; prints the
    /// location (`artifacts:KEY`) and, for a directory, its digest.
    Put {
        /// The directory or file.
        path: PathBuf,
        /// Its key.
        key: String,
    },
    /// Fetch the directory at KEY into the cache (checked against its manifest, and against
    /// --digest when given) and print where it is.
    Get {
        /// Its key.
        key: String,
        /// The digest it must have.
        #[arg(long)]
        digest: Option<String>,
    },
    /// List the keys under KEY.
    Ls {
        /// A key prefix.
        key: String,
    },
}

/// Runs `fount artifacts`.
pub fn run(a: ArtifactsArgs) -> Result<()> {
    let store = Artifacts::open(&a.artifacts, a.data_dir.join("cache")).context("--artifacts")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match a.command {
            ArtifactsCommand::Put { path, key } => {
                if path.is_dir() {
                    let m = store.put_dir(&path, &key).await?;
                    println!("artifacts:{key}\t{}", m.digest);
                } else if path.is_file() {
                    store.put_file(&path, &key).await?;
                    println!("artifacts:{key}");
                } else {
                    bail!("{}: no such file or directory", path.display());
                }
            }
            ArtifactsCommand::Get { key, digest } => {
                let dir = store.fetch_dir(&key, digest.as_deref()).await?;
                println!("{}", dir.display());
            }
            ArtifactsCommand::Ls { key } => {
                for k in store.list(&key).await? {
                    println!("{k}");
                }
            }
        }
        Ok(())
    })
}

/// The artifacts store that `fount train` and `fount finetune` read `artifacts:KEY` inputs from
/// (a model, token shards, a JSONL file; fetched into `--data-dir`/cache) and publish their
/// result to.
#[derive(Debug, Args)]
pub struct RunArtifacts {
    /// `s3://bucket/prefix` (endpoint and credentials from the `AWS_*` environment) or a
    /// directory: inputs given as `artifacts:KEY` are read from it, so a job runs on any node.
    #[arg(long = "artifacts", env = "FOUNT_ARTIFACTS")]
    pub url: Option<String>,
    /// Upload the result (the final model, or the adapter with its provenance) to this key of
    /// the artifacts store when the run ends, with its manifest of SHA-256s.
    #[arg(long, value_name = "KEY")]
    pub publish: Option<String>,
}

impl RunArtifacts {
    /// Replaces each `artifacts:KEY` among `paths` by its local copy: a stored directory is
    /// fetched into the cache (each file checked against its manifest), a stored file is
    /// downloaded to `cache/files/KEY`. Other paths are left as they are.
    pub fn localise(&self, data_dir: &Path, paths: &mut [(&str, &mut PathBuf)]) -> Result<()> {
        if let Some(key) = &self.publish {
            if self.url.is_none() {
                bail!("--publish {key}: give --artifacts (or FOUNT_ARTIFACTS) to publish to");
            }
            fount_artifacts::check_key(key).with_context(|| format!("--publish {key}"))?;
        }
        if !paths.iter().any(|(_, p)| key_of(p).is_some()) {
            return Ok(());
        }
        let Some(url) = &self.url else {
            let named: Vec<String> = paths
                .iter()
                .filter(|(_, p)| key_of(p).is_some())
                .map(|(what, p)| format!("{what} {}", p.display()))
                .collect();
            bail!(
                "{}: give --artifacts (or FOUNT_ARTIFACTS) to read inputs from the artifacts store",
                named.join(", ")
            );
        };
        let store = Artifacts::open(url, data_dir.join("cache")).context("--artifacts")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        for (what, path) in paths.iter_mut() {
            let Some(key) = key_of(path) else { continue };
            let local = rt
                .block_on(fetch(&store, &key))
                .with_context(|| format!("fetching {what} {}", path.display()))?;
            **path = local;
        }
        Ok(())
    }

    /// Uploads the files of `dir` (not its subdirectories: an adapter's `checkpoints` stay) to
    /// the `--publish` key, if one was given; prints where they went.
    pub fn publish(&self, data_dir: &Path, dir: &Path) -> Result<()> {
        let (Some(key), Some(url)) = (&self.publish, &self.url) else {
            return Ok(());
        };
        let cache = data_dir.join("cache");
        let store = Artifacts::open(url, &cache).context("--artifacts")?;
        let staged = cache.join(format!(".publish-{}", std::process::id()));
        let _ = fs_err::remove_dir_all(&staged);
        fs_err::create_dir_all(&staged)?;
        let published = (|| {
            for entry in fs_err::read_dir(dir)? {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    let to = staged.join(entry.file_name());
                    if fs_err::hard_link(entry.path(), &to).is_err() {
                        fs_err::copy(entry.path(), &to)?;
                    }
                }
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok::<_, anyhow::Error>(rt.block_on(store.put_dir(&staged, key))?)
        })()
        .with_context(|| format!("publishing {} to artifacts:{key}", dir.display()));
        let _ = fs_err::remove_dir_all(&staged);
        eprintln!(
            "published to artifacts:{key} (digest {})",
            published?.digest
        );
        Ok(())
    }
}

/// The key of an `artifacts:KEY` path.
fn key_of(path: &Path) -> Option<String> {
    path.to_str()?
        .strip_prefix("artifacts:")
        .map(str::to_string)
}

/// The local copy of the file or directory stored at `key`.
async fn fetch(store: &Artifacts, key: &str) -> Result<PathBuf> {
    if store.exists(key).await? {
        let to = store.cache_dir("files").join(key);
        store.fetch_file(key, &to).await?;
        return Ok(to);
    }
    Ok(store.fetch_dir(key, None).await?)
}

/// The local directory of `--model`: itself, or for `artifacts:KEY` the stored model fetched
/// into the cache.
pub fn local_model(model: &Path, artifacts: Option<&Artifacts>) -> Result<PathBuf> {
    let text = model.to_string_lossy();
    let Some(key) = text.strip_prefix("artifacts:") else {
        return Ok(model.to_path_buf());
    };
    let Some(store) = artifacts else {
        bail!("--model {text}: give --artifacts to serve a model from the artifacts store");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(store.fetch_dir(key, None))
        .with_context(|| format!("fetching --model {text}"))
}
