//! The `Register` family: `conv2d.wgsl`'s register blocks, no workgroup memory (the CPU-adapter
//! family and every adapter's built-in choice for f32 plans). Each invocation owns a
//! [`RegisterTiles`] block of the GEMM; forward and input gradient are one entry point
//! (`conv2d_gemm`, MODE 0 / 1), the weight gradient another (`conv2d_backward_weight`), split over
//! N·OH·OW and summed in a fixed order by `conv2d_backward_weight_reduce`.

use anyhow::{Result, ensure};

use super::{Conv2dConfig, WG, dinp_addend, forward_bias, weight_grad_reduce};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};
use crate::ops::{el, expect_shape, placeholder, placeholder_like, to_u32};

/// Register-block shapes of `conv2d.wgsl`, WGSL `override` constants fixed per pipeline.
/// Forward and input-gradient invocations own `gemm_m` pixels (4, 8 or 16) x `gemm_n` channels (8
/// or 16); weight-gradient invocations own `wgrad_ci` input channels (4, 8 or 16) x `wgrad_n` output
/// channels (8 or 16) at one tap — or, where [`row3_wgrad`], 4 input channels x `wgrad_n` at a
/// kernel row's three taps (`wgrad_ci` unused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterTiles {
    pub gemm_m: usize,
    pub gemm_n: usize,
    pub wgrad_ci: usize,
    pub wgrad_n: usize,
}

impl RegisterTiles {
    /// Every shape the shaders implement.
    pub const ALL: [RegisterTiles; 36] = {
        let mut all = [RegisterTiles { gemm_m: 4, gemm_n: 8, wgrad_ci: 4, wgrad_n: 8 }; 36];
        let mut i = 0;
        while i < 36 {
            all[i] = RegisterTiles {
                gemm_m: [4, 8, 16][i % 3],
                gemm_n: [8, 16][(i / 3) % 2],
                wgrad_ci: [4, 8, 16][(i / 6) % 3],
                wgrad_n: [8, 16][i / 18],
            };
            i += 1;
        }
        all
    };

    /// The blocks for this adapter: `GpuOptions::conv_tiles` (`--conv-tiles M,N,CI,CO`) pins them
    /// (for measuring), else
    /// on a CPU adapter the largest: 16 x 16 and 16 x 16. On lavapipe every storage-buffer load runs lane by lane
    /// while the FMAs run 8 lanes at once, so the block with the most FMAs per load pays,
    /// spilled accumulators and all. Measured A/B in one run each (senet bench, width 0.25,
    /// batch 32): against 4 x 8, 8 pixels x 8 channels made forward and input gradient 1.4x
    /// faster, 8 x 16 another 1.2-1.3x and 16 x 16 another 1.1x (forward) and 1.4x (input
    /// gradient): the whole step 185 -> 215 images/s on a quiet machine. The weight gradient
    /// gained 1.2x from 4 x 8 to 8 x 8 and 1.2x more from 8 x 16. The 16-pixel pipelines cost
    /// ~3 s more to compile when Mesa's shader cache is cold (first step 8 s instead of 5 s at
    /// width 0.25). Other adapters take 8 x 16: 256 accumulators would not fit a GPU thread's
    /// 255 registers; their own choice awaits measurements there. The weight gradient's 16 x 16
    /// (CPU adapters) against 8 x 16, `--conv-tiles 16,16,16,16` against `16,16,8,16`, senet bench
    /// width 1 batch 128 on lavapipe, 2 rounds interleaved in one run, weight-gradient ms in the
    /// same profiled step as an unchanged forward: 5417 vs 7623 with the forward at 4870 vs 6444
    /// (the host's speed moved between runs), then 6241 vs 7431 with the forward at 6427 vs 6424:
    /// 1.06x and 1.19x faster, the step 6.86 vs 6.58 images/s in the second round.
    pub fn for_adapter(gpu: &Gpu) -> RegisterTiles {
        let (gemm_m, wgrad_ci) = if gpu.is_cpu() { (16, 16) } else { (8, 8) };
        RegisterTiles::pinned(gpu).unwrap_or(RegisterTiles { gemm_m, gemm_n: 16, wgrad_ci, wgrad_n: 16 })
    }

    /// The blocks `GpuOptions::conv_tiles` pins, if it pins a shape the shaders implement.
    pub fn pinned(gpu: &Gpu) -> Option<RegisterTiles> {
        let [gemm_m, gemm_n, wgrad_ci, wgrad_n] = gpu.conv_tiles?;
        let t = RegisterTiles { gemm_m, gemm_n, wgrad_ci, wgrad_n };
        RegisterTiles::ALL.contains(&t).then_some(t)
    }

    /// `M,N,CI,CO` (`--conv-tiles`), one of [`RegisterTiles::ALL`], or an error listing them.
    pub fn parse(s: &str) -> Result<RegisterTiles> {
        let v: Vec<usize> =
            s.split(',').map(|x| x.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|_| {
                anyhow::anyhow!("--conv-tiles {s:?}: expected four numbers M,N,CI,CO (e.g. 16,16,8,16)")
            })?;
        let t = match v[..] {
            [gemm_m, gemm_n, wgrad_ci, wgrad_n] => RegisterTiles { gemm_m, gemm_n, wgrad_ci, wgrad_n },
            _ => anyhow::bail!("--conv-tiles {s:?}: expected four numbers M,N,CI,CO (e.g. 16,16,8,16)"),
        };
        ensure!(
            RegisterTiles::ALL.contains(&t),
            "--conv-tiles {s:?}: not a shape the kernels implement (M 4, 8 or 16; N 8 or 16; CI 4, 8 or 16; CO 8 or 16)"
        );
        Ok(t)
    }

    /// `for_adapter` narrowed to a layer: a block twice as wide as a channel count that fits in
    /// its smaller size only adds padded columns (the 3-channel first layer's weight gradient:
    /// 8 input channels per block would be 5/8 padding, 4 is 1/4). Unless `--conv-tiles` pins
    /// every size.
    pub fn for_layer(gpu: &Gpu, cfg: &Conv2dConfig) -> RegisterTiles {
        let t = RegisterTiles::for_adapter(gpu);
        if RegisterTiles::pinned(gpu).is_some() {
            return t;
        }
        let narrow = |mut size: usize, smallest: usize, channels: usize| {
            while size > smallest && channels <= size / 2 {
                size /= 2;
            }
            size
        };
        // A block spans the channels of one group: a grouped layer's are c_in/groups, c_out/groups.
        let (c_in, c_out) = (cfg.c_in_group(), cfg.c_out_group());
        RegisterTiles {
            gemm_m: t.gemm_m,
            // Forward blocks run over output channels, input-gradient blocks over input channels;
            // one pipeline constant serves both, so narrow it only when both fit.
            gemm_n: narrow(t.gemm_n, 8, c_out.max(c_in)),
            wgrad_ci: narrow(t.wgrad_ci, 4, c_in),
            wgrad_n: narrow(t.wgrad_n, 8, c_out),
        }
    }

    /// The register GEMM's constants; `mode` 0 is the forward, 1 the input gradient; `form` its
    /// general, 1x1 or 3-wide form ([`gemm_form`]).
    fn gemm_constants(&self, mode: u32, form: GemmForm) -> [(&'static str, f64); 6] {
        [
            ("WG", WG as f64),
            ("GEMM_M", self.gemm_m as f64),
            ("GEMM_N", self.gemm_n as f64),
            ("MODE", f64::from(mode)),
            ("PLAIN", f64::from(u8::from(form == GemmForm::Plain))),
            ("ROW3", f64::from(u8::from(form == GemmForm::Row3))),
        ]
    }
}

/// Whether the register GEMM (forward and input gradient) runs `cfg` in its 1x1 form (`PLAIN` in
/// conv2d.wgsl): [`Gpu::conv_1x1`], a 1x1 kernel, stride 1, no padding — a GEMM row's source is
/// its own pixel — and H*W a multiple of 4, so four neighbouring rows from a multiple of 4 on are
/// one aligned vec4 of one image. The same values as the general form (every tap is live, every
/// sum in the same order).
pub fn plain_gemm(gpu: &Gpu, cfg: &Conv2dConfig) -> bool {
    gpu.conv_1x1 && (cfg.kh, cfg.kw, cfg.stride, cfg.pad) == (1, 1, (1, 1), (0, 0)) && (cfg.h * cfg.w).is_multiple_of(4)
}

/// Whether the register GEMM (forward and input gradient) runs `cfg` in its 3-wide form (`ROW3`
/// in conv2d.wgsl): [`Gpu::conv_3x3`], a kernel 3 wide with padding 1, dilation 1 and stride 1
/// across, stride 1 down, and W a multiple of 4, so that four neighbouring rows from a multiple of
/// 4 on are one aligned vec4 of one image row, and a kernel row's three taps read it and one
/// neighbour either side. Any kernel height, padding and dilation down. Not the general form's
/// bits: the same products, summed in another order.
pub fn row3_gemm(gpu: &Gpu, cfg: &Conv2dConfig) -> bool {
    gpu.conv_3x3
        && cfg.kw == 3
        && cfg.pad.1 == 1
        && cfg.dilation.1 == 1
        && cfg.stride == (1, 1)
        && cfg.w.is_multiple_of(4)
}

/// Whether the weight gradient (`conv2d_backward_weight`) runs `cfg` a kernel row at a time
/// (`WGRAD_ROW3` in conv2d.wgsl): [`Gpu::conv_3x3`], a kernel 3 wide with padding 1, dilation 1
/// and stride 1 across (so OW = W and a row's three taps read three neighbouring columns), stride
/// 1 down. Any width (no vec4 loads), any kernel height. The same values as the one-tap walk bit
/// for bit (for finite inputs): each tap's sum over the same pixels in the same order.
pub fn row3_wgrad(gpu: &Gpu, cfg: &Conv2dConfig) -> bool {
    gpu.conv_3x3 && cfg.kw == 3 && cfg.pad.1 == 1 && cfg.dilation.1 == 1 && cfg.stride == (1, 1)
}

/// The register GEMM's form for `cfg` (forward and input gradient).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GemmForm {
    General,
    /// [`plain_gemm`]
    Plain,
    /// [`row3_gemm`]
    Row3,
}

/// Which form `cfg` takes on `gpu`: the 1x1 form before the 3-wide one (no layer qualifies for
/// both: one is 1 wide, the other 3).
fn gemm_form(gpu: &Gpu, cfg: &Conv2dConfig) -> GemmForm {
    if plain_gemm(gpu, cfg) {
        GemmForm::Plain
    } else if row3_gemm(gpu, cfg) {
        GemmForm::Row3
    } else {
        GemmForm::General
    }
}

/// Bindings 11 and 12 of the register GEMM (`inp4`, `dout4`: the input and the output gradient
/// read four pixels at a time): in the 1x1 and 3-wide forms the tensor the pass reads so, else
/// (and for the one it does not read) a one-vec4 placeholder of its type that no invocation reads.
struct QuadBinds {
    form: GemmForm,
    unused: Tensor,
}

impl QuadBinds {
    fn new(gpu: &Gpu, cfg: &Conv2dConfig, like: &Tensor) -> Result<QuadBinds> {
        Ok(QuadBinds { form: gemm_form(gpu, cfg), unused: Tensor::zeros_of(gpu, "unused", &[4], like.dtype)? })
    }

    /// `(11, inp)` and `(12, dout)` where the pass reads it four pixels at a time (`Some`), the
    /// placeholder for the other.
    fn binds<'a>(&'a self, inp: Option<&'a Tensor>, dout: Option<&'a Tensor>) -> [Bind<'a>; 2] {
        let vec4 = self.form != GemmForm::General;
        let pick = |t: Option<&'a Tensor>| if vec4 { t.unwrap_or(&self.unused) } else { &self.unused };
        [Bind::Tensor(11, pick(inp)), Bind::Tensor(12, pick(dout))]
    }
}

/// The module the GEMM entry points (`conv2d_gemm`, `conv2d_backward_weight`, `conv2d_backward`)
/// come from: `conv2d_lanes` (`conv2d.wgsl` + `conv2d_lanes.wgsl`: the values every invocation of
/// a workgroup reads — the GEMM's column weights, the weight gradient's dout — loaded once per
/// subgroup and broadcast) where [`Gpu::conv_lanes`], else `conv2d`. The same values bit for bit
/// either way (for finite inputs).
fn gemm_module(gpu: &Gpu) -> &'static str {
    if gpu.conv_lanes { "conv2d_lanes" } else { "conv2d" }
}

/// Workgroups the weight gradient should fill before splitting K stops paying: a CPU adapter
/// has a few cores, a GPU a hundred multiprocessors or more.
pub(super) fn split_target(gpu: &Gpu) -> usize {
    if gpu.is_cpu() { 256 } else { 65536 }
}

/// How many ranges of m the weight-gradient reduction is split into: enough invocations (one
/// per block of `tiles`) to fill the device (about `target`), each range at least
/// `MIN_SPLIT_LEN` long.
pub fn weight_grad_splits(cfg: &Conv2dConfig, tiles: RegisterTiles, target: usize) -> usize {
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

/// The forward pass (`conv2d_gemm`, MODE 0), and with `stats` the batch statistics of its
/// output per block of `tiles.gemm_m` times that many invocations' pixels
/// ([`super::ConvBuffers::out_stats`]; not with `relu`, whose values they would not describe).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: RegisterTiles,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    relu: bool,
    stats: Option<(&Tensor, usize)>,
) -> Result<Vec<Dispatch>> {
    expect_shape("conv2d input", inp, &cfg.input_shape())?;
    expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
    expect_shape("conv2d output", out, &cfg.output_shape())?;
    let rows = cfg.n * cfg.out_h() * cfg.out_w();
    if let Some((t, lanes)) = stats {
        ensure!(!relu, "conv2d: batch statistics of a forward with a fused ReLU");
        ensure!((1..=64).contains(&lanes), "conv2d: batch statistics merged over {lanes} invocations (1 to 64)");
        expect_shape("conv2d batch statistics", t, &[rows.div_ceil(tiles.gemm_m).div_ceil(lanes), cfg.c_out, 2])?;
    }
    let lanes = stats.map_or(Ok(0), |(_, l)| to_u32("statistics lanes", l))?;
    // conv2d_gemm in MODE 0 never reads dout (binding 5) or the addend (6), nor the bias without one.
    let unused = placeholder(gpu)?;
    let unused_act = placeholder_like(gpu, inp)?;
    let no_stats = placeholder(gpu)?;
    let bias = forward_bias(cfg, bias, &unused)?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?.with_relu(relu).with_stats(lanes));
    let cols = (cfg.c_out_group(), cfg.groups);
    let grid = gemm_grid(gpu, rows, tiles.gemm_m, cols, tiles.gemm_n, 1)?;
    let quads = QuadBinds::new(gpu, cfg, inp)?;
    let [inp4, dout4] = quads.binds(Some(inp), None);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, bias),
        Bind::Tensor(4, out),
        Bind::Tensor(5, &unused_act),
        Bind::Tensor(6, &unused_act),
        inp4,
        dout4,
        Bind::Tensor(13, stats.map_or(&no_stats, |(t, _)| t)),
    ];
    let stats_bytes = stats.map_or(0, |(t, _)| t.numel()) as f64 * 4.0;
    let bytes = el(inp) * (inp.numel() + weight.numel() + out.numel()) as f64 + stats_bytes;
    let consts = tiles.gemm_constants(0, quads.form);
    Ok(vec![
        gpu.dispatch_in(Precision::of(inp), gemm_module(gpu), "conv2d_gemm", &consts, &binds, grid)?
            .labelled("conv2d_forward")
            .with_cost(2.0 * cfg.macs() as f64, bytes),
    ])
}

/// The input gradient's GEMM (`conv2d_gemm` in MODE 1) as either entry runs it: shapes checked,
/// its workgroup grid and its cost (flops, bytes).
struct InputGrad {
    grid: [u32; 3],
    flops: f64,
    bytes: f64,
}

impl InputGrad {
    fn new(
        gpu: &Gpu,
        cfg: &Conv2dConfig,
        tiles: RegisterTiles,
        dout: &Tensor,
        weight: &Tensor,
        dinp: &Tensor,
        addend: Option<&Tensor>,
    ) -> Result<InputGrad> {
        expect_shape("conv2d dout", dout, &cfg.output_shape())?;
        expect_shape("conv2d weight", weight, &cfg.weight_shape())?;
        expect_shape("conv2d dinp", dinp, &cfg.input_shape())?;
        let cols = (cfg.c_in_group(), cfg.groups);
        let grid = gemm_grid(gpu, cfg.n * cfg.h * cfg.w, tiles.gemm_m, cols, tiles.gemm_n, 1)?;
        // With an addend, one more input-sized read and one addition per element.
        let read_addend = addend.map_or(0, |a| a.numel());
        let flops = 2.0 * cfg.macs() as f64 + read_addend as f64;
        let bytes = el(dout) * (dout.numel() + weight.numel() + dinp.numel() + read_addend) as f64;
        Ok(InputGrad { grid, flops, bytes })
    }
}

/// The weight gradient's GEMM (`conv2d_backward_weight`) as either entry runs it: shapes checked,
/// the reduction over m split `splits` ways (1 = written directly, more = into slices of a partial
/// buffer summed by the reduce), its grid and cost.
struct WeightGrad {
    /// A kernel row at a time ([`row3_wgrad`]), else the one-tap walk.
    row3: bool,
    precision: Precision,
    splits: usize,
    split_len: usize,
    grid: [u32; 3],
    flops: f64,
    bytes: f64,
}

impl WeightGrad {
    fn new(
        gpu: &Gpu,
        cfg: &Conv2dConfig,
        tiles: RegisterTiles,
        (inp, dout, dweight): (&Tensor, &Tensor, &Tensor),
        splits: usize,
    ) -> Result<WeightGrad> {
        let row3 = row3_wgrad(gpu, cfg);
        let kernel = super::ConvKernel::Register(tiles);
        let (splits, split_len) = super::weight_grad_split(gpu, cfg, kernel, (inp, dout, dweight), splits, 1)?;
        // Columns come in blocks of `wgrad_ci` input channels (of a group) at one tap:
        // (kh*kw) * ceil((c_in/groups)/ci) of them; each invocation owns `wgrad_n` output channels
        // of one group for one such block.
        // A kernel row at a time ([`row3_wgrad`]): blocks of 4 input channels at one kernel row.
        let rows = if row3 {
            cfg.kh * cfg.c_in_group().div_ceil(4)
        } else {
            cfg.kh * cfg.kw * cfg.c_in_group().div_ceil(tiles.wgrad_ci)
        };
        let grid = gemm_grid(gpu, rows, 1, (cfg.c_out_group(), cfg.groups), tiles.wgrad_n, splits)?;
        let flops = 2.0 * cfg.macs() as f64;
        let bytes = el(inp) * (inp.numel() + dout.numel()) as f64 + 4.0 * (dweight.numel() * splits) as f64;
        Ok(WeightGrad { row3, precision: Precision::of(inp), splits, split_len, grid, flops, bytes })
    }

    /// Where the GEMM writes: `None` for the weight gradient itself, or a partial buffer for the
    /// reduce.
    fn partial(&self, gpu: &Gpu, cfg: &Conv2dConfig) -> Result<Option<Tensor>> {
        if self.splits == 1 {
            return Ok(None);
        }
        let k = cfg.c_in_group() * cfg.kh * cfg.kw;
        Ok(Some(Tensor::zeros(gpu, "conv2d dweight partial", &[self.splits, cfg.c_out, k])?))
    }

    /// The GEMM dispatch `first` (writing into `target`), then the reduce if the m range is split.
    fn finish(
        &self,
        gpu: &Gpu,
        cfg: &Conv2dConfig,
        params: &wgpu::Buffer,
        first: Dispatch,
        (partial, dweight): (Option<&Tensor>, &Tensor),
    ) -> Result<Vec<Dispatch>> {
        let mut d = vec![first];
        if let Some(partial) = partial {
            d.push(weight_grad_reduce(gpu, cfg, self.precision, params, partial, dweight)?);
        }
        Ok(d)
    }
}

impl RegisterTiles {
    /// The weight-gradient constants of conv2d.wgsl; `row3`: a kernel row at a time
    /// ([`row3_wgrad`]).
    fn wgrad_constants(&self, row3: bool) -> [(&'static str, f64); 4] {
        [
            ("WG", WG as f64),
            ("WGRAD_CI", self.wgrad_ci as f64),
            ("WGRAD_N", self.wgrad_n as f64),
            ("WGRAD_ROW3", f64::from(u8::from(row3))),
        ]
    }
}

/// The input gradient (`conv2d_gemm`, MODE 1: the transposed convolution, gathered), plus
/// `addend` if given ([`super::ConvBuffers::dinp_addend`]).
pub(super) fn backward_input(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: RegisterTiles,
    dout: &Tensor,
    weight: &Tensor,
    dinp: &Tensor,
    addend: Option<&Tensor>,
) -> Result<Vec<Dispatch>> {
    let g = InputGrad::new(gpu, cfg, tiles, dout, weight, dinp, addend)?;
    let params = gpu.uniform("conv2d params", &cfg.params(1, 0)?.with_accumulate(addend.is_some()));
    // conv2d_gemm in MODE 1 reads dout and writes dinp through the forward's output binding; the
    // addend binding is read only with one; the input and bias bindings are declared by the
    // shared entry point but never read.
    let unused = placeholder(gpu)?;
    let unused_act = placeholder_like(gpu, dout)?;
    let addend_or_unused = dinp_addend(cfg, dinp, addend, &unused_act)?;
    let no_stats = placeholder(gpu)?;
    let quads = QuadBinds::new(gpu, cfg, dout)?;
    let [inp4, dout4] = quads.binds(None, Some(dout));
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, &unused_act),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, dinp),
        Bind::Tensor(5, dout),
        Bind::Tensor(6, addend_or_unused),
        inp4,
        dout4,
        // The forward's batch statistics, never written here.
        Bind::Tensor(13, &no_stats),
    ];
    let consts = tiles.gemm_constants(1, quads.form);
    Ok(vec![
        gpu.dispatch_in(Precision::of(dout), gemm_module(gpu), "conv2d_gemm", &consts, &binds, g.grid)?
            .labelled("conv2d_backward_input")
            .with_cost(g.flops, g.bytes),
    ])
}

/// The weight gradient (`conv2d_backward_weight`) with the reduction over m split `splits` ways
/// (1 = no second pass).
pub(super) fn backward_weight(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: RegisterTiles,
    inp: &Tensor,
    dout: &Tensor,
    dweight: &Tensor,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    let g = WeightGrad::new(gpu, cfg, tiles, (inp, dout, dweight), splits)?;
    let params = gpu.uniform("conv2d params", &cfg.params(g.splits, g.split_len)?);
    let consts = tiles.wgrad_constants(g.row3);
    let partial = g.partial(gpu, cfg)?;
    let out = partial.as_ref().unwrap_or(dweight);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(5, dout), Bind::Tensor(7, out)];
    let first = gpu
        .dispatch_in(Precision::of(inp), gemm_module(gpu), "conv2d_backward_weight", &consts, &binds, g.grid)?
        .with_cost(g.flops, g.bytes);
    g.finish(gpu, cfg, &params, first, (partial.as_ref(), dweight))
}

/// Both gradients of a layer in one dispatch (`conv2d_backward`): the input gradient's blocks of
/// `tiles.gemm_*` (plus `addend` if given) and the weight gradient's of `tiles.wgrad_*` split
/// `splits` ways, interleaved ([`super::joint_grid`]), then the reduce if split. Bit for bit [`backward_input`] and
/// [`backward_weight`]: each block is the invocation they would run.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_joint(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    tiles: RegisterTiles,
    (inp, dout, weight): (&Tensor, &Tensor, &Tensor),
    dinp: &Tensor,
    addend: Option<&Tensor>,
    dweight: &Tensor,
    splits: usize,
) -> Result<Vec<Dispatch>> {
    let d = InputGrad::new(gpu, cfg, tiles, dout, weight, dinp, addend)?;
    let w = WeightGrad::new(gpu, cfg, tiles, (inp, dout, dweight), splits)?;
    let (grid, joint) = super::joint_grid(gpu, d.grid, w.grid)?;
    let params = cfg.params(w.splits, w.split_len)?.with_accumulate(addend.is_some()).with_joint(joint);
    let params = gpu.uniform("conv2d params", &params);
    let unused = placeholder(gpu)?;
    let unused_act = placeholder_like(gpu, dout)?;
    let addend_or_unused = dinp_addend(cfg, dinp, addend, &unused_act)?;
    let no_stats = placeholder(gpu)?;
    let partial = w.partial(gpu, cfg)?;
    let quads = QuadBinds::new(gpu, cfg, dout)?;
    let [inp4, dout4] = quads.binds(None, Some(dout));
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, &unused),
        Bind::Tensor(4, dinp),
        Bind::Tensor(5, dout),
        Bind::Tensor(6, addend_or_unused),
        Bind::Tensor(7, partial.as_ref().unwrap_or(dweight)),
        inp4,
        dout4,
        Bind::Tensor(13, &no_stats),
    ];
    let mut consts = tiles.gemm_constants(1, quads.form).to_vec();
    consts.extend_from_slice(&tiles.wgrad_constants(w.row3)[1..]);
    let first = gpu
        .dispatch_in(Precision::of(dout), gemm_module(gpu), "conv2d_backward", &consts, &binds, grid)?
        .with_cost(d.flops + w.flops, d.bytes + w.bytes);
    w.finish(gpu, cfg, &params, first, (partial.as_ref(), dweight))
}
