// linear: out[n, o] = bias[o] + sum_i weight[o, i] * inp[n, i]   (torch.nn.Linear, weight [O, I])
//   backward_input   dinp[n, i]   = sum_o dout[n, o] * weight[o, i]
//   backward_weight  dweight[o, i] = sum_n dout[n, o] * inp[n, i];  dbias[o] = sum_n dout[n, o]
// One invocation per output element; the batch sums run in a fixed order (no atomics).
//
// SPREAD_HW = H*W > 0 (training, `--fuse on`, the classifier after a global average pool): the
// input gradient is written as the pool's backward would spread it, dinp[n, i, k] =
// act(act(g) / (H*W)) for k < H*W with g the sum above — pool.wgsl's global_avg_pool_backward's
// expression and rounding on the value this kernel would have stored, so the bits are the two
// passes' and the pooled gradient [n, I] is never stored. One dispatch fewer per training step.
// Activations and their gradients are `act` (f32 or f16, defined by the host per compiled
// variant); the weights, their gradients and every sum are f32 (the classifier is small).

struct Params {
    n: u32, in_features: u32, out_features: u32, has_bias: u32,
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

override WG: u32 = 64u;
override SPREAD_HW: u32 = 0u;

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
    if (SPREAD_HW > 0u) {
        let g = act_rounded(acc) / f32(SPREAD_HW);
        for (var k = 0u; k < SPREAD_HW; k++) {
            dinp[e * SPREAD_HW + k] = act(g);
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
