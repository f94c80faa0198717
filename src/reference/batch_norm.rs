//! batch_norm oracle (see shaders/batch_norm.wgsl for the maths).

use crate::ops::batch_norm::BatchNormConfig;

/// Training-mode forward output and what it updates.
pub struct BatchNormTrain {
    pub out: Vec<f64>,
    pub mean: Vec<f64>,
    /// 1 / sqrt(biased batch variance + eps)
    pub invstd: Vec<f64>,
    pub running_mean: Vec<f64>,
    pub running_var: Vec<f64>,
}

/// Flat NCHW indices of channel `ch`'s N*H*W values.
fn channel(c: &BatchNormConfig, ch: usize) -> impl Iterator<Item = usize> + use<> {
    let (hw, cc) = (c.h * c.w, c.c);
    (0..c.n).flat_map(move |n| ((n * cc + ch) * hw)..((n * cc + ch) * hw + hw))
}

/// Normalise with the batch's statistics (two-pass mean and biased variance) and update the
/// running statistics with the unbiased variance, as PyTorch does.
pub fn batch_norm_forward_train(
    c: &BatchNormConfig,
    inp: &[f64],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
) -> BatchNormTrain {
    let m = c.count() as f64;
    let mom = c.momentum;
    let eps = c.eps;
    let mut r = BatchNormTrain {
        out: vec![0.0; inp.len()],
        mean: vec![0.0; c.c],
        invstd: vec![0.0; c.c],
        running_mean: running_mean.to_vec(),
        running_var: running_var.to_vec(),
    };
    for ch in 0..c.c {
        let mean = channel(c, ch).map(|i| inp[i]).sum::<f64>() / m;
        let ss = channel(c, ch).map(|i| (inp[i] - mean).powi(2)).sum::<f64>();
        let invstd = 1.0 / (ss / m + eps).sqrt();
        for i in channel(c, ch) {
            r.out[i] = (inp[i] - mean) * invstd * gamma[ch] + beta[ch];
        }
        r.mean[ch] = mean;
        r.invstd[ch] = invstd;
        r.running_mean[ch] = (1.0 - mom) * running_mean[ch] + mom * mean;
        r.running_var[ch] = (1.0 - mom) * running_var[ch] + mom * ss / (m - 1.0);
    }
    r
}

/// Eval mode: out = (x - running_mean) / sqrt(running_var + eps) * gamma + beta.
pub fn batch_norm_forward_eval(
    c: &BatchNormConfig,
    inp: &[f64],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
) -> Vec<f64> {
    let mut out = vec![0.0; inp.len()];
    for ch in 0..c.c {
        let invstd = 1.0 / (running_var[ch] + c.eps).sqrt();
        for i in channel(c, ch) {
            out[i] = (inp[i] - running_mean[ch]) * invstd * gamma[ch] + beta[ch];
        }
    }
    out
}

/// Training-mode backward through the batch statistics:
/// dinp = gamma*invstd * (dout - mean(dout) - xhat * mean(dout*xhat)); returns (dinp, dgamma, dbeta).
pub fn batch_norm_backward(
    c: &BatchNormConfig,
    inp: &[f64],
    gamma: &[f64],
    mean: &[f64],
    invstd: &[f64],
    dout: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let m = c.count() as f64;
    let mut dinp = vec![0.0; inp.len()];
    let mut dgamma = vec![0.0; c.c];
    let mut dbeta = vec![0.0; c.c];
    for ch in 0..c.c {
        let xhat = |i: usize| (inp[i] - mean[ch]) * invstd[ch];
        dbeta[ch] = channel(c, ch).map(|i| dout[i]).sum();
        dgamma[ch] = channel(c, ch).map(|i| dout[i] * xhat(i)).sum();
        for i in channel(c, ch) {
            dinp[i] = gamma[ch] * invstd[ch] * (dout[i] - dbeta[ch] / m - xhat(i) * dgamma[ch] / m);
        }
    }
    (dinp, dgamma, dbeta)
}
