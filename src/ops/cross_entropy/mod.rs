//! cross_entropy — host side of `cross_entropy.wgsl`; CPU oracle in
//! `reference.rs` beside it.

pub mod reference;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{expect_shape, placeholder, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

/// Layout of the `result` buffer the loss writes.
pub mod result {
    /// Mean loss of the last batch.
    pub const LOSS: usize = 0;
    /// Correct predictions in the last batch.
    pub const CORRECT: usize = 1;
    /// Running sums since the buffer was last cleared: loss summed over samples, correct, samples.
    pub const SUM_LOSS: usize = 2;
    pub const SUM_CORRECT: usize = 3;
    pub const SUM_COUNT: usize = 4;
    /// Running sum of samples whose target is among the 5 highest logits (top-5 correct).
    pub const SUM_CORRECT5: usize = 5;
    /// Elements in the buffer.
    pub const LEN: usize = 6;
}

/// Layout of a row of the `per_sample` buffer [n, LEN].
pub mod per_sample {
    pub const LOSS: usize = 0;
    /// 1 when the prediction (first maximum) is the target, else 0.
    pub const CORRECT: usize = 1;
    /// The predicted class (first maximum), as f32.
    pub const PREDICTED: usize = 2;
    /// 1 when the target is in the top 5 (ties ranked by index, as the prediction), else 0.
    pub const CORRECT5: usize = 3;
    pub const LEN: usize = 4;
}

/// Mirrors `Params` in cross_entropy.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    k: u32,
    smoothing: f32,
    /// The loss gradient's multiplier: 1, or 1/N of a micro-batch of `--grad-accum-steps N`.
    weight: f32,
}

const WG: u32 = 64;

/// Softmax cross-entropy of `logits` [n, k] against `target` (u32 [n], each < k; the host checks
/// labels when it loads them). Writes `dlogits` (gradient of the batch-mean loss) and `result`
/// (see [`result`]); `per_sample` [n, 4] gets each sample's row ([`per_sample`]).
/// With a `scaler` (an f16 plan's loss-scaler state, `ops::grad_scaler`), `dlogits` is multiplied
/// by its current loss scale, and a batch with a non-finite loss stays out of the running sums.
pub fn cross_entropy_forward_backward(
    gpu: &Gpu,
    logits: &Tensor,
    target: &Tensor,
    dlogits: &Tensor,
    per_sample: &Tensor,
    result: &Tensor,
    scaler: Option<&Tensor>,
) -> Result<Vec<Dispatch>> {
    cross_entropy_forward_backward_smoothed(gpu, logits, target, dlogits, per_sample, result, 0.0, scaler)
}

/// [`cross_entropy_forward_backward`] with label smoothing `smoothing` in [0, 1), as
/// `torch.nn.CrossEntropyLoss(label_smoothing=…)`: the target distribution is
/// (1 − smoothing)·onehot + smoothing/classes.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_forward_backward_smoothed(
    gpu: &Gpu,
    logits: &Tensor,
    target: &Tensor,
    dlogits: &Tensor,
    per_sample: &Tensor,
    result: &Tensor,
    smoothing: f32,
    scaler: Option<&Tensor>,
) -> Result<Vec<Dispatch>> {
    Ok(cross_entropy_weighted(gpu, logits, target, dlogits, per_sample, result, smoothing, scaler)?.0)
}

/// The loss gradient's multiplier of a plan's training loss, rewritable between steps: timm's
/// `--grad-accum-steps N` divides each micro-batch's loss by N before backward.
pub struct LossWeight {
    params: wgpu::Buffer,
    n: u32,
    k: u32,
    smoothing: f32,
}

impl LossWeight {
    /// Multiply the loss gradient of the following submits by `weight` (the reported loss is
    /// unchanged: timm logs the undivided loss).
    pub fn set(&self, gpu: &Gpu, weight: f32) {
        let p = Params { n: self.n, k: self.k, smoothing: self.smoothing, weight };
        gpu.queue.write_buffer(&self.params, 0, bytemuck::bytes_of(&p));
    }
}

/// [`cross_entropy_forward_backward_smoothed`] with its loss weight (1 until [`LossWeight::set`]).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_weighted(
    gpu: &Gpu,
    logits: &Tensor,
    target: &Tensor,
    dlogits: &Tensor,
    per_sample: &Tensor,
    result: &Tensor,
    smoothing: f32,
    scaler: Option<&Tensor>,
) -> Result<(Vec<Dispatch>, LossWeight)> {
    ensure!((0.0..1.0).contains(&smoothing), "cross_entropy: label smoothing must be in [0, 1), got {smoothing}");
    loss_passes(gpu, logits, Target::Labels(target), dlogits, per_sample, result, smoothing, scaler)
}

/// Softmax cross-entropy of `logits` [n, k] against soft targets `targets` (f32 [n, k], each row
/// a distribution: timm's `SoftTargetCrossEntropy`, the loss under Mixup/CutMix), with its
/// gradient, its loss weight and the reduce of [`cross_entropy_forward_backward`]; the correct
/// counts take each row's dominant class as the label.
pub fn cross_entropy_soft_weighted(
    gpu: &Gpu,
    logits: &Tensor,
    targets: &Tensor,
    dlogits: &Tensor,
    per_sample: &Tensor,
    result: &Tensor,
    scaler: Option<&Tensor>,
) -> Result<(Vec<Dispatch>, LossWeight)> {
    loss_passes(gpu, logits, Target::Soft(targets), dlogits, per_sample, result, 0.0, scaler)
}

/// What the loss is against: class indices [n], or soft targets f32 [n, k].
enum Target<'a> {
    Labels(&'a Tensor),
    Soft(&'a Tensor),
}

/// The loss's two passes: the per-sample loss and its gradient against `target`, then the reduce
/// of the per-sample rows into the running sums — or, on a device that fuses (`--fuse on`), both
/// in one dispatch of one workgroup (`cross_entropy_forward_backward_reduce`), the same values
/// bit for bit.
#[allow(clippy::too_many_arguments)]
fn loss_passes(
    gpu: &Gpu,
    logits: &Tensor,
    target: Target<'_>,
    dlogits: &Tensor,
    per_sample: &Tensor,
    result: &Tensor,
    smoothing: f32,
    scaler: Option<&Tensor>,
) -> Result<(Vec<Dispatch>, LossWeight)> {
    ensure!(
        logits.shape.len() == 2 && logits.shape.iter().all(|&d| d > 0),
        "cross_entropy: logits must be a non-empty [n, classes], got {:?}",
        logits.shape
    );
    let (n, k) = (logits.shape[0], logits.shape[1]);
    let unused = placeholder(gpu)?;
    // The target's bindings (the other kind's a placeholder, for the fused entry that names
    // both) and entry point; its bytes and the flops per logit (max, exp, sum, the softmax's
    // gradient; a soft target's sum adds one).
    let (target_binds, entry, soft, target_bytes, flops) = match target {
        Target::Labels(t) => {
            expect_shape("cross_entropy target", t, &[n])?;
            ([Bind::Tensor(2, t), Bind::Tensor(8, &unused)], "cross_entropy_forward_backward", false, 4 * n, 4.0)
        }
        Target::Soft(t) => {
            expect_shape("cross_entropy soft targets", t, &[n, k])?;
            ensure!(t.dtype == crate::gpu::Dtype::F32, "cross_entropy: soft targets must be f32");
            let binds = [Bind::Tensor(2, &unused), Bind::Tensor(8, t)];
            (binds, "cross_entropy_soft_forward_backward", true, 4 * n * k, 5.0)
        }
    };
    expect_shape("cross_entropy dlogits", dlogits, &[n, k])?;
    expect_shape("cross_entropy per-sample", per_sample, &[n, self::per_sample::LEN])?;
    expect_shape("cross_entropy result", result, &[result::LEN])?;
    let (n32, k32) = (to_u32("batch", n)?, to_u32("classes", k)?);
    let params = gpu.uniform("cross_entropy params", &Params { n: n32, k: k32, smoothing, weight: 1.0 });
    let precision = Precision::of(logits);
    let scaled = ("SCALED", f64::from(u8::from(scaler.is_some())));
    // Logits read and their gradient written once, the target and per-sample rows once (and the
    // loss scale); the reduce reads the rows again and reads and writes the running sums.
    let el = logits.dtype.bytes();
    let scale_bytes = if scaler.is_some() { 4 } else { 0 };
    let fwd_bytes = 2 * el * n * k + target_bytes + 4 * per_sample.numel() + scale_bytes;
    let (rows, sums) = (4 * per_sample.numel(), 8 * result.numel());
    let weight = LossWeight { params: params.clone(), n: n32, k: k32, smoothing };
    let rows_binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, logits),
        Bind::Tensor(3, dlogits),
        Bind::Tensor(4, per_sample),
        Bind::Tensor(7, scaler.unwrap_or(&unused)),
    ];
    let [labels, soft_targets] = target_binds;
    if gpu.fuse {
        let entry = "cross_entropy_forward_backward_reduce";
        let binds = [&rows_binds[..], &[labels, soft_targets, Bind::Tensor(6, result)]].concat();
        let constants = [scaled, ("SOFT", f64::from(u8::from(soft)))];
        let fused = gpu.dispatch_in(precision, "cross_entropy", entry, &constants, &binds, [1, 1, 1])?;
        let fused = fused.with_cost(flops * (n * k) as f64 + per_sample.numel() as f64, (fwd_bytes + sums) as f64);
        return Ok((vec![fused], weight));
    }
    let grid = [to_u32("batch", n.div_ceil(WG as usize))?, 1, 1];
    // The separate entry binds its own target only.
    let binds = [&rows_binds[..], &[if soft { soft_targets } else { labels }]].concat();
    let fwd = gpu.dispatch_in(precision, "cross_entropy", entry, &[("WG", WG as f64), scaled], &binds, grid)?;
    let fwd = fwd.with_cost(flops * (n * k) as f64, fwd_bytes as f64);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(5, per_sample), Bind::Tensor(6, result)];
    let red = gpu.dispatch_in(precision, "cross_entropy", "cross_entropy_reduce", &[scaled], &binds, [1, 1, 1])?;
    let red = red.with_cost(per_sample.numel() as f64, (rows + sums) as f64);
    Ok((vec![fwd, red], weight))
}
