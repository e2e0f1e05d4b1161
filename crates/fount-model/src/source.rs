//! A model as a user names it: a Hugging Face directory or a GGUF file, with what generating
//! from it needs (tokenizer, chat template, stop tokens) taken from wherever that model keeps
//! them.

use std::path::Path;

use candle_core::{DType, Device};

use crate::chat::ChatTemplate;
use crate::error::Result;
use crate::files::{GenerationConfig, ModelFiles};
use crate::gguf::Gguf;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A loaded model with its tokenizer, chat template and generation defaults.
#[derive(Debug)]
pub struct Loaded {
    /// The weights.
    pub model: Model,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, if the model has one.
    pub template: Option<ChatTemplate>,
    /// Stop tokens and sampling defaults.
    pub generation: GenerationConfig,
}

/// Whether `path` names a GGUF file (by its extension) rather than a model directory.
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl Loaded {
    /// Loads `path`: a `.gguf` file (its blocks kept as they are; `dtype` must be f32, the
    /// activations' type) or a model directory computed in `dtype`. `tokenizer`, a
    /// `tokenizer.json` or a directory holding one, overrides the model's own.
    pub fn open(path: &Path, tokenizer_path: Option<&Path>, dtype: DType) -> Result<Loaded> {
        let override_tok = match tokenizer_path {
            Some(p) if p.is_dir() => Some(Tokenizer::from_file(&p.join("tokenizer.json"))?),
            Some(p) => Some(Tokenizer::from_file(p)?),
            None => None,
        };
        if is_gguf(path) {
            if dtype != DType::F32 {
                return Err(crate::error::Error::Gguf {
                    path: path.to_path_buf(),
                    reason: format!(
                        "a GGUF file keeps its own weight types and computes in f32 around them; \
                         a compute dtype ({dtype:?}) applies to model directories"
                    ),
                });
            }
            let g = Gguf::open(path)?;
            let model = Model::from_gguf(&g)?;
            let tokenizer = match override_tok {
                Some(t) => t,
                None => g.tokenizer()?,
            };
            // the file's template, else that of a tokenizer directory given to override
            let template = match (g.chat_template()?, tokenizer_path) {
                (Some(t), _) => Some(t),
                (None, Some(dir)) if dir.is_dir() => ChatTemplate::from_dir(dir)?,
                (None, _) => None,
            };
            return Ok(Loaded {
                model,
                tokenizer,
                template,
                generation: g.generation_config()?,
            });
        }
        let files = ModelFiles::open(path)?;
        let tokenizer = match override_tok {
            Some(t) => t,
            None => Tokenizer::from_file(&files.tokenizer_path())?,
        };
        Ok(Loaded {
            model: Model::load(path, dtype, &Device::Cpu)?,
            tokenizer,
            template: ChatTemplate::from_dir(path)?,
            generation: files.generation_config()?,
        })
    }
}
