//! grad_scaler oracle: one step of `torch.amp.GradScaler` (unscale_'s inf/NaN check, then
//! update()), on the host.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

/// The scaler's state between steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scaler {
    pub scale: f64,
    pub tracker: u32,
    /// Optimizer steps taken (finite steps).
    pub steps: u32,
    pub skipped: u32,
}

/// The state after a step whose scaled gradients are `grads`, and whether the step was skipped.
/// `growth` = (growth factor, growth interval), `backoff` the backoff factor.
pub fn grad_scaler_step(s: Scaler, grads: &[f64], growth: (f64, u32), backoff: f64) -> (Scaler, bool) {
    // torch's check: the scaled gradients, as f32 values, before they are unscaled.
    let found_inf = grads.iter().any(|&g| !(g as f32).is_finite());
    if found_inf {
        return (Scaler { scale: s.scale * backoff, tracker: 0, skipped: s.skipped + 1, ..s }, true);
    }
    let tracker = s.tracker + 1;
    // torch grows the scale only to a finite value (f32).
    let grown = s.scale * growth.0;
    let (scale, tracker) = match tracker >= growth.1 {
        true if (grown as f32).is_finite() => (grown, 0),
        true => (s.scale, 0),
        false => (s.scale, tracker),
    };
    (Scaler { scale, tracker, steps: s.steps + 1, skipped: s.skipped }, false)
}
