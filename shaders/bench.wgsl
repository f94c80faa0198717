// bench: the device's own ceilings, measured by `senet bench`.
//
//   bench_fma   4 independent vec4 FMA chains per invocation, `iters` long: 32 FLOP per iteration.
//               Independent chains hide the FMA latency; the result is stored so nothing is elided.
//   bench_copy  one vec4 read and one vec4 write per invocation: bandwidth = 32 bytes x len / time.

struct Params {
    iters: u32, len: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn bench_fma(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    var a = vec4<f32>(f32(i) * 1e-9);
    var b = a + 1.0;
    var c = a + 2.0;
    var d = a + 3.0;
    let m = vec4<f32>(0.9999);
    let k = vec4<f32>(1e-4);
    for (var t = 0u; t < p.iters; t++) {
        a = fma(a, m, k);
        b = fma(b, m, k);
        c = fma(c, m, k);
        d = fma(d, m, k);
    }
    if (i < p.len) {
        dst[i] = a + b + c + d;
    }
}

@compute @workgroup_size(WG)
fn bench_copy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i < p.len) {
        dst[i] = src[i];
    }
}
