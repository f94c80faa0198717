// batch_norm: BatchNorm2d over NCHW, PyTorch semantics (eps, momentum 0.1, affine gamma/beta).
//
//   training   mean, var_b = batch statistics per channel over N*H*W (biased var for normalising)
//              running_mean = (1-momentum)*running_mean + momentum*mean
//              running_var  = (1-momentum)*running_var  + momentum*var_b*M/(M-1)   (unbiased, as PyTorch)
//   eval       mean, var from the running statistics
//   forward    out = (inp - mean) * invstd * gamma + beta,  invstd = 1/sqrt(var + eps)
//   backward   dbeta = sum dout, dgamma = sum dout*xhat, xhat = (inp - mean)*invstd
//              dinp = gamma*invstd * (dout - dbeta/M - xhat*dgamma/M)          (training mode)
//
// Every kernel is one workgroup per channel, so the channel's statistics and parameters are the
// same for all its invocations (one load each, not one per element), and each is one dispatch:
//   batch_norm_forward_train  statistics, then the normalised output in the same workgroup.
//                             Each thread runs Welford's update over its strided slice and the
//                             slices are merged (Chan et al.) by the reduce prelude's
//                             block_welford: one pass, and never the E[x^2]-E[x]^2 that cancels
//                             when |mean| >> std. RED_WG (256) invocations per channel.
//   batch_norm_forward_eval   the running statistics, then the output.
//   batch_norm_backward       dbeta, dgamma (a reduction), then dinp in the same workgroup.
// `stats` holds mean[C] then invstd[C]; the backward reuses them.
//
// --sync-bn (several MPI ranks, PyTorch's SyncBatchNorm) splits each pass where the ranks must
// agree on per-channel numbers; the host exchanges them between the halves (model::plan,
// dist::exchange_bn), and the halves share every line of arithmetic with the fused kernels:
//   batch_norm_forward_stats    this rank's (count, mean, M2) per channel into `welford` [3, C]
//   batch_norm_forward_apply    the merged (count, mean, M2) of every rank's batch, written back
//                               into `welford`, -> mean, invstd, running statistics, output
//   batch_norm_backward_sums    this rank's (count, sum g, sum g*(x - mean)) into `grad_sums`
//                               [3, C]; dbeta, dgamma of this rank's batch (averaged later with
//                               every other parameter gradient)
//   batch_norm_backward_input   the sums over every rank, written back into `grad_sums`, -> dinp
// On one rank, stats + apply give the forward_train's bits and sums + input the backward's
// (tests/kernels/batch_norm.rs); the fused kernels are what one process runs.
//
// The input, output and their gradients are `act` (f32 or f16, defined by the host per compiled
// variant); statistics, parameters, running estimates and every sum are f32 in both.
//
// Versions (lavapipe, senet bench; each ratio A/B in one run):
//   v1  several dispatches per pass (statistics, then output; reductions, then input gradient),
//       two-pass variance.
//   v2  one workgroup per channel, one dispatch per pass, one Welford pass merged pairwise:
//       BN time per w0.25 b32 step 34.6 -> 25 ms.
//   v3  a ReLU after a BN fused into it: two passes over the activation fewer, peak memory
//       40.7 -> 33.0 MiB (senet w0.25 b32).
//   v4  H*W as a pipeline constant (its divisions become multiply-shift): BN 1.25x.
//   v5  reductions over subgroups where the adapter has them (reduce preludes): no change
//       measurable on lavapipe (8-lane subgroups; w1 b128 step 20.1 -> 21.0 images/s beside
//       the build before, within run-to-run spread), for GPUs.
//   v6  `act` storage: f16 variant for --precision f16, f32 variant unchanged bit for bit.
//   v7  the split kernels for --sync-bn; the fused ones written over the same helper
//       functions, unchanged bit for bit (a training run's checkpoint compared byte for byte).
//   v8  the epilogues below (REMASK, POOL, BIAS, SE_IN, STATS_ONLY), each off by default:
//       the unfused kernels keep v7's arithmetic. Plan bytes per training step, base SENet w1
//       b128: 1,427.0 -> 965.7 MB with every fusion; not timed apart (the whole step: quiet
//       A/B in docs/performance.md, fused and unfused level on lavapipe).
//   v9  PARTIALS, the statistics from the convolution before (below); the input loop
//       moved into input_welford, the same arithmetic. cargo bench --bench bn_stats, one run:
//       the training forward 0.72-0.97x the time in 8 of 10 layer and precision pairs
//       (docs/runs/bn-stats-lavapipe/).
//   v10 SE_WGRAD, the SE block's weight gradients in the backward (below).
//   v11 (this) the sliced kernels for GPUs (--bn-split; at the end of this file); the one-pass
//       kernels' element loops moved into range functions (range_welford, apply_range,
//       range_grad_sums, input_grad_range) over [0, N*HW), the same arithmetic.
//   Tried, not kept: the element loops that write each value alone (the forward's output, the
//   backward's dinp) loading four values of a plane at a time from vec4 aliases of inp and dout
//   where H*W % 4 == 0 (the same values bit for bit). senet bench, --tune off, b128, alternated
//   with the build before, two rounds: batch-norm backward 96.7 / 140.4 -> 98.5 / 144.8 ms (base
//   SENet w0.25), forward 64.0 / 79.2 -> 86.6 / 104.0 ms (SE-ResNet-20): no gain on lavapipe, the
//   forward slower.
//
// Fused ReLU (override RELU = 1, for a BN whose only reader is a ReLU): the forward writes
// max(out, 0) straight into the ReLU's output, and the backward takes the ReLU's output gradient
// and masks it itself, g = dout * (relu_out > 0) — two passes over the activation fewer, the same
// numbers bit for bit as BN then ReLU.
//
// Three further epilogues of the fusion pass (`--fuse on`), each the same numbers bit for bit as
// the unfused layers (every value rounded to `act` where the unfused kernels store it):
//   REMASK = 1  the fused ReLU's backward mask recomputed from the input and the saved statistics
//               as the forward stored it, act(max(y, 0)) > 0, instead of read from `relu_out`:
//               one pass over the activation fewer.
//   POOL = 1    a max pool after the ReLU (with RELU = 1; geometry H, W, KH, KW, SH, SW, PH, PW,
//               OH, OW; window code shared with pool.wgsl in max_pool_window.wgsl): the forward writes the pooled output and its argmax (pool.wgsl's rule)
//               into `out` and `argmax` and never stores the normalised tensor; the backward
//               gathers the pooled gradient `dout` over the windows whose argmax is each element
//               (pool.wgsl's gather, rounded to `act` as its stored gradient), masked as REMASK.
//               Per pool: a write and a read of the full-size activation fewer in the forward,
//               and the pool's full-size gradient written and read again in the backward.
//   SE_IN = 1   the BN's output is read by an SE block alone whose fused `_add_relu` backward
//               leaves dx to it (se_block.wgsl, DEFER): `dout` is the shortcut's gradient g and
//               `se_grad` holds s[c] and dz[c] per sample; the gradient reaching the BN's output
//               is act(g * s[c] + dz[c]), the SE kernel's own expression and rounding, so the
//               SE's full-size dx is neither written nor read.
//   STATS_ONLY = 1  the training forward saves the statistics (and moves the running ones) but
//               writes no output: the SE block that alone reads it applies it as it loads each
//               value (se_block.wgsl, AFFINE_IN), so the full-size output is never stored.
//   PARTIALS = 1  the convolution before the BN wrote its output's statistics as it stored it
//               (conv2d.wgsl, `stats`): per block of p.partial_rows elements of a channel (the
//               GEMM rows of one invocation, or of a subgroup's: pixels of the batch in order)
//               the block's mean and M2. The training forward merges the blocks instead of
//               reading its input for them: thread t takes blocks t, t + RED_WG, … (Chan et al.),
//               then block_welford as before. The first pass over the input disappears; the
//               statistics are the same numbers summed in another order, so not bit for bit. A
//               block marked by the convolution (M2 < 0) sends the whole channel back to its input.
//   SE_WGRAD    with SE_IN, the entry point batch_norm_backward_se_wgrad: the SE block's weight
//               gradients are summed here too, workgroup c taking the SE's channel c
//               (se_weight_grad.wgsl, shared with se_block.wgsl's se_block_backward_weight, so the
//               same arithmetic bit for bit), and the SE block records no weight-gradient
//               dispatch: one dispatch fewer per such block.
//   BIAS = 1    the convolution before the BN has a bias: its gradient, the sum of dinp per
//               channel, is summed as dinp is written, in conv2d_backward_bias's order (thread t
//               takes elements t, t + RED_WG, …, then block_sum2), so that kernel's pass over
//               dinp disappears and the bits stay.

struct Params {
    n: u32, c: u32, partial_rows: u32, se_hidden: u32,
    eps: f32, momentum: f32, update_running: u32, se_bias: u32,
    // The sliced kernels (below): slices per channel and elements per slice.
    slices: u32, slice_len: u32, _pad0: u32, _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> inp: array<act>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_var: array<f32>;
@group(0) @binding(5) var<storage, read> stats_in: array<f32>;
@group(0) @binding(6) var<storage, read> gamma: array<f32>;
@group(0) @binding(7) var<storage, read> beta: array<f32>;
@group(0) @binding(8) var<storage, read_write> out: array<act>;
@group(0) @binding(9) var<storage, read> dout: array<act>;
@group(0) @binding(10) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(11) var<storage, read_write> dbeta: array<f32>;
// --sync-bn exchange buffers, [3, C] each: (count, mean, M2) and (count, sum g, sum g*(x - mean)).
@group(0) @binding(12) var<storage, read_write> welford: array<f32>;
@group(0) @binding(13) var<storage, read_write> grad_sums: array<f32>;
@group(0) @binding(14) var<storage, read_write> dinp: array<act>;
@group(0) @binding(15) var<storage, read> running_mean_in: array<f32>;
@group(0) @binding(16) var<storage, read> running_var_in: array<f32>;
@group(0) @binding(17) var<storage, read> relu_out: array<act>;
// POOL: the argmax of each pooled window (forward), read back in the backward; BIAS: the
// convolution bias gradient [C].
@group(0) @binding(18) var<storage, read_write> argmax: array<u32>;
@group(0) @binding(19) var<storage, read> argmax_in: array<u32>;
@group(0) @binding(20) var<storage, read_write> dbias: array<f32>;
// SE_IN: per sample s[c] then dz[c] of the SE block after the BN.
@group(0) @binding(21) var<storage, read> se_grad: array<f32>;
// PARTIALS: the convolution's per-block statistics, [blocks, C, 2] (mean, M2) (conv2d.wgsl's
// `stat_partial`), block b covering elements b * partial_rows .. of every channel.
@group(0) @binding(22) var<storage, read> stat_partial: array<f32>;
// SE_WGRAD: the SE block's saved forward values and per-sample gradients, and its weight
// gradients (se_weight_grad.wgsl's names; p.se_hidden hidden units, biases where p.se_bias).
@group(0) @binding(23) var<storage, read> saved_in: array<f32>;
@group(0) @binding(24) var<storage, read> dsaved_in: array<f32>;
@group(0) @binding(25) var<storage, read_write> dw1: array<f32>;
@group(0) @binding(26) var<storage, read_write> db1: array<f32>;
@group(0) @binding(27) var<storage, read_write> dw2: array<f32>;
@group(0) @binding(28) var<storage, read_write> db2: array<f32>;

// H*W is fixed per pipeline, so finding an element of a channel, e / HW and e % HW, costs a
// multiply and shift instead of lavapipe's per-lane software division (1.25x on the BN kernels);
// the batch size stays in `p`, so a last partial batch shares the pipelines.
override HW: u32 = 1u;
override RELU: u32 = 0u;      // 1: ReLU fused after the normalisation (see above)
override REMASK: u32 = 0u;    // 1: the ReLU's backward mask recomputed (see above)
override POOL: u32 = 0u;      // 1: max pool fused after the ReLU (see above)
override BIAS: u32 = 0u;      // 1: the convolution bias gradient summed in the backward
override SE_IN: u32 = 0u;     // 1: the gradient from the SE block after (see above)
override STATS_ONLY: u32 = 0u; // 1: no output written, the next layer applies it (see above)
override PARTIALS: u32 = 0u;  // 1: the statistics from the convolution before (see above)
// POOL's geometry (H, W with HW = H * W, KH, …, OW): max_pool_window.wgsl's overrides.

// Index of the e-th element of channel c, e in [0, N*HW).
fn chan_index(c: u32, e: u32) -> u32 {
    return ((e / HW) * p.c + c) * HW + e % HW;
}

// The stored output at element i, x * scale + shift (max(., 0) with the fused ReLU), rounded as
// `act` stores it (act_rounded, which a compiler cannot fold away as Mesa 26 folds f32(act(v))),
// in f32: written by the forward, recomputed bit for bit by the REMASK and POOL backward.
fn normalised(i: u32, mean: f32, scale: f32, b: f32) -> f32 {
    let y = (f32(inp[i]) - mean) * scale + b;
    if (RELU != 0u) {
        return act_rounded(max(y, 0.0));
    }
    return act_rounded(y);
}

// POOL: the value the fused pool sees at element i (max_pool_window.wgsl): the normalised, ReLU'd
// value as the unfused BN stores it, with the channel's (mean, scale, shift) in `pool_affine`.
fn pool_load(i: u32) -> f32 {
    return normalised(i, pool_affine.x, pool_affine.y, pool_affine.z);
}

// POOL: the pooled gradient gathered to element e of channel c (max_pool2d_backward's sum), rounded
// to `act` as that kernel stores it.
fn pooled_grad(c: u32, e: u32) -> f32 {
    return act_rounded(pool_gather((e / HW) * p.c + c, e % HW));
}

// The gradient reaching the normalisation's output at element e of channel c (mean and invstd
// its saved statistics, for a recomputed ReLU mask).
fn grad_at(c: u32, e: u32, mean: f32, invstd: f32) -> f32 {
    let i = chan_index(c, e);
    if (SE_IN != 0u) {
        let nn = e / HW;
        return act_rounded(f32(dout[i]) * se_grad[2u * nn * p.c + c] + se_grad[(2u * nn + 1u) * p.c + c]);
    }
    if (RELU != 0u && (REMASK != 0u || POOL != 0u)) {
        var g = 0.0;
        if (POOL != 0u) {
            g = pooled_grad(c, e);
        } else {
            g = f32(dout[i]);
        }
        return select(0.0, g, normalised(i, mean, invstd * gamma[c], beta[c]) > 0.0);
    }
    if (RELU != 0u) {
        return select(0.0, f32(dout[i]), f32(relu_out[i]) > 0.0);
    }
    return f32(dout[i]);
}

// POOL: the max pool over channel c of the normalised, ReLU'd values: `out` and `argmax` are
// [N, C, OH, OW]; windows scanned as pool.wgsl's max_pool2d_forward (max_pool_window.wgsl).
fn pool_channel(c: u32, t: u32, mean: f32, scale: f32, b: f32) {
    pool_affine = vec3<f32>(mean, scale, b);
    let ohw = OH * OW;
    let m = p.n * ohw;
    for (var e = t; e < m; e += RED_WG) {
        let plane = (e / ohw) * p.c + c;
        let r = e % ohw;
        let best = pool_window_max(plane * HW, r);
        out[plane * ohw + r] = act(best.value);
        argmax[plane * ohw + r] = best.index;
    }
}

// out = x * scale + shift over channel c (max(., 0) with the fused ReLU), or its max pool (POOL).
fn apply_channel(c: u32, t: u32, mean: f32, invstd: f32) {
    let scale = invstd * gamma[c];
    let b = beta[c];
    if (POOL != 0u) {
        pool_channel(c, t, mean, scale, b);
        return;
    }
    apply_range(c, t, 0u, p.n * HW, mean, scale, b);
}

// out = (x - mean) * scale + b over elements [lo, hi) of channel c, thread t taking lo + t, lo + t +
// RED_WG, …
fn apply_range(c: u32, t: u32, lo: u32, hi: u32, mean: f32, scale: f32, b: f32) {
    for (var e = lo + t; e < hi; e += RED_WG) {
        let i = chan_index(c, e);
        out[i] = act(normalised(i, mean, scale, b));
    }
}

// Thread t's Welford state (count, mean, M2) of channel c over its strided slice of the input.
fn input_welford(c: u32, t: u32) -> vec3<f32> {
    return range_welford(c, t, 0u, p.n * HW);
}

// Thread t's Welford state of channel c over elements lo + t, lo + t + RED_WG, … below hi.
fn range_welford(c: u32, t: u32, lo: u32, hi: u32) -> vec3<f32> {
    var k = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var e = lo + t; e < hi; e += RED_WG) {
        let x = f32(inp[chan_index(c, e)]);
        k += 1.0;
        let d = x - mean;
        mean += d / k;
        m2 += d * (x - mean);
    }
    return vec3<f32>(k, mean, m2);
}

// PARTIALS: thread t's merge (Chan et al.) of channel c's blocks t, t + RED_WG, … in order, and
// 1 in w if one of them is marked (M2 < 0: the convolution's lanes were numbered otherwise than
// it merges them over, conv2d.wgsl).
fn block_merge(c: u32, t: u32) -> vec4<f32> {
    let m = p.n * HW;
    let r = p.partial_rows;
    let blocks = (m + r - 1u) / r;
    var k = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    var marked = 0.0;
    for (var b = t; b < blocks; b += RED_WG) {
        let at = (b * p.c + c) * 2u;
        let m2b = stat_partial[at + 1u];
        if (m2b < 0.0) {
            marked = 1.0;
        }
        let kb = f32(min(r, m - b * r));
        let kn = k + kb;
        let d = stat_partial[at] - mean;
        mean += d * (kb / kn);
        m2 += m2b + d * d * (k * kb / kn);
        k = kn;
    }
    return vec4<f32>(k, mean, m2, marked);
}

// (count, mean, M2) of channel c over this workgroup's batch: each thread runs Welford's update
// over its strided slice (or with PARTIALS merges its blocks, unless any block of the channel is
// marked), then the slices are merged in a fixed tree.
fn channel_welford(c: u32, l: Lane) -> vec3<f32> {
    var from_input = PARTIALS == 0u;
    var w = vec3<f32>(0.0);
    if (PARTIALS != 0u) {
        let merged = block_merge(c, l.t);
        w = merged.xyz;
        from_input = block_sum2(vec2<f32>(merged.w, 0.0), l).x != 0.0;
    }
    if (from_input) {
        w = input_welford(c, l.t);
    }
    return block_welford(w, l);
}

// From the statistics of the normalised batch (count `m`, mean, M2 in `w`): invstd, saved with
// the mean by thread 0, which also moves the running estimates. Returns (mean, invstd).
fn finish_statistics(c: u32, t: u32, w: vec3<f32>, m: f32, m_minus_1: f32) -> vec2<f32> {
    let mu = w.y;
    let var_b = w.z / m;
    let invstd = 1.0 / sqrt(var_b + p.eps);
    if (t == 0u) {
        stats[c] = mu;
        stats[p.c + c] = invstd;
        if (p.update_running != 0u) {
            // m > 1 is checked on the host (PyTorch refuses training-mode BN on one value per channel).
            let var_u = w.z / m_minus_1;
            running_mean[c] = (1.0 - p.momentum) * running_mean[c] + p.momentum * mu;
            running_var[c] = (1.0 - p.momentum) * running_var[c] + p.momentum * var_u;
        }
    }
    return vec2<f32>(mu, invstd);
}

@compute @workgroup_size(RED_WG)
fn batch_norm_forward_train(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    let c = wid.x;
    let m = p.n * HW;
    let s = finish_statistics(c, l.t, channel_welford(c, l), f32(m), f32(m - 1u));
    if (STATS_ONLY == 0u) {
        apply_channel(c, l.t, s.x, s.y);
    }
}

// --sync-bn, first half of the forward: this rank's (count, mean, M2), for the host to merge.
@compute @workgroup_size(RED_WG)
fn batch_norm_forward_stats(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    let c = wid.x;
    let w = channel_welford(c, l);
    if (l.t == 0u) {
        welford[c] = w.x;
        welford[p.c + c] = w.y;
        welford[2u * p.c + c] = w.z;
    }
}

// --sync-bn, second half: normalise with the statistics merged over every rank's batch.
@compute @workgroup_size(RED_WG)
fn batch_norm_forward_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let c = wid.x;
    let w = vec3<f32>(welford[c], welford[p.c + c], welford[2u * p.c + c]);
    let s = finish_statistics(c, t, w, w.x, w.x - 1.0);
    apply_channel(c, t, s.x, s.y);
}

// Eval mode: the statistics come from the running estimates.
@compute @workgroup_size(RED_WG)
fn batch_norm_forward_eval(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let c = wid.x;
    let mean = running_mean_in[c];
    let invstd = 1.0 / sqrt(running_var_in[c] + p.eps);
    if (t == 0u) {
        stats[c] = mean;
        stats[p.c + c] = invstd;
    }
    apply_channel(c, t, mean, invstd);
}

// (sum g, sum g * (x - mean)) over channel c of this workgroup's batch.
fn channel_grad_sums(c: u32, l: Lane, mean: f32, invstd: f32) -> vec2<f32> {
    return block_sum2(range_grad_sums(c, l.t, 0u, p.n * HW, mean, invstd), l);
}

// Thread t's (sum g, sum g * (x - mean)) over elements lo + t, lo + t + RED_WG, … below hi.
fn range_grad_sums(c: u32, t: u32, lo: u32, hi: u32, mean: f32, invstd: f32) -> vec2<f32> {
    var sd = 0.0;
    var sdx = 0.0;
    for (var e = lo + t; e < hi; e += RED_WG) {
        let g = grad_at(c, e, mean, invstd);
        sd += g;
        sdx += g * (f32(inp[chan_index(c, e)]) - mean);
    }
    return vec2<f32>(sd, sdx);
}

// dinp = gamma * invstd * (g - dbeta/M - xhat * dgamma/M) over channel c, M = 1 / inv_m values;
// with BIAS, the sum of dinp into dbias[c].
fn input_grad_channel(c: u32, l: Lane, mean: f32, invstd: f32, dbeta_c: f32, dgamma_c: f32, inv_m: f32) {
    let sb = input_grad_range(c, l.t, 0u, p.n * HW, mean, invstd, dbeta_c, dgamma_c, inv_m);
    if (BIAS != 0u) {
        let s = block_sum2(vec2<f32>(sb, 0.0), l);
        if (l.t == 0u) {
            dbias[c] = s.x;
        }
    }
}

// dinp over elements lo + t, lo + t + RED_WG, … below hi of channel c; returns thread t's sum of
// the values it wrote.
fn input_grad_range(c: u32, t: u32, lo: u32, hi: u32, mean: f32, invstd: f32, dbeta_c: f32, dgamma_c: f32, inv_m: f32) -> f32 {
    let k = gamma[c] * invstd;
    let db_m = dbeta_c * inv_m;
    let dg_m = dgamma_c * inv_m;
    var sb = 0.0;
    for (var e = lo + t; e < hi; e += RED_WG) {
        let i = chan_index(c, e);
        let xhat = (f32(inp[i]) - mean) * invstd;
        let d = act_rounded(k * (grad_at(c, e, mean, invstd) - db_m - xhat * dg_m));
        dinp[i] = act(d);
        sb += d;
    }
    return sb;
}

// dbeta = sum g, dgamma = sum g * xhat over the channel, then
// dinp = gamma * invstd * (g - dbeta/M - xhat * dgamma/M).
@compute @workgroup_size(RED_WG)
fn batch_norm_backward(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    backward_channel(wid.x, lane_of(lanes, RED_WG));
}

// SE_WGRAD: batch_norm_backward, then the SE block's weight gradients of channel c, its
// 2 * ceil(hidden / 4) blocks of hidden units. An entry point of its own, so that the plain one
// binds no more storage buffers than before: this one binds 18, beyond a GL adapter's 16, and the
// plan runs it only where the adapter allows them.
@compute @workgroup_size(RED_WG)
fn batch_norm_backward_se_wgrad(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    let c = wid.x;
    backward_channel(c, l);
    for (var jb = l.t; jb < 2u * ((p.se_hidden + 3u) / 4u); jb += RED_WG) {
        se_weight_grad_block(c, jb, p.n, p.c, p.se_hidden, p.se_bias != 0u);
    }
}

fn backward_channel(c: u32, l: Lane) {
    let m = p.n * HW;
    let mean = stats_in[c];
    let invstd = stats_in[p.c + c];
    let sums = channel_grad_sums(c, l, mean, invstd);
    let dbeta_c = sums.x;
    let dgamma_c = sums.y * invstd;
    if (l.t == 0u) {
        dbeta[c] = dbeta_c;
        dgamma[c] = dgamma_c;
    }
    input_grad_channel(c, l, mean, invstd, dbeta_c, dgamma_c, 1.0 / f32(m));
}

// --sync-bn, first half of the backward: this rank's dbeta and dgamma (parameter gradients, which
// the gradient all-reduce averages) and its (count, sum g, sum g*(x - mean)) for the host to sum.
@compute @workgroup_size(RED_WG)
fn batch_norm_backward_sums(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    let c = wid.x;
    let mean = stats_in[c];
    let invstd = stats_in[p.c + c];
    let sums = channel_grad_sums(c, l, mean, invstd);
    if (l.t == 0u) {
        dbeta[c] = sums.x;
        dgamma[c] = sums.y * invstd;
        grad_sums[c] = f32(p.n * HW);
        grad_sums[p.c + c] = sums.x;
        grad_sums[2u * p.c + c] = sums.y;
    }
}

// --sync-bn, second half: the input gradient through the statistics of every rank's batch, from
// the sums over every rank (SyncBatchNorm's backward).
@compute @workgroup_size(RED_WG)
fn batch_norm_backward_input(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    let c = wid.x;
    let mean = stats_in[c];
    let invstd = stats_in[p.c + c];
    let dgamma_c = grad_sums[2u * p.c + c] * invstd;
    input_grad_channel(c, l, mean, invstd, grad_sums[p.c + c], dgamma_c, 1.0 / grad_sums[c]);
}

// ---------------------------------------------------------------------------------------------
// Sliced (--bn-split on; meant for GPU adapters, not yet measured on one): each channel's N*HW elements in p.slices slices of
// p.slice_len, a workgroup per (channel, slice) — grid [C, slices] — where the kernels above have
// one workgroup per channel, too few to fill a GPU when C is small and H*W large. Two dispatches
// each way, the slices' partial sums in `welford` / `grad_sums` ([slices, 3, C] / [slices, 2, C])
// merged by every workgroup of the second in slice order; the per-element code is the one-pass
// kernels' (range_welford, apply_range, range_grad_sums, input_grad_range), the sums taken in
// another order, so not bit for bit the one-pass kernels. Epilogues: RELU, REMASK, SE_IN,
// STATS_ONLY and SE_WGRAD; a pool, a bias gradient or the convolution's statistics keep the
// one-pass kernels (host: ops::batch_norm::slices_for).

// Elements [x, y) of channel slice s.
fn slice_range(s: u32) -> vec2<u32> {
    let m = p.n * HW;
    let lo = min(s * p.slice_len, m);
    return vec2<u32>(lo, min(lo + p.slice_len, m));
}

// (count, mean, M2) of a and b together (Chan et al.); b may be empty.
fn merge_slice(a: vec3<f32>, b: vec3<f32>) -> vec3<f32> {
    let kn = a.x + b.x;
    if (b.x == 0.0) {
        return a;
    }
    let d = b.y - a.y;
    return vec3<f32>(kn, a.y + d * (b.x / kn), a.z + (b.z + d * d * (a.x * b.x / kn)));
}

// The training forward's first half: slice wid.y's (count, mean, M2) of channel wid.x.
@compute @workgroup_size(RED_WG)
fn batch_norm_forward_slices(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    let c = wid.x;
    let s = wid.y;
    let r = slice_range(s);
    let w = block_welford(range_welford(c, l.t, r.x, r.y), l);
    if (l.t == 0u) {
        let at = 3u * s * p.c + c;
        welford[at] = w.x;
        welford[at + p.c] = w.y;
        welford[at + 2u * p.c] = w.z;
    }
}

// Second half: the slices merged in order, the statistics saved and the running ones moved (by
// slice 0), then slice wid.y normalised (none with STATS_ONLY, whose grid has one slice).
@compute @workgroup_size(RED_WG)
fn batch_norm_forward_slices_apply(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let c = wid.x;
    let s = wid.y;
    var w = vec3<f32>(0.0);
    for (var k = 0u; k < p.slices; k++) {
        let at = 3u * k * p.c + c;
        w = merge_slice(w, vec3<f32>(welford[at], welford[at + p.c], welford[at + 2u * p.c]));
    }
    let m = p.n * HW;
    // finish_statistics writes from its thread 0: here thread 0 of slice 0.
    let st = finish_statistics(c, t + s * RED_WG, w, f32(m), f32(m - 1u));
    if (STATS_ONLY == 0u) {
        let r = slice_range(s);
        apply_range(c, t, r.x, r.y, st.x, st.y * gamma[c], beta[c]);
    }
}

// The backward's first half: slice wid.y's (sum g, sum g * (x - mean)) of channel wid.x.
@compute @workgroup_size(RED_WG)
fn batch_norm_backward_slices(@builtin(workgroup_id) wid: vec3<u32>, lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    let c = wid.x;
    let s = wid.y;
    let r = slice_range(s);
    let sums = block_sum2(range_grad_sums(c, l.t, r.x, r.y, stats_in[c], stats_in[p.c + c]), l);
    if (l.t == 0u) {
        grad_sums[2u * s * p.c + c] = sums.x;
        grad_sums[(2u * s + 1u) * p.c + c] = sums.y;
    }
}

// Second half: the slices' sums added in order, dbeta and dgamma written (by slice 0), then
// slice s's dinp.
fn backward_slice_input(c: u32, s: u32, t: u32) {
    let mean = stats_in[c];
    let invstd = stats_in[p.c + c];
    var sd = 0.0;
    var sdx = 0.0;
    for (var k = 0u; k < p.slices; k++) {
        sd += grad_sums[2u * k * p.c + c];
        sdx += grad_sums[(2u * k + 1u) * p.c + c];
    }
    let dgamma_c = sdx * invstd;
    if (s == 0u && t == 0u) {
        dbeta[c] = sd;
        dgamma[c] = dgamma_c;
    }
    let r = slice_range(s);
    _ = input_grad_range(c, t, r.x, r.y, mean, invstd, sd, dgamma_c, 1.0 / f32(p.n * HW));
}

@compute @workgroup_size(RED_WG)
fn batch_norm_backward_slices_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    backward_slice_input(wid.x, wid.y, t);
}

// SE_WGRAD: as batch_norm_backward_se_wgrad, slice 0's workgroup of channel c also sums the SE
// block's weight gradients of its channel.
@compute @workgroup_size(RED_WG)
fn batch_norm_backward_slices_input_se_wgrad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) t: u32) {
    let c = wid.x;
    backward_slice_input(c, wid.y, t);
    if (wid.y == 0u) {
        for (var jb = t; jb < 2u * ((p.se_hidden + 3u) / 4u); jb += RED_WG) {
            se_weight_grad_block(c, jb, p.n, p.c, p.se_hidden, p.se_bias != 0u);
        }
    }
}
