//! batch_norm — host side of `batch_norm.wgsl`; CPU oracle in `reference.rs` beside it.
//!
//! One process runs one dispatch per pass (`batch_norm_forward_train`, `batch_norm_backward`).
//! Under `--sync-bn` each pass is split in two around a host exchange between MPI ranks (as
//! PyTorch's SyncBatchNorm): [`batch_norm_forward_stats`], [`merge_rank_statistics`] over every
//! rank's numbers, [`batch_norm_forward_apply`]; [`batch_norm_backward_sums`],
//! [`sum_rank_grad_sums`], [`batch_norm_backward_input`].

mod layer;
pub mod reference;

pub use layer::BatchNorm2d;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{el, expect_shape, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

/// `torch.nn.BatchNorm2d(c, eps, momentum)` on an `[n, c, h, w]` input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Kept in f64, as PyTorch keeps them (Python floats): the f64 reference must use 0.1 and
    /// 1e-5, not their f32 roundings — those moved its running statistics 5e-9 away from PyTorch
    /// float64's over a run (tests/divergence.rs). The GPU gets them rounded once to f32.
    pub eps: f64,
    pub momentum: f64,
    /// A ReLU fused after the normalisation: the forward writes max(y, 0) and the backward takes
    /// the ReLU's output gradient and its output (`relu_out`) and masks the gradient itself.
    pub relu: bool,
}

impl BatchNormConfig {
    /// PyTorch's defaults: eps 1e-5, momentum 0.1.
    pub fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        BatchNormConfig { n, c, h, w, eps: 1e-5, momentum: 0.1, relu: false }
    }

    /// The same normalisation with a ReLU fused after it.
    pub fn with_relu(self) -> Self {
        BatchNormConfig { relu: true, ..self }
    }

    fn constants(&self) -> [(&'static str, f64); 2] {
        [("RELU", f64::from(u8::from(self.relu))), ("HW", (self.h * self.w) as f64)]
    }

    /// One workgroup per channel.
    fn grid(&self) -> Result<[u32; 3]> {
        Ok([to_u32("channels", self.c)?, 1, 1])
    }

    pub fn shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    /// Elements of the input.
    pub fn numel(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Values per channel in the batch statistics.
    pub fn count(&self) -> usize {
        self.n * self.h * self.w
    }

    fn params(&self, update_running: bool) -> Result<Params> {
        ensure!(self.n > 0 && self.c > 0 && self.h > 0 && self.w > 0, "batch_norm: empty dimension in {self:?}");
        Ok(Params {
            n: to_u32("batch", self.n)?,
            c: to_u32("channels", self.c)?,
            _pad0: [0; 2],
            eps: self.eps as f32,
            momentum: self.momentum as f32,
            update_running: u32::from(update_running),
            _pad1: 0,
        })
    }
}

/// Mirrors `Params` in batch_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    c: u32,
    _pad0: [u32; 2],
    eps: f32,
    momentum: f32,
    update_running: u32,
    _pad1: u32,
}

/// The tensors of a forward pass: input, affine parameters, running statistics (updated in
/// training, read in eval), the saved batch statistics [2, C] (mean, invstd) and the output.
#[derive(Clone, Copy)]
pub struct BnForward<'a> {
    pub inp: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub stats: &'a Tensor,
    pub out: &'a Tensor,
}

/// Training-mode forward, one dispatch: batch statistics into `stats` ([2, C]: mean, invstd),
/// running statistics updated in place, then `out` normalised.
pub fn batch_norm_forward_train(gpu: &Gpu, cfg: &BatchNormConfig, t: &BnForward<'_>) -> Result<Vec<Dispatch>> {
    let BnForward { inp, gamma, beta, running_mean, running_var, stats, out } = *t;
    ensure!(
        cfg.count() > 1,
        "batch_norm: training needs more than one value per channel (batch {} x {}x{}), as in PyTorch",
        cfg.n,
        cfg.h,
        cfg.w
    );
    check(cfg, t)?;
    let params = gpu.uniform("batch_norm params", &cfg.params(true)?);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, stats),
        Bind::Tensor(3, running_mean),
        Bind::Tensor(4, running_var),
        Bind::Tensor(6, gamma),
        Bind::Tensor(7, beta),
        Bind::Tensor(8, out),
    ];
    bn_dispatch(gpu, cfg, "batch_norm_forward_train", &binds, inp, (7.0, 2.0))
}

/// Eval-mode forward, one dispatch: statistics from the running estimates (into `stats` too).
pub fn batch_norm_forward_eval(gpu: &Gpu, cfg: &BatchNormConfig, t: &BnForward<'_>) -> Result<Vec<Dispatch>> {
    let BnForward { inp, gamma, beta, running_mean, running_var, stats, out } = *t;
    check(cfg, t)?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, stats),
        Bind::Tensor(6, gamma),
        Bind::Tensor(7, beta),
        Bind::Tensor(8, out),
        Bind::Tensor(15, running_mean),
        Bind::Tensor(16, running_var),
    ];
    bn_dispatch(gpu, cfg, "batch_norm_forward_eval", &binds, inp, (2.0, 2.0))
}

/// One batch-norm kernel over the tensor (a workgroup per channel), costed per element: `flops`
/// and `bytes` element-widths of `act` (the input's precision picks the compiled variant).
fn bn_dispatch(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    entry: &'static str,
    binds: &[Bind<'_>],
    act: &Tensor,
    (flops, bytes): (f64, f64),
) -> Result<Vec<Dispatch>> {
    let numel = cfg.numel() as f64;
    let d = gpu.dispatch_in(Precision::of(act), "batch_norm", entry, &cfg.constants(), binds, cfg.grid()?)?;
    Ok(vec![d.with_cost(flops * numel, bytes * el(act) * numel)])
}

fn check(cfg: &BatchNormConfig, t: &BnForward<'_>) -> Result<()> {
    expect_shape("batch_norm input", t.inp, &cfg.shape())?;
    expect_shape("batch_norm weight (gamma)", t.gamma, &[cfg.c])?;
    expect_shape("batch_norm bias (beta)", t.beta, &[cfg.c])?;
    expect_shape("batch_norm saved statistics", t.stats, &[2, cfg.c])?;
    expect_shape("batch_norm running_mean", t.running_mean, &[cfg.c])?;
    expect_shape("batch_norm running_var", t.running_var, &[cfg.c])?;
    expect_shape("batch_norm output", t.out, &cfg.shape())
}

/// Training-mode backward, one dispatch: dgamma, dbeta, then dinp. With `cfg.relu`, `dout` is
/// the fused ReLU's output gradient and `relu_out` its output (the forward's `out`).
pub fn batch_norm_backward(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    inp: &Tensor,
    gamma: &Tensor,
    stats: &Tensor,
    relu_out: Option<&Tensor>,
    dout: &Tensor,
    dinp: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
) -> Result<Vec<Dispatch>> {
    check_backward(cfg, &BnBackward { inp, gamma, stats, relu_out, dout, dinp, dgamma, dbeta })?;
    // Unfused, the mask binding is never read; it still needs a buffer.
    let mask = relu_out.unwrap_or(dout);
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(5, stats),
        Bind::Tensor(6, gamma),
        Bind::Tensor(9, dout),
        Bind::Tensor(10, dgamma),
        Bind::Tensor(11, dbeta),
        Bind::Tensor(14, dinp),
        Bind::Tensor(17, mask),
    ];
    bn_dispatch(gpu, cfg, "batch_norm_backward", &binds, inp, (12.0, 4.0))
}

// ---------------------------------------------------------------------------------------------
// --sync-bn: the passes split around the ranks' exchange

/// Rows of an exchange buffer ([`ROWS`, C]): forward (count, mean, M2), backward (count, sum of
/// the output gradient, sum of the output gradient times (x - mean)).
pub const ROWS: usize = 3;

/// The tensors of a training-mode backward pass. With `cfg.relu`, `dout` is the fused ReLU's output
/// gradient and `relu_out` its output (the forward's `out`).
#[derive(Clone, Copy)]
pub struct BnBackward<'a> {
    pub inp: &'a Tensor,
    pub gamma: &'a Tensor,
    /// The forward's saved [2, C] (mean, invstd).
    pub stats: &'a Tensor,
    pub relu_out: Option<&'a Tensor>,
    pub dout: &'a Tensor,
    pub dinp: &'a Tensor,
    pub dgamma: &'a Tensor,
    pub dbeta: &'a Tensor,
}

/// `--sync-bn`, forward, first half: this rank's per-channel (count, mean, M2) into `welford`
/// [3, C], for the ranks to merge ([`merge_rank_statistics`]) and write back before
/// [`batch_norm_forward_apply`].
pub fn batch_norm_forward_stats(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    inp: &Tensor,
    welford: &Tensor,
) -> Result<Vec<Dispatch>> {
    expect_shape("batch_norm input", inp, &cfg.shape())?;
    expect_shape("batch_norm rank statistics", welford, &[ROWS, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(12, welford)];
    bn_dispatch(gpu, cfg, "batch_norm_forward_stats", &binds, inp, (5.0, 1.0))
}

/// `--sync-bn`, forward, second half: normalise with the (count, mean, M2) in `welford` — every
/// rank's batch merged — saving mean and invstd into `stats` and moving the running statistics
/// with the merged count's unbiased variance, as PyTorch's SyncBatchNorm.
pub fn batch_norm_forward_apply(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    t: &BnForward<'_>,
    welford: &Tensor,
) -> Result<Vec<Dispatch>> {
    let BnForward { inp, gamma, beta, running_mean, running_var, stats, out } = *t;
    check(cfg, t)?;
    expect_shape("batch_norm merged statistics", welford, &[ROWS, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(true)?);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, stats),
        Bind::Tensor(3, running_mean),
        Bind::Tensor(4, running_var),
        Bind::Tensor(6, gamma),
        Bind::Tensor(7, beta),
        Bind::Tensor(8, out),
        Bind::Tensor(12, welford),
    ];
    bn_dispatch(gpu, cfg, "batch_norm_forward_apply", &binds, inp, (2.0, 2.0))
}

fn check_backward(cfg: &BatchNormConfig, g: &BnBackward<'_>) -> Result<()> {
    ensure!(
        cfg.relu == g.relu_out.is_some(),
        "batch_norm: a fused ReLU's backward needs its output, and only it (relu {}, output given {})",
        cfg.relu,
        g.relu_out.is_some()
    );
    if let Some(r) = g.relu_out {
        expect_shape("batch_norm ReLU output", r, &cfg.shape())?;
    }
    expect_shape("batch_norm input", g.inp, &cfg.shape())?;
    expect_shape("batch_norm weight (gamma)", g.gamma, &[cfg.c])?;
    expect_shape("batch_norm saved statistics", g.stats, &[2, cfg.c])?;
    expect_shape("batch_norm dout", g.dout, &cfg.shape())?;
    expect_shape("batch_norm dinp", g.dinp, &cfg.shape())?;
    expect_shape("batch_norm dgamma", g.dgamma, &[cfg.c])?;
    expect_shape("batch_norm dbeta", g.dbeta, &[cfg.c])
}

/// `--sync-bn`, backward, first half: this rank's dgamma and dbeta (parameter gradients, averaged
/// over the ranks with all the others) and its per-channel (count, sum dout, sum dout*(x - mean))
/// into `sums` [3, C], for the ranks to add up ([`sum_rank_grad_sums`]) and write back before
/// [`batch_norm_backward_input`].
pub fn batch_norm_backward_sums(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    g: &BnBackward<'_>,
    sums: &Tensor,
) -> Result<Vec<Dispatch>> {
    check_backward(cfg, g)?;
    expect_shape("batch_norm rank gradient sums", sums, &[ROWS, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, g.inp),
        Bind::Tensor(5, g.stats),
        Bind::Tensor(9, g.dout),
        Bind::Tensor(10, g.dgamma),
        Bind::Tensor(11, g.dbeta),
        Bind::Tensor(13, sums),
        // Unfused, the mask binding is never read; it still needs a buffer.
        Bind::Tensor(17, g.relu_out.unwrap_or(g.dout)),
    ];
    bn_dispatch(gpu, cfg, "batch_norm_backward_sums", &binds, g.inp, (4.0, 2.0))
}

/// `--sync-bn`, backward, second half: dinp through the statistics of every rank's batch, from
/// the (count, sum dout, sum dout*(x - mean)) in `sums` — every rank's added up.
pub fn batch_norm_backward_input(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    g: &BnBackward<'_>,
    sums: &Tensor,
) -> Result<Vec<Dispatch>> {
    check_backward(cfg, g)?;
    expect_shape("batch_norm summed gradient sums", sums, &[ROWS, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, g.inp),
        Bind::Tensor(5, g.stats),
        Bind::Tensor(6, g.gamma),
        Bind::Tensor(9, g.dout),
        Bind::Tensor(13, sums),
        Bind::Tensor(14, g.dinp),
        Bind::Tensor(17, g.relu_out.unwrap_or(g.dout)),
    ];
    bn_dispatch(gpu, cfg, "batch_norm_backward_input", &binds, g.inp, (8.0, 3.0))
}

/// (count, mean, M2) of two sets together (Chan et al.), in f32, as `welford_merge` in the
/// reduce preludes; `b` may be empty.
pub fn welford_merge(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    let kn = a[0] + b[0];
    if b[0] == 0.0 {
        return a;
    }
    let d = b[1] - a[1];
    [kn, a[1] + d * (b[0] / kn), a[2] + (b[2] + d * d * (a[0] * b[0] / kn))]
}

/// The forward exchange: every rank's [3, C] (count, mean, M2) concatenated in rank order (what an
/// all-gather returns) merged into one [3, C], channel by channel, folding the ranks in order
/// 0, 1, 2, … — the same operations on the same numbers, so every rank gets the same bits.
pub fn merge_rank_statistics(all: &[f32], c: usize) -> Result<Vec<f32>> {
    let per_rank = ROWS * c;
    ensure!(
        per_rank > 0 && !all.is_empty() && all.len().is_multiple_of(per_rank),
        "batch_norm: {} gathered statistics are not whole [3, {c}] blocks",
        all.len()
    );
    let mut merged = vec![0.0f32; per_rank];
    for ch in 0..c {
        let of = |r: &[f32]| [r[ch], r[c + ch], r[2 * c + ch]];
        let mut acc = of(&all[..per_rank]);
        for rank in all.chunks(per_rank).skip(1) {
            acc = welford_merge(acc, of(rank));
        }
        (merged[ch], merged[c + ch], merged[2 * c + ch]) = (acc[0], acc[1], acc[2]);
    }
    Ok(merged)
}

/// The backward exchange: every rank's [3, C] (count, sum dout, sum dout*(x - mean)) concatenated
/// in rank order, summed element by element in rank order (the same bits on every rank).
pub fn sum_rank_grad_sums(all: &[f32], c: usize) -> Result<Vec<f32>> {
    let per_rank = ROWS * c;
    ensure!(
        per_rank > 0 && !all.is_empty() && all.len().is_multiple_of(per_rank),
        "batch_norm: {} gathered gradient sums are not whole [3, {c}] blocks",
        all.len()
    );
    let mut sum = all[..per_rank].to_vec();
    for rank in all.chunks(per_rank).skip(1) {
        for (s, v) in sum.iter_mut().zip(rank) {
            *s += v;
        }
    }
    Ok(sum)
}
