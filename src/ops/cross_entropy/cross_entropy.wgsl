// cross_entropy: softmax cross-entropy over logits [N, K] with integer targets, mean over the batch
// (torch.nn.CrossEntropyLoss defaults), fused with its gradient and the count of correct predictions.
//
//   cross_entropy_forward_backward  one invocation per sample:
//       lse = max + log(sum_k exp(l_k - max))            (stable: no exp of a large number)
//       loss[n] = lse - (1 - e) l[target] - e/K sum_k l_k;  dlogits[n, k] = (softmax_k - q_k) / N
//           with label smoothing e (torch's label_smoothing): q = (1 - e) onehot(target) + e/K
//       correct[n] = argmax_k l == target (first maximum wins, as torch.argmax)
//       correct5[n] = the target ranks in the top 5: fewer than 5 logits rank above it (greater, or
//           equal at a lower index: the tie rule argmax uses, so top-1 is this with 1)
//       per_sample[n] = (loss, correct, argmax, correct5) for evaluation's confusion matrix
//   cross_entropy_forward_backward_reduce  both in one workgroup (`--fuse on`; see below)
//   cross_entropy_reduce  one workgroup (the reduce prelude's block_sum2): the batch mean loss and correct count into result[0..2],
//       and adds loss sum, correct and N to the running metrics result[2..5] (read back every N steps),
//       and the top-5 count to result[5].
//
// Logits and their gradient are `act` (f32 or f16, defined by the host per compiled variant); the
// softmax and the loss are f32. With SCALED (f16 plans) the gradient is multiplied by the loss
// scale, scaler[0] (see grad_scaler.wgsl), so that small gradients survive f16 on the way back;
// the optimizer divides it out. Unscaled plans multiply by nothing at all.
//
// Versions: v1 the loss, gradient and correct count fused in one invocation per sample and a
// fixed-order reduce; v2 the reduce over subgroups where there are subgroups (no change measurable
// on lavapipe: a few µs per step); v3 `act` logits and the loss scale for f16 plans, label
// smoothing and the top-5 count; v4 the loss weight of gradient accumulation, and soft
// targets (cross_entropy_soft_forward_backward); v5 (this) the rows and their reduce in one
// workgroup under `--fuse on` (cross_entropy_forward_backward_reduce, below): the rows as
// functions shared by both forms, the two passes' bits, one dispatch fewer. Not timed (a few µs
// of a step on lavapipe).

struct Params {
    n: u32, k: u32, smoothing: f32, weight: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<act>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read_write> dlogits: array<act>;
@group(0) @binding(4) var<storage, read_write> per_sample: array<f32>;
@group(0) @binding(5) var<storage, read> per_sample_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> result: array<f32>;
@group(0) @binding(7) var<storage, read> scaler: array<f32>;
@group(0) @binding(8) var<storage, read> soft_targets: array<f32>;

override WG: u32 = 64u;
override SCALED: bool = false;

@compute @workgroup_size(WG)
fn cross_entropy_forward_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < p.n) {
        hard_row(gid.x);
    }
}

// Sample n against its label: dlogits' row and per_sample's, which it also returns.
fn hard_row(n: u32) -> vec4<f32> {
    let b = n * p.k;
    var mx = f32(logits[b]);
    var arg = 0u;
    for (var k = 1u; k < p.k; k++) {
        let v = f32(logits[b + k]);
        if (v > mx) {
            mx = v;
            arg = k;
        }
    }
    var sum = 0.0;
    var sum_l = 0.0;
    for (var k = 0u; k < p.k; k++) {
        sum += exp(f32(logits[b + k]) - mx);
        sum_l += f32(logits[b + k]);
    }
    let e = p.smoothing;
    let e_k = e / f32(p.k);
    let t = labels[n];
    let lse = mx + log(sum);
    // weight: 1, or 1/N of a micro-batch of --grad-accum-steps N (timm divides the loss by N).
    let inv_n = p.weight / f32(p.n);
    for (var k = 0u; k < p.k; k++) {
        let sm = exp(f32(logits[b + k]) - mx) / sum;
        var g = (sm - select(0.0, 1.0 - e, k == t) - e_k) * inv_n;
        if (SCALED) {
            g *= scaler[0];
        }
        dlogits[b + k] = act(g);
    }
    let lt = f32(logits[b + t]);
    var above = 0u;
    for (var k = 0u; k < p.k; k++) {
        let v = f32(logits[b + k]);
        above += select(0u, 1u, v > lt || (v == lt && k < t));
    }
    let row = vec4<f32>(lse - (1.0 - e) * lt - e_k * sum_l, select(0.0, 1.0, arg == t), f32(arg), select(0.0, 1.0, above < 5u));
    store_row(n, row);
    return row;
}

fn store_row(n: u32, row: vec4<f32>) {
    per_sample[4u * n] = row.x;
    per_sample[4u * n + 1u] = row.y;
    per_sample[4u * n + 2u] = row.z;
    per_sample[4u * n + 3u] = row.w;
}

// Soft targets (timm's SoftTargetCrossEntropy, the loss under Mixup/CutMix): row n of soft_targets
// [N, K] is a distribution t; loss = sum_k t_k (lse - l_k), dlogits = (softmax * sum_k t_k - t) * weight / N
// (times the loss scale with SCALED); correct, correct5 and the prediction are taken against the
// target's dominant class (its first maximum) as the label. Smoothing is already in t.
@compute @workgroup_size(WG)
fn cross_entropy_soft_forward_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x < p.n) {
        soft_row(gid.x);
    }
}

// Sample n against its soft target: dlogits' row and per_sample's, which it also returns.
fn soft_row(n: u32) -> vec4<f32> {
    let b = n * p.k;
    var mx = f32(logits[b]);
    var arg = 0u;
    var tmx = soft_targets[b];
    var label = 0u;
    for (var k = 1u; k < p.k; k++) {
        let v = f32(logits[b + k]);
        if (v > mx) {
            mx = v;
            arg = k;
        }
        if (soft_targets[b + k] > tmx) {
            tmx = soft_targets[b + k];
            label = k;
        }
    }
    var sum = 0.0;
    var tsum = 0.0;
    var tl = 0.0;
    for (var k = 0u; k < p.k; k++) {
        sum += exp(f32(logits[b + k]) - mx);
        tsum += soft_targets[b + k];
        tl += soft_targets[b + k] * f32(logits[b + k]);
    }
    let lse = mx + log(sum);
    let inv_n = p.weight / f32(p.n);
    for (var k = 0u; k < p.k; k++) {
        let sm = exp(f32(logits[b + k]) - mx) / sum;
        var g = (sm * tsum - soft_targets[b + k]) * inv_n;
        if (SCALED) {
            g *= scaler[0];
        }
        dlogits[b + k] = act(g);
    }
    let lt = f32(logits[b + label]);
    var above = 0u;
    for (var k = 0u; k < p.k; k++) {
        let v = f32(logits[b + k]);
        above += select(0u, 1u, v > lt || (v == lt && k < label));
    }
    let row = vec4<f32>(lse * tsum - tl, select(0.0, 1.0, arg == label), f32(arg), select(0.0, 1.0, above < 5u));
    store_row(n, row);
    return row;
}

@compute @workgroup_size(RED_WG)
fn cross_entropy_reduce(lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    var loss = 0.0;
    var correct = 0.0;
    var correct5 = 0.0;
    for (var n = l.t; n < p.n; n += RED_WG) {
        loss += per_sample_in[4u * n];
        correct += per_sample_in[4u * n + 1u];
        correct5 += per_sample_in[4u * n + 3u];
    }
    reduce_rows(vec3<f32>(loss, correct, correct5), l);
}

// The rows and their reduce in one workgroup (`--fuse on`): invocation t takes samples t,
// t + RED_WG, … as cross_entropy_reduce reads them and keeps their sums as it writes each row,
// so the results are the two passes' bit for bit, with per_sample written and never read back
// (where both pipelines get the same subgroup size, as on lavapipe: a driver that picks the width
// per pipeline may group the block sums differently — the metrics' last bits, never a gradient).
// SOFT picks the soft-target row. One dispatch instead of two; the rows run RED_WG at a time
// (the separate pass runs them all at once), which only a batch of thousands would feel.
override SOFT: bool = false;

@compute @workgroup_size(RED_WG)
fn cross_entropy_forward_backward_reduce(lanes: Lanes) {
    let l = lane_of(lanes, RED_WG);
    var loss = 0.0;
    var correct = 0.0;
    var correct5 = 0.0;
    for (var n = l.t; n < p.n; n += RED_WG) {
        var row: vec4<f32>;
        if (SOFT) {
            row = soft_row(n);
        } else {
            row = hard_row(n);
        }
        loss += row.x;
        correct += row.y;
        correct5 += row.w;
    }
    reduce_rows(vec3<f32>(loss, correct, correct5), l);
}

// Each invocation's partial sums of the loss, the correct and the top-5 counts into `result`.
fn reduce_rows(part: vec3<f32>, l: Lane) {
    let loss = part.x;
    let correct = part.y;
    let correct5 = part.z;
    let sums = block_sum2(vec2<f32>(loss, correct), l);
    let top5 = block_sum2(vec2<f32>(correct5, 0.0), l);
    if (l.t == 0u) {
        result[0] = sums.x / f32(p.n);
        result[1] = sums.y;
        // An f16 plan's batch whose forward overflowed f16 (an inf or NaN loss) is a step the loss
        // scaler skips: it stays out of the running sums, as torch AMP's skipped steps do.
        let skipped = SCALED && (bitcast<u32>(sums.x) & 0x7f800000u) == 0x7f800000u;
        if (!skipped) {
            result[2] += sums.x;
            result[3] += sums.y;
            result[4] += f32(p.n);
            result[5] += top5.x;
        }
    }
}
