//! grad_accum oracle: gradient accumulation as PyTorch does it when `backward()` runs N times
//! before `optimizer.step()` — `.grad` is the first micro-batch's gradient, and each later
//! backward adds its own to it, in order. The names are the kernel's entry points.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

/// `grad_accum_store`: accum = grad.
pub fn grad_accum_store(grad: &[f64], accum: &mut [f64]) {
    accum.copy_from_slice(grad);
}

/// `grad_accum_add`: accum = accum + grad.
pub fn grad_accum_add(grad: &[f64], accum: &mut [f64]) {
    for (a, g) in accum.iter_mut().zip(grad) {
        *a += g;
    }
}

/// `grad_accum_finish`: grad = accum + grad.
pub fn grad_accum_finish(grad: &mut [f64], accum: &[f64]) {
    for (g, a) in grad.iter_mut().zip(accum) {
        *g += a;
    }
}
