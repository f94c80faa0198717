//! grad_accum — host side of `grad_accum.wgsl`; CPU oracle in `reference.rs` beside it.
//!
//! timm's `--grad-accum-steps N`: the gradients of N micro-batches summed before one optimizer
//! step. The backward kernels overwrite the flat gradient buffer, so the sum is kept in a flat
//! accumulator of the same layout: the first micro-batch stores its gradients there, each middle
//! one adds its own, and the last adds the accumulator into its gradients, which the loss scaler,
//! clipping and the optimizer then read as they read one step's.

pub mod reference;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::to_u32;
use crate::gpu::{Bind, Dispatch, Gpu, Pass, Tensor};

/// Mirrors `Params` in grad_accum.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len: u32,
    _pad: [u32; 3],
}

const WG: u32 = 256;

/// Where a micro-batch stands in its group: which dispatches follow its backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MicroBatch {
    /// The only micro-batch of its group (no accumulation): nothing.
    Whole,
    /// The first of several: `accum = grad`.
    First,
    /// Neither first nor last: `accum += grad`.
    Middle,
    /// The last of several: `grad = accum + grad`, then the optimizer.
    Last,
}

impl MicroBatch {
    /// Micro-batch `index` (0-based) of a group of `count`.
    pub fn of(index: usize, count: usize) -> MicroBatch {
        match (index, count) {
            (_, 0 | 1) => MicroBatch::Whole,
            (0, _) => MicroBatch::First,
            (i, c) if i + 1 >= c => MicroBatch::Last,
            _ => MicroBatch::Middle,
        }
    }

    /// Whether the optimizer (and the loss scaler, clipping, the EMA) run after this micro-batch.
    pub fn updates(self) -> bool {
        matches!(self, MicroBatch::Whole | MicroBatch::Last)
    }
}

/// Where batch `step` (0-based) of an epoch of `per_epoch` batches stands in its group of
/// `accum`: (index in the group, the group's batch count). timm's train.py groups an epoch from its
/// first batch; when `accum` does not divide the epoch, the last group is shorter and its losses
/// are divided by its own count (`last_accum_steps`).
pub fn group_of(step: usize, accum: usize, per_epoch: usize) -> (usize, usize) {
    let accum = accum.max(1);
    let first = step / accum * accum;
    (step - first, accum.min(per_epoch.saturating_sub(first)).max(1))
}

/// The accumulator and its three dispatch lists (one dispatch per binding-sized chunk each).
pub struct GradAccum {
    /// The flat accumulator, laid out as the flat gradient buffer.
    pub accum: Tensor,
    store: Vec<Dispatch>,
    add: Vec<Dispatch>,
    finish: Vec<Dispatch>,
}

impl GradAccum {
    /// Accumulation over the gradient `chunks` (views of the flat gradient buffer of `total`
    /// elements, each within one binding, in order and adjacent).
    pub fn new(gpu: &Gpu, chunks: &[&Tensor], total: usize) -> Result<GradAccum> {
        ensure!(!chunks.is_empty(), "grad_accum: no gradients to accumulate");
        let accum = Tensor::flat_zeros(gpu, "accumulated gradients", total.max(1))?;
        let (mut store, mut add, mut finish) = (Vec::new(), Vec::new(), Vec::new());
        let mut start = 0;
        for g in chunks {
            let len = g.numel();
            let acc = accum.view(gpu, &format!("accumulated gradients {start}.."), start, &[len])?;
            let p = gpu.uniform("grad_accum params", &Params { len: to_u32("gradients", len)?, _pad: [0; 3] });
            let binds = [Bind::Uniform(0, &p), Bind::Tensor(1, g), Bind::Tensor(2, &acc)];
            let grid = gpu.grid_1d(len, WG);
            for (entry, list, flops) in [
                ("grad_accum_store", &mut store, 0.0),
                ("grad_accum_add", &mut add, len as f64),
                ("grad_accum_finish", &mut finish, len as f64),
            ] {
                let mut d = gpu.dispatch("grad_accum", entry, &[("WG", WG as f64)], &binds, grid)?;
                d = d.with_cost(flops, if flops == 0.0 { 8.0 } else { 12.0 } * len as f64);
                (d.layer, d.pass) = ("gradient accumulation".to_string(), Pass::Optimizer);
                list.push(d);
            }
            start += len;
        }
        ensure!(start <= total.max(1), "grad_accum: chunks of {start} elements in a buffer of {total}");
        Ok(GradAccum { accum, store, add, finish })
    }

    /// The dispatches that follow micro-batch `m`'s backward pass.
    pub fn dispatches(&self, m: MicroBatch) -> &[Dispatch] {
        match m {
            MicroBatch::Whole => &[],
            MicroBatch::First => &self.store,
            MicroBatch::Middle => &self.add,
            MicroBatch::Last => &self.finish,
        }
    }
}
