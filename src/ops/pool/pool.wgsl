// pool: max pooling (any kernel, stride, padding; floor mode, or ceil mode where the last window
// may hang over the edge: the host sets OH/OW, the loops skip what lies outside) and global
// average pooling (AdaptiveAvgPool2d(1)), forward and backward, NCHW.
//
//   max_pool2d_forward   out = max over the window (padding counts as -inf); argmax = iy*W + ix of
//                        the first maximum in scan order (PyTorch's rule; a NaN propagates)
//   max_pool2d_backward  dinp[iy, ix] = sum of dout over the windows whose argmax is (iy, ix).
//                        Gathered per input element, over the few windows that contain it, so
//                        overlapping windows need no atomics and the sum order is fixed.
// The window scan and the gather are max_pool_window.wgsl's, appended by the host (batch_norm.wgsl's
// fused pool uses them too).
//   global_avg_pool_*    out[n, c] = mean over H*W;  dinp = dout[n, c] / (H*W)
//                        (`--fuse on`: a classifier that alone reads the pool runs both passes
//                        itself, linear.wgsl's linear_forward_pooled and SPREAD, with these
//                        expressions)
//
// AFFINE = 1 (evaluation, `--fuse on`): max_pool2d_forward reads a batch norm's input and applies
// the batch norm from its running statistics and its ReLU on load — act_rounded(max((x - mean) *
// (invstd * gamma) + beta, 0)), batch_norm_forward_eval's expression and rounding, so the pooled values
// are bit for bit those of the batch norm then the pool — where no convolution before the batch
// norm can absorb it (the base SENet's last one, after its SE block): the batch norm's pass and
// its full-size output disappear.
//
// Activations are `act` (f32 or f16, defined by the host per compiled variant); sums are f32.
//
// Versions (lavapipe; each ratio A/B in one run):
//   v1  max pooling's geometry from the uniform (runtime divisions, a software routine per lane).
//   v2  geometry as pipeline constants: backward 2.5x, forward 2.4x.
//   v3  `act` storage for --precision f16.
//   v4  (this) the window scan and gather moved to max_pool_window.wgsl (shared with the batch
//       norm's fused pool), the same arithmetic in the same order; AFFINE for evaluation. Not
//       timed.

struct Params {
    n: u32, c: u32, h: u32, w: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read_write> out: array<act>;
@group(0) @binding(3) var<storage, read_write> argmax: array<u32>;
@group(0) @binding(4) var<storage, read> dout: array<act>;
@group(0) @binding(5) var<storage, read> argmax_in: array<u32>;
@group(0) @binding(6) var<storage, read_write> dinp: array<act>;
// AFFINE: the batch norm's parameters and running statistics [C].
@group(0) @binding(7) var<storage, read> bn_gamma: array<f32>;
@group(0) @binding(8) var<storage, read> bn_beta: array<f32>;
@group(0) @binding(9) var<storage, read> bn_mean: array<f32>;
@group(0) @binding(10) var<storage, read> bn_var: array<f32>;

override WG: u32 = 256u;

// Max pooling's geometry (H, W, KH, …, OW) is max_pool_window.wgsl's overrides; global average
// pooling reads `p`.
override AFFINE: u32 = 0u;
override EPS: f32 = 1e-5;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// The value max pooling sees at input element i (max_pool_window.wgsl): the stored one, or with
// AFFINE the batch norm and ReLU applied to it.
fn pool_load(i: u32) -> f32 {
    let v = f32(inp[i]);
    if (AFFINE != 0u) {
        return act_rounded(max((v - pool_affine.x) * pool_affine.y + pool_affine.z, 0.0));
    }
    return v;
}

@compute @workgroup_size(WG)
fn max_pool2d_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    let ohw = OH * OW;
    if (i >= p.n * p.c * ohw) {
        return;
    }
    let plane = i / ohw;
    if (AFFINE != 0u) {
        let c = plane % p.c;
        pool_affine = vec3<f32>(bn_mean[c], 1.0 / sqrt(bn_var[c] + EPS) * bn_gamma[c], bn_beta[c]);
    }
    let best = pool_window_max(plane * H * W, i % ohw);
    out[i] = act(best.value);
    argmax[i] = best.index;
}

@compute @workgroup_size(WG)
fn max_pool2d_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    let hw = H * W;
    if (i >= p.n * p.c * hw) {
        return;
    }
    dinp[i] = act(pool_gather(i / hw, i % hw));
}

// One invocation per (n, c) plane.
@compute @workgroup_size(WG)
fn global_avg_pool_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= p.n * p.c) {
        return;
    }
    let hw = p.h * p.w;
    var s = 0.0;
    for (var k = 0u; k < hw; k++) {
        s += f32(inp[i * hw + k]);
    }
    out[i] = act(s / f32(hw));
}

@compute @workgroup_size(WG)
fn global_avg_pool_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    let hw = p.h * p.w;
    if (i >= p.n * p.c * hw) {
        return;
    }
    dinp[i] = act(f32(dout[i / hw]) / f32(hw));
}
