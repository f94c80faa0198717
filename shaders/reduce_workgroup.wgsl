// reduce_workgroup: the reduction prelude for adapters without subgroups (or with them turned off,
// SENET_SUBGROUPS=off). The host appends one of the two reduce_* preludes to every shader file; a
// kernel written against it runs on both, and `cargo test` runs every reducing kernel both ways.
//
// The interface both preludes give:
//   Lanes                  an entry-point parameter: the invocation's builtins
//   lane_of(l, wg) -> Lane t (index in the workgroup), lane (index in its subgroup), size (subgroup
//                          size), sub (subgroup index), subs (subgroups in the workgroup); wg is
//                          the workgroup size
//   sg_sum(v)              the sum over the invocation's subgroup, in every lane
//   block_sum2(v, l)       the sum over the whole workgroup, in every invocation (uniform control flow)
//   block_welford(w, l)    (count, mean, M2) merged over the workgroup (Chan et al.), in every invocation
//
// Here every invocation is a subgroup of one lane, so sg_sum is the identity, a loop striding by
// `size` is a plain serial loop, and the workgroup reductions are fixed binary trees in workgroup
// memory over RED_WG values: log2(RED_WG) barriers. These are the reductions every kernel used
// before subgroups, bit for bit.

const RED_WG: u32 = 256u;

struct Lanes {
    @builtin(local_invocation_index) t: u32,
}

struct Lane {
    t: u32, lane: u32, size: u32, sub: u32, subs: u32,
}

fn lane_of(l: Lanes, wg: u32) -> Lane {
    return Lane(l.t, 0u, 1u, l.t, wg);
}

fn sg_sum(v: f32) -> f32 {
    return v;
}

var<workgroup> red_sum2: array<vec2<f32>, RED_WG>;
var<workgroup> red_welford: array<vec3<f32>, RED_WG>;

// Every invocation of a RED_WG-wide workgroup calls this with its partial sums.
fn block_sum2(v: vec2<f32>, l: Lane) -> vec2<f32> {
    red_sum2[l.t] = v;
    workgroupBarrier();
    for (var s = RED_WG / 2u; s > 0u; s /= 2u) {
        if (l.t < s) {
            red_sum2[l.t] += red_sum2[l.t + s];
        }
        workgroupBarrier();
    }
    let r = red_sum2[0];
    workgroupBarrier();  // the scratch may be reused by the next call
    return r;
}

// Chan's pairwise merge of (count, mean, M2) in a fixed tree.
fn block_welford(w: vec3<f32>, l: Lane) -> vec3<f32> {
    red_welford[l.t] = w;
    workgroupBarrier();
    for (var s = RED_WG / 2u; s > 0u; s /= 2u) {
        if (l.t < s) {
            red_welford[l.t] = welford_merge(red_welford[l.t], red_welford[l.t + s]);
        }
        workgroupBarrier();
    }
    let r = red_welford[0];
    workgroupBarrier();
    return r;
}

// (count, mean, M2) of a and b together; b may be empty.
fn welford_merge(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    let kn = a.x + b.x;
    if (b.x == 0.0) {
        return a;
    }
    let d = b.y - a.y;
    return vec3<f32>(kn, a.y + d * (b.x / kn), a.z + (b.z + d * d * (a.x * b.x / kn)));
}
