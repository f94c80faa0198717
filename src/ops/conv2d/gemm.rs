//! The host side of `conv2d_gemm.wgsl`, the binding layout and MODE numbering (0 forward, 1 input
//! gradient, 2 weight gradient) that the `Workgroup` family (`conv2d_tiled.wgsl`) and the `Coop`
//! family (`conv2d_coop.wgsl`) share: each pass is written once here for both, and each family's
//! file says only how one launch of its kernel is shaped ([`GemmKernel::dispatch`]).

use anyhow::{Result, ensure};

use super::workgroup::WorkgroupTiles;
use super::{Conv2dConfig, dinp_addend, forward_bias, weight_grad_reduce};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};
use crate::ops::{el, expect_shape, placeholder, placeholder_like};

/// A kernel on the shared GEMM layout.
#[derive(Clone, Copy, Debug)]
pub(super) enum GemmKernel {
    Workgroup(WorkgroupTiles),
    /// The adapter's square f16 cooperative-matrix tile T (checked by `coop::tile`).
    Coop(usize),
}

impl GemmKernel {
    /// The depth of one K step: a weight-gradient split is a whole number of them.
    fn k_step(self) -> usize {
        match self {
            GemmKernel::Workgroup(t) => t.bk,
            GemmKernel::Coop(t) => t,
        }
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
                super::workgroup::dispatch(gpu, t, mode, (cfg.kh, cfg.kw), binds, dims, precision)?
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

/// The forward pass on a workgroup GEMM (MODE 0).
pub(super) fn forward(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    gemm: GemmKernel,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    relu: bool,
) -> Result<Vec<Dispatch>> {
    expect_shape("conv2d input", inp, &cfg.input_shape())?;
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d output", out, &cfg.output_shape())?;
    let unused = placeholder(gpu)?;
    let bias = forward_bias(cfg, bias, &unused)?;
    let unused_act = placeholder_like(gpu, inp)?;
    // Binding 6 is writable: a buffer of its own (one buffer is never bound read-only and writable at once).
    let scratch = placeholder(gpu)?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?.with_relu(relu));
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, bias),
        Bind::Tensor(4, out),
        Bind::Tensor(5, &unused_act),
        Bind::Tensor(6, &scratch),
    ];
    // One GEMM per group (workgroup z), each over the group's output channels.
    let dims = (cfg.c_out_group(), cfg.n * cfg.out_h() * cfg.out_w(), cfg.groups);
    let bytes = el(inp) * (inp.numel() + weight.numel() + out.numel()) as f64;
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
    let addend_or_unused = dinp_addend(cfg, dinp, addend, &unused_act)?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?.with_accumulate(addend.is_some()));
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, addend_or_unused),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, dinp),
        Bind::Tensor(5, dout),
        Bind::Tensor(6, &scratch),
    ];
    let dims = (cfg.c_in_group(), cfg.n * cfg.h * cfg.w, cfg.groups);
    // With an addend, one more input-sized read and one addition per element.
    let read_addend = addend.map_or(0, |a| a.numel());
    let flops = 2.0 * cfg.macs() as f64 + read_addend as f64;
    let bytes = el(dout) * (dout.numel() + weight.numel() + dinp.numel() + read_addend) as f64;
    Ok(vec![gemm.dispatch(gpu, cfg, 1, &binds, dims, Precision::of(dout))?.with_cost(flops, bytes)])
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
) -> Result<Vec<Dispatch>> {
    expect_shape("conv2d input", inp, &cfg.input_shape())?;
    expect_shape("conv2d dout", dout, &cfg.output_shape())?;
    expect_shape("conv2d dweight", dweight, &cfg.weight_shape())?;
    ensure!(splits >= 1, "conv2d: weight-gradient splits must be at least 1");
    let m = cfg.n * cfg.out_h() * cfg.out_w();
    let split_len = m.div_ceil(splits).next_multiple_of(gemm.k_step());
    let splits = m.div_ceil(split_len);
    let params = gpu.uniform("conv2d params", &cfg.params(splits, split_len)?);
    let k = cfg.c_in_group() * cfg.kh * cfg.kw;
    let (unused, unused_act) = (placeholder(gpu)?, placeholder_like(gpu, inp)?);
    // Binding 4 (the other modes' output) is writable: a buffer of its own.
    let scratch = placeholder_like(gpu, inp)?;
    let partial =
        if splits > 1 { Some(Tensor::zeros(gpu, "conv2d dweight partial", &[splits, cfg.c_out, k])?) } else { None };
    let target = partial.as_ref().unwrap_or(dweight);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, &unused_act),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, &scratch),
        Bind::Tensor(5, dout),
        Bind::Tensor(6, target),
    ];
    let (flops, bytes) = (
        2.0 * cfg.macs() as f64,
        el(inp) * (inp.numel() + dout.numel()) as f64 + 4.0 * (dweight.numel() * splits) as f64,
    );
    let precision = Precision::of(inp);
    // Workgroup z = split * groups + group.
    let dims = (cfg.c_out_group(), k, splits * cfg.groups);
    let mut out = vec![gemm.dispatch(gpu, cfg, 2, &binds, dims, precision)?.with_cost(flops, bytes)];
    if let Some(partial) = &partial {
        out.push(weight_grad_reduce(gpu, cfg, precision, &params, partial, dweight)?);
    }
    Ok(out)
}
