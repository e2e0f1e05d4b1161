//! Key/value state of the sequences in a batch.
//!
//! Attention never owns its cache: the caller passes a [`KvView`] into every forward. The
//! contiguous [`KvCache`] here serves `fount generate` and tests; the engine's paged block pool
//! implements the same trait, so the model code is shared.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The past keys and values of every sequence in a batch, indexed by the sequence's position in
/// the batch.
pub trait KvView {
    /// Tokens already cached for sequence `seq` (its past length) before this forward.
    fn past_len(&self, seq: usize) -> usize;

    /// Stores the new keys and values of sequence `seq` at `layer` and returns all of its keys
    /// and values (past, then new) for attention.
    ///
    /// # Shapes
    /// - `k`, `v`: `(kv_heads, new_tokens, head_dim)`
    /// - returned: `(kv_heads, past + new_tokens, head_dim)` each
    fn append(
        &mut self,
        layer: usize,
        seq: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)>;

    /// Whether keys and values are kept between forward passes; `false` when every sequence is
    /// complete in the batch, with no past (attention may then batch equal-length sequences).
    fn stores(&self) -> bool {
        true
    }
}

/// No cache: every sequence is complete in the batch (training, scoring).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoCache;

impl KvView for NoCache {
    fn past_len(&self, _seq: usize) -> usize {
        0
    }

    fn append(
        &mut self,
        _layer: usize,
        _seq: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        Ok((k.clone(), v.clone()))
    }

    fn stores(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// A contiguous cache for one sequence: per layer, a buffer `(kv_heads, capacity, head_dim)`
/// that grows by doubling, so appending a token copies only that token.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
    initial_capacity: usize,
}

impl KvCache {
    /// An empty cache for a model with `layers` layers.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        KvCache {
            layers: vec![None; layers],
            kv_heads,
            head_dim,
            dtype,
            device: device.clone(),
            initial_capacity: 256,
        }
    }

    /// Tokens cached (in the last layer, which is written last).
    pub fn len(&self) -> usize {
        self.layers
            .last()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets the cached tokens past `len` (keeps the buffers).
    pub fn truncate(&mut self, len: usize) {
        for l in self.layers.iter_mut().flatten() {
            l.len = l.len.min(len);
        }
    }

    fn append_one(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kv_heads, head_dim) = (self.kv_heads, self.head_dim);
        let (h, n, d) = k.dims3()?;
        if (h, d) != (kv_heads, head_dim) {
            return Err(Error::Batch(format!(
                "cache holds ({kv_heads} heads, {head_dim} dims), got ({h}, {d})"
            )));
        }
        let (dtype, device, initial) = (self.dtype, self.device.clone(), self.initial_capacity);
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Batch(format!("layer {layer} outside the cache")))?;
        let past = slot.as_ref().map_or(0, |l| l.len);
        let capacity = slot.as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        if past + n > capacity {
            let new_cap = (past + n).next_power_of_two().max(initial);
            let k_buf = Tensor::zeros((kv_heads, new_cap, head_dim), dtype, &device)?;
            let v_buf = Tensor::zeros((kv_heads, new_cap, head_dim), dtype, &device)?;
            if let Some(old) = slot.as_ref() {
                if old.len > 0 {
                    k_buf.slice_set(&old.k.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                    v_buf.slice_set(&old.v.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                }
            }
            *slot = Some(LayerCache {
                k: k_buf,
                v: v_buf,
                len: past,
            });
        }
        let Some(l) = slot.as_mut() else {
            return Err(Error::Batch("cache slot vanished".into()));
        };
        l.k.slice_set(&k.contiguous()?, 1, past)?;
        l.v.slice_set(&v.contiguous()?, 1, past)?;
        l.len = past + n;
        Ok((l.k.narrow(1, 0, l.len)?, l.v.narrow(1, 0, l.len)?))
    }
}

impl KvView for KvCache {
    fn past_len(&self, _seq: usize) -> usize {
        self.len()
    }

    fn append(
        &mut self,
        layer: usize,
        seq: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if seq != 0 {
            return Err(Error::Batch(format!(
                "a single KvCache serves one sequence; got sequence {seq}"
            )));
        }
        self.append_one(layer, k, v)
    }
}

/// One contiguous cache per sequence of the batch, in batch order.
impl KvView for Vec<KvCache> {
    fn past_len(&self, seq: usize) -> usize {
        self.get(seq).map_or(0, KvCache::len)
    }

    fn append(
        &mut self,
        layer: usize,
        seq: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let n = self.len();
        self.get_mut(seq)
            .ok_or_else(|| Error::Batch(format!("sequence {seq} but only {n} caches")))?
            .append_one(layer, k, v)
    }
}
