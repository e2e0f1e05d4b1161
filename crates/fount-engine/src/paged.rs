//! The paged KV cache: one pool of blocks per layer, read and written through block tables.

use candle_core::{DType, Device, Tensor};
use fount_model::{KvView, Result as ModelResult};

/// Keys and values of every block, per layer, stored as f32 `(block, kv_head, slot, head_dim)`.
#[derive(Debug)]
pub struct KvPool {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    dtype: DType,
    device: Device,
}

impl KvPool {
    /// A pool of `blocks` blocks for a model with these dimensions; attention gets tensors in
    /// `dtype` on `device`.
    pub fn new(
        layers: usize,
        blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> KvPool {
        let per_layer = blocks * block_size * kv_heads * head_dim;
        KvPool {
            k: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            kv_heads,
            head_dim,
            block_size,
            dtype,
            device: device.clone(),
        }
    }

    /// Bytes per block over all layers (keys and values, f32).
    pub fn bytes_per_block(
        layers: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        2 * layers * block_size * kv_heads * head_dim * 4
    }

    fn at(&self, block: usize, head: usize, slot: usize) -> usize {
        ((block * self.kv_heads + head) * self.block_size + slot) * self.head_dim
    }

    /// Copies the first `slots` positions of block `from` into block `to` in every layer
    /// (copy-on-write of a partly filled block shared by forked sequences).
    pub fn copy_block(&mut self, from: usize, to: usize, slots: usize) {
        let d = self.head_dim;
        for layer in 0..self.k.len() {
            for head in 0..self.kv_heads {
                let (a, b) = (self.at(from, head, 0), self.at(to, head, 0));
                for store in [&mut self.k[layer], &mut self.v[layer]] {
                    store.copy_within(a..a + slots * d, b);
                }
            }
        }
    }
}

/// The view of one forward step: each sequence of the batch reads and writes its own blocks.
pub struct PagedView<'a> {
    /// The pool.
    pub pool: &'a mut KvPool,
    /// Block table of each sequence of the batch, long enough for its new tokens.
    pub tables: &'a [&'a [usize]],
    /// Tokens already cached per sequence.
    pub past: &'a [usize],
}

impl KvView for PagedView<'_> {
    fn past_len(&self, seq: usize) -> usize {
        self.past.get(seq).copied().unwrap_or(0)
    }

    fn append(
        &mut self,
        layer: usize,
        seq: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> ModelResult<(Tensor, Tensor)> {
        let pool = &mut *self.pool;
        let (kvh, d, bs) = (pool.kv_heads, pool.head_dim, pool.block_size);
        let table = self.tables[seq];
        let past = self.past[seq];
        let new = k.dim(1)?;
        let total = past + new;
        // (kv_heads, new, head_dim), flattened
        let kn = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let vn = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for h in 0..kvh {
            for t in 0..new {
                let pos = past + t;
                let at = pool.at(table[pos / bs], h, pos % bs);
                let src = (h * new + t) * d;
                pool.k[layer][at..at + d].copy_from_slice(&kn[src..src + d]);
                pool.v[layer][at..at + d].copy_from_slice(&vn[src..src + d]);
            }
        }
        let mut keys = Vec::with_capacity(kvh * total * d);
        let mut values = Vec::with_capacity(kvh * total * d);
        for h in 0..kvh {
            let mut pos = 0;
            while pos < total {
                let take = (bs - pos % bs).min(total - pos);
                let at = pool.at(table[pos / bs], h, pos % bs);
                keys.extend_from_slice(&pool.k[layer][at..at + take * d]);
                values.extend_from_slice(&pool.v[layer][at..at + take * d]);
                pos += take;
            }
        }
        let keys = Tensor::from_vec(keys, (kvh, total, d), &pool.device)?.to_dtype(pool.dtype)?;
        let values =
            Tensor::from_vec(values, (kvh, total, d), &pool.device)?.to_dtype(pool.dtype)?;
        Ok((keys, values))
    }
}
