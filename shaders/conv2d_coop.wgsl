enable wgpu_cooperative_matrix;
// conv2d_coop: the convolution's forward GEMM on cooperative matrices (tensor cores), for f16
// plans on adapters that list a square f16 x f16 -> f32 configuration (wgpu's experimental
// EXPERIMENTAL_COOPERATIVE_MATRIX; NVIDIA's Vulkan driver offers 16x16x16, Mesa 26's lavapipe
// 8x8x8). Same op and CPU oracle as conv2d.wgsl (reference/conv2d.rs).
//
//   out[n, co, oy, ox] = bias[co] + sum_k weight[co, k] * im2col(k, m),  k = (ci, ky, kx), m = (n, oy, ox)
//
// A workgroup owns a 2CT x 2CT block of the GEMM (rows: output channels, columns: output pixels)
// as 2 x 2 coop tiles of CT x CT. Per step of CT along K it stages the weights' 2CT x CT slice and
// the gathered (im2col) CT x 2CT slice in workgroup memory, zero outside the matrices and in the
// padding, so no coop load reads out of range and partial tiles need no special case; every
// product is exact in f32 and the sums are f32 (the hardware's order within a tile). The host
// appends CT and the coop types (`coop_prelude`): coop_mat8x8 or coop_mat16x16 is a type, not a
// parameter. WG is the adapter's largest subgroup: coop ops run per subgroup, and a workgroup of
// one subgroup computes each tile once (a driver that splits it runs the same tiles twice,
// writing the same values).
//
// Versions: v1 (this), forward only; the input and weight gradients still run conv2d.wgsl's f16
// variant. Measured: correct on Mesa 26 lavapipe (8x8x8); no GPU measurement yet.

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

override WG: u32 = 32u;

const BM: u32 = 2u * CT;
const BN: u32 = 2u * CT;

var<workgroup> sa: array<act, 2u * CT * CT>;  // BM x CT, row-major: weight[co0 + r, k0 + kk]
var<workgroup> sb: array<act, 2u * CT * CT>;  // CT x BN, row-major: im2col[k0 + kk, m0 + c]
var<workgroup> sc: array<f32, 4u * CT * CT>;  // BM x BN, row-major: the result block

// im2col(k, m): the input value tap k of output pixel m reads (0 in the padding).
fn gather(k: u32, m: u32) -> act {
    let khw = p.kh * p.kw;
    let ci = k / khw;
    let t = k % khw;
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

// wid.x: block of BN output pixels; wid.y: block of BM output channels.
@compute @workgroup_size(WG)
fn conv2d_forward_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let co0 = wid.y * BM;
    let m0 = wid.x * BN;
    let k_total = p.c_in * p.kh * p.kw;
    let m_total = p.n * p.oh * p.ow;
    var acc00 = coop_c();
    var acc01 = coop_c();
    var acc10 = coop_c();
    var acc11 = coop_c();
    for (var k0 = 0u; k0 < k_total; k0 += CT) {
        for (var i = li; i < BM * CT; i += WG) {
            let co = co0 + i / CT;
            let k = k0 + i % CT;
            var v = act(0.0);
            if (co < p.c_out && k < k_total) {
                v = weight[co * k_total + k];
            }
            sa[i] = v;
        }
        for (var i = li; i < CT * BN; i += WG) {
            let k = k0 + i / BN;
            let m = m0 + i % BN;
            var v = act(0.0);
            if (k < k_total && m < m_total) {
                v = gather(k, m);
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
    let ohw = p.oh * p.ow;
    for (var i = li; i < BM * BN; i += WG) {
        let co = co0 + i / BN;
        let m = m0 + i % BN;
        if (co < p.c_out && m < m_total) {
            var b = 0.0;
            if (p.has_bias != 0u) {
                b = bias[co];
            }
            out[((m / ohw) * p.c_out + co) * ohw + m % ohw] = act(sc[i] + b);
        }
    }
}
