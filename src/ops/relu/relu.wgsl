// relu: out = max(inp, 0); backward dinp = dout where out > 0, else 0 (PyTorch's threshold_backward
// on the result, so the gradient at exactly 0 is 0). Activations are `act` (f32 or f16, defined by
// the host per compiled variant); arithmetic is f32.

struct Params {
    len: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read_write> out: array<act>;
@group(0) @binding(3) var<storage, read> outp: array<act>;
@group(0) @binding(4) var<storage, read> dout: array<act>;
@group(0) @binding(5) var<storage, read_write> dinp: array<act>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn relu_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    out[i] = act(max(f32(inp[i]), 0.0));
}

@compute @workgroup_size(WG)
fn relu_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    dinp[i] = act(select(0.0, f32(dout[i]), f32(outp[i]) > 0.0));
}
