//! clip_grad_norm oracle: `torch.nn.utils.clip_grad_norm_(parameters, max_norm)` with its
//! defaults (norm_type 2, error_if_nonfinite False), in f64.
//!
//! torch (torch/nn/utils/clip_grad.py): total_norm = the 2-norm of the per-tensor 2-norms, which
//! is the 2-norm of every gradient element together; clip_coef = max_norm / (total_norm + 1e-6);
//! clip_coef_clamped = clamp(clip_coef, max=1.0); every gradient is multiplied by it (also when
//! it is 1). Returns total_norm, measured before clipping.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

/// Clip `grads` (every parameter's gradient) in place; returns the total norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f64]], max_norm: f64) -> f64 {
    let total_norm = grads.iter().flat_map(|g| g.iter()).map(|g| g * g).sum::<f64>().sqrt();
    let coef = clip_coef(total_norm, max_norm);
    for g in grads.iter_mut().flat_map(|g| g.iter_mut()) {
        *g *= coef;
    }
    total_norm
}

/// The factor every gradient is multiplied by: min(max_norm / (total_norm + 1e-6), 1).
pub fn clip_coef(total_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}
