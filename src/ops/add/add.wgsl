// add: the residual addition out = a + b, and its backward da = db = dout (the gradient passes
// to both branches unchanged). add_forward also sums the gradient contributions of an activation
// read by two layers (the fork before a residual block). Activations are `act` (f32 or f16, defined
// by the host per compiled variant); the sum is taken in f32.

struct Params {
    len: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<act>;
@group(0) @binding(2) var<storage, read> b: array<act>;
@group(0) @binding(3) var<storage, read_write> out: array<act>;
@group(0) @binding(4) var<storage, read> dout: array<act>;
@group(0) @binding(5) var<storage, read_write> da: array<act>;
@group(0) @binding(6) var<storage, read_write> db: array<act>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn add_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    out[i] = act(f32(a[i]) + f32(b[i]));
}

@compute @workgroup_size(WG)
fn add_backward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    let g = dout[i];
    da[i] = g;
    db[i] = g;
}
