//! se_block — host side of `se_block.wgsl`; CPU oracle in `reference.rs` beside it.

mod layer;
pub mod reference;

pub use layer::SeBlock;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{expect_shape, placeholder, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

/// How the squeeze summarises a channel: its mean (the paper) or its maximum (an ablation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Squeeze {
    #[default]
    Avg,
    Max,
}

/// The gate of the excitation: sigmoid (the paper) or the ablations' tanh and ReLU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Excitation {
    #[default]
    Sigmoid,
    Tanh,
    Relu,
}

/// The squeeze and excitation operators of a block (default: the paper's avg + sigmoid).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SeVariant {
    pub squeeze: Squeeze,
    pub excitation: Excitation,
}

/// The SE block on `[n, c, h, w]` with `hidden` units between its two FC layers (`c // r` for
/// the paper's reduction r, or timm's rounded widths), FC biases optional.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeBlockConfig {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub hidden: usize,
    pub bias: bool,
    pub variant: SeVariant,
}

/// Floats of workgroup memory the one-dispatch kernels hold (`WMEM` in the shader).
pub const WORKGROUP_FLOATS: usize = 4096;

impl SeBlockConfig {
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn shape(&self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    pub fn fc1_shape(&self) -> [usize; 4] {
        [self.hidden(), self.c, 1, 1]
    }

    pub fn fc2_shape(&self) -> [usize; 4] {
        [self.c, self.hidden(), 1, 1]
    }

    /// Per-sample activations kept by the forward: squeeze z [C], hidden h [Cr], scale s [C].
    pub fn saved_shape(&self) -> [usize; 2] {
        [self.n, 2 * self.c + self.hidden()]
    }

    /// Per-sample gradients kept by the backward for the weight pass: da2 [C], da1 [Cr].
    pub fn dsaved_shape(&self) -> [usize; 2] {
        [self.n, self.c + self.hidden()]
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        ensure!(c.n > 0 && c.c > 0 && c.h > 0 && c.w > 0, "se_block: empty dimension in {c:?}");
        ensure!(c.hidden >= 1, "se_block: no hidden units in {c:?}");
        ensure!(
            c.c + c.hidden() <= WORKGROUP_FLOATS,
            "se_block: {} channels + {} hidden exceed the kernel's {WORKGROUP_FLOATS} floats of workgroup memory",
            c.c,
            c.hidden()
        );
        Ok(())
    }

    fn params(&self) -> Result<Params> {
        Ok(Params {
            n: to_u32("batch", self.n)?,
            c: to_u32("channels", self.c)?,
            cr: to_u32("hidden", self.hidden())?,
            hw: to_u32("h*w", self.h * self.w)?,
            has_bias: u32::from(self.bias),
            squeeze: self.variant.squeeze as u32,
            excitation: self.variant.excitation as u32,
            _pad: 0,
        })
    }
}

/// Mirrors `Params` in se_block.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    c: u32,
    cr: u32,
    hw: u32,
    has_bias: u32,
    squeeze: u32,
    excitation: u32,
    _pad: u32,
}

const WG: u32 = 256;

/// The FC weights and optional biases, shapes as PyTorch's 1x1 convolutions.
pub struct SeWeights<'a> {
    pub w1: &'a Tensor,
    pub b1: Option<&'a Tensor>,
    pub w2: &'a Tensor,
    pub b2: Option<&'a Tensor>,
}

fn biases<'a>(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    b1: Option<&'a Tensor>,
    b2: Option<&'a Tensor>,
) -> Result<(Option<Tensor>, [Option<&'a Tensor>; 2])> {
    match (cfg.bias, b1, b2) {
        (true, Some(b1), Some(b2)) => {
            expect_shape("se_block fc1 bias", b1, &[cfg.hidden()])?;
            expect_shape("se_block fc2 bias", b2, &[cfg.c])?;
            Ok((None, [Some(b1), Some(b2)]))
        }
        (false, None, None) => Ok((Some(placeholder(gpu)?), [None, None])),
        _ => anyhow::bail!("se_block: configuration says bias={} but the biases given do not match", cfg.bias),
    }
}

/// One dispatch: squeeze, fc1+ReLU, fc2+sigmoid, scale. Fills `saved` for the backward.
pub fn se_block_forward(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    inp: &Tensor,
    weights: &SeWeights<'_>,
    out: &Tensor,
    saved: &Tensor,
) -> Result<Vec<Dispatch>> {
    forward(gpu, cfg, inp, None, weights, out, saved, None)
}

/// [`se_block_forward`] with the residual addition of `res` and the ReLU after it fused in, one
/// dispatch: out = relu(x * s + res).
pub fn se_block_forward_add_relu(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    inp: &Tensor,
    res: &Tensor,
    weights: &SeWeights<'_>,
    out: &Tensor,
    saved: &Tensor,
) -> Result<Vec<Dispatch>> {
    forward(gpu, cfg, inp, Some(res), weights, out, saved, None)
}

/// A batch norm before the block that the block applies as it loads its input (se_block.wgsl,
/// AFFINE_IN): `inp` is then the batch norm's input.
pub use crate::ops::batch_norm::BnAffine;

/// `affine` for an SE block of `cfg`: a mean squeeze, and the batch norm's tensors of its channels.
fn check_affine(affine: &BnAffine<'_>, cfg: &SeBlockConfig) -> Result<()> {
    ensure!(cfg.variant.squeeze == Squeeze::Avg, "se_block: only a mean squeeze applies a batch norm on load");
    affine.check("se_block", cfg.c)
}

/// The AFFINE_IN bindings (21–23), placeholders without one.
fn affine_binds<'a>(affine: Option<&BnAffine<'a>>, unused: &'a Tensor) -> [Bind<'a>; 3] {
    let [s, g, b] = affine.map_or([unused; 3], |a| [a.stats, a.gamma, a.beta]);
    [Bind::Tensor(21, s), Bind::Tensor(22, g), Bind::Tensor(23, b)]
}

/// [`se_block_forward_add_relu`] of a batch norm's output, that batch norm applied as the block
/// loads `inp`, its input (`affine`).
#[allow(clippy::too_many_arguments)]
pub fn se_block_forward_add_relu_affine(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    inp: &Tensor,
    res: &Tensor,
    weights: &SeWeights<'_>,
    out: &Tensor,
    saved: &Tensor,
    affine: &BnAffine<'_>,
) -> Result<Vec<Dispatch>> {
    check_affine(affine, cfg)?;
    forward(gpu, cfg, inp, Some(res), weights, out, saved, Some(affine))
}

/// A max squeeze (the ablation) a workgroup per sample: each subgroup scans whole channel planes,
/// about ceil(C / subgroups) * (H*W + 1) + C*H*W / 256 loop iterations an invocation (32
/// subgroups of lavapipe's 8 lanes). Where the driver caps one invocation's loops
/// ([`Gpu::loop_cap`]: llvmpipe) and that passes 90 % of the cap — from 513 channels at 56 x 56 on
/// 8 lanes (at 1,024 lavapipe returned the wrong maximum for 384 of them) — an error saying so,
/// not a partial result.
fn check_max_squeeze_loops(gpu: &Gpu, cfg: &SeBlockConfig) -> Result<()> {
    let Some(cap) = gpu.loop_cap().filter(|_| cfg.variant.squeeze == Squeeze::Max) else { return Ok(()) };
    let hw = cfg.h * cfg.w;
    let subgroups = (WG / gpu.info.subgroup_max_size.clamp(1, WG)) as usize;
    let loops = cfg.c.div_ceil(subgroups) * (hw + 1) + cfg.c * hw / 256;
    ensure!(
        loops <= cap / 10 * 9,
        "se_block: a max squeeze of {} channels of {}x{} would loop {loops} times in one invocation, past what \
         this driver runs ({cap} iterations, llvmpipe); use --squeeze avg",
        cfg.c,
        cfg.h,
        cfg.w
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn forward(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    inp: &Tensor,
    res: Option<&Tensor>,
    weights: &SeWeights<'_>,
    out: &Tensor,
    saved: &Tensor,
    affine: Option<&BnAffine<'_>>,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    if let Some(res) = res {
        expect_shape("se_block shortcut", res, &cfg.shape())?;
    }
    expect_shape("se_block input", inp, &cfg.shape())?;
    expect_shape("se_block output", out, &cfg.shape())?;
    expect_shape("se_block fc1 weight", weights.w1, &cfg.fc1_shape())?;
    expect_shape("se_block fc2 weight", weights.w2, &cfg.fc2_shape())?;
    expect_shape("se_block saved activations", saved, &cfg.saved_shape())?;
    let (unused, [b1, b2]) = biases(gpu, cfg, weights.b1, weights.b2)?;
    let b1 = b1.or(unused.as_ref()).ok_or_else(|| anyhow::anyhow!("se_block: no fc1 bias"))?;
    let b2 = b2.or(unused.as_ref()).ok_or_else(|| anyhow::anyhow!("se_block: no fc2 bias"))?;
    let params = gpu.uniform("se_block params", &cfg.params()?);
    if split(gpu, cfg) {
        return forward_split(gpu, cfg, &params, [inp, weights.w1, b1, weights.w2, b2, out, saved], res, affine);
    }
    check_max_squeeze_loops(gpu, cfg)?;
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, weights.w1),
        Bind::Tensor(3, b1),
        Bind::Tensor(4, weights.w2),
        Bind::Tensor(5, b2),
        Bind::Tensor(6, out),
        Bind::Tensor(7, saved),
    ];
    binds.extend(res.map(|r| Bind::Tensor(17, r)));
    let unused_affine = placeholder(gpu)?;
    binds.extend(affine_binds(affine, &unused_affine));
    let entry = if res.is_some() { "se_block_forward_add_relu" } else { "se_block_forward" };
    let numel = (cfg.n * cfg.c * cfg.h * cfg.w) as f64;
    let fc = (cfg.n * cfg.c * cfg.hidden()) as f64;
    let grid = [to_u32("batch", cfg.n)?, 1, 1];
    let consts = [("WG", WG as f64), ("AFFINE_IN", 1.0)];
    let consts = if affine.is_some() { &consts[..] } else { &consts[..1] };
    let d = gpu.dispatch_in(Precision::of(inp), "se_block", entry, consts, &binds, grid)?;
    // x read twice (squeeze, scale) and out written; fused, the shortcut read besides, and an add
    // and a max more per element.
    let (tensors, ops) = if res.is_some() { (4.0, 4.0) } else { (3.0, 2.0) };
    Ok(vec![d.with_cost(ops * numel + 4.0 * fc, tensors * inp.dtype.bytes() as f64 * numel)])
}

/// Whether `cfg` runs the split form on `gpu` (`--se-split`, se_block.wgsl's split kernels): the
/// adapter's choice, for a mean squeeze (the max squeeze's gradient goes to one pixel per plane).
fn split(gpu: &Gpu, cfg: &SeBlockConfig) -> bool {
    gpu.se_split && cfg.variant.squeeze == Squeeze::Avg
}

/// The split reductions' constants: the workgroup size and the channels per workgroup (a subgroup
/// each at the adapter's smallest subgroup size, or an invocation each without subgroups).
fn split_constants(gpu: &Gpu) -> [(&'static str, f64); 2] {
    let lanes = if gpu.subgroups { gpu.info.subgroup_min_size.clamp(1, WG) } else { 1 };
    [("WG", WG as f64), ("SPLIT_CHANNELS", (WG / lanes) as f64)]
}

/// The split passes' grids: the reductions' channel blocks by samples, and the elementwise
/// passes' workgroups along each sample's C * H * W values (they stride over more) by samples.
fn split_grids(gpu: &Gpu, cfg: &SeBlockConfig) -> Result<([u32; 3], [u32; 3])> {
    let per = split_constants(gpu)[1].1 as usize;
    let n = to_u32("batch", cfg.n)?;
    let channels = to_u32("channel blocks", cfg.c.div_ceil(per))?;
    let max = gpu.limits.max_compute_workgroups_per_dimension as usize;
    let values = to_u32("value blocks", (cfg.c * cfg.h * cfg.w).div_ceil(WG as usize).min(max))?;
    Ok(([channels, n, 1], [values, n, 1]))
}

/// The forward as three dispatches: the squeeze spread over channel blocks, the FCs a workgroup
/// per sample, the scale (and the fused addition and ReLU) spread over the values. `t`: inp, w1,
/// b1, w2, b2, out, saved (the biases placeholders without them).
fn forward_split(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    params: &wgpu::Buffer,
    [inp, w1, b1, w2, b2, out, saved]: [&Tensor; 7],
    res: Option<&Tensor>,
    affine: Option<&BnAffine<'_>>,
) -> Result<Vec<Dispatch>> {
    let precision = Precision::of(inp);
    let (reduce, values) = split_grids(gpu, cfg)?;
    let unused_affine = placeholder(gpu)?;
    let affine_in = || affine_binds(affine, &unused_affine);
    let mut consts = split_constants(gpu).to_vec();
    consts.extend(affine.map(|_| ("AFFINE_IN", 1.0)));
    let numel = (cfg.n * cfg.c * cfg.h * cfg.w) as f64;
    let act = inp.dtype.bytes() as f64;
    let z = 4.0 * (cfg.n * cfg.c) as f64;
    let mut binds = vec![Bind::Uniform(0, params), Bind::Tensor(1, inp), Bind::Tensor(7, saved)];
    binds.extend(affine_in());
    let squeeze = gpu.dispatch_in(precision, "se_block", "se_block_forward_squeeze", &consts, &binds, reduce)?;
    let squeeze = squeeze.with_cost(numel, act * numel + z);
    let binds = [
        Bind::Uniform(0, params),
        Bind::Tensor(2, w1),
        Bind::Tensor(3, b1),
        Bind::Tensor(4, w2),
        Bind::Tensor(5, b2),
        Bind::Tensor(7, saved),
    ];
    let excite =
        gpu.dispatch_in(precision, "se_block", "se_block_forward_excite", &consts[..2], &binds, [reduce[1], 1, 1])?;
    let fc = (cfg.n * cfg.c * cfg.hidden()) as f64;
    let excite = excite.with_cost(4.0 * fc, 4.0 * (w1.numel() + w2.numel() + saved.numel()) as f64);
    let mut binds = vec![Bind::Uniform(0, params), Bind::Tensor(1, inp), Bind::Tensor(6, out), Bind::Tensor(7, saved)];
    let (entry, consts, tensors, ops) = match res {
        Some(r) => {
            binds.push(Bind::Tensor(17, r));
            binds.extend(affine_in());
            ("se_block_forward_scale_add_relu", &consts[..], 3.0, 3.0)
        }
        None => ("se_block_forward_scale", &consts[..2], 2.0, 1.0),
    };
    let scale = gpu.dispatch_in(precision, "se_block", entry, consts, &binds, values)?;
    let scale = scale.with_cost(ops * numel, tensors * act * numel + z);
    Ok(vec![squeeze, excite, scale])
}

/// The SE gradients: `dinp`, and `dw1`, `dw2` (and `db1`, `db2` when the block has biases).
pub struct SeGrads<'a> {
    pub dinp: &'a Tensor,
    pub dw1: &'a Tensor,
    pub db1: Option<&'a Tensor>,
    pub dw2: &'a Tensor,
    pub db2: Option<&'a Tensor>,
}

/// Two dispatches: per-sample input gradient (keeping da2, da1 in `dsaved`), then the weight
/// gradients summed over the batch.
pub fn se_block_backward(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    inp: &Tensor,
    weights: &SeWeights<'_>,
    saved: &Tensor,
    dout: &Tensor,
    dsaved: &Tensor,
    grads: &SeGrads<'_>,
) -> Result<Vec<Dispatch>> {
    backward(gpu, cfg, inp, weights, saved, dout, None, dsaved, grads)
}

/// The fused residual addition and ReLU's side of [`se_block_backward_add_relu`]: the forward's
/// output (the ReLU's, whose sign is the mask) and the buffer the shortcut's gradient goes to.
#[derive(Clone, Copy)]
pub struct AddReluGrads<'a> {
    pub out: &'a Tensor,
    pub dres: &'a Tensor,
    /// `--fuse on`, a batch norm alone before the block: the input gradient is left to it
    /// (se_block.wgsl, DEFER), and s and dz per sample go here, [n, 2, C] f32; `dinp` is not
    /// written (and may be any buffer).
    pub se_grad: Option<&'a Tensor>,
    /// The batch norm before the block, applied as `inp` (its input) is loaded (AFFINE_IN).
    pub input_affine: Option<BnAffine<'a>>,
    /// With `se_grad`: the batch norm before the block sums its weight gradients
    /// ([`SeWeightGradIo`], batch_norm.wgsl's SE_WGRAD): no weight-gradient dispatch here.
    pub weight_grad_elsewhere: bool,
}

/// The backward of [`se_block_forward_add_relu`], two dispatches as [`se_block_backward`]: `dout`
/// is the ReLU's output gradient; the per-sample pass masks it with `e.out` where it reads it,
/// writes it as the shortcut's gradient `e.dres`, and goes on as the plain block's with it.
#[allow(clippy::too_many_arguments)]
pub fn se_block_backward_add_relu(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    inp: &Tensor,
    weights: &SeWeights<'_>,
    saved: &Tensor,
    dout: &Tensor,
    e: AddReluGrads<'_>,
    dsaved: &Tensor,
    grads: &SeGrads<'_>,
) -> Result<Vec<Dispatch>> {
    backward(gpu, cfg, inp, weights, saved, dout, Some(e), dsaved, grads)
}

#[allow(clippy::too_many_arguments)]
fn backward(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    inp: &Tensor,
    weights: &SeWeights<'_>,
    saved: &Tensor,
    dout: &Tensor,
    epilogue: Option<AddReluGrads<'_>>,
    dsaved: &Tensor,
    grads: &SeGrads<'_>,
) -> Result<Vec<Dispatch>> {
    check_backward(cfg, [inp, saved, dout, dsaved], weights, epilogue, grads)?;
    let (unused, [db1, db2]) = biases(gpu, cfg, grads.db1, grads.db2)?;
    let db1 = db1.or(unused.as_ref()).ok_or_else(|| anyhow::anyhow!("se_block: no fc1 bias grad"))?;
    let db2 = db2.or(unused.as_ref()).ok_or_else(|| anyhow::anyhow!("se_block: no fc2 bias grad"))?;
    let params = gpu.uniform("se_block params", &cfg.params()?);
    let precision = Precision::of(dout);
    let t = [inp, weights.w1, weights.w2, saved, dout, dsaved, grads.dinp];
    let passes = if split(gpu, cfg) {
        backward_split(gpu, cfg, &params, t, epilogue)?
    } else {
        vec![backward_input(gpu, cfg, &params, t, epilogue)?]
    };
    if epilogue.is_some_and(|e| e.weight_grad_elsewhere) {
        return Ok(passes);
    }
    let io = SeWeightGradIo { saved, dsaved, dw1: grads.dw1, db1: grads.db1, dw2: grads.dw2, db2: grads.db2 };
    let weight = weight_pass(gpu, cfg, (&params, precision), io, [db1, db2])?;
    Ok(passes.into_iter().chain([weight]).collect())
}

/// The per-sample input-gradient pass of the one-pass form. `t`: inp, w1, w2, saved, dout, dsaved,
/// dinp.
fn backward_input(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    params: &wgpu::Buffer,
    [inp, w1, w2, saved, dout, dsaved, dinp]: [&Tensor; 7],
    epilogue: Option<AddReluGrads<'_>>,
) -> Result<Dispatch> {
    let defer = epilogue.and_then(|e| e.se_grad);
    let affine = epilogue.and_then(|e| e.input_affine);
    let mut consts = vec![("WG", WG as f64)];
    consts.extend(defer.map(|_| ("DEFER", 1.0)));
    consts.extend(affine.map(|_| ("AFFINE_IN", 1.0)));
    let mut binds = vec![
        Bind::Uniform(0, params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, w1),
        Bind::Tensor(4, w2),
        Bind::Tensor(8, saved),
        Bind::Tensor(9, dout),
        Bind::Tensor(10, dinp),
        Bind::Tensor(11, dsaved),
    ];
    // Placeholders: one for the written binding, one for the read ones (never both in a dispatch).
    let (unused, unused_ro) = (placeholder(gpu)?, placeholder(gpu)?);
    if let Some(e) = epilogue {
        binds.extend([Bind::Tensor(18, e.out), Bind::Tensor(19, e.dres), Bind::Tensor(20, defer.unwrap_or(&unused))]);
        binds.extend(affine_binds(affine.as_ref(), &unused_ro));
    }
    let precision = Precision::of(dout);
    let grid = [to_u32("batch", cfg.n)?, 1, 1];
    let entry = if epilogue.is_some() { "se_block_backward_input_add_relu" } else { "se_block_backward_input" };
    let input = gpu.dispatch_in(precision, "se_block", entry, &consts, &binds, grid)?;
    // x and dout read and dinp written once each, the two weights and the saved activations read,
    // the saved gradients written; per element a product for the scale's gradient and one for
    // dinp, and the two small matrix-vector products back through FC2 and FC1. Fused, the ReLU's
    // output read and the shortcut's gradient written besides, and a comparison per element.
    let numel = inp.numel();
    let small = 4 * (w1.numel() + w2.numel() + saved.numel() + dsaved.numel());
    let fused = if epilogue.is_some() { 2 * dout.dtype.bytes() } else { 0 };
    // Deferred, dx is not written; s and dz are.
    let (dx, deferred) = match defer {
        Some(t) => (0, 4 * t.numel()),
        None => (dinp.dtype.bytes(), 0),
    };
    let input_bytes = (inp.dtype.bytes() + dout.dtype.bytes() + dx + fused) * numel + small + deferred;
    let fc = (cfg.n * cfg.c * cfg.hidden()) as f64;
    let per_element = if epilogue.is_some() { 5.0 } else { 4.0 };
    Ok(input.with_cost(per_element * numel as f64 + 4.0 * fc, input_bytes as f64))
}

/// The input gradient of the split form: ds spread over channel blocks (with the fused block's
/// mask and shortcut gradient), the FCs' backward a workgroup per sample (s and dz into the
/// deferred buffer, or a plan-time one of the same shape), then, unless deferred, dx spread over
/// the values. `t` as [`backward_input`]'s.
fn backward_split(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    params: &wgpu::Buffer,
    [inp, w1, w2, saved, dout, dsaved, dinp]: [&Tensor; 7],
    epilogue: Option<AddReluGrads<'_>>,
) -> Result<Vec<Dispatch>> {
    let precision = Precision::of(dout);
    let (reduce, values) = split_grids(gpu, cfg)?;
    let affine = epilogue.and_then(|e| e.input_affine);
    let mut consts = split_constants(gpu).to_vec();
    let numel = inp.numel() as f64;
    let act = dout.dtype.bytes() as f64;
    let per_sample = 4.0 * (cfg.n * (cfg.c + cfg.hidden())) as f64;
    let unused = placeholder(gpu)?;
    let mut binds = vec![
        Bind::Uniform(0, params),
        Bind::Tensor(1, inp),
        Bind::Tensor(8, saved),
        Bind::Tensor(9, dout),
        Bind::Tensor(11, dsaved),
    ];
    let (entry, tensors, ops) = match epilogue {
        Some(e) => {
            binds.extend([Bind::Tensor(18, e.out), Bind::Tensor(19, e.dres)]);
            binds.extend(affine_binds(affine.as_ref(), &unused));
            consts.extend(affine.map(|_| ("AFFINE_IN", 1.0)));
            ("se_block_backward_ds_add_relu", 4.0, 3.0)
        }
        None => ("se_block_backward_ds", 2.0, 2.0),
    };
    let ds = gpu.dispatch_in(precision, "se_block", entry, &consts, &binds, reduce)?;
    let ds = ds.with_cost(ops * numel, tensors * act * numel + per_sample);
    let own;
    let se_grad = match epilogue.and_then(|e| e.se_grad) {
        Some(t) => t,
        None => {
            own = Tensor::zeros(gpu, "se_block s and dz", &[cfg.n, 2, cfg.c])?;
            &own
        }
    };
    let binds = [
        Bind::Uniform(0, params),
        Bind::Tensor(2, w1),
        Bind::Tensor(4, w2),
        Bind::Tensor(8, saved),
        Bind::Tensor(11, dsaved),
        Bind::Tensor(20, se_grad),
    ];
    let fc = gpu.dispatch_in(precision, "se_block", "se_block_backward_fc", &consts[..2], &binds, [reduce[1], 1, 1])?;
    let weights = 4.0 * (w1.numel() + w2.numel()) as f64;
    let fc = fc.with_cost(
        4.0 * (cfg.n * cfg.c * cfg.hidden()) as f64,
        weights + 2.0 * per_sample + 4.0 * se_grad.numel() as f64,
    );
    if epilogue.is_some_and(|e| e.se_grad.is_some()) {
        return Ok(vec![ds, fc]);
    }
    let mut binds =
        vec![Bind::Uniform(0, params), Bind::Tensor(9, dout), Bind::Tensor(10, dinp), Bind::Tensor(20, se_grad)];
    let (entry, tensors, ops) = match epilogue {
        Some(e) => {
            binds.push(Bind::Tensor(18, e.out));
            ("se_block_backward_dx_add_relu", 3.0, 3.0)
        }
        None => ("se_block_backward_dx", 2.0, 2.0),
    };
    let dx = gpu.dispatch_in(precision, "se_block", entry, &consts[..2], &binds, values)?;
    let dx = dx.with_cost(ops * numel, tensors * act * numel + 4.0 * se_grad.numel() as f64);
    Ok(vec![ds, fc, dx])
}

/// The shapes a backward pass needs (`[inp, saved, dout, dsaved]`), and its epilogue's.
fn check_backward(
    cfg: &SeBlockConfig,
    [inp, saved, dout, dsaved]: [&Tensor; 4],
    weights: &SeWeights<'_>,
    epilogue: Option<AddReluGrads<'_>>,
    grads: &SeGrads<'_>,
) -> Result<()> {
    cfg.validate()?;
    let defer = epilogue.and_then(|e| e.se_grad);
    let affine = epilogue.and_then(|e| e.input_affine);
    if let Some(a) = &affine {
        check_affine(a, cfg)?;
    }
    if let Some(e) = epilogue {
        expect_shape("se_block output", e.out, &cfg.shape())?;
        expect_shape("se_block shortcut grad", e.dres, &cfg.shape())?;
    }
    ensure!(
        epilogue.is_none_or(|e| !e.weight_grad_elsewhere || e.se_grad.is_some()),
        "se_block: only a block leaving dx to the layer before leaves it the weight gradients"
    );
    if let Some(t) = defer {
        expect_shape("se_block deferred gradient (s, dz)", t, &[cfg.n, 2, cfg.c])?;
        ensure!(cfg.variant.squeeze == Squeeze::Avg, "se_block: only a mean squeeze leaves dx to the layer before");
    } else {
        expect_shape("se_block dinp", grads.dinp, &cfg.shape())?;
    }
    expect_shape("se_block input", inp, &cfg.shape())?;
    expect_shape("se_block dout", dout, &cfg.shape())?;
    expect_shape("se_block fc1 weight", weights.w1, &cfg.fc1_shape())?;
    expect_shape("se_block fc2 weight", weights.w2, &cfg.fc2_shape())?;
    expect_shape("se_block fc1 weight grad", grads.dw1, &cfg.fc1_shape())?;
    expect_shape("se_block fc2 weight grad", grads.dw2, &cfg.fc2_shape())?;
    expect_shape("se_block saved activations", saved, &cfg.saved_shape())?;
    expect_shape("se_block saved gradients", dsaved, &cfg.dsaved_shape())?;
    Ok(())
}

/// What an SE block's weight-gradient pass reads and writes (se_weight_grad.wgsl): its saved
/// forward values [n, 2C + hidden] and per-sample gradients [n, C + hidden], and its weight (and
/// bias) gradients. Its own dispatch (`se_block_backward_weight`) or, left to it, the batch
/// norm before the block (`BnFused::se_weight`) runs it.
#[derive(Clone, Copy)]
pub struct SeWeightGradIo<'a> {
    pub saved: &'a Tensor,
    pub dsaved: &'a Tensor,
    pub dw1: &'a Tensor,
    pub db1: Option<&'a Tensor>,
    pub dw2: &'a Tensor,
    pub db2: Option<&'a Tensor>,
}

impl SeWeightGradIo<'_> {
    /// The shapes for a block of `c` channels and `hidden` units at batch `n`, biases where `bias`.
    pub fn check(&self, n: usize, c: usize, hidden: usize, bias: bool) -> Result<()> {
        expect_shape("se_block saved activations", self.saved, &[n, 2 * c + hidden])?;
        expect_shape("se_block saved gradients", self.dsaved, &[n, c + hidden])?;
        expect_shape("se_block fc1 weight grad", self.dw1, &[hidden, c, 1, 1])?;
        expect_shape("se_block fc2 weight grad", self.dw2, &[c, hidden, 1, 1])?;
        ensure!(
            self.db1.is_some() == bias && self.db2.is_some() == bias,
            "se_block: bias gradients given ({}, {}) for a block with biases {bias}",
            self.db1.is_some(),
            self.db2.is_some()
        );
        for (what, b, len) in [("fc1 bias grad", self.db1, hidden), ("fc2 bias grad", self.db2, c)] {
            if let Some(b) = b {
                expect_shape(&format!("se_block {what}"), b, &[len])?;
            }
        }
        Ok(())
    }

    /// (flops, bytes) at batch `n`: the saved activations and gradients read once, each weight
    /// (and bias) gradient written once; one multiply-add per weight per sample.
    pub fn cost(&self, n: usize) -> (f64, f64) {
        let bias = self.db1.map_or(0, Tensor::numel) + self.db2.map_or(0, Tensor::numel);
        let grad_numel = self.dw1.numel() + self.dw2.numel() + bias;
        let bytes = 4 * (self.saved.numel() + self.dsaved.numel() + grad_numel);
        (4.0 * (n * self.dw2.numel()) as f64, bytes as f64)
    }
}

/// The weight-gradient pass as its own dispatch: the saved activations and gradients summed over
/// the batch.
fn weight_pass(
    gpu: &Gpu,
    cfg: &SeBlockConfig,
    (params, precision): (&wgpu::Buffer, Precision),
    io: SeWeightGradIo<'_>,
    [db1, db2]: [&Tensor; 2],
) -> Result<Dispatch> {
    let binds = [
        Bind::Uniform(0, params),
        Bind::Tensor(8, io.saved),
        Bind::Tensor(12, io.dsaved),
        Bind::Tensor(13, io.dw1),
        Bind::Tensor(14, db1),
        Bind::Tensor(15, io.dw2),
        Bind::Tensor(16, db2),
    ];
    // x: channels; y: blocks of 4 hidden units, fc1's then fc2's.
    let grid = [to_u32("channels", cfg.c.div_ceil(WG as usize))?, to_u32("hidden", 2 * cfg.hidden().div_ceil(4))?, 1];
    let weight =
        gpu.dispatch_in(precision, "se_block", "se_block_backward_weight", &[("WG", WG as f64)], &binds, grid)?;
    let (flops, bytes) = io.cost(cfg.n);
    Ok(weight.with_cost(flops, bytes))
}
