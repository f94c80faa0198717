enable wgpu_cooperative_matrix;
// conv2d_coop: the convolution's three GEMMs on cooperative matrices (tensor cores), for f16 plans
// on adapters that list a square f16 x f16 -> f32 configuration (wgpu's experimental
// EXPERIMENTAL_COOPERATIVE_MATRIX; NVIDIA's Vulkan driver offers 16x16x16, Mesa 26's lavapipe
// 8x8x8). Same op and CPU oracle as conv2d.wgsl (ops/conv2d/reference.rs); the GEMMs (MODE 0 forward,
// 1 input gradient, 2 weight gradient), the bindings, the operand loads and the store are
// conv2d_gemm.wgsl's, which the host appends (shared with conv2d_tiled.wgsl).
//
// A workgroup owns a 2CT x 2CT block of the GEMM as 2 x 2 coop tiles of CT x CT. Per step of CT
// along K it stages A's 2CT x CT slice and B's CT x 2CT slice in workgroup memory (f16), zero
// outside the matrices, in the padding and past the end of K, so no coop load reads out of range
// and partial tiles and K not a multiple of CT need no special case. Every product of two f16
// values is exact in f32 and the sums are f32 (the hardware's order within a tile, fixed per
// driver). The host appends CT and the coop types (`coop_prelude`): coop_mat8x8 or coop_mat16x16
// is a type, not a parameter. WG is the adapter's largest subgroup: coop ops run per subgroup, and
// a workgroup of one subgroup computes each tile once (a driver that splits it runs the same tiles
// twice, writing the same values).
//
// The weight gradient splits K (N*OH*OW) over wid.z into `splits` ranges of `split_len` (a
// multiple of CT), each writing its f32 slice of the partial buffer [splits, c_out, c_in*kh*kw]
// (binding 6; the weight gradient itself with one split); conv2d.wgsl's
// conv2d_backward_weight_reduce sums the slices in a fixed order: deterministic, no atomics.
// Forward and input-gradient outputs narrow to f16 once when stored; the weight gradient stays f32.
//
// Versions:
//   v1  forward only (conv2d_forward_coop); the gradients ran conv2d.wgsl's f16 variant.
//       Correct on Mesa 26 lavapipe (8x8x8); no GPU measurement.
//   v2  the three GEMMs from one source (conv2d_gemm_coop, MODE 0/1/2), the weight
//       gradient split over K with the fixed-order reduce; the forward's arithmetic is v1's. Correct
//       on Mesa 26 lavapipe (8x8x8). On an NVIDIA H200 (16x16x16 tiles, tests/coop.rs passes there)
//       quick tuning chose it for 5 of SE-ResNet-20's 43 f16 convolution dispatches and 4 of
//       SE-ResNet-50's 110; the register blocks won the rest, so f16 trained no faster than f32
//       (0.85-1.04x; docs/performance.md, "First run: one NVIDIA H200"). Next: larger blocks per
//       workgroup (several subgroups, 4x4 tiles) and double buffering.
//   v3  bindings, loads and store moved to conv2d_gemm.wgsl, shared with the tiled kernel;
//       the same arithmetic.
//   v4  groups, one GEMM per group along wid.z (conv2d_gemm.wgsl's enter_group); with
//       groups = 1 the same arithmetic. Correct on Mesa 26 lavapipe (8x8x8); not timed (a 2T-row
//       block holds c_out/groups rows of a grouped layer's GEMM: 4 of 16 for ResNeXt's groups).
//   v5  (this) the input gradient's addend (conv2d_params.wgsl's `accumulate`, in the shared
//       store); with the flag off the same arithmetic. Correct on Mesa 26 lavapipe; not timed.

override WG: u32 = 32u;


const BM: u32 = 2u * CT;
const BN: u32 = 2u * CT;

var<workgroup> sa: array<act, 2u * CT * CT>;  // BM x CT, row-major: A[r0 + r, k0 + kk]
var<workgroup> sb: array<act, 2u * CT * CT>;  // CT x BN, row-major: B[k0 + kk, c0 + c]
var<workgroup> sc: array<f32, 4u * CT * CT>;  // BM x BN, row-major: the result block

// The input gradient's addend (conv2d_params.wgsl's `accumulate`), read through `inp`.
fn addend_at(i: u32) -> f32 {
    return f32(inp[i]);
}

// wid.x: block of BN columns; wid.y: block of BM rows; wid.z: the group and the weight gradient's K split.
@compute @workgroup_size(WG)
fn conv2d_gemm_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r0 = wid.y * BM;
    let c0 = wid.x * BN;
    let n_rows = rows();
    let n_cols = cols();
    // wid.z: the channel group and (weight gradient) the split of K.
    let split = enter_group(wid.z);
    let k_span = k_range(split);
    let k_begin = k_span.x;
    let k_end = k_span.y;
    var acc00 = coop_c();
    var acc01 = coop_c();
    var acc10 = coop_c();
    var acc11 = coop_c();
    for (var k0 = k_begin; k0 < k_end; k0 += CT) {
        for (var i = li; i < BM * CT; i += WG) {
            let r = r0 + i / CT;
            let k = k0 + i % CT;
            var v = act(0.0);
            if (r < n_rows && k < k_end) {
                v = load_a(r, k);
            }
            sa[i] = v;
        }
        for (var i = li; i < CT * BN; i += WG) {
            let k = k0 + i / BN;
            let c = c0 + i % BN;
            var v = act(0.0);
            if (k < k_end && c < n_cols) {
                v = load_b(k, c);
            }
            sb[i] = v;
        }
        workgroupBarrier();
        // coopLoadT: a row-major source, stride in elements between rows.
        let a0 = coopLoadT<coop_a>(&sa[0], CT);
        let a1 = coopLoadT<coop_a>(&sa[CT * CT], CT);
        let b0 = coopLoadT<coop_b>(&sb[0], BN);
        let b1 = coopLoadT<coop_b>(&sb[CT], BN);
        acc00 = coopMultiplyAdd(a0, b0, acc00);
        acc01 = coopMultiplyAdd(a0, b1, acc01);
        acc10 = coopMultiplyAdd(a1, b0, acc10);
        acc11 = coopMultiplyAdd(a1, b1, acc11);
        workgroupBarrier();
    }
    coopStoreT(acc00, &sc[0], BN);
    coopStoreT(acc01, &sc[CT], BN);
    coopStoreT(acc10, &sc[CT * BN], BN);
    coopStoreT(acc11, &sc[CT * BN + CT], BN);
    workgroupBarrier();
    for (var i = li; i < BM * BN; i += WG) {
        let r = r0 + i / BN;
        let c = c0 + i % BN;
        if (r < n_rows && c < n_cols) {
            store(r, c, sc[i], split);
        }
    }
}
