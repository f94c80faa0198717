//! batch_norm oracle (see batch_norm.wgsl for the maths).

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

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

/// Per-channel statistics of a batch: (count, mean, M2 = sum of squared deviations), what
/// `--sync-bn` merges over ranks.
#[derive(Clone, Debug)]
pub struct Welford {
    pub count: Vec<f64>,
    pub mean: Vec<f64>,
    pub m2: Vec<f64>,
}

/// The batch's statistics per channel, two-pass: mean, then the squared deviations from it.
pub fn batch_norm_forward_stats(c: &BatchNormConfig, inp: &[f64]) -> Welford {
    let m = c.count() as f64;
    let mut w = Welford { count: vec![m; c.c], mean: vec![0.0; c.c], m2: vec![0.0; c.c] };
    for ch in 0..c.c {
        let mean = channel(c, ch).map(|i| inp[i]).sum::<f64>() / m;
        w.mean[ch] = mean;
        w.m2[ch] = channel(c, ch).map(|i| (inp[i] - mean).powi(2)).sum::<f64>();
    }
    w
}

/// Normalise with statistics `w` (this batch's, or under `--sync-bn` every rank's batch merged):
/// biased variance M2/count for the output, unbiased M2/(count-1) into the running variance.
pub fn batch_norm_forward_apply(
    c: &BatchNormConfig,
    inp: &[f64],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    w: &Welford,
) -> BatchNormTrain {
    let mom = c.momentum;
    let mut r = BatchNormTrain {
        out: vec![0.0; inp.len()],
        mean: vec![0.0; c.c],
        invstd: vec![0.0; c.c],
        running_mean: running_mean.to_vec(),
        running_var: running_var.to_vec(),
    };
    for ch in 0..c.c {
        let (m, mean, ss) = (w.count[ch], w.mean[ch], w.m2[ch]);
        let invstd = 1.0 / (ss / m + c.eps).sqrt();
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
    let w = batch_norm_forward_stats(c, inp);
    batch_norm_forward_apply(c, inp, gamma, beta, running_mean, running_var, &w)
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

/// Per-channel sums of a backward pass: (count, sum dout, sum dout*(x - mean)), what `--sync-bn`
/// adds up over ranks.
#[derive(Clone, Debug)]
pub struct GradSums {
    pub count: Vec<f64>,
    pub sum_dout: Vec<f64>,
    pub sum_dout_xmu: Vec<f64>,
}

/// This batch's [`GradSums`].
pub fn batch_norm_backward_sums(c: &BatchNormConfig, inp: &[f64], mean: &[f64], dout: &[f64]) -> GradSums {
    let m = c.count() as f64;
    let mut s = GradSums { count: vec![m; c.c], sum_dout: vec![0.0; c.c], sum_dout_xmu: vec![0.0; c.c] };
    for ch in 0..c.c {
        s.sum_dout[ch] = channel(c, ch).map(|i| dout[i]).sum();
        s.sum_dout_xmu[ch] = channel(c, ch).map(|i| dout[i] * (inp[i] - mean[ch])).sum();
    }
    s
}

/// dinp through the statistics of the batch the sums `s` are over (M = s.count values):
/// dinp = gamma*invstd * (dout - sum(dout)/M - xhat * sum(dout*xhat)/M).
pub fn batch_norm_backward_input(
    c: &BatchNormConfig,
    inp: &[f64],
    gamma: &[f64],
    mean: &[f64],
    invstd: &[f64],
    dout: &[f64],
    s: &GradSums,
) -> Vec<f64> {
    let mut dinp = vec![0.0; inp.len()];
    for ch in 0..c.c {
        let m = s.count[ch];
        let dbeta = s.sum_dout[ch];
        let dgamma = s.sum_dout_xmu[ch] * invstd[ch];
        for i in channel(c, ch) {
            let xhat = (inp[i] - mean[ch]) * invstd[ch];
            dinp[i] = gamma[ch] * invstd[ch] * (dout[i] - dbeta / m - xhat * dgamma / m);
        }
    }
    dinp
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
    let s = batch_norm_backward_sums(c, inp, mean, dout);
    let dinp = batch_norm_backward_input(c, inp, gamma, mean, invstd, dout, &s);
    let dgamma = s.sum_dout_xmu.iter().zip(invstd).map(|(v, k)| v * k).collect();
    (dinp, dgamma, s.sum_dout)
}

/// The training forward with the epilogues `c` asks for (batch_norm.wgsl): the normalisation,
/// its ReLU (`c.relu`), then its max pool (`c.pool`): the output (pooled) and the pool's argmax.
pub fn batch_norm_forward_train_fused(
    c: &BatchNormConfig,
    inp: &[f64],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
) -> (BatchNormTrain, Option<Vec<u32>>) {
    let mut t = batch_norm_forward_train(c, inp, gamma, beta, running_mean, running_var);
    if c.relu {
        t.out.iter_mut().for_each(|v| *v = v.max(0.0));
    }
    let argmax = c.pool.map(|p| {
        let (out, argmax) = crate::ops::pool::reference::max_pool2d_forward(&p, &t.out);
        t.out = out;
        argmax
    });
    (t, argmax)
}

/// The training backward with the epilogues `c` asks for: the pooled gradient `dout` gathered
/// to the pool's input by `argmax` (`c.pool`), the ReLU's mask from the normalised output
/// recomputed from the saved statistics and beta (`c.relu`), the batch norm's backward, and with
/// `c.conv_bias` the per-channel sum of dinp (the convolution bias gradient). Returns (dinp,
/// dgamma, dbeta, conv bias gradient).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_fused(
    c: &BatchNormConfig,
    inp: &[f64],
    gamma: &[f64],
    beta: &[f64],
    mean: &[f64],
    invstd: &[f64],
    argmax: Option<&[u32]>,
    dout: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Option<Vec<f64>>) {
    let mut g = match (c.pool, argmax) {
        (Some(p), Some(a)) => crate::ops::pool::reference::max_pool2d_backward(&p, a, dout),
        _ => dout.to_vec(),
    };
    if c.relu {
        for ch in 0..c.c {
            for i in channel(c, ch) {
                let y = (inp[i] - mean[ch]) * invstd[ch] * gamma[ch] + beta[ch];
                if y <= 0.0 {
                    g[i] = 0.0;
                }
            }
        }
    }
    let (dinp, dgamma, dbeta) = batch_norm_backward(c, inp, gamma, mean, invstd, &g);
    let dbias = c.conv_bias.then(|| (0..c.c).map(|ch| channel(c, ch).map(|i| dinp[i]).sum()).collect());
    (dinp, dgamma, dbeta, dbias)
}
