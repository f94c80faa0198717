// grad_scaler: dynamic loss scaling for f16 plans, PyTorch's torch.amp.GradScaler on the GPU, with
// no read-back in the step (the host reads the state only when it logs).
//
// The loss gradient is multiplied by `scale` (cross_entropy.wgsl, SCALED), so the backward pass
// carries scaled gradients through f16 activations and leaves scaled f32 parameter gradients.
// Then, before the optimizer:
//   grad_scaler_reduce  many workgroups over the flat gradient buffer: flags[g] = 1 where a scaled
//                       gradient is inf or NaN (torch's _amp_foreach_non_finite_check_and_unscale_
//                       tests the scaled values too)
//   grad_scaler_step    one workgroup: found_inf = OR of the flags (then cleared for the next step);
//                       inv_scale = 1/scale for this step's optimizer; then torch's update():
//                       found_inf: scale *= backoff (0.5), tracker = 0, the step is skipped;
//                       else tracker += 1, and at growth_interval (2000) scale *= growth (2) if the
//                       result is finite, tracker = 0; the optimizer's step count t advances only on
//                       finite steps.
// The optimizer (optimizer.wgsl, SCALED) returns at once when found_inf is set, else unscales each
// gradient by inv_scale and takes its bias corrections from t. A skipped step still updates the
// batch-norm running statistics (its forward ran), as in torch.
//
// state (f32 array; the counters are u32 bit patterns, exact past 2^24):
//   [0] scale  [1] inv_scale of this step  [2] found_inf (0/1)  [3] growth tracker (u32)
//   [4] optimizer steps taken t (u32)  [5] steps skipped in all (u32)  [6] skipped in a row (u32)
// Integer atomics in workgroup memory only (an OR is order-free): results are deterministic.

struct Params {
    len: u32, flag_base: u32, growth_interval: u32, _pad0: u32,
    growth_factor: f32, backoff_factor: f32, _pad1: f32, _pad2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> flags: array<u32>;
@group(0) @binding(3) var<storage, read_write> state: array<f32>;

override WG: u32 = 256u;
// Workgroups of grad_scaler_reduce per chunk of gradients (its slice of `flags`).
override GROUPS: u32 = 256u;

var<workgroup> any_bad: atomic<u32>;

fn finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn count(i: u32) -> u32 {
    return bitcast<u32>(state[i]);
}

fn set_count(i: u32, v: u32) {
    state[i] = bitcast<f32>(v);
}

@compute @workgroup_size(WG)
fn grad_scaler_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    var bad = false;
    for (var e = wid.x * WG + t; e < p.len; e += GROUPS * WG) {
        bad = bad || !finite(grad[e]);
    }
    // Every invocation that saw one writes the same 1: no order to depend on.
    if (bad) {
        flags[p.flag_base + wid.x] = 1u;
    }
}

// p.len: flags in all (GROUPS per chunk).
@compute @workgroup_size(WG)
fn grad_scaler_step(@builtin(local_invocation_index) t: u32) {
    if (t == 0u) {
        atomicStore(&any_bad, 0u);
    }
    workgroupBarrier();
    for (var i = t; i < p.len; i += WG) {
        if (flags[i] != 0u) {
            atomicOr(&any_bad, 1u);
            flags[i] = 0u;
        }
    }
    workgroupBarrier();
    if (t != 0u) {
        return;
    }
    let found = atomicLoad(&any_bad) != 0u;
    let scale = state[0];
    state[1] = 1.0 / scale;
    if (found) {
        state[0] = scale * p.backoff_factor;
        state[2] = 1.0;
        set_count(3u, 0u);
        set_count(5u, count(5u) + 1u);
        set_count(6u, count(6u) + 1u);
    } else {
        state[2] = 0.0;
        set_count(4u, count(4u) + 1u);
        set_count(6u, 0u);
        var tracker = count(3u) + 1u;
        if (tracker >= p.growth_interval) {
            let grown = scale * p.growth_factor;
            if (finite(grown)) {
                state[0] = grown;
            }
            tracker = 0u;
        }
        set_count(3u, tracker);
    }
}
