// reduce_subgroup: the reduction prelude for adapters with subgroups (wgpu Features::SUBGROUP);
// the interface is described in reduce_workgroup.wgsl. The host appends it when the adapter has
// subgroups and SENET_SUBGROUPS is not off.
//
// A subgroup reduces in registers (subgroupAdd); the workgroup's subgroups leave one partial each
// in workgroup memory and the first subgroup reduces those: three barriers, against log2(RED_WG)
// = 8 for the tree. Kernels that give a subgroup a row (the SE squeeze: a plane per subgroup)
// read it with neighbouring lanes on neighbouring addresses.
//
// Assumes full subgroups: every kernel's workgroup size (256) is a multiple of every subgroup size
// wgpu admits (powers of two, 4..128), which Vulkan and Metal then fill. The order of subgroupAdd
// is the driver's: fixed for an adapter and driver, so a run repeats bit for bit on one machine,
// but it is not the tree's order (results agree within the tests' tolerances, not bitwise).

const RED_WG: u32 = 256u;

struct Lanes {
    @builtin(local_invocation_index) t: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) size: u32,
    @builtin(subgroup_id) sub: u32,
    @builtin(num_subgroups) subs: u32,
}

struct Lane {
    t: u32, lane: u32, size: u32, sub: u32, subs: u32,
}

fn lane_of(l: Lanes, wg: u32) -> Lane {
    return Lane(l.t, l.lane, l.size, l.sub, l.subs);
}

fn sg_sum(v: f32) -> f32 {
    return subgroupAdd(v);
}

var<workgroup> red_sum2: array<vec2<f32>, RED_WG>;
var<workgroup> red_welford: array<vec3<f32>, RED_WG>;

fn block_sum2(v: vec2<f32>, l: Lane) -> vec2<f32> {
    let s = subgroupAdd(v);
    if (l.lane == 0u) {
        red_sum2[l.sub] = s;
    }
    workgroupBarrier();
    if (l.sub == 0u) {
        var a = vec2<f32>(0.0);
        for (var i = l.lane; i < l.subs; i += l.size) {
            a += red_sum2[i];
        }
        a = subgroupAdd(a);  // every lane has read its partials: lane 0 may overwrite the first
        if (l.lane == 0u) {
            red_sum2[0] = a;
        }
    }
    workgroupBarrier();
    let r = red_sum2[0];
    workgroupBarrier();  // the scratch may be reused by the next call
    return r;
}

// (count, mean, M2) over the subgroup from sums: K = sum k, mean = sum(k mean) / K and
// M2 = sum(M2_i + k_i (mean_i - mean)^2), the deviations taken from the merged mean (no
// E[x^2] - E[x]^2 cancellation). Lanes with k = 0 add nothing.
fn sg_welford(w: vec3<f32>) -> vec3<f32> {
    let k = subgroupAdd(w.x);
    let km = subgroupAdd(w.x * w.y);
    var mean = 0.0;
    if (k > 0.0) {
        mean = km / k;
    }
    let d = w.y - mean;
    let m2 = subgroupAdd(w.z + w.x * d * d);
    return vec3<f32>(k, mean, m2);
}

fn block_welford(w: vec3<f32>, l: Lane) -> vec3<f32> {
    let s = sg_welford(w);
    if (l.lane == 0u) {
        red_welford[l.sub] = s;
    }
    workgroupBarrier();
    if (l.sub == 0u) {
        // The partials this lane holds, merged from sums as above in two passes over them.
        var k = 0.0;
        var km = 0.0;
        for (var i = l.lane; i < l.subs; i += l.size) {
            k += red_welford[i].x;
            km += red_welford[i].x * red_welford[i].y;
        }
        let kt = subgroupAdd(k);
        var mean = 0.0;
        if (kt > 0.0) {
            mean = subgroupAdd(km) / kt;
        }
        var m2 = 0.0;
        for (var i = l.lane; i < l.subs; i += l.size) {
            let d = red_welford[i].y - mean;
            m2 += red_welford[i].z + red_welford[i].x * d * d;
        }
        m2 = subgroupAdd(m2);
        // Every lane has finished reading the partials (it took part in the add): lane 0 may
        // overwrite the first.
        if (l.lane == 0u) {
            red_welford[0] = vec3<f32>(kt, mean, m2);
        }
    }
    workgroupBarrier();
    let r = red_welford[0];
    workgroupBarrier();
    return r;
}
