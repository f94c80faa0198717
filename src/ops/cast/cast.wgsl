// cast: out = act(inp), f32 values narrowed to the plan's activation type. WGSL leaves the rounding
// to the adapter: lavapipe rounds to nearest even and overflows to ±inf, as PyTorch's .half()
// (tests/kernels/cast.rs holds it to that bit for bit; another adapter may round 65504..65536 down). An f16 plan casts its input batch once per
// step and its f32 master weights into their f16 copies once per step, before the forward pass
// (one dispatch over the whole flat parameter buffer). In an f32 plan it is a copy.

struct Params {
    len: u32, _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<act>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn cast_forward(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.len) {
        return;
    }
    out[i] = act(inp[i]);
}
