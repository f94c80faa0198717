//! conv2d oracle (see conv2d.wgsl for the maths).

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

use crate::ops::conv2d::Conv2dConfig;

/// Input coordinate of output `o`, tap `k`: o*stride - pad + k*dilation, if inside the input.
fn tap(o: usize, k: usize, stride: usize, pad: usize, dil: usize, size: usize) -> Option<usize> {
    (o * stride + k * dil).checked_sub(pad).filter(|&i| i < size)
}

/// The input channel that weight column `cl` of output channel `co` reads: channel cl of co's
/// group, co / (c_out/groups). The weight is [c_out, c_in/groups, kh, kw] (PyTorch's layout).
fn in_channel(c: &Conv2dConfig, co: usize, cl: usize) -> usize {
    co / c.c_out_group() * c.c_in_group() + cl
}

/// out[n, co, oy, ox] = bias[co] + sum_{cl, ky, kx} weight[co, cl, ky, kx] * inp[n, ci, iy, ix],
/// ci = in_channel(co, cl)
pub fn conv2d_forward(c: &Conv2dConfig, inp: &[f64], weight: &[f64], bias: Option<&[f64]>) -> Vec<f64> {
    let (oh, ow) = (c.out_h(), c.out_w());
    let mut out = vec![0.0; c.n * c.c_out * oh * ow];
    for n in 0..c.n {
        for co in 0..c.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias.map_or(0.0, |b| b[co]);
                    for cl in 0..c.c_in_group() {
                        let ci = in_channel(c, co, cl);
                        for ky in 0..c.kh {
                            let Some(iy) = tap(oy, ky, c.stride.0, c.pad.0, c.dilation.0, c.h) else { continue };
                            for kx in 0..c.kw {
                                let Some(ix) = tap(ox, kx, c.stride.1, c.pad.1, c.dilation.1, c.w) else { continue };
                                acc += weight[((co * c.c_in_group() + cl) * c.kh + ky) * c.kw + kx]
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
/// tap it read. dinp[n, ci, iy, ix] += weight[co, cl, ky, kx] * dout[n, co, oy, ox], ci = in_channel(co, cl).
pub fn conv2d_backward_input(c: &Conv2dConfig, dout: &[f64], weight: &[f64]) -> Vec<f64> {
    let (oh, ow) = (c.out_h(), c.out_w());
    let mut dinp = vec![0.0; c.n * c.c_in * c.h * c.w];
    for n in 0..c.n {
        for co in 0..c.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dout[((n * c.c_out + co) * oh + oy) * ow + ox];
                    for cl in 0..c.c_in_group() {
                        let ci = in_channel(c, co, cl);
                        for ky in 0..c.kh {
                            let Some(iy) = tap(oy, ky, c.stride.0, c.pad.0, c.dilation.0, c.h) else { continue };
                            for kx in 0..c.kw {
                                let Some(ix) = tap(ox, kx, c.stride.1, c.pad.1, c.dilation.1, c.w) else { continue };
                                dinp[((n * c.c_in + ci) * c.h + iy) * c.w + ix] +=
                                    weight[((co * c.c_in_group() + cl) * c.kh + ky) * c.kw + kx] * g;
                            }
                        }
                    }
                }
            }
        }
    }
    dinp
}

/// The input gradient with an addend (`ConvBuffers::dinp_addend`: the other reader's gradient of
/// a forked activation): dinp = conv2d_backward_input(dout, weight) + addend. Exact in f64; the
/// kernels round the own gradient to the stored type before the sum and the sum after it, as a
/// separate addition of the two stored gradients would.
pub fn conv2d_backward_input_accumulate(c: &Conv2dConfig, dout: &[f64], weight: &[f64], addend: &[f64]) -> Vec<f64> {
    let mut dinp = conv2d_backward_input(c, dout, weight);
    assert_eq!(addend.len(), dinp.len(), "conv2d_backward_input_accumulate: the addend is not input-shaped");
    for (d, a) in dinp.iter_mut().zip(addend) {
        *d += a;
    }
    dinp
}

/// dweight[co, cl, ky, kx] = sum_{n, oy, ox} dout[n, co, oy, ox] * inp[n, ci, iy, ix], ci = in_channel(co, cl)
pub fn conv2d_backward_weight(c: &Conv2dConfig, inp: &[f64], dout: &[f64]) -> Vec<f64> {
    let (oh, ow) = (c.out_h(), c.out_w());
    let mut dw = vec![0.0; c.c_out * c.c_in_group() * c.kh * c.kw];
    for n in 0..c.n {
        for co in 0..c.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dout[((n * c.c_out + co) * oh + oy) * ow + ox];
                    for cl in 0..c.c_in_group() {
                        let ci = in_channel(c, co, cl);
                        for ky in 0..c.kh {
                            let Some(iy) = tap(oy, ky, c.stride.0, c.pad.0, c.dilation.0, c.h) else { continue };
                            for kx in 0..c.kw {
                                let Some(ix) = tap(ox, kx, c.stride.1, c.pad.1, c.dilation.1, c.w) else { continue };
                                dw[((co * c.c_in_group() + cl) * c.kh + ky) * c.kw + kx] +=
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A grouped convolution is the ordinary convolution whose weight is zero between channels of
    /// different groups: the grouped oracle against the ungrouped one (itself checked against
    /// PyTorch in tests/golden.rs and by finite differences in tests/gradcheck.rs), which shares
    /// none of its group indexing. Sums of at most 3*3*12 products of values in [-1, 1]: the two
    /// add the same products (and zeros) in different orders, 1e-12 is f64 rounding with room.
    #[test]
    fn grouped_equals_ungrouped_with_a_block_diagonal_weight() {
        let cases = [
            Conv2dConfig::square(2, 12, (7, 5), 8, 3, 2, 1, true).grouped(4),
            Conv2dConfig::square(1, 6, (5, 6), 6, 3, 1, 1, false).grouped(6),
            Conv2dConfig::square(2, 3, (4, 5), 9, 1, 1, 0, true).grouped(3),
        ];
        // Deterministic values in [-1, 1] without a random-number crate.
        let vals = |n: usize, seed: usize| -> Vec<f64> {
            (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2001) as f64 / 1000.0) - 1.0).collect()
        };
        for (k, g) in cases.iter().enumerate() {
            let full = Conv2dConfig { groups: 1, ..*g };
            let khw = g.kh * g.kw;
            let (x, w, b) = (
                vals(g.input_shape().iter().product(), k),
                vals(g.weight_shape().iter().product(), k + 10),
                vals(g.c_out, k + 20),
            );
            let dy = vals(g.output_shape().iter().product(), k + 30);
            // The block-diagonal weight [c_out, c_in, kh, kw].
            let mut wf = vec![0.0; g.c_out * g.c_in * khw];
            // Written out here rather than through in_channel, so that a wrong group mapping in
            // the oracle cannot agree with itself.
            let (per_in, per_out) = (g.c_in / g.groups, g.c_out / g.groups);
            let column = |co: usize, cl: usize| (co / per_out) * per_in + cl;
            for co in 0..g.c_out {
                for cl in 0..g.c_in_group() {
                    let ci = column(co, cl);
                    for t in 0..khw {
                        wf[(co * g.c_in + ci) * khw + t] = w[(co * g.c_in_group() + cl) * khw + t];
                    }
                }
            }
            let close = |what: &str, a: &[f64], b: &[f64]| {
                assert_eq!(a.len(), b.len(), "case {k} {what}");
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    assert!((x - y).abs() <= 1e-12, "case {k} {what}[{i}]: grouped {x} ungrouped {y}");
                }
            };
            let bias = g.bias.then_some(&b[..]);
            close("forward", &conv2d_forward(g, &x, &w, bias), &conv2d_forward(&full, &x, &wf, bias));
            close("backward_input", &conv2d_backward_input(g, &dy, &w), &conv2d_backward_input(&full, &dy, &wf));
            let dwf = conv2d_backward_weight(&full, &x, &dy);
            let dw_block: Vec<f64> = (0..g.c_out)
                .flat_map(|co| (0..g.c_in_group()).map(move |cl| (co, cl)))
                .flat_map(|(co, cl)| {
                    let ci = column(co, cl);
                    (0..khw).map(move |t| (co * g.c_in + ci) * khw + t)
                })
                .map(|i| dwf[i])
                .collect();
            close("backward_weight", &conv2d_backward_weight(g, &x, &dy), &dw_block);
        }
    }
}
