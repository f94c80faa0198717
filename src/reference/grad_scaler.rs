//! grad_scaler oracle: one step of `torch.amp.GradScaler` (unscale_'s inf/NaN check, then
//! update()), on the host.

/// The scaler's state between steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scaler {
    pub scale: f64,
    pub tracker: u32,
    /// Optimizer steps taken (finite steps).
    pub steps: u64,
    pub skipped: u64,
}

/// The state after a step whose scaled gradients are `grads`, and whether the step was skipped.
/// `growth` = (growth factor, growth interval), `backoff` the backoff factor.
pub fn grad_scaler_step(s: Scaler, grads: &[f64], growth: (f64, u32), backoff: f64) -> (Scaler, bool) {
    // unscale_: each gradient times the f32 reciprocal of the scale, in f32, as PyTorch.
    let inv = 1.0 / s.scale as f32;
    let found_inf = grads.iter().any(|&g| !((g as f32) * inv).is_finite());
    if found_inf {
        return (Scaler { scale: s.scale * backoff, tracker: 0, skipped: s.skipped + 1, ..s }, true);
    }
    let tracker = s.tracker + 1;
    let (scale, tracker) = if tracker >= growth.1 { (s.scale * growth.0, 0) } else { (s.scale, tracker) };
    (Scaler { scale, tracker, steps: s.steps + 1, skipped: s.skipped }, false)
}
