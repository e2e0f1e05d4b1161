//! A model's weights as trainable variables: loaded from a Hugging Face model directory, updated
//! in place by the optimizer, written back in the same format.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use fount_model::{Model, ModelFiles, Weights};

use crate::error::{Error, Result};

/// The trainable weights of a model, by checkpoint name, in name order.
#[derive(Debug)]
pub struct Params {
    vars: Vec<(String, Var)>,
}

impl Params {
    /// Loads the model in `dir` in f32 on the CPU with every weight a variable: the model's
    /// forward pass records what gradients need.
    pub fn load(dir: &Path) -> Result<(Model, Params)> {
        let files = ModelFiles::open(dir)?;
        let config = files.config()?;
        let mut tensors = HashMap::new();
        for f in files.weight_files()? {
            for (name, t) in candle_core::safetensors::load(&f, &Device::Cpu)? {
                tensors.insert(name, t.to_dtype(DType::F32)?);
            }
        }
        Params::from_tensors(tensors, dir, config)
    }

    /// Variables over `tensors` (copied) and the model built on them.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        dir: &Path,
        config: fount_model::Config,
    ) -> Result<(Model, Params)> {
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let mut vars = Vec::with_capacity(names.len());
        let mut view = HashMap::with_capacity(names.len());
        for name in names {
            let var = Var::from_tensor(&tensors[&name])?;
            view.insert(name.clone(), var.as_tensor().clone());
            vars.push((name, var));
        }
        let vb = VarBuilder::from_tensors(view, DType::F32, &Device::Cpu);
        let model = Model::from_weights(&Weights::new(vb, dir), config)?;
        Ok((model, Params { vars }))
    }

    /// Parameters over variables already made (an adapter's), in the order given.
    pub fn from_vars(vars: Vec<(String, Var)>) -> Params {
        Params { vars }
    }

    /// Every variable with its name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The variable `name`.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Scalars in all variables.
    pub fn count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Writes every variable to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}
