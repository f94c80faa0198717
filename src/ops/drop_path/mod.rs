//! drop_path — timm's `drop_path(x, drop_prob, training, scale_by_keep=True)` (stochastic depth,
//! Huang et al. 2016): one draw per sample of the batch where dropout draws one per element, so it
//! runs dropout's kernels and oracle with a whole sample per draw (`DropoutConfig::grouped`); the
//! graph node in `layer.rs`. The draw comes from (sample, layer, seed, step), so the backward
//! recomputes the mask instead of storing it, every step draws a new one, and a resumed run draws
//! the same ones as an uninterrupted run.

mod layer;
pub mod reference;

/// What the masks are drawn from (the plan's per-step key).
pub use crate::ops::layer::{StepKey, step_key};
pub use layer::DropPath;

use anyhow::{Result, ensure};

use super::dropout::{self, DropoutConfig};
use crate::gpu::{Dispatch, Gpu, Tensor};

/// A drop-path layer's draw: dropout's (probability `p` of dropping a sample's path, the layer's
/// salt), its group set per tensor to one sample.
pub type DropPathConfig = DropoutConfig;

/// Elements per sample of `t` ([n, ...]): numel / n, at least one sample of at least one element.
fn per_sample(t: &Tensor) -> Result<usize> {
    let n = t.shape.first().copied().unwrap_or(0);
    ensure!(n >= 1 && t.numel() >= n, "drop_path: expected an [n, ...] tensor with n >= 1, got {:?}", t.shape);
    Ok(t.numel() / n)
}

/// The forward: each sample kept and scaled or zeroed in training, a copy in evaluation. `key` is
/// the plan's [2] step key.
pub fn drop_path_forward(
    gpu: &Gpu,
    cfg: &DropPathConfig,
    key: &Tensor,
    inp: &Tensor,
    out: &Tensor,
    training: bool,
) -> Result<Vec<Dispatch>> {
    dropout::dropout_forward(gpu, &cfg.grouped(per_sample(inp)?), key, inp, out, training)
}

/// The backward (training mode): dinp = dout · the forward's factor, the mask drawn again.
pub fn drop_path_backward(
    gpu: &Gpu,
    cfg: &DropPathConfig,
    key: &Tensor,
    dout: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    dropout::dropout_backward(gpu, &cfg.grouped(per_sample(dout)?), key, dout, dinp)
}
