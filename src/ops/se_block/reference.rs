//! se_block oracle (see se_block.wgsl for the maths), and the block with the residual addition
//! and ReLU after it fused in (`se_block_*_add_relu`): out = relu(x * s + r).

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

use crate::ops::se_block::{Excitation, SeBlockConfig, Squeeze};

/// The block's weights as flat slices: w1 [Cr, C], w2 [C, Cr], optional biases.
#[derive(Clone, Copy)]
pub struct SeParams<'a> {
    pub w1: &'a [f64],
    pub b1: Option<&'a [f64]>,
    pub w2: &'a [f64],
    pub b2: Option<&'a [f64]>,
}

/// Forward output and per-sample intermediates: z (squeeze) [n, C], h (fc1 after ReLU) [n, Cr],
/// s (the excitation, the scale) [n, C].
pub struct SeForward {
    pub out: Vec<f64>,
    pub z: Vec<f64>,
    pub h: Vec<f64>,
    pub s: Vec<f64>,
}

fn excite(e: Excitation, a: f64) -> f64 {
    match e {
        Excitation::Sigmoid => 1.0 / (1.0 + (-a).exp()),
        Excitation::Tanh => a.tanh(),
        Excitation::Relu => a.max(0.0),
    }
}

/// d excite / d a from the output s.
fn excite_grad(e: Excitation, s: f64) -> f64 {
    match e {
        Excitation::Sigmoid => s * (1.0 - s),
        Excitation::Tanh => 1.0 - s * s,
        Excitation::Relu => f64::from(u8::from(s > 0.0)),
    }
}

/// Index of the first maximum.
fn first_max(v: &[f64]) -> usize {
    (1..v.len()).fold(0, |a, k| if v[k] > v[a] { k } else { a })
}

pub fn se_block_forward(cfg: &SeBlockConfig, inp: &[f64], p: &SeParams<'_>) -> SeForward {
    let (c, cr, hw) = (cfg.c, cfg.hidden(), cfg.h * cfg.w);
    let mut f = SeForward {
        out: vec![0.0; inp.len()],
        z: vec![0.0; cfg.n * c],
        h: vec![0.0; cfg.n * cr],
        s: vec![0.0; cfg.n * c],
    };
    for n in 0..cfg.n {
        let x = &inp[n * c * hw..][..c * hw];
        // Squeeze: z[c] = mean (or max) over the plane.
        let z: Vec<f64> = x
            .chunks(hw)
            .map(|pl| match cfg.variant.squeeze {
                Squeeze::Avg => pl.iter().sum::<f64>() / hw as f64,
                Squeeze::Max => pl[first_max(pl)],
            })
            .collect();
        // fc1 + ReLU.
        let h: Vec<f64> = (0..cr)
            .map(|j| (p.b1.map_or(0.0, |b| b[j]) + (0..c).map(|k| p.w1[j * c + k] * z[k]).sum::<f64>()).max(0.0))
            .collect();
        // fc2 + sigmoid (or the ablation's gate).
        let s: Vec<f64> = (0..c)
            .map(|k| {
                excite(
                    cfg.variant.excitation,
                    p.b2.map_or(0.0, |b| b[k]) + (0..cr).map(|j| p.w2[k * cr + j] * h[j]).sum::<f64>(),
                )
            })
            .collect();
        // Excite.
        for (i, v) in x.iter().enumerate() {
            f.out[n * c * hw + i] = v * s[i / hw];
        }
        f.z[n * c..][..c].copy_from_slice(&z);
        f.h[n * cr..][..cr].copy_from_slice(&h);
        f.s[n * c..][..c].copy_from_slice(&s);
    }
    f
}

/// Gradients of the SE block.
pub struct SeBackward {
    pub dinp: Vec<f64>,
    pub dw1: Vec<f64>,
    pub db1: Vec<f64>,
    pub dw2: Vec<f64>,
    pub db2: Vec<f64>,
}

pub fn se_block_backward(
    cfg: &SeBlockConfig,
    inp: &[f64],
    p: &SeParams<'_>,
    fwd: &SeForward,
    dout: &[f64],
) -> SeBackward {
    let (c, cr, hw) = (cfg.c, cfg.hidden(), cfg.h * cfg.w);
    let mut g = SeBackward {
        dinp: vec![0.0; inp.len()],
        dw1: vec![0.0; cr * c],
        db1: vec![0.0; cr],
        dw2: vec![0.0; c * cr],
        db2: vec![0.0; c],
    };
    for n in 0..cfg.n {
        let x = &inp[n * c * hw..][..c * hw];
        let dy = &dout[n * c * hw..][..c * hw];
        let (z, h, s) = (&fwd.z[n * c..][..c], &fwd.h[n * cr..][..cr], &fwd.s[n * c..][..c]);
        // ds[c] = sum_hw dy*x; through the gate: da2 = ds * s'(a2).
        let da2: Vec<f64> = (0..c)
            .map(|k| {
                (0..hw).map(|q| dy[k * hw + q] * x[k * hw + q]).sum::<f64>() * excite_grad(cfg.variant.excitation, s[k])
            })
            .collect();
        // fc2: dh[j] = sum_c w2[c, j] da2[c]; through the ReLU (gate from its output).
        let da1: Vec<f64> =
            (0..cr).map(|j| if h[j] > 0.0 { (0..c).map(|k| p.w2[k * cr + j] * da2[k]).sum() } else { 0.0 }).collect();
        // fc1: dz[c] = sum_j w1[j, c] da1[j].
        let dz: Vec<f64> = (0..c).map(|k| (0..cr).map(|j| p.w1[j * c + k] * da1[j]).sum()).collect();
        for i in 0..c * hw {
            let k = i / hw;
            // The mean spreads dz over the plane; the max passes it to its first maximum.
            let dsq = match cfg.variant.squeeze {
                Squeeze::Avg => dz[k] / hw as f64,
                Squeeze::Max => f64::from(u8::from(i % hw == first_max(&x[k * hw..][..hw]))) * dz[k],
            };
            g.dinp[n * c * hw + i] = dy[i] * s[k] + dsq;
        }
        for k in 0..c {
            for j in 0..cr {
                g.dw2[k * cr + j] += da2[k] * h[j];
                g.dw1[j * c + k] += da1[j] * z[k];
            }
            g.db2[k] += da2[k];
        }
        for j in 0..cr {
            g.db1[j] += da1[j];
        }
    }
    g
}

/// relu(x * s + res): the block with the residual addition and ReLU fused in.
pub fn se_block_forward_add_relu(cfg: &SeBlockConfig, inp: &[f64], res: &[f64], p: &SeParams<'_>) -> SeForward {
    let mut f = se_block_forward(cfg, inp, p);
    for (o, r) in f.out.iter_mut().zip(res) {
        *o = (*o + r).max(0.0);
    }
    f
}

/// The gradients of [`se_block_forward_add_relu`] from its output `out` and the output's
/// gradient: g = dout * [out > 0] (0 at exactly 0, as PyTorch's ReLU) is the shortcut's gradient
/// (the second value) and the plain block's output gradient.
pub fn se_block_backward_add_relu(
    cfg: &SeBlockConfig,
    inp: &[f64],
    p: &SeParams<'_>,
    fwd: &SeForward,
    dout: &[f64],
) -> (SeBackward, Vec<f64>) {
    let g: Vec<f64> = fwd.out.iter().zip(dout).map(|(&o, &d)| if o > 0.0 { d } else { 0.0 }).collect();
    (se_block_backward(cfg, inp, p, fwd, &g), g)
}
