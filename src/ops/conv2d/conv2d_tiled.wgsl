// conv2d_tiled: the three convolution GEMMs of conv2d.wgsl with workgroup-memory tiles, the
// discrete-GPU kernel family (same op, same CPU oracle: ops/conv2d/reference.rs). The GEMMs (MODE 0
// forward, 1 input gradient, 2 weight gradient), the bindings, the operand loads and the store are
// conv2d_gemm.wgsl's, which the host appends (shared with conv2d_coop.wgsl); this file is the tiling.
//
// A workgroup of 256 invocations owns a BM x BN tile of the output; per step of BK along K it
// stages a BK x BM slice of A and a BK x BN slice of B in workgroup memory (loads arranged so that
// neighbouring invocations read neighbouring addresses where the layout allows: along K for
// weights and for the weight gradient's operands, along pixels for activations), then each
// invocation accumulates a TM x TN micro-tile in registers. The micro-tile is strided — rows
// ty + i*BM/TM, columns tx + j*BN/TN — so that a warp's workgroup-memory reads are consecutive
// (B) or broadcast (A), and its stores to pixel-contiguous outputs are coalesced. Tile shapes are
// override constants (ops::conv2d::WorkgroupTiles lists those built; (BM/TM)*(BN/TN) must be 256).
//
// The weight gradient splits K (N*OH*OW) over gid.z into `splits` ranges of `split_len`, each
// writing its slice of the partial buffer; conv2d.wgsl's conv2d_backward_weight_reduce sums the
// slices in a fixed order, so results are deterministic as with the register kernels.
//
// Activations, their gradients and the weights are `act` (f32, or f16 in an f16 plan); the tiles in
// workgroup memory, the accumulators and the weight gradient (binding 6) are f32 in both.
//
// Versions: v1, single-buffered, loads decode their (channel, tap) and (image, pixel) with
// integer divisions by uniforms. Measured on lavapipe (senet bench --tune full, width 0.25, batch
// 32, SENET_TUNE_VERBOSE=1, machine shared with a training run; ratios from one run): the best
// tile shape is 8x to 25x slower than the register blocks of conv2d.wgsl (features.4 forward
// 48 ms register vs 387 ms tiled 32x128; input gradient 42 vs 706 ms; first layer's weight
// gradient 59 vs 736 ms) — no faster shared memory there, every access lane by lane — so quick
// tuning does not time them on CPU adapters. On an NVIDIA H200, full tuning of the base SENet w1
// (batch 128) chose the register blocks for every layer and pass, none of these tiles
// (docs/runs/gpu-bench-h200/). Next versions:
// double buffering of the next K slice, vec4 loads where aligned, divisions by pipeline constants.
// v2: `act` storage for --precision f16; the weight gradient writes binding 6 (f32).
// v3: bindings, loads and store moved to conv2d_gemm.wgsl, shared with the coop kernel; the
// same arithmetic (loads widen to f32 where v2's did).
// v4: groups, one GEMM per group along wid.z (conv2d_gemm.wgsl's enter_group); with
// groups = 1 the same arithmetic. Measured in the same run as conv2d.wgsl's v9 (lavapipe, shared
// machine): ResNeXt's 32 groups of 4 channels, 64x64 tiles: ~0.01 GFLOP/s f32 in every pass,
// ~20x slower than the register blocks (a 64-row tile holds 4 rows of a group's GEMM) — on a
// GPU, grouped layers want tiles sized to the group; not measured there yet.
// v5 (this): the input gradient's addend (conv2d_params.wgsl's `accumulate`, in the shared store);
// with the flag off the same arithmetic. Not timed.

override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 16u;
override TM: u32 = 4u;
override TN: u32 = 4u;

const T: u32 = 256u;

// BK*BM and BK*BN are at most 2048 for every tile shape built (16 KiB of workgroup memory).
var<workgroup> As: array<f32, 2048>;
var<workgroup> Bs: array<f32, 2048>;

@compute @workgroup_size(T)
fn conv2d_gemm_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    let tx_n = BN / TN;
    let ty_n = BM / TM;
    let tx = tid % tx_n;
    let ty = tid / tx_n;
    let r0 = wid.y * BM;
    let c0 = wid.x * BN;
    let n_rows = rows();
    let n_cols = cols();
    // wid.z: the channel group and (weight gradient) the split of K.
    let split = enter_group(wid.z);
    let k_span = k_range(split);
    let k_begin = k_span.x;
    let k_end = k_span.y;

    var acc: array<f32, 64>;
    for (var i = 0u; i < TM * TN; i++) {
        acc[i] = 0.0;
    }
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        // Stage A: BK x BM, K fastest across invocations.
        for (var e = 0u; e < BK * BM / T; e++) {
            let idx = e * T + tid;
            let kk = idx % BK;
            let r = idx / BK;
            var v = 0.0;
            if (r0 + r < n_rows && k0 + kk < k_end) {
                v = f32(load_a(r0 + r, k0 + kk));
            }
            As[kk * BM + r] = v;
        }
        // Stage B: BK x BN, pixels fastest (forward, input gradient) or K fastest (weight gradient).
        for (var e = 0u; e < BK * BN / T; e++) {
            let idx = e * T + tid;
            var kk = idx / BN;
            var c = idx % BN;
            if (MODE == WGRAD) {
                kk = idx % BK;
                c = idx / BK;
            }
            var v = 0.0;
            if (c0 + c < n_cols && k0 + kk < k_end) {
                v = f32(load_b(k0 + kk, c0 + c));
            }
            Bs[kk * BN + c] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, 8>;
            var b: array<f32, 8>;
            for (var i = 0u; i < TM; i++) {
                a[i] = As[kk * BM + ty + i * ty_n];
            }
            for (var j = 0u; j < TN; j++) {
                b[j] = Bs[kk * BN + tx + j * tx_n];
            }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    acc[i * TN + j] += a[i] * b[j];
                }
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < TM; i++) {
        let r = r0 + ty + i * ty_n;
        for (var j = 0u; j < TN; j++) {
            let c = c0 + tx + j * tx_n;
            if (r < n_rows && c < n_cols) {
                store(r, c, acc[i * TN + j], split);
            }
        }
    }
}
