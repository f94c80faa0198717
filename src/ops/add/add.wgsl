// add: the residual addition out = a + b, and its backward da = db = dout (the gradient passes
// to both branches unchanged). add_forward also sums the gradient contributions of an activation
// read by two layers (the fork before a residual block). Activations are `act` (f32 or f16, defined
// by the host per compiled variant); the sum is taken in f32.
//
// With the ReLU after it fused in (the plan's `--fuse on`): add_forward_relu writes
// out = relu(a + b) in one pass (the sum is rounded to `act` once, after the ReLU), and
// add_backward_relu masks the gradient once, with the saved output (PyTorch's threshold_backward:
// the gradient at exactly 0 is 0), and writes it to both operands: da = db = dout * [out > 0].
// Per element, 3 tensors move instead of 5 forward (add 3 + relu 2) and 4 instead of 6 backward.

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
@group(0) @binding(7) var<storage, read> outp: array<act>;

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

@compute @workgroup_size(WG)
fn add_forward_relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    out[i] = act(max(f32(a[i]) + f32(b[i]), 0.0));
}

@compute @workgroup_size(WG)
fn add_backward_relu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    let g = act(select(0.0, f32(dout[i]), f32(outp[i]) > 0.0));
    da[i] = g;
    db[i] = g;
}
