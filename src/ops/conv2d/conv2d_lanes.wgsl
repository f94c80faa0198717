// conv2d_lanes: appended to conv2d.wgsl (before conv2d_params.wgsl) to make the "conv2d_lanes"
// module, built only where the adapter's subgroups are 8 to 64 lanes (wgpu Features::SUBGROUP;
// the host's `Paths::conv_lanes`): the register GEMM's column weights loaded once per subgroup and
// broadcast.
//
// Every invocation of a workgroup reads the same GEMM_N weights per reduction step (the columns
// are gid.y's), but Mesa 22.3's gallivm cannot tell a uniform address from a varying one: each
// load runs lane by lane. Here lane l loads column l (and l + 8 when GEMM_N is 16) and
// subgroupBroadcast from a constant lane (on lavapipe an extract and a splat) hands every lane all
// of them: 2 lane-by-lane loads per reduction step instead of 16, the same values bit for bit.
// Lanes past 8 (subgroups of 16 to 64) load clamped columns nobody reads.
//
// The weight gradient's dout values likewise (same output channels, same pixel in every lane).
//
// Needs whole subgroups in every broadcast: invocations past the last row (GEMM) or block (weight
// gradient) keep running on clamped ones instead of returning, unless their whole subgroup is
// past it (lanes_any), and a workgroup (WG = 64) holds whole subgroups of up to 64 lanes (Vulkan
// drivers fill them in practice, which shaders/reduce_subgroup.wgsl assumes as well).
const LANES: bool = true;

struct LaneId {
    @builtin(subgroup_invocation_id) id: u32,
}

fn lane_index(l: LaneId) -> u32 {
    return l.id;
}

// Lanes 0-3 and 4-7 of the subgroup's v.
fn lanes_0_3(v: f32) -> vec4<f32> {
    return vec4<f32>(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u), subgroupBroadcast(v, 3u));
}

fn lanes_4_7(v: f32) -> vec4<f32> {
    return vec4<f32>(subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u), subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u));
}

// The sum of v over the subgroup's lanes.
fn lanes_add(v: f32) -> f32 {
    return subgroupAdd(v);
}

fn lanes_add4(v: vec4<f32>) -> vec4<f32> {
    return subgroupAdd(v);
}

// Whether the subgroup's lanes are exactly the n invocations x of one aligned run
// [n * r, n * r + n) (the same r for every lane, and n lanes): how drivers number lanes in
// practice, which the forward's batch statistics check before merging over lanes.
fn lanes_aligned_run(x: u32, n: u32) -> bool {
    return subgroupAll(x / n == subgroupBroadcast(x, 0u) / n) && subgroupAdd(1u) == n;
}

// Whether b holds in any lane of the subgroup (the same answer in every lane).
fn lanes_any(b: bool) -> bool {
    return subgroupAny(b);
}
