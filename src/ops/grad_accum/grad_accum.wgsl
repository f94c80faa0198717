// grad_accum: gradient accumulation over micro-batches (timm's --grad-accum-steps), elementwise over
// the flat gradient buffer and a flat accumulator of the same layout:
//
//   grad_accum_store   accum[i] = grad[i]              after the first micro-batch's backward
//   grad_accum_add     accum[i] = accum[i] + grad[i]   after each middle one's
//   grad_accum_finish  grad[i]  = accum[i] + grad[i]   after the last one's, before the loss
//                                                      scaler, clipping and the optimizer
//
// The backward kernels overwrite the gradients (they never add to them), so the sum lives in its
// own buffer until the last micro-batch. The additions run in PyTorch's order: .grad is g1 after
// the first backward and each later backward adds its own to it, (((g1 + g2) + g3) + g4) — the same
// f32 roundings. Each micro-batch's loss gradient is already divided by the group's micro-batch
// count (cross_entropy.wgsl's weight), as timm divides the loss before backward.
//
// Versions: v1 (this) one invocation per element over each binding-sized chunk; three entries, not
// a mode in a uniform, so every dispatch is recorded once and the step picks the list.

struct Params {
    len: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> accum: array<f32>;

override WG: u32 = 256u;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

@compute @workgroup_size(WG)
fn grad_accum_store(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    accum[i] = grad[i];
}

@compute @workgroup_size(WG)
fn grad_accum_add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    accum[i] = accum[i] + grad[i];
}

@compute @workgroup_size(WG)
fn grad_accum_finish(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i >= p.len) {
        return;
    }
    grad[i] = accum[i] + grad[i];
}
