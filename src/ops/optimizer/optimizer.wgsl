// optimizer: parameter updates exactly as torch.optim (single-tensor path), elementwise over
// [offset, offset + len) of flat parameter / gradient / state buffers.
//
//   adam_step   g = grad (+ wd*param if L2, Adam);  param *= (1 - lr*wd) first if decoupled (AdamW)
//               m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g
//               param -= step_size * m / (sqrt(v)/bc2_sqrt + eps)
//               step_size = lr/(1-beta1^t) and bc2_sqrt = sqrt(1-beta2^t) come from the host,
//               computed in f64 as PyTorch computes them in Python floats.
//   sgd_step    g = grad + wd*param;  buf = g on the first step, else momentum*buf + (1-dampening)*g
//               g = g + momentum*buf if nesterov else buf;  param -= lr*g   (momentum 0: plain SGD)
//
// SCALED (f16 plans, after grad_scaler.wgsl): a step whose gradients overflowed is skipped whole
// (found_inf, scaler[2]); otherwise each gradient is first multiplied by scaler[1] = 1/scale, and
// the step count t = scaler[4] (finite steps only) gives Adam's bias corrections, computed here
// (the host cannot know t without a read-back) as 1 - beta^t = -expm1(t * ln(beta)) with ln(beta)
// from the host in f64: f32 pow (exp2(t*log2(beta)), log2 good to 2^-21 absolute on Vulkan) would
// cancel in 1 - 0.999^t and lose 3e-4 relative, the expm1 form keeps ~1e-7. SGD's first step is
// t = 1. Unscaled plans never read `scaler`.

// Versions:
//   v1  one dispatch per parameter (SE-ResNet-152: ~470 per step).
//   v2  parameters, gradients and state each in one flat buffer: one dispatch per step (one per
//       binding-sized chunk past the adapter's largest binding).
//   v3  (this) SCALED for f16 plans (reads the loss scaler's state).
//
// Every scalar that PyTorch computes in Python floats (1 - beta, 1 - lr*wd, the bias corrections)
// is computed by the host in f64 and rounded once to f32, as PyTorch hands it to its f32 kernel.
struct AdamParams {
    offset: u32, len: u32, decoupled: u32, _pad0: u32,
    one_minus_beta1: f32, beta2: f32, one_minus_beta2: f32, eps: f32,
    weight_decay: f32, decay_factor: f32, step_size: f32, bc2_sqrt: f32,
    lr: f32, ln_beta1: f32, ln_beta2: f32, _pad1: f32,
}

struct SgdParams {
    offset: u32, len: u32, nesterov: u32, first_step: u32,
    lr: f32, momentum: f32, one_minus_dampening: f32, weight_decay: f32,
}

@group(0) @binding(0) var<uniform> pa: AdamParams;
@group(0) @binding(0) var<uniform> ps: SgdParams;  // binding 0 too: each entry point uses one
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(5) var<storage, read_write> exp_avg_sq: array<f32>;
@group(0) @binding(6) var<storage, read_write> momentum_buf: array<f32>;
@group(0) @binding(7) var<storage, read> scaler: array<f32>;

override WG: u32 = 256u;
override SCALED: bool = false;

// e^x - 1 without cancellation near 0: Taylor to x^8 for |x| < 0.5 (truncation < 1e-8 relative).
fn expm1(x: f32) -> f32 {
    if (abs(x) < 0.5) {
        let p = 1.0 / 120.0 + x * (1.0 / 720.0 + x * (1.0 / 5040.0 + x * (1.0 / 40320.0)));
        return x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * p))));
    }
    return exp(x) - 1.0;
}

// torch.lerp's formula, so m matches PyTorch to the ulp.
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if (w < 0.5) {
        return a + w * (b - a);
    }
    return b - (b - a) * (1.0 - w);
}

@compute @workgroup_size(WG)
fn adam_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= pa.len) {
        return;
    }
    let i = pa.offset + e;
    var step_size = pa.step_size;
    var bc2_sqrt = pa.bc2_sqrt;
    var w = param[i];
    var g = grad[i];
    if (SCALED) {
        if (scaler[2] != 0.0) {
            return;
        }
        g = g * scaler[1];
        // The step count is a u32 bit pattern (grad_scaler.wgsl).
        let t = f32(bitcast<u32>(scaler[4]));
        step_size = pa.lr / -expm1(t * pa.ln_beta1);
        bc2_sqrt = sqrt(-expm1(t * pa.ln_beta2));
    }
    if (pa.weight_decay != 0.0) {
        if (pa.decoupled != 0u) {
            w = w * pa.decay_factor;
        } else {
            g = g + pa.weight_decay * w;
        }
    }
    let m = lerp(exp_avg[i], g, pa.one_minus_beta1);
    let v = exp_avg_sq[i] * pa.beta2 + pa.one_minus_beta2 * (g * g);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    let denom = sqrt(v) / bc2_sqrt + pa.eps;
    param[i] = w - step_size * (m / denom);
}

@compute @workgroup_size(WG)
fn sgd_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = gid.x + gid.y * nwg.x * WG;
    if (e >= ps.len) {
        return;
    }
    let i = ps.offset + e;
    let w = param[i];
    var g = grad[i];
    var first = ps.first_step != 0u;
    if (SCALED) {
        if (scaler[2] != 0.0) {
            return;
        }
        g = g * scaler[1];
        first = bitcast<u32>(scaler[4]) == 1u;
    }
    if (ps.weight_decay != 0.0) {
        g = g + ps.weight_decay * w;
    }
    if (ps.momentum != 0.0) {
        var b = g;
        if (!first) {
            b = momentum_buf[i] * ps.momentum + ps.one_minus_dampening * g;
        }
        momentum_buf[i] = b;
        if (ps.nesterov != 0u) {
            g = g + ps.momentum * b;
        } else {
            g = b;
        }
    }
    param[i] = w - ps.lr * g;
}
