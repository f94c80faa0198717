// dropout (nn.Dropout(p)): in training each element is kept with probability 1 - p and scaled by
// 1 / (1 - p), else zeroed; in evaluation out = inp. The mask is not stored: element i of layer
// `salt` in the step keyed (seed, step) is kept when hash(i / group, salt, seed, step) >= threshold
// (threshold = p * 2^32; `group` elements share a draw: 1 for dropout, a whole sample for
// drop_path, which runs these kernels), a counter-based draw the backward recomputes and the CPU reference
// (reference.rs beside this file) reproduces bit for bit. Activations are `act` (f32 or f16);
// arithmetic is f32.

struct Params {
    len: u32, threshold: u32, salt: u32, training: u32,
    scale: f32, group: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read_write> out: array<act>;
// (seed, step) of the step being run, written by the host before each step.
@group(0) @binding(3) var<storage, read> key: array<u32>;
@group(0) @binding(4) var<storage, read> dout: array<act>;
@group(0) @binding(5) var<storage, read_write> dinp: array<act>;

override WG: u32 = 256u;

// A 32-bit integer mix with good avalanche (Wellons' "lowbias32"); u32 arithmetic wraps.
fn mix(x: u32) -> u32 {
    var h = x;
    h ^= h >> 16u;
    h *= 0x7feb352du;
    h ^= h >> 15u;
    h *= 0x846ca68bu;
    h ^= h >> 16u;
    return h;
}

// The factor element i is multiplied by: 0 or 1 / (1 - p).
fn factor(i: u32) -> f32 {
    let u = mix((i / p.group) ^ mix(p.salt ^ mix(key[0] ^ mix(key[1]))));
    return select(0.0, p.scale, u >= p.threshold);
}

@compute @workgroup_size(WG)
fn dropout_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    if (p.training == 0u) {
        out[i] = inp[i];
    } else {
        out[i] = act(f32(inp[i]) * factor(i));
    }
}

@compute @workgroup_size(WG)
fn dropout_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    dinp[i] = act(f32(dout[i]) * factor(i));
}
