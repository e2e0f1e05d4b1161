//! The Llama-family decoder: embedding, `num_hidden_layers` pre-norm blocks of attention and a
//! feed-forward (dense SwiGLU or sparse MoE), a final norm and the language-model head.
//!
//! One forward serves prefill, cached decoding and training: it takes a packed [`Batch`] and the
//! sequences' key/value state as a [`KvView`] (see `DESIGN.md`, "The model's forward contract").

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::batch::{Batch, Logits};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::kv::KvView;
use crate::layers::{attention_mask, Attention, LayerCtx, Linear, Mlp, RmsNorm};
use crate::lora::LoraBatch;
use crate::moe::SparseMoe;
use crate::rope::Rope;
use crate::weights::Weights;

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

/// One pre-norm decoder block.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &Config, layer: usize) -> Result<Self> {
        let mlp = if cfg.moe.is_some() {
            FeedForward::Sparse(SparseMoe::load(&w.pp("block_sparse_moe"), cfg)?)
        } else {
            FeedForward::Dense(Mlp::load(
                &w.pp("mlp"),
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.mlp_bias,
            )?)
        };
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(
                &w.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(&w.pp("self_attn"), cfg, layer)?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp,
        })
    }
}

/// What one forward returns.
#[derive(Debug)]
pub struct Output {
    /// Logits, `(sequences, vocab)` for [`Logits::Last`] or `(tokens, vocab)` for [`Logits::All`].
    pub logits: Tensor,
    /// Router logits of each MoE layer, `(tokens, experts)` (empty for dense models).
    pub router_logits: Vec<Tensor>,
}

/// A loaded causal language model.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    config: Config,
    dtype: DType,
    device: Device,
}

impl Model {
    /// Loads a model directory (`config.json` and safetensors weights), computing in `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = ModelFiles::open(dir)?;
        let config = files.config()?;
        let weights = Weights::from_safetensors(&files.weight_files()?, dir, dtype, device)?;
        Model::from_weights(&weights, config)
    }

    /// Builds the model from weights already opened.
    pub fn from_weights(w: &Weights, config: Config) -> Result<Self> {
        let (v, h) = (config.vocab_size, config.hidden_size);
        let m = w.pp("model");
        let embed_tokens = m.get(&[v, h], "embed_tokens.weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&m.pp(format!("layers.{i}")), &config, i))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&m.pp("norm"), h, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::from_weights(embed_tokens.clone(), None)
        } else {
            Linear::load(&w.pp("lm_head"), h, v, false)?
        };
        Ok(Model {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(&config),
            dtype: w.dtype(),
            device: w.device().clone(),
            config,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype activations and caches use.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs the decoder over a packed batch.
    ///
    /// Each sequence's new tokens attend to its past (read through `kv`, which is extended with
    /// the new keys and values) and causally to each other.
    ///
    /// # Shapes
    /// - `batch.tokens`: `[N]`, `batch.positions`: `[N]`
    /// - logits: `(sequences, vocab)` or `(N, vocab)`, see [`Logits`]
    pub fn forward(&self, batch: &Batch, kv: &mut dyn KvView, logits: Logits) -> Result<Output> {
        self.forward_lora(batch, kv, logits, &LoraBatch::none(), false)
    }

    /// [`Model::forward`] with LoRA adapters on row ranges of the batch. With `invariant`, every
    /// token's result is independent of the rest of the batch, bit for bit (the engine's
    /// guarantee that a request's output does not depend on who it shares a step with); it costs
    /// prefill speed, since large row counts no longer go to the blocked matmul.
    pub fn forward_lora(
        &self,
        batch: &Batch,
        kv: &mut dyn KvView,
        logits: Logits,
        lora: &LoraBatch,
        invariant: bool,
    ) -> Result<Output> {
        batch.validate(self.config.vocab_size)?;
        if let Some((range, _)) = lora.segments().iter().find(|(r, _)| r.end > batch.len()) {
            return Err(Error::Batch(format!(
                "adapter rows {range:?} outside the batch of {} tokens",
                batch.len()
            )));
        }
        let ctx = LayerCtx { lora, invariant };
        let max = self.config.max_position_embeddings;
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= max {
                return Err(Error::ContextLength {
                    tokens: p as usize + 1,
                    max,
                });
            }
        }
        let n = batch.len();
        let past: Vec<usize> = (0..batch.seq_lens.len()).map(|s| kv.past_len(s)).collect();
        let tokens = Tensor::from_slice(&batch.tokens, n, &self.device)?;
        let (cos, sin) = self.rope.tables(&batch.positions, &self.device)?;
        // Masks depend only on the sequences' lengths, so they are built once per forward: one
        // set for full attention, one for sliding-window layers if the model has them.
        let full = self.masks(batch, &past, None)?;
        let windowed = match self.config.sliding_window {
            Some(w) => Some(self.masks(batch, &past, Some(w))?),
            None => None,
        };
        let mut x = self.embed_tokens.index_select(&tokens, 0)?; // (N, hidden)
        let mut router_logits = Vec::new();
        for (index, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = layer.input_layernorm.forward(&x)?;
            let masks = match (layer.self_attn.window(), &windowed) {
                (Some(_), Some(w)) => w,
                _ => &full,
            };
            let h = layer
                .self_attn
                .forward_ctx(&h, batch, masks, &cos, &sin, kv, &ctx)?;
            let x1 = (residual + h)?;
            let h = layer.post_attention_layernorm.forward(&x1)?;
            let h = match &layer.mlp {
                FeedForward::Dense(mlp) => mlp.forward_ctx(&h, index, &ctx)?,
                FeedForward::Sparse(moe) => {
                    let (h, r) = moe.forward(&h)?;
                    router_logits.push(r);
                    h
                }
            };
            x = (x1 + h)?;
        }
        let x = match logits {
            Logits::All => x,
            Logits::Last => {
                let mut last = Vec::with_capacity(batch.seq_lens.len());
                let mut end = 0u32;
                for &len in &batch.seq_lens {
                    end += len as u32;
                    last.push(end - 1);
                }
                let idx = Tensor::from_vec(last, batch.seq_lens.len(), &self.device)?;
                x.index_select(&idx, 0)?
            }
        };
        let x = self.norm.forward(&x)?;
        let logits = self
            .lm_head
            .forward_mode(&x, invariant)?
            .to_dtype(DType::F32)?;
        Ok(Output {
            logits,
            router_logits,
        })
    }

    /// The additive attention mask of each sequence, `(new, past + new)`, in the model's dtype.
    fn masks(
        &self,
        batch: &Batch,
        past: &[usize],
        window: Option<usize>,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut masks = Vec::with_capacity(batch.seq_lens.len());
        for (&len, &past) in batch.seq_lens.iter().zip(past) {
            let total = past + len;
            let mask = match attention_mask(len, past, total, window) {
                Some(m) => {
                    Some(Tensor::from_vec(m, (len, total), &self.device)?.to_dtype(self.dtype)?)
                }
                None => None,
            };
            masks.push(mask);
        }
        Ok(masks)
    }
}
