//! batch_norm — host side of `shaders/batch_norm.wgsl`; CPU oracle in `reference/batch_norm.rs`.

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
    let numel = cfg.numel() as f64;
    Ok(vec![
        gpu.dispatch_in(
            Precision::of(inp),
            "batch_norm",
            "batch_norm_forward_train",
            &cfg.constants(),
            &binds,
            cfg.grid()?,
        )?
        .with_cost(7.0 * numel, 2.0 * el(inp) * numel),
    ])
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
    let numel = cfg.numel() as f64;
    Ok(vec![
        gpu.dispatch_in(
            Precision::of(inp),
            "batch_norm",
            "batch_norm_forward_eval",
            &cfg.constants(),
            &binds,
            cfg.grid()?,
        )?
        .with_cost(2.0 * numel, 2.0 * el(inp) * numel),
    ])
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
    ensure!(
        cfg.relu == relu_out.is_some(),
        "batch_norm: a fused ReLU's backward needs its output, and only it (relu {}, output given {})",
        cfg.relu,
        relu_out.is_some()
    );
    // Unfused, the mask binding is never read; it still needs a buffer.
    let mask = relu_out.unwrap_or(dout);
    expect_shape("batch_norm ReLU output", mask, &cfg.shape())?;
    expect_shape("batch_norm input", inp, &cfg.shape())?;
    expect_shape("batch_norm weight (gamma)", gamma, &[cfg.c])?;
    expect_shape("batch_norm saved statistics", stats, &[2, cfg.c])?;
    expect_shape("batch_norm dout", dout, &cfg.shape())?;
    expect_shape("batch_norm dinp", dinp, &cfg.shape())?;
    expect_shape("batch_norm dgamma", dgamma, &[cfg.c])?;
    expect_shape("batch_norm dbeta", dbeta, &[cfg.c])?;
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
    let numel = cfg.numel() as f64;
    Ok(vec![
        gpu.dispatch_in(
            Precision::of(inp),
            "batch_norm",
            "batch_norm_backward",
            &cfg.constants(),
            &binds,
            cfg.grid()?,
        )?
        .with_cost(12.0 * numel, 4.0 * el(inp) * numel),
    ])
}
