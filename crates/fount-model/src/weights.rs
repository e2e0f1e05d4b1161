//! Reading tensors by their checkpoint names, with errors that say which tensor is missing or
//! has the wrong shape.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::error::{Error, Result};

/// A view of a model's weights at a name prefix (`model.layers.3.self_attn`).
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    dir: PathBuf,
    half: Option<DType>,
}

impl<'a> Weights<'a> {
    /// Wraps a candle `VarBuilder`; `dir` names the model in error messages.
    pub fn new(vb: VarBuilder<'a>, dir: &Path) -> Self {
        Weights {
            vb,
            dir: dir.to_path_buf(),
            half: None,
        }
    }

    /// These weights with every projection matrix kept in `half` (f16 or bf16) for the
    /// half-precision kernels, while the rest (norms, biases, activations) is in this view's
    /// dtype.
    pub fn with_half_matrices(mut self, half: DType) -> Self {
        self.half = Some(half);
        self
    }

    /// The type projection matrices are kept in, when not the view's dtype.
    pub fn half_matrices(&self) -> Option<DType> {
        self.half
    }

    /// Memory-maps the given safetensors files; tensors are converted to `dtype` as they are read.
    pub fn from_safetensors(
        files: &[PathBuf],
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        for f in files {
            if !f.exists() {
                return Err(Error::MissingFile {
                    path: f.clone(),
                    what: "the weight files named by config and index",
                });
            }
        }
        // SAFETY: the files are mapped read-only; fount never writes into a model directory
        // it serves from, and a concurrent writer would be an operator error.
        #[allow(unsafe_code)]
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? };
        Ok(Weights::new(vb, dir))
    }

    /// The view at `prefix` below this one.
    pub fn pp(&self, prefix: impl ToString) -> Self {
        Weights {
            vb: self.vb.pp(prefix),
            dir: self.dir.clone(),
            half: self.half,
        }
    }

    /// The device tensors are loaded to.
    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    /// Whether tensor `name` exists at this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    /// Reads tensor `name`, checking that it has `shape`.
    pub fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        let full = if self.vb.prefix().is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.vb.prefix())
        };
        if !self.vb.contains_tensor(name) {
            return Err(Error::MissingTensor {
                name: full,
                dir: self.dir.clone(),
            });
        }
        let t = self.vb.get_unchecked(name)?;
        if t.dims() != shape {
            return Err(Error::TensorShape {
                name: full,
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(t)
    }
}
