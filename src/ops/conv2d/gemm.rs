//! The host side of `conv2d_gemm.wgsl`, the binding layout and MODE numbering (0 forward, 1 input
//! gradient, 2 weight gradient) that the `Workgroup` family (`conv2d_tiled.wgsl`) and the `Coop`
//! family (`conv2d_coop.wgsl`) share: each pass is written once here for both, and each family's
//! file says only how one launch of its kernel is shaped ([`GemmKernel::dispatch`]).

use anyhow::{Result, ensure};

use super::workgroup::WorkgroupTiles;
use super::{Conv2dConfig, dinp_addend, forward_bias, weight_grad_reduce};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};
use crate::ops::batch_norm::BnAffine;
use crate::ops::{el, expect_shape, placeholder, placeholder_like};

/// A kernel on the shared GEMM layout.
#[derive(Clone, Copy, Debug)]
pub(super) enum GemmKernel {
    Workgroup(WorkgroupTiles),
    /// The adapter's square f16 cooperative-matrix tile T (checked by `coop::tile`).
    Coop(usize),
}

impl GemmKernel {
    /// The family and shape, as the plan names it.
    fn kernel(self) -> super::ConvKernel {
        match self {
            GemmKernel::Workgroup(t) => super::ConvKernel::Workgroup(t),
            GemmKernel::Coop(t) => super::ConvKernel::Coop(t as u32),
        }
    }

    /// The depth of one K step: a weight-gradient split is a whole number of them.
    fn k_step(self) -> usize {
        match self {
            GemmKernel::Workgroup(t) => t.bk,
            GemmKernel::Coop(t) => t,
        }
    }

    /// The bindings a `conv2d_tiled.wgsl` pipeline has beyond the shared layout, in every pass:
    /// the forward's batch statistics (7, writable: `no_stats` where none are written, a buffer of
    /// its own), the batch norm applied to the input (8-10, `unused` where none is) and the joint
    /// backward's addend (11: `joint_addend`, an `act` placeholder outside the joint backward); the
    /// coop kernel has none.
    fn tiled_binds<'a>(
        self,
        stats: Option<&'a Tensor>,
        affine: Option<BnAffine<'a>>,
        (no_stats, unused, joint_addend): (&'a Tensor, &'a Tensor, &'a Tensor),
    ) -> Vec<Bind<'a>> {
        let GemmKernel::Workgroup(_) = self else { return Vec::new() };
        let [s, g, b] = affine.map_or([unused; 3], |a| [a.stats, a.gamma, a.beta]);
        vec![
            Bind::Tensor(7, stats.unwrap_or(no_stats)),
            Bind::Tensor(8, s),
            Bind::Tensor(9, g),
            Bind::Tensor(10, b),
            Bind::Tensor(11, joint_addend),
        ]
    }

    /// One launch in `mode` over a `rows` x `cols` GEMM with `z` K splits, for `cfg`'s layer.
    fn dispatch(
        self,
        gpu: &Gpu,
        cfg: &Conv2dConfig,
        mode: u32,
        binds: &[Bind<'_>],
        dims: (usize, usize, usize),
        precision: Precision,
    ) -> Result<Dispatch> {
        let d = match self {
            GemmKernel::Workgroup(t) => {
                super::workgroup::dispatch(gpu, t, mode, (cfg.kh, cfg.kw), binds, t.grid(gpu, dims)?, precision)?
            }
            GemmKernel::Coop(t) => super::coop::dispatch(gpu, t, mode, binds, dims)?,
        };
        Ok(d.labelled(match (self, mode) {
            (GemmKernel::Workgroup(_), 0) => "conv2d_forward (workgroup)",
            (GemmKernel::Workgroup(_), 1) => "conv2d_backward_input (workgroup)",
            (GemmKernel::Workgroup(_), _) => "conv2d_backward_weight (workgroup)",
            (GemmKernel::Coop(_), 0) => "conv2d_forward (coop)",
            (GemmKernel::Coop(_), 1) => "conv2d_backward_input (coop)",
            (GemmKernel::Coop(_), _) => "conv2d_backward_weight (coop)",
        }))
    }
}

/// The bytes a pass reads for a batch norm it applies to its input: the statistics and the scale
/// and shift (the input itself is counted as the pass's input, once).
fn affine_bytes(affine: Option<BnAffine<'_>>) -> f64 {
    affine.map_or(0, |a| a.stats.numel() + a.gamma.numel() + a.beta.numel()) as f64 * 4.0
}

/// The forward pass on a workgroup GEMM (MODE 0), and with `stats` (the `Workgroup` family only)
/// the batch statistics of its output per block of the tile's `bn` pixels
/// ([`super::ConvBuffers::out_stats`]; not with `relu`, whose values they would not describe).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    gemm: GemmKernel,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    relu: bool,
    stats: Option<&Tensor>,
    affine: Option<BnAffine<'_>>,
) -> Result<Vec<Dispatch>> {
    expect_shape("conv2d input", inp, &cfg.input_shape())?;
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d output", out, &cfg.output_shape())?;
    let cols = cfg.n * cfg.out_h() * cfg.out_w();
    if let Some(t) = stats {
        let GemmKernel::Workgroup(tiles) = gemm else {
            anyhow::bail!("conv2d: the cooperative-matrix kernel writes no batch statistics")
        };
        ensure!(!relu, "conv2d: batch statistics of a forward with a fused ReLU");
        expect_shape("conv2d batch statistics", t, &[cols.div_ceil(tiles.bn), cfg.c_out, 2])?;
    }
    let unused = placeholder(gpu)?;
    let bias = forward_bias(cfg, bias, &unused)?;
    let unused_act = placeholder_like(gpu, inp)?;
    // Bindings 6 and 7 are writable: buffers of their own (one buffer is never bound read-only and
    // writable at once).
    let (scratch, no_stats) = (placeholder(gpu)?, placeholder(gpu)?);
    let params = cfg.params(1, 0)?.with_relu(relu).with_stats(u32::from(stats.is_some()));
    let params = gpu.uniform("conv2d params", &params.with_affine_in(affine.is_some()));
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, bias),
        Bind::Tensor(4, out),
        Bind::Tensor(5, &unused_act),
        Bind::Tensor(6, &scratch),
    ];
    binds.extend(gemm.tiled_binds(stats, affine, (&no_stats, &unused, &unused_act)));
    // One GEMM per group (workgroup z), each over the group's output channels.
    let dims = (cfg.c_out_group(), cols, cfg.groups);
    let stats_bytes = stats.map_or(0, Tensor::numel) as f64 * 4.0;
    let bytes = el(inp) * (inp.numel() + weight.numel() + out.numel()) as f64 + stats_bytes + affine_bytes(affine);
    Ok(vec![gemm.dispatch(gpu, cfg, 0, &binds, dims, Precision::of(inp))?.with_cost(2.0 * cfg.macs() as f64, bytes)])
}

/// The input gradient on a workgroup GEMM (MODE 1): the transposed convolution, gathered, plus
/// `addend` if given ([`super::ConvBuffers::dinp_addend`], bound at the input's binding 1).
pub(super) fn backward_input(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    gemm: GemmKernel,
    dout: &Tensor,
    weight: &Tensor,
    dinp: &Tensor,
    addend: Option<&Tensor>,
) -> Result<Vec<Dispatch>> {
    expect_shape("conv2d dout", dout, &cfg.output_shape())?;
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d dinp", dinp, &cfg.input_shape())?;
    let (unused, unused_act, scratch) = (placeholder(gpu)?, placeholder_like(gpu, dout)?, placeholder(gpu)?);
    let no_stats = placeholder(gpu)?;
    let addend_or_unused = dinp_addend(cfg, dinp, addend, &unused_act)?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?.with_accumulate(addend.is_some()));
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, addend_or_unused),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, dinp),
        Bind::Tensor(5, dout),
        Bind::Tensor(6, &scratch),
    ];
    binds.extend(gemm.tiled_binds(None, None, (&no_stats, &unused, &unused_act)));
    let (flops, bytes) = input_grad_cost(cfg, (dout, weight, dinp), addend);
    Ok(vec![gemm.dispatch(gpu, cfg, 1, &binds, input_grad_dims(cfg), Precision::of(dout))?.with_cost(flops, bytes)])
}

/// The input gradient's GEMM: rows, columns, groups.
fn input_grad_dims(cfg: &Conv2dConfig) -> (usize, usize, usize) {
    (cfg.c_in_group(), cfg.n * cfg.h * cfg.w, cfg.groups)
}

/// The input gradient's flops and bytes; with an addend, one more input-sized read and one
/// addition per element.
fn input_grad_cost(
    cfg: &Conv2dConfig,
    (dout, weight, dinp): (&Tensor, &Tensor, &Tensor),
    addend: Option<&Tensor>,
) -> (f64, f64) {
    let read_addend = addend.map_or(0, |a| a.numel());
    let flops = 2.0 * cfg.macs() as f64 + read_addend as f64;
    (flops, el(dout) * (dout.numel() + weight.numel() + dinp.numel() + read_addend) as f64)
}

/// The weight gradient on a workgroup GEMM (MODE 2), K = N*OH*OW split `splits` ways (each split
/// a whole number of K steps, so none straddles two) and reduced in a fixed order by
/// `conv2d_backward_weight_reduce` (1 = written directly). dweight is f32.
pub(super) fn backward_weight(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    gemm: GemmKernel,
    inp: &Tensor,
    dout: &Tensor,
    dweight: &Tensor,
    splits: usize,
    affine: Option<BnAffine<'_>>,
) -> Result<Vec<Dispatch>> {
    let w = WeightGrad::new(gpu, cfg, gemm, (inp, dout, dweight), splits, affine)?;
    let params = gpu.uniform("conv2d params", &w.params);
    let (unused, unused_act) = (placeholder(gpu)?, placeholder_like(gpu, inp)?);
    // Binding 4 (the other modes' output) is writable: a buffer of its own.
    let scratch = placeholder_like(gpu, inp)?;
    let no_stats = placeholder(gpu)?;
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, &unused_act),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, &scratch),
        Bind::Tensor(5, dout),
        Bind::Tensor(6, w.target(dweight)),
    ];
    binds.extend(gemm.tiled_binds(None, affine, (&no_stats, &unused, &unused_act)));
    let precision = Precision::of(inp);
    let first = gemm.dispatch(gpu, cfg, 2, &binds, w.dims, precision)?.with_cost(w.flops, w.bytes);
    w.finish(gpu, cfg, precision, &params, first, dweight)
}

/// A weight gradient's launch on a workgroup GEMM: its K split, partial buffer (with more than one
/// split), GEMM dimensions and cost.
struct WeightGrad {
    params: super::Params,
    partial: Option<Tensor>,
    /// Rows, columns, and workgroup z = split * groups + group.
    dims: (usize, usize, usize),
    flops: f64,
    bytes: f64,
}

impl WeightGrad {
    fn new(
        gpu: &Gpu,
        cfg: &Conv2dConfig,
        gemm: GemmKernel,
        (inp, dout, dweight): (&Tensor, &Tensor, &Tensor),
        splits: usize,
        affine: Option<BnAffine<'_>>,
    ) -> Result<WeightGrad> {
        let operands = (inp, dout, dweight);
        let (splits, split_len) = super::weight_grad_split(gpu, cfg, gemm.kernel(), operands, splits, gemm.k_step())?;
        let params = cfg.params(splits, split_len)?.with_affine_in(affine.is_some());
        let k = cfg.c_in_group() * cfg.kh * cfg.kw;
        let partial = if splits > 1 {
            Some(Tensor::zeros(gpu, "conv2d dweight partial", &[splits, cfg.c_out, k])?)
        } else {
            None
        };
        let bytes = el(inp) * (inp.numel() + dout.numel()) as f64
            + 4.0 * (dweight.numel() * splits) as f64
            + affine_bytes(affine);
        Ok(WeightGrad {
            params,
            partial,
            dims: (cfg.c_out_group(), k, splits * cfg.groups),
            flops: 2.0 * cfg.macs() as f64,
            bytes,
        })
    }

    /// What the GEMM writes: the partial buffer, or the weight gradient itself with one split.
    fn target<'a>(&'a self, dweight: &'a Tensor) -> &'a Tensor {
        self.partial.as_ref().unwrap_or(dweight)
    }

    /// `first`, then the reduce of the partial slices if split.
    fn finish(
        &self,
        gpu: &Gpu,
        cfg: &Conv2dConfig,
        precision: Precision,
        params: &wgpu::Buffer,
        first: Dispatch,
        dweight: &Tensor,
    ) -> Result<Vec<Dispatch>> {
        let mut out = vec![first];
        if let Some(partial) = &self.partial {
            out.push(weight_grad_reduce(gpu, cfg, precision, params, partial, dweight)?);
        }
        Ok(out)
    }
}

/// Both gradients of a layer in one launch of the workgroup tiles `t` (MODE 3, JOINT): the input
/// gradient's tiles (plus the addend, if given, read at binding 11) and the weight gradient's,
/// interleaved ([`super::joint_grid`]), K split `splits` ways (then the reduce), the latter
/// applying `affine` to its input if given.
/// Each tile is the workgroup its own pass would run: bit for bit [`backward_input`] and
/// [`backward_weight`].
pub(super) fn backward_joint(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    t: WorkgroupTiles,
    (inp, dout, weight): (&Tensor, &Tensor, &Tensor),
    (dinp, addend): (&Tensor, Option<&Tensor>),
    dweight: &Tensor,
    splits: usize,
    affine: Option<BnAffine<'_>>,
) -> Result<Vec<Dispatch>> {
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d dinp", dinp, &cfg.input_shape())?;
    let gemm = GemmKernel::Workgroup(t);
    let w = WeightGrad::new(gpu, cfg, gemm, (inp, dout, dweight), splits, affine)?;
    let (grid, joint) = super::joint_grid(gpu, t.grid(gpu, input_grad_dims(cfg))?, t.grid(gpu, w.dims)?)?;
    let params = gpu.uniform("conv2d params", &w.params.with_accumulate(addend.is_some()).with_joint(joint));
    let (unused, unused_act, no_stats) = (placeholder(gpu)?, placeholder_like(gpu, dout)?, placeholder(gpu)?);
    let addend_or_unused = dinp_addend(cfg, dinp, addend, &unused_act)?;
    let mut binds = vec![
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, dinp),
        Bind::Tensor(5, dout),
        Bind::Tensor(6, w.target(dweight)),
    ];
    binds.extend(gemm.tiled_binds(None, affine, (&no_stats, &unused, addend_or_unused)));
    let (flops, bytes) = input_grad_cost(cfg, (dout, weight, dinp), addend);
    let precision = Precision::of(dout);
    let first = super::workgroup::dispatch(gpu, t, JOINT, (cfg.kh, cfg.kw), &binds, grid, precision)?
        .labelled("conv2d_backward (workgroup)")
        .with_cost(flops + w.flops, bytes + w.bytes);
    w.finish(gpu, cfg, precision, &params, first, dweight)
}

/// `conv2d_gemm.wgsl`'s MODE of the joint backward (conv2d_tiled.wgsl only).
const JOINT: u32 = 3;
