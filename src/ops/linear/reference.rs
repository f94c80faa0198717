//! linear oracle.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

use crate::ops::linear::LinearConfig;

/// out[n, o] = bias[o] + sum_i weight[o, i] inp[n, i]
pub fn linear_forward(c: &LinearConfig, inp: &[f64], weight: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let mut out = vec![0.0; c.n * c.out_features];
    for n in 0..c.n {
        for o in 0..c.out_features {
            out[n * c.out_features + o] = bias.map_or(0.0, |b| b[o])
                + (0..c.in_features).map(|i| weight[o * c.in_features + i] * inp[n * c.in_features + i]).sum::<f64>();
        }
    }
    out
}

/// (dinp = dout · W, dweight = doutᵀ · inp, dbias = sum_n dout)
pub fn linear_backward(c: &LinearConfig, inp: &[f64], weight: &[f64], dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (fi, fo) = (c.in_features, c.out_features);
    let mut dinp = vec![0.0; c.n * fi];
    let mut dw = vec![0.0; fo * fi];
    let mut db = vec![0.0; fo];
    for n in 0..c.n {
        for o in 0..fo {
            let g = dout[n * fo + o];
            db[o] += g;
            for i in 0..fi {
                dinp[n * fi + i] += g * weight[o * fi + i];
                dw[o * fi + i] += g * inp[n * fi + i];
            }
        }
    }
    (dinp, dw, db)
}
