//! bn_fold oracle: a batch norm in evaluation mode folded into the convolution before it, in f64.
//! With s = gamma / sqrt(running_var + eps), BN(conv(x; w, bias)) = conv(x; w·s, beta − (mean −
//! bias)·s) per output channel o: the convolution is linear in its weights, the batch norm an
//! affine map per channel.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

/// The folded weight (same layout as `weight`, `gamma.len()` output channels of equal rows) and
/// bias of a convolution (`bias`: its own, if any) followed by a batch norm in evaluation mode.
pub fn bn_fold_forward(
    weight: &[f64],
    bias: Option<&[f64]>,
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<f64>) {
    let c = gamma.len();
    let k = weight.len() / c.max(1);
    let mut w = vec![0.0; weight.len()];
    let mut b = vec![0.0; c];
    for o in 0..c {
        let s = gamma[o] / (running_var[o] + eps).sqrt();
        for j in 0..k {
            w[o * k + j] = weight[o * k + j] * s;
        }
        let own = bias.map_or(0.0, |b| b[o]);
        b[o] = beta[o] - (running_mean[o] - own) * s;
    }
    (w, b)
}
