//! Checkpoints: the trained weights (a Hugging Face model directory for pretraining, a PEFT
//! adapter for fine-tuning), the optimizer's moments, the step and the data position, written so
//! that a kill at any moment never leaves a checkpoint that loads.
//!
//! A checkpoint is written into `step-NNNNNNNN.partial/`, every file synced, then the marker
//! `COMPLETE` is written and synced last, and the directory is renamed to `step-NNNNNNNN/` (and
//! the parent synced): [`fount_model::publish`]'s protocol, shared by every output fount writes. Only directories with the marker are ever loaded; a `.partial` one left by a
//! kill is removed by the next save.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fount_model::publish::{sync_file, sync_tree, Staged};
use fount_model::ModelFiles;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWConfig, Moments};
use crate::params::Params;

/// The marker written last.
pub const COMPLETE: &str = "COMPLETE";

/// What a pretraining checkpoint records besides tensors, per process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps taken.
    pub step: u64,
    /// The training data position after `step` steps.
    pub sampler: fount_data::shard::SamplerState,
    /// Processes the run was split over.
    pub world: usize,
    /// Sequences per forward pass, per process.
    pub micro_batch: usize,
    /// Micro-batches per step.
    pub accumulation: usize,
}

/// Writes the model (`params`, with the side files of `source`) as a Hugging Face model
/// directory at `dir`.
pub fn write_model(params: &Params, source: &Path, dir: &Path) -> Result<()> {
    fs_err::create_dir_all(dir)?;
    for f in ModelFiles::open(source)?.side_files()? {
        if let Some(name) = f.file_name() {
            fs_err::copy(&f, dir.join(name))?;
        }
    }
    params.save(&dir.join("model.safetensors"))
}

/// The checkpoint directory of `step` under `root`.
pub fn dir_of(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Writes the shared part of the checkpoint of `step` into `step-NNNNNNNN.partial/` under `root`:
/// the weights (`write_weights` is handed that directory), the optimizer, and `shared` in
/// `state.json`, every file synced; returns the directory. Removes the leftovers of saves that
/// were killed.
pub fn stage<S: Serialize>(
    root: &Path,
    step: u64,
    write_weights: &dyn Fn(&Path) -> Result<()>,
    opt: &AdamW,
    shared: &S,
) -> Result<PathBuf> {
    fs_err::create_dir_all(root)?;
    for e in fs_err::read_dir(root)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "partial") {
            fs_err::remove_dir_all(&p)?;
        }
    }
    let staged = Staged::begin(&dir_of(root, step))?;
    let tmp = staged.path().to_path_buf();
    write_weights(&tmp)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, mo) in &opt.state {
        let n = mo.m.len();
        tensors.insert(
            format!("m.{name}"),
            Tensor::from_slice(&mo.m, n, &Device::Cpu)?,
        );
        tensors.insert(
            format!("v.{name}"),
            Tensor::from_slice(&mo.v, n, &Device::Cpu)?,
        );
    }
    let opt_path = tmp.join("optimizer.safetensors");
    candle_core::safetensors::save(&tensors, &opt_path).map_err(|e| Error::Format {
        path: opt_path.clone(),
        message: e.to_string(),
    })?;
    let meta = serde_json::json!({
        "state": shared,
        "optimizer_step": opt.step,
        "adamw": opt.config(),
    });
    fs_err::write(
        tmp.join("state.json"),
        serde_json::to_vec_pretty(&meta).unwrap_or_default(),
    )?;
    sync_tree(&tmp)?;
    Ok(tmp)
}

/// Writes process `rank`'s own state into a staged checkpoint.
pub fn write_rank<S: Serialize>(tmp: &Path, rank: usize, state: &S) -> Result<()> {
    let path = tmp.join(format!("rank-{rank}.json"));
    fs_err::write(&path, serde_json::to_vec_pretty(state).unwrap_or_default())?;
    sync_file(&path)?;
    Ok(())
}

/// Completes a staged checkpoint (after every process's [`write_rank`]): the `COMPLETE` marker last, then the rename; keeps the newest
/// `keep` complete checkpoints.
pub fn commit(root: &Path, tmp: &Path, step: u64, keep: usize) -> Result<PathBuf> {
    let final_dir = dir_of(root, step);
    if final_dir.exists() {
        // the same step saved again (a signal right after a periodic save): keep the first
        fs_err::remove_dir_all(tmp)?;
    } else {
        Staged::resume(tmp.to_path_buf(), &final_dir).commit(Some(COMPLETE))?;
    }
    let mut complete = list(root)?;
    while complete.len() > keep {
        let (_, oldest) = complete.remove(0);
        fs_err::remove_dir_all(oldest)?;
    }
    Ok(final_dir)
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for e in fs_err::read_dir(root)? {
        let p = e?.path();
        let step = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step {
            if p.join(COMPLETE).is_file() {
                out.push((step, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Loaded<S> {
    /// Its directory.
    pub dir: PathBuf,
    /// The process's own state (step, data position, layout).
    pub state: S,
    /// The optimizer, moments restored.
    pub optimizer: AdamW,
}

/// Loads the optimizer and process `rank`'s state of the checkpoint at `dir` for `params` (the
/// weights themselves are loaded by the caller).
pub fn load<S: DeserializeOwned>(
    dir: &Path,
    rank: usize,
    params: &Params,
    cfg: AdamWConfig,
) -> Result<Loaded<S>> {
    let corrupt = |message: String| Error::Format {
        path: dir.to_path_buf(),
        message,
    };
    if !dir.join(COMPLETE).is_file() {
        return Err(corrupt(
            "not a complete checkpoint (no COMPLETE marker)".into(),
        ));
    }
    let meta: serde_json::Value = serde_json::from_slice(&fs_err::read(dir.join("state.json"))?)
        .map_err(|e| corrupt(format!("state.json: {e}")))?;
    let rank_path = dir.join(format!("rank-{rank}.json"));
    let state: S = match fs_err::read(&rank_path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("rank-{rank}.json: {e}")))?
        }
        Err(_) => {
            return Err(corrupt(format!(
                "no state for process {rank} (rank-{rank}.json): written by {} process(es)",
                meta["state"]["world"].as_u64().unwrap_or(1)
            )))
        }
    };
    let opt_step = meta["optimizer_step"]
        .as_u64()
        .ok_or_else(|| corrupt("state.json: no optimizer_step".into()))?;
    let opt_path = dir.join("optimizer.safetensors");
    let tensors =
        candle_core::safetensors::load(&opt_path, &Device::Cpu).map_err(|e| Error::Format {
            path: opt_path.clone(),
            message: e.to_string(),
        })?;
    let mut state_by_name = Vec::new();
    for (name, var) in params.iter() {
        let get = |k: String| -> Result<Vec<f32>> {
            let t = tensors
                .get(&k)
                .ok_or_else(|| corrupt(format!("optimizer.safetensors has no {k}")))?;
            let v = t.to_vec1::<f32>()?;
            if v.len() != var.elem_count() {
                return Err(corrupt(format!(
                    "{k} holds {} values, the parameter {}",
                    v.len(),
                    var.elem_count()
                )));
            }
            Ok(v)
        };
        state_by_name.push((
            name.to_string(),
            Moments {
                m: get(format!("m.{name}"))?,
                v: get(format!("v.{name}"))?,
            },
        ));
    }
    let mut optimizer = AdamW::new(cfg, &[]);
    optimizer.state = state_by_name;
    optimizer.step = opt_step;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        state,
        optimizer,
    })
}
