//! conv2d — one op, three kernel families, each named by one word everywhere (types, functions,
//! docs, tests):
//!
//! - `Register` ([`RegisterTiles`], `register.rs`): `conv2d.wgsl`'s register blocks, no workgroup
//!   memory; the built-in choice of f32 plans and of every CPU adapter.
//! - `Workgroup` ([`WorkgroupTiles`], `workgroup.rs`): `conv2d_tiled.wgsl`'s workgroup-memory
//!   tiles, for discrete GPUs.
//! - `Coop` (`coop.rs`): `conv2d_coop.wgsl`'s cooperative matrices, for f16 plans on adapters that
//!   list them.
//!
//! The last two share one binding layout and MODE numbering (`conv2d_gemm.wgsl`; host side in
//! `gemm.rs`). A pass runs through one entry, [`conv2d_pass`] (the bias gradient, one kernel for
//! all, through [`conv2d_backward_bias`]); `tune.rs` chooses the kernel per layer and pass
//! ([`choose`]). The CPU oracle is `reference.rs`.

mod coop;
mod gemm;
mod layer;
pub mod reference;
mod register;
mod tune;
mod workgroup;

pub use layer::Conv2d;
pub use register::{RegisterTiles, plain_gemm, row3_gemm, row3_wgrad, weight_grad_splits};
pub use tune::{builtin, choose, choose_joint, conv2d_pass_chosen, tune_key};
pub use workgroup::WorkgroupTiles;

use anyhow::{Context, Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{expect_shape, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};
use gemm::GemmKernel;

/// A 2-D convolution over NCHW, as `torch.nn.Conv2d(c_in, c_out, (kh, kw), stride, padding,
/// dilation, groups, bias)` applied to an `[n, c_in, h, w]` input. With `groups` = g the channels
/// split into g groups: output channel co reads only the c_in/g input channels of its group
/// co / (c_out/g), and the weight is `[c_out, c_in/g, kh, kw]` (g = c_in = c_out: depthwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dConfig {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub pad: (usize, usize),
    pub dilation: (usize, usize),
    /// Channel groups (1 = an ordinary convolution); divides both c_in and c_out.
    pub groups: usize,
    pub bias: bool,
}

impl Conv2dConfig {
    /// A square kernel with equal stride and padding on both axes, no dilation.
    pub fn square(
        n: usize,
        c_in: usize,
        hw: (usize, usize),
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Self {
        Conv2dConfig {
            n,
            c_in,
            h: hw.0,
            w: hw.1,
            c_out,
            kh: k,
            kw: k,
            stride: (stride, stride),
            pad: (pad, pad),
            dilation: (1, 1),
            groups: 1,
            bias,
        }
    }

    /// The same convolution in `groups` channel groups.
    pub fn grouped(self, groups: usize) -> Self {
        Conv2dConfig { groups, ..self }
    }

    /// Input channels per group: each output channel's reduction runs over these.
    pub fn c_in_group(&self) -> usize {
        self.c_in / self.groups.max(1)
    }

    /// Output channels per group.
    pub fn c_out_group(&self) -> usize {
        self.c_out / self.groups.max(1)
    }

    fn out_dim(size: usize, pad: usize, dil: usize, k: usize, stride: usize) -> Option<usize> {
        let span = dil * (k - 1) + 1;
        (size + 2 * pad).checked_sub(span).map(|d| d / stride + 1)
    }

    pub fn out_h(&self) -> usize {
        Self::out_dim(self.h, self.pad.0, self.dilation.0, self.kh, self.stride.0).unwrap_or(0)
    }

    pub fn out_w(&self) -> usize {
        Self::out_dim(self.w, self.pad.1, self.dilation.1, self.kw, self.stride.1).unwrap_or(0)
    }

    pub fn input_shape(&self) -> [usize; 4] {
        [self.n, self.c_in, self.h, self.w]
    }

    pub fn weight_shape(&self) -> [usize; 4] {
        [self.c_out, self.c_in_group(), self.kh, self.kw]
    }

    pub fn output_shape(&self) -> [usize; 4] {
        [self.n, self.c_out, self.out_h(), self.out_w()]
    }

    pub fn validate(&self) -> Result<()> {
        let c = self;
        ensure!(c.n > 0 && c.c_in > 0 && c.c_out > 0 && c.h > 0 && c.w > 0, "conv2d: empty dimension in {c:?}");
        ensure!(c.kh > 0 && c.kw > 0, "conv2d: kernel size must be at least 1, got {}x{}", c.kh, c.kw);
        ensure!(c.stride.0 > 0 && c.stride.1 > 0, "conv2d: stride must be at least 1, got {:?}", c.stride);
        ensure!(c.dilation.0 > 0 && c.dilation.1 > 0, "conv2d: dilation must be at least 1, got {:?}", c.dilation);
        ensure!(
            c.groups > 0 && c.c_in.is_multiple_of(c.groups) && c.c_out.is_multiple_of(c.groups),
            "conv2d: groups = {} must divide both channel counts ({} in, {} out)",
            c.groups,
            c.c_in,
            c.c_out
        );
        ensure!(
            Self::out_dim(c.h, c.pad.0, c.dilation.0, c.kh, c.stride.0).is_some()
                && Self::out_dim(c.w, c.pad.1, c.dilation.1, c.kw, c.stride.1).is_some(),
            "conv2d: a {}x{} kernel (dilation {:?}) does not fit the {}x{} input padded by {:?}",
            c.kh,
            c.kw,
            c.dilation,
            c.h,
            c.w,
            c.pad
        );
        Ok(())
    }

    /// Multiply-adds of the forward pass: each output reads c_in/groups channels.
    pub fn macs(&self) -> usize {
        self.n * self.c_out * self.out_h() * self.out_w() * self.c_in_group() * self.kh * self.kw
    }

    fn params(&self, splits: usize, split_len: usize) -> Result<Params> {
        let c = self;
        Ok(Params {
            n: to_u32("batch", c.n)?,
            c_in: to_u32("c_in", c.c_in)?,
            h: to_u32("h", c.h)?,
            w: to_u32("w", c.w)?,
            c_out: to_u32("c_out", c.c_out)?,
            oh: to_u32("out_h", c.out_h())?,
            ow: to_u32("out_w", c.out_w())?,
            kh: to_u32("kh", c.kh)?,
            kw: to_u32("kw", c.kw)?,
            stride_h: to_u32("stride", c.stride.0)?,
            stride_w: to_u32("stride", c.stride.1)?,
            pad_h: to_u32("pad", c.pad.0)?,
            pad_w: to_u32("pad", c.pad.1)?,
            dil_h: to_u32("dilation", c.dilation.0)?,
            dil_w: to_u32("dilation", c.dilation.1)?,
            has_bias: u32::from(c.bias),
            splits: to_u32("splits", splits)?,
            split_len: to_u32("split_len", split_len)?,
            groups: to_u32("groups", c.groups)?,
            relu: 0,
            accumulate: 0,
            stats: 0,
            affine_in: 0,
            joint: [0; 6],
            _pad: [0; 3],
        })
    }
}

/// Mirrors `Params` in `conv2d_params.wgsl`, the one parameter block every conv2d kernel reads
/// (appended to each family's file).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    c_in: u32,
    h: u32,
    w: u32,
    c_out: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    stride_h: u32,
    stride_w: u32,
    pad_h: u32,
    pad_w: u32,
    dil_h: u32,
    dil_w: u32,
    has_bias: u32,
    splits: u32,
    split_len: u32,
    groups: u32,
    /// The forward's fused ReLU ([`ConvBuffers::relu`]): 1 applies it, 0 not.
    relu: u32,
    /// The input gradient's addend ([`ConvBuffers::dinp_addend`]): 1 adds it, 0 not.
    accumulate: u32,
    /// The forward's batch statistics ([`ConvBuffers::out_stats`], register family): the
    /// invocations per statistics block, 0 = none written.
    stats: u32,
    /// The batch norm applied as the input is loaded ([`ConvBuffers::input_affine`], workgroup
    /// family): 1 applies it, 0 not.
    affine_in: u32,
    /// The joint backward's workgroup numbering ([`joint_grid`]).
    joint: [u32; 6],
    /// The block padded to 16 bytes, as WGSL's uniform layout wants.
    _pad: [u32; 3],
}

impl Params {
    /// The forward's fused ReLU on or off.
    fn with_relu(self, relu: bool) -> Params {
        Params { relu: u32::from(relu), ..self }
    }

    /// The input gradient's addend on or off.
    fn with_accumulate(self, accumulate: bool) -> Params {
        Params { accumulate: u32::from(accumulate), ..self }
    }

    /// The forward's batch statistics on or off.
    /// `lanes`: the register kernel's invocations per statistics block (the tiles': 1), 0 = off.
    fn with_stats(self, lanes: u32) -> Params {
        Params { stats: lanes, ..self }
    }

    /// The batch norm applied as the input is loaded, on or off.
    fn with_affine_in(self, on: bool) -> Params {
        Params { affine_in: u32::from(on), ..self }
    }

    /// The joint backward's workgroup numbering.
    fn with_joint(self, joint: [u32; 6]) -> Params {
        Params { joint, ..self }
    }
}

/// Invocations per workgroup of `conv2d.wgsl`'s GEMMs and of the weight-gradient reduce (`WG`
/// override).
const WG: u32 = 64;

/// The three GEMMs of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ConvPass {
    Forward,
    BackwardInput,
    BackwardWeight,
}

/// Which kernel family and shape runs one pass of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// `conv2d.wgsl`'s register blocks (only the fields of the pass matter).
    Register(RegisterTiles),
    /// `conv2d_tiled.wgsl`'s workgroup-memory tiles.
    Workgroup(WorkgroupTiles),
    /// `conv2d_coop.wgsl`'s cooperative matrices of this square tile (f16 plans; all three passes).
    Coop(u32),
}

impl std::fmt::Display for ConvKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvKernel::Register(t) => write!(f, "register {}x{} / {}x{}", t.gemm_m, t.gemm_n, t.wgrad_ci, t.wgrad_n),
            ConvKernel::Workgroup(t) => write!(f, "workgroup {}x{}x{} / {}x{}", t.bm, t.bn, t.bk, t.tm, t.tn),
            ConvKernel::Coop(t) => write!(f, "coop {t}x{t}x{t}"),
        }
    }
}

/// The buffers the passes read and write: a layer gives all of them; a single pass needs only its
/// own ([`ConvBuffers::forward`], [`ConvBuffers::backward_input`], [`ConvBuffers::backward_weight`]),
/// and a pass missing one is an error naming it.
#[derive(Clone, Copy, Default)]
pub struct ConvBuffers<'a> {
    pub inp: Option<&'a Tensor>,
    pub weight: Option<&'a Tensor>,
    /// The bias (read by the forward), `None` for a layer without one.
    pub bias: Option<&'a Tensor>,
    pub out: Option<&'a Tensor>,
    pub dout: Option<&'a Tensor>,
    pub dinp: Option<&'a Tensor>,
    /// The weight gradient: f32 whatever the plan's precision.
    pub dweight: Option<&'a Tensor>,
    /// The forward stores relu(output): an evaluation pass's convolution with a batch norm and
    /// its ReLU folded in (`ops::bn_fold`). Every family takes it; the backward passes ignore it.
    pub relu: bool,
    /// The input gradient stores its own gradient plus this tensor (input-shaped, `dinp`'s type, a
    /// buffer of its own): the other reader's gradient of an activation two layers read, summed as
    /// the gradient is stored instead of by an addition after it. The own gradient is rounded to
    /// `dinp`'s type first, then the sum in f32 is rounded again: bit for bit what storing it apart
    /// and running `add::add_forward` gives. Every family takes it; the other passes ignore it.
    pub dinp_addend: Option<&'a Tensor>,
    /// The forward also writes the statistics of the values it stores, for a training batch norm
    /// that alone reads its output (`ops::batch_norm`, `partial_rows`), and the invocations each
    /// block of them merges ([`stats_lanes`]; the register family's): per block of
    /// [`stats_rows`] output pixels of the batch, in order, and per output channel, their mean
    /// and M2, f32 [blocks, c_out, 2]. The register and workgroup families; the other passes
    /// ignore it.
    pub out_stats: Option<(&'a Tensor, usize)>,
    /// The forward and the weight gradient read `inp` as the input of the training batch norm
    /// before the convolution and apply it with its ReLU as they load each value, bit for bit the
    /// value the batch norm would have stored: the batch norm then writes no output. The
    /// workgroup family only; the input gradient ignores it.
    pub input_affine: Option<crate::ops::batch_norm::BnAffine<'a>>,
}

impl<'a> ConvBuffers<'a> {
    /// What the forward reads and writes.
    pub fn forward(inp: &'a Tensor, weight: &'a Tensor, bias: Option<&'a Tensor>, out: &'a Tensor) -> Self {
        ConvBuffers { inp: Some(inp), weight: Some(weight), bias, out: Some(out), ..ConvBuffers::default() }
    }

    /// What the input gradient reads and writes.
    pub fn backward_input(dout: &'a Tensor, weight: &'a Tensor, dinp: &'a Tensor) -> Self {
        ConvBuffers { dout: Some(dout), weight: Some(weight), dinp: Some(dinp), ..ConvBuffers::default() }
    }

    /// What the weight gradient reads and writes.
    pub fn backward_weight(inp: &'a Tensor, dout: &'a Tensor, dweight: &'a Tensor) -> Self {
        ConvBuffers { inp: Some(inp), dout: Some(dout), dweight: Some(dweight), ..ConvBuffers::default() }
    }
}

/// The output pixels per block of a forward's batch statistics ([`ConvBuffers::out_stats`]) when
/// `kernel` runs it: the register GEMM's rows per invocation times the invocations merged, or a
/// workgroup tile's columns; `None` for the cooperative-matrix kernel, which has no such epilogue.
pub fn stats_rows(gpu: &Gpu, kernel: ConvKernel) -> Option<usize> {
    match kernel {
        ConvKernel::Register(t) => Some(t.gemm_m * stats_lanes(gpu)),
        ConvKernel::Workgroup(t) => Some(t.bn),
        ConvKernel::Coop(_) => None,
    }
}

/// The invocations whose GEMM rows make one block of a forward's batch statistics: a subgroup
/// where the register GEMMs broadcast over subgroups ([`Gpu::conv_lanes`]) of one fixed size (the
/// kernel checks it), else 1 — where the size may vary, most subgroups would fail the check and
/// the batch norms would read their inputs after all.
pub fn stats_lanes(gpu: &Gpu) -> usize {
    let (lo, hi) = (gpu.info.subgroup_min_size, gpu.info.subgroup_max_size);
    if gpu.conv_lanes && lo == hi { hi as usize } else { 1 }
}

/// A buffer `pass` needs, or an error naming it.
fn need<'a>(t: Option<&'a Tensor>, pass: ConvPass, what: &str) -> Result<&'a Tensor> {
    t.with_context(|| format!("conv2d {pass:?}: no {what} buffer given"))
}

/// The weight gradient's K splits for `kernel` (deterministic from the choice).
pub fn splits_for(gpu: &Gpu, cfg: &Conv2dConfig, kernel: ConvKernel) -> usize {
    let planned = match kernel {
        ConvKernel::Register(t) => weight_grad_splits(cfg, t, register::split_target(gpu)),
        ConvKernel::Workgroup(t) => workgroup::weight_grad_splits(cfg, t),
        ConvKernel::Coop(t) => coop::weight_grad_splits(gpu, cfg, t),
    };
    planned.max(min_weight_grad_splits(gpu, cfg, kernel))
}

/// A weight gradient's operands checked and its K (N*OH*OW) split: (splits, split length) —
/// `splits` as asked, raised to [`min_weight_grad_splits`] where the driver needs more, each split
/// a whole number of `k_step` pixels (the kernel's K step; 1 for the register kernels) so none
/// straddles a step, which may leave fewer splits than asked but none empty.
fn weight_grad_split(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    kernel: ConvKernel,
    (inp, dout, dweight): (&Tensor, &Tensor, &Tensor),
    splits: usize,
    k_step: usize,
) -> Result<(usize, usize)> {
    expect_shape("conv2d input", inp, &cfg.input_shape())?;
    expect_shape("conv2d dout", dout, &cfg.output_shape())?;
    expect_shape("conv2d dweight", dweight, &cfg.weight_shape())?;
    ensure!(splits >= 1, "conv2d: weight-gradient splits must be at least 1");
    let splits = splits.max(min_weight_grad_splits(gpu, cfg, kernel));
    let m = cfg.n * cfg.out_h() * cfg.out_w();
    let split_len = m.div_ceil(splits).next_multiple_of(k_step);
    Ok((m.div_ceil(split_len), split_len))
}

/// The fewest K splits of a weight gradient on `kernel` that keep each invocation's loops under
/// the driver's cap ([`Gpu::loop_cap`], llvmpipe's 65,535 iterations): a split of the register
/// kernels walks at most cap / 4 pixels (measured on lavapipe: 3 loop iterations a pixel where
/// the rows are one pixel wide, fewer on wider ones), of the workgroup tiles cap / 2 (18 iterations
/// per 16-deep K step), of the cooperative matrices cap / (their staging loops' iterations a pixel,
/// rounded up, plus 1: (1 + 4T²/lanes) per T-deep step, 6 for 8 x 8 tiles on 8 lanes). Past the cap
/// the sums came back partial, silently: a 64 -> 128 3x3 layer at batch 128 on 32x32 (131,072
/// pixels, one split) summed 61,681 of them. Every weight-gradient launch splits at least this many
/// ways, whatever its caller asks; 1 where the driver has no cap.
pub fn min_weight_grad_splits(gpu: &Gpu, cfg: &Conv2dConfig, kernel: ConvKernel) -> usize {
    let Some(cap) = gpu.loop_cap() else { return 1 };
    let per_pixel = match kernel {
        ConvKernel::Workgroup(_) => 2,
        ConvKernel::Register(_) => 4,
        ConvKernel::Coop(t) => {
            let (t, lanes) = (t as usize, gpu.info.subgroup_max_size.max(1) as usize);
            (1 + 4 * t * t / lanes).div_ceil(t) + 1
        }
    };
    (cfg.n * cfg.out_h() * cfg.out_w()).div_ceil(cap / per_pixel)
}

/// The dispatches of `pass` with `kernel`; the weight gradient split as [`splits_for`] says.
pub fn conv2d_pass(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    pass: ConvPass,
    kernel: ConvKernel,
    b: &ConvBuffers<'_>,
) -> Result<Vec<Dispatch>> {
    let splits = if pass == ConvPass::BackwardWeight { splits_for(gpu, cfg, kernel) } else { 1 };
    run_pass(gpu, cfg, pass, kernel, b, splits)
}

/// The weight gradient with its reduction over N·OH·OW split `splits` ways (1 = written directly,
/// more = partial slices and a fixed-order reduce): [`conv2d_pass`]'s `BackwardWeight` at a split
/// of the caller's choosing, for testing every split.
pub fn conv2d_backward_weight_split(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    kernel: ConvKernel,
    b: &ConvBuffers<'_>,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    run_pass(gpu, cfg, ConvPass::BackwardWeight, kernel, b, splits)
}

fn run_pass(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    pass: ConvPass,
    kernel: ConvKernel,
    b: &ConvBuffers<'_>,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    if let Some(a) = &b.input_affine
        && pass != ConvPass::BackwardInput
    {
        ensure!(
            matches!(kernel, ConvKernel::Workgroup(_)),
            "conv2d {pass:?}: only the workgroup tiles apply a batch norm as they load the input ({kernel})"
        );
        a.check("conv2d input", cfg.c_in)?;
    }
    let gemm = match kernel {
        ConvKernel::Register(t) => return run_register(gpu, cfg, pass, t, b, splits),
        ConvKernel::Workgroup(t) => GemmKernel::Workgroup(t),
        ConvKernel::Coop(t) => {
            ensure!(gpu.coop_tile == Some(t), "conv2d (coop): this adapter has no {t}x{t}x{t} f16 cooperative matrix");
            // The operand the pass reads first must be f16.
            let first = if pass == ConvPass::BackwardInput { b.dout } else { b.inp };
            GemmKernel::Coop(coop::tile(gpu, need(first, pass, "operand")?)?)
        }
    };
    match pass {
        ConvPass::Forward => gemm::forward(
            gpu,
            cfg,
            gemm,
            need(b.inp, pass, "input")?,
            need(b.weight, pass, "weight")?,
            b.bias,
            need(b.out, pass, "output")?,
            b.relu,
            b.out_stats.map(|(t, _)| t),
            b.input_affine,
        ),
        ConvPass::BackwardInput => gemm::backward_input(
            gpu,
            cfg,
            gemm,
            need(b.dout, pass, "output gradient")?,
            need(b.weight, pass, "weight")?,
            need(b.dinp, pass, "input gradient")?,
            b.dinp_addend,
        ),
        ConvPass::BackwardWeight => gemm::backward_weight(
            gpu,
            cfg,
            gemm,
            need(b.inp, pass, "input")?,
            need(b.dout, pass, "output gradient")?,
            need(b.dweight, pass, "weight gradient")?,
            splits,
            b.input_affine,
        ),
    }
}

/// The kernel that runs both gradients of a layer in one dispatch when its input gradient runs
/// `input` and its weight gradient `weight`: the register family's (the input gradient's GEMM block
/// and the weight gradient's), or the workgroup tiles' where both passes chose the same tile shape
/// (one pipeline holds one shape). `None` otherwise — different tile shapes, the cooperative
/// matrices, or two families: those run apart.
pub fn joint_kernel(input: ConvKernel, weight: ConvKernel) -> Option<ConvKernel> {
    match (input, weight) {
        (ConvKernel::Register(i), ConvKernel::Register(w)) => {
            Some(ConvKernel::Register(RegisterTiles { wgrad_ci: w.wgrad_ci, wgrad_n: w.wgrad_n, ..i }))
        }
        (ConvKernel::Workgroup(i), ConvKernel::Workgroup(w)) if i == w => Some(input),
        _ => None,
    }
}

/// A layer's input gradient and weight gradient in one dispatch of `kernel` ([`joint_kernel`]:
/// `conv2d_backward` of the register family, MODE 3 of the workgroup tiles), the weight gradient
/// split `splits` ways (then reduced): bit for bit the `BackwardInput` and `BackwardWeight` passes
/// of the same kernel, with half the dispatches and both GEMMs' workgroups filling the device at
/// once (on lavapipe 1.00-1.07x the two dispatches' time, benches/conv_backward.rs). The tiles
/// also apply a batch norm to the weight gradient's input ([`ConvBuffers::input_affine`]); the
/// register kernel does not.
pub fn conv2d_backward_joint(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    kernel: ConvKernel,
    b: &ConvBuffers<'_>,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    let (i, w) = (ConvPass::BackwardInput, ConvPass::BackwardWeight);
    let operands = (need(b.inp, w, "input")?, need(b.dout, i, "output gradient")?, need(b.weight, i, "weight")?);
    let dinp = need(b.dinp, i, "input gradient")?;
    let dweight = need(b.dweight, w, "weight gradient")?;
    match kernel {
        ConvKernel::Register(tiles) => {
            ensure!(
                b.input_affine.is_none(),
                "conv2d: only the workgroup tiles apply a batch norm as they load the input (the register \
                 kernels' joint backward was given one)"
            );
            register::backward_joint(gpu, cfg, tiles, operands, dinp, b.dinp_addend, dweight, splits)
        }
        ConvKernel::Workgroup(tiles) => {
            gemm::backward_joint(gpu, cfg, tiles, operands, (dinp, b.dinp_addend), dweight, splits, b.input_affine)
        }
        ConvKernel::Coop(_) => anyhow::bail!("conv2d: the cooperative-matrix kernels run the two gradients apart"),
    }
}

/// The grid of a joint backward whose input gradient alone runs on `input` and weight gradient on
/// `weight` (each pass's own grid), workgroups numbered along x then y, the two passes' interleaved
/// in proportion (`joint_slot` in conv2d_params.wgsl), and its numbering for the shader
/// (`Params::joint`): the input gradient's grid width and workgroup count, the weight gradient's
/// grid width, height and workgroup count, and log2 of the slices.
fn joint_grid(gpu: &Gpu, input: [u32; 3], weight: [u32; 3]) -> Result<([u32; 3], [u32; 6])> {
    let count = |g: [u32; 3]| to_u32("joint workgroups", g.iter().map(|&x| x as usize).product::<usize>());
    let (dn, wn) = (count(input)?, count(weight)?);
    // The shader adds the two counts in a u32.
    let total = to_u32("joint workgroups", dn as usize + wn as usize)?;
    let x = total.min(gpu.limits.max_compute_workgroups_per_dimension);
    let grid = [x, total.div_ceil(x), 1];
    Ok((grid, [input[0], dn, weight[0], weight[1], wn, joint_shift(total)]))
}

/// log2 of the slices a joint grid of `total` workgroups is cut into (`joint_slot`): the most, up
/// to 1024, with at least two workgroups a slice and slices times `total` below 2^32.
fn joint_shift(total: u32) -> u32 {
    let mut k = 0;
    while k < 10 && (2u64 << k) * 2 <= u64::from(total) && (2u64 << k) * u64::from(total) <= u64::from(u32::MAX) {
        k += 1;
    }
    k
}

/// [`run_pass`] on the register kernel (`conv2d.wgsl`).
fn run_register(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    pass: ConvPass,
    t: RegisterTiles,
    b: &ConvBuffers<'_>,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    match pass {
        ConvPass::Forward => register::forward(
            gpu,
            cfg,
            t,
            need(b.inp, pass, "input")?,
            need(b.weight, pass, "weight")?,
            b.bias,
            need(b.out, pass, "output")?,
            b.relu,
            b.out_stats,
        ),
        ConvPass::BackwardInput => register::backward_input(
            gpu,
            cfg,
            t,
            need(b.dout, pass, "output gradient")?,
            need(b.weight, pass, "weight")?,
            need(b.dinp, pass, "input gradient")?,
            b.dinp_addend,
        ),
        ConvPass::BackwardWeight => register::backward_weight(
            gpu,
            cfg,
            t,
            need(b.inp, pass, "input")?,
            need(b.dout, pass, "output gradient")?,
            need(b.dweight, pass, "weight gradient")?,
            splits,
        ),
    }
}

/// The forward's bias binding: the bias, checked, or `unused` for a layer without one.
fn forward_bias<'a>(cfg: &Conv2dConfig, bias: Option<&'a Tensor>, unused: &'a Tensor) -> Result<&'a Tensor> {
    match (cfg.bias, bias) {
        (true, Some(b)) => {
            expect_shape("conv2d bias", b, &[cfg.c_out])?;
            Ok(b)
        }
        (false, None) => Ok(unused),
        (want, _) => anyhow::bail!(
            "conv2d: configuration says bias={want} but a bias tensor was{} given",
            if want { " not" } else { "" }
        ),
    }
}

/// The input gradient's binding 1: the addend ([`ConvBuffers::dinp_addend`]), checked against
/// `dinp`, or `unused` (read by no invocation) without one.
fn dinp_addend<'a>(
    cfg: &Conv2dConfig,
    dinp: &Tensor,
    addend: Option<&'a Tensor>,
    unused: &'a Tensor,
) -> Result<&'a Tensor> {
    let Some(a) = addend else {
        return Ok(unused);
    };
    expect_shape("conv2d dinp addend", a, &cfg.input_shape())?;
    ensure!(
        a.dtype == dinp.dtype,
        "conv2d: the input gradient's addend {} holds {}, the input gradient {} holds {}",
        a.label,
        a.dtype.name(),
        dinp.label,
        dinp.dtype.name()
    );
    ensure!(
        a.buffer != dinp.buffer,
        "conv2d: the input gradient's addend {} is the input gradient's own buffer; it must be another",
        a.label
    );
    Ok(a)
}

/// The fixed-order sum of a split weight gradient's slices (every family writes them alike).
fn weight_grad_reduce(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    precision: Precision,
    params: &wgpu::Buffer,
    partial: &Tensor,
    dweight: &Tensor,
) -> Result<Dispatch> {
    let binds = [Bind::Uniform(0, params), Bind::Tensor(8, partial), Bind::Tensor(9, dweight)];
    let n = cfg.weight_shape().iter().product();
    let grid = gpu.grid_1d(n, WG);
    // One add per slice element; every slice read once, the gradient written once.
    let bytes = partial.dtype.bytes() * partial.numel() + dweight.dtype.bytes() * dweight.numel();
    Ok(gpu
        .dispatch_in(precision, "conv2d", "conv2d_backward_weight_reduce", &[("WG", WG as f64)], &binds, grid)?
        .with_cost(partial.numel() as f64, bytes as f64))
}

/// The bias gradient (one kernel whatever family runs the GEMMs): a workgroup per output channel.
pub fn conv2d_backward_bias(gpu: &Gpu, cfg: &Conv2dConfig, dout: &Tensor, dbias: &Tensor) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    ensure!(cfg.bias, "conv2d: backward_bias on a convolution without bias");
    expect_shape("conv2d dout", dout, &cfg.output_shape())?;
    expect_shape("conv2d dbias", dbias, &[cfg.c_out])?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(5, dout), Bind::Tensor(10, dbias)];
    let consts = [("OHW", (cfg.out_h() * cfg.out_w()) as f64)];
    let grid = [to_u32("c_out", cfg.c_out)?, 1, 1];
    // A sum over N x OH x OW per channel: dout read once, the bias gradient written once.
    let bytes = dout.dtype.bytes() * dout.numel() + dbias.dtype.bytes() * dbias.numel();
    let d = gpu.dispatch_in(Precision::of(dout), "conv2d", "conv2d_backward_bias", &consts, &binds, grid)?;
    Ok(vec![d.with_cost(dout.numel() as f64, bytes as f64)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `joint_slot`'s slices: as many as the three bounds allow (at most 1024, at least two
    /// workgroups a slice, slices times the total below 2^32, so the shader's products fit a u32),
    /// and one more would break one of them.
    #[test]
    fn a_joint_grid_has_the_most_slices_its_bounds_allow() {
        let fits = |k: u32, total: u32| {
            k <= 10
                && (k == 0 || (1u64 << k) * 2 <= u64::from(total))
                && (1u64 << k) * u64::from(total) <= u64::from(u32::MAX)
        };
        let totals = (1..5000).chain([65_535, 4_194_303, 4_194_304, 4_194_305, 1 << 30, u32::MAX - 1, u32::MAX]);
        for total in totals {
            let k = joint_shift(total);
            assert!(fits(k, total), "{total} workgroups: 2^{k} slices");
            assert!(!fits(k + 1, total), "{total} workgroups: 2^{k} slices where 2^{} fit", k + 1);
        }
        assert_eq!((joint_shift(3), joint_shift(4), joint_shift(2048), joint_shift(1 << 22)), (0, 1, 10, 9));
    }
}
