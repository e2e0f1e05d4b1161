//! The Llama-family decoder: embedding, `num_hidden_layers` pre-norm blocks of attention and a
//! feed-forward (dense SwiGLU or sparse MoE), a final norm and the language-model head.
//!
//! One forward serves prefill, cached decoding and training: it takes a packed [`Batch`] and the
//! sequences' key/value state as a [`KvView`] (see `docs/architecture.md`, "The forward contract").

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::batch::{Batch, Logits};
use crate::blocks::BlockMatrix;
use crate::config::{Config, MoeConfig};
use crate::error::{Error, Result};
use crate::files::ModelFiles;
use crate::gguf::Gguf;
use crate::kv::{KvView, NoCache};
use crate::layers::{attention_mask, Attention, LayerCtx, Linear, Mlp, RmsNorm, Weight};
use crate::lora::LoraBatch;
use crate::moe::SparseMoe;
use crate::ops::Kernels;
use crate::rope::Rope;
use crate::weights::Weights;

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

/// The token embedding: a dense table, or rows of ggml blocks dequantised as they are looked up
/// (so a quantised model's table stays quantised in memory).
#[derive(Debug, Clone)]
enum Embedding {
    Dense(Tensor),
    Blocks(Arc<BlockMatrix>),
}

impl Embedding {
    fn from_weight(w: Weight) -> Embedding {
        match w {
            Weight::Dense(t) => Embedding::Dense(t),
            Weight::Blocks(b) => Embedding::Blocks(b),
        }
    }

    /// The table as the tied language-model head's weight (shared, not copied).
    fn as_weight(&self) -> Weight {
        match self {
            Embedding::Dense(t) => Weight::Dense(t.clone()),
            Embedding::Blocks(b) => Weight::Blocks(b.clone()),
        }
    }
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

/// The loss of some rows of a batch: `(logits of the rows, which rows)` → a scalar.
pub type RowsLoss<'a, E> = dyn FnMut(&Tensor, Range<usize>) -> std::result::Result<Tensor, E> + 'a;

/// About how many tokens [`Model::backward_checkpointed`] recomputes at a time.
pub const RECOMPUTE_TOKENS: usize = 512;

/// What every layer of one forward shares.
struct Prepared {
    cos: Tensor,
    sin: Tensor,
    /// Per sequence, the causal mask.
    full: Vec<Option<Tensor>>,
    /// Per sequence, the sliding-window mask, for models with a window.
    windowed: Option<Vec<Option<Tensor>>>,
}

/// A loaded causal language model.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Embedding,
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
        let half = device.is_cpu() && matches!(dtype, DType::F16 | DType::BF16);
        if half {
            // half-precision matrices on the CPU: the half-precision kernels, f32 around them
            // (candle's own f16/bf16 CPU ops convert element by element)
            let weights =
                Weights::from_safetensors(&files.weight_files()?, dir, DType::F32, device)?
                    .with_half_matrices(dtype);
            return Model::from_weights(&weights, config);
        }
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
        // with half-precision matrices the table is one too, its rows widened as looked up
        let embed_tokens = match w.half_matrices() {
            Some(half) => {
                Embedding::from_weight(Weight::from_tensor(embed_tokens.to_dtype(half)?)?)
            }
            None => Embedding::Dense(embed_tokens),
        };
        let lm_head = if config.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::new(embed_tokens.as_weight(), None)
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

    /// Loads a GGUF file (llama.cpp's format) on the CPU: projections stay in their ggml blocks
    /// (quantised or half precision) and run on the block kernels, with activations in f32;
    /// norms, biases and F32 tensors are dense.
    pub fn load_gguf(path: &Path) -> Result<Self> {
        Model::from_gguf(&Gguf::open(path)?)
    }

    /// Builds the model from an open GGUF file.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let config = g.config()?;
        let (_, _, permuted) = g.arch()?;
        let (v, h, d) = (config.vocab_size, config.hidden_size, config.head_dim);
        let (q_rows, kv_rows) = (
            config.num_attention_heads * d,
            config.num_key_value_heads * d,
        );
        let inter = config.intermediate_size;
        let dense = |name: &str, shape: &[usize], heads: Option<usize>| -> Result<Tensor> {
            Ok(g.tensor(name, shape, heads)?.dequantize()?.reshape(shape)?)
        };
        let weight = |name: &str, shape: &[usize], heads: Option<usize>| -> Result<Weight> {
            Weight::from_blocks(g.tensor(name, shape, heads)?)
        };
        let linear = |name: &str, out: usize, inp: usize, heads: Option<usize>| -> Result<Linear> {
            let w = weight(&format!("{name}.weight"), &[out, inp], heads)?;
            let bias_name = format!("{name}.bias");
            let bias = match g.info(&bias_name) {
                Some(_) => Some(dense(&bias_name, &[out], heads)?),
                None => None,
            };
            Ok(Linear::new(w, bias))
        };
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm::new(dense(name, &[h], None)?, config.rms_norm_eps))
        };
        let (q_perm, k_perm) = if permuted {
            (
                Some(config.num_attention_heads),
                Some(config.num_key_value_heads),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let b = |p: &str| format!("blk.{i}.{p}");
            let attn = Attention::from_parts(
                [
                    linear(&b("attn_q"), q_rows, h, q_perm)?,
                    linear(&b("attn_k"), kv_rows, h, k_perm)?,
                    linear(&b("attn_v"), kv_rows, h, None)?,
                    linear(&b("attn_output"), h, q_rows, None)?,
                ],
                &config,
                i,
            );
            layers.push(DecoderLayer {
                input_layernorm: norm(&b("attn_norm.weight"))?,
                self_attn: attn,
                post_attention_layernorm: norm(&b("ffn_norm.weight"))?,
                mlp: match config.moe {
                    None => FeedForward::Dense(Mlp::from_parts(
                        linear(&b("ffn_gate"), inter, h, None)?,
                        linear(&b("ffn_up"), inter, h, None)?,
                        linear(&b("ffn_down"), h, inter, None)?,
                    )),
                    Some(moe) => FeedForward::Sparse(gguf_experts(g, i, &config, moe)?),
                },
            });
        }
        let embed_tokens = Embedding::from_weight(weight("token_embd.weight", &[v, h], None)?);
        let lm_head = if config.tie_word_embeddings {
            Linear::new(embed_tokens.as_weight(), None)
        } else {
            linear("output", v, h, None)?
        };
        let rope = match g.rope_factors(d / 2)? {
            Some(f) => Rope::with_factors(&config, &f),
            None => Rope::new(&config),
        };
        Ok(Model {
            embed_tokens,
            layers,
            norm: norm("output_norm.weight")?,
            lm_head,
            rope,
            dtype: DType::F32,
            device: Device::Cpu,
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
        let kernels = Kernels::new(self.dtype(), &self.device, invariant);
        let ctx = LayerCtx { lora, kernels };
        let prep = self.prepare(batch, kv, lora)?;
        let mut x = self.embed(batch)?; // (N, hidden)
        let mut router_logits = Vec::new();
        for index in 0..self.layers.len() {
            let (y, router) = self.layer(index, &x, batch, &prep, kv, &ctx)?;
            router_logits.extend(router);
            x = y;
        }
        Ok(Output {
            logits: self.head(&x, batch, logits, kernels)?,
            router_logits,
        })
    }

    /// A training step's forward and backward with activation recomputation (gradient
    /// checkpointing): the forward keeps only each layer's input; the backward recomputes each
    /// layer's activations from its input and backpropagates the gradient of its output through
    /// it, layer by layer from the last. It does so for a few sequences at a time (about
    /// [`RECOMPUTE_TOKENS`] tokens, whole sequences), so activation memory is one layer's over
    /// that many tokens, for a second forward pass of compute. With LoRA dropout the masks
    /// depend on the whole batch's shape, so the batch is recomputed in one piece.
    ///
    /// `loss(logits, rows)` turns the logits of the batch's rows `rows` (`(rows, vocab)`) into
    /// their share of the scalar to minimise (the loss must be a sum over rows); `on_grads` is
    /// called with the gradients of each piece (the head, each layer, the embedding, for each
    /// group of sequences), so parameters appear in several stores whose sums are their
    /// gradients. Returns the loss. Dense models only: an MoE layer's auxiliary loss couples
    /// every layer's router.
    pub fn backward_checkpointed<E: From<Error>>(
        &self,
        batch: &Batch,
        lora: &LoraBatch,
        loss: &mut RowsLoss<'_, E>,
        on_grads: &mut dyn FnMut(&GradStore) -> std::result::Result<(), E>,
    ) -> std::result::Result<f64, E> {
        // candle's errors become this crate's, and those the caller's
        fn t<T>(r: candle_core::Result<T>) -> Result<T> {
            Ok(r?)
        }
        if self.config.moe.is_some() {
            return Err(Error::Batch(
                "activation recomputation is for dense models; an MoE model trains without it"
                    .into(),
            )
            .into());
        }
        let kernels = Kernels::new(self.dtype(), &self.device, false);
        let ctx = LayerCtx { lora, kernels };
        let mut kv = NoCache;
        let prep = self.prepare(batch, &mut kv, lora)?;
        // forward: each layer's input, cut from the graph
        let mut inputs = Vec::with_capacity(self.layers.len() + 1);
        inputs.push(self.embed(batch)?.detach());
        for index in 0..self.layers.len() {
            let x = inputs[index].clone();
            let (y, _) = self.layer(index, &x, batch, &prep, &mut kv, &ctx)?;
            inputs.push(y.detach());
        }
        drop(prep);
        // backward, a group of whole sequences at a time
        let budget = if lora.has_dropout() {
            usize::MAX
        } else {
            RECOMPUTE_TOKENS
        };
        let mut total = 0f64;
        let (mut seq, mut row) = (0, 0);
        while seq < batch.seq_lens.len() {
            let (first_seq, first_row) = (seq, row);
            while seq < batch.seq_lens.len()
                && (seq == first_seq || row - first_row + batch.seq_lens[seq] <= budget)
            {
                (seq, row) = (seq + 1, row + batch.seq_lens[seq]);
            }
            let rows = first_row..row;
            let part = Batch {
                tokens: batch.tokens[rows.clone()].to_vec(),
                positions: batch.positions[rows.clone()].to_vec(),
                seq_lens: batch.seq_lens[first_seq..seq].to_vec(),
            };
            let lora = lora.rows(rows.clone());
            let ctx = LayerCtx {
                lora: &lora,
                kernels,
            };
            let prep = self.prepare(&part, &mut kv, &lora)?;
            let slice = |t: &Tensor| t.narrow(0, rows.start, rows.len());
            // the head and the loss
            let x = t(slice(&inputs[self.layers.len()]).and_then(|x| Var::from_tensor(&x)))?;
            let value = loss(
                &self.head(x.as_tensor(), &part, Logits::All, kernels)?,
                rows.clone(),
            )?;
            total += f64::from(t(value
                .to_dtype(DType::F32)
                .and_then(|v| v.to_scalar::<f32>()))?);
            let store = t(value.backward())?;
            on_grads(&store)?;
            let Some(g) = store.get(x.as_tensor()) else {
                return Err(Error::Batch("the loss does not depend on the logits".into()).into());
            };
            let mut grad = g.detach();
            drop(store);
            // the layers in reverse: d(output · grad)/d(input) is the input's gradient
            for index in (0..self.layers.len()).rev() {
                let x = t(slice(&inputs[index]).and_then(|x| Var::from_tensor(&x)))?;
                let (y, _) = self.layer(index, x.as_tensor(), &part, &prep, &mut kv, &ctx)?;
                let store = t((y * &grad).and_then(|p| p.sum_all()?.backward()))?;
                on_grads(&store)?;
                grad = match store.get(x.as_tensor()) {
                    Some(g) => g.detach(),
                    None => t(grad.zeros_like())?,
                };
            }
            // the embedding, when it is trained
            if matches!(&self.embed_tokens, Embedding::Dense(t) if t.track_op()) {
                let e = self.embed(&part)?;
                let store = t((e * &grad).and_then(|p| p.sum_all()?.backward()))?;
                on_grads(&store)?;
            }
        }
        Ok(total)
    }

    /// Checks a batch and computes what every layer shares: RoPE tables and attention masks.
    fn prepare(&self, batch: &Batch, kv: &mut dyn KvView, lora: &LoraBatch) -> Result<Prepared> {
        batch.validate(self.config.vocab_size)?;
        if let Some((range, _)) = lora.segments().iter().find(|(r, _)| r.end > batch.len()) {
            return Err(Error::Batch(format!(
                "adapter rows {range:?} outside the batch of {} tokens",
                batch.len()
            )));
        }
        let max = self.config.max_position_embeddings;
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= max {
                return Err(Error::ContextLength {
                    tokens: p as usize + 1,
                    max,
                });
            }
        }
        let past: Vec<usize> = (0..batch.seq_lens.len()).map(|s| kv.past_len(s)).collect();
        let (cos, sin) = self.rope.tables(&batch.positions, &self.device)?;
        // Masks depend only on the sequences' lengths, so they are built once per forward: one
        // set for full attention, one for sliding-window layers if the model has them.
        let full = self.masks(batch, &past, None)?;
        let windowed = match self.config.sliding_window {
            Some(w) => Some(self.masks(batch, &past, Some(w))?),
            None => None,
        };
        Ok(Prepared {
            cos,
            sin,
            full,
            windowed,
        })
    }

    /// The token embeddings of a batch, `(N, hidden)`.
    fn embed(&self, batch: &Batch) -> Result<Tensor> {
        match &self.embed_tokens {
            Embedding::Dense(table) => {
                let tokens = Tensor::from_slice(&batch.tokens, batch.len(), &self.device)?;
                Ok(table.index_select(&tokens, 0)?)
            }
            Embedding::Blocks(q) => q.rows(&batch.tokens),
        }
    }

    /// Decoder block `index` over `x`; also the router logits of an MoE block.
    fn layer(
        &self,
        index: usize,
        x: &Tensor,
        batch: &Batch,
        prep: &Prepared,
        kv: &mut dyn KvView,
        ctx: &LayerCtx,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let layer = &self.layers[index];
        let h = layer.input_layernorm.forward(x, ctx.kernels)?;
        let masks = match (layer.self_attn.window(), &prep.windowed) {
            (Some(_), Some(w)) => w,
            _ => &prep.full,
        };
        let h = layer
            .self_attn
            .forward_ctx(&h, batch, masks, &prep.cos, &prep.sin, kv, ctx)?;
        let x1 = (x + h)?;
        let h = layer.post_attention_layernorm.forward(&x1, ctx.kernels)?;
        let (h, router) = match &layer.mlp {
            FeedForward::Dense(mlp) => (mlp.forward_ctx(&h, index, ctx)?, None),
            FeedForward::Sparse(moe) => {
                let (h, r) = moe.forward(&h)?;
                (h, Some(r))
            }
        };
        Ok(((x1 + h)?, router))
    }

    /// The final norm and the language-model head over the rows `logits` asks for, in f32.
    fn head(&self, x: &Tensor, batch: &Batch, logits: Logits, k: Kernels) -> Result<Tensor> {
        let x = match logits {
            Logits::All => x.clone(),
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
        let x = self.norm.forward(&x, k)?;
        Ok(self.lm_head.forward(&x, k)?.to_dtype(DType::F32)?)
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

/// Layer `i`'s experts in a GGUF file: stacked (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`,
/// llama.cpp's format since 2024) or one tensor each (`ffn_gate.{e}`, older files), with the
/// router `ffn_gate_inp`.
fn gguf_experts(g: &Gguf, i: usize, config: &Config, moe: MoeConfig) -> Result<SparseMoe> {
    let (h, inter, n) = (
        config.hidden_size,
        config.intermediate_size,
        moe.num_experts,
    );
    let b = |p: &str| format!("blk.{i}.{p}");
    let router = Weight::from_blocks(g.tensor(&b("ffn_gate_inp.weight"), &[n, h], None)?)?;
    let stacked = g.info(&b("ffn_gate_exps.weight")).is_some();
    let proj = |part: &str, e: usize, rows: usize, cols: usize| -> Result<Linear> {
        let m = if stacked {
            g.expert(&b(&format!("{part}_exps.weight")), e, [n, rows, cols])?
        } else {
            g.tensor(&b(&format!("{part}.{e}.weight")), &[rows, cols], None)?
        };
        Ok(Linear::new(Weight::from_blocks(m)?, None))
    };
    let experts = (0..n)
        .map(|e| {
            Ok(Mlp::from_parts(
                proj("ffn_gate", e, inter, h)?,
                proj("ffn_up", e, inter, h)?,
                proj("ffn_down", e, h, inter)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SparseMoe::from_parts(
        Linear::new(router, None),
        experts,
        moe.top_k,
    ))
}
