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
