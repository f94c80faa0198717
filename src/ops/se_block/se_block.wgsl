// se_block: Squeeze-and-Excitation (Hu et al. 2017), NCHW, C channels, reduction r, Cr = C / r.
//
//   z[c]  = mean over H*W of x[c]                       squeeze (or the max: the ablation)
//   h[j]  = relu(b1[j] + sum_c w1[j, c] z[c])           fc1, weight [Cr, C, 1, 1]
//   s[c]  = sigmoid(b2[c] + sum_j w2[c, j] h[j])        fc2, weight [C, Cr, 1, 1] (or tanh, relu)
//   y     = x * s[c]                                    excite (scale)
//
// Forward is ONE dispatch: a workgroup per sample does the squeeze (a subgroup per channel where
// the adapter has subgroups: see the reduce preludes), both FCs in workgroup memory and the scaling. It keeps z, h and s per sample in `saved` ([n][C | Cr | C]) for the backward.
// The split form (v8, below) runs the same helpers as three dispatches each way, for GPUs.
//
// Backward, with a2 = fc2 pre-activation, a1 = fc1 pre-activation:
//   ds[c]   = sum_hw dy * x
//   da2[c]  = ds[c] * s'(a2): sigmoid s(1-s), tanh 1-s², relu [s > 0]
//   dh[j]   = sum_c w2[c, j] da2[c];   da1[j] = dh[j] * (h[j] > 0)
//   dz[c]   = sum_j w1[j, c] da1[j]
//   dx      = dy * s[c] + dz[c] / (H*W)        (max squeeze: + dz[c] at the first maximum only)
//   dw2[c, j] = sum_n da2[n, c] h[n, j];  db2 = sum_n da2
//   dw1[j, c] = sum_n da1[n, j] z[n, c];  db1 = sum_n da1
// se_block_backward_input (a workgroup per sample) writes dx and keeps da2, da1 in `dsaved`
// ([n][C | Cr]); se_block_backward_weight sums them over the batch, an invocation per channel
// and block of 4 hidden units, in a fixed order (no float atomics).
//
// Workgroup memory holds C + Cr floats (z, then s over z; h after them): C + Cr <= WMEM.
//
// x, y and their gradients are `act` (f32 or f16, defined by the host per compiled variant); the
// squeeze, both FCs, the gate, `saved`, `dsaved` and the weights are f32 in both.
//
// Versions (lavapipe; each ratio A/B in one run):
//   v1  forward as one dispatch per sample; weight gradient one invocation per weight: 36 ms for
//       256 channels at batch 32 but 0.4 ms at batch 33 (a cliff in lavapipe's code for it).
//   v2  weight gradient an invocation per channel and 4 hidden units (one shared and one own load
//       per sample feeding 4 FMAs): 0.5 ms at both batches; senet w0.25 b32 113 -> 145 images/s.
//   v3  the squeeze and ds over a subgroup per channel where there are subgroups: no change
//       measurable on lavapipe (see batch_norm.wgsl v5).
//   v4  `act` storage for --precision f16.
//   v5  the residual addition and ReLU after a standard-placement block as an epilogue
//       (`_add_relu`, the plan's `--fuse on`): forward out = relu(x * s[c] + r) written once
//       (x, r read, out written: the unfused scale + add + relu moved 3 + 3 + 2 tensors, now 4
//       with the squeeze's read of x); backward g = dout * [out > 0] masked where read, the
//       shortcut's gradient g and dx written by the one per-sample pass (dout, out, x read, two
//       gradients written: 5 tensors for the unfused relu + add + SE input pass's 9).
//   v6  DEFER = 1 (`--fuse on`, a batch norm alone before the block): the `_add_relu`
//       backward leaves dx = g * s[c] + dz[c] to that batch norm's backward (batch_norm.wgsl,
//       SE_IN), which reads g from the shortcut's gradient, and writes only s and dz per sample
//       into `se_grad` ([n][s (C) | dz (C)]): the full-size dx is neither written nor read.
//       AFFINE_IN = 1 (`--fuse on`, the same batch norm): the training forward and backward read
//       that batch norm's input y and apply it as they load each value, x = act_rounded((y -
//       mean) * (invstd * gamma) + beta) from its batch statistics (`bn_stats`, [mean | invstd])
//       and parameters — batch_norm.wgsl's expression and rounding — so the batch norm writes
//       only its statistics and x is never stored in training.
//   v7  the weight-gradient loop moved into se_weight_grad.wgsl, unchanged, which
//       batch_norm.wgsl includes too (SE_WGRAD): after a batch norm that takes dx (DEFER), that
//       batch norm's backward sums the weight gradients and this block records no dispatch for
//       them.
//   v8  (this) the split form for GPU adapters (`--se-split`, a mean squeeze): the squeeze and ds
//       spread over blocks of channels, the FCs a workgroup per sample, the scale and dx
//       elementwise. Measured on an NVIDIA H200 before it (SE-ResNet-50 f32, batch 64): the
//       one-pass fused forward 23.7 ms per step at 238 GB/s and its backward 17.6 ms at 323 GB/s,
//       64 workgroups each against a 4,130 GB/s copy. The one-pass kernels now call the same
//       helpers (squeeze_channel, se_fc, ds_channel, da2_out, se_grad_out) with their
//       arithmetic unchanged; the two forms agree bit for bit.

struct Params {
    n: u32, c: u32, cr: u32, hw: u32,
    has_bias: u32, squeeze: u32, excitation: u32, _pad0: u32,
}

const SQUEEZE_AVG: u32 = 0u;
const SQUEEZE_MAX: u32 = 1u;
const EXCITE_SIGMOID: u32 = 0u;
const EXCITE_TANH: u32 = 1u;
const EXCITE_RELU: u32 = 2u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read> w1: array<f32>;
@group(0) @binding(3) var<storage, read> b1: array<f32>;
@group(0) @binding(4) var<storage, read> w2: array<f32>;
@group(0) @binding(5) var<storage, read> b2: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<act>;
@group(0) @binding(7) var<storage, read_write> saved: array<f32>;
@group(0) @binding(8) var<storage, read> saved_in: array<f32>;
@group(0) @binding(9) var<storage, read> dout: array<act>;
@group(0) @binding(10) var<storage, read_write> dinp: array<act>;
@group(0) @binding(11) var<storage, read_write> dsaved: array<f32>;
@group(0) @binding(12) var<storage, read> dsaved_in: array<f32>;
@group(0) @binding(13) var<storage, read_write> dw1: array<f32>;
@group(0) @binding(14) var<storage, read_write> db1: array<f32>;
@group(0) @binding(15) var<storage, read_write> dw2: array<f32>;
@group(0) @binding(16) var<storage, read_write> db2: array<f32>;
// The fused residual addition and ReLU (`_add_relu`): the shortcut r, the ReLU's output (the
// backward's mask) and the shortcut's gradient.
@group(0) @binding(17) var<storage, read> res: array<act>;
@group(0) @binding(18) var<storage, read> outp: array<act>;
@group(0) @binding(19) var<storage, read_write> dres: array<act>;
// DEFER: per sample s[c] then dz[c] (/ HW), for the batch norm before the block.
@group(0) @binding(20) var<storage, read_write> se_grad: array<f32>;
// AFFINE_IN: the batch norm before the block, [2, C] statistics and [C] parameters.
@group(0) @binding(21) var<storage, read> bn_stats: array<f32>;
@group(0) @binding(22) var<storage, read> bn_gamma: array<f32>;
@group(0) @binding(23) var<storage, read> bn_beta: array<f32>;

override WG: u32 = 256u;
override DEFER: u32 = 0u;
override AFFINE_IN: u32 = 0u;

// The block's input x at element i of channel c: stored, or (AFFINE_IN) the batch norm before it
// applied to its own input as the batch norm would store it.
fn x_at(i: u32, c: u32) -> f32 {
    if (AFFINE_IN != 0u) {
        let scale = bn_stats[p.c + c] * bn_gamma[c];
        return act_rounded((f32(inp[i]) - bn_stats[c]) * scale + bn_beta[c]);
    }
    return f32(inp[i]);
}
const WMEM: u32 = 4096u;  // 16 KiB: WebGPU's guaranteed workgroup storage

var<workgroup> wbuf: array<f32, WMEM>;

fn sigmoid(a: f32) -> f32 {
    return 1.0 / (1.0 + exp(-a));
}

fn excite(a: f32) -> f32 {
    switch p.excitation {
        case EXCITE_TANH: { return tanh(a); }
        case EXCITE_RELU: { return max(a, 0.0); }
        default: { return sigmoid(a); }
    }
}

// d excite / d a, written with the output s.
fn excite_grad(s: f32) -> f32 {
    switch p.excitation {
        case EXCITE_TANH: { return 1.0 - s * s; }
        case EXCITE_RELU: { return select(0.0, 1.0, s > 0.0); }
        default: { return s * (1.0 - s); }
    }
}

// Index within the plane of the first maximum of x[cb .. cb + hw].
fn first_max(cb: u32) -> u32 {
    var best = f32(inp[cb]);
    var arg = 0u;
    for (var k = 1u; k < p.hw; k++) {
        let v = f32(inp[cb + k]);
        if (v > best) {
            best = v;
            arg = k;
        }
    }
    return arg;
}

// The squeeze of channel c of sample n by the calling subgroup (its lanes along the plane; an
// invocation alone without subgroups): z into wbuf[c] and `saved`.
fn squeeze_channel(n: u32, c: u32, l: Lane) {
    let cb = (n * p.c + c) * p.hw;
    var s = 0.0;
    if (p.squeeze != SQUEEZE_MAX) {
        for (var k = l.lane; k < p.hw; k += l.size) {
            s += x_at(cb + k, c);
        }
    }
    s = sg_sum(s);
    if (l.lane == 0u) {
        var z = s / f32(p.hw);
        if (p.squeeze == SQUEEZE_MAX) {
            z = f32(inp[cb + first_max(cb)]);
        }
        wbuf[c] = z;
        saved[n * (2u * p.c + p.cr) + c] = z;
    }
}

// From z[c] in wbuf[0 .. C]: fc1 + ReLU, fc2 + gate for sample n; leaves s[c] in wbuf[0 .. C]
// (and h, s in `saved`). Every invocation of the workgroup calls it (it holds barriers).
fn se_fc(n: u32, l: Lane) {
    let t = l.t;
    let sb = n * (2u * p.c + p.cr);
    workgroupBarrier();
    // fc1 + ReLU.
    for (var j = t; j < p.cr; j += WG) {
        var a = 0.0;
        if (p.has_bias != 0u) {
            a = b1[j];
        }
        let wb = j * p.c;
        for (var c = 0u; c < p.c; c++) {
            a += w1[wb + c] * wbuf[c];
        }
        let h = max(a, 0.0);
        wbuf[p.c + j] = h;
        saved[sb + p.c + j] = h;
    }
    workgroupBarrier();
    // fc2 + sigmoid; s[c] replaces z[c] (z is no longer read).
    for (var c = t; c < p.c; c += WG) {
        var a = 0.0;
        if (p.has_bias != 0u) {
            a = b2[c];
        }
        let wb = c * p.cr;
        for (var j = 0u; j < p.cr; j++) {
            a += w2[wb + j] * wbuf[p.c + j];
        }
        let s = excite(a);
        wbuf[c] = s;
        saved[sb + p.c + p.cr + c] = s;
    }
    workgroupBarrier();
}

// Squeeze, fc1 + ReLU, fc2 + gate for sample n: leaves s[c] in wbuf[0 .. C] (and z, h, s in
// `saved`). Every invocation of the workgroup calls it (it holds barriers).
fn se_gate(n: u32, l: Lane) {
    // Squeeze: a subgroup per channel, its lanes along the plane (a thread per channel, serially
    // over the plane, without subgroups).
    for (var c = l.sub; c < p.c; c += l.subs) {
        squeeze_channel(n, c, l);
    }
    se_fc(n, l);
}

// wid.x: sample.
@compute @workgroup_size(WG)
fn se_block_forward(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let n = wid.x;
    se_gate(n, l);
    // Excite.
    let xb = n * p.c * p.hw;
    let total = p.c * p.hw;
    for (var i = l.t; i < total; i += WG) {
        out[xb + i] = act(f32(inp[xb + i]) * wbuf[i / p.hw]);
    }
}

// The residual addition and the ReLU after the block fused in (`--fuse on`):
// out = relu(x * s[c] + res), written once; the squeeze still reads x.
@compute @workgroup_size(WG)
fn se_block_forward_add_relu(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let n = wid.x;
    se_gate(n, l);
    let xb = n * p.c * p.hw;
    let total = p.c * p.hw;
    for (var i = l.t; i < total; i += WG) {
        out[xb + i] = act(max(x_at(xb + i, i / p.hw) * wbuf[i / p.hw] + f32(res[xb + i]), 0.0));
    }
}

// From da2[c] in wbuf[0 .. C] (each invocation's own channels written before the call): dh and
// da1 (kept in `dsaved`), then dz (/ HW for the mean) in wbuf[0 .. C]. Every invocation of the
// workgroup calls it (it holds barriers).
fn se_fc_backward(n: u32, l: Lane) {
    let t = l.t;
    let sb = n * (2u * p.c + p.cr);
    let db = n * (p.c + p.cr);
    workgroupBarrier();
    // dh and da1 (ReLU gate from the saved activation).
    for (var j = t; j < p.cr; j += WG) {
        var dh = 0.0;
        for (var c = 0u; c < p.c; c++) {
            dh += w2[c * p.cr + j] * wbuf[c];
        }
        let da1 = select(0.0, dh, saved_in[sb + p.c + j] > 0.0);
        wbuf[p.c + j] = da1;
        dsaved[db + p.c + j] = da1;
    }
    workgroupBarrier();
    // dz (/ HW for the mean) replaces da2 (already consumed by every dh above).
    for (var c = t; c < p.c; c += WG) {
        var dz = 0.0;
        for (var j = 0u; j < p.cr; j++) {
            dz += w1[j * p.c + c] * wbuf[p.c + j];
        }
        wbuf[c] = select(dz / f32(p.hw), dz, p.squeeze == SQUEEZE_MAX);
    }
    workgroupBarrier();
}

// ds[c] = sum over the plane of g * x for channel c of sample n by the calling subgroup, as the
// squeeze, with g = dout; da2 = ds * s'(a2) into wbuf[c] and `dsaved` (da2_out).
fn ds_channel(n: u32, c: u32, l: Lane) {
    let cb = (n * p.c + c) * p.hw;
    var ds = 0.0;
    for (var k = l.lane; k < p.hw; k += l.size) {
        ds += f32(dout[cb + k]) * f32(inp[cb + k]);
    }
    da2_out(n, c, ds, l);
}

// ds_channel for the fused block's backward: g = dout masked by the ReLU's output [out > 0],
// written as the shortcut's gradient.
fn ds_channel_relu(n: u32, c: u32, l: Lane) {
    let cb = (n * p.c + c) * p.hw;
    var ds = 0.0;
    for (var k = l.lane; k < p.hw; k += l.size) {
        let g = select(0.0, f32(dout[cb + k]), f32(outp[cb + k]) > 0.0);
        dres[cb + k] = act(g);
        ds += g * x_at(cb + k, c);
    }
    da2_out(n, c, ds, l);
}

// The subgroup's partial sums of ds for channel c of sample n: da2 into wbuf[c] and `dsaved`.
fn da2_out(n: u32, c: u32, partial: f32, l: Lane) {
    let ds = sg_sum(partial);
    if (l.lane == 0u) {
        let da2 = ds * excite_grad(saved_in[n * (2u * p.c + p.cr) + p.c + p.cr + c]);
        wbuf[c] = da2;
        dsaved[n * (p.c + p.cr) + c] = da2;
    }
}

// s[c] and dz[c] (in wbuf[0 .. C], after se_fc_backward) of sample n into `se_grad`, [n][s | dz].
fn se_grad_out(n: u32, t: u32) {
    let s_off = n * (2u * p.c + p.cr) + p.c + p.cr;
    for (var c = t; c < p.c; c += WG) {
        se_grad[2u * n * p.c + c] = saved_in[s_off + c];
        se_grad[(2u * n + 1u) * p.c + c] = wbuf[c];
    }
}

// wid.x: sample.
@compute @workgroup_size(WG)
fn se_block_backward_input(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let t = l.t;
    let n = wid.x;
    let xb = n * p.c * p.hw;
    let s_off = n * (2u * p.c + p.cr) + p.c + p.cr;
    // ds and da2: a subgroup per channel, as the squeeze.
    for (var c = l.sub; c < p.c; c += l.subs) {
        ds_channel(n, c, l);
    }
    se_fc_backward(n, l);
    if (p.squeeze == SQUEEZE_MAX) {
        // The max passes dz to its first maximum only: a thread per channel.
        for (var c = t; c < p.c; c += WG) {
            let cb = xb + c * p.hw;
            let arg = first_max(cb);
            let s = saved_in[s_off + c];
            for (var k = 0u; k < p.hw; k++) {
                dinp[cb + k] = act(f32(dout[cb + k]) * s + select(0.0, wbuf[c], k == arg));
            }
        }
        return;
    }
    let total = p.c * p.hw;
    for (var i = t; i < total; i += WG) {
        let c = i / p.hw;
        dinp[xb + i] = act(f32(dout[xb + i]) * saved_in[s_off + c] + wbuf[c]);
    }
}

// The backward of se_block_forward_add_relu, one pass: `dout` is the ReLU's output gradient and
// `outp` its output. g = dout * [out > 0] (the mask applied where g is read); the shortcut's
// gradient dres = g, written in the ds sweep; ds[c] = sum g * x; then as above with g for dy.
@compute @workgroup_size(WG)
fn se_block_backward_input_add_relu(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let t = l.t;
    let n = wid.x;
    let xb = n * p.c * p.hw;
    let s_off = n * (2u * p.c + p.cr) + p.c + p.cr;
    for (var c = l.sub; c < p.c; c += l.subs) {
        ds_channel_relu(n, c, l);
    }
    se_fc_backward(n, l);
    if (DEFER != 0u) {
        // dx = g * s[c] + dz[c] is computed where it is read (the host checks the squeeze is the
        // mean): s and dz leave the workgroup, dx is not written.
        se_grad_out(n, t);
        return;
    }
    if (p.squeeze == SQUEEZE_MAX) {
        for (var c = t; c < p.c; c += WG) {
            let cb = xb + c * p.hw;
            let arg = first_max(cb);
            let s = saved_in[s_off + c];
            for (var k = 0u; k < p.hw; k++) {
                let g = select(0.0, f32(dout[cb + k]), f32(outp[cb + k]) > 0.0);
                dinp[cb + k] = act(g * s + select(0.0, wbuf[c], k == arg));
            }
        }
        return;
    }
    let total = p.c * p.hw;
    for (var i = t; i < total; i += WG) {
        let c = i / p.hw;
        let g = select(0.0, f32(dout[xb + i]), f32(outp[xb + i]) > 0.0);
        dinp[xb + i] = act(g * saved_in[s_off + c] + wbuf[c]);
    }
}

// The split form (`--se-split`, GPU adapters; a mean squeeze only): each per-sample pass above
// as a reduction spread over channels, a pass per sample for the small FCs, and an elementwise
// pass spread over the tensor, so a batch of 64 fills a GPU's multiprocessors where a workgroup
// per sample could not. Every value is computed by the same helper, in the same order, as in
// the one-pass kernels: the two forms are bit for bit the same (tests/kernels/se_block.rs).

// Channels per workgroup of the split reductions: the host's WG / the adapter's smallest
// subgroup (WG without subgroups); with larger subgroups each takes several channels.
override SPLIT_CHANNELS: u32 = 32u;

// wid.x: a block of SPLIT_CHANNELS channels; wid.y: sample. z into `saved`.
@compute @workgroup_size(WG)
fn se_block_forward_squeeze(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let c0 = wid.x * SPLIT_CHANNELS;
    for (var c = c0 + l.sub; c < min(c0 + SPLIT_CHANNELS, p.c); c += l.subs) {
        squeeze_channel(wid.y, c, l);
    }
}

// wid.x: sample. z from `saved`; h and s into it.
@compute @workgroup_size(WG)
fn se_block_forward_excite(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let n = wid.x;
    for (var c = l.t; c < p.c; c += WG) {
        wbuf[c] = saved[n * (2u * p.c + p.cr) + c];
    }
    se_fc(n, l);
}

// wid.y: sample; the workgroups along x stride over its C * H * W values (any count up to the
// grid limit). out = x * s[c], or (`_add_relu`) relu(x * s[c] + res).
@compute @workgroup_size(WG)
fn se_block_forward_scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) t: u32) {
    let xb = wid.y * p.c * p.hw;
    let s_off = wid.y * (2u * p.c + p.cr) + p.c + p.cr;
    for (var i = wid.x * WG + t; i < p.c * p.hw; i += nwg.x * WG) {
        out[xb + i] = act(f32(inp[xb + i]) * saved[s_off + i / p.hw]);
    }
}

@compute @workgroup_size(WG)
fn se_block_forward_scale_add_relu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) t: u32) {
    let xb = wid.y * p.c * p.hw;
    let s_off = wid.y * (2u * p.c + p.cr) + p.c + p.cr;
    for (var i = wid.x * WG + t; i < p.c * p.hw; i += nwg.x * WG) {
        let c = i / p.hw;
        out[xb + i] = act(max(x_at(xb + i, c) * saved[s_off + c] + f32(res[xb + i]), 0.0));
    }
}

// wid.x: a block of SPLIT_CHANNELS channels; wid.y: sample. da2 into `dsaved` (and, `_add_relu`,
// the shortcut's gradient).
@compute @workgroup_size(WG)
fn se_block_backward_ds(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let c0 = wid.x * SPLIT_CHANNELS;
    for (var c = c0 + l.sub; c < min(c0 + SPLIT_CHANNELS, p.c); c += l.subs) {
        ds_channel(wid.y, c, l);
    }
}

@compute @workgroup_size(WG)
fn se_block_backward_ds_add_relu(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let c0 = wid.x * SPLIT_CHANNELS;
    for (var c = c0 + l.sub; c < min(c0 + SPLIT_CHANNELS, p.c); c += l.subs) {
        ds_channel_relu(wid.y, c, l);
    }
}

// wid.x: sample. da2 from `dsaved`; da1 into it; s and dz into `se_grad`.
@compute @workgroup_size(WG)
fn se_block_backward_fc(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, WG);
    let n = wid.x;
    for (var c = l.t; c < p.c; c += WG) {
        wbuf[c] = dsaved[n * (p.c + p.cr) + c];
    }
    se_fc_backward(n, l);
    se_grad_out(n, l.t);
}

// As se_block_forward_scale: dx = g * s[c] + dz[c] from `se_grad`, g = dout, or (`_add_relu`) dout
// masked by the ReLU's output.
@compute @workgroup_size(WG)
fn se_block_backward_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) t: u32) {
    let n = wid.y;
    let xb = n * p.c * p.hw;
    for (var i = wid.x * WG + t; i < p.c * p.hw; i += nwg.x * WG) {
        let c = i / p.hw;
        dinp[xb + i] = act(f32(dout[xb + i]) * se_grad[2u * n * p.c + c] + se_grad[(2u * n + 1u) * p.c + c]);
    }
}

@compute @workgroup_size(WG)
fn se_block_backward_dx_add_relu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) t: u32) {
    let n = wid.y;
    let xb = n * p.c * p.hw;
    for (var i = wid.x * WG + t; i < p.c * p.hw; i += nwg.x * WG) {
        let c = i / p.hw;
        let g = select(0.0, f32(dout[xb + i]), f32(outp[xb + i]) > 0.0);
        dinp[xb + i] = act(g * se_grad[2u * n * p.c + c] + se_grad[(2u * n + 1u) * p.c + c]);
    }
}

// gid.x: channel k; gid.y: a block of 4 hidden units, first the fc1 blocks, then the fc2 ones
// (se_weight_grad.wgsl).
@compute @workgroup_size(WG)
fn se_block_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>) {
    se_weight_grad_block(gid.x, gid.y, p.n, p.c, p.cr, p.has_bias != 0u);
}
