//! `fount model init`: randomly initialised models in Hugging Face format, in tiny test shapes
//! and in the shapes of real models, so every part of fount can be exercised and measured
//! without downloading weights.
//!
//! A written directory holds `config.json`, `generation_config.json`, `model.safetensors`,
//! a byte-level BPE `tokenizer.json` trained on a small built-in text, and
//! `tokenizer_config.json` with the family's chat template.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::config::{Arch, Config, HfConfig};
use crate::error::{Error, Result};

/// The shape of a model: what `config.json` needs beyond the architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    /// Preset name.
    pub name: &'static str,
    /// Vocabulary rows.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Feed-forward width (per expert).
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Context length.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Tied embeddings.
    pub tie_word_embeddings: bool,
    /// `rope_scaling`, as JSON (null for none).
    pub rope_scaling: serde_json::Value,
    /// MoE experts and top-k (Mixtral).
    pub experts: Option<(usize, usize)>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
}

fn tiny(name: &'static str, vocab: usize) -> Shape {
    Shape {
        name,
        vocab_size: vocab,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        max_position_embeddings: 2048,
        rope_theta: 10_000.0,
        tie_word_embeddings: false,
        rope_scaling: serde_json::Value::Null,
        experts: None,
        rms_norm_eps: 1e-6,
    }
}

/// The presets of an architecture.
pub fn presets(arch: Arch) -> Vec<Shape> {
    let llama3_scaling = json!({
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    match arch {
        Arch::Llama => vec![
            Shape {
                rope_scaling: llama3_scaling.clone(),
                ..tiny("tiny", 512)
            },
            Shape {
                name: "small",
                vocab_size: 2048,
                hidden_size: 256,
                intermediate_size: 768,
                num_hidden_layers: 4,
                num_attention_heads: 8,
                num_key_value_heads: 4,
                ..tiny("small", 2048)
            },
            Shape {
                name: "llama-30m",
                vocab_size: 8192,
                hidden_size: 512,
                intermediate_size: 1536,
                num_hidden_layers: 8,
                num_attention_heads: 8,
                num_key_value_heads: 4,
                ..tiny("llama-30m", 8192)
            },
            Shape {
                name: "llama-3.2-1b",
                vocab_size: 128_256,
                hidden_size: 2048,
                intermediate_size: 8192,
                num_hidden_layers: 16,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                max_position_embeddings: 131_072,
                rope_theta: 500_000.0,
                tie_word_embeddings: true,
                rope_scaling: llama3_scaling,
                experts: None,
                rms_norm_eps: 1e-5,
            },
            Shape {
                name: "tinyllama-1.1b",
                vocab_size: 32_000,
                hidden_size: 2048,
                intermediate_size: 5632,
                num_hidden_layers: 22,
                num_attention_heads: 32,
                num_key_value_heads: 4,
                max_position_embeddings: 2048,
                rope_theta: 10_000.0,
                tie_word_embeddings: false,
                rope_scaling: serde_json::Value::Null,
                experts: None,
                rms_norm_eps: 1e-5,
            },
        ],
        Arch::Qwen2 => vec![
            Shape {
                tie_word_embeddings: true,
                rope_theta: 1e6,
                ..tiny("tiny", 512)
            },
            // rows of 256 values: whole K-quant super-blocks (GGUF tests and benchmarks)
            Shape {
                name: "small",
                hidden_size: 256,
                intermediate_size: 768,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                tie_word_embeddings: true,
                rope_theta: 1e6,
                ..tiny("small", 2048)
            },
            Shape {
                name: "qwen2.5-0.5b",
                vocab_size: 151_936,
                hidden_size: 896,
                intermediate_size: 4864,
                num_hidden_layers: 24,
                num_attention_heads: 14,
                num_key_value_heads: 2,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                tie_word_embeddings: true,
                rope_scaling: serde_json::Value::Null,
                experts: None,
                rms_norm_eps: 1e-6,
            },
        ],
        Arch::Mistral => vec![
            Shape {
                rope_theta: 1e6,
                ..tiny("tiny", 512)
            },
            Shape {
                name: "mistral-7b",
                vocab_size: 32_768,
                hidden_size: 4096,
                intermediate_size: 14_336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                tie_word_embeddings: false,
                rope_scaling: serde_json::Value::Null,
                experts: None,
                rms_norm_eps: 1e-5,
            },
        ],
        Arch::Mixtral => vec![
            Shape {
                rope_theta: 1e6,
                experts: Some((4, 2)),
                ..tiny("tiny", 512)
            },
            Shape {
                name: "mixtral-small",
                vocab_size: 32_000,
                hidden_size: 512,
                intermediate_size: 1024,
                num_hidden_layers: 8,
                num_attention_heads: 8,
                num_key_value_heads: 2,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                tie_word_embeddings: false,
                rope_scaling: serde_json::Value::Null,
                experts: Some((8, 2)),
                rms_norm_eps: 1e-5,
            },
            Shape {
                name: "mixtral-8x7b",
                vocab_size: 32_000,
                hidden_size: 4096,
                intermediate_size: 14_336,
                num_hidden_layers: 32,
                num_attention_heads: 32,
                num_key_value_heads: 8,
                max_position_embeddings: 32_768,
                rope_theta: 1_000_000.0,
                tie_word_embeddings: false,
                rope_scaling: serde_json::Value::Null,
                experts: Some((8, 2)),
                rms_norm_eps: 1e-5,
            },
        ],
    }
}

/// Finds a preset by name.
pub fn preset(arch: Arch, name: &str) -> Result<Shape> {
    let all = presets(arch);
    let available = all.iter().map(|s| s.name).collect::<Vec<_>>().join(", ");
    all.into_iter()
        .find(|s| s.name == name)
        .ok_or(Error::UnknownPreset {
            found: name.into(),
            arch: arch.hf_names().1.into(),
            available,
        })
}

/// Options of [`init_model`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Seed of the weights.
    pub seed: u64,
    /// Dtype the weights are stored in.
    pub dtype: DType,
    /// Standard deviation of the weights (`initializer_range`).
    pub std: f32,
    /// A `tokenizer.json` to use (the one `fount data` trained on the corpus) instead of training
    /// a small one; the vocabulary grows to its size, rounded up to a multiple of 64, and it must
    /// hold the family's special tokens.
    pub tokenizer: Option<std::path::PathBuf>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            seed: 0,
            dtype: DType::F32,
            std: 0.02,
            tokenizer: None,
        }
    }
}

/// The special tokens, chat template and BOS rule of a family.
struct Family {
    specials: &'static [&'static str],
    bos: Option<&'static str>,
    eos: &'static str,
    stop: &'static [&'static str],
    template: &'static str,
}

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const MISTRAL: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ raise_exception('Only user, assistant and system roles are supported!') }}{% endif %}{% endfor %}";

fn family(arch: Arch) -> Family {
    match arch {
        Arch::Qwen2 => Family {
            specials: &["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            bos: None,
            eos: "<|im_end|>",
            stop: &["<|im_end|>", "<|endoftext|>"],
            template: CHATML,
        },
        Arch::Llama => Family {
            specials: &[
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ],
            bos: Some("<|begin_of_text|>"),
            eos: "<|eot_id|>",
            stop: &["<|end_of_text|>", "<|eot_id|>"],
            template: LLAMA3,
        },
        Arch::Mistral | Arch::Mixtral => Family {
            specials: &["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
            bos: Some("<s>"),
            eos: "</s>",
            stop: &["</s>"],
            template: MISTRAL,
        },
    }
}

/// Text the built-in tokenizer is trained on: English and Chinese prose about the platform, so
/// common words and characters get merges.
const TOKENIZER_TEXT: &str = include_str!("init_corpus.txt");

/// Trains a byte-level BPE tokenizer with `vocab_size` entries (at most) and `specials`
/// ([`fount_tokenizer::train`]).
pub fn train_bpe(
    texts: &[&str],
    vocab_size: usize,
    specials: &[&str],
    bos: Option<&str>,
) -> Result<tokenizers::Tokenizer> {
    let cfg = fount_tokenizer::BpeConfig {
        vocab_size,
        special_tokens: specials.iter().map(|s| s.to_string()).collect(),
        min_frequency: 2,
        bos: bos.map(str::to_string),
    };
    fount_tokenizer::train(texts.iter(), &cfg).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Writes a randomly initialised model of `arch` and `shape` to `out`: the tokenizer (its
/// special-token ids go into the configs), then `config.json`, `generation_config.json` and
/// `tokenizer_config.json`, then the weights.
pub fn init_model(arch: Arch, shape: &Shape, opts: &InitOptions, out: &Path) -> Result<()> {
    fs_err::create_dir_all(out)?;
    let fam = family(arch);
    let (tok, shape) = init_tokenizer(arch, &fam, shape, opts)?;
    tok.save(out.join("tokenizer.json"), false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let cfg = write_configs(arch, &fam, &shape, opts, &tok, out)?;
    write_weights(&cfg, opts, out)
}

/// The tokenizer of a new model: the one `opts` names (the vocabulary then follows it), or one
/// trained on the built-in text; with the shape it implies.
fn init_tokenizer(
    arch: Arch,
    fam: &Family,
    shape: &Shape,
    opts: &InitOptions,
) -> Result<(tokenizers::Tokenizer, Shape)> {
    let mut shape = shape.clone();
    let tok = match &opts.tokenizer {
        Some(path) => {
            let tok = tokenizers::Tokenizer::from_file(path)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
            if let Some(missing) = fam.specials.iter().find(|t| tok.token_to_id(t).is_none()) {
                return Err(Error::Tokenizer(format!(
                    "{} has no {missing} token, which a {} model needs",
                    path.display(),
                    arch.hf_names().1
                )));
            }
            shape.vocab_size = tok.get_vocab_size(true).div_ceil(64) * 64;
            tok
        }
        None => train_bpe(
            &[TOKENIZER_TEXT],
            shape.vocab_size.min(8192),
            fam.specials,
            fam.bos,
        )?,
    };
    if tok.get_vocab_size(true) > shape.vocab_size {
        return Err(Error::Tokenizer(format!(
            "tokenizer has {} entries but the model only {}",
            tok.get_vocab_size(true),
            shape.vocab_size
        )));
    }
    Ok((tok, shape))
}

/// Writes `config.json`, `generation_config.json` and `tokenizer_config.json` for a model of
/// `arch` and `shape` with `tok`, and returns the config resolved (checked before anything large
/// is written).
fn write_configs(
    arch: Arch,
    fam: &Family,
    shape: &Shape,
    opts: &InitOptions,
    tok: &tokenizers::Tokenizer,
    out: &Path,
) -> Result<Config> {
    let id = |t: &str| {
        tok.token_to_id(t)
            .map(serde_json::Value::from)
            .unwrap_or_default()
    };
    let stop_ids: Vec<serde_json::Value> = fam.stop.iter().map(|t| id(t)).collect();

    let (arch_name, model_type) = arch.hf_names();
    let dtype_name = match opts.dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    let mut config = json!({
        "architectures": [arch_name],
        "model_type": model_type,
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.hidden_size / shape.num_attention_heads,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": shape.rope_scaling,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "hidden_act": "silu",
        "initializer_range": opts.std,
        "attention_dropout": 0.0,
        "bos_token_id": fam.bos.map(id),
        "eos_token_id": id(fam.eos),
        "torch_dtype": dtype_name,
        "use_cache": true,
    });
    if let Some(obj) = config.as_object_mut() {
        match arch {
            Arch::Llama => {
                obj.insert("attention_bias".into(), false.into());
                obj.insert("mlp_bias".into(), false.into());
            }
            Arch::Qwen2 => {
                obj.insert("use_sliding_window".into(), false.into());
                obj.insert(
                    "sliding_window".into(),
                    shape.max_position_embeddings.into(),
                );
                obj.insert("max_window_layers".into(), shape.num_hidden_layers.into());
            }
            Arch::Mistral => {
                obj.insert("sliding_window".into(), serde_json::Value::Null);
            }
            Arch::Mixtral => {
                let (e, k) = shape.experts.unwrap_or((8, 2));
                obj.insert("sliding_window".into(), serde_json::Value::Null);
                obj.insert("num_local_experts".into(), e.into());
                obj.insert("num_experts_per_tok".into(), k.into());
                obj.insert("router_aux_loss_coef".into(), 0.02.into());
                obj.insert("output_router_logits".into(), false.into());
            }
        }
    }
    // Resolve before writing anything large: a bad shape fails fast.
    let hf: HfConfig = serde_json::from_value(config.clone()).map_err(|e| Error::Config {
        field: "config",
        reason: e.to_string(),
    })?;
    let cfg = hf.resolve()?;
    write_json(&out.join("config.json"), &config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({
            "bos_token_id": fam.bos.map(id),
            "eos_token_id": stop_ids,
            "do_sample": false,
        }),
    )?;
    let mut tok_cfg = json!({
        "add_bos_token": fam.bos.is_some(),
        "add_eos_token": false,
        "bos_token": fam.bos,
        "eos_token": fam.eos,
        "pad_token": fam.eos,
        "clean_up_tokenization_spaces": false,
        "model_max_length": shape.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": fam.template,
    });
    if let Some(obj) = tok_cfg.as_object_mut() {
        obj.retain(|_, v| !v.is_null());
    }
    write_json(&out.join("tokenizer_config.json"), &tok_cfg)?;

    Ok(cfg)
}

/// Writes `model.safetensors`: every weight drawn from N(0, `opts.std`²) in a seeded order, the
/// norms' weights ones.
fn write_weights(cfg: &Config, opts: &InitOptions, out: &Path) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let (h, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut normal = |name: String, shape: &[usize]| -> Result<()> {
        let n: usize = shape.iter().product();
        let data = gaussian(&mut rng, n, opts.std);
        let t = Tensor::from_vec(data, shape, &dev)?.to_dtype(opts.dtype)?;
        tensors.insert(name, t);
        Ok(())
    };
    normal("model.embed_tokens.weight".into(), &[v, h])?;
    if !cfg.tie_word_embeddings {
        normal("lm_head.weight".into(), &[v, h])?;
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        normal(format!("{p}.self_attn.q_proj.weight"), &[q, h])?;
        normal(format!("{p}.self_attn.k_proj.weight"), &[kv, h])?;
        normal(format!("{p}.self_attn.v_proj.weight"), &[kv, h])?;
        normal(format!("{p}.self_attn.o_proj.weight"), &[h, q])?;
        if cfg.qkv_bias {
            normal(format!("{p}.self_attn.q_proj.bias"), &[q])?;
            normal(format!("{p}.self_attn.k_proj.bias"), &[kv])?;
            normal(format!("{p}.self_attn.v_proj.bias"), &[kv])?;
        }
        match cfg.moe {
            Some(moe) => {
                normal(
                    format!("{p}.block_sparse_moe.gate.weight"),
                    &[moe.num_experts, h],
                )?;
                for e in 0..moe.num_experts {
                    let ep = format!("{p}.block_sparse_moe.experts.{e}");
                    normal(format!("{ep}.w1.weight"), &[i, h])?;
                    normal(format!("{ep}.w2.weight"), &[h, i])?;
                    normal(format!("{ep}.w3.weight"), &[i, h])?;
                }
            }
            None => {
                normal(format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
                normal(format!("{p}.mlp.up_proj.weight"), &[i, h])?;
                normal(format!("{p}.mlp.down_proj.weight"), &[h, i])?;
            }
        }
    }
    let ones = |n: usize| Tensor::ones(n, opts.dtype, &dev);
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        tensors.insert(format!("{p}.input_layernorm.weight"), ones(h)?);
        tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones(h)?);
    }
    tensors.insert("model.norm.weight".into(), ones(h)?);
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    Ok(())
}

/// `n` samples of N(0, std²) (Box–Muller on a seeded ChaCha stream).
fn gaussian(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
        let u2: f32 = rng.random::<f32>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = 2.0 * std::f32::consts::PI * u2;
        out.push(r * t.cos());
        if out.len() < n {
            out.push(r * t.sin());
        }
    }
    out
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    fs_err::write(path, text + "\n")?;
    Ok(())
}

/// Writes a random rank-`rank` LoRA adapter for a model of `cfg` to `out`, in PEFT's format, on
/// all seven projections, with `lora_alpha = 2 · rank` and weights uniform in `±scale` (seeded).
/// For tests, benchmarks and demos of adapter serving.
pub fn init_lora(
    cfg: &crate::Config,
    rank: usize,
    scale: f32,
    seed: u64,
    out: &Path,
) -> Result<()> {
    use crate::lora::Proj;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for proj in Proj::ALL {
            let (inp, outp) = proj.dims(cfg);
            let base = proj.peft_name(layer);
            for (name, rows, cols) in [("lora_A", rank, inp), ("lora_B", outp, rank)] {
                let v: Vec<f32> = (0..rows * cols)
                    .map(|_| rng.random_range(-scale..scale))
                    .collect();
                tensors.insert(
                    format!("{base}.{name}.weight"),
                    Tensor::from_vec(v, (rows, cols), &Device::Cpu)?,
                );
            }
        }
    }
    let config = crate::peft::PeftConfig::new(rank, 2.0 * rank as f64, &Proj::ALL);
    crate::peft::write_adapter(out, &config, &tensors)?;
    Ok(())
}
