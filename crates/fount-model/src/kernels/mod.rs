//! Fused CPU kernels with their backward passes, for training in f32.
//!
//! Composed of candle's elementwise ops, an RMSNorm, a rotary embedding or a masked softmax
//! is five to ten passes over its tensor forward and as many backward, each allocating a
//! fresh buffer and keeping it alive for the backward pass. Here each is one pass forward and
//! one or two backward, over rows split across the rayon pool, and only the op's inputs and
//! output are kept. The composed versions stay as the reference (and for other devices and
//! dtypes); `tests` checks values and gradients against them.

use candle_core::{CpuStorage, Layout, Storage, Tensor};
use rayon::prelude::*;

mod attention;
mod cached;
pub mod half;
mod matvec;
mod product;
pub mod q8;
mod rows;
#[cfg(test)]
mod tests;

pub use attention::{attention, AttnShape};
pub(crate) use cached::{cached_attention, CachedSeq};
pub(crate) use matvec::{axpy, dot, FrozenMatmul, SmallMatmul};
pub(crate) use product::{gemm_into, gemm_new, product, Mat, Threads};
pub use product::{linear, lora_linear};
pub use rows::{cross_entropy, masked_softmax, rms_norm, rope, silu_mul};

/// Rows of at most this many elements in all go to one rayon task.
const ROWS_PER_TASK_ELEMS: usize = 1 << 14;

/// Whether the fused kernels serve `t`: f32 on the CPU.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// The f32 values of a contiguous CPU tensor's storage.
pub(crate) fn values<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous inputs only");
    };
    Ok(&v[start..end])
}

/// Runs `f` on the values of a tensor the op holds (a table or a mask).
pub(crate) fn with_values<R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else {
        candle_core::bail!("{op}: CPU tensors only");
    };
    f(values(s, layout, op)?)
}

/// Fills `out` (one decoding step's output row) `chunk` values at a time across candle's
/// spinning worker pool: `f(first index, values)`. A step runs a few hundred such products of a
/// few microseconds each; rayon's workers fall asleep between them, and waking them cost about a
/// tenth of a GGUF model's decoding time.
pub(crate) fn decode_rows(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let cells: Vec<std::sync::Mutex<&mut [f32]>> =
        out.chunks_mut(chunk).map(std::sync::Mutex::new).collect();
    candle_core::utils::barrier_pool().execute_chunked(cells.len(), |range| {
        for c in range {
            // each chunk is taken by exactly one task: the lock is never contended
            if let Ok(mut slot) = cells[c].lock() {
                f(c * chunk, &mut slot);
            }
        }
    });
}

/// How many rows of `cols` elements one task takes.
fn rows_per_task(cols: usize) -> usize {
    (ROWS_PER_TASK_ELEMS / cols.max(1)).max(1)
}

/// Fills `out` row by row (`cols` per row) in parallel: `f(row index, out row)`.
fn par_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if cols == 0 {
        return; // no elements
    }
    let per = rows_per_task(cols);
    out.par_chunks_mut(per * cols)
        .enumerate()
        .for_each(|(task, chunk)| {
            for (i, row) in chunk.chunks_mut(cols).enumerate() {
                f(task * per + i, row);
            }
        });
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

fn sum(v: impl Iterator<Item = f32>) -> f32 {
    v.fold(0.0, |a, b| a + b)
}
