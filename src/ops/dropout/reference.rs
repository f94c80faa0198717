//! dropout oracle: the mask drawn as the kernel draws it (dropout.wgsl), in f64.

use super::{DropoutConfig, StepKey};

/// The mixing function of dropout.wgsl, with wrapping u32 arithmetic.
pub fn mix(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// Whether element `i` (with the other elements of its group) is kept in the step `key`.
pub fn keep(cfg: &DropoutConfig, key: StepKey, i: usize) -> bool {
    let u = mix((i / cfg.group) as u32 ^ mix(cfg.salt ^ mix(key[0] ^ mix(key[1]))));
    u >= cfg.threshold()
}

/// The factor each element is multiplied by in training: 0 or 1 / (1 - p).
pub fn factors(cfg: &DropoutConfig, key: StepKey, len: usize) -> Vec<f64> {
    let scale = 1.0 / (1.0 - cfg.p);
    (0..len).map(|i| if keep(cfg, key, i) { scale } else { 0.0 }).collect()
}

/// Training-mode forward; evaluation is the identity.
pub fn dropout_forward(cfg: &DropoutConfig, key: StepKey, inp: &[f64]) -> Vec<f64> {
    inp.iter().zip(factors(cfg, key, inp.len())).map(|(x, f)| x * f).collect()
}

/// dinp = dout · the forward's factor.
pub fn dropout_backward(cfg: &DropoutConfig, key: StepKey, dout: &[f64]) -> Vec<f64> {
    dropout_forward(cfg, key, dout)
}
