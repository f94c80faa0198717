// batch_norm: BatchNorm2d over NCHW, PyTorch semantics (eps, momentum 0.1, affine gamma/beta).
//
//   training   mean, var_b = batch statistics per channel over N*H*W (biased var for normalising)
//              running_mean = (1-momentum)*running_mean + momentum*mean
//              running_var  = (1-momentum)*running_var  + momentum*var_b*M/(M-1)   (unbiased, as PyTorch)
//   eval       mean, var from the running statistics
//   forward    out = (inp - mean) * invstd * gamma + beta,  invstd = 1/sqrt(var + eps)
//   backward   dbeta = sum dout, dgamma = sum dout*xhat, xhat = (inp - mean)*invstd
//              dinp = gamma*invstd * (dout - dbeta/M - xhat*dgamma/M)          (training mode)
//
// Statistics: one workgroup per channel, two passes over the channel (mean first, then the sum of
// squared deviations), each thread summing a strided slice and a tree reduction in workgroup memory.
// Never the one-pass E[x^2]-E[x]^2, which cancels catastrophically when |mean| >> std.
// `stats` holds mean[C] then invstd[C]; the backward reuses them.
//
// Fused ReLU (override RELU = 1, for a BN whose only reader is a ReLU): the forward writes
// max(out, 0) straight into the ReLU's output, and the backward takes the ReLU's output gradient
// and masks it itself, g = dout * (relu_out > 0) — two passes over the activation fewer, the same
// numbers bit for bit as BN then ReLU.

struct Params {
    n: u32, c: u32, hw: u32, _pad0: u32,
    eps: f32, momentum: f32, update_running: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(5) var<storage, read> stats_in: array<f32>;
@group(0) @binding(6) var<storage, read> gamma: array<f32>;
@group(0) @binding(7) var<storage, read> beta: array<f32>;
@group(0) @binding(8) var<storage, read_write> out: array<f32>;
@group(0) @binding(9) var<storage, read> dout: array<f32>;
@group(0) @binding(10) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(11) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(12) var<storage, read> dgamma_in: array<f32>;
@group(0) @binding(13) var<storage, read> dbeta_in: array<f32>;
@group(0) @binding(14) var<storage, read_write> dinp: array<f32>;
@group(0) @binding(15) var<storage, read> running_mean_in: array<f32>;
@group(0) @binding(16) var<storage, read> running_var_in: array<f32>;
@group(0) @binding(17) var<storage, read> relu_out: array<f32>;

override WG: u32 = 256u;      // elementwise kernels
override RELU: u32 = 0u;      // 1: ReLU fused after the normalisation (see above)
override RED_WG: u32 = 256u;  // reductions: a power of two, at most RED_MAX
const RED_MAX: u32 = 256u;

var<workgroup> red: array<f32, RED_MAX>;
var<workgroup> red2: array<f32, RED_MAX>;

// Index of the e-th element of channel c, e in [0, N*HW).
fn chan_index(c: u32, e: u32) -> u32 {
    return ((e / p.hw) * p.c + c) * p.hw + e % p.hw;
}

// The gradient reaching the normalisation's output at element i.
fn grad_at(i: u32) -> f32 {
    if (RELU != 0u) {
        return select(0.0, dout[i], relu_out[i] > 0.0);
    }
    return dout[i];
}

// Tree-reduce red[0..RED_WG) into red[0]. Every invocation must call it.
fn reduce1(t: u32) {
    workgroupBarrier();
    for (var s = RED_WG / 2u; s > 0u; s /= 2u) {
        if (t < s) {
            red[t] += red[t + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(RED_WG)
fn batch_norm_forward_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let c = wid.x;
    let m = p.n * p.hw;
    var s = 0.0;
    for (var e = t; e < m; e += RED_WG) {
        s += inp[chan_index(c, e)];
    }
    red[t] = s;
    reduce1(t);
    let mean = red[0] / f32(m);
    workgroupBarrier();
    var q = 0.0;
    for (var e = t; e < m; e += RED_WG) {
        let d = inp[chan_index(c, e)] - mean;
        q += d * d;
    }
    red[t] = q;
    reduce1(t);
    if (t == 0u) {
        let var_b = red[0] / f32(m);
        stats[c] = mean;
        stats[p.c + c] = 1.0 / sqrt(var_b + p.eps);
        if (p.update_running != 0u) {
            // m > 1 is checked on the host (PyTorch refuses training-mode BN on one value per channel).
            let var_u = red[0] / f32(m - 1u);
            running_mean[c] = (1.0 - p.momentum) * running_mean[c] + p.momentum * mean;
            running_var[c] = (1.0 - p.momentum) * running_var[c] + p.momentum * var_u;
        }
    }
}

// Eval mode: the statistics come from the running estimates.
@compute @workgroup_size(WG)
fn batch_norm_forward_eval_stats(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    if (c >= p.c) {
        return;
    }
    stats[c] = running_mean_in[c];
    stats[p.c + c] = 1.0 / sqrt(running_var_in[c] + p.eps);
}

@compute @workgroup_size(WG)
fn batch_norm_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let c = (i / p.hw) % p.c;
    let y = (inp[i] - stats_in[c]) * stats_in[p.c + c] * gamma[c] + beta[c];
    if (RELU != 0u) {
        out[i] = max(y, 0.0);
    } else {
        out[i] = y;
    }
}

// One workgroup per channel: dbeta = sum dout, dgamma = sum dout * xhat.
@compute @workgroup_size(RED_WG)
fn batch_norm_backward_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let c = wid.x;
    let m = p.n * p.hw;
    let mean = stats_in[c];
    let invstd = stats_in[p.c + c];
    var sd = 0.0;
    var sdx = 0.0;
    for (var e = t; e < m; e += RED_WG) {
        let i = chan_index(c, e);
        let g = grad_at(i);
        sd += g;
        sdx += g * (inp[i] - mean);
    }
    red[t] = sd;
    red2[t] = sdx;
    workgroupBarrier();
    for (var s = RED_WG / 2u; s > 0u; s /= 2u) {
        if (t < s) {
            red[t] += red[t + s];
            red2[t] += red2[t + s];
        }
        workgroupBarrier();
    }
    if (t == 0u) {
        dbeta[c] = red[0];
        dgamma[c] = red2[0] * invstd;
    }
}

@compute @workgroup_size(WG)
fn batch_norm_backward_input(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n * p.c * p.hw) {
        return;
    }
    let c = (i / p.hw) % p.c;
    let inv_m = 1.0 / f32(p.n * p.hw);
    let invstd = stats_in[p.c + c];
    let xhat = (inp[i] - stats_in[c]) * invstd;
    dinp[i] = gamma[c] * invstd * (grad_at(i) - dbeta_in[c] * inv_m - xhat * dgamma_in[c] * inv_m);
}
