//! `fount quantize`: a Hugging Face model directory to a GGUF file that llama.cpp (and fount)
//! run.
//!
//! The file carries what llama.cpp's own converter writes for the family: the `<arch>.*`
//! hyperparameters, the byte-level BPE tokenizer (`tokenizer.ggml.*`), the chat template, and
//! the tensors under llama.cpp's names, with the query/key rows of Llama-family models permuted
//! for its interleaved RoPE. Types follow `llama-quantize`'s rules: 1-D tensors (norms, biases)
//! stay F32; `q4_k_m`/`q5_k_m` keep the output (or the tied embedding) at Q6_K and a share of
//! `attn_v` and `ffn_down` at Q6_K; a row that is not a whole number of 256-value super-blocks
//! falls back (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0).

use std::io::{BufWriter, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTemplate;
use crate::config::{Arch, Config, RopeScaling};
use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::gguf::{self, WriteTensor};
use crate::rope::Rope;
use crate::weights::Weights;

/// What `fount quantize --type` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// Everything F32.
    F32,
    /// Matrices F16.
    F16,
    /// Matrices BF16.
    Bf16,
    /// Matrices Q8_0.
    Q8_0,
    /// Matrices Q4_0.
    Q4_0,
    /// Llama.cpp's Q4_K_M mix.
    Q4KM,
    /// Llama.cpp's Q5_K_M mix.
    Q5KM,
    /// Matrices Q6_K.
    Q6K,
}

impl QuantType {
    /// The names `--type` accepts.
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k";

    /// Parses a `--type` name.
    pub fn parse(s: &str) -> Option<QuantType> {
        Some(match s.to_ascii_lowercase().as_str() {
            "f32" => QuantType::F32,
            "f16" => QuantType::F16,
            "bf16" => QuantType::Bf16,
            "q8_0" => QuantType::Q8_0,
            "q4_0" => QuantType::Q4_0,
            "q4_k_m" => QuantType::Q4KM,
            "q5_k_m" => QuantType::Q5KM,
            "q6_k" => QuantType::Q6K,
            _ => return None,
        })
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q8_0 => 7,
            QuantType::Q4KM => 15,
            QuantType::Q5KM => 17,
            QuantType::Q6K => 18,
            QuantType::Bf16 => 32,
        }
    }

    /// The type of a matrix: `name` in llama.cpp's naming, `layer` of `layers`.
    fn matrix_type(self, name: &str, layer: Option<usize>, layers: usize, tied: bool) -> GgmlDType {
        // a Mixtral router stays f32 at every type, as llama.cpp writes it
        if name.ends_with("ffn_gate_inp.weight") {
            return GgmlDType::F32;
        }
        let base = match self {
            QuantType::F32 => return GgmlDType::F32,
            QuantType::F16 => return GgmlDType::F16,
            QuantType::Bf16 => return GgmlDType::BF16,
            QuantType::Q8_0 => return GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q6K => GgmlDType::Q6K,
            QuantType::Q4KM => GgmlDType::Q4K,
            QuantType::Q5KM => GgmlDType::Q5K,
        };
        let output = name == "output.weight" || (tied && name == "token_embd.weight");
        if output {
            return GgmlDType::Q6K;
        }
        let mixed = matches!(self, QuantType::Q4KM | QuantType::Q5KM);
        let more_bits = |i: usize, n: usize| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        if mixed
            && (name.ends_with("attn_v.weight")
                || name.ends_with("ffn_down.weight")
                || name.ends_with("ffn_down_exps.weight"))
        {
            if let Some(i) = layer {
                if more_bits(i, layers) {
                    return GgmlDType::Q6K;
                }
            }
        }
        base
    }
}

/// The type a tensor of `cols` columns gets instead of `t` when its rows are not whole blocks
/// (llama.cpp's fallbacks; F16 when even those do not fit).
fn fit(t: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(t.block_size()) {
        return t;
    }
    let fallback = match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if cols.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// Where a tensor's values come from.
enum Source {
    /// A tensor of the model directory, its rows permuted for llama.cpp's RoPE over this many
    /// heads when given.
    Hf(String, Option<usize>),
    /// Tensors of the model directory stacked along a new first axis (a layer's experts).
    Experts(Vec<String>),
    /// `rope_freqs.weight`: Llama 3.1's frequency factors.
    RopeFactors(Vec<f32>),
}

/// Writes `model_dir` as a GGUF file of type `qtype` at `out` (which must not exist; the file
/// appears whole or not at all). Returns the number of tensors written.
pub fn quantize(model_dir: &Path, out: &Path, qtype: QuantType) -> Result<usize> {
    if out.exists() {
        return Err(Error::Exists {
            path: out.to_path_buf(),
            what: "a file (fount quantize does not overwrite)",
        });
    }
    let files = ModelFiles::open(model_dir)?;
    let config = files.config()?;
    let (arch_name, permuted) = match config.arch {
        // llama.cpp runs Mixtral as `llama` with experts
        Arch::Llama | Arch::Mistral | Arch::Mixtral => ("llama", true),
        Arch::Qwen2 => ("qwen2", false),
    };
    let weights =
        Weights::from_safetensors(&files.weight_files()?, model_dir, DType::F32, &Device::Cpu)?;
    let mut metadata = hparams(&config, arch_name, qtype);
    metadata.extend(tokenizer_metadata(&files, &config)?);

    let (h, d, inter, v) = (
        config.hidden_size,
        config.head_dim,
        config.intermediate_size,
        config.vocab_size,
    );
    let (qr, kvr) = (
        config.num_attention_heads * d,
        config.num_key_value_heads * d,
    );
    let layers = config.num_hidden_layers;
    let tied = config.tie_word_embeddings && !weights.contains("lm_head.weight");
    let (mut tensors, mut sources) = (Vec::new(), Vec::new());
    let mut add = |hf: &str, dims: Vec<usize>, layer: Option<usize>, permute: Option<usize>| {
        let Some(base) = gguf::tensor_name(hf.rsplit_once('.').map_or(hf, |(b, _)| b)) else {
            return;
        };
        let suffix = hf.rsplit_once('.').map_or("", |(_, s)| s);
        let name = format!("{base}.{suffix}");
        let dtype = match dims[..] {
            [_] => GgmlDType::F32,
            [.., cols] => fit(qtype.matrix_type(&name, layer, layers, tied), cols),
            [] => return,
        };
        let source = match dims[..] {
            // `experts.*`: the experts stacked along a first axis
            [n, _, _] => Source::Experts((0..n).map(|e| hf.replace('*', &e.to_string())).collect()),
            _ => Source::Hf(hf.to_string(), permute),
        };
        tensors.push(WriteTensor { name, dtype, dims });
        sources.push(source);
    };
    add("model.embed_tokens.weight", vec![v, h], None, None);
    for i in 0..layers {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let (qp, kp) = if permuted {
            (
                Some(config.num_attention_heads),
                Some(config.num_key_value_heads),
            )
        } else {
            (None, None)
        };
        add(&p("input_layernorm.weight"), vec![h], Some(i), None);
        add(&p("self_attn.q_proj.weight"), vec![qr, h], Some(i), qp);
        add(&p("self_attn.k_proj.weight"), vec![kvr, h], Some(i), kp);
        add(&p("self_attn.v_proj.weight"), vec![kvr, h], Some(i), None);
        if config.qkv_bias {
            add(&p("self_attn.q_proj.bias"), vec![qr], Some(i), qp);
            add(&p("self_attn.k_proj.bias"), vec![kvr], Some(i), kp);
            add(&p("self_attn.v_proj.bias"), vec![kvr], Some(i), None);
        }
        add(&p("self_attn.o_proj.weight"), vec![h, qr], Some(i), None);
        if config.o_bias {
            add(&p("self_attn.o_proj.bias"), vec![h], Some(i), None);
        }
        add(
            &p("post_attention_layernorm.weight"),
            vec![h],
            Some(i),
            None,
        );
        if let Some(moe) = config.moe {
            let n = moe.num_experts;
            add(
                &p("block_sparse_moe.gate.weight"),
                vec![n, h],
                Some(i),
                None,
            );
            // each projection's experts stacked into one tensor, as llama.cpp writes them
            add(
                &p("block_sparse_moe.experts.*.w1.weight"),
                vec![n, inter, h],
                Some(i),
                None,
            );
            add(
                &p("block_sparse_moe.experts.*.w3.weight"),
                vec![n, inter, h],
                Some(i),
                None,
            );
            add(
                &p("block_sparse_moe.experts.*.w2.weight"),
                vec![n, h, inter],
                Some(i),
                None,
            );
        } else {
            add(&p("mlp.gate_proj.weight"), vec![inter, h], Some(i), None);
            add(&p("mlp.up_proj.weight"), vec![inter, h], Some(i), None);
            add(&p("mlp.down_proj.weight"), vec![h, inter], Some(i), None);
        }
        if config.mlp_bias {
            for (proj, rows) in [("gate_proj", inter), ("up_proj", inter), ("down_proj", h)] {
                add(&p(&format!("mlp.{proj}.bias")), vec![rows], Some(i), None);
            }
        }
    }
    add("model.norm.weight", vec![h], None, None);
    if !tied {
        add("lm_head.weight", vec![v, h], None, None);
    }
    if let RopeScaling::Llama3 { .. } = config.rope_scaling {
        let scaled = Rope::new(&config);
        let plain = Rope::new(&Config {
            rope_scaling: RopeScaling::None,
            ..config.clone()
        });
        let f: Vec<f32> = plain
            .inv_freq()
            .iter()
            .zip(scaled.inv_freq())
            .map(|(p, s)| p / s)
            .collect();
        tensors.push(WriteTensor {
            name: "rope_freqs.weight".into(),
            dtype: GgmlDType::F32,
            dims: vec![f.len()],
        });
        sources.push(Source::RopeFactors(f));
    }

    let partial = out.with_extension("gguf.partial");
    let result = (|| -> Result<()> {
        let file = fs_err::File::create(&partial)?;
        let mut w = BufWriter::new(file);
        gguf::write(&mut w, &metadata, &tensors, |i| {
            let t = match &sources[i] {
                Source::Hf(hf, None) => weights.get(&tensors[i].dims, hf)?,
                Source::Hf(hf, Some(heads)) => {
                    permute(&weights.get(&tensors[i].dims, hf)?, *heads)?
                }
                Source::Experts(names) => {
                    let each = &tensors[i].dims[1..];
                    let parts = names
                        .iter()
                        .map(|n| weights.get(each, n))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::stack(&parts, 0)?
                }
                Source::RopeFactors(f) => Tensor::new(f.as_slice(), &Device::Cpu)?,
            };
            Ok(QTensor::quantize(&t, tensors[i].dtype)?
                .data()?
                .into_owned())
        })?;
        w.flush()?;
        w.into_inner()
            .map_err(|e| Error::Io(e.into_error()))?
            .sync_all()?;
        fs_err::rename(&partial, out)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs_err::remove_file(&partial);
    }
    result.map(|()| tensors.len())
}

/// Rows (of a weight, or entries of a bias) in llama.cpp's permuted order
/// ([`gguf::permuted_rows`], the order the reader undoes).
fn permute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    let order = gguf::permuted_rows(rows, heads).ok_or_else(|| Error::Config {
        field: "num_attention_heads",
        reason: format!("{rows} query/key rows do not split into {heads} heads of even width"),
    })?;
    let idx = Tensor::new(
        order.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        t.device(),
    )?;
    Ok(t.index_select(&idx, 0)?.contiguous()?)
}

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

/// The `general.*` and `<arch>.*` keys.
fn hparams(c: &Config, arch: &str, qtype: QuantType) -> Vec<(String, Value)> {
    let k = |key: &str| format!("{arch}.{key}");
    let mut m = vec![
        ("general.architecture".to_string(), s(arch)),
        ("general.name".into(), s("fount model")),
        (
            "general.alignment".into(),
            Value::U32(gguf::DEFAULT_ALIGNMENT as u32),
        ),
        ("general.file_type".into(), Value::U32(qtype.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("vocab_size"), Value::U32(c.vocab_size as u32)),
        (
            k("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Value::U32(c.hidden_size as u32)),
        (k("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (
            k("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            k("attention.head_count"),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            k("attention.head_count_kv"),
            Value::U32(c.num_key_value_heads as u32),
        ),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (k("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (k("rope.dimension_count"), Value::U32(c.head_dim as u32)),
    ];
    if c.head_dim * c.num_attention_heads != c.hidden_size {
        m.push((k("attention.key_length"), Value::U32(c.head_dim as u32)));
        m.push((k("attention.value_length"), Value::U32(c.head_dim as u32)));
    }
    if let Some(moe) = c.moe {
        m.push((k("expert_count"), Value::U32(moe.num_experts as u32)));
        m.push((k("expert_used_count"), Value::U32(moe.top_k as u32)));
    }
    if let RopeScaling::Linear { factor } = c.rope_scaling {
        m.push((k("rope.scaling.type"), s("linear")));
        m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    m
}

/// The pre-tokenizer llama.cpp knows by name that a `tokenizer.json` uses (its split regex).
fn pre_tokenizer_name(tokenizer: &serde_json::Value) -> &'static str {
    let text = tokenizer
        .get("pre_tokenizer")
        .map(|p| p.to_string())
        .unwrap_or_default();
    if text.contains(r"\\p{N}{1,3}") {
        "llama-bpe"
    } else if text.contains(r"\\p{N}") {
        "qwen2"
    } else {
        "gpt-2"
    }
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template` from a byte-level BPE `tokenizer.json`.
fn tokenizer_metadata(files: &ModelFiles, config: &Config) -> Result<Vec<(String, Value)>> {
    let path = files.tokenizer_path();
    let text = fs_err::read_to_string(&path)?;
    let tok: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    let bad = |reason: String| Error::Tokenizer(format!("{}: {reason}", path.display()));
    let model = tok.get("model").ok_or_else(|| bad("no model".into()))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(bad(
            "fount quantize writes byte-level BPE tokenizers; this one is not BPE".into(),
        ));
    }
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| bad("model.vocab is not a map".into()))?;
    let n = config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n];
    let mut types = vec![1i32; n];
    for (t, id) in vocab {
        if let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < n) {
            tokens[id] = Some(t.clone());
        }
    }
    for added in tok
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        let id = added.get("id").and_then(|i| i.as_u64()).map(|i| i as usize);
        let content = added.get("content").and_then(|c| c.as_str());
        if let (Some(id), Some(content)) = (id, content) {
            if id < n {
                tokens[id] = Some(content.to_string());
                let special = added.get("special").and_then(|s| s.as_bool()) == Some(true);
                types[id] = if special { 3 } else { 4 };
            }
        }
    }
    let tokens: Vec<Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some(t) => Value::String(t),
            None => {
                types[i] = 5; // unused
                Value::String(format!("[PAD{i}]"))
            }
        })
        .collect();
    let merges: Vec<Value> = model
        .get("merges")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Array(p) => {
                let a = p.first()?.as_str()?;
                let b = p.get(1)?.as_str()?;
                Some(format!("{a} {b}"))
            }
            _ => None,
        })
        .map(Value::String)
        .collect();
    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre_tokenizer_name(&tok))),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let hf = files.hf_config()?;
    if let Some(bos) = hf
        .bos_token_id
        .as_ref()
        .and_then(|b| b.as_u64())
        .map(|b| b as u32)
    {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)));
    }
    if let Some(&eos) = files.generation_config()?.eos_token_ids.first() {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    let add_bos = files
        .tokenizer_config()?
        .and_then(|c| c.get("add_bos_token").and_then(|b| b.as_bool()))
        .unwrap_or(false);
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    if let Some((source, _)) = ChatTemplate::source_in_dir(files.dir())? {
        m.push(("tokenizer.chat_template".into(), Value::String(source)));
    }
    Ok(m)
}
