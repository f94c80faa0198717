//! pool oracle: max pooling and global average pooling (see pool.wgsl).

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

use crate::ops::pool::MaxPool2dConfig;

/// (out, argmax): max over each window (padding is -inf), argmax = iy*W + ix of the first maximum
/// in scan order, a NaN taking precedence (PyTorch's `val > max || isnan(val)`).
pub fn max_pool2d_forward(c: &MaxPool2dConfig, inp: &[f64]) -> (Vec<f64>, Vec<u32>) {
    let (oh, ow) = (c.out_h(), c.out_w());
    let mut out = vec![0.0; c.n * c.c * oh * ow];
    let mut arg = vec![0u32; out.len()];
    for plane in 0..c.n * c.c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best: Option<(f64, usize)> = None;
                for ky in 0..c.kernel.0 {
                    let Some(iy) = (oy * c.stride.0 + ky).checked_sub(c.pad.0).filter(|&v| v < c.h) else { continue };
                    for kx in 0..c.kernel.1 {
                        let Some(ix) = (ox * c.stride.1 + kx).checked_sub(c.pad.1).filter(|&v| v < c.w) else {
                            continue;
                        };
                        let v = inp[(plane * c.h + iy) * c.w + ix];
                        if best.is_none_or(|(b, _)| v > b || v.is_nan()) {
                            best = Some((v, iy * c.w + ix));
                        }
                    }
                }
                let (v, i) = best.unwrap_or((f64::NEG_INFINITY, 0));
                let o = (plane * oh + oy) * ow + ox;
                out[o] = v;
                arg[o] = i as u32;
            }
        }
    }
    (out, arg)
}

/// Scatter each output's gradient to its argmax (summing where windows overlap).
pub fn max_pool2d_backward(c: &MaxPool2dConfig, argmax: &[u32], dout: &[f64]) -> Vec<f64> {
    let plane_out = c.out_h() * c.out_w();
    let plane_in = c.h * c.w;
    let mut dinp = vec![0.0; c.n * c.c * plane_in];
    for (o, (&a, &g)) in argmax.iter().zip(dout).enumerate() {
        dinp[(o / plane_out) * plane_in + a as usize] += g;
    }
    dinp
}

/// [n, c, h, w] → [n, c]: the mean of each plane.
pub fn global_avg_pool_forward(shape: [usize; 4], inp: &[f64]) -> Vec<f64> {
    let hw = shape[2] * shape[3];
    inp.chunks(hw).map(|p| p.iter().sum::<f64>() / hw as f64).collect()
}

/// Each element of a plane gets dout / (h*w).
pub fn global_avg_pool_backward(shape: [usize; 4], dout: &[f64]) -> Vec<f64> {
    let hw = shape[2] * shape[3];
    dout.iter().flat_map(|&g| std::iter::repeat_n(g / hw as f64, hw)).collect()
}

/// `max_pool2d_forward` with pool.wgsl's AFFINE prologue: each value x of channel c becomes
/// max((x - mean) / sqrt(var + eps) * gamma + beta, 0) — a batch norm from its running statistics
/// and its ReLU — before the window's maximum is taken.
pub fn max_pool2d_forward_affine(
    c: &MaxPool2dConfig,
    inp: &[f64],
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<u32>) {
    let hw = c.h * c.w;
    let y: Vec<f64> = inp
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let ch = (i / hw) % c.c;
            ((x - running_mean[ch]) / (running_var[ch] + eps).sqrt() * gamma[ch] + beta[ch]).max(0.0)
        })
        .collect();
    max_pool2d_forward(c, &y)
}
