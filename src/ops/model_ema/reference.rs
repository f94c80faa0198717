//! model_ema oracle: timm's `ModelEmaV3` (timm/utils/model_ema.py) — the decay of an update and
//! the update itself, `torch._foreach_lerp_(ema, model, 1 - decay)` over every floating-point
//! entry of the state dict (parameters and batch-norm running statistics); integer entries
//! (`num_batches_tracked`) are copied.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

/// `ModelEmaV3.get_decay(step)` with timm's defaults (`update_after_step` 0, `min_decay` 0,
/// `warmup_gamma` 1, `warmup_power` 2/3): 0 on the first update (`step` 1: the EMA starts as a
/// copy of the model), then `decay`, or with `warmup` 1 - (1 + s)^(-2/3) capped at `decay`,
/// where s = step - 1. train.py passes the number of optimizer updates so far, this one included.
pub fn ema_decay(decay: f64, warmup: bool, step: u64) -> f64 {
    let s = step.saturating_sub(1);
    if s == 0 {
        return 0.0;
    }
    if warmup {
        let d = 1.0 - (1.0 + s as f64).powf(-2.0 / 3.0);
        d.min(decay).max(0.0)
    } else {
        decay
    }
}

/// torch's lerp (aten/src/ATen/native/Lerp.h): exact at both ends.
pub fn lerp(s: f64, e: f64, w: f64) -> f64 {
    if w.abs() < 0.5 { s + w * (e - s) } else { e - (e - s) * (1.0 - w) }
}

/// `model_ema_step`: ema = lerp(ema, model, weight), weight = 1 - decay.
pub fn model_ema_step(model: &[f64], ema: &mut [f64], weight: f64) {
    for (e, m) in ema.iter_mut().zip(model) {
        *e = lerp(*e, *m, weight);
    }
}
