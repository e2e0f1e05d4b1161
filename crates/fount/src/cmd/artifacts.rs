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
