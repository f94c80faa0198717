// clip_grad_norm: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) over the flat
// gradient buffer, with no read-back in the step (the host reads the norm only when it logs):
//
//   total_norm = sqrt(sum of g^2 over every gradient of every parameter)     (norm_type 2)
//   coef       = max_norm / (total_norm + 1e-6), clamped to at most 1
//   g         *= coef                                                         (every step, as torch)
//
// Three dispatches, after the backward pass (and the gradient all-reduce under MPI, and the loss
// scaler's check in f16 plans) and before the optimizer:
//   clip_grad_norm_partial  per chunk of gradients, G <= GROUPS workgroups: workgroup g sums the
//                           squares of elements g*WG + t, g*WG + t + G*WG, … (each lane in order),
//                           then its lanes' sums with the prelude's block_sum2 -> partial[base + g]
//   clip_grad_norm_reduce   one workgroup: lane t sums partial[t], partial[t + WG], … in order, then
//                           block_sum2; writes state[0] = total_norm, state[1] = coef
//   clip_grad_norm_scale    grad[i] *= state[1], one element per invocation, over each chunk
// Every sum runs in a fixed order in f32 (no float atomics): deterministic for an adapter and its
// reduction path (subgroupAdd's order is the driver's, fixed per driver).
//
// SCALED (f16 plans): the gradients are the loss-scaled ones; PyTorch's AMP recipe unscales them
// (scaler.unscale_) before clipping, so the norm is of g * inv_scale, the scaler's state[1] that
// grad_scaler_step wrote for this step. The scale kernel multiplies the scaled gradients by coef;
// the optimizer unscales them as it does without clipping. A step whose gradients overflowed gets an inf/NaN norm
// (as torch's) and is skipped by the optimizer anyway.
//
// state (f32): [0] total_norm of the last step (before clipping, of the unscaled gradients)
//              [1] the coefficient applied, min(max_norm / (total_norm + 1e-6), 1)
//
// Versions:
//   v1  (this) coefficient applied in place by its own dispatch rather than read by the optimizer:
//       the gradient buffer then holds the clipped gradients, as torch's .grad after the call, and
//       the three optimizers and their SCALED variants stay as they were; the cost is one more
//       read and write of the gradients per step, next to the optimizer's seven accesses (Adam).

struct Params {
    len: u32, base: u32, _pad0: u32, _pad1: u32,
    max_norm: f32, _pad2: f32, _pad3: f32, _pad4: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> partial: array<f32>;
@group(0) @binding(3) var<storage, read_write> state: array<f32>;
@group(0) @binding(4) var<storage, read> scaler: array<f32>;

override WG: u32 = 256u;
override SCALED: bool = false;

// p.len: elements of this chunk; p.base: its first slot in `partial`.
@compute @workgroup_size(RED_WG)
fn clip_grad_norm_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    lanes: Lanes,
) {
    let l = lane_of(lanes, RED_WG);
    var inv_scale = 1.0;
    if (SCALED) {
        inv_scale = scaler[1];
    }
    var s = 0.0;
    for (var e = wid.x * RED_WG + l.t; e < p.len; e += nwg.x * RED_WG) {
        let g = grad[e] * inv_scale;
        s += g * g;
    }
    let sum = block_sum2(vec2<f32>(s, 0.0), l);
    if (l.t == 0u) {
        partial[p.base + wid.x] = sum.x;
    }
}

// p.len: partial sums in all (every chunk's).
@compute @workgroup_size(RED_WG)
fn clip_grad_norm_reduce(lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    var s = 0.0;
    for (var i = l.t; i < p.len; i += RED_WG) {
        s += partial[i];
    }
    let sum = block_sum2(vec2<f32>(s, 0.0), l);
    if (l.t == 0u) {
        let total = sqrt(sum.x);
        let coef = p.max_norm / (total + 1e-6);
        state[0] = total;
        // torch.clamp(coef, max=1.0); a NaN norm leaves NaN gradients either way.
        state[1] = select(coef, 1.0, coef > 1.0);
    }
}

// p.len: elements of this chunk.
@compute @workgroup_size(WG)
fn clip_grad_norm_scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    grad[i] = grad[i] * state[1];
}
