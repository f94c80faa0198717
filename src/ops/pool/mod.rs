//! pool (max pooling, global average pooling) — host side of `pool.wgsl`; CPU oracle in
//! `reference.rs` beside it.

mod layer;
pub mod reference;

pub use layer::{GlobalAvgPool, MaxPool2d};

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{expect_shape, placeholder, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

/// `torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode)` (no dilation) on `[n, c, h, w]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2dConfig {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub pad: (usize, usize),
    /// PyTorch's `ceil_mode`: the output size rounds up, so a last window may hang over the
    /// bottom/right edge (its outside counts as -inf, like padding); a window starting in the
    /// right/bottom padding is dropped. SENet-154's stem pool (Caffe's pooling) has it.
    pub ceil: bool,
}

impl MaxPool2dConfig {
    /// The common 2x2, stride 2 pool.
    pub fn two_by_two(n: usize, c: usize, h: usize, w: usize) -> Self {
        MaxPool2dConfig { n, c, h, w, kernel: (2, 2), stride: (2, 2), pad: (0, 0), ceil: false }
    }

    pub fn out_h(&self) -> usize {
        pooled_size(self.h, self.kernel.0, self.stride.0, self.pad.0, self.ceil)
    }

    pub fn out_w(&self) -> usize {
        pooled_size(self.w, self.kernel.1, self.stride.1, self.pad.1, self.ceil)
    }

    pub fn input_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    pub fn output_shape(&self) -> [usize; 4] {
        [self.n, self.c, self.out_h(), self.out_w()]
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        ensure!(c.n > 0 && c.c > 0 && c.h > 0 && c.w > 0, "max_pool2d: empty dimension in {c:?}");
        ensure!(
            c.kernel.0 > 0 && c.kernel.1 > 0 && c.stride.0 > 0 && c.stride.1 > 0,
            "max_pool2d: kernel and stride must be at least 1 in {c:?}"
        );
        ensure!(
            2 * c.pad.0 <= c.kernel.0 && 2 * c.pad.1 <= c.kernel.1,
            "max_pool2d: padding {:?} must be at most half the kernel {:?} (as PyTorch requires)",
            c.pad,
            c.kernel
        );
        ensure!(
            c.h + 2 * c.pad.0 >= c.kernel.0 && c.w + 2 * c.pad.1 >= c.kernel.1,
            "max_pool2d: a {:?} window does not fit the {}x{} input padded by {:?}",
            c.kernel,
            c.h,
            c.w,
            c.pad
        );
        Ok(())
    }

    /// The pipeline constants of the max-pool kernels: workgroup size and the geometry.
    fn constants(&self) -> [(&'static str, f64); 11] {
        let v = |x: usize| x as f64;
        [
            ("WG", WG as f64),
            ("H", v(self.h)),
            ("W", v(self.w)),
            ("KH", v(self.kernel.0)),
            ("KW", v(self.kernel.1)),
            ("SH", v(self.stride.0)),
            ("SW", v(self.stride.1)),
            ("PH", v(self.pad.0)),
            ("PW", v(self.pad.1)),
            ("OH", v(self.out_h())),
            ("OW", v(self.out_w())),
        ]
    }

    /// The uniform: batch and channels (the geometry is in the pipeline constants).
    fn params(&self) -> Result<Params> {
        gap_params(&self.input_shape())
    }
}

/// PyTorch's pooling output size: `(len + 2·pad − k) / s + 1` rounded down, or up in ceil mode,
/// where a last window that would start beyond `len + pad` (in the padding) is dropped.
fn pooled_size(len: usize, k: usize, s: usize, pad: usize, ceil: bool) -> usize {
    let s = s.max(1);
    let span = (len + 2 * pad).saturating_sub(k);
    if !ceil {
        return span / s + 1;
    }
    let out = span.div_ceil(s) + 1;
    if (out - 1) * s >= len + pad { out - 1 } else { out }
}

/// Mirrors `Params` in pool.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
}

const WG: u32 = 256;

/// Writes `out` and `argmax` (u32, index iy*W + ix within the plane, as PyTorch's indices).
pub fn max_pool2d_forward(
    gpu: &Gpu,
    cfg: &MaxPool2dConfig,
    inp: &Tensor,
    out: &Tensor,
    argmax: &Tensor,
) -> Result<Vec<Dispatch>> {
    max_pool_forward(gpu, cfg, [inp, out, argmax], None)
}

/// A batch norm in evaluation (its running statistics) and its ReLU, applied to each value as
/// [`max_pool2d_forward_affine`] loads it: the parameters and statistics, [C] each, and eps.
#[derive(Clone, Copy)]
pub struct PoolAffine<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub eps: f64,
}

/// [`max_pool2d_forward`] of relu(batch_norm(inp)) in evaluation, the batch norm applied as
/// each value is loaded (pool.wgsl, AFFINE): the same bits as `batch_norm_forward_eval` with its
/// ReLU, then the pool.
pub fn max_pool2d_forward_affine(
    gpu: &Gpu,
    cfg: &MaxPool2dConfig,
    [inp, out, argmax]: [&Tensor; 3],
    affine: &PoolAffine<'_>,
) -> Result<Vec<Dispatch>> {
    for (what, t) in [
        ("weight (gamma)", affine.gamma),
        ("bias (beta)", affine.beta),
        ("running_mean", affine.running_mean),
        ("running_var", affine.running_var),
    ] {
        expect_shape(&format!("max_pool2d batch norm {what}"), t, &[cfg.c])?;
    }
    max_pool_forward(gpu, cfg, [inp, out, argmax], Some(affine))
}

fn max_pool_forward(
    gpu: &Gpu,
    cfg: &MaxPool2dConfig,
    [inp, out, argmax]: [&Tensor; 3],
    affine: Option<&PoolAffine<'_>>,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    expect_shape("max_pool2d input", inp, &cfg.input_shape())?;
    expect_shape("max_pool2d output", out, &cfg.output_shape())?;
    expect_shape("max_pool2d argmax", argmax, &cfg.output_shape())?;
    let params = gpu.uniform("max_pool2d params", &cfg.params()?);
    let unused = placeholder(gpu)?;
    let a = affine.map_or([&unused; 4], |a| [a.gamma, a.beta, a.running_mean, a.running_var]);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, out),
        Bind::Tensor(3, argmax),
        Bind::Tensor(7, a[0]),
        Bind::Tensor(8, a[1]),
        Bind::Tensor(9, a[2]),
        Bind::Tensor(10, a[3]),
    ];
    let mut constants = cfg.constants().to_vec();
    if let Some(a) = affine {
        constants.extend([("AFFINE", 1.0), ("EPS", a.eps)]);
    }
    let d = gpu.dispatch_in(
        Precision::of(inp),
        "pool",
        "max_pool2d_forward",
        &constants,
        &binds,
        gpu.grid_1d(out.numel(), WG),
    )?;
    // The affine's four [C] vectors read besides.
    let stats = if affine.is_some() { 16 * cfg.c } else { 0 };
    Ok(vec![d.with_cost(
        (out.numel() * cfg.kernel.0 * cfg.kernel.1) as f64,
        (inp.dtype.bytes() * (inp.numel() + out.numel()) + 4 * out.numel() + stats) as f64,
    )])
}

pub fn max_pool2d_backward(
    gpu: &Gpu,
    cfg: &MaxPool2dConfig,
    argmax: &Tensor,
    dout: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    expect_shape("max_pool2d argmax", argmax, &cfg.output_shape())?;
    expect_shape("max_pool2d dout", dout, &cfg.output_shape())?;
    expect_shape("max_pool2d dinp", dinp, &cfg.input_shape())?;
    let params = gpu.uniform("max_pool2d params", &cfg.params()?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(4, dout), Bind::Tensor(5, argmax), Bind::Tensor(6, dinp)];
    let d = gpu.dispatch_in(
        Precision::of(dout),
        "pool",
        "max_pool2d_backward",
        &cfg.constants(),
        &binds,
        gpu.grid_1d(dinp.numel(), WG),
    )?;
    let el = dout.dtype.bytes();
    Ok(vec![d.with_cost(dinp.numel() as f64, (el * (dinp.numel() + dout.numel()) + 4 * dout.numel()) as f64)])
}

fn gap_params(shape: &[usize]) -> Result<Params> {
    ensure!(
        shape.len() == 4 && shape.iter().all(|&d| d > 0),
        "pooling: expected a non-empty [n, c, h, w] input, got {shape:?}"
    );
    Ok(Params {
        n: to_u32("batch", shape[0])?,
        c: to_u32("channels", shape[1])?,
        h: to_u32("h", shape[2])?,
        w: to_u32("w", shape[3])?,
    })
}

/// `[n, c, h, w]` → `[n, c]`.
pub fn global_avg_pool_forward(gpu: &Gpu, inp: &Tensor, out: &Tensor) -> Result<Vec<Dispatch>> {
    let p = gap_params(&inp.shape)?;
    expect_shape("global_avg_pool output", out, &inp.shape[..2])?;
    let params = gpu.uniform("global_avg_pool params", &p);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(2, out)];
    let d = gpu.dispatch_in(
        Precision::of(inp),
        "pool",
        "global_avg_pool_forward",
        &[("WG", WG as f64)],
        &binds,
        gpu.grid_1d(out.numel(), WG),
    )?;
    // One add per input element; the input read once, the means written once.
    let bytes = inp.dtype.bytes() * inp.numel() + out.dtype.bytes() * out.numel();
    Ok(vec![d.with_cost(inp.numel() as f64, bytes as f64)])
}

pub fn global_avg_pool_backward(gpu: &Gpu, dout: &Tensor, dinp: &Tensor) -> Result<Vec<Dispatch>> {
    let p = gap_params(&dinp.shape)?;
    expect_shape("global_avg_pool dout", dout, &dinp.shape[..2])?;
    let params = gpu.uniform("global_avg_pool params", &p);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(4, dout), Bind::Tensor(6, dinp)];
    let d = gpu.dispatch_in(
        Precision::of(dout),
        "pool",
        "global_avg_pool_backward",
        &[("WG", WG as f64)],
        &binds,
        gpu.grid_1d(dinp.numel(), WG),
    )?;
    // dout / (H W) spread over the input: dout read once, dinp written once.
    let bytes = dout.dtype.bytes() * dout.numel() + dinp.dtype.bytes() * dinp.numel();
    Ok(vec![d.with_cost(dinp.numel() as f64, bytes as f64)])
}
