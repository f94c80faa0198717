// conv2d_params: the parameter block every conv2d kernel reads at binding 0, written once and
// appended by the host to conv2d.wgsl (Register), conv2d_tiled.wgsl (Workgroup) and
// conv2d_coop.wgsl (Coop); mirrors `ops::conv2d::Params`. No entry point of its own; not compiled
// alone.
//
// `relu` (the forward only): the output passes a ReLU before it is stored — an evaluation pass's
// convolution with a batch norm and its ReLU folded in (ops/bn_fold).
// `accumulate` (the input gradient only): the stored gradient is this convolution's own plus an
// addend of the same shape, the other reader's gradient of a forked activation (the plan's fork
// sum, otherwise an add_forward after it), read through each family's `addend_at`: binding 1
// (`inp`, which their input gradient does not otherwise read) in conv2d_tiled.wgsl and
// conv2d_coop.wgsl, binding 11 in conv2d_tiled.wgsl's joint backward and binding 6 in conv2d.wgsl,
// whose joint backwards read the weight gradient's input at binding 1.
// `stats` (the forward of conv2d.wgsl and conv2d_tiled.wgsl; 0 = off): conv2d.wgsl's invocations
// per statistics block (1, or with LANES the subgroup's lanes), conv2d_tiled.wgsl's 1 (a block is
// a workgroup's columns); each block's invocations also write, per output channel, the mean and M2
// of the values they stored (`stat_partial`), the statistics of a training batch norm that alone
// reads the output (batch_norm.wgsl's PARTIALS).
// `affine_in` (conv2d_tiled.wgsl's forward and weight gradient; 0 = off): `inp` is the input of
// the training batch norm before the convolution, which the loads apply with its ReLU
// (conv2d_tiled.wgsl's bindings 8-10).
// `phase_row` (below): conv2d.wgsl's and conv2d_tiled.wgsl's strided input gradients.
// `joint_*` (conv2d.wgsl's conv2d_backward, conv2d_tiled.wgsl's MODE 3): how many workgroups
// each gradient has and how each numbers them (`joint_slot`, below).
// MODE, FWD, DGRAD, `mode()` (the GEMM an invocation runs) and `addend_at` are each family's own.

struct Params {
    n: u32, c_in: u32, h: u32, w: u32,
    c_out: u32, oh: u32, ow: u32, kh: u32,
    kw: u32, stride_h: u32, stride_w: u32, pad_h: u32,
    pad_w: u32, dil_h: u32, dil_w: u32, has_bias: u32,
    splits: u32, split_len: u32, groups: u32, relu: u32,
    accumulate: u32, stats: u32, affine_in: u32, joint_dx: u32,
    joint_dn: u32, joint_wx: u32, joint_wy: u32, joint_wn: u32,
    joint_shift: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// The value stored at element i of the forward's output (v: the finished sum, bias included) or of
// the input gradient (v: the sum), narrowed to `act`: the forward's fused ReLU, if any; the input
// gradient's addend, if any. The own gradient is rounded to `act` before the addend is added in
// f32 and the sum rounded again — exactly what storing it apart and running add_forward (act(f32(a)
// + f32(b))) gives, so the fused sum is bit for bit the unfused one in f16 as in f32. Measured:
// written as f32(act(v)), Mesa 26's lavapipe dropped the inner rounding (34 of 105 values of an
// f16 test case one f16 ulp off the unfused sum; Mesa 22's kept it): act_rounded does it instead.
fn epilogue(v: f32, i: u32) -> act {
    if (mode() == FWD && p.relu != 0u) {
        return act(max(v, 0.0));
    }
    if (mode() == DGRAD && p.accumulate != 0u) {
        // act_rounded (the shader prelude): f32(act(v)), with a rounding no compiler folds away.
        return act(act_rounded(v) + addend_at(i));
    }
    return act(v);
}

// A strided input gradient numbers its rows (conv2d.wgsl) or columns (conv2d_tiled.wgsl), the
// input pixels of the whole batch, by stride phase: every pixel (n, py + sy*a, px + sx*b) of phase
// (py, px), images in order, then the next phase (py, then px). A tap feeds either every pixel of a
// phase or none (the output pixel iy + pad - ky is a multiple of sy for one py in sy), so nearly
// every register block (and its subgroup) or workgroup tile lies inside one phase and skips the
// taps that feed none of it; numbered in plain order, every block holds every phase and runs every
// tap (a stride-2 1x1 layer: 3 in 4 pixels get no gradient). Row or column m -> (image, iy, ix).
fn phase_row(m: u32) -> vec3<u32> {
    var rr = m;
    for (var py = 0u; py < p.stride_h; py++) {
        let ny = select(0u, (p.h - py + p.stride_h - 1u) / p.stride_h, py < p.h);
        for (var px = 0u; px < p.stride_w; px++) {
            let nx = select(0u, (p.w - px + p.stride_w - 1u) / p.stride_w, px < p.w);
            let size = ny * nx;
            if (rr < p.n * size) {
                let t = rr % size;
                return vec3<u32>(rr / size, py + p.stride_h * (t / nx), px + p.stride_w * (t % nx));
            }
            rr -= p.n * size;
        }
    }
    return vec3<u32>(0u, 0u, 0u);
}

// A joint backward's workgroup l (numbered along x, then y): (0, i) the input gradient's
// workgroup i (of p.joint_dn), (1, i) the weight gradient's workgroup i (of p.joint_wn), (2, 0) past
// both (the grid's last row may be part-filled); each i in the order of that pass's own grid.
// The two are interleaved in proportion: the grid is cut into s_n = 2^p.joint_shift slices, slice
// s holding the input gradient's workgroups [s * dn / s_n, (s + 1) * dn / s_n) and then the weight
// gradient's [s * wn / s_n, (s + 1) * wn / s_n). Run one after the other, the input gradient's all
// first, lavapipe (which gives each of its threads one contiguous run of a dispatch's workgroups)
// left one thread with most of the work: a layer whose input gradient alone cost 98 ms took 197
// ms in the joint grid, 100 ms with its workgroups spread out (benches/conv_backward.rs). The host
// keeps s_n * total below 2^32, so every product here fits a u32, and s_n at most half the total,
// so that a slice's start is less than two workgroups from its proportional place. One division
// (lavapipe runs each a lane at a time).
fn joint_slot(l: u32) -> vec2<u32> {
    let dn = p.joint_dn;
    let wn = p.joint_wn;
    let total = dn + wn;
    if (l >= total) {
        return vec2<u32>(2u, 0u);
    }
    let k = p.joint_shift;
    // Slice s starts at ((s * dn) >> k) + ((s * wn) >> k), in (s * total / s_n - 2, s * total / s_n];
    // with s_n at most total / 2 that is past (s - 1) * total / s_n, so l * s_n / total is l's
    // slice or the one before it.
    var s = (l << k) / total;
    if (s + 1u < (1u << k) && (((s + 1u) * dn) >> k) + (((s + 1u) * wn) >> k) <= l) {
        s += 1u;
    }
    let d0 = (s * dn) >> k;
    let d_here = (((s + 1u) * dn) >> k) - d0;
    let at = l - d0 - ((s * wn) >> k);
    if (at < d_here) {
        return vec2<u32>(0u, d0 + at);
    }
    return vec2<u32>(1u, ((s * wn) >> k) + at - d_here);
}
