// conv2d_tiled: the three convolution GEMMs of conv2d.wgsl with workgroup-memory tiles, the
// discrete-GPU kernel family (same op, same CPU oracle: reference/conv2d.rs).
//
//   GEMM                 rows          cols              reduction K
//   conv2d_forward       c_out         N*OH*OW pixels    c_in*kh*kw   A = weight, B = im2col(inp)
//   conv2d_backward_input c_in         N*H*W pixels      c_out*kh*kw  A = weight^T, B = gathered dout
//   conv2d_backward_weight c_out       c_in*kh*kw        N*OH*OW      A = dout, B = im2col(inp)^T
//
// A workgroup of 256 invocations owns a BM x BN tile of the output; per step of BK along K it
// stages a BK x BM slice of A and a BK x BN slice of B in workgroup memory (loads arranged so that
// neighbouring invocations read neighbouring addresses where the layout allows: along K for
// weights and for the weight gradient's operands, along pixels for activations), then each
// invocation accumulates a TM x TN micro-tile in registers. The micro-tile is strided — rows
// ty + i*BM/TM, columns tx + j*BN/TN — so that a warp's workgroup-memory reads are consecutive
// (B) or broadcast (A), and its stores to pixel-contiguous outputs are coalesced. Tile shapes are
// override constants (ops::conv2d::SmemTiles lists those built; (BM/TM)*(BN/TN) must be 256).
//
// The weight gradient splits K (N*OH*OW) over gid.z into `splits` ranges of `split_len`, each
// writing its slice of the partial buffer; conv2d.wgsl's conv2d_backward_weight_reduce sums the
// slices in a fixed order, so results are deterministic as with the register kernels.
//
// Activations, their gradients and the weights are `act` (f32, or f16 in an f16 plan); the tiles in
// workgroup memory, the accumulators and the weight gradient (binding 6) are f32 in both.
//
// Versions: v1 (this), single-buffered, loads decode their (channel, tap) and (image, pixel) with
// integer divisions by uniforms. Measured on lavapipe (senet bench --tune full, width 0.25, batch
// 32, SENET_TUNE_VERBOSE=1, machine shared with a training run; ratios from one run): the best
// tile shape is 8x to 25x slower than the register blocks of conv2d.wgsl (features.4 forward
// 48 ms register vs 387 ms tiled 32x128; input gradient 42 vs 706 ms; first layer's weight
// gradient 59 vs 736 ms) — no faster shared memory there, every access lane by lane — so quick
// tuning does not time them on CPU adapters. On a discrete GPU: not yet measured (no device lent
// in the session that wrote it); the tuner's choice there is the measurement. Next versions:
// double buffering of the next K slice, vec4 loads where aligned, divisions by pipeline constants.
// v2 (this): `act` storage for --precision f16; the weight gradient writes binding 6 (f32).

struct Params {
    n: u32, c_in: u32, h: u32, w: u32,
    c_out: u32, oh: u32, ow: u32, kh: u32,
    kw: u32, stride_h: u32, stride_w: u32, pad_h: u32,
    pad_w: u32, dil_h: u32, dil_w: u32, has_bias: u32,
    splits: u32, split_len: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read> weight: array<act>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<act>;
@group(0) @binding(5) var<storage, read> dout: array<act>;
// The weight gradient (MODE 2) writes f32 whatever `act` is: its partials are summed later.
@group(0) @binding(6) var<storage, read_write> wgrad: array<f32>;

override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 16u;
override TM: u32 = 4u;
override TN: u32 = 4u;
// Which GEMM: 0 forward, 1 input gradient, 2 weight gradient (one source, three pipelines; the
// branches on it fold away when the pipeline is built).
override MODE: u32 = 0u;

const T: u32 = 256u;
const FWD: u32 = 0u;
const DGRAD: u32 = 1u;
const WGRAD: u32 = 2u;

// BK*BM and BK*BN are at most 2048 for every tile shape built (16 KiB of workgroup memory).
var<workgroup> As: array<f32, 2048>;
var<workgroup> Bs: array<f32, 2048>;

fn rows() -> u32 {
    if (MODE == DGRAD) {
        return p.c_in;
    }
    return p.c_out;
}

fn cols() -> u32 {
    if (MODE == FWD) {
        return p.n * p.oh * p.ow;
    }
    if (MODE == DGRAD) {
        return p.n * p.h * p.w;
    }
    return p.c_in * p.kh * p.kw;
}

fn k_total() -> u32 {
    if (MODE == FWD) {
        return p.c_in * p.kh * p.kw;
    }
    if (MODE == DGRAD) {
        return p.c_out * p.kh * p.kw;
    }
    return p.n * p.oh * p.ow;
}

// im2col: the input value under tap (ky, kx) of channel ci for output pixel m, 0 in the padding.
fn im2col(ci: u32, t: u32, m: u32) -> f32 {
    let ohw = p.oh * p.ow;
    let nn = m / ohw;
    let r = m % ohw;
    let iy = i32((r / p.ow) * p.stride_h + (t / p.kw) * p.dil_h) - i32(p.pad_h);
    let ix = i32((r % p.ow) * p.stride_w + (t % p.kw) * p.dil_w) - i32(p.pad_w);
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return f32(inp[((nn * p.c_in + ci) * p.h + u32(iy)) * p.w + u32(ix)]);
}

// A[r, k]; the caller has checked r < rows and k < k_total.
fn load_a(r: u32, k: u32) -> f32 {
    let khw = p.kh * p.kw;
    if (MODE == FWD) {
        return f32(weight[r * p.c_in * khw + k]);
    }
    if (MODE == DGRAD) {
        // weight[co, ci = r, t] with k = (co, t)
        return f32(weight[((k / khw) * p.c_in + r) * khw + k % khw]);
    }
    // dout[n, co = r, pixel] with k = m = (n, pixel)
    let ohw = p.oh * p.ow;
    return f32(dout[((k / ohw) * p.c_out + r) * ohw + k % ohw]);
}

// B[k, c]; the caller has checked k < k_total and c < cols.
fn load_b(k: u32, c: u32) -> f32 {
    let khw = p.kh * p.kw;
    if (MODE == FWD) {
        return im2col(k / khw, k % khw, c);
    }
    if (MODE == WGRAD) {
        return im2col(c / khw, c % khw, k);
    }
    // Input gradient: dout[n, co, oy, ox] for input pixel c = (n, iy, ix) and k = (co, ky, kx),
    // where oy*stride + ky*dil = iy + pad (the transposed convolution, gathered).
    let hw = p.h * p.w;
    let nn = c / hw;
    let q = c % hw;
    let co = k / khw;
    let t = k % khw;
    let ty = i32(q / p.w + p.pad_h) - i32((t / p.kw) * p.dil_h);
    let tx = i32(q % p.w + p.pad_w) - i32((t % p.kw) * p.dil_w);
    if (ty < 0 || tx < 0) {
        return 0.0;
    }
    let oy = u32(ty) / p.stride_h;
    let ox = u32(tx) / p.stride_w;
    if (u32(ty) % p.stride_h != 0u || u32(tx) % p.stride_w != 0u || oy >= p.oh || ox >= p.ow) {
        return 0.0;
    }
    return f32(dout[((nn * p.c_out + co) * p.oh + oy) * p.ow + ox]);
}

fn store(r: u32, c: u32, v: f32, split: u32) {
    if (MODE == FWD) {
        let ohw = p.oh * p.ow;
        var b = 0.0;
        if (p.has_bias != 0u) {
            b = bias[r];
        }
        out[((c / ohw) * p.c_out + r) * ohw + c % ohw] = act(v + b);
    } else if (MODE == DGRAD) {
        let hw = p.h * p.w;
        out[((c / hw) * p.c_in + r) * hw + c % hw] = act(v);
    } else {
        // Slice `split` of the partial buffer [splits, c_out, c_in*kh*kw] (the weight gradient
        // itself when there is one split).
        wgrad[(split * p.c_out + r) * cols() + c] = v;
    }
}

@compute @workgroup_size(T)
fn conv2d_gemm_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let tx_n = BN / TN;
    let ty_n = BM / TM;
    let tx = tid % tx_n;
    let ty = tid / tx_n;
    let r0 = wid.y * BM;
    let c0 = wid.x * BN;
    let n_rows = rows();
    let n_cols = cols();
    var k_begin = 0u;
    var k_end = k_total();
    if (MODE == WGRAD) {
        k_begin = wid.z * p.split_len;
        k_end = min(k_end, k_begin + p.split_len);
    }

    var acc: array<f32, 64>;
    for (var i = 0u; i < TM * TN; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        // Stage A: BK x BM, K fastest across invocations.
        for (var e = 0u; e < BK * BM / T; e++) {
            let idx = e * T + tid;
            let kk = idx % BK;
            let r = idx / BK;
            var v = 0.0;
            if (r0 + r < n_rows && k0 + kk < k_end) {
                v = load_a(r0 + r, k0 + kk);
            }
            As[kk * BM + r] = v;
        }
        // Stage B: BK x BN, pixels fastest (forward, input gradient) or K fastest (weight gradient).
        for (var e = 0u; e < BK * BN / T; e++) {
            let idx = e * T + tid;
            var kk = idx / BN;
            var c = idx % BN;
            if (MODE == WGRAD) {
                kk = idx % BK;
                c = idx / BK;
            }
            var v = 0.0;
            if (c0 + c < n_cols && k0 + kk < k_end) {
                v = load_b(k0 + kk, c0 + c);
            }
            Bs[kk * BN + c] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 8>;
            var b: array<f32, 8>;
            for (var i = 0u; i < TM; i++) {
                a[i] = As[kk * BM + ty + i * ty_n];
            }
            for (var j = 0u; j < TN; j++) {
                b[j] = Bs[kk * BN + tx + j * tx_n];
            }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    acc[i * TN + j] += a[i] * b[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let r = r0 + ty + i * ty_n;
        for (var j = 0u; j < TN; j++) {
            let c = c0 + tx + j * tx_n;
            if (r < n_rows && c < n_cols) {
                store(r, c, acc[i * TN + j], wid.z);
            }
        }
    }
}
