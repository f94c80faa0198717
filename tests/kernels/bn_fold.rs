//! `bn_fold`: a batch norm in evaluation folded into the convolution before it, several pairs in
//! one dispatch at unaligned offsets of shared buffers, f32 and f16.

use crate::common::*;
use crate::{F16_ATOL, F16_RTOL, gpu_f16, read_f16};
use senet_wgpu::gpu::{Dtype, Gpu, Tensor};
use senet_wgpu::ops::bn_fold::{self, FoldBuffers, FoldEntry};
use senet_wgpu::reference;

/// (channels, weights per channel, has bias): a 1x1 layer of 1 channel, channel counts of no
/// tile's multiple, a depthwise 3x3 row (k = 9), a grouped 3x3 (c_in/g = 3: k = 27), and one
/// pair spanning several 256-wide workgroups.
const PAIRS: [(usize, usize, bool); 5] = [(1, 1, true), (7, 27, false), (5, 9, true), (13, 3, false), (33, 75, true)];

/// Host-side copies of what the buffers hold, and the pairs' offsets (each tensor placed after a
/// gap of 3 values, so no offset is aligned to anything).
struct Case {
    params: Vec<f32>,
    stats: Vec<f32>,
    entries: Vec<FoldEntry>,
    weights_len: usize,
    biases_len: usize,
}

fn case(seed: u64) -> Case {
    let mut r = rng(seed);
    let (mut params, mut stats) = (Vec::new(), Vec::new());
    let (mut wl, mut bl) = (5usize, 2usize);
    let mut entries = Vec::new();
    let put = |v: &mut Vec<f32>, x: Vec<f32>| {
        v.extend([0.0; 3]);
        let at = v.len();
        v.extend(x);
        at
    };
    for (c, k, bias) in PAIRS {
        let weight = put(&mut params, uniform(&mut r, c * k, -1.0, 1.0));
        let bias = bias.then(|| put(&mut params, uniform(&mut r, c, -1.0, 1.0)));
        let gamma = put(&mut params, uniform(&mut r, c, 0.2, 2.0));
        let beta = put(&mut params, uniform(&mut r, c, -1.0, 1.0));
        let mean = put(&mut stats, uniform(&mut r, c, -1.0, 1.0));
        // Variances 0.01..4: scales s up to 20.
        let var = put(&mut stats, uniform(&mut r, c, 0.01, 4.0));
        entries.push(FoldEntry { c, k, weight, bias, gamma, beta, mean, var, out_weight: wl, out_bias: bl, eps: 1e-5 });
        (wl, bl) = (wl + c * k + 3, bl + c + 3);
    }
    Case { params, stats, entries, weights_len: wl, biases_len: bl }
}

/// The reference's folded weights and biases of every pair.
fn want(c: &Case) -> Vec<(Vec<f64>, Vec<f64>)> {
    let (p, s) = (to_f64(&c.params), to_f64(&c.stats));
    c.entries
        .iter()
        .map(|e| {
            let r = |v: &[f64], at: usize, len: usize| v[at..at + len].to_vec();
            let bias = e.bias.map(|b| r(&p, b, e.c));
            reference::bn_fold::bn_fold_forward(
                &r(&p, e.weight, e.c * e.k),
                bias.as_deref(),
                &r(&p, e.gamma, e.c),
                &r(&p, e.beta, e.c),
                &r(&s, e.mean, e.c),
                &r(&s, e.var, e.c),
                e.eps,
            )
        })
        .collect()
}

/// Runs the fold into weights of `dtype`; returns (weights, biases) read back.
fn run_fold(gpu: &Gpu, c: &Case, dtype: Dtype) -> (Vec<f32>, Vec<f32>) {
    let params = upload(gpu, "params", &[c.params.len()], &c.params);
    let stats = upload(gpu, "stats", &[c.stats.len()], &c.stats);
    let weights = Tensor::zeros_of(gpu, "folded weights", &[c.weights_len], dtype).unwrap();
    let biases = zeros(gpu, "folded biases", &[c.biases_len]);
    let b = FoldBuffers { params: &params, stats: &stats, weights: &weights, biases: &biases };
    let d = bn_fold::bn_fold_forward(gpu, &c.entries, &b).unwrap();
    assert_eq!(d.len(), 1, "every pair in one dispatch");
    run(gpu, &d);
    let w = if dtype == Dtype::F16 { read_f16(gpu, &weights) } else { read(gpu, &weights) };
    (w, read(gpu, &biases))
}

/// Each pair's slices against the reference. f32: w·s is one product of two f32 roundings
/// (s = gamma·(1/sqrt(var + eps)): the sqrt and the division each within an ulp), so the
/// relative error is a few 1e-7: rtol 1e-6. The bias beta − (mean − b)·s cancels when beta ≈
/// (mean − b)·s; its error is bounded by ulps of the terms (|s| ≤ 20 here, terms ≤ 40, a few
/// ulps of 40 ≈ 1.5e-5): atol 5e-5 plus rtol 1e-6. f16 weights add half an f16
/// ulp (F16_RTOL) and the subnormal spacing. An indexing bug (wrong channel's s, a pair's
/// offsets crossed) is off by O(1) relative.
fn check(what: &str, c: &Case, (w, b): &(Vec<f32>, Vec<f32>), (w_atol, w_rtol): (f64, f64)) {
    for (i, (e, (ww, wb))) in c.entries.iter().zip(want(c)).enumerate() {
        let got_w = &w[e.out_weight..e.out_weight + e.c * e.k];
        assert_close(&format!("{what} pair {i} weight"), got_w, &ww, w_atol, w_rtol);
        assert_close(&format!("{what} pair {i} bias"), &b[e.out_bias..e.out_bias + e.c], &wb, 5e-5, 1e-6);
    }
    // The gaps stay untouched (zero).
    let mut written = vec![false; w.len()];
    for e in &c.entries {
        written[e.out_weight..e.out_weight + e.c * e.k].fill(true);
    }
    assert!(w.iter().zip(&written).all(|(&v, &x)| x || v == 0.0), "{what}: wrote outside the pairs' weights");
}

#[test]
fn bn_fold_matches_reference() {
    let gpu = gpu();
    let c = case(700);
    check("bn_fold f32", &c, &run_fold(&gpu, &c, Dtype::F32), (0.0, 1e-6));
}

#[test]
fn f16_bn_fold_matches_reference() {
    let gpu = gpu_f16();
    let c = case(701);
    check("bn_fold f16", &c, &run_fold(&gpu, &c, Dtype::F16), (F16_ATOL, 1e-6 + F16_RTOL));
}

/// A pair reaching past its buffer is a host error naming the pair and the buffer.
#[test]
fn bn_fold_rejects_out_of_range_pairs() {
    let gpu = gpu();
    let mut c = case(702);
    c.entries[2].out_weight = c.weights_len - 1;
    let params = upload(&gpu, "params", &[c.params.len()], &c.params);
    let stats = upload(&gpu, "stats", &[c.stats.len()], &c.stats);
    let (weights, biases) = (zeros(&gpu, "folded weights", &[c.weights_len]), zeros(&gpu, "biases", &[c.biases_len]));
    let b = FoldBuffers { params: &params, stats: &stats, weights: &weights, biases: &biases };
    let e = bn_fold::bn_fold_forward(&gpu, &c.entries, &b).unwrap_err().to_string();
    assert!(e.contains("pair 2") && e.contains("folded weights"), "{e}");
}

/// eps inside the square root, as torch's eval-mode batch norm: running variances 0, 1e-6 and 1
/// (where 1/sqrt(var) + eps or a dropped eps differ from 1/sqrt(var + eps) by far more than
/// rounding; var 0 gives s = gamma/sqrt(1e-5) ≈ 316·gamma). Weights rtol 1e-6; biases up to
/// ~630 in size, so atol 5e-4 (a few f32 ulps of 630) plus rtol 1e-6.
#[test]
fn bn_fold_puts_eps_inside_the_square_root() {
    let gpu = gpu();
    // params: weight [3, 2], bias [3], gamma [3], beta [3]; stats: mean [3], var [3].
    let params = [0.5f32, -1.0, 0.25, 2.0, -0.75, 1.5, 0.1, -0.2, 0.3, 1.0, 0.5, 2.0, 0.0, 0.25, -0.5];
    let stats = [1.0f32, -0.5, 0.25, 0.0, 1e-6, 1.0];
    let e = FoldEntry {
        c: 3,
        k: 2,
        weight: 0,
        bias: Some(6),
        gamma: 9,
        beta: 12,
        mean: 0,
        var: 3,
        out_weight: 0,
        out_bias: 0,
        eps: 1e-5,
    };
    let c = Case { params: params.to_vec(), stats: stats.to_vec(), entries: vec![e], weights_len: 6, biases_len: 3 };
    let (w, b) = run_fold(&gpu, &c, Dtype::F32);
    let (ww, wb) = want(&c).remove(0);
    assert_close("bn_fold weight, variances 0 / 1e-6 / 1", &w, &ww, 0.0, 1e-6);
    assert_close("bn_fold bias, variances 0 / 1e-6 / 1", &b, &wb, 5e-4, 1e-6);
}

/// The oracle itself: the f64 convolution with the folded weight and bias equals the f64 batch
/// norm (eval) of the f64 convolution, on every conv case (batch 1, odd planes, stride, dilation,
/// groups, bias or none), to 1e-12 relative — the identity the fold rests on, with no GPU.
#[test]
fn bn_fold_reference_equals_batch_norm_after_convolution() {
    use senet_wgpu::ops::batch_norm::BatchNormConfig;
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(720 + i as u64);
        let mut v = |n: usize, lo: f32, hi: f32| to_f64(&uniform(&mut r, n, lo, hi));
        let (x, w, b) = (
            v(cfg.input_shape().iter().product(), -1.0, 1.0),
            v(cfg.weight_shape().iter().product(), -1.0, 1.0),
            v(cfg.c_out, -1.0, 1.0),
        );
        let (g, beta, mean, var) =
            (v(cfg.c_out, 0.5, 1.5), v(cfg.c_out, -0.5, 0.5), v(cfg.c_out, -0.5, 0.5), v(cfg.c_out, 0.0, 2.0));
        let bias = cfg.bias.then_some(&b[..]);
        let y = reference::conv2d::conv2d_forward(cfg, &x, &w, bias);
        let [n, c, h, wd] = cfg.output_shape();
        let want = reference::batch_norm::batch_norm_forward_eval(
            &BatchNormConfig::new(n, c, h, wd),
            &y,
            &g,
            &beta,
            &mean,
            &var,
        );
        let (fw, fb) = reference::bn_fold::bn_fold_forward(&w, bias, &g, &beta, &mean, &var, 1e-5);
        let got = reference::conv2d::conv2d_forward(
            &senet_wgpu::ops::conv2d::Conv2dConfig { bias: true, ..*cfg },
            &x,
            &fw,
            Some(&fb),
        );
        assert_close64(&format!("folded reference case {i} {cfg:?}"), &got, &want, 1e-12, 1e-12);
    }
}
