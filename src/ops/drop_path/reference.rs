//! drop_path oracle: the per-sample mask drawn as the kernel draws it (drop_path.wgsl), in f64.

use super::{DropPathConfig, StepKey};
use crate::ops::dropout::reference::mix;

/// Whether sample `s` keeps its path in the step `key`.
pub fn keep(cfg: &DropPathConfig, key: StepKey, s: usize) -> bool {
    let u = mix(s as u32 ^ mix(cfg.salt ^ mix(key[0] ^ mix(key[1]))));
    u >= cfg.threshold()
}

/// The factor each of the `n` samples is multiplied by in training: 0 or 1 / (1 - p).
pub fn factors(cfg: &DropPathConfig, key: StepKey, n: usize) -> Vec<f64> {
    let scale = 1.0 / (1.0 - cfg.p);
    (0..n).map(|s| if keep(cfg, key, s) { scale } else { 0.0 }).collect()
}

/// Training-mode forward of `inp`, `n` samples of equal size; evaluation is the identity.
pub fn drop_path_forward(cfg: &DropPathConfig, key: StepKey, n: usize, inp: &[f64]) -> Vec<f64> {
    let per_sample = inp.len() / n.max(1);
    let f = factors(cfg, key, n);
    inp.iter().enumerate().map(|(i, x)| x * f[i / per_sample.max(1)]).collect()
}

/// dinp = dout · the forward's factor.
pub fn drop_path_backward(cfg: &DropPathConfig, key: StepKey, n: usize, dout: &[f64]) -> Vec<f64> {
    drop_path_forward(cfg, key, n, dout)
}
