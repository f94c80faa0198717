// conv2d: NCHW 2-D convolution, PyTorch semantics (weight [c_out, c_in/groups, kh, kw], optional
// bias, stride, zero padding, dilation, groups), forward and backward, as implicit GEMMs.
//
//   forward          out[m, co]  = bias[co] + sum_k  patch(m, k) * weight[co, k]   m = (n, oy, ox), k = (ci, ky, kx)
//   backward_input   dinp[q, ci] = sum_(co,ky,kx) dout[n, co, oy, ox] * weight[co, ci, ky, kx]
//                    where oy*stride - pad + ky*dil = iy (the transposed convolution, gathered: no atomics)
//   backward_weight  dweight[co, k] = sum_m dout[m, co] * patch(m, k)       (split over m, then reduced)
//   backward_bias    dbias[co] = sum_m dout[m, co]                          (one workgroup per channel)
//
// Groups: with `groups` = g the three GEMMs are g independent GEMMs, one per group, each over the
// group's c_in/g input and c_out/g output channels (ci and co above are channels within the
// group). A block of columns never straddles two groups: gid.y numbers (group, block within the
// group), so every column of a block shares the group's source channels and each loaded value
// still feeds a whole row of FMAs. Columns past the group's end are padding, never written; with
// few channels per group (depthwise: 1) most of a block is padding — correct, not fast.
//
// Register blocking, no workgroup memory (the CPU-driver family; conv2d_tiled.wgsl is the
// workgroup-memory one); on CPU adapters the GEMM's weights come through subgroup broadcasts
// (LANES, v14): each invocation owns a block of the output GEMM in vec4 accumulators —
// GEMM_M rows (4, 8 or 16 pixels) x GEMM_N columns (8 or 16 channels) for the forward and the input
// gradient, which are one kernel (conv2d_gemm, MODE 0 / 1); WGRAD_CI input channels (4, 8 or 16) x
// WGRAD_N output channels (8 or 16) at one tap for the weight gradient (conv2d_backward_weight;
// for a layer 3 wide with padding 1 and stride 1, 4 input channels x WGRAD_N at a kernel row's
// three taps, WGRAD_ROW3; conv2d_backward runs a layer's input-gradient and weight-gradient blocks in one dispatch, as a
// plan fused with `--fuse on` does on any adapter). The sizes are override
// constants chosen per adapter and layer by ops::conv2d::RegisterTiles. On lavapipe every storage
// load runs lane by lane (Mesa 22.3's gallivm cannot tell an address all lanes share) while FMAs
// run 8 lanes at once, so what pays is reusing each loaded value in as many FMAs as the registers
// hold, and loading a value the whole workgroup shares once per subgroup (LANES).
//
// The weight gradient is a reduction over N*OH*OW. WGSL has no float atomics, so it is split into
// `splits` contiguous ranges of m, each written to its own slice of a partial buffer, and the slices
// are summed in a fixed order by conv2d_backward_weight_reduce: deterministic, same result every run.
//
// Activations, their gradients and the weights the GEMMs read are `act` (f32, or f16 in an f16
// plan: the host defines it per compiled variant); loads widen to f32, every FMA and accumulator is
// f32, outputs narrow once when stored. Weight and bias gradients and their partials are f32.
//
// Versions (lavapipe, senet bench width 0.25 batch 32 unless said; each ratio A/B in one run):
//   v1  one invocation per output element, (channel, tap) inner loop with a padding branch.
//   v2  weight gradient walks its pixels with counters instead of dividing; the stride-1 input
//       gradient skips the division.
//   v3  taps outside, channels inside, padded taps masked instead of branched: forward 1.4x,
//       input gradient 4x.
//   v4  4x8 output blocks per invocation for forward and input gradient (vec4 accumulators):
//       together with v3, input gradient ~5x, forward ~1.7x, whole step ~2.3x over v2.
//   v5  blocks as override constants; 8x8 -> 8x16: forward and input gradient 1.2-1.3x more, weight
//       gradient 1.2x (8x8) and 1.2x more (8x16); the weight gradient walks m by rows with the
//       padding cut off the row ends.
//   v6  16x16 on CPU adapters: forward 1.1x, input gradient 1.4x; whole step 185 -> 215 images/s
//       (quiet machine); the 16-pixel pipelines cost ~3 s more on a cold Mesa shader cache.
//   v7  forward and input gradient from one source, conv2d_gemm with a MODE override: the same
//       arithmetic in the same order as v6's two hand-copied kernels (a training run's weights
//       are byte-identical); quiet A/B beside v6 in one run, w0.25 b128: 275/262 vs 273/260
//       train images/s, w1 b128: 21.0 vs 20.1 — no change beyond the runs' spread.
//   v8  `act` storage (loads widen to f32, stores narrow) for --precision f16; the f32
//       variant is v7 bit for bit.
//   v9  groups: gid.y numbers (group, block within the group); with groups = 1 the same
//       arithmetic as v8. Measured with `cargo bench --bench conv_groups` (dev build; GPU time
//       dominates) on lavapipe, 2 cores shared with four other builds (load average 8-11), so
//       only ratios within one run mean anything. 16x128x14x14 -> 128, 3x3, GFLOP/s forward /
//       input gradient / weight gradient, f32: ungrouped 0.89 / 0.91 / 0.66; 32 groups of 4
//       0.24 / 0.22 / 0.25 (f16 0.45 / 0.29 / 0.21); depthwise (128 groups) 0.044 / 0.025 /
//       0.010. Per FLOP a 4-channel group runs ~3-4x slower than the ungrouped layer: each tap
//       works out 16 row addresses for a reduction over only 4 channels, and the 8-wide column
//       block is half padding. Depthwise is correct, not fast (15/16 of a block idle); a
//       depthwise-specific kernel is the next version if a model needs one.
//   v10 the forward's ReLU epilogue (`epilogue`, conv2d_params.wgsl: a uniform flag read
//       per stored value) for evaluation passes with a batch norm folded in; with the flag off
//       the arithmetic is v9's (training plans unchanged). Not timed.
//   v11 the input gradient's addend (`accumulate`, conv2d_params.wgsl): the other reader's
//       gradient of a forked activation added as the value is stored, in place of the plan's
//       separate add_forward (3 tensor passes become 1 extra read); with the flag off the
//       arithmetic is v10's. Not timed.
//   v12 16 input channels per weight-gradient invocation (WGRAD_CI 16: 16 x 16 blocks, 8 FMAs a
//       load instead of 5.3), the built-in choice on CPU adapters; the 4- and 8-channel blocks are
//       v11's arithmetic. senet bench width 1 batch 128 on lavapipe, --conv-tiles 16,16,16,16
//       against 16,16,8,16, 2 rounds interleaved in one run: the weight gradient 1.06x and 1.19x
//       faster against the forward of the same profiled step (register.rs has the figures).
//   v13 conv2d_backward: a layer's input gradient and weight gradient in one dispatch,
//       the two entry points' bodies as functions (gemm_block, wgrad_block) and the addend moved
//       to binding 6 so binding 1 can hold the weight gradient's input; every block is the
//       invocation the separate kernels run, so the values are v12's bit for bit. One dispatch
//       fewer per convolution whose input gradient is read (base SENet 4, SE-ResNet-50 52).
//       Recorded on GPUs only: on lavapipe it took 1.14-1.61x the two dispatches' time
//       (benches/conv_backward.rs, one run); on an NVIDIA H200, SE-ResNet-50 f32 at batch 64
//       trained at 215 images/s with it and 219 without (gpu-bench.sh, one run: level).
//   v14 LANES (the conv2d_lanes module: this file with conv2d_lanes.wgsl appended, built where
//       subgroups are 8 to 64 lanes wide; the built-in choice of CPU adapters): conv2d_gemm's
//       column weights, the same for every invocation of a workgroup, loaded once per subgroup —
//       lane l loads column l (and l + 8) — and handed to every lane by subgroupBroadcast: 2
//       lane-by-lane loads per reduction step instead of 16. Invocations past the last row keep
//       running on clamped rows, so every broadcast has its whole subgroup. The arithmetic is
//       v13's (the conv2d module, LANES false, is v13 bit for bit). senet bench --tune off width 1
//       batch 128 on lavapipe, LANES against v13, 2 rounds interleaved in one run: forward
//       4007 / 4538 ms against 6094 / 5182, input gradient 4142 / 4410 against 6503 / 6597 (1.1-1.6x),
//       the weight gradient (not yet shared in that build) 5977 / 6053 against 6386 / 7136; train 8.9 / 8.2 against
//       6.7 / 6.3 images/s, 37 % / 37 % of the FMA peak the bench measured against 28 % / 26 %.
//       Then the weight gradient's dout values alike (the lanes walk whole rows, padding masked, so
//       that they are at one pixel together), against the GEMM-only build in a second such run:
//       5013 / 5000 ms against 4550 / 5769 (level), the 3-channel first layer 2.2x faster (its
//       4-channel blocks load 4 input values and 16 dout values a pixel: 6 loads instead of 20),
//       the 4x4 layer, where the masked padding is 31 % of the walk, 1.46x slower in one round and
//       1.04x faster in the other.
//       docs/runs/conv-lanes-lavapipe/ has both runs.
//   v15 the weight gradient's walk steps its (sample, output row) a row at a time instead of
//       dividing m by OH*OW and OW at every row (integer division runs lane by lane in software on
//       CPU adapters; a 4-pixel row of the 4x4 layer paid four of them): the same values. senet
//       bench --tune off width 1 batch 128 on lavapipe, against v14, 2 rounds interleaved in one
//       run: weight gradient 4764 / 4643 ms against 5191 / 4972 (1.07-1.09x), the 8x8 layer 1.12-1.17x
//       (docs/runs/wgrad-walk-lavapipe/).
//   v16 1x1 convolutions with stride 1, no padding and H*W a multiple of 4 run the GEMM as
//       a plain GEMM over pixels (PLAIN, host `register::plain_gemm`, `--conv-1x1`): four rows'
//       source values in one vec4 load (bindings 11 and 12) where the general form does four
//       masked scalar loads, the same values bit for bit. cargo bench --bench conv_1x1 (SE-ResNet-50's
//       1x1 shapes at batch 8, best of 3 rounds, both forms in one run), two runs: f32 forward and
//       input gradient 0.98-1.57x, 17 of 20 pairs 1.1x or more; f16 0.78-1.55x
//       (docs/runs/conv-1x1-lavapipe/); the arithmetic of every other layer is v15's.
//   v17 a strided input gradient numbers its rows by stride phase (phase_row) and every
//       GEMM skips a tap that no row of its subgroup reads: the same values bit for bit (a
//       skipped tap added x * 0). senet bench --tune off, old and new binaries alternated, 2
//       rounds: SE-ResNet-50 at 112 batch 16, the six stride-2 1x1 input gradients 1208 / 1145 ms
//       -> 453 / 393 (2.7-2.9x; 1.7-3.7x per layer); SE-ResNet-20 batch 128, the 3x3 stride-2
//       input gradients 2.0-2.7x (docs/runs/strided-dgrad-lavapipe/).
//   v18 layers 3 wide with padding 1, stride 1 and W a multiple of 4 run the forward and
//       input gradient a kernel row at a time (ROW3, host `register::row3_gemm`, `--conv-3x3`):
//       per quad of pixels and reduction channel one vec4 load and two scalar neighbours serve the
//       row's three taps, where the general form makes 12 masked scalar loads. The same products
//       summed (ky, channel, kx) instead of (ky, kx, channel), so not the general form's bits.
//       cargo bench --bench conv_3x3 (the base SENet's 3x3 shapes at batch 16,
//       best of 3 rounds, both forms in one run): f32 1.06-1.50x, f16 0.94-1.22x; senet bench
//       --tune off width 1 batch 128, --conv-3x3 on and off alternated, 2 rounds: train 11.9 / 13.8
//       against 11.1 / 12.4 images/s (docs/runs/conv-3x3-lavapipe/).
//   v19 the forward's batch statistics (`p.stats`, `--bn-stats`): per block of GEMM rows and
//       column, the mean and M2 of the stored values for the training batch norm after it, summed
//       from the named accumulators after the store and, with LANES, merged over the subgroup; with
//       the flag off the arithmetic is v18's. cargo bench --bench bn_stats (the convolution and
//       the batch norm's forward, with and without, one run): the convolution 0.91-1.03x in 8 of 10
//       pairs, the two together 0.74-1.03x. Indexing `acc` per row and column instead (as the
//       store loop does) made 1x1 layers 1.08-1.56x slower (docs/runs/bn-stats-lavapipe/).
//   v20 the weight gradient of a layer 3 wide with padding 1, stride 1 and dilation 1 across, stride
//       1 down, a kernel row at a time (WGRAD_ROW3, wgrad_row3_block; host `register::row3_wgrad`,
//       `--conv-3x3`; any width): an invocation owns 4 input channels x WGRAD_N output channels at
//       the row's three taps (48 vec4 accumulators where the one-tap walk has 64) and keeps the
//       input values of columns px - 1, px, px + 1 in registers as it walks a row, loading only the
//       new right-hand column: 4 input loads a pixel for 192 products, where the one-tap walk makes
//       16 for 256. Bit for bit the one-tap walk (each tap's sum over the same pixels in the same
//       order, 0 products at the padding). cargo bench --bench conv_3x3 (the base SENet's 3x3 shapes
//       at batch 16, both forms in one run, best of 3 rounds): weight gradient 1.29-1.74x faster in
//       f32, 1.31-1.77x in f16; a second run 1.09-1.79x and 1.20-1.70x, the 4x4 layer the least
//       (docs/runs/conv-3x3-lavapipe/).
//   v21 (this) the joint kernel's workgroups interleaved in proportion (`joint_slot`,
//       conv2d_params.wgsl) instead of all the input gradient's first, its weight-gradient blocks
//       a kernel row at a time where the pass's own are (WGRAD_ROW3), and both blocks entered in
//       every workgroup, the one not run given a group past the last, rather than one inside a
//       branch: bit for bit v20's passes. cargo bench --bench conv_backward (dev profile, best of 3
//       rounds, one run each): joint / separate 1.88, 1.59, 1.60, 1.75 before; 1.02, 1.05, 1.15,
//       1.05 interleaved with the row walk; 1.00, 1.01, 1.07, 1.03 unbranched. Lavapipe hands each
//       of its threads one contiguous run of a dispatch's workgroups, so with the input gradient's
//       all first one thread did most of a layer's; and it runs both sides of a branch (masked), so
//       a block inside one paid for its masks (a 1x1 input gradient by ~10 %). The block not run
//       still costs its masked pass in every workgroup (the 1x1 layer's remaining 7 %).
//   tried, not kept: the weight gradient walking four pixels at a time for stride-1 layers as wide
//       as their input (W a multiple of 4, LANES): per input channel one aligned vec4 and one
//       neighbour for the lane's tap, per lane one vec4 of dout, then the four pixels' products in
//       order (accumulators at module scope so one function adds a pixel's products for either
//       walk; bit for bit the general walk). senet bench --tune off width 1 batch 128, one round
//       beside the build without it: weight gradient 4939 ms against 4781 while its forward ran
//       2381 against 3242, i.e. ~1.4x slower relative to the forward (per layer 0.79-1.16x raw). A
//       quad's vec4 load, neighbour and window selects cost about what four scalar loads did, and
//       each lane serves one tap, so nothing is shared across taps as in ROW3. No log committed.
//   tried, not kept: the weight gradient's 1x1 form walking each image's plane as one row and
//       loading its input channels (and with LANES its dout) a quad of pixels at a time, each pixel
//       then picking its lane of the quad (`xq[k]`, a dynamic component: selects on lavapipe). Bit
//       for bit the general walk, but in the first run of the same bench 0.74-1.20x its speed (the
//       28x28 layers 0.74 and 0.86x in f32): not kept.
//   tried, not kept: the weight gradient's invocations numbered taps first (a subgroup's lanes on
//       the taps of one block of input channels, the same channel planes a few pixels apart, rather
//       than on 8 blocks of channels at one tap): in the same kind of run 4681 / 4211 ms against
//       4131 / 3340, the 4x4 layer 1.24-1.38x slower; not kept, no log committed.
//   tried, not kept: conv2d_gemm's 64 hand-named accumulators a<row>_<quarter> as one
//       `array<vec4<f32>, 64>` indexed in loops over GEMM_M and GEMM_N / 4 (override constants,
//       so the trip counts are known when the pipeline is built; the same FMAs in the same order).
//       senet bench --tune off --width 0.25 --batch-size 64, old and new binaries alternated, 2
//       runs each, lavapipe on 2 shared cores (load average 8-12), ms from its kernel table:
//       forward 1147 / 1423 hand-named against 2898 / 3483 as an array, input gradient 1409 /
//       1353 against 3207 / 2923; train 11.4 / 11.7 against 7.7 / 7.0 images/s; the unchanged
//       weight gradient stayed within ~10% (1888 / 1764 against 1795 / 1953). The array form is
//       ~2.2x slower (lavapipe presumably keeps it in memory rather than in registers), so the
//       accumulators stay written out.

// Params and binding 0 (p): conv2d_params.wgsl, appended by the host.
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read> weight: array<act>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<act>;
@group(0) @binding(5) var<storage, read> dout: array<act>;
// The input gradient's addend (conv2d_params.wgsl's `accumulate`).
@group(0) @binding(6) var<storage, read> addend: array<act>;
@group(0) @binding(7) var<storage, read_write> dweight_partial: array<f32>;
@group(0) @binding(8) var<storage, read> dweight_partial_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(10) var<storage, read_write> dbias: array<f32>;
// inp and dout again, read four pixels at a time by a 1x1 layer's GEMMs (PLAIN, below); a
// placeholder where a pass does not read them so.
@group(0) @binding(11) var<storage, read> inp4: array<vec4<act>>;
@group(0) @binding(12) var<storage, read> dout4: array<vec4<act>>;
// The forward's batch statistics (`p.stats`): per block of p.stats * GEMM_M output pixels (p.stats
// invocations, gid.x / p.stats) and output channel, (mean, M2) of the values stored,
// [blocks, c_out, 2]; a placeholder where they are not written.
@group(0) @binding(13) var<storage, read_write> stat_partial: array<f32>;

// Invocations per workgroup along x for the GEMM kernels.
override WG: u32 = 64u;
// Forward / input-gradient invocations own GEMM_M pixels (4, 8 or 16) x GEMM_N channels (8 or 16).
override GEMM_M: u32 = 8u;
override GEMM_N: u32 = 16u;
// Weight-gradient invocations own WGRAD_CI input channels (4 or 8) x WGRAD_N output channels (8 or 16).
override WGRAD_CI: u32 = 8u;
override WGRAD_N: u32 = 16u;
// The weight gradient a kernel row at a time (wgrad_row3_block; conv2d_backward_weight only).
override WGRAD_ROW3: bool = false;

fn addend_at(i: u32) -> f32 {
    return f32(addend[i]);
}

// Input pixel value with zero padding; `base` is the start of the (n, ci) plane.
fn load_inp(base: u32, iy: i32, ix: i32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return f32(inp[base + u32(iy) * p.w + u32(ix)]);
}

// The forward and the input gradient are one GEMM kernel, conv2d_gemm, with the MODE override
// choosing which (the branches on it fold away when the pipeline is built):
//   MODE 0, forward         rows m = (n, oy, ox) output pixels, columns co, reduction (ci, tap):
//                           source inp (binding 1), output out (binding 4), bias added
//   MODE 1, input gradient  rows q = (n, iy, ix) input pixels, columns ci, reduction (co, tap):
//                           source dout (binding 5), output dinp bound at binding 4 (with
//                           `accumulate`, plus the addend bound at binding 6)
// gid.x: block of GEMM_M rows; gid.y: block of GEMM_N columns (vec4 quarters w0..w3). Per tap and
// reduction channel r, GEMM_M source and GEMM_N weight loads feed GEMM_M*GEMM_N FMAs into the
// accumulators a<row>_<quarter>. Loop order: taps (ky, kx) outside, reduction channels inside, so
// each row's tap address and validity are worked out once per tap rather than once per (tap,
// channel); invalid taps read a valid address and are masked to 0 (no branch in the inner loop).
// With ROW3 the loop is kernel rows ky outside, reduction channels inside, and the row's three taps
// innermost, on source values loaded once per channel (below).
override MODE: u32 = 0u;
const FWD: u32 = 0u;
const DGRAD: u32 = 1u;

// The GEMM an invocation runs (conv2d_params.wgsl's `epilogue` asks): the pipeline's, here always.
fn mode() -> u32 {
    return MODE;
}

fn src(i: u32) -> f32 {
    if (MODE == FWD) {
        return f32(inp[i]);
    }
    return f32(dout[i]);
}

// PLAIN: the layer is a 1x1 convolution with stride 1 and no padding, and H*W is a multiple of 4
// (the host's `register::plain_gemm`): a plain GEMM over pixels, no window to work out. In the
// forward and the input gradient, rows 4k .. 4k+3 of a block are 4 neighbouring pixels of one
// image (m0 is a multiple of GEMM_M, so of 4, and no image boundary falls inside an aligned quad):
// one vec4 load instead of four scalar ones. The values are the general form's bit for bit: every
// tap is live (x * 1.0 is x) and every sum runs in the same order. The weight gradient keeps its
// general walk (a quad-loading walk measured no faster, header).
override PLAIN: bool = false;

// The source values of 4 rows (offsets o0..o3, liveness l) at one reduction step: with PLAIN one
// aligned vec4 load at o0 (o0..o3 are then o0, o0+1, o0+2, o0+3); else four loads, each masked.
fn src_rows(o0: u32, o1: u32, o2: u32, o3: u32, l: vec4<f32>) -> vec4<f32> {
    if (PLAIN) {
        if (MODE == FWD) {
            return vec4<f32>(inp4[o0 / 4u]);
        }
        return vec4<f32>(dout4[o0 / 4u]);
    }
    return vec4<f32>(src(o0), src(o1), src(o2), src(o3)) * l;
}

// ROW3: the layer's kernel is 3 wide with padding 1 across, dilation 1 across, stride 1 and W a
// multiple of 4 (the host's `register::row3_gemm`; the output is then as wide as the input). Rows
// 4k .. 4k+3 of a block are 4 neighbouring pixels of one image row (m0 is a multiple of 4 and so is
// W), and a kernel row's three taps read, for each such quad, the 6 source values from one column
// left of it to one right: one aligned vec4 load and two scalar ones per quad and reduction
// channel, where the general form makes 12 masked scalar loads for the same three taps. The taps
// then run inside the reduction loop, (ky, channel, kx) where the general form runs (ky, kx,
// channel): the same products, summed in another order.
override ROW3: bool = false;

// The 4 source values at aligned offset o (a multiple of 4).
fn src_quad(o: u32) -> vec4<f32> {
    if (MODE == FWD) {
        return vec4<f32>(inp4[o / 4u]);
    }
    return vec4<f32>(dout4[o / 4u]);
}

// The source value at o + d where `ok` (1.0), else 0 (read at o, a valid address).
fn quad_side(o: u32, d: i32, ok: f32) -> f32 {
    return src(select(o, u32(i32(o) + d), ok != 0.0)) * ok;
}

// The 4 values a quad's rows read at tap kt (0, 1, 2) of a kernel row, from its left neighbour
// `lo`, its own four `e` and its right neighbour `hi`: the forward's tap kx reads column x + kx - 1,
// the input gradient's column x + 1 - kx.
fn row3_window(kt: u32, lo: f32, e: vec4<f32>, hi: f32) -> vec4<f32> {
    let side = select(kt, 2u - kt, MODE == DGRAD);
    let left = vec4<f32>(lo, e.x, e.y, e.z);
    let right = vec4<f32>(e.y, e.z, e.w, hi);
    return select(select(e, right, side == 2u), left, side == 0u);
}

// Where column c (a channel within group g) starts in the weight [c_out, c_in/g, kh, kw]: the
// forward's column co starts a row of (c_in/g)*khw; the input gradient's column ci sits at ci*khw
// within the row of each of the group's co.
fn weight_column(g: u32, c: u32) -> u32 {
    let khw = p.kh * p.kw;
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    if (MODE == FWD) {
        return (g * cout_g + c) * cin_g * khw;
    }
    return g * cout_g * cin_g * khw + c * khw;
}

// phase_row (a strided input gradient's rows by stride phase): conv2d_params.wgsl, shared with
// conv2d_tiled.wgsl.

@compute @workgroup_size(WG)
fn conv2d_gemm(@builtin(global_invocation_id) gid: vec3<u32>, lane: LaneId) {
    gemm_block(gid, lane_index(lane));
}

// The forward's batch statistics (`p.stats`, gemm_block's end), per quarter q of the block's columns
// (columns 4q .. 4q+3): the sums, means and M2 of the stored values over the block's rows.
var<private> stat_s0: vec4<f32>;
var<private> stat_s1: vec4<f32>;
var<private> stat_s2: vec4<f32>;
var<private> stat_s3: vec4<f32>;
var<private> stat_mean0: vec4<f32>;
var<private> stat_mean1: vec4<f32>;
var<private> stat_mean2: vec4<f32>;
var<private> stat_mean3: vec4<f32>;
var<private> stat_sq0: vec4<f32>;
var<private> stat_sq1: vec4<f32>;
var<private> stat_sq2: vec4<f32>;
var<private> stat_sq3: vec4<f32>;

// A row's four column quarters as stored (rounded to `act`).
fn stored4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act_rounded(v.x), act_rounded(v.y), act_rounded(v.z), act_rounded(v.w));
}

// Row i of the block (its accumulators q0..q3), if it is one of the block's `rows`: step 0 adds its
// stored values into the sums, step 1 their squared deviations from the means into M2.
fn stat_row(step: u32, i: u32, rows: u32, q0: vec4<f32>, q1: vec4<f32>, q2: vec4<f32>, q3: vec4<f32>) {
    if (i >= rows) {
        return;
    }
    let v0 = stored4(q0);
    let v1 = stored4(q1);
    let v2 = stored4(q2);
    let v3 = stored4(q3);
    if (step == 0u) {
        stat_s0 += v0;
        stat_s1 += v1;
        stat_s2 += v2;
        stat_s3 += v3;
        return;
    }
    let e0 = v0 - stat_mean0;
    let e1 = v1 - stat_mean1;
    let e2 = v2 - stat_mean2;
    let e3 = v3 - stat_mean3;
    stat_sq0 += e0 * e0;
    stat_sq1 += e1 * e1;
    stat_sq2 += e2 * e2;
    stat_sq3 += e3 * e3;
}

// (mean, M2) of columns c .. c+3 (those below col_g) at stat_partial's element `at` on.
fn stat_store(at: u32, c: u32, col_g: u32, mean: vec4<f32>, m2: vec4<f32>) {
    for (var j = 0u; j < 4u; j++) {
        if (c + j < col_g) {
            stat_partial[2u * (at + j)] = mean[j];
            stat_partial[2u * (at + j) + 1u] = m2[j];
        }
    }
}

// conv2d_gemm's invocation `gid` (also conv2d_backward's input-gradient blocks); `lane` is its
// index in its subgroup (read only with LANES).
fn gemm_block(gid: vec3<u32>, lane: u32) {
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    let khw = p.kh * p.kw;
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    // Rows, columns (all, and one group's) and reduction channels (one group's) of this GEMM; the
    // source's plane and the plane the rows index.
    var row_total = p.n * ohw;
    var col_total = p.c_out;
    var col_g = cout_g;
    var red_total = cin_g;
    var src_plane = hw;
    var row_plane = ohw;
    if (MODE == DGRAD) {
        row_total = p.n * hw;
        col_total = p.c_in;
        col_g = cin_g;
        red_total = cout_g;
        src_plane = ohw;
        row_plane = hw;
    }
    // gid.y: group g, and block of GEMM_N columns within it (co0 counts from the group's first).
    let col_blocks = (col_g + GEMM_N - 1u) / GEMM_N;
    let g = gid.y / col_blocks;
    let m0 = gid.x * GEMM_M;
    let co0 = (gid.y % col_blocks) * GEMM_N;
    // With LANES every lane of a subgroup takes part in the broadcasts, so invocations past the
    // last row go on with clamped rows (below) and store nothing, unless their whole subgroup is
    // past it; g is the same for the whole workgroup.
    let live_rows = lanes_any(m0 < row_total);
    if (g >= p.groups || !live_rows) {
        return;
    }
    // The group's first source channel (forward: input channel; input gradient: output channel).
    let src_group = g * red_total * src_plane;

    // Per row: the start of its image in the source, and its position (forward: the top-left
    // input pixel of its window; input gradient: the input pixel shifted by the padding). Rows
    // past the end are clamped onto the last row; their results are never written.
    var sbase: array<u32, 16>;
    var iy0: array<i32, 16>;
    var ix0: array<i32, 16>;
    // Each row's image and its pixel within the image's plane (m's own, but for a strided input
    // gradient's rows, numbered by stride phase: phase_row).
    var rimg: array<u32, 16>;
    var rpix: array<u32, 16>;
    for (var i = 0u; i < GEMM_M; i++) {
        let m = min(m0 + i, row_total - 1u);
        var nn = m / row_plane;
        var r = m % row_plane;
        if (MODE == FWD) {
            sbase[i] = nn * p.c_in * hw + src_group;
            iy0[i] = i32((r / p.ow) * p.stride_h) - i32(p.pad_h);
            ix0[i] = i32((r % p.ow) * p.stride_w) - i32(p.pad_w);
        } else {
            var yx = vec2<u32>(r / p.w, r % p.w);
            if (p.stride_h != 1u || p.stride_w != 1u) {
                let q = phase_row(m);
                nn = q.x;
                yx = q.yz;
                r = yx.x * p.w + yx.y;
            }
            sbase[i] = nn * p.c_out * ohw + src_group;
            iy0[i] = i32(yx.x) + i32(p.pad_h);
            ix0[i] = i32(yx.y) + i32(p.pad_w);
        }
        rimg[i] = nn;
        rpix[i] = r;
    }
    // Per column: where its weights start, and the bias (forward; zero, WGSL's initial value,
    // for the input gradient). Columns past the group's end are clamped onto its last.
    var wcol: array<u32, 16>;
    var b: array<f32, 16>;
    for (var j = 0u; j < GEMM_N; j++) {
        let c = min(co0 + j, col_g - 1u);
        wcol[j] = weight_column(g, c);
        if (MODE == FWD && p.has_bias != 0u) {
            b[j] = bias[g * cout_g + c];
        }
    }
    // With LANES: the columns this lane loads for its subgroup, lane and lane + 8.
    let lane_w0 = weight_column(g, min(co0 + lane, col_g - 1u));
    let lane_w1 = weight_column(g, min(co0 + lane + 8u, col_g - 1u));
    let wr_stride = select(cin_g * khw, khw, MODE == FWD);
    let b0 = vec4<f32>(b[0], b[1], b[2], b[3]);
    let b1 = vec4<f32>(b[4], b[5], b[6], b[7]);
    let b2 = vec4<f32>(b[8], b[9], b[10], b[11]);
    let b3 = vec4<f32>(b[12], b[13], b[14], b[15]);
    var a0_0 = b0;
    var a0_1 = b1;
    var a0_2 = b2;
    var a0_3 = b3;
    var a1_0 = b0;
    var a1_1 = b1;
    var a1_2 = b2;
    var a1_3 = b3;
    var a2_0 = b0;
    var a2_1 = b1;
    var a2_2 = b2;
    var a2_3 = b3;
    var a3_0 = b0;
    var a3_1 = b1;
    var a3_2 = b2;
    var a3_3 = b3;
    var a4_0 = b0;
    var a4_1 = b1;
    var a4_2 = b2;
    var a4_3 = b3;
    var a5_0 = b0;
    var a5_1 = b1;
    var a5_2 = b2;
    var a5_3 = b3;
    var a6_0 = b0;
    var a6_1 = b1;
    var a6_2 = b2;
    var a6_3 = b3;
    var a7_0 = b0;
    var a7_1 = b1;
    var a7_2 = b2;
    var a7_3 = b3;
    var a8_0 = b0;
    var a8_1 = b1;
    var a8_2 = b2;
    var a8_3 = b3;
    var a9_0 = b0;
    var a9_1 = b1;
    var a9_2 = b2;
    var a9_3 = b3;
    var a10_0 = b0;
    var a10_1 = b1;
    var a10_2 = b2;
    var a10_3 = b3;
    var a11_0 = b0;
    var a11_1 = b1;
    var a11_2 = b2;
    var a11_3 = b3;
    var a12_0 = b0;
    var a12_1 = b1;
    var a12_2 = b2;
    var a12_3 = b3;
    var a13_0 = b0;
    var a13_1 = b1;
    var a13_2 = b2;
    var a13_3 = b3;
    var a14_0 = b0;
    var a14_1 = b1;
    var a14_2 = b2;
    var a14_3 = b3;
    var a15_0 = b0;
    var a15_1 = b1;
    var a15_2 = b2;
    var a15_3 = b3;
    // With ROW3 the tap loop below runs once per kernel row, over the centre tap's addresses, and
    // the row's three taps run inside the reduction loop.
    let kx_taps = select(p.kw, 1u, ROW3);
    let row_taps = select(1u, 3u, ROW3);
    for (var ky = 0u; ky < p.kh; ky++) {
        for (var kx0 = 0u; kx0 < kx_taps; kx0++) {
            let kx = select(kx0, 1u, ROW3);
            // Where each row reads the source for this tap, and whether it does at all; with
            // ROW3 also the source column it reads (the centre of its three).
            var off: array<u32, 16>;
            var live: array<f32, 16>;
            var col: array<i32, 16>;
            var any_live = false;
            for (var i = 0u; i < GEMM_M; i++) {
                var ok: bool;
                var o: u32;
                if (MODE == FWD) {
                    let yy = iy0[i] + i32(ky * p.dil_h);
                    let xx = ix0[i] + i32(kx * p.dil_w);
                    ok = yy >= 0 && xx >= 0 && yy < i32(p.h) && xx < i32(p.w);
                    o = u32(yy) * p.w + u32(xx);
                    col[i] = xx;
                } else {
                    // The output pixel whose window puts this tap on the input pixel.
                    let ty = iy0[i] - i32(ky * p.dil_h);
                    let tx = ix0[i] - i32(kx * p.dil_w);
                    ok = ty >= 0 && tx >= 0;
                    var oy = u32(max(ty, 0));
                    var ox = u32(max(tx, 0));
                    // Integer division is a software routine on CPU drivers: only strided
                    // convolutions pay it.
                    if (p.stride_h != 1u || p.stride_w != 1u) {
                        ok = ok && oy % p.stride_h == 0u && ox % p.stride_w == 0u;
                        oy = oy / p.stride_h;
                        ox = ox / p.stride_w;
                    }
                    ok = ok && oy < p.oh && ox < p.ow;
                    o = oy * p.ow + ox;
                    col[i] = tx;
                }
                off[i] = sbase[i] + select(0u, o, ok);
                live[i] = select(0.0, 1.0, ok);
                any_live = any_live || ok;
            }
            // A tap no row of the subgroup reads adds nothing (x * 0 is 0 for finite x, and the
            // masked value is 0 either way): skip it. Only a strided input gradient's phase-ordered
            // blocks (and blocks in the padding) have whole subgroups without a live row.
            if (!lanes_any(any_live)) {
                continue;
            }
            // ROW3: whether each quad's left and right neighbours (the columns its outer taps
            // reach) are inside the source row; both false where the row is not live.
            var lo_ok: array<f32, 4>;
            var hi_ok: array<f32, 4>;
            if (ROW3) {
                let src_w = select(p.ow, p.w, MODE == FWD);
                for (var qd = 0u; qd < GEMM_M / 4u; qd++) {
                    lo_ok[qd] = select(0.0, live[4u * qd], col[4u * qd] >= 1);
                    hi_ok[qd] = select(0.0, live[4u * qd], col[4u * qd + 3u] + 1 < i32(src_w));
                }
            }
            for (var r = 0u; r < red_total; r++) {
                let c = r * src_plane;
                // ROW3: each quad's six source values (its four and a neighbour either side),
                // loaded once for the row's three taps.
                var l0 = 0.0;
                var e0 = vec4<f32>(0.0);
                var h0 = 0.0;
                var l1 = 0.0;
                var e1 = vec4<f32>(0.0);
                var h1 = 0.0;
                var l2 = 0.0;
                var e2 = vec4<f32>(0.0);
                var h2 = 0.0;
                var l3 = 0.0;
                var e3 = vec4<f32>(0.0);
                var h3 = 0.0;
                if (ROW3) {
                    l0 = quad_side(off[0] + c, -1, lo_ok[0]);
                    e0 = src_quad(off[0] + c) * live[0];
                    h0 = quad_side(off[0] + c, 4, hi_ok[0]);
                    if (GEMM_M >= 8u) {
                        l1 = quad_side(off[4] + c, -1, lo_ok[1]);
                        e1 = src_quad(off[4] + c) * live[4];
                        h1 = quad_side(off[4] + c, 4, hi_ok[1]);
                    }
                    if (GEMM_M == 16u) {
                        l2 = quad_side(off[8] + c, -1, lo_ok[2]);
                        e2 = src_quad(off[8] + c) * live[8];
                        h2 = quad_side(off[8] + c, 4, hi_ok[2]);
                        l3 = quad_side(off[12] + c, -1, lo_ok[3]);
                        e3 = src_quad(off[12] + c) * live[12];
                        h3 = quad_side(off[12] + c, 4, hi_ok[3]);
                    }
                }
                for (var kt = 0u; kt < row_taps; kt++) {
                    let t = ky * p.kw + select(kx, kt, ROW3);
                    let k = r * wr_stride + t;
                    var w0 = vec4<f32>(0.0);
                    var w1 = vec4<f32>(0.0);
                    var w2 = vec4<f32>(0.0);
                    var w3 = vec4<f32>(0.0);
                    if (LANES) {
                        // One load per lane, each lane's column; the broadcasts hand all of them to
                        // every lane (the same values the loads below give, bit for bit).
                        let wa = f32(weight[lane_w0 + k]);
                        w0 = lanes_0_3(wa);
                        w1 = lanes_4_7(wa);
                        if (GEMM_N == 16u) {
                            let wb = f32(weight[lane_w1 + k]);
                            w2 = lanes_0_3(wb);
                            w3 = lanes_4_7(wb);
                        }
                    } else {
                        w0 = vec4<f32>(f32(weight[wcol[0] + k]), f32(weight[wcol[1] + k]), f32(weight[wcol[2] + k]), f32(weight[wcol[3] + k]));
                        w1 = vec4<f32>(f32(weight[wcol[4] + k]), f32(weight[wcol[5] + k]), f32(weight[wcol[6] + k]), f32(weight[wcol[7] + k]));
                        if (GEMM_N == 16u) {
                            w2 = vec4<f32>(f32(weight[wcol[8] + k]), f32(weight[wcol[9] + k]), f32(weight[wcol[10] + k]), f32(weight[wcol[11] + k]));
                            w3 = vec4<f32>(f32(weight[wcol[12] + k]), f32(weight[wcol[13] + k]), f32(weight[wcol[14] + k]), f32(weight[wcol[15] + k]));
                        }
                    }
                    var q0 = row3_window(kt, l0, e0, h0);
                    if (!ROW3) {
                        q0 = src_rows(off[0] + c, off[1] + c, off[2] + c, off[3] + c, vec4<f32>(live[0], live[1], live[2], live[3]));
                    }
                    let x0 = q0.x;
                    let x1 = q0.y;
                    let x2 = q0.z;
                    let x3 = q0.w;
                    a0_0 += x0 * w0;
                    a0_1 += x0 * w1;
                    a1_0 += x1 * w0;
                    a1_1 += x1 * w1;
                    a2_0 += x2 * w0;
                    a2_1 += x2 * w1;
                    a3_0 += x3 * w0;
                    a3_1 += x3 * w1;
                    if (GEMM_N == 16u) {
                        a0_2 += x0 * w2;
                        a0_3 += x0 * w3;
                        a1_2 += x1 * w2;
                        a1_3 += x1 * w3;
                        a2_2 += x2 * w2;
                        a2_3 += x2 * w3;
                        a3_2 += x3 * w2;
                        a3_3 += x3 * w3;
                    }
                    if (GEMM_M >= 8u) {
                        var q1 = row3_window(kt, l1, e1, h1);
                        if (!ROW3) {
                            q1 = src_rows(off[4] + c, off[5] + c, off[6] + c, off[7] + c, vec4<f32>(live[4], live[5], live[6], live[7]));
                        }
                        let x4 = q1.x;
                        let x5 = q1.y;
                        let x6 = q1.z;
                        let x7 = q1.w;
                        a4_0 += x4 * w0;
                        a4_1 += x4 * w1;
                        a5_0 += x5 * w0;
                        a5_1 += x5 * w1;
                        a6_0 += x6 * w0;
                        a6_1 += x6 * w1;
                        a7_0 += x7 * w0;
                        a7_1 += x7 * w1;
                        if (GEMM_N == 16u) {
                            a4_2 += x4 * w2;
                            a4_3 += x4 * w3;
                            a5_2 += x5 * w2;
                            a5_3 += x5 * w3;
                            a6_2 += x6 * w2;
                            a6_3 += x6 * w3;
                            a7_2 += x7 * w2;
                            a7_3 += x7 * w3;
                        }
                    }
                    if (GEMM_M == 16u) {
                        var q2 = row3_window(kt, l2, e2, h2);
                        if (!ROW3) {
                            q2 = src_rows(off[8] + c, off[9] + c, off[10] + c, off[11] + c, vec4<f32>(live[8], live[9], live[10], live[11]));
                        }
                        let x8 = q2.x;
                        let x9 = q2.y;
                        let x10 = q2.z;
                        let x11 = q2.w;
                        var q3 = row3_window(kt, l3, e3, h3);
                        if (!ROW3) {
                            q3 = src_rows(off[12] + c, off[13] + c, off[14] + c, off[15] + c, vec4<f32>(live[12], live[13], live[14], live[15]));
                        }
                        let x12 = q3.x;
                        let x13 = q3.y;
                        let x14 = q3.z;
                        let x15 = q3.w;
                        a8_0 += x8 * w0;
                        a8_1 += x8 * w1;
                        a9_0 += x9 * w0;
                        a9_1 += x9 * w1;
                        a10_0 += x10 * w0;
                        a10_1 += x10 * w1;
                        a11_0 += x11 * w0;
                        a11_1 += x11 * w1;
                        a12_0 += x12 * w0;
                        a12_1 += x12 * w1;
                        a13_0 += x13 * w0;
                        a13_1 += x13 * w1;
                        a14_0 += x14 * w0;
                        a14_1 += x14 * w1;
                        a15_0 += x15 * w0;
                        a15_1 += x15 * w1;
                        if (GEMM_N == 16u) {
                            a8_2 += x8 * w2;
                            a8_3 += x8 * w3;
                            a9_2 += x9 * w2;
                            a9_3 += x9 * w3;
                            a10_2 += x10 * w2;
                            a10_3 += x10 * w3;
                            a11_2 += x11 * w2;
                            a11_3 += x11 * w3;
                            a12_2 += x12 * w2;
                            a12_3 += x12 * w3;
                            a13_2 += x13 * w2;
                            a13_3 += x13 * w3;
                            a14_2 += x14 * w2;
                            a14_3 += x14 * w3;
                            a15_2 += x15 * w2;
                            a15_3 += x15 * w3;
                        }
                    }
                }
            }
        }
    }
    var acc = array<vec4<f32>, 64>(
        a0_0, a0_1, a0_2, a0_3,
        a1_0, a1_1, a1_2, a1_3,
        a2_0, a2_1, a2_2, a2_3,
        a3_0, a3_1, a3_2, a3_3,
        a4_0, a4_1, a4_2, a4_3,
        a5_0, a5_1, a5_2, a5_3,
        a6_0, a6_1, a6_2, a6_3,
        a7_0, a7_1, a7_2, a7_3,
        a8_0, a8_1, a8_2, a8_3,
        a9_0, a9_1, a9_2, a9_3,
        a10_0, a10_1, a10_2, a10_3,
        a11_0, a11_1, a11_2, a11_3,
        a12_0, a12_1, a12_2, a12_3,
        a13_0, a13_1, a13_2, a13_3,
        a14_0, a14_1, a14_2, a14_3,
        a15_0, a15_1, a15_2, a15_3,
    );
    for (var i = 0u; i < GEMM_M; i++) {
        let m = m0 + i;
        if (m < row_total) {
            for (var j = 0u; j < GEMM_N; j++) {
                let c = co0 + j;
                if (c < col_g) {
                    let o = (rimg[i] * col_total + g * col_g + c) * row_plane + rpix[i];
                    out[o] = epilogue(acc[i * 4u + j / 4u][j % 4u], o);
                }
            }
        }
    }
    // A training batch norm's statistics (`p.stats`): per column, the mean of the stored values of
    // the block's rows (pixels m0 .. m0 + GEMM_M of the batch, in order), then their M2 about it
    // (two passes over the accumulators, so no cancellation), merged over the p.stats invocations of
    // a statistics block (Chan et al.; LANES: a subgroup, whose row blocks are then one run of the
    // batch's pixels); batch_norm.wgsl merges the blocks (PARTIALS). Invocations past the last row
    // take part with none.
    if (MODE == FWD && p.stats != 0u) {
        let rows = select(0u, min(GEMM_M, row_total - m0), m0 < row_total);
        let k = f32(rows);
        // Step 0 sums the rows, step 1 their squared deviations from the means step 0 gave.
        for (var step = 0u; step < 2u; step++) {
            if (step == 1u) {
                let kd = max(k, 1.0);
                stat_mean0 = stat_s0 / kd;
                stat_mean1 = stat_s1 / kd;
                stat_mean2 = stat_s2 / kd;
                stat_mean3 = stat_s3 / kd;
            }
            stat_row(step, 0u, rows, a0_0, a0_1, a0_2, a0_3);
            stat_row(step, 1u, rows, a1_0, a1_1, a1_2, a1_3);
            stat_row(step, 2u, rows, a2_0, a2_1, a2_2, a2_3);
            stat_row(step, 3u, rows, a3_0, a3_1, a3_2, a3_3);
            if (GEMM_M >= 8u) {
                stat_row(step, 4u, rows, a4_0, a4_1, a4_2, a4_3);
                stat_row(step, 5u, rows, a5_0, a5_1, a5_2, a5_3);
                stat_row(step, 6u, rows, a6_0, a6_1, a6_2, a6_3);
                stat_row(step, 7u, rows, a7_0, a7_1, a7_2, a7_3);
            }
            if (GEMM_M == 16u) {
                stat_row(step, 8u, rows, a8_0, a8_1, a8_2, a8_3);
                stat_row(step, 9u, rows, a9_0, a9_1, a9_2, a9_3);
                stat_row(step, 10u, rows, a10_0, a10_1, a10_2, a10_3);
                stat_row(step, 11u, rows, a11_0, a11_1, a11_2, a11_3);
                stat_row(step, 12u, rows, a12_0, a12_1, a12_2, a12_3);
                stat_row(step, 13u, rows, a13_0, a13_1, a13_2, a13_3);
                stat_row(step, 14u, rows, a14_0, a14_1, a14_2, a14_3);
                stat_row(step, 15u, rows, a15_0, a15_1, a15_2, a15_3);
            }
        }
        var slot = gid.x;
        var write = m0 < row_total;
        if (p.stats > 1u) {
            // Every lane of the subgroup is here (the early return above is the subgroup's).
            let run = lanes_aligned_run(gid.x, p.stats);
            let kt = lanes_add(k);
            let t0 = lanes_add4(stat_s0) / kt;
            let t1 = lanes_add4(stat_s1) / kt;
            let t2 = lanes_add4(stat_s2) / kt;
            let t3 = lanes_add4(stat_s3) / kt;
            let e0 = stat_mean0 - t0;
            let e1 = stat_mean1 - t1;
            let e2 = stat_mean2 - t2;
            let e3 = stat_mean3 - t3;
            stat_sq0 = lanes_add4(stat_sq0 + k * e0 * e0);
            stat_sq1 = lanes_add4(stat_sq1 + k * e1 * e1);
            stat_sq2 = lanes_add4(stat_sq2 + k * e2 * e2);
            stat_sq3 = lanes_add4(stat_sq3 + k * e3 * e3);
            stat_mean0 = t0;
            stat_mean1 = t1;
            stat_mean2 = t2;
            stat_mean3 = t3;
            slot = gid.x / p.stats;
            if (run) {
                write = gid.x % p.stats == 0u;
            } else {
                // Lanes numbered otherwise: no merged block is right; each invocation with rows
                // marks its block (M2 < 0) and the batch norm reads its input instead.
                stat_sq0 = vec4<f32>(-1.0);
                stat_sq1 = vec4<f32>(-1.0);
                stat_sq2 = vec4<f32>(-1.0);
                stat_sq3 = vec4<f32>(-1.0);
            }
        }
        if (write) {
            let at = slot * p.c_out + g * col_g + co0;
            stat_store(at, co0, col_g, stat_mean0, stat_sq0);
            stat_store(at + 4u, co0 + 4u, col_g, stat_mean1, stat_sq1);
            if (GEMM_N == 16u) {
                stat_store(at + 8u, co0 + 8u, col_g, stat_mean2, stat_sq2);
                stat_store(at + 12u, co0 + 12u, col_g, stat_mean3, stat_sq3);
            }
        }
    }
}

// gid.x: a tap (ky, kx) and a block of WGRAD_CI input channels; gid.y: a group and a block of
// WGRAD_N output channels within it (both blocks count channels within the group); gid.z: split of m. The columns share their tap, so each pixel needs one address for
// all of them (the channels are a plane apart); per pixel, WGRAD_CI input and 8 dout loads feed
// 8*WGRAD_CI FMAs.
// m is walked row by row: a row whose input row is padding is skipped whole, and the pixels of a
// row whose input column is padding are cut off its ends, so the inner loop has no tests at all
// (without LANES; with it the lanes walk whole rows and mask the padding, below).
@compute @workgroup_size(WG)
fn conv2d_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>, lane: LaneId) {
    if (WGRAD_ROW3) {
        wgrad_row3_block(gid, lane_index(lane));
    } else {
        wgrad_block(gid, lane_index(lane));
    }
}

// Where a weight-gradient invocation reads dout: the start of each of its WGRAD_N output
// channels' planes (of group g, from co0; channels past the group's end read its last one) and,
// with LANES, the two planes this lane loads for its subgroup (channels lane and lane + 8).
struct DoutRows {
    row: array<u32, 16>,
    lane0: u32,
    lane1: u32,
}

fn dout_rows(g: u32, co0: u32, cout_g: u32, ohw: u32, lane: u32) -> DoutRows {
    var r: DoutRows;
    for (var i = 0u; i < WGRAD_N; i++) {
        r.row[i] = (g * cout_g + min(co0 + i, cout_g - 1u)) * ohw;
    }
    r.lane0 = (g * cout_g + min(co0 + lane, cout_g - 1u)) * ohw;
    r.lane1 = (g * cout_g + min(co0 + lane + 8u, cout_g - 1u)) * ohw;
    return r;
}

// dout of the block's output channels 0-3, 4-7, 8-11, 12-15 at pixel offset db (the last two 0
// unless WGRAD_N is 16): with LANES loaded once per subgroup and broadcast, else each its own.
fn wgrad_dout(r: DoutRows, db: u32) -> array<vec4<f32>, 4> {
    var d = array<vec4<f32>, 4>();
    if (LANES) {
        let ga = f32(dout[db + r.lane0]);
        d[0] = lanes_0_3(ga);
        d[1] = lanes_4_7(ga);
        if (WGRAD_N == 16u) {
            let gb = f32(dout[db + r.lane1]);
            d[2] = lanes_0_3(gb);
            d[3] = lanes_4_7(gb);
        }
    } else {
        d[0] = vec4<f32>(f32(dout[db + r.row[0]]), f32(dout[db + r.row[1]]), f32(dout[db + r.row[2]]), f32(dout[db + r.row[3]]));
        d[1] = vec4<f32>(f32(dout[db + r.row[4]]), f32(dout[db + r.row[5]]), f32(dout[db + r.row[6]]), f32(dout[db + r.row[7]]));
        if (WGRAD_N == 16u) {
            d[2] = vec4<f32>(f32(dout[db + r.row[8]]), f32(dout[db + r.row[9]]), f32(dout[db + r.row[10]]), f32(dout[db + r.row[11]]));
            d[3] = vec4<f32>(f32(dout[db + r.row[12]]), f32(dout[db + r.row[13]]), f32(dout[db + r.row[14]]), f32(dout[db + r.row[15]]));
        }
    }
    return d;
}

// conv2d_backward_weight's invocation `gid` (also conv2d_backward's weight-gradient blocks); `lane`
// is its index in its subgroup (read only with LANES).
//
// With LANES the dout values, the same for every invocation of a workgroup (the output channels
// are gid.y's) at the same pixel, are loaded once per subgroup and broadcast — as conv2d_gemm's
// weights — which needs every lane of a subgroup at the same pixel at once: the lanes walk whole
// rows of m whatever their tap, the input values of pixels whose tap lands in the padding read
// a valid address and are masked to 0 (adding a 0 product leaves a finite sum bit for bit as it
// was), and invocations past the last block keep running on a clamped tap and store nothing
// (unless their whole subgroup is past it).
fn wgrad_block(gid: vec3<u32>, lane: u32) {
    let khw = p.kh * p.kw;
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    let k_total = cin_g * khw;
    let ci_blocks = (cin_g + WGRAD_CI - 1u) / WGRAD_CI;
    let tap_ok = gid.x / ci_blocks < khw;
    let tap = min(gid.x / ci_blocks, khw - 1u);
    let ci0 = (gid.x % ci_blocks) * WGRAD_CI;
    let co_blocks = (cout_g + WGRAD_N - 1u) / WGRAD_N;
    let g = gid.y / co_blocks;
    let co0 = (gid.y % co_blocks) * WGRAD_N;
    let split = gid.z;
    let live_taps = lanes_any(tap_ok);
    if (g >= p.groups || !live_taps) {
        return;
    }
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    let m_total = p.n * ohw;
    let m_begin = split * p.split_len;
    let m_end = min(m_total, m_begin + p.split_len);
    let dy = i32((tap / p.kw) * p.dil_h) - i32(p.pad_h);
    let dx = i32((tap % p.kw) * p.dil_w) - i32(p.pad_w);
    // Output columns px whose input column px*stride + dx lies inside the image: [px_lo, px_hi).
    let sw = i32(p.stride_w);
    let px_lo = u32(max(0, (sw - 1 - dx) / sw));
    let last = i32(p.w) - 1 - dx;
    let px_hi = select(0u, min(u32(last / sw + 1), p.ow), last >= 0);
    // Channels past the group's end read its last one; their sums are never written.
    var cb: array<u32, 16>;
    for (var j = 0u; j < 16u; j++) {
        cb[j] = (g * cin_g + min(ci0 + j, cin_g - 1u)) * hw;
    }
    let rows = dout_rows(g, co0, cout_g, ohw, lane);
    var a0_0 = vec4<f32>(0.0);
    var a0_1 = vec4<f32>(0.0);
    var a0_2 = vec4<f32>(0.0);
    var a0_3 = vec4<f32>(0.0);
    var a1_0 = vec4<f32>(0.0);
    var a1_1 = vec4<f32>(0.0);
    var a1_2 = vec4<f32>(0.0);
    var a1_3 = vec4<f32>(0.0);
    var a2_0 = vec4<f32>(0.0);
    var a2_1 = vec4<f32>(0.0);
    var a2_2 = vec4<f32>(0.0);
    var a2_3 = vec4<f32>(0.0);
    var a3_0 = vec4<f32>(0.0);
    var a3_1 = vec4<f32>(0.0);
    var a3_2 = vec4<f32>(0.0);
    var a3_3 = vec4<f32>(0.0);
    var a4_0 = vec4<f32>(0.0);
    var a4_1 = vec4<f32>(0.0);
    var a4_2 = vec4<f32>(0.0);
    var a4_3 = vec4<f32>(0.0);
    var a5_0 = vec4<f32>(0.0);
    var a5_1 = vec4<f32>(0.0);
    var a5_2 = vec4<f32>(0.0);
    var a5_3 = vec4<f32>(0.0);
    var a6_0 = vec4<f32>(0.0);
    var a6_1 = vec4<f32>(0.0);
    var a6_2 = vec4<f32>(0.0);
    var a6_3 = vec4<f32>(0.0);
    var a7_0 = vec4<f32>(0.0);
    var a7_1 = vec4<f32>(0.0);
    var a7_2 = vec4<f32>(0.0);
    var a7_3 = vec4<f32>(0.0);
    var a8_0 = vec4<f32>(0.0);
    var a8_1 = vec4<f32>(0.0);
    var a8_2 = vec4<f32>(0.0);
    var a8_3 = vec4<f32>(0.0);
    var a9_0 = vec4<f32>(0.0);
    var a9_1 = vec4<f32>(0.0);
    var a9_2 = vec4<f32>(0.0);
    var a9_3 = vec4<f32>(0.0);
    var a10_0 = vec4<f32>(0.0);
    var a10_1 = vec4<f32>(0.0);
    var a10_2 = vec4<f32>(0.0);
    var a10_3 = vec4<f32>(0.0);
    var a11_0 = vec4<f32>(0.0);
    var a11_1 = vec4<f32>(0.0);
    var a11_2 = vec4<f32>(0.0);
    var a11_3 = vec4<f32>(0.0);
    var a12_0 = vec4<f32>(0.0);
    var a12_1 = vec4<f32>(0.0);
    var a12_2 = vec4<f32>(0.0);
    var a12_3 = vec4<f32>(0.0);
    var a13_0 = vec4<f32>(0.0);
    var a13_1 = vec4<f32>(0.0);
    var a13_2 = vec4<f32>(0.0);
    var a13_3 = vec4<f32>(0.0);
    var a14_0 = vec4<f32>(0.0);
    var a14_1 = vec4<f32>(0.0);
    var a14_2 = vec4<f32>(0.0);
    var a14_3 = vec4<f32>(0.0);
    var a15_0 = vec4<f32>(0.0);
    var a15_1 = vec4<f32>(0.0);
    var a15_2 = vec4<f32>(0.0);
    var a15_3 = vec4<f32>(0.0);
    // The walk's place, (sample, output row, column), divided out once and then stepped a row at
    // a time: integer division runs lane by lane in software on CPU adapters.
    var m = m_begin;
    var nn = m / ohw;
    var py = (m % ohw) / p.ow;
    var row_px = m % p.ow;
    while (m < m_end) {
        let row_end = min(p.ow, row_px + (m_end - m));
        let yy = i32(py * p.stride_h) + dy;
        var a = max(row_px, px_lo);
        var b = min(row_end, px_hi);
        var walk = yy >= 0 && yy < i32(p.h) && a < b;
        let row_ok = yy >= 0 && yy < i32(p.h);
        if (LANES) {
            // The whole row, every lane alike.
            a = row_px;
            b = row_end;
            walk = true;
        }
        if (walk) {
            // Modulo 2^32, so that it is right again where the padding ends (LANES).
            var at = nn * p.c_in * hw + u32(yy) * p.w + u32(i32(a) * sw + dx);
            var db = nn * p.c_out * ohw + py * p.ow + a;
            for (var px = a; px < b; px++) {
                var xat = at;
                var live = 1.0;
                if (LANES) {
                    let ok = row_ok && px >= px_lo && px < px_hi;
                    xat = select(nn * p.c_in * hw, at, ok);
                    live = select(0.0, 1.0, ok);
                }
                var xv = vec4<f32>(f32(inp[xat + cb[0]]), f32(inp[xat + cb[1]]), f32(inp[xat + cb[2]]), f32(inp[xat + cb[3]]));
                var xw = vec4<f32>(0.0);
                var xu = vec4<f32>(0.0);
                var xt = vec4<f32>(0.0);
                if (WGRAD_CI >= 8u) {
                    xw = vec4<f32>(f32(inp[xat + cb[4]]), f32(inp[xat + cb[5]]), f32(inp[xat + cb[6]]), f32(inp[xat + cb[7]]));
                }
                if (WGRAD_CI == 16u) {
                    xu = vec4<f32>(f32(inp[xat + cb[8]]), f32(inp[xat + cb[9]]), f32(inp[xat + cb[10]]), f32(inp[xat + cb[11]]));
                    xt = vec4<f32>(f32(inp[xat + cb[12]]), f32(inp[xat + cb[13]]), f32(inp[xat + cb[14]]), f32(inp[xat + cb[15]]));
                }
                if (LANES) {
                    xv *= live;
                    xw *= live;
                    xu *= live;
                    xt *= live;
                }
                // dout of the block's output channels 0-3, 4-7, 8-11, 12-15 at this pixel.
                let d = wgrad_dout(rows, db);
                let gl = d[0];
                let gh = d[1];
                let gu = d[2];
                let gt = d[3];
                let g0 = gl.x;
                let g1 = gl.y;
                let g2 = gl.z;
                let g3 = gl.w;
                let g4 = gh.x;
                let g5 = gh.y;
                let g6 = gh.z;
                let g7 = gh.w;
                a0_0 += g0 * xv;
                a1_0 += g1 * xv;
                a2_0 += g2 * xv;
                a3_0 += g3 * xv;
                a4_0 += g4 * xv;
                a5_0 += g5 * xv;
                a6_0 += g6 * xv;
                a7_0 += g7 * xv;
                if (WGRAD_CI >= 8u) {
                    a0_1 += g0 * xw;
                    a1_1 += g1 * xw;
                    a2_1 += g2 * xw;
                    a3_1 += g3 * xw;
                    a4_1 += g4 * xw;
                    a5_1 += g5 * xw;
                    a6_1 += g6 * xw;
                    a7_1 += g7 * xw;
                }
                if (WGRAD_CI == 16u) {
                    a0_2 += g0 * xu;
                    a1_2 += g1 * xu;
                    a2_2 += g2 * xu;
                    a3_2 += g3 * xu;
                    a4_2 += g4 * xu;
                    a5_2 += g5 * xu;
                    a6_2 += g6 * xu;
                    a7_2 += g7 * xu;
                    a0_3 += g0 * xt;
                    a1_3 += g1 * xt;
                    a2_3 += g2 * xt;
                    a3_3 += g3 * xt;
                    a4_3 += g4 * xt;
                    a5_3 += g5 * xt;
                    a6_3 += g6 * xt;
                    a7_3 += g7 * xt;
                }
                if (WGRAD_N == 16u) {
                    let g8 = gu.x;
                    let g9 = gu.y;
                    let g10 = gu.z;
                    let g11 = gu.w;
                    let g12 = gt.x;
                    let g13 = gt.y;
                    let g14 = gt.z;
                    let g15 = gt.w;
                    a8_0 += g8 * xv;
                    a9_0 += g9 * xv;
                    a10_0 += g10 * xv;
                    a11_0 += g11 * xv;
                    a12_0 += g12 * xv;
                    a13_0 += g13 * xv;
                    a14_0 += g14 * xv;
                    a15_0 += g15 * xv;
                    if (WGRAD_CI >= 8u) {
                        a8_1 += g8 * xw;
                        a9_1 += g9 * xw;
                        a10_1 += g10 * xw;
                        a11_1 += g11 * xw;
                        a12_1 += g12 * xw;
                        a13_1 += g13 * xw;
                        a14_1 += g14 * xw;
                        a15_1 += g15 * xw;
                    }
                    if (WGRAD_CI == 16u) {
                        a8_2 += g8 * xu;
                        a9_2 += g9 * xu;
                        a10_2 += g10 * xu;
                        a11_2 += g11 * xu;
                        a12_2 += g12 * xu;
                        a13_2 += g13 * xu;
                        a14_2 += g14 * xu;
                        a15_2 += g15 * xu;
                        a8_3 += g8 * xt;
                        a9_3 += g9 * xt;
                        a10_3 += g10 * xt;
                        a11_3 += g11 * xt;
                        a12_3 += g12 * xt;
                        a13_3 += g13 * xt;
                        a14_3 += g14 * xt;
                        a15_3 += g15 * xt;
                    }
                }
                at += p.stride_w;
                db++;
            }
        }
        m += row_end - row_px;
        row_px = 0u;
        py++;
        if (py == p.oh) {
            py = 0u;
            nn++;
        }
    }
    var acc = array<vec4<f32>, 64>(
        a0_0, a0_1, a0_2, a0_3,
        a1_0, a1_1, a1_2, a1_3,
        a2_0, a2_1, a2_2, a2_3,
        a3_0, a3_1, a3_2, a3_3,
        a4_0, a4_1, a4_2, a4_3,
        a5_0, a5_1, a5_2, a5_3,
        a6_0, a6_1, a6_2, a6_3,
        a7_0, a7_1, a7_2, a7_3,
        a8_0, a8_1, a8_2, a8_3,
        a9_0, a9_1, a9_2, a9_3,
        a10_0, a10_1, a10_2, a10_3,
        a11_0, a11_1, a11_2, a11_3,
        a12_0, a12_1, a12_2, a12_3,
        a13_0, a13_1, a13_2, a13_3,
        a14_0, a14_1, a14_2, a14_3,
        a15_0, a15_1, a15_2, a15_3,
    );
    let slice = split * p.c_out * k_total;
    if (!tap_ok) {
        return;
    }
    for (var i = 0u; i < WGRAD_N; i++) {
        let co = co0 + i;
        if (co < cout_g) {
            for (var j = 0u; j < WGRAD_CI; j++) {
                let ci = ci0 + j;
                if (ci < cin_g) {
                    dweight_partial[slice + (g * cout_g + co) * k_total + ci * khw + tap] = acc[4u * i + j / 4u][j % 4u];
                }
            }
        }
    }
}

// The weight gradient of a layer 3 wide with padding 1, dilation 1 and stride 1 (WGRAD_ROW3, host
// `register::row3_wgrad`, `--conv-3x3`): an invocation owns 4 input channels x WGRAD_N output
// channels at the three taps of one kernel row, and walks each output row keeping the input
// values at columns px - 1, px and px + 1 in registers, so that per pixel it loads 4 input values
// (the new right-hand column) for 3 x 4 x WGRAD_N products, where the one-tap walk loads WGRAD_CI
// for WGRAD_CI x WGRAD_N. Each tap's sum runs over the same pixels in the same order as the
// one-tap walk's; where a tap lands in the padding it adds a 0 product (which leaves a finite sum
// bit for bit as it was), so the values are the one-tap walk's bit for bit. With LANES the lanes
// walk whole rows together (dout broadcast per pixel), a row outside the image masked to 0.
fn wgrad_row3_block(gid: vec3<u32>, lane: u32) {
    let khw = p.kh * 3u;
    let cin_g = p.c_in / p.groups;
    let cout_g = p.c_out / p.groups;
    let k_total = cin_g * khw;
    let ci_blocks = (cin_g + 3u) / 4u;
    let ky_ok = gid.x / ci_blocks < p.kh;
    let ky = min(gid.x / ci_blocks, p.kh - 1u);
    let ci0 = (gid.x % ci_blocks) * 4u;
    let co_blocks = (cout_g + WGRAD_N - 1u) / WGRAD_N;
    let g = gid.y / co_blocks;
    let co0 = (gid.y % co_blocks) * WGRAD_N;
    let split = gid.z;
    if (g >= p.groups || !lanes_any(ky_ok)) {
        return;
    }
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    let m_total = p.n * ohw;
    let m_begin = split * p.split_len;
    let m_end = min(m_total, m_begin + p.split_len);
    let dy = i32(ky * p.dil_h) - i32(p.pad_h);
    // Channels past the group's end read its last one; their sums are never written.
    let c0 = (g * cin_g + min(ci0, cin_g - 1u)) * hw;
    let c1 = (g * cin_g + min(ci0 + 1u, cin_g - 1u)) * hw;
    let c2 = (g * cin_g + min(ci0 + 2u, cin_g - 1u)) * hw;
    let c3 = (g * cin_g + min(ci0 + 3u, cin_g - 1u)) * hw;
    let rows = dout_rows(g, co0, cout_g, ohw, lane);
    var t0_0 = vec4<f32>(0.0);
    var t0_1 = vec4<f32>(0.0);
    var t0_2 = vec4<f32>(0.0);
    var t0_3 = vec4<f32>(0.0);
    var t0_4 = vec4<f32>(0.0);
    var t0_5 = vec4<f32>(0.0);
    var t0_6 = vec4<f32>(0.0);
    var t0_7 = vec4<f32>(0.0);
    var t0_8 = vec4<f32>(0.0);
    var t0_9 = vec4<f32>(0.0);
    var t0_10 = vec4<f32>(0.0);
    var t0_11 = vec4<f32>(0.0);
    var t0_12 = vec4<f32>(0.0);
    var t0_13 = vec4<f32>(0.0);
    var t0_14 = vec4<f32>(0.0);
    var t0_15 = vec4<f32>(0.0);
    var t1_0 = vec4<f32>(0.0);
    var t1_1 = vec4<f32>(0.0);
    var t1_2 = vec4<f32>(0.0);
    var t1_3 = vec4<f32>(0.0);
    var t1_4 = vec4<f32>(0.0);
    var t1_5 = vec4<f32>(0.0);
    var t1_6 = vec4<f32>(0.0);
    var t1_7 = vec4<f32>(0.0);
    var t1_8 = vec4<f32>(0.0);
    var t1_9 = vec4<f32>(0.0);
    var t1_10 = vec4<f32>(0.0);
    var t1_11 = vec4<f32>(0.0);
    var t1_12 = vec4<f32>(0.0);
    var t1_13 = vec4<f32>(0.0);
    var t1_14 = vec4<f32>(0.0);
    var t1_15 = vec4<f32>(0.0);
    var t2_0 = vec4<f32>(0.0);
    var t2_1 = vec4<f32>(0.0);
    var t2_2 = vec4<f32>(0.0);
    var t2_3 = vec4<f32>(0.0);
    var t2_4 = vec4<f32>(0.0);
    var t2_5 = vec4<f32>(0.0);
    var t2_6 = vec4<f32>(0.0);
    var t2_7 = vec4<f32>(0.0);
    var t2_8 = vec4<f32>(0.0);
    var t2_9 = vec4<f32>(0.0);
    var t2_10 = vec4<f32>(0.0);
    var t2_11 = vec4<f32>(0.0);
    var t2_12 = vec4<f32>(0.0);
    var t2_13 = vec4<f32>(0.0);
    var t2_14 = vec4<f32>(0.0);
    var t2_15 = vec4<f32>(0.0);
    var m = m_begin;
    var nn = m / ohw;
    var py = (m % ohw) / p.ow;
    var row_px = m % p.ow;
    while (m < m_end) {
        let row_end = min(p.ow, row_px + (m_end - m));
        let yy = i32(py * p.stride_h) + dy;
        let row_ok = yy >= 0 && yy < i32(p.h);
        if (LANES || row_ok) {
            // Input column px + kx - 1 for tap kx (stride 1, padding 1 across: ow = w). The row's
            // start in this image (a valid address even where the row is outside it: masked).
            let base = nn * p.c_in * hw + u32(select(0, yy, row_ok)) * p.w;
            let live = select(0.0, 1.0, row_ok);
            let a = row_px;
            // The window: columns a - 1 (0 at the left edge) and a.
            let l_at = base + max(a, 1u) - 1u;
            var xl = vec4<f32>(f32(inp[l_at + c0]), f32(inp[l_at + c1]), f32(inp[l_at + c2]), f32(inp[l_at + c3]))
                * select(0.0, live, a > 0u);
            let c_at = base + a;
            var xc = vec4<f32>(f32(inp[c_at + c0]), f32(inp[c_at + c1]), f32(inp[c_at + c2]), f32(inp[c_at + c3])) * live;
            var db = nn * p.c_out * ohw + py * p.ow + a;
            for (var px = a; px < row_end; px++) {
                let right = px + 1u < p.w;
                let r_at = base + select(px, px + 1u, right);
                let xr = vec4<f32>(f32(inp[r_at + c0]), f32(inp[r_at + c1]), f32(inp[r_at + c2]), f32(inp[r_at + c3]))
                    * select(0.0, live, right);
                let d = wgrad_dout(rows, db);
                let dl = d[0];
                let dh = d[1];
                let du = d[2];
                let dt = d[3];
                let g0 = dl.x;
                let g1 = dl.y;
                let g2 = dl.z;
                let g3 = dl.w;
                let g4 = dh.x;
                let g5 = dh.y;
                let g6 = dh.z;
                let g7 = dh.w;
                t0_0 += g0 * xl;
                t1_0 += g0 * xc;
                t2_0 += g0 * xr;
                t0_1 += g1 * xl;
                t1_1 += g1 * xc;
                t2_1 += g1 * xr;
                t0_2 += g2 * xl;
                t1_2 += g2 * xc;
                t2_2 += g2 * xr;
                t0_3 += g3 * xl;
                t1_3 += g3 * xc;
                t2_3 += g3 * xr;
                t0_4 += g4 * xl;
                t1_4 += g4 * xc;
                t2_4 += g4 * xr;
                t0_5 += g5 * xl;
                t1_5 += g5 * xc;
                t2_5 += g5 * xr;
                t0_6 += g6 * xl;
                t1_6 += g6 * xc;
                t2_6 += g6 * xr;
                t0_7 += g7 * xl;
                t1_7 += g7 * xc;
                t2_7 += g7 * xr;
                if (WGRAD_N == 16u) {
                    let g8 = du.x;
                    let g9 = du.y;
                    let g10 = du.z;
                    let g11 = du.w;
                    let g12 = dt.x;
                    let g13 = dt.y;
                    let g14 = dt.z;
                    let g15 = dt.w;
                    t0_8 += g8 * xl;
                    t1_8 += g8 * xc;
                    t2_8 += g8 * xr;
                    t0_9 += g9 * xl;
                    t1_9 += g9 * xc;
                    t2_9 += g9 * xr;
                    t0_10 += g10 * xl;
                    t1_10 += g10 * xc;
                    t2_10 += g10 * xr;
                    t0_11 += g11 * xl;
                    t1_11 += g11 * xc;
                    t2_11 += g11 * xr;
                    t0_12 += g12 * xl;
                    t1_12 += g12 * xc;
                    t2_12 += g12 * xr;
                    t0_13 += g13 * xl;
                    t1_13 += g13 * xc;
                    t2_13 += g13 * xr;
                    t0_14 += g14 * xl;
                    t1_14 += g14 * xc;
                    t2_14 += g14 * xr;
                    t0_15 += g15 * xl;
                    t1_15 += g15 * xc;
                    t2_15 += g15 * xr;
                }
                xl = xc;
                xc = xr;
                db++;
            }
        }
        m += row_end - row_px;
        row_px = 0u;
        py++;
        if (py == p.oh) {
            py = 0u;
            nn++;
        }
    }
    if (!ky_ok) {
        return;
    }
    // Taps kx = 0, 1, 2 of output channel i: acc[3 * i + kx], a vec4 over the 4 input channels.
    var acc = array<vec4<f32>, 48>(
        t0_0, t1_0, t2_0,
        t0_1, t1_1, t2_1,
        t0_2, t1_2, t2_2,
        t0_3, t1_3, t2_3,
        t0_4, t1_4, t2_4,
        t0_5, t1_5, t2_5,
        t0_6, t1_6, t2_6,
        t0_7, t1_7, t2_7,
        t0_8, t1_8, t2_8,
        t0_9, t1_9, t2_9,
        t0_10, t1_10, t2_10,
        t0_11, t1_11, t2_11,
        t0_12, t1_12, t2_12,
        t0_13, t1_13, t2_13,
        t0_14, t1_14, t2_14,
        t0_15, t1_15, t2_15,
    );
    let slice = split * p.c_out * k_total;
    for (var i = 0u; i < WGRAD_N; i++) {
        let co = co0 + i;
        if (co < cout_g) {
            for (var j = 0u; j < 4u; j++) {
                let ci = ci0 + j;
                if (ci < cin_g) {
                    for (var kx = 0u; kx < 3u; kx++) {
                        dweight_partial[slice + (g * cout_g + co) * k_total + ci * khw + ky * 3u + kx] = acc[3u * i + kx][j];
                    }
                }
            }
        }
    }
}

// A layer's input gradient and weight gradient in one dispatch (MODE 1): both read dout and write
// buffers the other does not touch, so nothing orders them, and the device is filled by the
// blocks of both. Workgroups count row-major over the 2-D grid and `joint_slot` says which
// gradient's each runs: conv2d_gemm's input-gradient blocks (its grid p.joint_dx wide) or
// conv2d_backward_weight's (its grid p.joint_wx x p.joint_wy x p.splits, a kernel row at a time
// with WGRAD_ROW3 as there). Each block is the invocation the separate kernel would run, so every
// value is bit for bit theirs.
@compute @workgroup_size(WG)
fn conv2d_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    lane: LaneId,
) {
    let slot = joint_slot(wid.x + wid.y * nwg.x);
    let b = slot.y;
    // Both blocks are called in every workgroup, the one it does not run with a group past the
    // last, so that it returns at once: on lavapipe a block inside a branch ran slower than the
    // same block entered unconditionally (a 1x1 layer's input gradient by a tenth).
    let past = 0xffffffffu;
    gemm_block(vec3<u32>((b % p.joint_dx) * WG + li, select(past, b / p.joint_dx, slot.x == 0u), 0u), lane_index(lane));
    let xy = p.joint_wx * p.joint_wy;
    let wgid = vec3<u32>((b % p.joint_wx) * WG + li, select(past, (b % xy) / p.joint_wx, slot.x == 1u), b / xy);
    if (WGRAD_ROW3) {
        wgrad_row3_block(wgid, lane_index(lane));
    } else {
        wgrad_block(wgid, lane_index(lane));
    }
}

// Sum the split partials of the weight gradient in a fixed order. One invocation per weight.
@compute @workgroup_size(WG)
fn conv2d_backward_weight_reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    let total = p.c_out * (p.c_in / p.groups) * p.kh * p.kw;
    if (e >= total) {
        return;
    }
    var s = 0.0;
    for (var k = 0u; k < p.splits; k++) {
        s += dweight_partial_in[k * total + e];
    }
    dweight[e] = s;
}

// One workgroup per output channel: dbias[co] = sum over n, oy, ox of dout. OHW (= oh * ow) is
// a pipeline constant, so e / OHW compiles to a multiply and shift.
override OHW: u32 = 1u;

@compute @workgroup_size(RED_WG)
fn conv2d_backward_bias(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    let co = wid.x;
    let total = p.n * OHW;
    var s = 0.0;
    for (var e = l.t; e < total; e += RED_WG) {
        let nn = e / OHW;
        s += f32(dout[(nn * p.c_out + co) * OHW + e % OHW]);
    }
    let sum = block_sum2(vec2<f32>(s, 0.0), l);
    if (l.t == 0u) {
        dbias[co] = sum.x;
    }
}
