//! Publishing a directory so that no reader ever sees it half-written, and a kill at any moment
//! leaves either the old state or the new one.
//!
//! The protocol, in one place for every output fount writes (checkpoints, a trained model, an
//! adapter, a merged model):
//! 1. write everything into a staging directory beside the destination (`NAME.partial`),
//!    removing what a killed earlier attempt left there;
//! 2. sync every file, then the staging directory;
//! 3. write a marker file last, if the reader looks for one (a checkpoint's `COMPLETE`);
//! 4. rename the staging directory onto the destination, then sync the parent, so the rename
//!    itself is durable.
//!
//! Publishing into a directory that holds other things (an adapter beside its `checkpoints/`)
//! moves the files one by one instead, in an order that makes the file a reader opens first
//! appear last ([`Staged::commit_files_into`]).

use std::path::{Path, PathBuf};

use crate::error::Result;

/// Syncs a file's contents to disk.
pub fn sync_file(path: &Path) -> Result<()> {
    fs_err::File::open(path)?.sync_all()?;
    Ok(())
}

/// Syncs a directory's entries to disk (through a read handle, as Unix allows).
pub fn sync_dir(path: &Path) -> Result<()> {
    fs_err::File::open(path)?.sync_all()?;
    Ok(())
}

/// Syncs every file under `dir`, then `dir` itself.
pub fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs_err::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            sync_file(&p)?;
        }
    }
    sync_dir(dir)
}

/// A directory being written, to be published at its destination.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
}

impl Staged {
    /// Starts staging `dest` in `dest.partial` (a leftover of a killed attempt is removed).
    pub fn begin(dest: &Path) -> Result<Staged> {
        Staged::begin_at(dest.with_extension("partial"), dest)
    }

    /// Starts staging `dest` in the directory `tmp` (a leftover there is removed).
    pub fn begin_at(tmp: PathBuf, dest: &Path) -> Result<Staged> {
        if tmp.exists() {
            fs_err::remove_dir_all(&tmp)?;
        }
        fs_err::create_dir_all(&tmp)?;
        Ok(Staged {
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// A staging directory already begun, by this process earlier or by another one (each rank
    /// of a distributed run writes its part of a checkpoint into the same one).
    pub fn resume(tmp: PathBuf, dest: &Path) -> Staged {
        Staged {
            tmp,
            dest: dest.to_path_buf(),
        }
    }

    /// Where the writers write.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Syncs everything staged, writes `marker` (synced) last when given, renames the staging
    /// directory onto the destination (an empty directory there is replaced; anything else is
    /// an error that leaves the staging directory in place) and syncs the parent.
    pub fn commit(self, marker: Option<&str>) -> Result<PathBuf> {
        sync_tree(&self.tmp)?;
        if let Some(name) = marker {
            let path = self.tmp.join(name);
            fs_err::write(&path, b"complete\n")?;
            sync_file(&path)?;
            sync_dir(&self.tmp)?;
        }
        fs_err::rename(&self.tmp, &self.dest)?;
        if let Some(parent) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(self.dest)
    }

    /// Moves the staged files, each synced first, into the existing destination directory in
    /// `order` (the one a reader opens first goes last); removes the staging directory and syncs
    /// the destination.
    pub fn commit_files_into(self, order: &[&str]) -> Result<PathBuf> {
        fs_err::create_dir_all(&self.dest)?;
        for name in order {
            sync_file(&self.tmp.join(name))?;
            fs_err::rename(self.tmp.join(name), self.dest.join(name))?;
        }
        fs_err::remove_dir(&self.tmp)?;
        sync_dir(&self.dest)?;
        Ok(self.dest)
    }
}
