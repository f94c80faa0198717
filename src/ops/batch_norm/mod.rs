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

use super::pool::MaxPool2dConfig;
use super::se_block::SeWeightGradIo;
use super::{el, expect_shape, placeholder, to_u32};
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
    /// With `relu`: the backward recomputes the ReLU's mask from the input and the saved
    /// statistics instead of reading `relu_out` (batch_norm.wgsl, REMASK).
    pub remask: bool,
    /// With `relu`: a max pool fused after the ReLU (`pool.n/c/h/w` are this input's). The
    /// forward writes the pooled output and its argmax, the backward takes the pooled gradient
    /// (batch_norm.wgsl, POOL).
    pub pool: Option<MaxPool2dConfig>,
    /// The backward also writes the bias gradient of the convolution before it (BIAS).
    pub conv_bias: bool,
    /// Without `relu`: the gradient comes from the SE block after it, which leaves its input
    /// gradient to this backward (SE_IN): `dout` is the SE's shortcut gradient.
    pub se_in: bool,
    /// The training forward saves the statistics but writes no output: the layer after it
    /// applies the normalisation as it loads (STATS_ONLY).
    pub stats_only: bool,
    /// The training forward takes its batch statistics from the convolution before it, which
    /// wrote (mean, M2) per block of this many elements of each channel as it stored its output
    /// (PARTIALS; [`BnFused::partials`]), instead of reading its input for them.
    pub partial_rows: Option<usize>,
    /// With `se_in`: the backward also sums the SE block's weight gradients (SE_WGRAD, the
    /// entry point `batch_norm_backward_se_wgrad`), whose (hidden units, biases) these are; the
    /// block records no weight-gradient dispatch. That entry point binds
    /// [`SE_WGRAD_STORAGE_BUFFERS`] storage buffers: see [`se_wgrad_fits`].
    pub se_wgrad: Option<(usize, bool)>,
}

impl BatchNormConfig {
    /// PyTorch's defaults: eps 1e-5, momentum 0.1.
    pub fn new(n: usize, c: usize, h: usize, w: usize) -> Self {
        BatchNormConfig {
            n,
            c,
            h,
            w,
            eps: 1e-5,
            momentum: 0.1,
            relu: false,
            remask: false,
            pool: None,
            conv_bias: false,
            se_in: false,
            stats_only: false,
            partial_rows: None,
            se_wgrad: None,
        }
    }

    /// The same normalisation with a ReLU fused after it.
    pub fn with_relu(self) -> Self {
        BatchNormConfig { relu: true, ..self }
    }

    /// With a ReLU whose backward mask is recomputed from the input ([`BatchNormConfig::remask`]).
    pub fn with_remask(self) -> Self {
        BatchNormConfig { relu: true, remask: true, ..self }
    }

    /// With a ReLU and then `pool` fused after it ([`BatchNormConfig::pool`]); the pool's input
    /// dimensions become this normalisation's.
    pub fn with_pool(self, pool: MaxPool2dConfig) -> Self {
        let pool = MaxPool2dConfig { n: self.n, c: self.c, h: self.h, w: self.w, ..pool };
        BatchNormConfig { relu: true, pool: Some(pool), ..self }
    }

    /// With the convolution bias gradient written by the backward ([`BatchNormConfig::conv_bias`]).
    pub fn with_conv_bias(self) -> Self {
        BatchNormConfig { conv_bias: true, ..self }
    }

    /// With its gradient from the SE block after it ([`BatchNormConfig::se_in`]).
    pub fn with_se_in(self) -> Self {
        BatchNormConfig { se_in: true, ..self }
    }

    /// With the SE block's weight gradients (`hidden` units, `bias`) summed in the backward
    /// ([`BatchNormConfig::se_wgrad`]).
    pub fn with_se_wgrad(self, hidden: usize, bias: bool) -> Self {
        BatchNormConfig { se_wgrad: Some((hidden, bias)), ..self }
    }

    /// With no output written in training ([`BatchNormConfig::stats_only`]).
    pub fn with_stats_only(self) -> Self {
        BatchNormConfig { stats_only: true, ..self }
    }

    /// With its statistics merged from the convolution's blocks of `rows` elements
    /// ([`BatchNormConfig::partial_rows`]).
    pub fn with_partials(self, rows: usize) -> Self {
        BatchNormConfig { partial_rows: Some(rows), ..self }
    }

    /// The shape of the convolution's block statistics it merges ([`BatchNormConfig::partial_rows`]):
    /// [blocks, C, 2].
    pub fn partials_shape(&self, rows: usize) -> [usize; 3] {
        [self.count().div_ceil(rows.max(1)), self.c, 2]
    }

    /// The output shape: the input's, or the fused pool's.
    pub fn out_shape(&self) -> [usize; 4] {
        self.pool.map_or(self.shape(), |p| p.output_shape())
    }

    /// The pipeline constants; the fused epilogues' only where they are on, so an unfused
    /// kernel is the same pipeline as before they existed.
    fn constants(&self) -> Vec<(&'static str, f64)> {
        let flag = |b: bool| f64::from(u8::from(b));
        let mut k = vec![("RELU", flag(self.relu)), ("HW", (self.h * self.w) as f64)];
        if self.remask {
            k.push(("REMASK", 1.0));
        }
        if self.conv_bias {
            k.push(("BIAS", 1.0));
        }
        if self.se_in {
            k.push(("SE_IN", 1.0));
        }
        if self.stats_only {
            k.push(("STATS_ONLY", 1.0));
        }
        if self.partial_rows.is_some() {
            k.push(("PARTIALS", 1.0));
        }
        if let Some(p) = self.pool {
            let v = |x: usize| x as f64;
            k.extend([
                ("POOL", 1.0),
                ("H", v(p.h)),
                ("W", v(p.w)),
                ("KH", v(p.kernel.0)),
                ("KW", v(p.kernel.1)),
                ("SH", v(p.stride.0)),
                ("SW", v(p.stride.1)),
                ("PH", v(p.pad.0)),
                ("PW", v(p.pad.1)),
                ("OH", v(p.out_h())),
                ("OW", v(p.out_w())),
            ]);
        }
        k
    }

    /// Elements of the output (the pooled output's with a fused pool).
    fn out_numel(&self) -> usize {
        self.out_shape().iter().product()
    }

    /// The backward recomputes the ReLU's mask from the input (REMASK, or a pool's).
    pub fn recomputes_mask(&self) -> bool {
        self.relu && (self.remask || self.pool.is_some())
    }

    /// Window elements per pooled output (0 without a fused pool), for the flop count.
    fn kernel_area(&self) -> f64 {
        self.pool.map_or(0.0, |p| (p.kernel.0 * p.kernel.1) as f64)
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
            partial_rows: to_u32("statistics block", self.partial_rows.unwrap_or(0))?,
            se_hidden: to_u32("SE hidden units", self.se_wgrad.map_or(0, |(h, _)| h))?,
            eps: self.eps as f32,
            momentum: self.momentum as f32,
            update_running: u32::from(update_running),
            se_bias: u32::from(self.se_wgrad.is_some_and(|(_, b)| b)),
            slices: 1,
            slice_len: to_u32("values per channel", self.count())?,
            _pad: [0; 2],
        })
    }
}

/// Mirrors `Params` in batch_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    c: u32,
    partial_rows: u32,
    se_hidden: u32,
    eps: f32,
    momentum: f32,
    update_running: u32,
    se_bias: u32,
    slices: u32,
    slice_len: u32,
    _pad: [u32; 2],
}

impl Params {
    /// The sliced kernels' split of each channel's values into `slices` slices.
    fn sliced(mut self, cfg: &BatchNormConfig, slices: usize) -> Result<Params> {
        self.slices = to_u32("batch-norm slices", slices)?;
        self.slice_len = to_u32("values per slice", cfg.count().div_ceil(slices))?;
        Ok(self)
    }
}

/// How many slices each channel of `cfg` runs in on `gpu` (`--bn-split`; 1 = the one-pass
/// kernels): enough workgroups for ~1,024 in flight, each slice at least 4,096 values, at most
/// 64 slices; 1 where the split is off, the layer fuses a pool or a bias gradient, or takes its
/// statistics from the convolution before (epilogues the sliced kernels do not have).
pub fn slices_for(gpu: &Gpu, cfg: &BatchNormConfig) -> usize {
    if !gpu.bn_split || cfg.pool.is_some() || cfg.conv_bias || cfg.partial_rows.is_some() {
        return 1;
    }
    1024usize.div_ceil(cfg.c).min(cfg.count() / 4096).clamp(1, 64)
}

/// A batch norm with its max pool fused runs a workgroup per channel over all the channel's
/// N·H·W values, never sliced: its backward loops about 18 times per 256 of them (two passes,
/// each gathering the pool's windows). Where the driver caps one invocation's loops
/// ([`Gpu::loop_cap`]: llvmpipe) and that passes 90 % of the cap — from about batch 67 at
/// 112 x 112, SE-ResNet-50's stem, which only an f16 plan fits on lavapipe (at batch 100 lavapipe
/// left half its input gradient unwritten) — an error saying so, not a partial result.
fn check_pool_loops(gpu: &Gpu, cfg: &BatchNormConfig) -> Result<()> {
    let (Some(_), Some(cap)) = (cfg.pool, gpu.loop_cap()) else { return Ok(()) };
    let loops = 18 * cfg.count().div_ceil(256);
    ensure!(
        loops <= cap / 10 * 9,
        "batch_norm: {} values a channel (batch {} of {}x{}) with the max pool after it fused would loop {loops} \
         times in one invocation, past what this driver runs ({cap} iterations, llvmpipe); use --fuse off, or a \
         smaller batch",
        cfg.count(),
        cfg.n,
        cfg.h,
        cfg.w
    );
    Ok(())
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

impl<'a> BnForward<'a> {
    /// The bindings every training forward that normalises shares: the parameter block, the
    /// input, the saved and running statistics, gamma, beta and the output.
    fn train_binds<'b>(&self, params: &'b wgpu::Buffer) -> Vec<Bind<'b>>
    where
        'a: 'b,
    {
        vec![
            Bind::Uniform(0, params),
            Bind::Tensor(1, self.inp),
            Bind::Tensor(2, self.stats),
            Bind::Tensor(3, self.running_mean),
            Bind::Tensor(4, self.running_var),
            Bind::Tensor(6, self.gamma),
            Bind::Tensor(7, self.beta),
            Bind::Tensor(8, self.out),
        ]
    }
}

/// A training batch norm applied by the layer after it as that layer loads the batch norm's input
/// (the SE block's AFFINE_IN, the workgroup convolution's `affine_in`): the batch norm's saved
/// batch statistics [2, C] (mean, invstd) and its scale and shift [C]. The layer computes
/// act((x − mean)·(invstd·gamma) + beta), with the batch norm's ReLU where it has one — `normalised`
/// in batch_norm.wgsl, the value the batch norm would have stored.
#[derive(Clone, Copy)]
pub struct BnAffine<'a> {
    pub stats: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
}

impl BnAffine<'_> {
    /// The tensors are of a batch norm over `c` channels, or an error naming `what`.
    pub fn check(&self, what: &str, c: usize) -> Result<()> {
        expect_shape(&format!("{what} batch-norm statistics"), self.stats, &[2, c])?;
        expect_shape(&format!("{what} batch-norm weight"), self.gamma, &[c])?;
        expect_shape(&format!("{what} batch-norm bias"), self.beta, &[c])
    }
}

/// What the fused epilogues bind beyond [`BnForward`] and [`BnBackward`]: the fused pool's argmax
/// ([`BatchNormConfig::pool`]; u32, the pooled output's shape — written by the forward, read by
/// the backward) and the convolution bias gradient [C] ([`BatchNormConfig::conv_bias`]).
#[derive(Clone, Copy, Default)]
pub struct BnFused<'a> {
    pub argmax: Option<&'a Tensor>,
    pub conv_dbias: Option<&'a Tensor>,
    /// The backward of a recomputed ReLU mask (`remask` or a pool): the batch norm's bias (beta).
    pub beta: Option<&'a Tensor>,
    /// The backward with `se_in`: the SE block's s and dz per sample, [n, 2, C] f32.
    pub se_grad: Option<&'a Tensor>,
    /// The training forward with `partial_rows`: the convolution's block statistics,
    /// [`BatchNormConfig::partials_shape`] f32.
    pub partials: Option<&'a Tensor>,
    /// The backward with `se_wgrad`: the SE block's saved values and its weight gradients.
    pub se_weight: Option<SeWeightGradIo<'a>>,
}

impl<'a> BnFused<'a> {
    /// The forward's extra binding (the argmax) is given exactly when `cfg` asks for it, with its
    /// shape, and no bias gradient.
    fn check(&self, cfg: &BatchNormConfig) -> Result<()> {
        self.check_argmax(cfg)?;
        ensure!(
            self.conv_dbias.is_none() && self.beta.is_none(),
            "batch_norm: the forward takes no gradient or beta here"
        );
        ensure!(
            cfg.partial_rows.is_some() == self.partials.is_some() && cfg.partial_rows != Some(0),
            "batch_norm: statistics from the convolution before need its block statistics, and only they \
             (blocks of {:?} elements, given {})",
            cfg.partial_rows,
            self.partials.is_some()
        );
        if let (Some(rows), Some(t)) = (cfg.partial_rows, self.partials) {
            expect_shape("batch_norm block statistics of the convolution before", t, &cfg.partials_shape(rows))?;
        }
        Ok(())
    }

    fn check_argmax(&self, cfg: &BatchNormConfig) -> Result<()> {
        ensure!(
            cfg.pool.is_some() == self.argmax.is_some(),
            "batch_norm: a fused pool needs its argmax, and only it (pool {}, argmax given {})",
            cfg.pool.is_some(),
            self.argmax.is_some()
        );
        ensure!(cfg.pool.is_none() || cfg.relu, "batch_norm: a fused pool comes after a fused ReLU");
        if let Some(a) = self.argmax {
            expect_shape("batch_norm fused pool argmax", a, &cfg.out_shape())?;
        }
        Ok(())
    }

    /// The backward's extra bindings: the argmax, the bias gradient and beta, each exactly when
    /// `cfg` asks for it.
    fn check_backward(&self, cfg: &BatchNormConfig) -> Result<()> {
        self.check_argmax(cfg)?;
        ensure!(
            cfg.conv_bias == self.conv_dbias.is_some(),
            "batch_norm: a fused bias gradient needs its buffer, and only it (bias {}, buffer given {})",
            cfg.conv_bias,
            self.conv_dbias.is_some()
        );
        if let Some(b) = self.conv_dbias {
            expect_shape("batch_norm convolution bias gradient", b, &[cfg.c])?;
        }
        ensure!(
            cfg.recomputes_mask() == self.beta.is_some(),
            "batch_norm: a recomputed ReLU mask needs beta, and only it (recomputed {}, beta given {})",
            cfg.recomputes_mask(),
            self.beta.is_some()
        );
        if let Some(b) = self.beta {
            expect_shape("batch_norm bias (beta)", b, &[cfg.c])?;
        }
        ensure!(
            cfg.se_in == self.se_grad.is_some() && !(cfg.se_in && cfg.relu),
            "batch_norm: a gradient from the SE block after needs its (s, dz), only it, and no fused ReLU \
             (se_in {}, given {}, relu {})",
            cfg.se_in,
            self.se_grad.is_some(),
            cfg.relu
        );
        if let Some(t) = self.se_grad {
            expect_shape("batch_norm SE gradient (s, dz)", t, &[cfg.n, 2, cfg.c])?;
        }
        ensure!(
            cfg.se_wgrad.is_some() == self.se_weight.is_some() && (cfg.se_wgrad.is_none() || cfg.se_in),
            "batch_norm: the SE block's weight gradients need its buffers, only they, and its gradient \
             (se_wgrad {:?}, buffers given {}, se_in {})",
            cfg.se_wgrad,
            self.se_weight.is_some(),
            cfg.se_in
        );
        if let (Some((hidden, bias)), Some(w)) = (cfg.se_wgrad, &self.se_weight) {
            w.check(cfg.n, cfg.c, hidden, bias)?;
        }
        Ok(())
    }

    /// The bindings the kernels declare for the fused epilogues (18 argmax written; 7 beta,
    /// 19 argmax read, 20 bias gradient), placeholders where unused — `unused[0]` for read-only
    /// bindings, `unused[1]` for the written one (a buffer may not be both in one dispatch) —
    /// after `binds`; `write` picks the forward's or the backward's.
    fn push_binds<'b>(&self, binds: &mut Vec<Bind<'b>>, unused: &'b [Tensor; 2], write: bool)
    where
        'a: 'b,
    {
        if write {
            binds.push(Bind::Tensor(18, self.argmax.unwrap_or(&unused[1])));
        } else {
            binds.extend([
                Bind::Tensor(7, self.beta.unwrap_or(&unused[0])),
                Bind::Tensor(19, self.argmax.unwrap_or(&unused[0])),
                Bind::Tensor(20, self.conv_dbias.unwrap_or(&unused[1])),
                Bind::Tensor(21, self.se_grad.unwrap_or(&unused[0])),
            ]);
        }
    }
}

/// Training-mode forward, one dispatch: batch statistics into `stats` ([2, C]: mean, invstd),
/// running statistics updated in place, then `out` normalised.
pub fn batch_norm_forward_train(gpu: &Gpu, cfg: &BatchNormConfig, t: &BnForward<'_>) -> Result<Vec<Dispatch>> {
    batch_norm_forward_train_fused(gpu, cfg, t, BnFused::default())
}

/// [`batch_norm_forward_train`] with the fused epilogues `cfg` asks for: with a pool, `t.out` is
/// the pooled output and `f.argmax` its argmax.
pub fn batch_norm_forward_train_fused(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    t: &BnForward<'_>,
    f: BnFused<'_>,
) -> Result<Vec<Dispatch>> {
    batch_norm_forward_train_sliced(gpu, cfg, t, f, slices_for(gpu, cfg))
}

/// [`batch_norm_forward_train_fused`] with each channel in `slices` slices: 1 = the one-pass
/// kernel; more = `batch_norm_forward_slices`, then `batch_norm_forward_slices_apply` (a
/// workgroup per channel and slice each; no pool, no statistics from the convolution before).
pub fn batch_norm_forward_train_sliced(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    t: &BnForward<'_>,
    f: BnFused<'_>,
    slices: usize,
) -> Result<Vec<Dispatch>> {
    let inp = t.inp;
    f.check(cfg)?;
    check_pool_loops(gpu, cfg)?;
    ensure!(
        cfg.count() > 1,
        "batch_norm: training needs more than one value per channel (batch {} x {}x{}), as in PyTorch",
        cfg.n,
        cfg.h,
        cfg.w
    );
    check(cfg, t)?;
    if slices > 1 {
        return forward_slices(gpu, cfg, t, slices);
    }
    let params = gpu.uniform("batch_norm params", &cfg.params(true)?);
    let mut binds = t.train_binds(&params);
    let unused = [placeholder(gpu)?, placeholder(gpu)?];
    f.push_binds(&mut binds, &unused, true);
    binds.push(Bind::Tensor(22, f.partials.unwrap_or(&unused[0])));
    let d = bn_dispatch(gpu, cfg, "batch_norm_forward_train", &binds, inp, (7.0, 2.0))?;
    let (n, o) = (cfg.numel() as f64, cfg.out_numel() as f64);
    let (flops, bytes) = if cfg.stats_only {
        // A fused ReLU is the next layer's to apply too (a workgroup convolution's `affine_in`).
        ensure!(cfg.pool.is_none(), "batch_norm: a forward that writes no output fuses no pool");
        // The input read once for the statistics, unless the convolution before wrote them
        // (PARTIALS: then the input is not read at all); the statistics written.
        let read = if cfg.partial_rows.is_some() { 0.0 } else { el(inp) * n };
        (5.0 * n, read + 8.0 * cfg.c as f64)
    } else if cfg.pool.is_some() {
        // Read once; the pooled output and its u32 argmax written once.
        (7.0 * n + cfg.kernel_area() * o, el(inp) * (n + o) + 4.0 * o)
    } else {
        (7.0 * n, 2.0 * el(inp) * n)
    };
    // The convolution's block statistics, read once (the input is counted once either way where
    // an output is written).
    let partials = cfg.partial_rows.map_or(0.0, |r| 4.0 * cfg.partials_shape(r).iter().product::<usize>() as f64);
    Ok(d.into_iter().map(|d| d.with_cost(flops, bytes + partials)).collect())
}

/// The sliced training forward (checked by the caller): each slice's (count, mean, M2) into a
/// [slices, 3, C] buffer, then per channel and slice the slices merged in order and the slice
/// normalised (with STATS_ONLY only the statistics, one workgroup per channel).
fn forward_slices(gpu: &Gpu, cfg: &BatchNormConfig, t: &BnForward<'_>, slices: usize) -> Result<Vec<Dispatch>> {
    let inp = t.inp;
    ensure!(
        cfg.pool.is_none() && cfg.partial_rows.is_none(),
        "batch_norm: the sliced forward takes no fused pool and no statistics from the convolution before"
    );
    let partial = Tensor::zeros(gpu, "batch_norm slice statistics", &[slices, ROWS, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(true)?.sliced(cfg, slices)?);
    let c = to_u32("channels", cfg.c)?;
    let first = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(12, &partial)];
    let stats_pass = gpu.dispatch_in(
        Precision::of(inp),
        "batch_norm",
        "batch_norm_forward_slices",
        &cfg.constants(),
        &first,
        [c, to_u32("batch-norm slices", slices)?, 1],
    )?;
    let mut second = t.train_binds(&params);
    second.push(Bind::Tensor(12, &partial));
    // STATS_ONLY normalises nothing: slice 0 alone saves the statistics.
    let apply_slices = if cfg.stats_only { 1 } else { slices };
    let apply = gpu.dispatch_in(
        Precision::of(inp),
        "batch_norm",
        "batch_norm_forward_slices_apply",
        &cfg.constants(),
        &second,
        [c, to_u32("batch-norm slices", apply_slices)?, 1],
    )?;
    let (n, e) = (cfg.numel() as f64, el(inp));
    let partials = 4.0 * (slices * ROWS * cfg.c) as f64;
    let (apply_flops, apply_bytes) = if cfg.stats_only { (0.0, 8.0 * cfg.c as f64) } else { (2.0 * n, 2.0 * e * n) };
    Ok(vec![stats_pass.with_cost(5.0 * n, e * n + partials), apply.with_cost(apply_flops, apply_bytes + partials)])
}

/// Eval-mode forward, one dispatch: statistics from the running estimates (into `stats` too).
pub fn batch_norm_forward_eval(gpu: &Gpu, cfg: &BatchNormConfig, t: &BnForward<'_>) -> Result<Vec<Dispatch>> {
    let BnForward { inp, gamma, beta, running_mean, running_var, stats, out } = *t;
    ensure!(cfg.pool.is_none(), "batch_norm: the evaluation forward has no fused pool");
    check(cfg, t)?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, stats),
        Bind::Tensor(6, gamma),
        Bind::Tensor(7, beta),
        Bind::Tensor(8, out),
        Bind::Tensor(15, running_mean),
        Bind::Tensor(16, running_var),
    ];
    let unused = [placeholder(gpu)?, placeholder(gpu)?];
    BnFused::default().push_binds(&mut binds, &unused, true);
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
    expect_shape("batch_norm output", t.out, &cfg.out_shape())
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
    let g = BnBackward { inp, gamma, stats, relu_out, dout, dinp, dgamma, dbeta };
    batch_norm_backward_fused(gpu, cfg, &g, BnFused::default())
}

/// [`batch_norm_backward`] with the fused epilogues `cfg` asks for: with a pool, `g.dout` is the
/// pooled gradient and `f.argmax` the forward's argmax; with `conv_bias`, the convolution bias
/// gradient into `f.conv_dbias`; with `remask` or a pool, no `relu_out`.
pub fn batch_norm_backward_fused(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    g: &BnBackward<'_>,
    f: BnFused<'_>,
) -> Result<Vec<Dispatch>> {
    batch_norm_backward_sliced(gpu, cfg, g, f, slices_for(gpu, cfg))
}

/// [`batch_norm_backward_fused`] with each channel in `slices` slices: 1 = the one-pass kernel;
/// more = `batch_norm_backward_slices`, then `batch_norm_backward_slices_input` (or its SE_WGRAD
/// form), a workgroup per channel and slice each (no pool, no bias gradient).
pub fn batch_norm_backward_sliced(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    g: &BnBackward<'_>,
    f: BnFused<'_>,
    slices: usize,
) -> Result<Vec<Dispatch>> {
    check_backward(cfg, g)?;
    f.check_backward(cfg)?;
    check_pool_loops(gpu, cfg)?;
    if slices > 1 {
        return backward_slices(gpu, cfg, g, f, slices);
    }
    // Unfused, the mask binding is never read; it still needs a buffer.
    let mask = g.relu_out.unwrap_or(g.dout);
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, g.inp),
        Bind::Tensor(5, g.stats),
        Bind::Tensor(6, g.gamma),
        Bind::Tensor(9, g.dout),
        Bind::Tensor(10, g.dgamma),
        Bind::Tensor(11, g.dbeta),
        Bind::Tensor(14, g.dinp),
        Bind::Tensor(17, mask),
    ];
    let unused = [placeholder(gpu)?, placeholder(gpu)?];
    f.push_binds(&mut binds, &unused, false);
    let spare = [placeholder(gpu)?, placeholder(gpu)?];
    let entry =
        se_weight_entry(&mut binds, f.se_weight, &spare, ("batch_norm_backward", "batch_norm_backward_se_wgrad"));
    let d = bn_dispatch(gpu, cfg, entry, &binds, g.inp, (12.0, 4.0))?;
    // Read: the input, the gradient (pooled: with its argmax), the ReLU output unless the mask
    // is recomputed (or there is no ReLU); written: dinp and the bias gradient.
    let (n, o, e) = (cfg.numel() as f64, cfg.out_numel() as f64, el(g.inp));
    let mask = if g.relu_out.is_some() { n * e } else { 0.0 };
    let argmax = if cfg.pool.is_some() { 4.0 * o } else { 0.0 };
    let bias = if cfg.conv_bias { 4.0 * cfg.c as f64 } else { 0.0 };
    let se = if cfg.se_in { 8.0 * (cfg.n * cfg.c) as f64 } else { 0.0 };
    // The SE block's weight gradients: its pass's reads and writes and multiply-adds.
    let (se_flops, se_bytes) = f.se_weight.map_or((0.0, 0.0), |w| w.cost(cfg.n));
    let bytes = 2.0 * n * e + o * e + mask + argmax + bias + se + se_bytes;
    Ok(d.into_iter().map(|d| d.with_cost(12.0 * n + cfg.kernel_area() * o + se_flops, bytes)).collect())
}

/// The backward's entry point, `entries.0`, or with the SE block's weight gradients (SE_WGRAD,
/// `se`) `entries.1`, an entry point of its own, their buffers added to `binds`: an absent bias
/// gradient gets a placeholder of its own from `spare`, so no buffer is bound writable twice.
fn se_weight_entry<'b>(
    binds: &mut Vec<Bind<'b>>,
    se: Option<SeWeightGradIo<'b>>,
    spare: &'b [Tensor; 2],
    entries: (&'static str, &'static str),
) -> &'static str {
    let Some(w) = se else { return entries.0 };
    binds.extend([
        Bind::Tensor(23, w.saved),
        Bind::Tensor(24, w.dsaved),
        Bind::Tensor(25, w.dw1),
        Bind::Tensor(26, w.db1.unwrap_or(&spare[0])),
        Bind::Tensor(27, w.dw2),
        Bind::Tensor(28, w.db2.unwrap_or(&spare[1])),
    ]);
    entries.1
}

/// The sliced backward (checked by the caller): each slice's (sum g, sum g * (x - mean)) into a
/// [slices, 2, C] buffer, then per channel and slice the slices' sums added in order and the
/// slice's dinp (slice 0 also writes dgamma, dbeta and, with SE_WGRAD, the SE block's weight
/// gradients of its channel).
fn backward_slices(
    gpu: &Gpu,
    cfg: &BatchNormConfig,
    g: &BnBackward<'_>,
    f: BnFused<'_>,
    slices: usize,
) -> Result<Vec<Dispatch>> {
    ensure!(
        cfg.pool.is_none() && !cfg.conv_bias,
        "batch_norm: the sliced backward takes no fused pool and no bias gradient"
    );
    let sums = Tensor::zeros(gpu, "batch_norm slice gradient sums", &[slices, 2, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?.sliced(cfg, slices)?);
    let unused = placeholder(gpu)?;
    // Unfused, the mask binding is never read; it still needs a buffer.
    let mask = g.relu_out.unwrap_or(g.dout);
    // What grad_at reads, in both passes.
    let grad = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, g.inp),
        Bind::Tensor(5, g.stats),
        Bind::Tensor(6, g.gamma),
        Bind::Tensor(7, f.beta.unwrap_or(&unused)),
        Bind::Tensor(9, g.dout),
        Bind::Tensor(13, &sums),
        Bind::Tensor(17, mask),
        Bind::Tensor(19, f.argmax.unwrap_or(&unused)),
        Bind::Tensor(21, f.se_grad.unwrap_or(&unused)),
    ];
    let grid = [to_u32("channels", cfg.c)?, to_u32("batch-norm slices", slices)?, 1];
    let precision = Precision::of(g.inp);
    let sums_pass =
        gpu.dispatch_in(precision, "batch_norm", "batch_norm_backward_slices", &cfg.constants(), &grad, grid)?;
    let mut binds = grad.to_vec();
    binds.extend([Bind::Tensor(10, g.dgamma), Bind::Tensor(11, g.dbeta), Bind::Tensor(14, g.dinp)]);
    let spare = [placeholder(gpu)?, placeholder(gpu)?];
    let entries = ("batch_norm_backward_slices_input", "batch_norm_backward_slices_input_se_wgrad");
    let entry = se_weight_entry(&mut binds, f.se_weight, &spare, entries);
    let input_pass = gpu.dispatch_in(precision, "batch_norm", entry, &cfg.constants(), &binds, grid)?;
    // Each pass reads the input and the gradient (and the ReLU output unless the mask is
    // recomputed); the second writes dinp.
    let (n, e) = (cfg.numel() as f64, el(g.inp));
    let mask = if g.relu_out.is_some() { n * e } else { 0.0 };
    let se = if cfg.se_in { 8.0 * (cfg.n * cfg.c) as f64 } else { 0.0 };
    let partials = 8.0 * (slices * cfg.c) as f64;
    let read = 2.0 * n * e + mask + se + partials;
    let (se_flops, se_bytes) = f.se_weight.map_or((0.0, 0.0), |w| w.cost(cfg.n));
    Ok(vec![sums_pass.with_cost(4.0 * n, read), input_pass.with_cost(8.0 * n + se_flops, read + n * e + se_bytes)])
}

// ---------------------------------------------------------------------------------------------
// --sync-bn: the passes split around the ranks' exchange

/// Storage buffers `batch_norm_backward_se_wgrad` binds (tests/shaders.rs counts them in the
/// shader): more than a GL adapter's 16.
pub const SE_WGRAD_STORAGE_BUFFERS: u32 = 18;

/// Whether `gpu` allows the batch-norm backward that sums the SE block's weight gradients
/// ([`BatchNormConfig::se_wgrad`]).
pub fn se_wgrad_fits(gpu: &Gpu) -> bool {
    gpu.limits.max_storage_buffers_per_shader_stage >= SE_WGRAD_STORAGE_BUFFERS
}

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
    ensure_unfused_sync(cfg)?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    // The training forward's statistics code declares the block statistics; unfused, never read.
    let unused = placeholder(gpu)?;
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(12, welford), Bind::Tensor(22, &unused)];
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
    let inp = t.inp;
    ensure_unfused_sync(cfg)?;
    check(cfg, t)?;
    expect_shape("batch_norm merged statistics", welford, &[ROWS, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(true)?);
    let mut binds = t.train_binds(&params);
    binds.push(Bind::Tensor(12, welford));
    let unused = [placeholder(gpu)?, placeholder(gpu)?];
    BnFused::default().push_binds(&mut binds, &unused, true);
    bn_dispatch(gpu, cfg, "batch_norm_forward_apply", &binds, inp, (2.0, 2.0))
}

/// `--sync-bn`'s split kernels run the ReLU epilogue only: the plan fuses no pool, bias gradient
/// or recomputed mask into them.
fn ensure_unfused_sync(cfg: &BatchNormConfig) -> Result<()> {
    ensure!(
        !cfg.remask
            && cfg.pool.is_none()
            && !cfg.conv_bias
            && !cfg.se_in
            && !cfg.stats_only
            && cfg.partial_rows.is_none(),
        "batch_norm: --sync-bn's split kernels take no fused pool, bias gradient, recomputed mask or \
         statistics from the convolution before"
    );
    Ok(())
}

fn check_backward(cfg: &BatchNormConfig, g: &BnBackward<'_>) -> Result<()> {
    let needs = cfg.relu && !cfg.recomputes_mask();
    ensure!(
        needs == g.relu_out.is_some(),
        "batch_norm: a fused ReLU's backward needs its output unless it recomputes the mask, and only it \
         (relu {}, mask recomputed {}, output given {})",
        cfg.relu,
        cfg.recomputes_mask(),
        g.relu_out.is_some()
    );
    if let Some(r) = g.relu_out {
        expect_shape("batch_norm ReLU output", r, &cfg.shape())?;
    }
    expect_shape("batch_norm input", g.inp, &cfg.shape())?;
    expect_shape("batch_norm weight (gamma)", g.gamma, &[cfg.c])?;
    expect_shape("batch_norm saved statistics", g.stats, &[2, cfg.c])?;
    expect_shape("batch_norm dout", g.dout, &cfg.out_shape())?;
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
    ensure_unfused_sync(cfg)?;
    check_backward(cfg, g)?;
    expect_shape("batch_norm rank gradient sums", sums, &[ROWS, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, g.inp),
        Bind::Tensor(5, g.stats),
        Bind::Tensor(6, g.gamma),
        Bind::Tensor(9, g.dout),
        Bind::Tensor(10, g.dgamma),
        Bind::Tensor(11, g.dbeta),
        Bind::Tensor(13, sums),
        // Unfused, the mask binding is never read; it still needs a buffer.
        Bind::Tensor(17, g.relu_out.unwrap_or(g.dout)),
    ];
    let unused = [placeholder(gpu)?, placeholder(gpu)?];
    // The sums read beta and the argmax (for a recomputed mask) and the SE's (s, dz), never the
    // bias gradient.
    binds.extend([Bind::Tensor(7, &unused[0]), Bind::Tensor(19, &unused[0]), Bind::Tensor(21, &unused[0])]);
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
    ensure_unfused_sync(cfg)?;
    check_backward(cfg, g)?;
    expect_shape("batch_norm summed gradient sums", sums, &[ROWS, cfg.c])?;
    let params = gpu.uniform("batch_norm params", &cfg.params(false)?);
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, g.inp),
        Bind::Tensor(5, g.stats),
        Bind::Tensor(6, g.gamma),
        Bind::Tensor(9, g.dout),
        Bind::Tensor(13, sums),
        Bind::Tensor(14, g.dinp),
        Bind::Tensor(17, g.relu_out.unwrap_or(g.dout)),
    ];
    let unused = [placeholder(gpu)?, placeholder(gpu)?];
    BnFused::default().push_binds(&mut binds, &unused, false);
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
