//! LoRA supervised fine-tuning: OpenAI chat JSONL rendered with the base model's chat template,
//! loss on assistant tokens only, short examples packed into shared forward passes, the base
//! frozen (it holds no gradients), and a PEFT adapter out.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use fount_model::{
    Batch, ChatTemplate, Config, GenerateOptions, Logits, LoraAdapter, LoraBatch, Message, Model,
    NoCache, Proj, SamplingParams, Tokenizer,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::loss::{backward_cross_entropy, cross_entropy};
use crate::optim::{learning_rate, AdamW, AdamWConfig, Grads};
use crate::params::Params;

/// Which projections get adapters: a list of module names, or `"all-linear"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    /// `["q_proj", "v_proj"]`.
    List(Vec<String>),
    /// `"all-linear"`: every projection of attention and MLP.
    Named(String),
}

impl Targets {
    /// The projections named.
    pub fn resolve(&self) -> Result<Vec<Proj>> {
        let names: Vec<&str> = match self {
            Targets::Named(s) if s == "all-linear" => {
                return Ok(Proj::ALL.to_vec());
            }
            Targets::Named(s) => vec![s.as_str()],
            Targets::List(v) => v.iter().map(String::as_str).collect(),
        };
        let mut out = Vec::new();
        for n in names {
            let p = Proj::ALL
                .iter()
                .find(|p| p.module() == n)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "unknown target module {n:?} (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all-linear)"
                    ))
                })?;
            if !out.contains(p) {
                out.push(*p);
            }
        }
        if out.is_empty() {
            return Err(Error::Invalid("target_modules names no module".into()));
        }
        Ok(out)
    }
}

fn default_targets() -> Targets {
    Targets::List(
        ["q_proj", "k_proj", "v_proj", "o_proj"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    )
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_lr() -> f64 {
    1e-3
}
fn default_epochs() -> f64 {
    3.0
}
fn default_tokens() -> usize {
    2048
}
fn default_eval_fraction() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    1.0
}
fn default_adamw() -> AdamWConfig {
    AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    }
}

/// A fine-tuning run (`fount finetune --config FILE`; every field has a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// LoRA rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// LoRA alpha: the update is scaled by `alpha / r` (`alpha / √r` with rsLoRA).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input during training, as PEFT's `lora_dropout` (each adapted
    /// projection its own mask, drawn from `seed` and the step, so a resumed run draws the same
    /// masks); recorded in `adapter_config.json`.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Rank-stabilised scaling, `alpha / √r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Projections to adapt (default: the attention projections).
    #[serde(default = "default_targets")]
    pub target_modules: Targets,
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Final learning rate of the cosine decay (default: a tenth of `lr`).
    #[serde(default)]
    pub min_lr: Option<f64>,
    /// Warmup steps (default: a twentieth of the steps).
    #[serde(default)]
    pub warmup: Option<u64>,
    /// Passes over the training examples.
    #[serde(default = "default_epochs")]
    pub epochs: f64,
    /// Tokens per step: examples are packed into a forward pass up to this many.
    #[serde(default = "default_tokens")]
    pub tokens_per_step: usize,
    /// Longest example in tokens (default: the model's context).
    #[serde(default)]
    pub max_len: Option<usize>,
    /// Cut examples longer than `max_len` (reported) instead of refusing the file.
    #[serde(default)]
    pub truncate: bool,
    /// Fraction of examples held out for validation loss and token accuracy.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Largest global gradient norm.
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Seed of the adapter's initial `A`, the held-out split and the example order.
    #[serde(default)]
    pub seed: u64,
    /// AdamW settings (weight decay 0 by default for adapters).
    #[serde(default = "default_adamw")]
    pub adamw: AdamWConfig,
    /// Steps between checkpoints in `OUT/checkpoints` (0: only on a signal).
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Complete checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Activation recomputation (gradient checkpointing): keep only each layer's input during
    /// the forward pass and recompute the rest during the backward pass, for a second forward
    /// pass of compute. Dense bases only.
    #[serde(default)]
    pub recompute: bool,
}

fn default_keep() -> usize {
    2
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            r: default_r(),
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: default_targets(),
            lr: default_lr(),
            min_lr: None,
            warmup: None,
            epochs: default_epochs(),
            tokens_per_step: default_tokens(),
            max_len: None,
            truncate: false,
            eval_fraction: default_eval_fraction(),
            clip: default_clip(),
            seed: 0,
            adamw: default_adamw(),
            checkpoint_every: 0,
            keep_checkpoints: default_keep(),
            recompute: false,
        }
    }
}

impl FinetuneConfig {
    /// Reads a configuration file.
    pub fn from_file(path: &Path) -> Result<FinetuneConfig> {
        let text = fs_err::read_to_string(path)?;
        let cfg: FinetuneConfig = toml::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values that parse but cannot run.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Invalid(m.to_string()));
        if self.r == 0 {
            return bad("r must be at least 1");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad("lora_alpha must be positive");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("lora_dropout must be in [0, 1)");
        }
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints must be at least 1");
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.lr) || !positive(self.epochs) {
            return bad("lr and epochs must be positive");
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad("eval_fraction must be in [0, 1)");
        }
        if self.tokens_per_step < 2 {
            return bad("tokens_per_step must be at least 2");
        }
        self.target_modules.resolve()?;
        Ok(())
    }

    /// The adapter's scale.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// One tokenized conversation: `trained[i]` when token `i` is an assistant token (a target).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Whether each token is predicted in the loss.
    pub trained: Vec<bool>,
}

/// What reading a chat file found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataReport {
    /// Conversations read.
    pub examples: usize,
    /// Cut to `max_len`.
    pub truncated: usize,
    /// Assistant tokens over all examples.
    pub trained_tokens: usize,
}

/// Renders and tokenizes one conversation, marking the assistant tokens.
pub fn tokenize_chat(
    messages: &[Message],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
) -> Result<Example> {
    let full = template.render(messages, false)?;
    // each assistant turn's text: from after the generation prompt to the end of its message
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let through = template.render(&messages[..=i], false)?;
        if !(through.starts_with(&before) && full.starts_with(&through)) {
            return Err(Error::Invalid(
                "the chat template does not render conversations as prefixes of each other; assistant tokens cannot be located".into(),
            ));
        }
        spans.push(before.len()..through.len());
    }
    if spans.is_empty() {
        return Err(Error::Invalid("no assistant turn to learn from".into()));
    }
    let enc = tokenizer
        .inner()
        .encode(full.as_str(), false)
        .map_err(|e| Error::Invalid(format!("tokenizing: {e}")))?;
    let tokens = enc.get_ids().to_vec();
    let trained = enc
        .get_offsets()
        .iter()
        .map(|&(start, _)| spans.iter().any(|s| s.contains(&start)))
        .collect();
    Ok(Example { tokens, trained })
}

#[derive(Deserialize)]
struct ChatLine {
    messages: Vec<Message>,
}

/// Reads OpenAI chat JSONL (`{"messages": [...]}` per line). A line that is not such an
/// object, or has no assistant turn, is an error naming the line; so is one longer than
/// `max_len` unless `truncate`.
pub fn read_chat_file(
    path: &Path,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    max_len: usize,
    truncate: bool,
) -> Result<(Vec<Example>, DataReport)> {
    let text = fs_err::read_to_string(path)?;
    let mut out = Vec::new();
    let mut report = DataReport::default();
    let mut too_long = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| Error::Invalid(format!("{}:{}: {m}", path.display(), i + 1));
        let chat: ChatLine = serde_json::from_str(line)
            .map_err(|e| at(format!("not a {{\"messages\": [...]}} object: {e}")))?;
        let mut ex =
            tokenize_chat(&chat.messages, template, tokenizer).map_err(|e| at(e.to_string()))?;
        if ex.tokens.len() > max_len {
            if !truncate {
                too_long.push((i + 1, ex.tokens.len()));
                continue;
            }
            ex.tokens.truncate(max_len);
            ex.trained.truncate(max_len);
            report.truncated += 1;
        }
        if ex.trained.iter().skip(1).any(|&t| t) {
            report.trained_tokens += ex.trained.iter().skip(1).filter(|&&t| t).count();
            out.push(ex);
        }
    }
    if let Some(&(line, len)) = too_long.first() {
        return Err(Error::Invalid(format!(
            "{}: {} example(s) longer than {max_len} tokens (the first: line {line}, {len} tokens); pass --truncate to cut them",
            path.display(),
            too_long.len()
        )));
    }
    report.examples = out.len();
    if out.is_empty() {
        return Err(Error::Invalid(format!("{}: no examples", path.display())));
    }
    Ok((out, report))
}

/// The trainable adapter: `A` `(r, in)` and `Bᵀ` `(r, out)` per targeted projection.
#[derive(Debug)]
pub struct LoraParams {
    /// As the optimizer sees them: PEFT's `lora_A` names, and `lora_B` names holding `Bᵀ`.
    pub params: Params,
    pairs: Vec<((usize, Proj), Var, Var)>,
    rank: usize,
    scale: f64,
    targets: Vec<Proj>,
}

impl LoraParams {
    /// PEFT's initialisation: `A` Kaiming-uniform (`bound = 1/√in`), `B` zero, so the adapted
    /// model starts as the base.
    pub fn init(cfg: &Config, ft: &FinetuneConfig) -> Result<LoraParams> {
        let targets = ft.target_modules.resolve()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(ft.seed);
        let (mut pairs, mut named) = (Vec::new(), Vec::new());
        for layer in 0..cfg.num_hidden_layers {
            for &proj in &targets {
                let (inp, out) = proj.dims(cfg);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..ft.r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (ft.r, inp), &Device::Cpu)?)?;
                let bt = Var::zeros((ft.r, out), DType::F32, &Device::Cpu)?;
                let name = proj.peft_name(layer);
                named.push((format!("{name}.lora_A.weight"), a.clone()));
                named.push((format!("{name}.lora_B.weight"), bt.clone()));
                pairs.push(((layer, proj), a, bt));
            }
        }
        Ok(LoraParams {
            params: Params::from_vars(named),
            pairs,
            rank: ft.r,
            scale: ft.scale(),
            targets,
        })
    }

    /// Sets the variables from a PEFT adapter directory written by [`LoraParams::save_peft`]
    /// for the same base and settings (a checkpoint's).
    pub fn restore(&self, dir: &Path) -> Result<()> {
        let path = dir.join("adapter_model.safetensors");
        let tensors =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::Format {
                path: path.clone(),
                message: e.to_string(),
            })?;
        for ((layer, proj), a, bt) in &self.pairs {
            let name = proj.peft_name(*layer);
            let get = |suffix: &str, shape: &[usize]| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = tensors.get(&key).ok_or_else(|| Error::Format {
                    path: path.clone(),
                    message: format!("no {key}"),
                })?;
                if t.dims() != shape {
                    return Err(Error::Format {
                        path: path.clone(),
                        message: format!("{key} is {:?}, expected {shape:?}", t.dims()),
                    });
                }
                Ok(t.to_dtype(DType::F32)?)
            };
            let (r, inp) = a.as_tensor().dims2()?;
            let out = bt.as_tensor().dim(1)?;
            a.set(&get("lora_A.weight", &[r, inp])?)?;
            bt.set(&get("lora_B.weight", &[out, r])?.t()?.contiguous()?)?;
        }
        Ok(())
    }

    /// The adapter over the variables (a forward pass through it records their gradients).
    pub fn adapter(&self) -> Result<Arc<LoraAdapter>> {
        let map: HashMap<(usize, Proj), (Tensor, Tensor)> = self
            .pairs
            .iter()
            .map(|(k, a, bt)| (*k, (a.as_tensor().clone(), bt.as_tensor().clone())))
            .collect();
        Ok(Arc::new(LoraAdapter::from_tensors(
            self.rank, self.scale, map,
        )?))
    }

    /// Writes a PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors`
    /// (`lora_A.weight` `(r, in)`, `lora_B.weight` `(out, r)`).
    pub fn save_peft(&self, dir: &Path, ft: &FinetuneConfig, base: &str) -> Result<()> {
        fs_err::create_dir_all(dir)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for ((layer, proj), a, bt) in &self.pairs {
            let name = proj.peft_name(*layer);
            tensors.insert(format!("{name}.lora_A.weight"), a.as_tensor().clone());
            tensors.insert(
                format!("{name}.lora_B.weight"),
                bt.as_tensor().t()?.contiguous()?,
            );
        }
        let weights = dir.join("adapter_model.safetensors");
        candle_core::safetensors::save(&tensors, &weights).map_err(|e| Error::Format {
            path: weights.clone(),
            message: e.to_string(),
        })?;
        let modules: Vec<&str> = self.targets.iter().map(|p| p.module()).collect();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": self.rank,
            "lora_alpha": ft.lora_alpha,
            "lora_dropout": ft.lora_dropout,
            "use_rslora": ft.use_rslora,
            "target_modules": modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_dora": false,
            "modules_to_save": null,
        });
        fs_err::write(
            dir.join("adapter_config.json"),
            serde_json::to_vec_pretty(&config).unwrap_or_default(),
        )?;
        Ok(())
    }
}

/// One forward pass's worth of examples, packed as separate sequences.
fn pack(examples: &[&Example]) -> (Batch, Vec<u32>, Vec<bool>) {
    let mut batch = Batch::default();
    let (mut targets, mut mask) = (Vec::new(), Vec::new());
    for ex in examples {
        batch.push(&ex.tokens, 0);
        for i in 0..ex.tokens.len() {
            targets.push(ex.tokens.get(i + 1).copied().unwrap_or(0));
            mask.push(ex.trained.get(i + 1).copied().unwrap_or(false));
        }
    }
    (batch, targets, mask)
}

/// Groups examples (in `order`) into steps of at most `budget` tokens.
fn steps_of<'a>(examples: &'a [Example], order: &[usize], budget: usize) -> Vec<Vec<&'a Example>> {
    let mut out = Vec::new();
    let (mut cur, mut tokens) = (Vec::new(), 0);
    for &i in order {
        let ex = &examples[i];
        if !cur.is_empty() && tokens + ex.tokens.len() > budget {
            out.push(std::mem::take(&mut cur));
            tokens = 0;
        }
        tokens += ex.tokens.len();
        cur.push(ex);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Validation loss and token accuracy on held-out examples.
pub fn evaluate(
    model: &Model,
    adapter: Option<&Arc<LoraAdapter>>,
    examples: &[Example],
    budget: usize,
) -> Result<(f64, f64)> {
    let order: Vec<usize> = (0..examples.len()).collect();
    let (mut loss_sum, mut counted, mut correct) = (0.0, 0usize, 0usize);
    for group in steps_of(examples, &order, budget) {
        let (batch, targets, mask) = pack(&group);
        let mut lora = LoraBatch::none();
        if let Some(a) = adapter {
            lora.push(0..batch.len(), a.clone());
        }
        let out = model.forward_lora(&batch, &mut NoCache, Logits::All, &lora, false)?;
        let logits = out.logits.detach();
        let (loss, n) = cross_entropy(&logits, &targets, &mask)?;
        loss_sum += f64::from(loss.to_scalar::<f32>()?) * n as f64;
        counted += n;
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        correct += pred
            .iter()
            .zip(&targets)
            .zip(&mask)
            .filter(|((p, t), m)| **m && p == t)
            .count();
    }
    if counted == 0 {
        return Err(Error::Invalid("no held-out tokens to evaluate".into()));
    }
    Ok((loss_sum / counted as f64, correct as f64 / counted as f64))
}

/// Metrics of one fine-tuning step.
#[derive(Debug, Clone, Serialize)]
pub struct FinetuneStep {
    /// 1-based.
    pub step: u64,
    /// Of the total.
    pub steps: u64,
    /// Mean loss over the step's assistant tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the step's forward pass.
    pub tokens: usize,
}

/// The result of a fine-tuning run.
#[derive(Debug, Clone)]
pub struct FinetuneOutcome {
    /// Where the adapter was written.
    pub adapter: PathBuf,
    /// Steps taken.
    pub steps: u64,
    /// Examples read.
    pub data: DataReport,
    /// Held-out examples.
    pub held_out: usize,
    /// Validation loss and token accuracy of the base model and of the adapter, when any
    /// examples were held out.
    pub base_eval: Option<(f64, f64)>,
    /// The same with the adapter.
    pub eval: Option<(f64, f64)>,
    /// Whether it stopped on a signal: `adapter` is then the checkpoint's, holding the steps
    /// taken so far, and `--resume` continues the run.
    pub interrupted: bool,
}

/// What a fine-tuning checkpoint records besides tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch under way.
    pub epoch: u64,
    /// Steps of that epoch already taken.
    pub in_epoch: usize,
    /// SHA-256 of the chat file trained on.
    pub data_sha256: String,
    /// The settings of the run (a resumed run must have the same).
    pub config: FinetuneConfig,
}

impl FinetuneState {
    /// The settings that decide the trained weights: all but where and how often to save.
    fn decisive(cfg: &FinetuneConfig) -> FinetuneConfig {
        FinetuneConfig {
            checkpoint_every: 0,
            keep_checkpoints: default_keep(),
            ..cfg.clone()
        }
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = fs_err::read(path)?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}

/// The seed of step `step`'s dropout masks.
fn dropout_seed(seed: u64, step: u64) -> u64 {
    (seed ^ 0xd50f_u64.rotate_left(40)).wrapping_add(step.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Fine-tunes a LoRA adapter on the base model in `base` with the chat file `data`, writing a
/// PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) into `out` and checkpoints
/// into `out/checkpoints`. With `resume`, continues from the newest complete checkpoint there
/// and ends with the weights an uninterrupted run would have. `on_step` sees every step; `stop`
/// ends the run early with a checkpoint.
pub fn finetune(
    base: &Path,
    data: &Path,
    out: &Path,
    ft: &FinetuneConfig,
    resume: bool,
    stop: &AtomicBool,
    on_step: &mut dyn FnMut(&FinetuneStep),
) -> Result<FinetuneOutcome> {
    ft.validate()?;
    if out.join("adapter_config.json").exists() {
        return Err(Error::Invalid(format!(
            "{} already holds an adapter; choose another --out",
            out.display()
        )));
    }
    let ckpt_root = out.join("checkpoints");
    let existing = checkpoint::list(&ckpt_root)?;
    if !resume && !existing.is_empty() {
        return Err(Error::Invalid(format!(
            "{} holds checkpoints of a run; pass --resume to continue it, or choose another --out",
            out.display()
        )));
    }
    let files = fount_model::ModelFiles::open(base)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer_path())?;
    let template = ChatTemplate::from_dir(base)?.ok_or_else(|| {
        Error::Invalid(format!(
            "{} has no chat template to render conversations with",
            base.display()
        ))
    })?;
    // the base, frozen: plain tensors, so no gradient is computed or kept for it
    let model = Model::load(base, DType::F32, &Device::Cpu)?;
    let cfg = model.config().clone();
    if ft.recompute && cfg.moe.is_some() {
        return Err(Error::Invalid(
            "recompute is for dense models; fine-tune an MoE model without it".into(),
        ));
    }
    let max_len = ft
        .max_len
        .unwrap_or(cfg.max_position_embeddings)
        .min(cfg.max_position_embeddings);
    let (mut examples, report) = read_chat_file(data, &template, &tokenizer, max_len, ft.truncate)?;
    if let Some(t) = examples
        .iter()
        .flat_map(|e| &e.tokens)
        .find(|&&t| t as usize >= cfg.vocab_size)
    {
        return Err(Error::Invalid(format!(
            "token {t} outside the model's vocabulary"
        )));
    }
    let data_sha256 = sha256_file(data)?;
    // held out: every k-th example after a seeded shuffle
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(ft.seed ^ 0x5f7);
    examples.shuffle(&mut rng);
    let held = ((examples.len() as f64) * ft.eval_fraction).round() as usize;
    let held = held.min(examples.len().saturating_sub(1));
    let eval_set: Vec<Example> = examples.drain(..held).collect();

    let lora = LoraParams::init(&cfg, ft)?;
    let adapter = lora.adapter()?;
    let sizes: Vec<(String, usize)> = lora
        .params
        .iter()
        .map(|(n, v)| (n.to_string(), v.elem_count()))
        .collect();
    let mut opt = AdamW::new(ft.adamw, &sizes);
    let (mut step, mut epoch, mut skip) = (0u64, 0u64, 0usize);
    if let Some((_, dir)) = existing.last().filter(|_| resume) {
        let loaded = checkpoint::load::<FinetuneState>(dir, 0, &lora.params, ft.adamw)?;
        let s = loaded.state;
        if FinetuneState::decisive(&s.config) != FinetuneState::decisive(ft) {
            return Err(Error::Invalid(format!(
                "{} was written with other settings than these; resume with the same config",
                dir.display()
            )));
        }
        if s.data_sha256 != data_sha256 {
            return Err(Error::Invalid(format!(
                "{} was trained on another file than {} (its SHA-256 differs)",
                dir.display(),
                data.display()
            )));
        }
        lora.restore(&dir.join("adapter"))?;
        opt = loaded.optimizer;
        (step, epoch, skip) = (s.step, s.epoch, s.in_epoch);
    }
    let per_epoch = steps_of(
        &examples,
        &(0..examples.len()).collect::<Vec<_>>(),
        ft.tokens_per_step,
    )
    .len();
    let total = ((per_epoch as f64) * ft.epochs).ceil().max(1.0) as u64;
    let warmup = ft.warmup.unwrap_or(total / 20);
    let min_lr = ft.min_lr.unwrap_or(ft.lr / 10.0);
    let base_eval = if eval_set.is_empty() {
        None
    } else {
        Some(evaluate(&model, None, &eval_set, ft.tokens_per_step)?)
    };
    let base_name = base.display().to_string();
    let save = |step: u64, epoch: u64, in_epoch: usize, opt: &AdamW| -> Result<PathBuf> {
        let state = FinetuneState {
            step,
            epoch,
            in_epoch,
            data_sha256: data_sha256.clone(),
            config: ft.clone(),
        };
        let weights = |d: &Path| lora.save_peft(&d.join("adapter"), ft, &base_name);
        let tmp = checkpoint::stage(&ckpt_root, step, &weights, opt, &state)?;
        checkpoint::write_rank(&tmp, 0, &state)?;
        checkpoint::commit(&ckpt_root, &tmp, step, ft.keep_checkpoints)
    };

    let mut grads = Grads::default();
    'outer: while step < total {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut erng = rand_chacha::ChaCha8Rng::seed_from_u64(ft.seed.wrapping_add(epoch));
        order.shuffle(&mut erng);
        let groups = steps_of(&examples, &order, ft.tokens_per_step);
        for (i, group) in groups.iter().enumerate().skip(skip) {
            if step >= total {
                break 'outer;
            }
            if stop.load(Ordering::SeqCst) {
                let dir = save(step, epoch, i, &opt)?;
                return Ok(FinetuneOutcome {
                    adapter: dir.join("adapter"),
                    steps: step,
                    data: report,
                    held_out: eval_set.len(),
                    base_eval,
                    eval: None,
                    interrupted: true,
                });
            }
            let (batch, targets, mask) = pack(group);
            let this = if ft.lora_dropout > 0.0 {
                let plain = LoraAdapter::clone(&adapter);
                Arc::new(plain.with_dropout(ft.lora_dropout as f32, dropout_seed(ft.seed, step)))
            } else {
                adapter.clone()
            };
            let mut lb = LoraBatch::none();
            lb.push(0..batch.len(), this);
            grads.clear();
            let loss = backward_cross_entropy(
                &model,
                &batch,
                &lb,
                &targets,
                &mask,
                ft.recompute,
                &mut |store| grads.accumulate(&lora.params, store, 1.0),
            )?;
            let grad_norm = if ft.clip > 0.0 {
                grads.clip(ft.clip)
            } else {
                grads.norm()
            };
            let lr = learning_rate(step, ft.lr, min_lr, warmup, total);
            opt.update(&lora.params, &grads, lr)?;
            step += 1;
            on_step(&FinetuneStep {
                step,
                steps: total,
                loss,
                lr,
                grad_norm,
                tokens: batch.len(),
            });
            if ft.checkpoint_every > 0 && step % ft.checkpoint_every == 0 && step < total {
                save(step, epoch, i + 1, &opt)?;
            }
        }
        skip = 0;
        epoch += 1;
    }
    let eval = if eval_set.is_empty() {
        None
    } else {
        Some(evaluate(
            &model,
            Some(&adapter),
            &eval_set,
            ft.tokens_per_step,
        )?)
    };
    // written beside, synced, and moved in weights first: `adapter_config.json` appears last, so
    // a kill never leaves a directory that loads as a half-written adapter
    let tmp = out.join("adapter.partial");
    if tmp.exists() {
        fs_err::remove_dir_all(&tmp)?;
    }
    lora.save_peft(&tmp, ft, &base_name)?;
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        fs_err::File::open(tmp.join(name))?.sync_all()?;
        fs_err::rename(tmp.join(name), out.join(name))?;
    }
    fs_err::remove_dir(&tmp)?;
    fs_err::File::open(out)?.sync_all()?;
    Ok(FinetuneOutcome {
        adapter: out.to_path_buf(),
        steps: step,
        data: report,
        held_out: eval_set.len(),
        base_eval,
        eval,
        interrupted: false,
    })
}

/// Exact-match accuracy of greedy answers on a chat file: for each conversation, the messages
/// before its last assistant turn are the prompt and that turn's content the expected answer.
/// Returns (correct, total).
pub fn chat_accuracy(
    model_dir: &Path,
    adapter: Option<&Path>,
    data: &Path,
    limit: usize,
) -> Result<(usize, usize)> {
    let files = fount_model::ModelFiles::open(model_dir)?;
    let tokenizer = Tokenizer::from_file(&files.tokenizer_path())?;
    let template = ChatTemplate::from_dir(model_dir)?
        .ok_or_else(|| Error::Invalid(format!("{} has no chat template", model_dir.display())))?;
    let model = Model::load(model_dir, DType::F32, &Device::Cpu)?;
    let adapter = match adapter {
        Some(dir) => Some(Arc::new(LoraAdapter::load(
            dir,
            model.config(),
            DType::F32,
            &Device::Cpu,
        )?)),
        None => None,
    };
    let stop_ids = files.generation_config()?.eos_token_ids;
    let text = fs_err::read_to_string(data)?;
    let (mut correct, mut total) = (0, 0);
    for (i, line) in text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(limit)
        .enumerate()
    {
        let chat: ChatLine = serde_json::from_str(line)
            .map_err(|e| Error::Invalid(format!("{}:{}: {e}", data.display(), i + 1)))?;
        let Some(last) = chat.messages.iter().rposition(|m| m.role == "assistant") else {
            continue;
        };
        let expected = chat.messages[last]
            .content
            .as_str()
            .unwrap_or_default()
            .trim()
            .to_string();
        let prompt = template.render(&chat.messages[..last], true)?;
        let ids = tokenizer.encode(&prompt, false)?;
        let opts = GenerateOptions {
            max_tokens: tokenizer.encode(&expected, false)?.len() + 8,
            stop_ids: stop_ids.clone(),
            stop_strings: Vec::new(),
            sampling: SamplingParams::default(),
            adapter: adapter.clone(),
        };
        let mut answer = String::new();
        fount_model::generate(&model, &tokenizer, &ids, &opts, |t| answer.push_str(t))?;
        total += 1;
        if answer.trim() == expected {
            correct += 1;
        }
    }
    Ok((correct, total))
}

/// Writes the base model with the adapter folded into its weights (`W + s·B·A` for every
/// adapted projection) as a model directory at `out`.
pub fn merge(base: &Path, adapter_dir: &Path, out: &Path) -> Result<()> {
    if out.join("config.json").exists() {
        return Err(Error::Invalid(format!(
            "{} already holds a model",
            out.display()
        )));
    }
    let files = fount_model::ModelFiles::open(base)?;
    let cfg = files.config()?;
    // loading checks the adapter against the base (names, shapes, ranks)
    LoraAdapter::load(adapter_dir, &cfg, DType::F32, &Device::Cpu)?;
    let pc: serde_json::Value =
        serde_json::from_slice(&fs_err::read(adapter_dir.join("adapter_config.json"))?)
            .map_err(|e| Error::Invalid(format!("adapter_config.json: {e}")))?;
    let r = pc["r"].as_f64().unwrap_or(1.0);
    let alpha = pc["lora_alpha"].as_f64().unwrap_or(r);
    let scale = if pc["use_rslora"].as_bool().unwrap_or(false) {
        alpha / r.sqrt()
    } else {
        alpha / r
    };
    let lora = candle_core::safetensors::load(
        adapter_dir.join("adapter_model.safetensors"),
        &Device::Cpu,
    )?;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    let mut dtypes = HashMap::new();
    for f in files.weight_files()? {
        for (name, t) in candle_core::safetensors::load(&f, &Device::Cpu)? {
            dtypes.insert(name.clone(), t.dtype());
            weights.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    let mut merged = 0;
    for (name, a) in &lora {
        let Some(prefix) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = lora
            .get(&format!("{prefix}.lora_B.weight"))
            .ok_or_else(|| Error::Invalid(format!("{prefix}: lora_A without lora_B")))?;
        let target = format!("{}.weight", prefix.trim_start_matches("base_model.model."));
        let w = weights
            .get(&target)
            .ok_or_else(|| Error::Invalid(format!("the base has no {target}")))?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        let updated = (w + delta)?;
        weights.insert(target, updated);
        merged += 1;
    }
    if merged == 0 {
        return Err(Error::Invalid(format!(
            "{} adapts nothing",
            adapter_dir.display()
        )));
    }
    let tmp = out.with_extension("partial");
    if tmp.exists() {
        fs_err::remove_dir_all(&tmp)?;
    }
    fs_err::create_dir_all(&tmp)?;
    for e in fs_err::read_dir(base)? {
        let p = e?.path();
        let n = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if p.is_file() && !n.ends_with(".safetensors") && n != "model.safetensors.index.json" {
            fs_err::copy(&p, tmp.join(&n))?;
        }
    }
    // stored in the base's data types
    let mut stored = HashMap::new();
    for (name, t) in weights {
        let dt = dtypes.get(&name).copied().unwrap_or(DType::F32);
        stored.insert(name, t.to_dtype(dt)?);
    }
    let path = tmp.join("model.safetensors");
    candle_core::safetensors::save(&stored, &path).map_err(|e| Error::Format {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if out.exists() {
        // an empty directory is replaced; anything in it is left alone
        fs_err::remove_dir(out).map_err(|_| {
            Error::Invalid(format!(
                "{} is not empty; the merged model is in {}",
                out.display(),
                tmp.display()
            ))
        })?;
    }
    fs_err::rename(&tmp, out)?;
    Ok(())
}
