// conv2d_tiled: the three convolution GEMMs of conv2d.wgsl with workgroup-memory tiles, the
// discrete-GPU kernel family (same op, same CPU oracle: ops/conv2d/reference.rs). The GEMMs (MODE 0
// forward, 1 input gradient, 2 weight gradient), the bindings, the operand loads and the store are
// conv2d_gemm.wgsl's, which the host appends (shared with conv2d_coop.wgsl); this file is the tiling.
//
// A workgroup of 256 invocations owns a BM x BN tile of the output; per step of BK along K it
// stages a BK x BM slice of A and a BK x BN slice of B in workgroup memory (loads arranged so that
// neighbouring invocations read neighbouring addresses where the layout allows: along K for
// weights and for the weight gradient's operands, along pixels for activations), then each
// invocation accumulates a TM x TN micro-tile in registers, read from workgroup memory four
// values at a time. The micro-tile is TM/4 x TN/4 blocks of 4 x 4, strided — block rows
// 4*(ty + i*BM/TM), block columns 4*(tx + j*BN/TN) — so that a warp's vec4 reads of B cover
// consecutive addresses and its reads of A broadcast, and its stores to pixel-contiguous outputs
// are runs of four. Each row of a staged slice is padded by 4 values, so that the weight-gradient
// and A stores, K fastest across invocations, do not all fall in one bank. While one slice is
// multiplied, each invocation already holds its share of the next in registers (prefetch).
// Tile shapes are override constants (ops::conv2d::WorkgroupTiles lists those built:
// (BM/TM)*(BN/TN) = 256, TM and TN 4 or 8, BN a divisor of 256, BK*BM and BK*BN at most 2048);
// the kernel's height KH and width KW are too, so the loads' divisions by them are
// multiplications, and every value an invocation's loads need that does not change along K is
// decoded once, before the K loop (its pixel, for the forward and the input gradient).
//
// The weight gradient splits K (N*OH*OW) over gid.z into `splits` ranges of `split_len`, each
// writing its slice of the partial buffer; conv2d.wgsl's conv2d_backward_weight_reduce sums the
// slices in a fixed order, so results are deterministic as with the register kernels.
//
// Activations, their gradients and the weights are `act` (f32, or f16 in an f16 plan); the tiles in
// workgroup memory, the accumulators and the weight gradient (binding 6) are f32 in both.
//
// Versions: v1, single-buffered, loads decode their (channel, tap) and (image, pixel) with
// integer divisions by uniforms. Measured on lavapipe (senet bench --tune full, width 0.25, batch
// 32, SENET_TUNE_VERBOSE=1, machine shared with a training run; ratios from one run): the best
// tile shape is 8x to 25x slower than the register blocks of conv2d.wgsl (features.4 forward
// 48 ms register vs 387 ms tiled 32x128; input gradient 42 vs 706 ms; first layer's weight
// gradient 59 vs 736 ms) — no faster shared memory there, every access lane by lane — so quick
// tuning does not time them on CPU adapters. On an NVIDIA H200, full tuning of the base SENet w1
// (batch 128) chose the register blocks for every layer and pass, none of these tiles
// (docs/runs/gpu-bench-h200/). Next versions:
// double buffering of the next K slice, vec4 loads where aligned, divisions by pipeline constants.
// v2: `act` storage for --precision f16; the weight gradient writes binding 6 (f32).
// v3: bindings, loads and store moved to conv2d_gemm.wgsl, shared with the coop kernel; the
// same arithmetic (loads widen to f32 where v2's did).
// v4: groups, one GEMM per group along wid.z (conv2d_gemm.wgsl's enter_group); with
// groups = 1 the same arithmetic. Measured in the same run as conv2d.wgsl's v9 (lavapipe, shared
// machine): ResNeXt's 32 groups of 4 channels, 64x64 tiles: ~0.01 GFLOP/s f32 in every pass,
// ~20x slower than the register blocks (a 64-row tile holds 4 rows of a group's GEMM) — on a
// GPU, grouped layers want tiles sized to the group; not measured there yet.
// v5: the input gradient's addend (conv2d_params.wgsl's `accumulate`, in the shared store);
// with the flag off the same arithmetic. Not timed.
// v6: rewritten for GPUs after v5 lost to the register blocks everywhere on the H200:
// vec4 micro-tile reads into up to four named 4 x 4 blocks (`Quad`) and a prefetch in named vec4s,
// never an array indexed in a loop, padded staging rows, register prefetch of the next K slice, KH and KW
// as pipeline constants, pixel decodes hoisted out of the K loop, each output column's offset
// decoded once for all its rows (conv2d_gemm.wgsl's store_col). Each output is still one f32
// chain over k ascending, now of explicit fused multiply-adds. Tile shapes with TM or TN of 2
// (64x32, 32x128 with 2x8) gave way to shapes the vec4 reads allow. Measured on one NVIDIA H200
// (Vulkan, docs/runs/workgroup-v6-h200/; quick tuning against --tune off, alternated in one run):
// SE-ResNet-50 at 224, batch 64, f32: the convolutions 87.7 ms per training step against the
// register blocks' 224.9, 16.5-19.9 TFLOP/s per pass (45-55 % of the FMA probe), the tiles chosen
// for 56 of 59 passes (mostly 128x128); training 473.8 against 233.9 images/s (2.03x), evaluation
// 1,826 against 842. Base SENet w1, batch 128: 12,429 against 6,125 (2.03x); SE-ResNet-20, batch
// 128: 11,074 against 8,001 (1.38x). Tried, not kept: the accumulators and prefetch in private
// arrays indexed in loops lost to the register blocks on every layer (1.6-12x slower): the
// compiler kept them in memory, so the registers here are named. On lavapipe (senet w0.25, batch
// 32, --tune full, one run) the best tile still took 4.1-21x the register blocks' time on every
// pass, so quick tuning keeps not timing them on CPU adapters.
// v7: the forward's batch statistics (`p.stats`, `--bn-stats`; `tile_stats`): per output
// channel and workgroup column block, the mean and M2 of the stored values for the training batch
// norm after it, summed from the registers after the store through the freed workgroup memory; with
// the flag off the arithmetic is v6's. The training batch norm and ReLU before the convolution
// applied as the forward and the weight gradient load its input (`p.affine_in`, `--bn-apply`), so
// the batch norm writes no output in training; with the flag off the loads are v6's. A strided
// input gradient's columns numbered by stride phase (conv2d_params.wgsl's phase_row), a tile whose
// columns no tap reaches skipping its K loop: on the H200 the register blocks beat v6 on SE-ResNet-50's
// stride-2 1x1 input gradients, whose tiles computed 3 zero pixels in 4. None of these is timed on
// a GPU yet.
// v8: MODE 3 (JOINT), a layer's input gradient and weight gradient in one dispatch on the same tile
// shape, as the register family's conv2d_backward: each workgroup runs one tile of one of the two
// GEMMs (`enter_joint`), exactly the invocations it runs apart, so the results are theirs bit for
// bit; the other modes' branches on `mode()` fold to v7's. One dispatch fewer per convolution whose
// input gradient is read (52 of SE-ResNet-50's 402 on a plan of these tiles), and the two GEMMs'
// tiles fill the device together where each alone leaves it part-idle (SE-ResNet-50's last stage at
// batch 32: 13 x 4 input-gradient tiles of 128 x 128 for a layer of 512 input channels). Not timed
// on a GPU yet.
// v9 (this): the joint's tiles of the two GEMMs interleaved in proportion (conv2d_params.wgsl's
// `joint_slot`, shared with the register family's joint) instead of all the input gradient's
// first: on lavapipe, which hands each thread one contiguous run of a dispatch's workgroups, the
// register family's joint took up to 1.9x the two passes' time that way. The same tiles, so the
// same values; not timed on a GPU.

override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 16u;
override TM: u32 = 4u;
override TN: u32 = 4u;
// The convolution kernel's height and width (the layer's kh, kw).
override KH: u32 = 1u;
override KW: u32 = 1u;

const T: u32 = 256u;
// Values of padding after each staged row of BM (A) or BN (B) values.
const PAD: u32 = 4u;

// (BM + PAD) * BK / 4 and (BN + PAD) * BK / 4 are at most 528 for every tile shape built (132 x 16
// values, 8.25 KiB each): 16.5 KiB in all, past WebGPU's guaranteed 16 KiB. Vulkan, Metal and DX12
// GPUs have 32 KiB or more; where an adapter has less, the pipeline fails to build and the tuner
// skips the kernel (ops::conv2d::tune::choose).
var<workgroup> As: array<vec4<f32>, 528>;
var<workgroup> Bs: array<vec4<f32>, 528>;

// The forward's batch statistics (`p.stats` != 0: a training batch norm alone reads the output;
// batch_norm.wgsl's PARTIALS): per block of BN output pixels of the batch (this workgroup's columns,
// block wid.x) and output channel, (mean, M2) of the values stored, [blocks, c_out, 2]; a
// placeholder where they are not written.
@group(0) @binding(7) var<storage, read_write> stat_partial: array<f32>;
// The training batch norm before the convolution, which the forward and the weight gradient apply
// with its ReLU as they load its input (`p.affine_in` != 0; `inp` is then that batch norm's input):
// its saved statistics [2, c_in] (mean, invstd) and its scale and shift [c_in]; placeholders where
// unused.
@group(0) @binding(8) var<storage, read> bn_stats: array<f32>;
@group(0) @binding(9) var<storage, read> bn_gamma: array<f32>;
@group(0) @binding(10) var<storage, read> bn_beta: array<f32>;
// The joint backward's input-gradient addend (MODE = JOINT, where binding 1 is the weight
// gradient's input); a placeholder elsewhere.
@group(0) @binding(11) var<storage, read> joint_addend: array<act>;

// The input gradient's addend (conv2d_params.wgsl's `accumulate`): read through `inp`, which the
// input gradient does not otherwise read, or in a joint pipeline through binding 11.
fn addend_at(i: u32) -> f32 {
    if (MODE == JOINT) {
        return f32(joint_addend[i]);
    }
    return f32(inp[i]);
}

// enter_joint's workgroup past both GEMMs' tiles.
const PAST: u32 = 0xffffffffu;

// A joint pipeline's workgroup l (numbered along x, then y; `width` per row; `joint_slot` says
// which gradient's tile it runs): the input gradient's tile i (p.joint_dx tiles per row of its
// grid, p.joint_dn / groups per group) or the weight gradient's (p.joint_wx per row, p.joint_wx *
// p.joint_wy per split and group). Sets pass_mode and returns the workgroup id that pass's own
// grid gives the tile, so each tile runs exactly the invocations it runs apart; x = PAST for a
// workgroup past both. Workgroup-uniform.
fn enter_joint(wid: vec3<u32>, width: u32) -> vec3<u32> {
    let slot = joint_slot(wid.y * width + wid.x);
    let l = slot.y;
    var x_n = p.joint_dx;
    var per_z = p.joint_dn / p.groups;
    pass_mode = DGRAD;
    if (slot.x == 2u) {
        return vec3<u32>(PAST, 0u, 0u);
    }
    if (slot.x == 1u) {
        x_n = p.joint_wx;
        per_z = p.joint_wx * p.joint_wy;
        pass_mode = WGRAD;
    }
    return vec3<u32>(l % x_n, (l % per_z) / x_n, l / per_z);
}

// This workgroup's first row and column, the GEMM's extent, its K range's end.
var<private> row0: u32;
var<private> col0: u32;
var<private> n_rows: u32;
var<private> n_cols: u32;
var<private> k_stop: u32;

// This invocation's B column (the forward and the input gradient, where it stays the same along
// K): whether it is inside the GEMM, its image's offset, and its pixel's first input row and
// column (forward: oy*stride - pad; input gradient: iy + pad).
var<private> col_in: bool;
var<private> col_base: u32;
var<private> col_y: i32;
var<private> col_x: i32;

// This invocation's share of the next K slice: slots 0-3 and 4-7 of A (BK*BM/T of them, SA) and
// of B (SB). Named vectors, not arrays: an array indexed in a loop may live in memory, not
// registers (the register blocks' header measured that on lavapipe; these tiles with arrays ran
// 4-8x slower than the register blocks on the H200).
var<private> next_a0: vec4<f32>;
var<private> next_a1: vec4<f32>;
var<private> next_b0: vec4<f32>;
var<private> next_b1: vec4<f32>;

// A 4 x 4 block of the micro-tile: rows r0..r3, each a vec4 over 4 columns.
struct Quad {
    r0: vec4<f32>,
    r1: vec4<f32>,
    r2: vec4<f32>,
    r3: vec4<f32>,
}

// The block plus the outer product of a (4 rows) and b (4 columns), as fused multiply-adds.
fn mac(q: Quad, a: vec4<f32>, b: vec4<f32>) -> Quad {
    return Quad(
        fma(vec4<f32>(a.x), b, q.r0),
        fma(vec4<f32>(a.y), b, q.r1),
        fma(vec4<f32>(a.z), b, q.r2),
        fma(vec4<f32>(a.w), b, q.r3),
    );
}

// The weight gradient's pixel k (= image n, pixel q within its plane, top-left input row y and
// column x of its window).
struct Pixel {
    n: u32,
    q: u32,
    y: i32,
    x: i32,
}

// Decode the B column this invocation loads at every K step (forward, input gradient): column
// col0 + tid % BN.
fn enter_column(tid: u32) {
    let c = col0 + tid % BN;
    col_in = c < n_cols;
    if (mode() == FWD) {
        let ohw = p.oh * p.ow;
        let q = c % ohw;
        col_base = (c / ohw) * p.c_in * p.h * p.w;
        col_y = i32((q / p.ow) * p.stride_h) - i32(p.pad_h);
        col_x = i32((q % p.ow) * p.stride_w) - i32(p.pad_w);
    } else if (mode() == DGRAD) {
        let px = dgrad_pixel(c);
        col_base = px.x * p.c_out * p.oh * p.ow;
        col_y = i32(px.y + p.pad_h);
        col_x = i32(px.z + p.pad_w);
    }
}

// A strided input gradient numbers its columns by stride phase (conv2d_params.wgsl's phase_row),
// as the register GEMM numbers its rows: a tile then lies in one or two phases, and one whose
// columns all lie in phases no tap reaches (3 in 4 pixels of a stride-2 1x1 layer) skips its K
// loop and stores zeros (or its addend).
fn phased() -> bool {
    return mode() == DGRAD && (p.stride_h > 1u || p.stride_w > 1u);
}

// The input gradient's column c: (image, iy, ix).
fn dgrad_pixel(c: u32) -> vec3<u32> {
    if (phased()) {
        return phase_row(c);
    }
    let hw = p.h * p.w;
    let q = c % hw;
    return vec3<u32>(c / hw, q / p.w, q % p.w);
}

// Column c's element offset at channel 0 in the output (forward) or the input gradient: the
// shared col_offset, or the phase-numbered pixel's.
fn tile_col_offset(c: u32) -> u32 {
    if (phased()) {
        let px = phase_row(c);
        return px.x * p.c_in * p.h * p.w + px.y * p.w + px.z;
    }
    return col_offset(c);
}

// Whether a tap of a kernel k wide (stride s, padding pad, dilation dil) reaches input phase ph:
// (ph + pad - t*dil) a multiple of s for some tap t.
fn phase_live(ph: u32, s: u32, pad: u32, dil: u32, k: u32) -> bool {
    for (var t = 0u; t < k; t++) {
        let d = i32(ph + pad) - i32(t * dil);
        if (((d % i32(s)) + i32(s)) % i32(s) == 0) {
            return true;
        }
    }
    return false;
}

// Whether a column of this workgroup's tile (col0 .. col0 + BN, inside the GEMM) lies in a phase
// some tap reaches: always, unless phased(). Workgroup-uniform.
fn tile_live() -> bool {
    if (!phased()) {
        return true;
    }
    let end = min(col0 + BN, n_cols);
    var start = 0u;
    for (var py = 0u; py < p.stride_h; py++) {
        let ny = select(0u, (p.h - py + p.stride_h - 1u) / p.stride_h, py < p.h);
        for (var px = 0u; px < p.stride_w; px++) {
            let nx = select(0u, (p.w - px + p.stride_w - 1u) / p.stride_w, px < p.w);
            let stop = start + p.n * ny * nx;
            let live = phase_live(py, p.stride_h, p.pad_h, p.dil_h, KH) && phase_live(px, p.stride_w, p.pad_w, p.dil_w, KW);
            if (live && start < end && col0 < stop) {
                return true;
            }
            start = stop;
        }
    }
    return false;
}

// The input value at row iy, column ix of channel ci of the image at `base`, 0 in the padding;
// with `p.affine_in`, the batch norm before and its ReLU applied to it as the batch norm would
// have stored it (batch_norm.wgsl's `normalised`: the same expression and rounding).
fn input_at(base: u32, ci: u32, iy: i32, ix: i32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    let x = f32(inp[base + (ci * p.h + u32(iy)) * p.w + u32(ix)]);
    if (p.affine_in != 0u) {
        let scale = bn_stats[p.c_in + ci] * bn_gamma[ci];
        return act_rounded(max((x - bn_stats[ci]) * scale + bn_beta[ci], 0.0));
    }
    return x;
}

// The output gradient reaching input offset (ty, tx) = (iy + pad - ky*dil, ix + pad - kx*dil) of
// channel co through the stride, 0 where none does (the transposed convolution, gathered).
fn dout_at(co: u32, ty: i32, tx: i32) -> f32 {
    if (ty < 0 || tx < 0) {
        return 0.0;
    }
    var oy = u32(ty);
    var ox = u32(tx);
    if (p.stride_h != 1u || p.stride_w != 1u) {
        if (oy % p.stride_h != 0u || ox % p.stride_w != 0u) {
            return 0.0;
        }
        oy = oy / p.stride_h;
        ox = ox / p.stride_w;
    }
    if (oy >= p.oh || ox >= p.ow) {
        return 0.0;
    }
    return f32(dout[col_base + (co * p.oh + oy) * p.ow + ox]);
}

// Slot e of this invocation's share of A for the K slice at k0: 0 past the share (e >= SA), the
// GEMM's rows or K. A has K fastest across invocations: this invocation's k is k0 + tid % BK.
fn a_value(e: u32, k0: u32, tid: u32, px: Pixel) -> f32 {
    let ka = k0 + tid % BK;
    let r = row0 + (e * T + tid) / BK;
    if (e >= BK * BM / T || r >= n_rows || ka >= k_stop) {
        return 0.0;
    }
    let khw = KH * KW;
    if (mode() == FWD) {
        return f32(weight[(grp * cout_g() + r) * cin_g() * khw + ka]);
    }
    if (mode() == DGRAD) {
        // weight[co, ci = r, t] with k = (co, t), co within the group
        return f32(weight[((grp * cout_g() + ka / khw) * cin_g() + r) * khw + ka % khw]);
    }
    // dout[n, co = r, pixel] with k = (n, pixel)
    return f32(dout[(px.n * p.c_out + grp * cout_g() + r) * p.oh * p.ow + px.q]);
}

// Slot e of this invocation's share of B for the K slice at k0, 0 past the share (e >= SB), the
// GEMM's columns or K.
fn b_value(e: u32, k0: u32, tid: u32, px: Pixel) -> f32 {
    if (e >= BK * BN / T) {
        return 0.0;
    }
    let khw = KH * KW;
    if (mode() == WGRAD) {
        // B[k, c] = im2col(inp)[c = (ci, ky, kx), pixel k], K fastest across invocations.
        let c = col0 + (e * T + tid) / BK;
        if (c >= n_cols || k0 + tid % BK >= k_stop) {
            return 0.0;
        }
        let t = c % khw;
        let y = px.y + i32((t / KW) * p.dil_h);
        let x = px.x + i32((t % KW) * p.dil_w);
        return input_at(px.n * p.c_in * p.h * p.w, grp * cin_g() + c / khw, y, x);
    }
    // The forward's and input gradient's column is this invocation's own (enter_column).
    let k = k0 + (e * T + tid) / BN;
    if (!col_in || k >= k_stop) {
        return 0.0;
    }
    let t = k % khw;
    let dy = i32((t / KW) * p.dil_h);
    let dx = i32((t % KW) * p.dil_w);
    if (mode() == FWD) {
        return input_at(col_base, grp * cin_g() + k / khw, col_y + dy, col_x + dx);
    }
    return dout_at(grp * cout_g() + k / khw, col_y - dy, col_x - dx);
}

// Load this invocation's share of the K slice from k0 into next_a* / next_b*.
fn fetch(k0: u32, tid: u32) {
    var px = Pixel(0u, 0u, 0, 0);
    if (mode() == WGRAD) {
        // Pixel k0 + tid % BK, decoded once for all of this invocation's loads.
        let ka = k0 + tid % BK;
        let ohw = p.oh * p.ow;
        px.n = ka / ohw;
        px.q = ka % ohw;
        px.y = i32((px.q / p.ow) * p.stride_h) - i32(p.pad_h);
        px.x = i32((px.q % p.ow) * p.stride_w) - i32(p.pad_w);
    }
    next_a0 = vec4<f32>(a_value(0u, k0, tid, px), a_value(1u, k0, tid, px), a_value(2u, k0, tid, px), a_value(3u, k0, tid, px));
    if (BK * BM / T > 4u) {
        next_a1 = vec4<f32>(a_value(4u, k0, tid, px), a_value(5u, k0, tid, px), a_value(6u, k0, tid, px), a_value(7u, k0, tid, px));
    }
    next_b0 = vec4<f32>(b_value(0u, k0, tid, px), b_value(1u, k0, tid, px), b_value(2u, k0, tid, px), b_value(3u, k0, tid, px));
    if (BK * BN / T > 4u) {
        next_b1 = vec4<f32>(b_value(4u, k0, tid, px), b_value(5u, k0, tid, px), b_value(6u, k0, tid, px), b_value(7u, k0, tid, px));
    }
}

// Slot e of A into workgroup memory (BK rows of BM + PAD values), if the share has it.
fn stage_a(e: u32, v: f32, tid: u32) {
    if (e < BK * BM / T) {
        let i = (tid % BK) * (BM + PAD) + (e * T + tid) / BK;
        As[i / 4u][i % 4u] = v;
    }
}

// Slot e of B into workgroup memory (BK rows of BN + PAD values), if the share has it.
fn stage_b(e: u32, v: f32, tid: u32) {
    if (e < BK * BN / T) {
        var i = ((e * T + tid) / BN) * (BN + PAD) + tid % BN;
        if (mode() == WGRAD) {
            i = (tid % BK) * (BN + PAD) + (e * T + tid) / BK;
        }
        Bs[i / 4u][i % 4u] = v;
    }
}

// Put the fetched slice in workgroup memory.
fn stage(tid: u32) {
    stage_a(0u, next_a0.x, tid);
    stage_a(1u, next_a0.y, tid);
    stage_a(2u, next_a0.z, tid);
    stage_a(3u, next_a0.w, tid);
    stage_a(4u, next_a1.x, tid);
    stage_a(5u, next_a1.y, tid);
    stage_a(6u, next_a1.z, tid);
    stage_a(7u, next_a1.w, tid);
    stage_b(0u, next_b0.x, tid);
    stage_b(1u, next_b0.y, tid);
    stage_b(2u, next_b0.z, tid);
    stage_b(3u, next_b0.w, tid);
    stage_b(4u, next_b1.x, tid);
    stage_b(5u, next_b1.y, tid);
    stage_b(6u, next_b1.z, tid);
    stage_b(7u, next_b1.w, tid);
}

// Store value v at (r, c) of the GEMM, col = col_offset(c), if r is inside it.
fn store_if(r: u32, c: u32, col: u32, v: f32, split: u32) {
    if (r < n_rows) {
        store_col(r, c, col, v, split);
    }
}

// Store block q: rows from r (4 of them), columns from c (4 of them).
fn store_quad(q: Quad, r: u32, c: u32, split: u32) {
    for (var jj = 0u; jj < 4u; jj++) {
        let cj = c + jj;
        if (cj >= n_cols) {
            return;
        }
        var col = 0u;
        if (mode() != WGRAD) {
            col = tile_col_offset(cj);
        }
        store_if(r, cj, col, q.r0[jj], split);
        store_if(r + 1u, cj, col, q.r1[jj], split);
        store_if(r + 2u, cj, col, q.r2[jj], split);
        store_if(r + 3u, cj, col, q.r3[jj], split);
    }
}

// Row r's sum over the columns `valid` of v (one 4 x 4 block row, bias not yet added) as stored:
// step 0 of the values, step 1 of their squared deviations from `mean`.
fn row_stat(v: vec4<f32>, r: u32, valid: vec4<bool>, mean: f32, step: u32) -> f32 {
    var b = 0.0;
    if (p.has_bias != 0u && r < n_rows) {
        b = bias[grp * cout_g() + r];
    }
    let u = v + vec4<f32>(b);
    let s = vec4<f32>(act_rounded(u.x), act_rounded(u.y), act_rounded(u.z), act_rounded(u.w));
    var e = s;
    if (step == 1u) {
        e = (s - vec4<f32>(mean)) * (s - vec4<f32>(mean));
    }
    let m = select(vec4<f32>(0.0), e, valid);
    return (m.x + m.y) + (m.z + m.w);
}

// Block q's row sums (rows from r, columns from c, those inside the GEMM), step as row_stat's.
fn quad_stat(q: Quad, r: u32, c: u32, mean: vec4<f32>, step: u32) -> vec4<f32> {
    let valid = vec4<u32>(c, c + 1u, c + 2u, c + 3u) < vec4<u32>(n_cols);
    return vec4<f32>(
        row_stat(q.r0, r, valid, mean.x, step),
        row_stat(q.r1, r + 1u, valid, mean.y, step),
        row_stat(q.r2, r + 2u, valid, mean.z, step),
        row_stat(q.r3, r + 3u, valid, mean.w, step),
    );
}

// Value i of the statistics' workgroup scratch: As, free once the K loop has ended (BM * BN / TN
// values, at most 2048 of its 2112), and Bs for the rows' means.
fn put_sum(i: u32, v: f32) {
    As[i / 4u][i % 4u] = v;
}

fn row_mean(r: u32) -> f32 {
    return Bs[r / 4u][r % 4u];
}

// The rows' means of this invocation's block rows (local rows from r, 4 of them).
fn means4(r: u32) -> vec4<f32> {
    return vec4<f32>(row_mean(r), row_mean(r + 1u), row_mean(r + 2u), row_mean(r + 3u));
}

// A training batch norm's statistics (the forward, `p.stats` != 0): per row (output channel) of the
// tile, the mean of the stored values of its columns inside the GEMM (the batch's pixels col0 ..
// col0 + BN, in order), then their M2 about it (two passes over the accumulators, so no
// cancellation). Each invocation sums its TN columns of each of its TM rows; then invocation r < BM
// sums row r's BN / TN partial sums in order through workgroup memory. The batch's pixels c
// (GEMM columns) are the same in every channel group (wid.z), so block col0 / BN is one block of
// every channel. batch_norm.wgsl merges the
// blocks (PARTIALS). Workgroup-uniform: every invocation reaches each barrier.
fn tile_stats(tid: u32, tx: u32, ty: u32, q00: Quad, q01: Quad, q10: Quad, q11: Quad) {
    let tx_n = BN / TN;
    let ty_n = BM / TM;
    // At least 1: the grid has no workgroup past the last column.
    let count = f32(min(BN, n_cols - col0));
    var mean0 = vec4<f32>(0.0);
    var mean1 = vec4<f32>(0.0);
    for (var step = 0u; step < 2u; step++) {
        var s0 = quad_stat(q00, row0 + 4u * ty, col0 + 4u * tx, mean0, step);
        if (TN == 8u) {
            s0 += quad_stat(q01, row0 + 4u * ty, col0 + 4u * (tx + tx_n), mean0, step);
        }
        for (var i = 0u; i < 4u; i++) {
            put_sum((4u * ty + i) * tx_n + tx, s0[i]);
        }
        if (TM == 8u) {
            var s1 = quad_stat(q10, row0 + 4u * (ty + ty_n), col0 + 4u * tx, mean1, step);
            if (TN == 8u) {
                s1 += quad_stat(q11, row0 + 4u * (ty + ty_n), col0 + 4u * (tx + tx_n), mean1, step);
            }
            for (var i = 0u; i < 4u; i++) {
                put_sum((4u * (ty + ty_n) + i) * tx_n + tx, s1[i]);
            }
        }
        workgroupBarrier();
        if (tid < BM) {
            var total = 0.0;
            for (var x = 0u; x < tx_n; x++) {
                let i = tid * tx_n + x;
                total += As[i / 4u][i % 4u];
            }
            if (step == 0u) {
                Bs[tid / 4u][tid % 4u] = total / count;
            } else if (row0 + tid < n_rows) {
                let at = 2u * ((col0 / BN) * p.c_out + grp * cout_g() + row0 + tid);
                stat_partial[at] = row_mean(tid);
                stat_partial[at + 1u] = total;
            }
        }
        workgroupBarrier();
        mean0 = means4(4u * ty);
        if (TM == 8u) {
            mean1 = means4(4u * (ty + ty_n));
        }
    }
}

@compute @workgroup_size(T)
fn conv2d_gemm_tiled(
    @builtin(workgroup_id) grid_id: vec3<u32>,
    @builtin(num_workgroups) grid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    var wid = grid_id;
    if (MODE == JOINT) {
        wid = enter_joint(grid_id, grid.x);
        if (wid.x == PAST) {
            return;
        }
    }
    // Invocations per row and column of 4 x 4 blocks.
    let tx_n = BN / TN;
    let ty_n = BM / TM;
    let tx = tid % tx_n;
    let ty = tid / tx_n;
    row0 = wid.y * BM;
    col0 = wid.x * BN;
    n_rows = rows();
    n_cols = cols();
    // wid.z: the channel group and (weight gradient) the split of K.
    let split = enter_group(wid.z);
    let k_span = k_range(split);
    k_stop = k_span.y;
    if (!tile_live()) {
        // No tap reaches these columns: their gradient is 0 (plus the addend, if any).
        k_stop = k_span.x;
    }
    if (mode() != WGRAD) {
        enter_column(tid);
    }

    // Blocks q<i><j> of the micro-tile: rows 4*(ty + i*ty_n) + 0..3, columns 4*(tx + j*tx_n) +
    // 0..3 (i < TM/4, j < TN/4).
    let zero = Quad(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    var q00 = zero;
    var q01 = zero;
    var q10 = zero;
    var q11 = zero;
    fetch(k_span.x, tid);
    for (var k0 = k_span.x; k0 < k_stop; k0 += BK) {
        stage(tid);
        workgroupBarrier();
        if (k0 + BK < k_stop) {
            fetch(k0 + BK, tid);
        }
        for (var kk = 0u; kk < BK; kk++) {
            let a0 = As[kk * (BM + PAD) / 4u + ty];
            let b0 = Bs[kk * (BN + PAD) / 4u + tx];
            q00 = mac(q00, a0, b0);
            if (TN == 8u) {
                let b1 = Bs[kk * (BN + PAD) / 4u + tx + tx_n];
                q01 = mac(q01, a0, b1);
                if (TM == 8u) {
                    let a1 = As[kk * (BM + PAD) / 4u + ty + ty_n];
                    q10 = mac(q10, a1, b0);
                    q11 = mac(q11, a1, b1);
                }
            } else if (TM == 8u) {
                let a1 = As[kk * (BM + PAD) / 4u + ty + ty_n];
                q10 = mac(q10, a1, b0);
            }
        }
        workgroupBarrier();
    }
    store_quad(q00, row0 + 4u * ty, col0 + 4u * tx, split);
    if (TN == 8u) {
        store_quad(q01, row0 + 4u * ty, col0 + 4u * (tx + tx_n), split);
    }
    if (TM == 8u) {
        store_quad(q10, row0 + 4u * (ty + ty_n), col0 + 4u * tx, split);
        if (TN == 8u) {
            store_quad(q11, row0 + 4u * (ty + ty_n), col0 + 4u * (tx + tx_n), split);
        }
    }
    if (mode() == FWD && p.stats != 0u) {
        tile_stats(tid, tx, ty, q00, q01, q10, q11);
    }
}
