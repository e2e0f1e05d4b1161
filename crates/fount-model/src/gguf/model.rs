//! A model from a GGUF file's metadata: its architecture and configuration, tokenizer, chat
//! template and stop tokens.

use super::Gguf;
use crate::chat::ChatTemplate;
use crate::config::{Arch, Config, MoeConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::files::GenerationConfig;

/// How a GGUF architecture maps onto fount's: the family, and whether llama.cpp stored its
/// query/key rows permuted (the families it runs with interleaved RoPE).
fn family(name: &str) -> Option<(Arch, bool)> {
    Some(match name {
        "llama" => (Arch::Llama, true),
        "mistral" => (Arch::Mistral, true),
        "qwen2" => (Arch::Qwen2, false),
        _ => return None,
    })
}

/// llama.cpp's GGUF name of the tensor Hugging Face calls `hf` (`model.layers.3.mlp.up_proj`
/// → `blk.3.ffn_up`), without the `.weight`/`.bias` suffix.
pub fn tensor_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens" => Some("token_embd"),
        "model.norm" => Some("output_norm"),
        "lm_head" => Some("output"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let part = match part {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "block_sparse_moe.gate" => "ffn_gate_inp",
        // every expert's projection, stacked
        "block_sparse_moe.experts.*.w1" => "ffn_gate_exps",
        "block_sparse_moe.experts.*.w3" => "ffn_up_exps",
        "block_sparse_moe.experts.*.w2" => "ffn_down_exps",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{part}"))
}

impl Gguf {
    /// The architecture: its GGUF name, fount's family, and whether query/key rows are stored
    /// permuted.
    pub fn arch(&self) -> Result<(&str, Arch, bool)> {
        let name = self
            .string("general.architecture")
            .ok_or_else(|| self.bad_meta("general.architecture", "missing"))?;
        let (arch, permuted) = family(name).ok_or_else(|| Error::Gguf {
            path: self.path.clone(),
            reason: format!(
                "architecture {name:?} is not supported (fount runs llama, mistral and qwen2 GGUF files)"
            ),
        })?;
        Ok((name, arch, permuted))
    }

    /// The model's configuration, from the `<arch>.*` metadata and the tensor table.
    pub fn config(&self) -> Result<Config> {
        let (name, arch, _) = self.arch()?;
        let key = |k: &str| format!("{name}.{k}");
        // llama.cpp writes Mixtral as `llama` with experts
        let (arch, moe) = match self.opt_usize(&key("expert_count"))?.unwrap_or(0) {
            0 => (arch, None),
            experts => {
                let used = key("expert_used_count");
                let top_k = self.usize(&used)?;
                if top_k == 0 || top_k > experts {
                    return Err(
                        self.bad_meta(&used, &format!("{top_k} experts per token of {experts}"))
                    );
                }
                let moe = MoeConfig {
                    num_experts: experts,
                    top_k,
                    router_aux_loss_coef: 0.02,
                };
                (Arch::Mixtral, Some(moe))
            }
        };
        let hidden = self.usize(&key("embedding_length"))?;
        let heads = self.usize(&key("attention.head_count"))?;
        let kv_heads = self
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(self.bad_meta(
                &key("attention.head_count_kv"),
                &format!("{kv_heads} key/value heads for {heads} query heads"),
            ));
        }
        let head_dim = match self.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden / heads,
        };
        let vocab = match self.info("token_embd.weight") {
            Some(t) => t.dims.first().copied().unwrap_or(0),
            None => {
                return Err(Error::MissingTensor {
                    name: "token_embd.weight".into(),
                    dir: self.path.clone(),
                })
            }
        };
        let rope_scaling = match self.string(&key("rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: self
                    .opt_f64(&key("rope.scaling.factor"))?
                    .ok_or_else(|| self.bad_meta(&key("rope.scaling.factor"), "missing"))?,
            },
            Some(other) => {
                return Err(self.bad_meta(
                    &key("rope.scaling.type"),
                    &format!("{other:?} is not supported (none, linear)"),
                ))
            }
        };
        let config = Config {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.usize(&key("feed_forward_length"))?,
            num_hidden_layers: self.usize(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            max_position_embeddings: self.usize(&key("context_length"))?,
            rms_norm_eps: self
                .opt_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: self.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: self.info("output.weight").is_none(),
            qkv_bias: self.info("blk.0.attn_q.bias").is_some(),
            o_bias: self.info("blk.0.attn_output.bias").is_some(),
            mlp_bias: self.info("blk.0.ffn_up.bias").is_some(),
            sliding_window: None,
            sliding_window_from_layer: 0,
            moe,
        };
        if config.num_hidden_layers == 0 || hidden == 0 || vocab == 0 {
            return Err(self.bad_meta(&key("block_count"), "an empty model"));
        }
        Ok(config)
    }

    /// RoPE frequency factors (`rope_freqs.weight`, how llama.cpp stores Llama 3.1 scaling),
    /// if the file has them.
    pub fn rope_factors(&self, half_dim: usize) -> Result<Option<Vec<f32>>> {
        if self.info("rope_freqs.weight").is_none() {
            return Ok(None);
        }
        let t = self.tensor("rope_freqs.weight", &[half_dim], None)?;
        Ok(Some(t.dequantize()?.flatten_all()?.to_vec1::<f32>()?))
    }

    /// The chat template (`tokenizer.chat_template`) with the special tokens it may name.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        let Some(source) = self.string("tokenizer.chat_template") else {
            return Ok(None);
        };
        let tokens = self
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok());
        let mut special = serde_json::Map::new();
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ] {
            let token = self
                .opt_usize(key)?
                .and_then(|id| tokens.and_then(|t| t.get(id)))
                .and_then(|v| v.to_string().ok());
            if let Some(t) = token {
                special.insert(name.into(), t.clone().into());
            }
        }
        ChatTemplate::new(source, special).map(Some)
    }

    /// What ends generation: `tokenizer.ggml.eos_token_id` (and `eot_token_id`), as a
    /// generation config.
    pub fn generation_config(&self) -> Result<GenerationConfig> {
        let mut eos = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = self.opt_usize(key)? {
                let id = id as u32;
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(GenerationConfig {
            eos_token_ids: eos,
            ..GenerationConfig::default()
        })
    }
}
