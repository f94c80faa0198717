// bn_fold: an evaluation pass's batch norms folded into the convolutions before them, from the
// live parameters and running statistics (weights change every training step, so this runs at the
// start of every evaluation pass; its cost is one read of the folded weights and one write of
// their copies). For each (convolution, batch norm) pair of the table, over output channel o:
//
//   s[o]     = gamma[o] * (1 / sqrt(running_var[o] + eps))          (batch_norm.wgsl's invstd)
//   w'[o, k] = w[o, k] * s[o]                                        (narrowed to `act` once)
//   b'[o]    = beta[o] - (running_mean[o] - bias[o]) * s[o]          (bias 0 for a conv without one)
//
// so that conv(x; w', b') = BN_eval(conv(x; w, bias)) up to rounding. One invocation per folded
// weight element, the pairs laid end to end (`first` counts them); an invocation finds its pair
// by binary search over the table (a few dozen pairs, a handful of steps). The invocation at
// k = 0 of each channel also writes the bias. Offsets are element indices into the bound buffers
// (the flat parameter buffer, the flat running-statistics buffer, the folded weights, the folded
// biases); a bias offset of NONE means no convolution bias.

struct Params {
    entries: u32, total: u32, _pad0: u32, _pad1: u32,
}

struct Entry {
    first: u32, c: u32, k: u32, weight: u32,
    bias: u32, gamma: u32, beta: u32, mean: u32,
    var_: u32, out_weight: u32, out_bias: u32, eps: f32,
}

const NONE: u32 = 0xffffffffu;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> table: array<Entry>;
@group(0) @binding(2) var<storage, read> params: array<f32>;
@group(0) @binding(3) var<storage, read> stats: array<f32>;
@group(0) @binding(4) var<storage, read_write> weights: array<act>;
@group(0) @binding(5) var<storage, read_write> biases: array<f32>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn bn_fold_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.total) {
        return;
    }
    // The last pair whose first element is at or before i: table[lo].first <= i < table[hi].first.
    var lo = 0u;
    var hi = p.entries;
    while (hi - lo > 1u) {
        let mid = (lo + hi) / 2u;
        if (table[mid].first <= i) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let e = table[lo];
    let j = i - e.first;
    let o = j / e.k;
    let s = params[e.gamma + o] * (1.0 / sqrt(stats[e.var_ + o] + e.eps));
    weights[e.out_weight + j] = act(params[e.weight + j] * s);
    if (j % e.k == 0u) {
        var b = 0.0;
        if (e.bias != NONE) {
            b = params[e.bias + o];
        }
        biases[e.out_bias + o] = params[e.beta + o] - (stats[e.mean + o] - b) * s;
    }
}
