//! conv2d oracle (see shaders/conv2d.wgsl for the maths).

use crate::ops::conv2d::Conv2dConfig;

/// Input coordinate of output `o`, tap `k`: o*stride - pad + k*dilation, if inside the input.
fn tap(o: usize, k: usize, stride: usize, pad: usize, dil: usize, size: usize) -> Option<usize> {
    (o * stride + k * dil).checked_sub(pad).filter(|&i| i < size)
}

/// out[n, co, oy, ox] = bias[co] + sum_{ci, ky, kx} weight[co, ci, ky, kx] * inp[n, ci, iy, ix]
pub fn conv2d_forward(c: &Conv2dConfig, inp: &[f64], weight: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let (oh, ow) = (c.out_h(), c.out_w());
    let mut out = vec![0.0; c.n * c.c_out * oh * ow];
    for n in 0..c.n {
        for co in 0..c.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias.map_or(0.0, |b| b[co]);
                    for ci in 0..c.c_in {
                        for ky in 0..c.kh {
                            let Some(iy) = tap(oy, ky, c.stride.0, c.pad.0, c.dilation.0, c.h) else { continue };
                            for kx in 0..c.kw {
                                let Some(ix) = tap(ox, kx, c.stride.1, c.pad.1, c.dilation.1, c.w) else { continue };
                                acc += weight[((co * c.c_in + ci) * c.kh + ky) * c.kw + kx]
                                    * inp[((n * c.c_in + ci) * c.h + iy) * c.w + ix];
                            }
                        }
                    }
                    out[((n * c.c_out + co) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    out
}

/// Scatter form of the transposed convolution: each output's gradient flows back to every input
/// tap it read. dinp[n, ci, iy, ix] += weight[co, ci, ky, kx] * dout[n, co, oy, ox].
pub fn conv2d_backward_input(c: &Conv2dConfig, dout: &[f64], weight: &[f64]) -> Vec<f64> {
    let (oh, ow) = (c.out_h(), c.out_w());
    let mut dinp = vec![0.0; c.n * c.c_in * c.h * c.w];
    for n in 0..c.n {
        for co in 0..c.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dout[((n * c.c_out + co) * oh + oy) * ow + ox];
                    for ci in 0..c.c_in {
                        for ky in 0..c.kh {
                            let Some(iy) = tap(oy, ky, c.stride.0, c.pad.0, c.dilation.0, c.h) else { continue };
                            for kx in 0..c.kw {
                                let Some(ix) = tap(ox, kx, c.stride.1, c.pad.1, c.dilation.1, c.w) else { continue };
                                dinp[((n * c.c_in + ci) * c.h + iy) * c.w + ix] +=
                                    weight[((co * c.c_in + ci) * c.kh + ky) * c.kw + kx] * g;
                            }
                        }
                    }
                }
            }
        }
    }
    dinp
}

/// dweight[co, ci, ky, kx] = sum_{n, oy, ox} dout[n, co, oy, ox] * inp[n, ci, iy, ix]
pub fn conv2d_backward_weight(c: &Conv2dConfig, inp: &[f64], dout: &[f64]) -> Vec<f64> {
    let (oh, ow) = (c.out_h(), c.out_w());
    let mut dw = vec![0.0; c.c_out * c.c_in * c.kh * c.kw];
    for n in 0..c.n {
        for co in 0..c.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dout[((n * c.c_out + co) * oh + oy) * ow + ox];
                    for ci in 0..c.c_in {
                        for ky in 0..c.kh {
                            let Some(iy) = tap(oy, ky, c.stride.0, c.pad.0, c.dilation.0, c.h) else { continue };
                            for kx in 0..c.kw {
                                let Some(ix) = tap(ox, kx, c.stride.1, c.pad.1, c.dilation.1, c.w) else { continue };
                                dw[((co * c.c_in + ci) * c.kh + ky) * c.kw + kx] +=
                                    g * inp[((n * c.c_in + ci) * c.h + iy) * c.w + ix];
                            }
                        }
                    }
                }
            }
        }
    }
    dw
}

/// dbias[co] = sum_{n, oy, ox} dout[n, co, oy, ox]
pub fn conv2d_backward_bias(c: &Conv2dConfig, dout: &[f64]) -> Vec<f64> {
    let plane = c.out_h() * c.out_w();
    let mut db = vec![0.0; c.c_out];
    for n in 0..c.n {
        for (co, d) in db.iter_mut().enumerate() {
            *d += dout[(n * c.c_out + co) * plane..][..plane].iter().sum::<f64>();
        }
    }
    db
}
