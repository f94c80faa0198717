// conv2d: NCHW 2-D convolution, PyTorch semantics (weight [c_out, c_in, kh, kw], optional bias,
// stride, zero padding, dilation), forward and backward, as implicit GEMMs.
//
//   forward          out[m, co]  = bias[co] + sum_k  patch(m, k) * weight[co, k]   m = (n, oy, ox), k = (ci, ky, kx)
//   backward_input   dinp[q, ci] = sum_(co,ky,kx) dout[n, co, oy, ox] * weight[co, ci, ky, kx]
//                    where oy*stride - pad + ky*dil = iy (the transposed convolution, gathered: no atomics)
//   backward_weight  dweight[co, k] = sum_m dout[m, co] * patch(m, k)       (split over m, then reduced)
//
// Every GEMM loops over the kernel taps outside and channels inside, so that a tap's addresses
// and its padding test are computed once per tap, not once per (tap, channel); padded taps read a
// valid address masked to 0, keeping branches out of the inner loops. On lavapipe this made the
// forward 1.4x and the input gradient 4x faster (senet bench, width 0.25, batch 32).
//   backward_bias    dbias[co] = sum_m dout[m, co]                          (one workgroup per channel)
//
// Register blocking, no workgroup memory: each invocation owns a block of the output GEMM in vec4
// accumulators — GEMM_M pixels x 8 channels (forward, input gradient), WGRAD_CI input channels x
// 8 output channels at one tap (weight gradient); GEMM_M and WGRAD_CI are override constants
// (4 or 8), chosen per adapter by ops::conv2d::Tiles. On lavapipe a load whose address differs
// between invocations runs lane by lane while FMAs run 8 lanes at once, so reusing each loaded
// value in as many FMAs as the registers hold is what pays; shared-memory tiles for discrete GPUs
// are the next step (issue: speed).
//
// The weight gradient is a reduction over N*OH*OW. WGSL has no float atomics, so it is split into
// `splits` contiguous ranges of m, each written to its own slice of a partial buffer, and the slices
// are summed in a fixed order by conv2d_backward_weight_reduce: deterministic, same result every run.

struct Params {
    n: u32, c_in: u32, h: u32, w: u32,
    c_out: u32, oh: u32, ow: u32, kh: u32,
    kw: u32, stride_h: u32, stride_w: u32, pad_h: u32,
    pad_w: u32, dil_h: u32, dil_w: u32, has_bias: u32,
    splits: u32, split_len: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<storage, read> dout: array<f32>;
@group(0) @binding(6) var<storage, read_write> dinp: array<f32>;
@group(0) @binding(7) var<storage, read_write> dweight_partial: array<f32>;
@group(0) @binding(8) var<storage, read> dweight_partial_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(10) var<storage, read_write> dbias: array<f32>;

// Invocations per workgroup along x for the GEMM kernels.
override WG: u32 = 64u;
// Output pixels per forward / input-gradient invocation: 4 or 8 (its block is GEMM_M x 8 channels).
override GEMM_M: u32 = 8u;
// Input channels per weight-gradient invocation: 4 or 8 (its block is WGRAD_CI x 8 output channels).
override WGRAD_CI: u32 = 8u;
// Invocations per workgroup for the reductions (at most RED_MAX, a power of two).
override RED_WG: u32 = 256u;
const RED_MAX: u32 = 256u;

var<workgroup> red: array<f32, RED_MAX>;

// Input pixel value with zero padding; `base` is the start of the (n, ci) plane.
fn load_inp(base: u32, iy: i32, ix: i32) -> f32 {
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return inp[base + u32(iy) * p.w + u32(ix)];
}

// gid.x: block of GEMM_M output pixels m; gid.y: block of 8 output channels (two vec4 halves):
// per tap and channel, GEMM_M input and 8 weight loads feed 8*GEMM_M FMAs. (The second half of
// the pixel block sits behind `GEMM_M == 8u`, which pipeline creation folds away.)
@compute @workgroup_size(WG)
fn conv2d_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m_total = p.n * p.oh * p.ow;
    let m0 = gid.x * GEMM_M;
    let co0 = gid.y * 8u;
    if (m0 >= m_total || co0 >= p.c_out) {
        return;
    }
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    let khw = p.kh * p.kw;
    let k_total = p.c_in * khw;

    // Rows past the end are clamped onto the last row; their results are never written.
    var xbase: array<u32, 8>;
    var iy0: array<i32, 8>;
    var ix0: array<i32, 8>;
    for (var i = 0u; i < GEMM_M; i++) {
        let m = min(m0 + i, m_total - 1u);
        let nn = m / ohw;
        let r = m % ohw;
        xbase[i] = nn * p.c_in * hw;
        iy0[i] = i32((r / p.ow) * p.stride_h) - i32(p.pad_h);
        ix0[i] = i32((r % p.ow) * p.stride_w) - i32(p.pad_w);
    }
    // Channels past the end are clamped likewise.
    var wrow: array<u32, 8>;
    var b: array<f32, 8>;
    for (var j = 0u; j < 8u; j++) {
        let co = min(co0 + j, p.c_out - 1u);
        wrow[j] = co * k_total;
        if (p.has_bias != 0u) {
            b[j] = bias[co];
        }
    }
    let blo = vec4<f32>(b[0], b[1], b[2], b[3]);
    let bhi = vec4<f32>(b[4], b[5], b[6], b[7]);
    var lo0 = blo;
    var lo1 = blo;
    var lo2 = blo;
    var lo3 = blo;
    var hi0 = bhi;
    var hi1 = bhi;
    var hi2 = bhi;
    var hi3 = bhi;
    var lo4 = blo;
    var lo5 = blo;
    var lo6 = blo;
    var lo7 = blo;
    var hi4 = bhi;
    var hi5 = bhi;
    var hi6 = bhi;
    var hi7 = bhi;
    // Taps outside, input channels inside: each row's address and padding test once per tap;
    // padded taps read a valid address and are masked to 0 (no branch in the inner loop).
    for (var ky = 0u; ky < p.kh; ky++) {
        for (var kx = 0u; kx < p.kw; kx++) {
            var off: array<u32, 8>;
            var live: array<f32, 8>;
            for (var i = 0u; i < GEMM_M; i++) {
                let yy = iy0[i] + i32(ky * p.dil_h);
                let xx = ix0[i] + i32(kx * p.dil_w);
                let ok = yy >= 0 && xx >= 0 && yy < i32(p.h) && xx < i32(p.w);
                off[i] = xbase[i] + select(0u, u32(yy) * p.w + u32(xx), ok);
                live[i] = select(0.0, 1.0, ok);
            }
            let t = ky * p.kw + kx;
            for (var ci = 0u; ci < p.c_in; ci++) {
                let k = ci * khw + t;
                let wlo = vec4<f32>(weight[wrow[0] + k], weight[wrow[1] + k], weight[wrow[2] + k], weight[wrow[3] + k]);
                let whi = vec4<f32>(weight[wrow[4] + k], weight[wrow[5] + k], weight[wrow[6] + k], weight[wrow[7] + k]);
                let c = ci * hw;
                let x0 = inp[off[0] + c] * live[0];
                let x1 = inp[off[1] + c] * live[1];
                let x2 = inp[off[2] + c] * live[2];
                let x3 = inp[off[3] + c] * live[3];
                lo0 += x0 * wlo;
                hi0 += x0 * whi;
                lo1 += x1 * wlo;
                hi1 += x1 * whi;
                lo2 += x2 * wlo;
                hi2 += x2 * whi;
                lo3 += x3 * wlo;
                hi3 += x3 * whi;
                if (GEMM_M == 8u) {
                    let x4 = inp[off[4] + c] * live[4];
                    let x5 = inp[off[5] + c] * live[5];
                    let x6 = inp[off[6] + c] * live[6];
                    let x7 = inp[off[7] + c] * live[7];
                    lo4 += x4 * wlo;
                    hi4 += x4 * whi;
                    lo5 += x5 * wlo;
                    hi5 += x5 * whi;
                    lo6 += x6 * wlo;
                    hi6 += x6 * whi;
                    lo7 += x7 * wlo;
                    hi7 += x7 * whi;
                }
            }
        }
    }
    var lo = array<vec4<f32>, 8>(lo0, lo1, lo2, lo3, lo4, lo5, lo6, lo7);
    var hi = array<vec4<f32>, 8>(hi0, hi1, hi2, hi3, hi4, hi5, hi6, hi7);
    for (var i = 0u; i < GEMM_M; i++) {
        let m = m0 + i;
        if (m < m_total) {
            let nn = m / ohw;
            let r = m % ohw;
            for (var j = 0u; j < 8u; j++) {
                let co = co0 + j;
                if (co < p.c_out) {
                    let v = select(hi[i][j % 4u], lo[i][j % 4u], j < 4u);
                    out[(nn * p.c_out + co) * ohw + r] = v;
                }
            }
        }
    }
}

// gid.x: block of GEMM_M input pixels q = (n, iy, ix); gid.y: block of 8 input channels.
// Loop order: taps (ky, kx) outside, output channels inside, so each row's tap address and
// validity are worked out once per tap rather than once per (tap, channel); invalid taps read a
// valid address and are masked to 0 (no branch in the inner loop).
@compute @workgroup_size(WG)
fn conv2d_backward_input(@builtin(global_invocation_id) gid: vec3<u32>) {
    let hw = p.h * p.w;
    let q_total = p.n * hw;
    let q0 = gid.x * GEMM_M;
    let ci0 = gid.y * 8u;
    if (q0 >= q_total || ci0 >= p.c_in) {
        return;
    }
    let ohw = p.oh * p.ow;
    let khw = p.kh * p.kw;
    var dbase: array<u32, 8>;
    var iy: array<i32, 8>;
    var ix: array<i32, 8>;
    for (var i = 0u; i < GEMM_M; i++) {
        let q = min(q0 + i, q_total - 1u);
        let nn = q / hw;
        let r = q % hw;
        dbase[i] = nn * p.c_out * ohw;
        iy[i] = i32(r / p.w);
        ix[i] = i32(r % p.w);
    }
    var cols: array<u32, 8>;
    for (var j = 0u; j < 8u; j++) {
        cols[j] = min(ci0 + j, p.c_in - 1u) * khw;
    }
    let wstride = p.c_in * khw;
    var lo0 = vec4<f32>(0.0);
    var lo1 = vec4<f32>(0.0);
    var lo2 = vec4<f32>(0.0);
    var lo3 = vec4<f32>(0.0);
    var hi0 = vec4<f32>(0.0);
    var hi1 = vec4<f32>(0.0);
    var hi2 = vec4<f32>(0.0);
    var hi3 = vec4<f32>(0.0);
    var lo4 = vec4<f32>(0.0);
    var lo5 = vec4<f32>(0.0);
    var lo6 = vec4<f32>(0.0);
    var lo7 = vec4<f32>(0.0);
    var hi4 = vec4<f32>(0.0);
    var hi5 = vec4<f32>(0.0);
    var hi6 = vec4<f32>(0.0);
    var hi7 = vec4<f32>(0.0);
    for (var ky = 0u; ky < p.kh; ky++) {
        for (var kx = 0u; kx < p.kw; kx++) {
            // Where each of the GEMM_M rows reads dout for this tap, and whether it does at all.
            var off: array<u32, 8>;
            var live: array<f32, 8>;
            for (var i = 0u; i < GEMM_M; i++) {
                let ty = iy[i] + i32(p.pad_h) - i32(ky * p.dil_h);
                let tx = ix[i] + i32(p.pad_w) - i32(kx * p.dil_w);
                var ok = ty >= 0 && tx >= 0;
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
                off[i] = dbase[i] + select(0u, oy * p.ow + ox, ok);
                live[i] = select(0.0, 1.0, ok);
            }
            let t = ky * p.kw + kx;
            for (var co = 0u; co < p.c_out; co++) {
                let w0 = co * wstride + t;
                let wlo = vec4<f32>(weight[w0 + cols[0]], weight[w0 + cols[1]], weight[w0 + cols[2]], weight[w0 + cols[3]]);
                let whi = vec4<f32>(weight[w0 + cols[4]], weight[w0 + cols[5]], weight[w0 + cols[6]], weight[w0 + cols[7]]);
                let d = co * ohw;
                let g0 = dout[off[0] + d] * live[0];
                let g1 = dout[off[1] + d] * live[1];
                let g2 = dout[off[2] + d] * live[2];
                let g3 = dout[off[3] + d] * live[3];
                lo0 += g0 * wlo;
                hi0 += g0 * whi;
                lo1 += g1 * wlo;
                hi1 += g1 * whi;
                lo2 += g2 * wlo;
                hi2 += g2 * whi;
                lo3 += g3 * wlo;
                hi3 += g3 * whi;
                if (GEMM_M == 8u) {
                    let g4 = dout[off[4] + d] * live[4];
                    let g5 = dout[off[5] + d] * live[5];
                    let g6 = dout[off[6] + d] * live[6];
                    let g7 = dout[off[7] + d] * live[7];
                    lo4 += g4 * wlo;
                    hi4 += g4 * whi;
                    lo5 += g5 * wlo;
                    hi5 += g5 * whi;
                    lo6 += g6 * wlo;
                    hi6 += g6 * whi;
                    lo7 += g7 * wlo;
                    hi7 += g7 * whi;
                }
            }
        }
    }
    var lo = array<vec4<f32>, 8>(lo0, lo1, lo2, lo3, lo4, lo5, lo6, lo7);
    var hi = array<vec4<f32>, 8>(hi0, hi1, hi2, hi3, hi4, hi5, hi6, hi7);
    for (var i = 0u; i < GEMM_M; i++) {
        let q = q0 + i;
        if (q < q_total) {
            let nn = q / hw;
            let r = q % hw;
            for (var j = 0u; j < 8u; j++) {
                let ci = ci0 + j;
                if (ci < p.c_in) {
                    dinp[(nn * p.c_in + ci) * hw + r] = select(hi[i][j % 4u], lo[i][j % 4u], j < 4u);
                }
            }
        }
    }
}

// gid.x: a tap (ky, kx) and a block of WGRAD_CI input channels; gid.y: block of 8 output
// channels; gid.z: split of m. The columns share their tap, so each pixel needs one address for
// all of them (the channels are a plane apart); per pixel, WGRAD_CI input and 8 dout loads feed
// 8*WGRAD_CI FMAs.
// m is walked row by row: a row whose input row is padding is skipped whole, and the pixels of a
// row whose input column is padding are cut off its ends, so the inner loop has no tests at all.
@compute @workgroup_size(WG)
fn conv2d_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>) {
    let khw = p.kh * p.kw;
    let k_total = p.c_in * khw;
    let ci_blocks = (p.c_in + WGRAD_CI - 1u) / WGRAD_CI;
    let tap = gid.x / ci_blocks;
    let ci0 = (gid.x % ci_blocks) * WGRAD_CI;
    let co0 = gid.y * 8u;
    let split = gid.z;
    if (tap >= khw || co0 >= p.c_out) {
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
    // Channels past the end read the last one; their sums are never written.
    var cb: array<u32, 8>;
    for (var j = 0u; j < 8u; j++) {
        cb[j] = min(ci0 + j, p.c_in - 1u) * hw;
    }
    var drow: array<u32, 8>;
    for (var i = 0u; i < 8u; i++) {
        drow[i] = min(co0 + i, p.c_out - 1u) * ohw;
    }
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    var bcc0 = vec4<f32>(0.0);
    var bcc1 = vec4<f32>(0.0);
    var bcc2 = vec4<f32>(0.0);
    var bcc3 = vec4<f32>(0.0);
    var bcc4 = vec4<f32>(0.0);
    var bcc5 = vec4<f32>(0.0);
    var bcc6 = vec4<f32>(0.0);
    var bcc7 = vec4<f32>(0.0);
    var m = m_begin;
    while (m < m_end) {
        let nn = m / ohw;
        let r = m % ohw;
        let py = r / p.ow;
        let row_px = r % p.ow;
        let row_end = min(p.ow, row_px + (m_end - m));
        let yy = i32(py * p.stride_h) + dy;
        let a = max(row_px, px_lo);
        let b = min(row_end, px_hi);
        if (yy >= 0 && yy < i32(p.h) && a < b) {
            var at = nn * p.c_in * hw + u32(yy) * p.w + u32(i32(a) * sw + dx);
            var db = nn * p.c_out * ohw + py * p.ow + a;
            for (var px = a; px < b; px++) {
                let xv = vec4<f32>(inp[at + cb[0]], inp[at + cb[1]], inp[at + cb[2]], inp[at + cb[3]]);
                let g0 = dout[db + drow[0]];
                let g1 = dout[db + drow[1]];
                let g2 = dout[db + drow[2]];
                let g3 = dout[db + drow[3]];
                let g4 = dout[db + drow[4]];
                let g5 = dout[db + drow[5]];
                let g6 = dout[db + drow[6]];
                let g7 = dout[db + drow[7]];
                acc0 += g0 * xv;
                acc1 += g1 * xv;
                acc2 += g2 * xv;
                acc3 += g3 * xv;
                acc4 += g4 * xv;
                acc5 += g5 * xv;
                acc6 += g6 * xv;
                acc7 += g7 * xv;
                if (WGRAD_CI == 8u) {
                    let xw = vec4<f32>(inp[at + cb[4]], inp[at + cb[5]], inp[at + cb[6]], inp[at + cb[7]]);
                    bcc0 += g0 * xw;
                    bcc1 += g1 * xw;
                    bcc2 += g2 * xw;
                    bcc3 += g3 * xw;
                    bcc4 += g4 * xw;
                    bcc5 += g5 * xw;
                    bcc6 += g6 * xw;
                    bcc7 += g7 * xw;
                }
                at += p.stride_w;
                db++;
            }
        }
        m += row_end - row_px;
    }
    var acc = array<vec4<f32>, 16>(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
                                   bcc0, bcc1, bcc2, bcc3, bcc4, bcc5, bcc6, bcc7);
    let slice = split * p.c_out * k_total;
    for (var i = 0u; i < 8u; i++) {
        let co = co0 + i;
        if (co < p.c_out) {
            for (var j = 0u; j < WGRAD_CI; j++) {
                let ci = ci0 + j;
                if (ci < p.c_in) {
                    dweight_partial[slice + co * k_total + ci * khw + tap] = acc[i + 8u * (j / 4u)][j % 4u];
                }
            }
        }
    }
}

// Sum the split partials of the weight gradient in a fixed order. One invocation per weight.
@compute @workgroup_size(WG)
fn conv2d_backward_weight_reduce(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    let total = p.c_out * p.c_in * p.kh * p.kw;
    if (e >= total) {
        return;
    }
    var s = 0.0;
    for (var k = 0u; k < p.splits; k++) {
        s += dweight_partial_in[k * total + e];
    }
    dweight[e] = s;
}

// One workgroup per output channel: dbias[co] = sum over n, oy, ox of dout.
@compute @workgroup_size(RED_WG)
fn conv2d_backward_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let co = wid.x;
    let ohw = p.oh * p.ow;
    let total = p.n * ohw;
    var s = 0.0;
    for (var e = t; e < total; e += RED_WG) {
        let nn = e / ohw;
        s += dout[(nn * p.c_out + co) * ohw + e % ohw];
    }
    red[t] = s;
    workgroupBarrier();
    for (var stride = RED_WG / 2u; stride > 0u; stride /= 2u) {
        if (t < stride) {
            red[t] += red[t + stride];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        dbias[co] = red[0];
    }
}
