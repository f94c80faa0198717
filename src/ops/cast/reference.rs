//! cast oracle: f32 to IEEE binary16, round to nearest even, overflow to ±inf (`half`'s
//! conversion, which is PyTorch's `.half()`), returned widened to f64.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

pub fn cast_forward(inp: &[f64]) -> Vec<f64> {
    inp.iter().map(|&x| f64::from(half::f16::from_f32(x as f32))).collect()
}
