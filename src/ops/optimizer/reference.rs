//! optimizer oracle: one step of torch.optim.Adam / AdamW / SGD on a flat parameter, in f64.

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

use crate::ops::optimizer::OptimizerConfig;

/// Update `param` and `state` (Adam: [exp_avg, exp_avg_sq]; SGD with momentum: [buf]) in place
/// for the 1-based step `step`.
pub fn optimizer_step(cfg: &OptimizerConfig, step: u64, param: &mut [f64], grad: &[f64], state: &mut [Vec<f64>]) {
    match *cfg {
        OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, decoupled } => {
            let t = step as f64;
            let bc1 = 1.0 - beta1.powf(t);
            let bc2 = 1.0 - beta2.powf(t);
            let (m_state, v_state) = state.split_at_mut(1);
            for (i, w) in param.iter_mut().enumerate() {
                let mut g = grad[i];
                if weight_decay != 0.0 {
                    if decoupled {
                        *w *= 1.0 - lr * weight_decay;
                    } else {
                        g += weight_decay * *w;
                    }
                }
                let m = &mut m_state[0][i];
                let v = &mut v_state[0][i];
                *m = beta1 * *m + (1.0 - beta1) * g;
                *v = beta2 * *v + (1.0 - beta2) * g * g;
                // param -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
                *w -= lr / bc1 * *m / (v.sqrt() / bc2.sqrt() + eps);
            }
        }
        OptimizerConfig::Sgd { lr, momentum, dampening, weight_decay, nesterov } => {
            for (i, w) in param.iter_mut().enumerate() {
                let mut g = grad[i] + weight_decay * *w;
                if momentum != 0.0 {
                    let b = &mut state[0][i];
                    *b = if step == 1 { g } else { momentum * *b + (1.0 - dampening) * g };
                    g = if nesterov { g + momentum * *b } else { *b };
                }
                *w -= lr * g;
            }
        }
    }
}
