//! The files of a Hugging Face model directory: `config.json`, `model.safetensors` (or shards
//! named by `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` or
//! `chat_template.jinja`, and `generation_config.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::{ids_of, Config, HfConfig};
use crate::error::{Error, Result};

/// A model directory on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    dir: PathBuf,
}

#[derive(Deserialize)]
struct SafetensorsIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// What `generation_config.json` says about stopping and sampling defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Token ids that end generation (`eos_token_id`: one id or a list).
    pub eos_token_ids: Vec<u32>,
    /// Default temperature, if given.
    pub temperature: Option<f64>,
    /// Default top-p, if given.
    pub top_p: Option<f64>,
    /// Default top-k, if given.
    pub top_k: Option<usize>,
    /// Default repetition penalty, if given.
    pub repetition_penalty: Option<f64>,
}

impl ModelFiles {
    /// Opens `dir`, which must exist and hold a `config.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                what: "to be a directory (a Hugging Face model directory)",
            });
        }
        Ok(ModelFiles {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `config.json` as written.
    pub fn hf_config(&self) -> Result<HfConfig> {
        HfConfig::from_file(&self.dir.join("config.json"))
    }

    /// `config.json`, resolved.
    pub fn config(&self) -> Result<Config> {
        self.hf_config()?.resolve()
    }

    /// The safetensors files holding the weights.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        let single = self.dir.join("model.safetensors");
        if single.exists() {
            return Ok(vec![single]);
        }
        let index = self.dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = fs_err::read_to_string(&index)?;
            let parsed: SafetensorsIndex =
                serde_json::from_str(&text).map_err(|source| Error::Json {
                    path: index.clone(),
                    source,
                })?;
            let names: BTreeSet<&String> = parsed.weight_map.values().collect();
            return Ok(names.into_iter().map(|n| self.dir.join(n)).collect());
        }
        Err(Error::MissingFile {
            path: single,
            what: "weights as model.safetensors or shards listed in model.safetensors.index.json",
        })
    }

    /// The files of the directory other than its weights (configs, tokenizer, chat template),
    /// sorted: what a model written from new weights copies from the one it was made from.
    pub fn side_files(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for e in fs_err::read_dir(&self.dir)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if p.is_file()
                && !name.ends_with(".safetensors")
                && name != "model.safetensors.index.json"
            {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// `tokenizer.json`.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// `tokenizer_config.json`, or `None` if absent.
    pub fn tokenizer_config(&self) -> Result<Option<serde_json::Value>> {
        read_json_if_exists(&self.dir.join("tokenizer_config.json"))
    }

    /// `generation_config.json`, falling back to `config.json`'s `eos_token_id`.
    pub fn generation_config(&self) -> Result<GenerationConfig> {
        let path = self.dir.join("generation_config.json");
        let mut g = GenerationConfig::default();
        if let Some(v) = read_json_if_exists(&path)? {
            g.eos_token_ids = ids_of(v.get("eos_token_id"));
            g.temperature = v.get("temperature").and_then(|t| t.as_f64());
            g.top_p = v.get("top_p").and_then(|t| t.as_f64());
            g.top_k = v.get("top_k").and_then(|t| t.as_u64()).map(|k| k as usize);
            g.repetition_penalty = v.get("repetition_penalty").and_then(|t| t.as_f64());
        }
        if g.eos_token_ids.is_empty() {
            g.eos_token_ids = self.hf_config()?.eos_token_ids();
        }
        Ok(g)
    }
}

pub(crate) fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = fs_err::read_to_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
}
