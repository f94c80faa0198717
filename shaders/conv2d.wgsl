// conv2d: NCHW 2-D convolution, PyTorch semantics (weight [c_out, c_in, kh, kw], optional bias,
// stride, zero padding, dilation), forward and backward, as implicit GEMMs.
//
//   forward          out[m, co]  = bias[co] + sum_k  patch(m, k) * weight[co, k]   m = (n, oy, ox), k = (ci, ky, kx)
//   backward_input   dinp[q, ci] = sum_(co,ky,kx) dout[n, co, oy, ox] * weight[co, ci, ky, kx]
//                    where oy*stride - pad + ky*dil = iy (the transposed convolution, gathered: no atomics)
//   backward_weight  dweight[co, k] = sum_m dout[m, co] * patch(m, k)       (split over m, then reduced)
//   backward_bias    dbias[co] = sum_m dout[m, co]                          (one workgroup per channel)
//
// Version 1 (this file): register blocking, each invocation owns a 4x4 block of the output GEMM
// (4 rows x 4 columns in vec4 accumulators), no workgroup memory. On lavapipe every storage access
// is done lane by lane, so reusing each loaded value 4 times in registers is what pays; shared-memory
// tiles for discrete GPUs are the next version (issue: speed).
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

// gid.x: block of 4 output pixels m; gid.y: block of 4 output channels.
@compute @workgroup_size(WG)
fn conv2d_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let m_total = p.n * p.oh * p.ow;
    let m0 = gid.x * 4u;
    let co0 = gid.y * 4u;
    if (m0 >= m_total || co0 >= p.c_out) {
        return;
    }
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    let k_total = p.c_in * p.kh * p.kw;

    // Rows past the end are clamped onto the last row; their results are never written.
    var xbase: array<u32, 4>;
    var iy0: array<i32, 4>;
    var ix0: array<i32, 4>;
    for (var i = 0u; i < 4u; i++) {
        let m = min(m0 + i, m_total - 1u);
        let nn = m / ohw;
        let r = m % ohw;
        xbase[i] = nn * p.c_in * hw;
        iy0[i] = i32((r / p.ow) * p.stride_h) - i32(p.pad_h);
        ix0[i] = i32((r % p.ow) * p.stride_w) - i32(p.pad_w);
    }
    var wrow: array<u32, 4>;
    var b = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        let co = min(co0 + j, p.c_out - 1u);
        wrow[j] = co * k_total;
        if (p.has_bias != 0u) {
            b[j] = bias[co];
        }
    }
    var acc0 = b;
    var acc1 = b;
    var acc2 = b;
    var acc3 = b;
    var k = 0u;
    for (var ci = 0u; ci < p.c_in; ci++) {
        let cbase = ci * hw;
        for (var ky = 0u; ky < p.kh; ky++) {
            let dy = i32(ky * p.dil_h);
            for (var kx = 0u; kx < p.kw; kx++) {
                let dx = i32(kx * p.dil_w);
                let wv = vec4<f32>(weight[wrow[0] + k], weight[wrow[1] + k], weight[wrow[2] + k], weight[wrow[3] + k]);
                acc0 += load_inp(xbase[0] + cbase, iy0[0] + dy, ix0[0] + dx) * wv;
                acc1 += load_inp(xbase[1] + cbase, iy0[1] + dy, ix0[1] + dx) * wv;
                acc2 += load_inp(xbase[2] + cbase, iy0[2] + dy, ix0[2] + dx) * wv;
                acc3 += load_inp(xbase[3] + cbase, iy0[3] + dy, ix0[3] + dx) * wv;
                k++;
            }
        }
    }
    var acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + i;
        if (m < m_total) {
            let nn = m / ohw;
            let r = m % ohw;
            for (var j = 0u; j < 4u; j++) {
                let co = co0 + j;
                if (co < p.c_out) {
                    out[(nn * p.c_out + co) * ohw + r] = acc[i][j];
                }
            }
        }
    }
}

// dout value at the output pixel whose window tap (ky, kx) lands on input (iy, ix), or 0.
fn tap_dout(base: u32, iy: i32, ix: i32, ky: u32, kx: u32) -> f32 {
    let ty = iy + i32(p.pad_h) - i32(ky * p.dil_h);
    let tx = ix + i32(p.pad_w) - i32(kx * p.dil_w);
    if (ty < 0 || tx < 0) {
        return 0.0;
    }
    var oy = u32(ty);
    var ox = u32(tx);
    // Integer division is a software routine on CPU drivers: only strided convolutions pay it.
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
    return dout[base + oy * p.ow + ox];
}

// gid.x: block of 4 input pixels q = (n, iy, ix); gid.y: block of 4 input channels.
@compute @workgroup_size(WG)
fn conv2d_backward_input(@builtin(global_invocation_id) gid: vec3<u32>) {
    let hw = p.h * p.w;
    let q_total = p.n * hw;
    let q0 = gid.x * 4u;
    let ci0 = gid.y * 4u;
    if (q0 >= q_total || ci0 >= p.c_in) {
        return;
    }
    let ohw = p.oh * p.ow;
    let khw = p.kh * p.kw;
    var dbase: array<u32, 4>;
    var iy: array<i32, 4>;
    var ix: array<i32, 4>;
    for (var i = 0u; i < 4u; i++) {
        let q = min(q0 + i, q_total - 1u);
        let nn = q / hw;
        let r = q % hw;
        dbase[i] = nn * p.c_out * ohw;
        iy[i] = i32(r / p.w);
        ix[i] = i32(r % p.w);
    }
    var cols: array<u32, 4>;
    for (var j = 0u; j < 4u; j++) {
        cols[j] = min(ci0 + j, p.c_in - 1u) * khw;
    }
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var co = 0u; co < p.c_out; co++) {
        let wco = co * p.c_in * khw;
        let dco = co * ohw;
        for (var ky = 0u; ky < p.kh; ky++) {
            for (var kx = 0u; kx < p.kw; kx++) {
                let t = wco + ky * p.kw + kx;
                let wv = vec4<f32>(weight[t + cols[0]], weight[t + cols[1]], weight[t + cols[2]], weight[t + cols[3]]);
                acc0 += tap_dout(dbase[0] + dco, iy[0], ix[0], ky, kx) * wv;
                acc1 += tap_dout(dbase[1] + dco, iy[1], ix[1], ky, kx) * wv;
                acc2 += tap_dout(dbase[2] + dco, iy[2], ix[2], ky, kx) * wv;
                acc3 += tap_dout(dbase[3] + dco, iy[3], ix[3], ky, kx) * wv;
            }
        }
    }
    var acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let q = q0 + i;
        if (q < q_total) {
            let nn = q / hw;
            let r = q % hw;
            for (var j = 0u; j < 4u; j++) {
                let ci = ci0 + j;
                if (ci < p.c_in) {
                    dinp[(nn * p.c_in + ci) * hw + r] = acc[i][j];
                }
            }
        }
    }
}

// gid.x: block of 4 columns k = (ci, ky, kx); gid.y: block of 4 output channels; gid.z: split of m.
@compute @workgroup_size(WG)
fn conv2d_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>) {
    let khw = p.kh * p.kw;
    let k_total = p.c_in * khw;
    let k0 = gid.x * 4u;
    let co0 = gid.y * 4u;
    let split = gid.z;
    if (k0 >= k_total || co0 >= p.c_out) {
        return;
    }
    let ohw = p.oh * p.ow;
    let hw = p.h * p.w;
    let m_total = p.n * ohw;
    let m_begin = split * p.split_len;
    let m_end = min(m_total, m_begin + p.split_len);

    var cbase: array<u32, 4>;
    var ky: array<i32, 4>;
    var kx: array<i32, 4>;
    for (var j = 0u; j < 4u; j++) {
        let k = min(k0 + j, k_total - 1u);
        let ci = k / khw;
        let r = k % khw;
        cbase[j] = ci * hw;
        ky[j] = i32((r / p.kw) * p.dil_h);
        kx[j] = i32((r % p.kw) * p.dil_w);
    }
    var drow: array<u32, 4>;
    for (var i = 0u; i < 4u; i++) {
        drow[i] = min(co0 + i, p.c_out - 1u) * ohw;
    }
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    // Walk m = (nn, py, px) with counters instead of dividing m at every step.
    var nn = m_begin / ohw;
    var r = m_begin % ohw;
    var py = r / p.ow;
    var px = r % p.ow;
    for (var m = m_begin; m < m_end; m++) {
        let oy = i32(py * p.stride_h) - i32(p.pad_h);
        let ox = i32(px * p.stride_w) - i32(p.pad_w);
        let xb = nn * p.c_in * hw;
        let db = nn * p.c_out * ohw + r;
        let xv = vec4<f32>(
            load_inp(xb + cbase[0], oy + ky[0], ox + kx[0]),
            load_inp(xb + cbase[1], oy + ky[1], ox + kx[1]),
            load_inp(xb + cbase[2], oy + ky[2], ox + kx[2]),
            load_inp(xb + cbase[3], oy + ky[3], ox + kx[3]));
        acc0 += dout[db + drow[0]] * xv;
        acc1 += dout[db + drow[1]] * xv;
        acc2 += dout[db + drow[2]] * xv;
        acc3 += dout[db + drow[3]] * xv;
        px++;
        r++;
        if (px == p.ow) {
            px = 0u;
            py++;
            if (py == p.oh) {
                py = 0u;
                r = 0u;
                nn++;
            }
        }
    }
    var acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    let slice = split * p.c_out * k_total;
    for (var i = 0u; i < 4u; i++) {
        let co = co0 + i;
        if (co < p.c_out) {
            for (var j = 0u; j < 4u; j++) {
                let k = k0 + j;
                if (k < k_total) {
                    dweight_partial[slice + co * k_total + k] = acc[i][j];
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
