enable wgpu_cooperative_matrix;
// conv2d_coop: the convolution's three GEMMs on cooperative matrices (tensor cores), for f16 plans
// on adapters that list a square f16 x f16 -> f32 configuration (wgpu's experimental
// EXPERIMENTAL_COOPERATIVE_MATRIX; NVIDIA's Vulkan driver offers 16x16x16, Mesa 26's lavapipe
// 8x8x8). Same op and CPU oracle as conv2d.wgsl (reference/conv2d.rs); the GEMMs are
// conv2d_tiled.wgsl's, one source with a MODE override:
//
//   MODE  GEMM                    rows    cols              reduction K
//   0     conv2d_forward          c_out   N*OH*OW pixels    c_in*kh*kw   A = weight,   B = im2col(inp)
//   1     conv2d_backward_input   c_in    N*H*W pixels      c_out*kh*kw  A = weight^T, B = gathered dout
//   2     conv2d_backward_weight  c_out   c_in*kh*kw        N*OH*OW      A = dout,     B = im2col(inp)^T
//
// A workgroup owns a 2CT x 2CT block of the GEMM as 2 x 2 coop tiles of CT x CT. Per step of CT
// along K it stages A's 2CT x CT slice and B's CT x 2CT slice in workgroup memory (f16), zero
// outside the matrices, in the padding and past the end of K, so no coop load reads out of range
// and partial tiles and K not a multiple of CT need no special case. Every product of two f16
// values is exact in f32 and the sums are f32 (the hardware's order within a tile, fixed per
// driver). The host appends CT and the coop types (`coop_prelude`): coop_mat8x8 or coop_mat16x16
// is a type, not a parameter. WG is the adapter's largest subgroup: coop ops run per subgroup, and
// a workgroup of one subgroup computes each tile once (a driver that splits it runs the same tiles
// twice, writing the same values).
//
// The weight gradient splits K (N*OH*OW) over wid.z into `splits` ranges of `split_len` (a
// multiple of CT), each writing its f32 slice of the partial buffer [splits, c_out, c_in*kh*kw]
// (binding 6; the weight gradient itself with one split); conv2d.wgsl's
// conv2d_backward_weight_reduce sums the slices in a fixed order: deterministic, no atomics.
// Forward and input-gradient outputs narrow to f16 once when stored; the weight gradient stays f32.
//
// Versions:
//   v1  forward only (conv2d_forward_coop); the gradients ran conv2d.wgsl's f16 variant.
//       Correct on Mesa 26 lavapipe (8x8x8); no GPU measurement.
//   v2  (this) the three GEMMs from one source (conv2d_gemm_coop, MODE 0/1/2), the weight
//       gradient split over K with the fixed-order reduce; the forward's arithmetic is v1's. Correct
//       on Mesa 26 lavapipe (8x8x8); no GPU measurement yet (no device lent to the session that
//       wrote it). Next: larger blocks per workgroup (several subgroups, 4x4 tiles) and double
//       buffering, once a GPU can measure them.

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
// The forward's output (MODE 0) or the input gradient (MODE 1).
@group(0) @binding(4) var<storage, read_write> out: array<act>;
@group(0) @binding(5) var<storage, read> dout: array<act>;
// The weight gradient or its split partials (MODE 2), f32.
@group(0) @binding(6) var<storage, read_write> wgrad: array<f32>;

override WG: u32 = 32u;
// Which GEMM: 0 forward, 1 input gradient, 2 weight gradient (one source, three pipelines; the
// branches on it fold away when the pipeline is built).
override MODE: u32 = 0u;

const FWD: u32 = 0u;
const DGRAD: u32 = 1u;
const WGRAD: u32 = 2u;

const BM: u32 = 2u * CT;
const BN: u32 = 2u * CT;

var<workgroup> sa: array<act, 2u * CT * CT>;  // BM x CT, row-major: A[r0 + r, k0 + kk]
var<workgroup> sb: array<act, 2u * CT * CT>;  // CT x BN, row-major: B[k0 + kk, c0 + c]
var<workgroup> sc: array<f32, 4u * CT * CT>;  // BM x BN, row-major: the result block

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

// im2col: the input value under tap t = (ky, kx) of channel ci for output pixel m, 0 in the padding.
fn im2col(ci: u32, t: u32, m: u32) -> act {
    let ohw = p.oh * p.ow;
    let nn = m / ohw;
    let r = m % ohw;
    let iy = i32((r / p.ow) * p.stride_h + (t / p.kw) * p.dil_h) - i32(p.pad_h);
    let ix = i32((r % p.ow) * p.stride_w + (t % p.kw) * p.dil_w) - i32(p.pad_w);
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return act(0.0);
    }
    return inp[((nn * p.c_in + ci) * p.h + u32(iy)) * p.w + u32(ix)];
}

// A[r, k]; the caller has checked r < rows and k < k_total.
fn load_a(r: u32, k: u32) -> act {
    let khw = p.kh * p.kw;
    if (MODE == FWD) {
        return weight[r * p.c_in * khw + k];
    }
    if (MODE == DGRAD) {
        // weight[co, ci = r, t] with k = (co, t)
        return weight[((k / khw) * p.c_in + r) * khw + k % khw];
    }
    // dout[n, co = r, pixel] with k = m = (n, pixel)
    let ohw = p.oh * p.ow;
    return dout[((k / ohw) * p.c_out + r) * ohw + k % ohw];
}

// B[k, c]; the caller has checked k < k_total and c < cols.
fn load_b(k: u32, c: u32) -> act {
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
        return act(0.0);
    }
    let oy = u32(ty) / p.stride_h;
    let ox = u32(tx) / p.stride_w;
    if (u32(ty) % p.stride_h != 0u || u32(tx) % p.stride_w != 0u || oy >= p.oh || ox >= p.ow) {
        return act(0.0);
    }
    return dout[((nn * p.c_out + co) * p.oh + oy) * p.ow + ox];
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
        wgrad[(split * p.c_out + r) * cols() + c] = v;
    }
}

// wid.x: block of BN columns; wid.y: block of BM rows; wid.z: the weight gradient's K split.
@compute @workgroup_size(WG)
fn conv2d_gemm_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
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
    var acc00 = coop_c();
    var acc01 = coop_c();
    var acc10 = coop_c();
    var acc11 = coop_c();
    for (var k0 = k_begin; k0 < k_end; k0 += CT) {
        for (var i = li; i < BM * CT; i += WG) {
            let r = r0 + i / CT;
            let k = k0 + i % CT;
            var v = act(0.0);
            if (r < n_rows && k < k_end) {
                v = load_a(r, k);
            }
            sa[i] = v;
        }
        for (var i = li; i < CT * BN; i += WG) {
            let k = k0 + i / BN;
            let c = c0 + i % BN;
            var v = act(0.0);
            if (k < k_end && c < n_cols) {
                v = load_b(k, c);
            }
            sb[i] = v;
        }
        workgroupBarrier();
        // coopLoadT: a row-major source, stride in elements between rows.
        let a0 = coopLoadT<coop_a>(&sa[0], CT);
        let a1 = coopLoadT<coop_a>(&sa[CT * CT], CT);
        let b0 = coopLoadT<coop_b>(&sb[0], BN);
        let b1 = coopLoadT<coop_b>(&sb[CT], BN);
        acc00 = coopMultiplyAdd(a0, b0, acc00);
        acc01 = coopMultiplyAdd(a0, b1, acc01);
        acc10 = coopMultiplyAdd(a1, b0, acc10);
        acc11 = coopMultiplyAdd(a1, b1, acc11);
        workgroupBarrier();
    }
    coopStoreT(acc00, &sc[0], BN);
    coopStoreT(acc01, &sc[CT], BN);
    coopStoreT(acc10, &sc[CT * BN], BN);
    coopStoreT(acc11, &sc[CT * BN + CT], BN);
    workgroupBarrier();
    for (var i = li; i < BM * BN; i += WG) {
        let r = r0 + i / BN;
        let c = c0 + i % BN;
        if (r < n_rows && c < n_cols) {
            store(r, c, sc[i], wid.z);
        }
    }
}
