//! add oracle: out = a + b; da = db = dout. With the ReLU after it fused in (`add_*_relu`):
//! out = relu(a + b); da = db = dout * [out > 0] (the gradient at exactly 0 is 0, as PyTorch's).

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

pub fn add_forward(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// (da, db)
pub fn add_backward(dout: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (dout.to_vec(), dout.to_vec())
}

/// relu(a + b)
pub fn add_forward_relu(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| (x + y).max(0.0)).collect()
}

/// (da, db) of relu(a + b), from its output `out`.
pub fn add_backward_relu(out: &[f64], dout: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let g: Vec<f64> = out.iter().zip(dout).map(|(&o, &g)| if o > 0.0 { g } else { 0.0 }).collect();
    (g.clone(), g)
}
