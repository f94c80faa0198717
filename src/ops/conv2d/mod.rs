//! conv2d — host side of `conv2d.wgsl` (register-blocked GEMMs, [`Tiles`]),
//! `conv2d_tiled.wgsl` (workgroup-memory tiles for discrete GPUs, [`SmemTiles`]) and
//! `conv2d_coop.wgsl` (cooperative matrices for f16 plans, `ConvKernel::Coop`); CPU oracle
//! in `reference.rs` beside it; the tuner's choice among them at the end ([`choose`]).

mod layer;
pub mod reference;

pub use layer::Conv2d;

use anyhow::{Context, Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{el, expect_shape, placeholder, placeholder_like, to_u32};
use crate::gpu::tune::{TuneEntry, TuneMode};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

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
            _pad: 0,
        })
    }
}

/// Mirrors `Params` in conv2d.wgsl.
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
    _pad: u32,
}

/// Invocations per workgroup of the GEMM kernels (`WG` override).
const WG: u32 = 64;

/// Register-block shapes of the conv GEMMs, WGSL `override` constants fixed per pipeline.
/// Forward and input-gradient invocations own `gemm_m` pixels (4, 8 or 16) x `gemm_n` channels (8
/// or 16); weight-gradient invocations own `wgrad_ci` input channels (4 or 8) x `wgrad_n` output
/// channels (8 or 16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiles {
    pub gemm_m: usize,
    pub gemm_n: usize,
    pub wgrad_ci: usize,
    pub wgrad_n: usize,
}

impl Tiles {
    /// Every shape the shaders implement.
    pub const ALL: [Tiles; 24] = {
        let mut all = [Tiles { gemm_m: 4, gemm_n: 8, wgrad_ci: 4, wgrad_n: 8 }; 24];
        let mut i = 0;
        while i < 24 {
            all[i] = Tiles {
                gemm_m: [4, 8, 16][i % 3],
                gemm_n: [8, 16][(i / 3) % 2],
                wgrad_ci: [4, 8][(i / 6) % 2],
                wgrad_n: [8, 16][i / 12],
            };
            i += 1;
        }
        all
    };

    /// The blocks for this adapter: `GpuOptions::conv_tiles` (`--conv-tiles M,N,CI,CO`) pins them
    /// (for measuring), else
    /// on a CPU adapter the largest: 16 x 16 and 8 x 16. On lavapipe every storage-buffer load runs lane by lane
    /// while the FMAs run 8 lanes at once, so the block with the most FMAs per load pays,
    /// spilled accumulators and all. Measured A/B in one run each (senet bench, width 0.25,
    /// batch 32): against 4 x 8, 8 pixels x 8 channels made forward and input gradient 1.4x
    /// faster, 8 x 16 another 1.2-1.3x and 16 x 16 another 1.1x (forward) and 1.4x (input
    /// gradient): the whole step 185 -> 215 images/s on a quiet machine. The weight gradient
    /// gained 1.2x from 4 x 8 to 8 x 8 and 1.2x more from 8 x 16. The 16-pixel pipelines cost
    /// ~3 s more to compile when Mesa's shader cache is cold (first step 8 s instead of 5 s at
    /// width 0.25). Other adapters take 8 x 16: 256 accumulators would not fit a GPU thread's
    /// 255 registers; their own choice awaits measurements there.
    pub fn for_adapter(gpu: &Gpu) -> Tiles {
        let gemm_m = if gpu.is_cpu() { 16 } else { 8 };
        Tiles::pinned(gpu).unwrap_or(Tiles { gemm_m, gemm_n: 16, wgrad_ci: 8, wgrad_n: 16 })
    }

    /// The blocks `GpuOptions::conv_tiles` pins, if it pins a shape the shaders implement.
    pub fn pinned(gpu: &Gpu) -> Option<Tiles> {
        let [gemm_m, gemm_n, wgrad_ci, wgrad_n] = gpu.conv_tiles?;
        let t = Tiles { gemm_m, gemm_n, wgrad_ci, wgrad_n };
        Tiles::ALL.contains(&t).then_some(t)
    }

    /// `M,N,CI,CO` (`--conv-tiles`), one of [`Tiles::ALL`], or an error listing them.
    pub fn parse(s: &str) -> Result<Tiles> {
        let v: Vec<usize> =
            s.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|_| {
                anyhow::anyhow!("--conv-tiles {s:?}: expected four numbers M,N,CI,CO (e.g. 16,16,8,16)")
            })?;
        let t = match v[..] {
            [gemm_m, gemm_n, wgrad_ci, wgrad_n] => Tiles { gemm_m, gemm_n, wgrad_ci, wgrad_n },
            _ => anyhow::bail!("--conv-tiles {s:?}: expected four numbers M,N,CI,CO (e.g. 16,16,8,16)"),
        };
        ensure!(
            Tiles::ALL.contains(&t),
            "--conv-tiles {s:?}: not a shape the kernels implement (M 4, 8 or 16; N 8 or 16; CI 4, 8 or 16; CO 8 or 16)"
        );
        Ok(t)
    }

    /// `for_adapter` narrowed to a layer: a block twice as wide as a channel count that fits in
    /// its smaller size only adds padded columns (the 3-channel first layer's weight gradient:
    /// 8 input channels per block would be 5/8 padding, 4 is 1/4). Unless `--conv-tiles` pins
    /// every size.
    pub fn for_layer(gpu: &Gpu, cfg: &Conv2dConfig) -> Tiles {
        let t = Tiles::for_adapter(gpu);
        if Tiles::pinned(gpu).is_some() {
            return t;
        }
        let narrow = |size: usize, channels: usize| if channels <= size / 2 { size / 2 } else { size };
        // A block spans the channels of one group: a grouped layer's are c_in/groups, c_out/groups.
        let (c_in, c_out) = (cfg.c_in_group(), cfg.c_out_group());
        Tiles {
            gemm_m: t.gemm_m,
            // Forward blocks run over output channels, input-gradient blocks over input channels;
            // one pipeline constant serves both, so narrow it only when both fit.
            gemm_n: narrow(t.gemm_n, c_out.max(c_in)),
            wgrad_ci: narrow(t.wgrad_ci, c_in),
            wgrad_n: narrow(t.wgrad_n, c_out),
        }
    }

    /// The register GEMM's constants; `mode` 0 is the forward, 1 the input gradient.
    fn gemm_constants(&self, mode: u32) -> [(&'static str, f64); 4] {
        [("WG", WG as f64), ("GEMM_M", self.gemm_m as f64), ("GEMM_N", self.gemm_n as f64), ("MODE", f64::from(mode))]
    }
}

/// Workgroups for a GEMM whose invocations own `row_block` rows x `col_block` columns, for each of
/// `groups` channel groups of `cols` columns (the column blocks of one group never reach into the
/// next: y numbers (group, block)).
fn gemm_grid(
    gpu: &Gpu,
    rows: usize,
    row_block: usize,
    (cols, groups): (usize, usize),
    col_block: usize,
    z: usize,
) -> Result<[u32; 3]> {
    let x = rows.div_ceil(row_block).div_ceil(WG as usize);
    let y = groups * cols.div_ceil(col_block);
    let max = gpu.limits.max_compute_workgroups_per_dimension as usize;
    ensure!(
        x <= max && y <= max && z <= max,
        "conv2d: {rows}x{cols} GEMM needs {x}x{y}x{z} workgroups; the adapter allows {max} per dimension"
    );
    Ok([x as u32, y as u32, z as u32])
}

pub fn conv2d_forward(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    conv2d_forward_tiled(gpu, cfg, Tiles::for_layer(gpu, cfg), inp, weight, bias, out)
}

pub fn conv2d_forward_tiled(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: Tiles,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    expect_shape("conv2d input", inp, &cfg.input_shape())?;
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d output", out, &cfg.output_shape())?;
    // conv2d_gemm in MODE 0 never reads dout (binding 5), nor the bias without one.
    let unused = placeholder(gpu)?;
    let unused_act = placeholder_like(gpu, inp)?;
    let bias = forward_bias(cfg, bias, &unused)?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?);
    let cols = (cfg.c_out_group(), cfg.groups);
    let grid = gemm_grid(gpu, cfg.n * cfg.out_h() * cfg.out_w(), tiles.gemm_m, cols, tiles.gemm_n, 1)?;
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, bias),
        Bind::Tensor(4, out),
        Bind::Tensor(5, &unused_act),
    ];
    let bytes = el(inp) * (inp.numel() + weight.numel() + out.numel()) as f64;
    Ok(vec![
        gpu.dispatch_in(Precision::of(inp), "conv2d", "conv2d_gemm", &tiles.gemm_constants(0), &binds, grid)?
            .labelled("conv2d_forward")
            .with_cost(2.0 * cfg.macs() as f64, bytes),
    ])
}

pub fn conv2d_backward_input(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    dout: &Tensor,
    weight: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    conv2d_backward_input_tiled(gpu, cfg, Tiles::for_layer(gpu, cfg), dout, weight, dinp)
}

pub fn conv2d_backward_input_tiled(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: Tiles,
    dout: &Tensor,
    weight: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    expect_shape("conv2d dout", dout, &cfg.output_shape())?;
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d dinp", dinp, &cfg.input_shape())?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?);
    let grid = gemm_grid(gpu, cfg.n * cfg.h * cfg.w, tiles.gemm_m, (cfg.c_in_group(), cfg.groups), tiles.gemm_n, 1)?;
    // conv2d_gemm in MODE 1 reads dout and writes dinp through the forward's output binding; the
    // input and bias bindings are declared by the shared entry point but never read.
    let unused = placeholder(gpu)?;
    let unused_act = placeholder_like(gpu, dout)?;
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, &unused_act),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, dinp),
        Bind::Tensor(5, dout),
    ];
    let bytes = el(dout) * (dout.numel() + weight.numel() + dinp.numel()) as f64;
    Ok(vec![
        gpu.dispatch_in(Precision::of(dout), "conv2d", "conv2d_gemm", &tiles.gemm_constants(1), &binds, grid)?
            .labelled("conv2d_backward_input")
            .with_cost(2.0 * cfg.macs() as f64, bytes),
    ])
}

/// How many ranges of m the weight-gradient reduction is split into: enough invocations (one
/// per block of `tiles`) to fill the device (about `target`), each range at least
/// `MIN_SPLIT_LEN` long.
pub fn weight_grad_splits(cfg: &Conv2dConfig, tiles: Tiles, target: usize) -> usize {
    const MIN_SPLIT_LEN: usize = 256;
    let m = cfg.n * cfg.out_h() * cfg.out_w();
    let blocks = cfg.groups
        * cfg.c_out_group().div_ceil(tiles.wgrad_n)
        * cfg.kh
        * cfg.kw
        * cfg.c_in_group().div_ceil(tiles.wgrad_ci);
    let want = target.div_ceil(blocks.max(1));
    want.min(m / MIN_SPLIT_LEN).clamp(1, 64)
}

/// Weight gradient with the reduction over m split `splits` ways (1 = no second pass).
pub fn conv2d_backward_weight(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    inp: &Tensor,
    dout: &Tensor,
    dweight: &Tensor,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    conv2d_backward_weight_tiled(gpu, cfg, Tiles::for_layer(gpu, cfg), inp, dout, dweight, splits)
}

pub fn conv2d_backward_weight_tiled(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: Tiles,
    inp: &Tensor,
    dout: &Tensor,
    dweight: &Tensor,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    expect_shape("conv2d input", inp, &cfg.input_shape())?;
    expect_shape("conv2d dout", dout, &cfg.output_shape())?;
    expect_shape("conv2d dweight", dweight, &cfg.weight_shape())?;
    ensure!(splits >= 1, "conv2d: weight-gradient splits must be at least 1");
    let m = cfg.n * cfg.out_h() * cfg.out_w();
    let split_len = m.div_ceil(splits);
    let splits = m.div_ceil(split_len);
    let params = gpu.uniform("conv2d params", &cfg.params(splits, split_len)?);
    let k = cfg.c_in_group() * cfg.kh * cfg.kw;
    // Columns come in blocks of `wgrad_ci` input channels (of a group) at one tap:
    // (kh*kw) * ceil((c_in/groups)/ci) of them; each invocation owns `wgrad_n` output channels of
    // one group for one such block.
    let ci = tiles.wgrad_ci;
    let rows = cfg.kh * cfg.kw * cfg.c_in_group().div_ceil(ci);
    let grid = gemm_grid(gpu, rows, 1, (cfg.c_out_group(), cfg.groups), tiles.wgrad_n, splits)?;
    let consts = [("WG", WG as f64), ("WGRAD_CI", ci as f64), ("WGRAD_N", tiles.wgrad_n as f64)];
    let (flops, bytes) = (
        2.0 * cfg.macs() as f64,
        el(inp) * (inp.numel() + dout.numel()) as f64 + 4.0 * (dweight.numel() * splits) as f64,
    );
    let precision = Precision::of(inp);
    if splits == 1 {
        let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(5, dout), Bind::Tensor(7, dweight)];
        return Ok(vec![
            gpu.dispatch_in(precision, "conv2d", "conv2d_backward_weight", &consts, &binds, grid)?
                .with_cost(flops, bytes),
        ]);
    }
    let partial = Tensor::zeros(gpu, "conv2d dweight partial", &[splits, cfg.c_out, k])?;
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(5, dout), Bind::Tensor(7, &partial)];
    let first =
        gpu.dispatch_in(precision, "conv2d", "conv2d_backward_weight", &consts, &binds, grid)?.with_cost(flops, bytes);
    Ok(vec![first, weight_grad_reduce(gpu, cfg, precision, &params, &partial, dweight)?])
}

/// The fixed-order sum of a split weight gradient's slices (both kernel families write them alike).
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

/// Workgroup-memory tile shapes of `conv2d_tiled.wgsl`: a workgroup of 256 invocations owns `bm`
/// rows x `bn` columns of the output GEMM, stages `bk` steps of K at a time, and each invocation
/// accumulates `tm` x `tn` outputs ((bm/tm) * (bn/tn) = 256; bk*bm and bk*bn at most 2048).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SmemTiles {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub tm: usize,
    pub tn: usize,
}

impl SmemTiles {
    /// Every shape built and tested: 64-128 x 64-128 tiles with 16-deep K steps, a 64 x 32 one
    /// with 32-deep steps, and a 32 x 128 one for layers with few rows (16-32 channels).
    pub const ALL: [SmemTiles; 6] = [
        SmemTiles { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4 },
        SmemTiles { bm: 128, bn: 64, bk: 16, tm: 8, tn: 4 },
        SmemTiles { bm: 64, bn: 128, bk: 16, tm: 4, tn: 8 },
        SmemTiles { bm: 128, bn: 128, bk: 16, tm: 8, tn: 8 },
        SmemTiles { bm: 64, bn: 32, bk: 32, tm: 4, tn: 2 },
        SmemTiles { bm: 32, bn: 128, bk: 16, tm: 2, tn: 8 },
    ];

    fn constants(&self, mode: u32) -> [(&'static str, f64); 6] {
        [
            ("BM", self.bm as f64),
            ("BN", self.bn as f64),
            ("BK", self.bk as f64),
            ("TM", self.tm as f64),
            ("TN", self.tn as f64),
            ("MODE", f64::from(mode)),
        ]
    }

    fn grid(&self, gpu: &Gpu, rows: usize, cols: usize, z: usize) -> Result<[u32; 3]> {
        // The shader's workgroup arrays and its 256 invocations hold only for the shapes built.
        ensure!(SmemTiles::ALL.contains(self), "conv2d (tiled): {self:?} is not one of the tile shapes built");
        let (x, y) = (cols.div_ceil(self.bn), rows.div_ceil(self.bm));
        let max = gpu.limits.max_compute_workgroups_per_dimension as usize;
        ensure!(
            x <= max && y <= max && z <= max,
            "conv2d (tiled): {rows}x{cols} GEMM needs {x}x{y}x{z} workgroups; the adapter allows {max} per dimension"
        );
        Ok([x as u32, y as u32, z as u32])
    }
}

/// The forward pass with workgroup-memory tiles (`conv2d_tiled.wgsl`, MODE 0).
pub fn conv2d_forward_smem(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: SmemTiles,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    gemm_forward(gpu, cfg, Gemm::Smem(tiles), inp, weight, bias, out)
}

/// The input gradient with workgroup-memory tiles (MODE 1).
pub fn conv2d_backward_input_smem(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: SmemTiles,
    dout: &Tensor,
    weight: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    gemm_backward_input(gpu, cfg, Gemm::Smem(tiles), dout, weight, dinp)
}

/// The weight gradient with workgroup-memory tiles (MODE 2), K = N*OH*OW split `splits` ways
/// and reduced in a fixed order by `conv2d_backward_weight_reduce` (1 = written directly).
pub fn conv2d_backward_weight_smem(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: SmemTiles,
    inp: &Tensor,
    dout: &Tensor,
    dweight: &Tensor,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    gemm_backward_weight(gpu, cfg, Gemm::Smem(tiles), inp, dout, dweight, splits)
}

/// The two workgroup-GEMM families, which share one binding layout and one MODE numbering (0
/// forward, 1 input gradient, 2 weight gradient): workgroup-memory tiles (`conv2d_tiled.wgsl`)
/// and cooperative matrices (`conv2d_coop.wgsl`). Each pass below is written once for both.
#[derive(Clone, Copy, Debug)]
enum Gemm {
    Smem(SmemTiles),
    /// The adapter's square f16 cooperative-matrix tile T (checked by [`coop_tile`]).
    Coop(usize),
}

impl Gemm {
    /// The depth of one K step: a weight-gradient split is a whole number of them.
    fn k_step(self) -> usize {
        match self {
            Gemm::Smem(t) => t.bk,
            Gemm::Coop(t) => t,
        }
    }

    /// One launch in `mode` over a `rows` x `cols` GEMM with `z` K splits.
    fn dispatch(
        self,
        gpu: &Gpu,
        mode: u32,
        binds: &[Bind<'_>],
        dims: (usize, usize, usize),
        precision: Precision,
    ) -> Result<Dispatch> {
        let d = match self {
            Gemm::Smem(t) => {
                let grid = t.grid(gpu, dims.0, dims.1, dims.2)?;
                gpu.dispatch_in(precision, "conv2d_tiled", "conv2d_gemm_tiled", &t.constants(mode), binds, grid)?
            }
            Gemm::Coop(t) => coop_dispatch(gpu, mode, binds, dims, t)?,
        };
        Ok(d.labelled(match (self, mode) {
            (Gemm::Smem(_), 0) => "conv2d_forward (tiled)",
            (Gemm::Smem(_), 1) => "conv2d_backward_input (tiled)",
            (Gemm::Smem(_), _) => "conv2d_backward_weight (tiled)",
            (Gemm::Coop(_), 0) => "conv2d_forward (coop)",
            (Gemm::Coop(_), 1) => "conv2d_backward_input (coop)",
            (Gemm::Coop(_), _) => "conv2d_backward_weight (coop)",
        }))
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

/// The forward pass on a workgroup GEMM (MODE 0).
fn gemm_forward(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    gemm: Gemm,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    expect_shape("conv2d input", inp, &cfg.input_shape())?;
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d output", out, &cfg.output_shape())?;
    let unused = placeholder(gpu)?;
    let bias = forward_bias(cfg, bias, &unused)?;
    let unused_act = placeholder_like(gpu, inp)?;
    // Binding 6 is writable: a buffer of its own (one buffer is never bound read-only and writable at once).
    let scratch = placeholder(gpu)?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?);
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
    Ok(vec![gemm.dispatch(gpu, 0, &binds, dims, Precision::of(inp))?.with_cost(2.0 * cfg.macs() as f64, bytes)])
}

/// The input gradient on a workgroup GEMM (MODE 1): the transposed convolution, gathered.
fn gemm_backward_input(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    gemm: Gemm,
    dout: &Tensor,
    weight: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    expect_shape("conv2d dout", dout, &cfg.output_shape())?;
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d dinp", dinp, &cfg.input_shape())?;
    let (unused, unused_act, scratch) = (placeholder(gpu)?, placeholder_like(gpu, dout)?, placeholder(gpu)?);
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, &unused_act),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, dinp),
        Bind::Tensor(5, dout),
        Bind::Tensor(6, &scratch),
    ];
    let dims = (cfg.c_in_group(), cfg.n * cfg.h * cfg.w, cfg.groups);
    let bytes = el(dout) * (dout.numel() + weight.numel() + dinp.numel()) as f64;
    Ok(vec![gemm.dispatch(gpu, 1, &binds, dims, Precision::of(dout))?.with_cost(2.0 * cfg.macs() as f64, bytes)])
}

/// The weight gradient on a workgroup GEMM (MODE 2), K = N*OH*OW split `splits` ways (each split
/// a whole number of K steps, so none straddles two) and reduced in a fixed order by
/// `conv2d_backward_weight_reduce` (1 = written directly). dweight is f32.
fn gemm_backward_weight(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    gemm: Gemm,
    inp: &Tensor,
    dout: &Tensor,
    dweight: &Tensor,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
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
    let mut out = vec![gemm.dispatch(gpu, 2, &binds, dims, precision)?.with_cost(flops, bytes)];
    if let Some(partial) = &partial {
        out.push(weight_grad_reduce(gpu, cfg, precision, &params, partial, dweight)?);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Choosing a kernel per layer: the tuner.

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
    /// conv2d.wgsl's register blocks (only the fields of the pass matter).
    Register(Tiles),
    /// conv2d_tiled.wgsl's workgroup-memory tiles.
    Tiled(SmemTiles),
    /// conv2d_coop.wgsl's cooperative matrices of this square tile (f16 plans; all three passes).
    Coop(u32),
}

impl std::fmt::Display for ConvKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConvKernel::Register(t) => write!(f, "register {}x{} / {}x{}", t.gemm_m, t.gemm_n, t.wgrad_ci, t.wgrad_n),
            ConvKernel::Tiled(t) => write!(f, "tiled {}x{}x{} / {}x{}", t.bm, t.bn, t.bk, t.tm, t.tn),
            ConvKernel::Coop(t) => write!(f, "coop {t}x{t}x{t}"),
        }
    }
}

impl ConvKernel {
    /// The tuning cache's spelling.
    fn encode(&self) -> String {
        match self {
            ConvKernel::Register(t) => format!("register:{},{},{},{}", t.gemm_m, t.gemm_n, t.wgrad_ci, t.wgrad_n),
            ConvKernel::Tiled(t) => format!("tiled:{},{},{},{},{}", t.bm, t.bn, t.bk, t.tm, t.tn),
            ConvKernel::Coop(t) => format!("coop:{t}"),
        }
    }

    /// A cached choice back, only if it names a kernel this build has: a cache written by
    /// another version, or edited, never selects a shape that was not built and tested.
    fn decode(s: &str) -> Option<ConvKernel> {
        let (family, dims) = s.split_once(':')?;
        let v: Vec<usize> = dims.split(',').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let k = match (family, &v[..]) {
            ("register", &[gemm_m, gemm_n, wgrad_ci, wgrad_n]) => {
                ConvKernel::Register(Tiles { gemm_m, gemm_n, wgrad_ci, wgrad_n })
            }
            ("tiled", &[bm, bn, bk, tm, tn]) => ConvKernel::Tiled(SmemTiles { bm, bn, bk, tm, tn }),
            ("coop", &[t]) => ConvKernel::Coop(u32::try_from(t).ok()?),
            _ => return None,
        };
        let known = match k {
            ConvKernel::Register(t) => Tiles::ALL.contains(&t),
            ConvKernel::Tiled(t) => SmemTiles::ALL.contains(&t),
            ConvKernel::Coop(t) => t == 8 || t == 16,
        };
        known.then_some(k)
    }
}

/// The buffers a pass reads and writes.
pub struct ConvBuffers<'a> {
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub out: &'a Tensor,
    pub dout: &'a Tensor,
    pub dinp: &'a Tensor,
    pub dweight: &'a Tensor,
}

/// Workgroups the weight gradient should fill before splitting K stops paying: a CPU adapter
/// has a few cores, a GPU a hundred multiprocessors or more.
fn split_target(gpu: &Gpu) -> usize {
    if gpu.is_cpu() { 256 } else { 65536 }
}

/// The weight gradient's K splits for `kernel` (deterministic from the choice).
pub fn splits_for(gpu: &Gpu, cfg: &Conv2dConfig, kernel: ConvKernel) -> usize {
    match kernel {
        ConvKernel::Register(t) => weight_grad_splits(cfg, t, split_target(gpu)),
        ConvKernel::Tiled(t) => {
            // Enough workgroups for ~1,024 in flight, each split at least 512 long.
            let m = cfg.n * cfg.out_h() * cfg.out_w();
            let tiles =
                cfg.groups * cfg.c_out_group().div_ceil(t.bm) * (cfg.c_in_group() * cfg.kh * cfg.kw).div_ceil(t.bn);
            1024usize.div_ceil(tiles.max(1)).min(m / 512).clamp(1, 64)
        }
        ConvKernel::Coop(t) => {
            // 2T x 2T blocks of one subgroup each: on a GPU, ~4,096 workgroups in flight (32
            // small workgroups on each of a hundred-odd multiprocessors); on a CPU adapter, as for
            // the register blocks. Each split at least 256 long (32 K steps of 8, 16 of 16).
            let m = cfg.n * cfg.out_h() * cfg.out_w();
            let tile = 2 * t as usize;
            let blocks =
                cfg.groups * cfg.c_out_group().div_ceil(tile) * (cfg.c_in_group() * cfg.kh * cfg.kw).div_ceil(tile);
            let target = if gpu.is_cpu() { split_target(gpu) } else { 4096 };
            target.div_ceil(blocks.max(1)).min(m / 256).clamp(1, 64)
        }
    }
}

/// The dispatches of `pass` with `kernel`.
pub fn conv2d_pass(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    pass: ConvPass,
    kernel: ConvKernel,
    b: &ConvBuffers<'_>,
) -> Result<Vec<Dispatch>> {
    match (pass, kernel) {
        (ConvPass::Forward, ConvKernel::Register(t)) => {
            conv2d_forward_tiled(gpu, cfg, t, b.inp, b.weight, b.bias, b.out)
        }
        (ConvPass::Forward, ConvKernel::Tiled(t)) => conv2d_forward_smem(gpu, cfg, t, b.inp, b.weight, b.bias, b.out),
        (ConvPass::BackwardInput, ConvKernel::Register(t)) => {
            conv2d_backward_input_tiled(gpu, cfg, t, b.dout, b.weight, b.dinp)
        }
        (ConvPass::BackwardInput, ConvKernel::Tiled(t)) => {
            conv2d_backward_input_smem(gpu, cfg, t, b.dout, b.weight, b.dinp)
        }
        (ConvPass::BackwardWeight, ConvKernel::Register(t)) => {
            conv2d_backward_weight_tiled(gpu, cfg, t, b.inp, b.dout, b.dweight, splits_for(gpu, cfg, kernel))
        }
        (ConvPass::BackwardWeight, ConvKernel::Tiled(t)) => {
            conv2d_backward_weight_smem(gpu, cfg, t, b.inp, b.dout, b.dweight, splits_for(gpu, cfg, kernel))
        }
        (pass, ConvKernel::Coop(t)) => {
            ensure!(gpu.coop_tile == Some(t), "conv2d (coop): this adapter has no {t}x{t}x{t} f16 cooperative matrix");
            match pass {
                ConvPass::Forward => conv2d_forward_coop(gpu, cfg, b.inp, b.weight, b.bias, b.out),
                ConvPass::BackwardInput => conv2d_backward_input_coop(gpu, cfg, b.dout, b.weight, b.dinp),
                ConvPass::BackwardWeight => {
                    conv2d_backward_weight_coop(gpu, cfg, b.inp, b.dout, b.dweight, splits_for(gpu, cfg, kernel))
                }
            }
        }
    }
}

/// The cooperative-matrix tile of this adapter, checked against the operands: cooperative
/// matrices here take f16 (`Gpu::coop_tile` lists only square f16 x f16 -> f32 configurations).
fn coop_tile(gpu: &Gpu, operand: &Tensor) -> Result<usize> {
    let t = gpu.coop_tile.context("conv2d (coop): the adapter lists no f16 cooperative matrix")? as usize;
    ensure!(
        Precision::of(operand) == Precision::F16,
        "conv2d (coop): cooperative matrices take f16 operands; {} holds {}",
        operand.label,
        operand.dtype.name()
    );
    Ok(t)
}

/// One launch of `conv2d_gemm_coop` in `mode` (0 forward, 1 input gradient, 2 weight gradient):
/// a workgroup of one subgroup per 2T x 2T block of the `rows` x `cols` GEMM, `z` K splits.
fn coop_dispatch(
    gpu: &Gpu,
    mode: u32,
    binds: &[Bind<'_>],
    (rows, cols, z): (usize, usize, usize),
    t: usize,
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

/// The forward pass on cooperative matrices (`conv2d_coop.wgsl`, MODE 0): f16 tensors, on an
/// adapter that lists a square f16 -> f32 configuration (`Gpu::coop_tile`).
pub fn conv2d_forward_coop(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    gemm_forward(gpu, cfg, Gemm::Coop(coop_tile(gpu, inp)?), inp, weight, bias, out)
}

/// The input gradient on cooperative matrices (MODE 1).
pub fn conv2d_backward_input_coop(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    dout: &Tensor,
    weight: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    gemm_backward_input(gpu, cfg, Gemm::Coop(coop_tile(gpu, dout)?), dout, weight, dinp)
}

/// The weight gradient on cooperative matrices (MODE 2), split and reduced as the tiled one's
/// (each split a whole number of T-deep K steps). dweight is f32.
pub fn conv2d_backward_weight_coop(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    inp: &Tensor,
    dout: &Tensor,
    dweight: &Tensor,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    gemm_backward_weight(gpu, cfg, Gemm::Coop(coop_tile(gpu, inp)?), inp, dout, dweight, splits)
}

/// The dispatches of `pass` with the chosen `kernel`, or — should it not launch here (a cache
/// carried from another adapter, a grid past this one's limits) — with the built-in register
/// blocks, said once. Returns the kernel that runs.
pub fn conv2d_pass_chosen(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    pass: ConvPass,
    kernel: ConvKernel,
    b: &ConvBuffers<'_>,
) -> Result<(Vec<Dispatch>, ConvKernel)> {
    let builtin = ConvKernel::Register(Tiles::for_layer(gpu, cfg));
    match conv2d_pass(gpu, cfg, pass, kernel, b) {
        Ok(d) => Ok((d, kernel)),
        Err(e) if kernel != builtin => {
            eprintln!("warning: {kernel} cannot run conv2d {pass:?} {cfg:?} here ({e:#}); using {builtin}");
            Ok((conv2d_pass(gpu, cfg, pass, builtin, b)?, builtin))
        }
        Err(e) => Err(e),
    }
}

/// The kernel a plan of `precision` runs untimed: an f16 plan's GEMMs on cooperative matrices
/// where the adapter lists them (tensor cores take f16 operands, the FMA kernels leave them idle),
/// else the register blocks for this adapter and layer.
pub fn builtin(gpu: &Gpu, cfg: &Conv2dConfig, precision: Precision) -> ConvKernel {
    match (precision, gpu.coop_tile) {
        (Precision::F16, Some(t)) => ConvKernel::Coop(t),
        _ => ConvKernel::Register(Tiles::for_layer(gpu, cfg)),
    }
}

/// The kernels worth timing for a pass of a `precision` plan: the built-in choice first, then the
/// others `mode` allows, each once (register shapes that differ only in fields another pass uses
/// count as one). With cooperative matrices built in, the register blocks are the first challenger.
/// Grouped layers get the same candidates: every family runs one GEMM per group (the register
/// blocks number (group, block) along the grid's y, the workgroup GEMMs along z), so none has to
/// be withheld; a depthwise layer leaves most of each block's columns idle in all of them.
fn candidates(gpu: &Gpu, cfg: &Conv2dConfig, pass: ConvPass, mode: TuneMode, precision: Precision) -> Vec<ConvKernel> {
    let mut out = vec![builtin(gpu, cfg, precision)];
    let mut push = |k: ConvKernel| {
        let same = |a: &ConvKernel| match (a, &k) {
            (ConvKernel::Register(a), ConvKernel::Register(b)) => match pass {
                ConvPass::BackwardWeight => (a.wgrad_ci, a.wgrad_n) == (b.wgrad_ci, b.wgrad_n),
                _ => (a.gemm_m, a.gemm_n) == (b.gemm_m, b.gemm_n),
            },
            (a, b) => a == b,
        };
        if !out.iter().any(same) {
            out.push(k);
        }
    };
    match mode {
        TuneMode::Off => {}
        // On a CPU adapter the tiled kernels lose by far (lavapipe: 8-25x slower than the
        // register blocks on every senet layer, conv2d_tiled.wgsl's header): quick keeps the
        // built-in choice there without timing (full tuning of senet w0.25 b32 took 491 s).
        TuneMode::Quick if gpu.is_cpu() => {}
        TuneMode::Quick => {
            push(ConvKernel::Register(Tiles::for_layer(gpu, cfg)));
            SmemTiles::ALL[..4].iter().for_each(|&t| push(ConvKernel::Tiled(t)));
        }
        TuneMode::Full => {
            push(ConvKernel::Register(Tiles::for_layer(gpu, cfg)));
            for gemm_m in [8, 16] {
                for gemm_n in [8, 16] {
                    push(ConvKernel::Register(Tiles { gemm_m, gemm_n, wgrad_ci: gemm_n / 2, wgrad_n: gemm_n }));
                }
            }
            SmemTiles::ALL.iter().for_each(|&t| push(ConvKernel::Tiled(t)));
        }
    }
    out
}

/// The tuning cache's key for a pass of a layer shape in a `precision` plan. An f32 plan's key is
/// the shape alone, as before precisions existed (every entry of an older cache was timed in f32,
/// so it stays valid under the same key and the file keeps its version); an f16 plan's adds
/// " f16", and " coop8" or " coop16" where cooperative matrices are candidates (an adapter with
/// `SENET_COOP=off` is the same device key but another set of candidates). A grouped layer's key
/// names its groups (" g32"); an ordinary layer's keeps the key it had before groups existed.
pub fn tune_key(gpu: &Gpu, cfg: &Conv2dConfig, pass: ConvPass, precision: Precision) -> String {
    let c = cfg;
    let variant = match (precision, gpu.coop_tile) {
        (Precision::F32, _) => String::new(),
        (Precision::F16, None) => " f16".to_string(),
        (Precision::F16, Some(t)) => format!(" f16 coop{t}"),
    };
    let groups = if c.groups == 1 { String::new() } else { format!(" g{}", c.groups) };
    format!(
        "conv2d {pass:?} n{} c{}->{} {}x{} k{}x{} s{}x{} p{}x{} d{}x{}{groups} bias{}{variant}",
        c.n,
        c.c_in,
        c.c_out,
        c.h,
        c.w,
        c.kh,
        c.kw,
        c.stride.0,
        c.stride.1,
        c.pad.0,
        c.pad.1,
        c.dilation.0,
        c.dilation.1,
        u8::from(c.bias)
    )
}

/// The kernel for `pass` of a layer shaped `cfg` in a `precision` plan: the tuning cache's
/// answer, else the fastest candidate timed now in that precision (and remembered), else — with
/// nothing to time — the built-in choice. `--conv-tiles` (pinning the register blocks, for
/// measuring) bypasses the tuner.
pub fn choose(gpu: &Gpu, cfg: &Conv2dConfig, pass: ConvPass, precision: Precision) -> Result<ConvKernel> {
    let mode = gpu.tuner.mode;
    let cands = candidates(gpu, cfg, pass, mode, precision);
    if Tiles::pinned(gpu).is_some() {
        // The pin is the register blocks' (Tiles::for_layer reads it), whatever the built-in
        // choice of this precision would be.
        return Ok(ConvKernel::Register(Tiles::for_layer(gpu, cfg)));
    }
    if mode == TuneMode::Off {
        return Ok(cands[0]);
    }
    let key = tune_key(gpu, cfg, pass, precision);
    if let Some(entry) = gpu.tuner.cached(&key) {
        match ConvKernel::decode(&entry.choice) {
            // A full run times again what a quick one chose.
            Some(k) if !(mode == TuneMode::Full && entry.mode != TuneMode::Full) => return Ok(k),
            Some(_) => gpu.tuner.forget(&key),
            None => {
                eprintln!(
                    "warning: the tuning cache names an unknown kernel {:?} for {key}; timing again",
                    entry.choice
                );
                gpu.tuner.forget(&key);
            }
        }
    }
    if cands.len() == 1 {
        return Ok(cands[0]);
    }
    let start = std::time::Instant::now();
    // Scratch buffers of the layer's shapes in the plan's types (activations and GEMM operands of
    // its precision, the bias and the weight gradient f32), zero-filled (the kernels' speed does
    // not depend on the values), freed when the choice is made.
    let t = |label: &str, shape: &[usize]| Tensor::zeros_of(gpu, label, shape, precision.dtype());
    let (inp, out) = (t("tuning input", &cfg.input_shape())?, t("tuning output", &cfg.output_shape())?);
    let weight = t("tuning weight", &cfg.weight_shape())?;
    let dweight = Tensor::zeros(gpu, "tuning weight gradient", &cfg.weight_shape())?;
    let bias = if cfg.bias { Some(Tensor::zeros(gpu, "tuning bias", &[cfg.c_out])?) } else { None };
    let bufs = ConvBuffers {
        inp: &inp,
        weight: &weight,
        bias: bias.as_ref(),
        out: &out,
        dout: &out,
        dinp: &inp,
        dweight: &dweight,
    };
    let mut best: Option<(ConvKernel, f64)> = None;
    for &k in &cands {
        // A candidate the adapter cannot build or run (workgroup limits, grid size) is skipped.
        let Ok(dispatches) = conv2d_pass(gpu, cfg, pass, k, &bufs) else { continue };
        let group: Vec<&Dispatch> = dispatches.iter().collect();
        let Ok(times) = gpu.time_passes(&[group.clone(), group.clone(), group.clone(), group]) else { continue };
        // The first run warms caches and clocks; the best of the other three counts.
        let secs = times[1..].iter().copied().fold(f64::INFINITY, f64::min);
        if gpu.tuner.verbose {
            eprintln!("tune {key}: {k} {:.3} ms", secs * 1e3);
        }
        // Another kernel must beat the built-in by 5 % to replace it: a win inside the timing
        // noise would trade a measured, long-tested choice for nothing.
        let margin = if best.is_some_and(|(b, _)| b == cands[0]) { 0.95 } else { 1.0 };
        if best.is_none_or(|(_, b)| secs < b * margin) {
            best = Some((k, secs));
        }
    }
    let (kernel, secs) = best.with_context(|| format!("no conv2d kernel could run {key}"))?;
    gpu.tuner.store(&key, TuneEntry { choice: kernel.encode(), ms: secs * 1e3, mode }, start.elapsed().as_secs_f64());
    Ok(kernel)
}
