// model_ema: timm's ModelEmaV3 update, ema = lerp(ema, model, weight) with weight = 1 - decay, over
// the flat parameter buffer and the flat batch-norm buffer (running means and variances) at once:
//
//   model_ema_step   i < len_a:          ema_a[i] = lerp(ema_a[i], model_a[i], w)   (parameters)
//                    len_a <= i < +len_b: ema_b[j] = lerp(ema_b[j], model_b[j], w)   (BN buffers)
//
// lerp as torch's (aten/src/ATen/native/Lerp.h, the f32 opmath of _foreach_lerp_):
//   w < 0.5:  self + w * (end - self)        else:  end - (end - self) * (1 - w)
// so w = 1 (timm's first update, decay 0) copies the model exactly. The decay (with --model-ema-warmup
// 1 - (1 + step)^(-2/3), capped at --model-ema-decay) is computed by the host in f64 per update, as
// timm computes it in Python floats, and rounded once to f32; 1 - w is computed here in f32, as torch.
//
// Versions: v1 (this) one dispatch per step (per binding-sized chunk of parameters past the
// adapter's largest binding; the BN buffers ride with the first), one invocation per element.

struct Params {
    len_a: u32, len_b: u32, _pad0: u32, _pad1: u32,
    weight: f32, _pad2: f32, _pad3: f32, _pad4: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> model_a: array<f32>;
@group(0) @binding(2) var<storage, read_write> ema_a: array<f32>;
@group(0) @binding(3) var<storage, read> model_b: array<f32>;
@group(0) @binding(4) var<storage, read_write> ema_b: array<f32>;

override WG: u32 = 256u;

fn lerp(s: f32, e: f32, w: f32) -> f32 {
    if (abs(w) < 0.5) {
        return s + w * (e - s);
    }
    return e - (e - s) * (1.0 - w);
}

@compute @workgroup_size(WG)
fn model_ema_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i < p.len_a) {
        ema_a[i] = lerp(ema_a[i], model_a[i], p.weight);
    } else if (i < p.len_a + p.len_b) {
        let j = i - p.len_a;
        ema_b[j] = lerp(ema_b[j], model_b[j], p.weight);
    }
}
