//! The CPU reference gradients, checked against central finite differences in f64.
//!
//! For each op, a scalar L = sum_i r_i * out_i with fixed random r; its gradient with respect to
//! every input is r pushed through the reference backward. Each input element (all of them for
//! small tensors, 48 sampled otherwise) is nudged by ±h, h = 1e-5:
//! the central difference has truncation error O(h²·f''') ~ 1e-10 and rounding error
//! ~ eps·|L|/h ~ 1e-10, so |fd - analytic| <= 1e-7 + 1e-6·|analytic| is ~1000x above both and far
//! below any real mistake in a formula (which shows at 1e-2 or more).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use senet_wgpu::ops::batch_norm::BatchNormConfig;
use senet_wgpu::ops::conv2d::Conv2dConfig;
use senet_wgpu::ops::linear::LinearConfig;
use senet_wgpu::ops::pool::MaxPool2dConfig;
use senet_wgpu::ops::se_block::SeBlockConfig;
use senet_wgpu::reference::{batch_norm, conv2d, cross_entropy, linear, pool, relu, se_block};

const H: f64 = 1e-5;
const ATOL: f64 = 1e-7;
const RTOL: f64 = 1e-6;

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compare `analytic` (dL/dx) with central differences of `loss` around `x`.
fn check(what: &str, x: &[f64], analytic: &[f64], loss: impl Fn(&[f64]) -> f64, rng: &mut ChaCha8Rng) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let idx: Vec<usize> =
        if x.len() <= 96 { (0..x.len()).collect() } else { (0..48).map(|_| rng.random_range(0..x.len())).collect() };
    let mut xp = x.to_vec();
    for &i in &idx {
        xp[i] = x[i] + H;
        let up = loss(&xp);
        xp[i] = x[i] - H;
        let down = loss(&xp);
        xp[i] = x[i];
        let fd = (up - down) / (2.0 * H);
        let a = analytic[i];
        assert!(
            (fd - a).abs() <= ATOL + RTOL * a.abs(),
            "{what}[{i}]: finite difference {fd:.10e}, reference gradient {a:.10e}"
        );
    }
}

#[test]
fn conv2d_gradients() {
    let cases = [
        Conv2dConfig::square(1, 2, (5, 4), 3, 3, 1, 1, true),
        Conv2dConfig {
            n: 2,
            c_in: 3,
            h: 7,
            w: 6,
            c_out: 2,
            kh: 3,
            kw: 2,
            stride: (2, 1),
            pad: (1, 0),
            dilation: (1, 2),
            groups: 1,
            bias: true,
        },
        // grouped: 4 -> 6 channels in 2 groups, stride 2; depthwise 3 channels, dilation 2
        Conv2dConfig::square(2, 4, (6, 5), 6, 3, 2, 1, true).grouped(2),
        Conv2dConfig {
            dilation: (2, 2),
            pad: (2, 2),
            ..Conv2dConfig::square(1, 3, (5, 6), 3, 3, 1, 1, true).grouped(3)
        },
    ];
    for (k, c) in cases.iter().enumerate() {
        let mut r = ChaCha8Rng::seed_from_u64(k as u64);
        let x = rand_vec(&mut r, c.input_shape().iter().product(), -1.0, 1.0);
        let w = rand_vec(&mut r, c.weight_shape().iter().product(), -1.0, 1.0);
        let b = rand_vec(&mut r, c.c_out, -1.0, 1.0);
        let rr = rand_vec(&mut r, c.output_shape().iter().product(), -1.0, 1.0);
        let l = |x: &[f64], w: &[f64], b: &[f64]| dot(&rr, &conv2d::conv2d_forward(c, x, w, Some(b)));
        check("conv2d dinp", &x, &conv2d::conv2d_backward_input(c, &rr, &w), |v| l(v, &w, &b), &mut r);
        check("conv2d dweight", &w, &conv2d::conv2d_backward_weight(c, &x, &rr), |v| l(&x, v, &b), &mut r);
        check("conv2d dbias", &b, &conv2d::conv2d_backward_bias(c, &rr), |v| l(&x, &w, v), &mut r);
    }
}

#[test]
fn batch_norm_gradients() {
    for (k, c) in [BatchNormConfig::new(2, 3, 3, 5), BatchNormConfig::new(1, 2, 4, 1)].iter().enumerate() {
        let mut r = ChaCha8Rng::seed_from_u64(10 + k as u64);
        let n: usize = c.shape().iter().product();
        let x = rand_vec(&mut r, n, -2.0, 2.0);
        let g = rand_vec(&mut r, c.c, 0.5, 1.5);
        let b = rand_vec(&mut r, c.c, -0.5, 0.5);
        let (rm, rv) = (vec![0.0; c.c], vec![1.0; c.c]);
        let rr = rand_vec(&mut r, n, -1.0, 1.0);
        let l =
            |x: &[f64], g: &[f64], b: &[f64]| dot(&rr, &batch_norm::batch_norm_forward_train(c, x, g, b, &rm, &rv).out);
        let f = batch_norm::batch_norm_forward_train(c, &x, &g, &b, &rm, &rv);
        let (dx, dg, db) = batch_norm::batch_norm_backward(c, &x, &g, &f.mean, &f.invstd, &rr);
        check("batch_norm dinp", &x, &dx, |v| l(v, &g, &b), &mut r);
        check("batch_norm dgamma", &g, &dg, |v| l(&x, v, &b), &mut r);
        check("batch_norm dbeta", &b, &db, |v| l(&x, &g, v), &mut r);
    }
}

#[test]
fn relu_gradient() {
    let mut r = ChaCha8Rng::seed_from_u64(20);
    // Away from the kink at 0, where the derivative is undefined.
    let x: Vec<f64> =
        rand_vec(&mut r, 50, -1.0, 1.0).into_iter().map(|v| if v.abs() < 1e-2 { 0.5 } else { v }).collect();
    let rr = rand_vec(&mut r, 50, -1.0, 1.0);
    let y = relu::relu_forward(&x);
    check("relu dinp", &x, &relu::relu_backward(&y, &rr), |v| dot(&rr, &relu::relu_forward(v)), &mut r);
}

#[test]
fn pool_gradients() {
    let cases = [
        MaxPool2dConfig::two_by_two(2, 2, 5, 7),
        MaxPool2dConfig { n: 1, c: 2, h: 7, w: 6, kernel: (3, 3), stride: (2, 1), pad: (1, 1), ceil: false },
        // Ceil mode: the last windows hang over the bottom and right edges.
        MaxPool2dConfig { n: 1, c: 2, h: 6, w: 8, kernel: (3, 3), stride: (2, 2), pad: (0, 0), ceil: true },
    ];
    for (k, c) in cases.iter().enumerate() {
        let mut r = ChaCha8Rng::seed_from_u64(30 + k as u64);
        // A shuffled ramp: distinct values 1e-2 apart, so ±h never changes an argmax.
        let n: usize = c.input_shape().iter().product();
        let mut x: Vec<f64> = (0..n).map(|i| i as f64 * 1e-2).collect();
        for i in (1..n).rev() {
            x.swap(i, r.random_range(0..=i));
        }
        let rr = rand_vec(&mut r, c.output_shape().iter().product(), -1.0, 1.0);
        let (_, arg) = pool::max_pool2d_forward(c, &x);
        check(
            "max_pool2d dinp",
            &x,
            &pool::max_pool2d_backward(c, &arg, &rr),
            |v| dot(&rr, &pool::max_pool2d_forward(c, v).0),
            &mut r,
        );
    }
    let shape = [2, 3, 3, 5];
    let mut r = ChaCha8Rng::seed_from_u64(39);
    let x = rand_vec(&mut r, shape.iter().product(), -1.0, 1.0);
    let rr = rand_vec(&mut r, 6, -1.0, 1.0);
    check(
        "global_avg_pool dinp",
        &x,
        &pool::global_avg_pool_backward(shape, &rr),
        |v| dot(&rr, &pool::global_avg_pool_forward(shape, v)),
        &mut r,
    );
}

#[test]
fn se_block_gradients() {
    let cases = [
        SeBlockConfig { n: 2, c: 6, h: 3, w: 2, hidden: 3, bias: true, variant: Default::default() },
        SeBlockConfig { n: 3, c: 5, h: 1, w: 3, hidden: 2, bias: false, variant: Default::default() },
    ];
    for (k, c) in cases.iter().enumerate() {
        let mut r = ChaCha8Rng::seed_from_u64(40 + k as u64);
        let (ch, cr) = (c.c, c.hidden());
        let x = rand_vec(&mut r, c.shape().iter().product(), -1.0, 2.0);
        let w1 = rand_vec(&mut r, cr * ch, -1.0, 1.0);
        let w2 = rand_vec(&mut r, ch * cr, -1.0, 1.0);
        let b1 = rand_vec(&mut r, cr, -0.5, 0.5);
        let b2 = rand_vec(&mut r, ch, -0.5, 0.5);
        let rr = rand_vec(&mut r, x.len(), -1.0, 1.0);
        let params = |w1: &'_ [f64], b1: &'_ [f64], w2: &'_ [f64], b2: &'_ [f64]| -> f64 {
            let p = se_block::SeParams { w1, b1: c.bias.then_some(b1), w2, b2: c.bias.then_some(b2) };
            dot(&rr, &se_block::se_block_forward(c, &x, &p).out)
        };
        let p = se_block::SeParams { w1: &w1, b1: c.bias.then_some(&b1[..]), w2: &w2, b2: c.bias.then_some(&b2[..]) };
        let f = se_block::se_block_forward(c, &x, &p);
        // The ReLU inside must not sit at its kink for the finite difference to mean anything.
        for h in &f.h {
            assert!(*h == 0.0 || *h > 1e-3, "case {k}: hidden activation {h} too close to the ReLU kink");
        }
        let g = se_block::se_block_backward(c, &x, &p, &f, &rr);
        let lx = |v: &[f64]| dot(&rr, &se_block::se_block_forward(c, v, &p).out);
        check("se_block dinp", &x, &g.dinp, lx, &mut r);
        check("se_block dw1", &w1, &g.dw1, |v| params(v, &b1, &w2, &b2), &mut r);
        check("se_block dw2", &w2, &g.dw2, |v| params(&w1, &b1, v, &b2), &mut r);
        if c.bias {
            check("se_block db1", &b1, &g.db1, |v| params(&w1, v, &w2, &b2), &mut r);
            check("se_block db2", &b2, &g.db2, |v| params(&w1, &b1, &w2, v), &mut r);
        }
    }
}

#[test]
fn linear_gradients() {
    let c = LinearConfig { n: 3, in_features: 7, out_features: 4, bias: true };
    let mut r = ChaCha8Rng::seed_from_u64(50);
    let x = rand_vec(&mut r, 21, -1.0, 1.0);
    let w = rand_vec(&mut r, 28, -1.0, 1.0);
    let b = rand_vec(&mut r, 4, -1.0, 1.0);
    let rr = rand_vec(&mut r, 12, -1.0, 1.0);
    let l = |x: &[f64], w: &[f64], b: &[f64]| dot(&rr, &linear::linear_forward(&c, x, w, Some(b)));
    let (dx, dw, db) = linear::linear_backward(&c, &x, &w, &rr);
    check("linear dinp", &x, &dx, |v| l(v, &w, &b), &mut r);
    check("linear dweight", &w, &dw, |v| l(&x, v, &b), &mut r);
    check("linear dbias", &b, &db, |v| l(&x, &w, v), &mut r);
}

#[test]
fn cross_entropy_gradient() {
    let mut r = ChaCha8Rng::seed_from_u64(60);
    let (n, k) = (4, 5);
    let logits = rand_vec(&mut r, n * k, -3.0, 3.0);
    let target: Vec<u32> = (0..n).map(|_| r.random_range(0..k as u32)).collect();
    let g = cross_entropy::cross_entropy_forward_backward(&logits, &target, k);
    check(
        "cross_entropy dlogits",
        &logits,
        &g.dlogits,
        |v| cross_entropy::cross_entropy_forward_backward(v, &target, k).loss,
        &mut r,
    );
}

/// Label smoothing: the reference's loss is PyTorch's on a case worked by hand, and its gradient
/// matches central differences.
#[test]
fn cross_entropy_label_smoothing_gradient() {
    // F.cross_entropy([[1, 0]], [0], label_smoothing=0.2) = 0.8·CE + 0.2·mean_k(−log p_k)
    // = 0.8·ln(1 + 1/e) + 0.1·(ln(1 + 1/e) + ln(1 + e)).
    let (a, b) = ((1.0 + (-1.0f64).exp()).ln(), (1.0 + 1.0f64.exp()).ln());
    let got = cross_entropy::cross_entropy_forward_backward_smoothed(&[1.0, 0.0], &[0], 2, 0.2).loss;
    assert!((got - (0.8 * a + 0.1 * (a + b))).abs() < 1e-15, "{got}");
    let mut r = ChaCha8Rng::seed_from_u64(61);
    let (n, k) = (4, 5);
    let logits = rand_vec(&mut r, n * k, -3.0, 3.0);
    let target: Vec<u32> = (0..n).map(|_| r.random_range(0..k as u32)).collect();
    let g = cross_entropy::cross_entropy_forward_backward_smoothed(&logits, &target, k, 0.3);
    check(
        "cross_entropy label smoothing dlogits",
        &logits,
        &g.dlogits,
        |v| cross_entropy::cross_entropy_forward_backward_smoothed(v, &target, k, 0.3).loss,
        &mut r,
    );
}

/// The soft-target loss's analytic gradient (Σt ≠ 1 here, so the softmax·Σt term is checked)
/// against central differences.
#[test]
fn cross_entropy_soft_targets_gradient() {
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let (n, k) = (3, 5);
    let logits = rand_vec(&mut rng, n * k, -2.0, 2.0);
    let targets = rand_vec(&mut rng, n * k, 0.0, 0.5);
    let g = cross_entropy::cross_entropy_soft_forward_backward(&logits, &targets, k);
    check(
        "cross_entropy soft targets dlogits",
        &logits,
        &g.dlogits,
        |v| cross_entropy::cross_entropy_soft_forward_backward(v, &targets, k).loss,
        &mut rng,
    );
}

#[test]
fn se_block_ablation_gradients() {
    use senet_wgpu::ops::se_block::{Excitation, SeVariant, Squeeze};
    let mut checked = 0;
    for squeeze in [Squeeze::Avg, Squeeze::Max] {
        for excitation in [Excitation::Sigmoid, Excitation::Tanh, Excitation::Relu] {
            let variant = SeVariant { squeeze, excitation };
            let c = SeBlockConfig { n: 2, c: 6, h: 2, w: 3, hidden: 3, bias: true, variant };
            let mut r = ChaCha8Rng::seed_from_u64(70 + squeeze as u64 * 3 + excitation as u64);
            let (ch, cr) = (c.c, c.hidden());
            // Distinct values 1e-2 apart (a shuffled ramp) so ±h never changes a maximum.
            let mut x: Vec<f64> = (0..c.shape().iter().product::<usize>()).map(|i| i as f64 * 1e-2 - 0.3).collect();
            for i in (1..x.len()).rev() {
                x.swap(i, r.random_range(0..=i));
            }
            let w1 = rand_vec(&mut r, cr * ch, -1.0, 1.0);
            let w2 = rand_vec(&mut r, ch * cr, -1.0, 1.0);
            let b1 = rand_vec(&mut r, cr, -0.5, 0.5);
            let b2 = rand_vec(&mut r, ch, -0.5, 0.5);
            let rr = rand_vec(&mut r, x.len(), -1.0, 1.0);
            let p = se_block::SeParams { w1: &w1, b1: Some(&b1), w2: &w2, b2: Some(&b2) };
            let f = se_block::se_block_forward(&c, &x, &p);
            let g = se_block::se_block_backward(&c, &x, &p, &f, &rr);
            let lx = |v: &[f64]| dot(&rr, &se_block::se_block_forward(&c, v, &p).out);
            let lw1 = |v: &[f64]| dot(&rr, &se_block::se_block_forward(&c, &x, &se_block::SeParams { w1: v, ..p }).out);
            let lw2 = |v: &[f64]| dot(&rr, &se_block::se_block_forward(&c, &x, &se_block::SeParams { w2: v, ..p }).out);
            // Skip a case whose ReLU sits on a kink (the derivative is undefined there).
            if f.h.iter().chain(&f.s).any(|v| v.abs() > 0.0 && v.abs() < 1e-3) {
                continue;
            }
            check(&format!("se {variant:?} dinp"), &x, &g.dinp, lx, &mut r);
            check(&format!("se {variant:?} dw1"), &w1, &g.dw1, lw1, &mut r);
            check(&format!("se {variant:?} dw2"), &w2, &g.dw2, lw2, &mut r);
            checked += 1;
        }
    }
    assert_eq!(checked, 6, "every variant must be checked (none may sit on a ReLU kink with these seeds)");
}
