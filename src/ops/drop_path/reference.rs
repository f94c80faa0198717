//! drop_path oracle: dropout's (ops/dropout/reference.rs) with one draw per sample.

use super::{DropPathConfig, StepKey};
use crate::ops::dropout::reference as dropout;

/// Whether sample `s` keeps its path in the step `key`.
pub fn keep(cfg: &DropPathConfig, key: StepKey, s: usize) -> bool {
    dropout::keep(&cfg.grouped(1), key, s)
}

/// Training-mode forward of `inp`, `n` samples of equal size; evaluation is the identity.
pub fn drop_path_forward(cfg: &DropPathConfig, key: StepKey, n: usize, inp: &[f64]) -> Vec<f64> {
    dropout::dropout_forward(&cfg.grouped((inp.len() / n.max(1)).max(1)), key, inp)
}

/// dinp = dout · the forward's factor.
pub fn drop_path_backward(cfg: &DropPathConfig, key: StepKey, n: usize, dout: &[f64]) -> Vec<f64> {
    drop_path_forward(cfg, key, n, dout)
}
