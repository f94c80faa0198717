//! The `Coop` family: `conv2d_coop.wgsl`'s cooperative matrices (tensor cores) for f16 plans on
//! adapters that list a square f16 x f16 -> f32 configuration (`Gpu::coop_tile`), one source for
//! the three GEMMs on the layout of `conv2d_gemm.wgsl` (the passes are written once, in `gemm.rs`,
//! for this family and `Workgroup`): a subgroup per 2T x 2T block of T x T tiles.

use anyhow::{Context, Result, ensure};

use super::Conv2dConfig;
use super::register::split_target;
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

/// The cooperative-matrix tile of this adapter, checked against the operands: cooperative
/// matrices here take f16 (`Gpu::coop_tile` lists only square f16 x f16 -> f32 configurations).
pub(super) fn tile(gpu: &Gpu, operand: &Tensor) -> Result<usize> {
    let t = gpu.coop_tile.context("conv2d (coop): the adapter lists no f16 cooperative matrix")? as usize;
    ensure!(
        Precision::of(operand) == Precision::F16,
        "conv2d (coop): cooperative matrices take f16 operands; {} holds {}",
        operand.label,
        operand.dtype.name()
    );
    Ok(t)
}

/// The weight gradient's K splits: 2T x 2T blocks of one subgroup each: on a GPU, ~4,096
/// workgroups in flight (32 small workgroups on each of a hundred-odd multiprocessors); on a CPU
/// adapter, as for the register blocks. Each split at least 256 long (32 K steps of 8, 16 of 16).
pub(super) fn weight_grad_splits(gpu: &Gpu, cfg: &Conv2dConfig, t: u32) -> usize {
    let m = cfg.n * cfg.out_h() * cfg.out_w();
    let tile = 2 * t as usize;
    let blocks = cfg.groups * cfg.c_out_group().div_ceil(tile) * (cfg.c_in_group() * cfg.kh * cfg.kw).div_ceil(tile);
    let target = if gpu.is_cpu() { split_target(gpu) } else { 4096 };
    target.div_ceil(blocks.max(1)).min(m / 256).clamp(1, 64)
}

/// One launch of `conv2d_gemm_coop` in `mode` (0 forward, 1 input gradient, 2 weight gradient):
/// a workgroup of one subgroup per 2T x 2T block of the `rows` x `cols` GEMM, `z` K splits.
pub(super) fn dispatch(
    gpu: &Gpu,
    t: usize,
    mode: u32,
    binds: &[Bind<'_>],
    (rows, cols, z): (usize, usize, usize),
) -> Result<Dispatch> {
    let (x, y) = (cols.div_ceil(2 * t), rows.div_ceil(2 * t));
    let max = gpu.limits.max_compute_workgroups_per_dimension as usize;
    ensure!(
        x <= max && y <= max && z <= max,
        "conv2d (coop): {rows}x{cols} GEMM needs {x}x{y}x{z} workgroups; the adapter allows {max} per dimension"
    );
    let wg = gpu.info.subgroup_max_size.max(1);
    let consts = [("WG", f64::from(wg)), ("MODE", f64::from(mode))];
    gpu.dispatch_in(Precision::F16, "conv2d_coop", "conv2d_gemm_coop", &consts, binds, [x as u32, y as u32, z as u32])
}
