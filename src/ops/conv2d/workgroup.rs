//! The `Workgroup` family: `conv2d_tiled.wgsl`'s workgroup-memory tiles for discrete GPUs, one
//! source for the three GEMMs on the layout of `conv2d_gemm.wgsl` (the passes are written once,
//! in `gemm.rs`, for this family and `Coop`). A workgroup of 256 invocations stages BK-deep
//! slices of both operands in workgroup memory; each invocation accumulates a TM x TN micro-tile.

use anyhow::{Result, ensure};

use super::Conv2dConfig;
use crate::gpu::{Bind, Dispatch, Gpu, Precision};

/// Workgroup-memory tile shapes of `conv2d_tiled.wgsl`: a workgroup of 256 invocations owns `bm`
/// rows x `bn` columns of the output GEMM, stages `bk` steps of K at a time, and each invocation
/// accumulates `tm` x `tn` outputs ((bm/tm) * (bn/tn) = 256; `tm` and `tn` 4 or 8, for the
/// shader's vec4 reads; `bn` divides 256; bk*bm and bk*bn at most 2048).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkgroupTiles {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub tm: usize,
    pub tn: usize,
}

impl WorkgroupTiles {
    /// Every shape built and tested: 64-128 x 64-128 tiles with 16-deep K steps (quick tuning
    /// times these four), a 32 x 128 one for layers with few rows (16-32 channels), and a
    /// 128 x 128 one with 8-deep steps and half the workgroup memory.
    pub const ALL: [WorkgroupTiles; 6] = [
        WorkgroupTiles { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4 },
        WorkgroupTiles { bm: 128, bn: 64, bk: 16, tm: 8, tn: 4 },
        WorkgroupTiles { bm: 64, bn: 128, bk: 16, tm: 4, tn: 8 },
        WorkgroupTiles { bm: 128, bn: 128, bk: 16, tm: 8, tn: 8 },
        WorkgroupTiles { bm: 32, bn: 128, bk: 16, tm: 4, tn: 4 },
        WorkgroupTiles { bm: 128, bn: 128, bk: 8, tm: 8, tn: 8 },
    ];

    /// The pipeline constants of `mode` for a layer with a `kh` x `kw` kernel.
    fn constants(&self, mode: u32, (kh, kw): (usize, usize)) -> [(&'static str, f64); 8] {
        [
            ("BM", self.bm as f64),
            ("BN", self.bn as f64),
            ("BK", self.bk as f64),
            ("TM", self.tm as f64),
            ("TN", self.tn as f64),
            ("MODE", f64::from(mode)),
            ("KH", kh as f64),
            ("KW", kw as f64),
        ]
    }

    /// The grid of these tiles over a `rows` x `cols` GEMM with `z` K splits and channel groups.
    pub(super) fn grid(&self, gpu: &Gpu, (rows, cols, z): (usize, usize, usize)) -> Result<[u32; 3]> {
        // The shader's workgroup arrays and its 256 invocations hold only for the shapes built.
        ensure!(WorkgroupTiles::ALL.contains(self), "conv2d (workgroup): {self:?} is not one of the tile shapes built");
        let (x, y) = (cols.div_ceil(self.bn), rows.div_ceil(self.bm));
        let max = gpu.limits.max_compute_workgroups_per_dimension as usize;
        ensure!(
            x <= max && y <= max && z <= max,
            "conv2d (workgroup): {rows}x{cols} GEMM needs {x}x{y}x{z} workgroups; the adapter allows {max} per dimension"
        );
        Ok([x as u32, y as u32, z as u32])
    }
}

/// The weight gradient's K splits: enough workgroups for ~1,024 in flight, each split at least
/// 512 long.
pub(super) fn weight_grad_splits(cfg: &Conv2dConfig, t: WorkgroupTiles) -> usize {
    let m = cfg.n * cfg.out_h() * cfg.out_w();
    let tiles = cfg.groups * cfg.c_out_group().div_ceil(t.bm) * (cfg.c_in_group() * cfg.kh * cfg.kw).div_ceil(t.bn);
    1024usize.div_ceil(tiles.max(1)).min(m / 512).clamp(1, 64)
}

/// One launch of `conv2d_gemm_tiled` in `mode` on `grid` ([`WorkgroupTiles::grid`]; the joint backward's, MODE 3,
/// is both passes' grids numbered in one), for a layer with a `kernel` = (kh, kw) kernel.
pub(super) fn dispatch(
    gpu: &Gpu,
    t: WorkgroupTiles,
    mode: u32,
    kernel: (usize, usize),
    binds: &[Bind<'_>],
    grid: [u32; 3],
    precision: Precision,
) -> Result<Dispatch> {
    gpu.dispatch_in(precision, "conv2d_tiled", "conv2d_gemm_tiled", &t.constants(mode, kernel), binds, grid)
}
