// linear: out[n, o] = bias[o] + sum_i weight[o, i] * inp[n, i]   (torch.nn.Linear, weight [O, I])
//   backward_input   dinp[n, i]   = sum_o dout[n, o] * weight[o, i]
//   backward_weight  dweight[o, i] = sum_n dout[n, o] * inp[n, i];  dbias[o] = sum_n dout[n, o]
// One invocation per output element; the batch sums run in a fixed order (no atomics).
//
// The global average pool before the classifier, taken into it (`--fuse on`; H*W = p.pool_hw):
//   linear_forward_pooled  a workgroup per sample averages its rows over their pixels into
//       workgroup memory and stores them (the pool's output, which the weight gradient reads),
//       then computes the sample's outputs from workgroup memory: pool.wgsl's
//       global_avg_pool_forward's sums, division and rounding, then linear_forward's, so the bits
//       are the two passes'. In features up to POOL_ROW (the host runs the two passes beyond).
//   SPREAD (linear_backward_input) the input gradient written as the pool's backward would
//       spread it, dinp[n, i, k] = act(act(g) / (H*W)) for k < H*W with g the sum above —
//       global_avg_pool_backward's expression and rounding on the value this kernel would have
//       stored; the pooled gradient [n, I] is never stored.
// One dispatch fewer each way; in training the pool's output is still written, once.
// Activations and their gradients are `act` (f32 or f16, defined by the host per compiled
// variant); the weights, their gradients and every sum are f32 (the classifier is small).

struct Params {
    n: u32, in_features: u32, out_features: u32, has_bias: u32,
    // The pixels of the global average pool taken in (0: none).
    pool_hw: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<act>;
@group(0) @binding(5) var<storage, read> dout: array<act>;
@group(0) @binding(6) var<storage, read_write> dinp: array<act>;
@group(0) @binding(7) var<storage, read_write> dweight: array<f32>;
@group(0) @binding(8) var<storage, read_write> dbias: array<f32>;
// linear_forward_pooled: the pool's input [n, I, H*W] and its output [n, I].
@group(0) @binding(9) var<storage, read> pool_inp: array<act>;
@group(0) @binding(10) var<storage, read_write> pooled: array<act>;

override WG: u32 = 64u;
override SPREAD: bool = false;

// 16 KiB: WebGPU's guaranteed workgroup storage.
const POOL_ROW: u32 = 4096u;
var<workgroup> row: array<f32, POOL_ROW>;

@compute @workgroup_size(WG)
fn linear_forward_pooled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let n = wid.x + wid.y * nwg.x;
    if (n >= p.n) {
        return;
    }
    let hw = p.pool_hw;
    for (var i = t; i < p.in_features; i += WG) {
        let b = (n * p.in_features + i) * hw;
        var s = 0.0;
        for (var k = 0u; k < hw; k++) {
            s += f32(pool_inp[b + k]);
        }
        let v = s / f32(hw);
        pooled[n * p.in_features + i] = act(v);
        row[i] = act_rounded(v);
    }
    workgroupBarrier();
    for (var o = t; o < p.out_features; o += WG) {
        var acc = 0.0;
        if (p.has_bias != 0u) {
            acc = bias[o];
        }
        let wb = o * p.in_features;
        for (var i = 0u; i < p.in_features; i++) {
            acc += weight[wb + i] * row[i];
        }
        out[n * p.out_features + o] = act(acc);
    }
}

@compute @workgroup_size(WG)
fn linear_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= p.n * p.out_features) {
        return;
    }
    let n = e / p.out_features;
    let o = e % p.out_features;
    var acc = 0.0;
    if (p.has_bias != 0u) {
        acc = bias[o];
    }
    let xb = n * p.in_features;
    let wb = o * p.in_features;
    for (var i = 0u; i < p.in_features; i++) {
        acc += weight[wb + i] * f32(inp[xb + i]);
    }
    out[e] = act(acc);
}

@compute @workgroup_size(WG)
fn linear_backward_input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= p.n * p.in_features) {
        return;
    }
    let n = e / p.in_features;
    let i = e % p.in_features;
    var acc = 0.0;
    for (var o = 0u; o < p.out_features; o++) {
        acc += f32(dout[n * p.out_features + o]) * weight[o * p.in_features + i];
    }
    if (SPREAD) {
        let hw = p.pool_hw;
        let g = act_rounded(acc) / f32(hw);
        for (var k = 0u; k < hw; k++) {
            dinp[e * hw + k] = act(g);
        }
        return;
    }
    dinp[e] = act(acc);
}

// Invocations [0, O*I) compute dweight, [O*I, O*I + O) dbias.
@compute @workgroup_size(WG)
fn linear_backward_weight(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    let nw = p.out_features * p.in_features;
    if (e < nw) {
        let o = e / p.in_features;
        let i = e % p.in_features;
        var acc = 0.0;
        for (var n = 0u; n < p.n; n++) {
            acc += f32(dout[n * p.out_features + o]) * f32(inp[n * p.in_features + i]);
        }
        dweight[e] = acc;
    } else if (p.has_bias != 0u && e < nw + p.out_features) {
        let o = e - nw;
        var acc = 0.0;
        for (var n = 0u; n < p.n; n++) {
            acc += f32(dout[n * p.out_features + o]);
        }
        dbias[o] = acc;
    }
}
