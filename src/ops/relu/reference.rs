//! relu oracle.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

pub fn relu_forward(inp: &[f64]) -> Vec<f64> {
    inp.iter().map(|&x| x.max(0.0)).collect()
}

/// The gradient passes where the forward's output is positive (0 at exactly 0, as PyTorch).
pub fn relu_backward(out: &[f64], dout: &[f64]) -> Vec<f64> {
    out.iter().zip(dout).map(|(&y, &g)| if y > 0.0 { g } else { 0.0 }).collect()
}
