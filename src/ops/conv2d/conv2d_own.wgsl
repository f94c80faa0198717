// conv2d_own: appended to conv2d.wgsl (before conv2d_params.wgsl) to make the "conv2d" module, for
// any adapter: every invocation loads its own column weights and dout values. LANES is false, so
// conv2d.wgsl never calls the broadcasts below (they exist so that one source serves both modules;
// conv2d_lanes.wgsl has the real ones), and lanes_any is each invocation's own answer.
const LANES: bool = false;

struct LaneId {
    @builtin(local_invocation_id) local: vec3<u32>,
}

fn lane_index(l: LaneId) -> u32 {
    return 0u;
}

fn lanes_0_3(v: f32) -> vec4<f32> {
    return vec4<f32>(v);
}

fn lanes_4_7(v: f32) -> vec4<f32> {
    return vec4<f32>(v);
}

fn lanes_add(v: f32) -> f32 {
    return v;
}

fn lanes_add4(v: vec4<f32>) -> vec4<f32> {
    return v;
}

// Each invocation its own subgroup of one: a run of n = 1.
fn lanes_aligned_run(x: u32, n: u32) -> bool {
    return n == 1u;
}

// Each invocation its own subgroup of one.
fn lanes_any(b: bool) -> bool {
    return b;
}
