//! add oracle: out = a + b; da = db = dout.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

pub fn add_forward(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// (da, db)
pub fn add_backward(dout: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (dout.to_vec(), dout.to_vec())
}
