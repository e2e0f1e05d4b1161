//! Model configuration: `config.json` as Hugging Face writes it ([`HfConfig`]) and the resolved
//! form the layers use ([`Config`]), with every default applied and every architecture difference
//! made explicit.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The decoder families fount implements. They share one model definition; the differences are
/// configuration (biases, tied embeddings, sliding windows, a sparse MoE feed-forward).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// `LlamaForCausalLM` (Llama 2/3, TinyLlama, SmolLM, …).
    Llama,
    /// `Qwen2ForCausalLM`: biases on q/k/v.
    Qwen2,
    /// `MistralForCausalLM`: optional sliding-window attention.
    Mistral,
    /// `MixtralForCausalLM`: a sparse mixture of SwiGLU experts in every layer.
    Mixtral,
}

impl Arch {
    /// Architecture names accepted in `config.json`.
    pub const SUPPORTED: &'static str =
        "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, MixtralForCausalLM";

    /// The `architectures` entry and `model_type` Hugging Face uses.
    pub fn hf_names(self) -> (&'static str, &'static str) {
        match self {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Arch::Mistral => ("MistralForCausalLM", "mistral"),
            Arch::Mixtral => ("MixtralForCausalLM", "mixtral"),
        }
    }

    /// Parses the short name used on the command line (`llama`, `qwen2`, `mistral`, `mixtral`).
    pub fn from_short(name: &str) -> Option<Arch> {
        [Arch::Llama, Arch::Qwen2, Arch::Mistral, Arch::Mixtral]
            .into_iter()
            .find(|a| a.hf_names().1 == name)
    }

    fn from_hf(name: &str) -> Option<Arch> {
        [Arch::Llama, Arch::Qwen2, Arch::Mistral, Arch::Mixtral]
            .into_iter()
            .find(|a| a.hf_names().0 == name)
    }
}

/// `rope_scaling` (or `rope_parameters` in recent `transformers`) as written in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfRopeScaling {
    /// `rope_type` (newer) or `type` (older): `default`, `linear` or `llama3`.
    #[serde(default, alias = "type", skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The scaling factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// llama3: `low_freq_factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// llama3: `high_freq_factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// llama3: the context length the base model was trained at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Newer `transformers` moves `rope_theta` in here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
}

/// `config.json` exactly as written: every field optional, so that a missing one can be reported
/// by name instead of as a parse error.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HfConfig {
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// e.g. `"llama"`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: Option<usize>,
    /// Width of the residual stream.
    pub hidden_size: Option<usize>,
    /// Width of the feed-forward (per expert for MoE).
    pub intermediate_size: Option<usize>,
    /// Decoder layers.
    pub num_hidden_layers: Option<usize>,
    /// Query heads.
    pub num_attention_heads: Option<usize>,
    /// Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Longest context the model supports.
    pub max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: Option<f64>,
    /// RoPE base.
    pub rope_theta: Option<f64>,
    /// RoPE scaling.
    pub rope_scaling: Option<HfRopeScaling>,
    /// `transformers` v5 name for RoPE parameters (includes `rope_theta`).
    pub rope_parameters: Option<HfRopeScaling>,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: Option<bool>,
    /// Llama: biases on q/k/v/o.
    pub attention_bias: Option<bool>,
    /// Llama: biases on the MLP projections.
    pub mlp_bias: Option<bool>,
    /// Mistral/Qwen2: attention window.
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` applies.
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers from which the sliding window applies.
    pub max_window_layers: Option<usize>,
    /// Mixtral: experts per layer.
    pub num_local_experts: Option<usize>,
    /// Mixtral: experts each token is routed to.
    pub num_experts_per_tok: Option<usize>,
    /// Mixtral: coefficient of the load-balancing loss.
    pub router_aux_loss_coef: Option<f64>,
    /// The activation (`silu` for every supported family).
    pub hidden_act: Option<String>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<serde_json::Value>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<serde_json::Value>,
    /// Dtype the weights were saved in (`float32`, `float16`, `bfloat16`).
    #[serde(alias = "dtype")]
    pub torch_dtype: Option<String>,
    /// Every other key, kept so a round trip does not lose them.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// How RoPE frequencies are adjusted for long contexts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        /// Divisor for low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are fully scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are unscaled.
        high_freq_factor: f64,
        /// The pretraining context.
        original_max_position_embeddings: usize,
    },
}

/// The resolved configuration: no `Option`s, every default applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The family.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the feed-forward (per expert for MoE).
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// `lm_head` shares the embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v.
    pub qkv_bias: bool,
    /// Bias on o.
    pub o_bias: bool,
    /// Biases on the MLP projections.
    pub mlp_bias: bool,
    /// Attention window per layer (`None`: full causal attention).
    pub sliding_window: Option<usize>,
    /// First layer the sliding window applies to (Qwen2's `max_window_layers`).
    pub sliding_window_from_layer: usize,
    /// Sparse MoE feed-forward, if any.
    pub moe: Option<MoeConfig>,
}

/// The Mixtral sparse mixture-of-experts feed-forward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeConfig {
    /// Experts per layer.
    pub num_experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Coefficient of the load-balancing auxiliary loss.
    pub router_aux_loss_coef: f64,
}

fn need<T>(value: Option<T>, field: &'static str) -> Result<T> {
    value.ok_or_else(|| Error::Config {
        field,
        reason: "missing (required for this architecture)".into(),
    })
}

fn positive(value: usize, field: &'static str) -> Result<usize> {
    if value == 0 {
        return Err(Error::Config {
            field,
            reason: "must be greater than zero".into(),
        });
    }
    Ok(value)
}

impl HfConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<HfConfig> {
        if !path.exists() {
            return Err(Error::MissingFile {
                path: path.to_path_buf(),
                what: "config.json (the model's architecture and shape)",
            });
        }
        let text = fs_err::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Resolves defaults and checks consistency.
    pub fn resolve(&self) -> Result<Config> {
        let name = match self.architectures.as_deref() {
            Some([name, ..]) => name.clone(),
            _ => {
                return Err(Error::Config {
                    field: "architectures",
                    reason: format!("missing or empty (supported: {})", Arch::SUPPORTED),
                })
            }
        };
        let arch = Arch::from_hf(&name).ok_or(Error::UnknownArchitecture {
            found: name,
            supported: Arch::SUPPORTED,
        })?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(Error::Config {
                    field: "hidden_act",
                    reason: format!("{act:?} is not supported (only \"silu\")"),
                });
            }
        }
        let hidden_size = positive(need(self.hidden_size, "hidden_size")?, "hidden_size")?;
        let num_attention_heads = positive(
            need(self.num_attention_heads, "num_attention_heads")?,
            "num_attention_heads",
        )?;
        let num_key_value_heads = self.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Config {
                field: "num_key_value_heads",
                reason: format!(
                    "{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"
                ),
            });
        }
        let head_dim = match self.head_dim {
            Some(d) => positive(d, "head_dim")?,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(Error::Config {
                        field: "head_dim",
                        reason: format!(
                            "absent, and hidden_size {hidden_size} is not divisible by {num_attention_heads} heads"
                        ),
                    });
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(Error::Config {
                field: "head_dim",
                reason: format!("{head_dim} is odd; rotary embeddings need an even head size"),
            });
        }
        let rope = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let rope_theta = self
            .rope_theta
            .or(rope.and_then(|r| r.rope_theta))
            .unwrap_or(match arch {
                Arch::Llama => 10_000.0,
                Arch::Qwen2 | Arch::Mistral | Arch::Mixtral => 1_000_000.0,
            });
        let rope_scaling = match rope {
            None => RopeScaling::None,
            Some(r) => resolve_rope(r)?,
        };
        let max_position_embeddings = positive(
            need(self.max_position_embeddings, "max_position_embeddings")?,
            "max_position_embeddings",
        )?;
        let (sliding_window, sliding_window_from_layer) = match arch {
            Arch::Mistral | Arch::Mixtral => (self.sliding_window, 0),
            Arch::Qwen2 if self.use_sliding_window.unwrap_or(false) => {
                (self.sliding_window, self.max_window_layers.unwrap_or(0))
            }
            _ => (None, 0),
        };
        let moe = match arch {
            Arch::Mixtral => {
                let num_experts = positive(
                    need(self.num_local_experts, "num_local_experts")?,
                    "num_local_experts",
                )?;
                let top_k = need(self.num_experts_per_tok, "num_experts_per_tok")?;
                if top_k == 0 || top_k > num_experts {
                    return Err(Error::Config {
                        field: "num_experts_per_tok",
                        reason: format!(
                            "{top_k} must be between 1 and num_local_experts = {num_experts}"
                        ),
                    });
                }
                Some(MoeConfig {
                    num_experts,
                    top_k,
                    router_aux_loss_coef: self.router_aux_loss_coef.unwrap_or(0.001),
                })
            }
            _ => None,
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        Ok(Config {
            arch,
            vocab_size: positive(need(self.vocab_size, "vocab_size")?, "vocab_size")?,
            hidden_size,
            intermediate_size: positive(
                need(self.intermediate_size, "intermediate_size")?,
                "intermediate_size",
            )?,
            num_hidden_layers: positive(
                need(self.num_hidden_layers, "num_hidden_layers")?,
                "num_hidden_layers",
            )?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            mlp_bias: arch == Arch::Llama && self.mlp_bias.unwrap_or(false),
            sliding_window,
            sliding_window_from_layer,
            moe,
        })
    }

    /// The `eos_token_id` field as a list (it may be a single id or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        ids_of(self.eos_token_id.as_ref())
    }
}

/// Reads a token-id field that may be a number or a list of numbers.
pub(crate) fn ids_of(value: Option<&serde_json::Value>) -> Vec<u32> {
    match value {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| v as u32).into_iter().collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_u64().map(|v| v as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn resolve_rope(r: &HfRopeScaling) -> Result<RopeScaling> {
    let kind = r.rope_type.as_deref().unwrap_or("default");
    let factor = |r: &HfRopeScaling| {
        need(r.factor, "rope_scaling.factor").and_then(|f| {
            if f > 0.0 {
                Ok(f)
            } else {
                Err(Error::Config {
                    field: "rope_scaling.factor",
                    reason: format!("{f} must be positive"),
                })
            }
        })
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor(r)? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor(r)?,
            low_freq_factor: need(r.low_freq_factor, "rope_scaling.low_freq_factor")?,
            high_freq_factor: need(r.high_freq_factor, "rope_scaling.high_freq_factor")?,
            original_max_position_embeddings: need(
                r.original_max_position_embeddings,
                "rope_scaling.original_max_position_embeddings",
            )?,
        }),
        other => Err(Error::Config {
            field: "rope_scaling.rope_type",
            reason: format!("{other:?} is not supported (default, linear, llama3)"),
        }),
    }
}

impl Config {
    /// Query heads per key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The attention window of layer `layer`, if it has one.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        match self.sliding_window {
            Some(w) if layer >= self.sliding_window_from_layer => Some(w),
            _ => None,
        }
    }

    /// Number of parameters (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let d = self.head_dim;
        let q = self.num_attention_heads * d;
        let kv = self.num_key_value_heads * d;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        let mlp_one = 3 * h * self.intermediate_size;
        let mlp = match self.moe {
            Some(m) => m.num_experts * mlp_one + m.num_experts * h,
            None => mlp_one,
        };
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_hidden_layers * layer + embed + head + h
    }
}
