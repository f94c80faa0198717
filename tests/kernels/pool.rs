//! Pooling: max pooling and global average pooling.

use crate::common::*;
use senet_wgpu::ops::pool::{self, MaxPool2dConfig};
use senet_wgpu::reference;

pub(crate) fn pool_cases() -> Vec<MaxPool2dConfig> {
    let mk = |n, c, h, w, k: usize, s: usize, p: usize| MaxPool2dConfig {
        n,
        c,
        h,
        w,
        kernel: (k, k),
        stride: (s, s),
        pad: (p, p),
        ceil: false,
    };
    let ceil = |c: MaxPool2dConfig| MaxPool2dConfig { ceil: true, ..c };
    vec![
        MaxPool2dConfig::two_by_two(1, 1, 5, 7), // batch 1, odd sizes floor: 5x7 -> 2x3
        MaxPool2dConfig::two_by_two(3, 4, 4, 4),
        mk(2, 3, 8, 6, 3, 2, 1), // overlapping windows with padding
        mk(2, 2, 7, 7, 3, 1, 1), // heavy overlap: every input in up to 9 windows
        MaxPool2dConfig { n: 1, c: 5, h: 9, w: 6, kernel: (3, 2), stride: (2, 1), pad: (1, 0), ceil: false },
        // Ceil mode (SENet-154's stem pool, 3x3/2 unpadded): an 8x10 input pools to 4x5 (floor:
        // 3x4), the last row and column of windows hanging over the edge by one.
        ceil(mk(2, 3, 8, 10, 3, 2, 0)),
        // Odd sizes, where ceil and floor agree (7 → 3), and a padded ceil pool whose last window
        // would start in the padding and is dropped (5, k2 s2 p1: 3 outputs, not the 4 of bare ceil).
        ceil(mk(1, 2, 7, 5, 3, 2, 0)),
        ceil(mk(1, 2, 5, 6, 2, 2, 1)),
    ]
}

/// Output sizes as PyTorch's `MaxPool2d(k, s, p, ceil_mode=True)` gives them on an h×h input
/// (printed by torch 2.x), with floor mode's beside: (h, k, s, p, ceil, floor).
#[test]
fn max_pool2d_ceil_sizes_are_pytorchs() {
    let torch = [
        (8, 3, 2, 0, 4, 3),
        (10, 3, 2, 0, 5, 4),
        (7, 3, 2, 0, 3, 3),
        (5, 2, 2, 1, 3, 3),
        (6, 2, 2, 1, 4, 4),
        (112, 3, 2, 0, 56, 55),
        (16, 3, 2, 0, 8, 7),
    ];
    for (h, k, s, p, want_ceil, want_floor) in torch {
        let cfg = MaxPool2dConfig { n: 1, c: 1, h, w: h, kernel: (k, k), stride: (s, s), pad: (p, p), ceil: true };
        assert_eq!((cfg.out_h(), cfg.out_w()), (want_ceil, want_ceil), "ceil {cfg:?}");
        let floor = MaxPool2dConfig { ceil: false, ..cfg };
        assert_eq!(floor.out_h(), want_floor, "floor {floor:?}");
    }
}

#[test]
fn max_pool2d_matches_reference() {
    let gpu = gpu();
    for (i, cfg) in pool_cases().iter().enumerate() {
        // Twice per shape: distinct values, then values from {0, 1, 2} so ties decide the argmax.
        for ties in [false, true] {
            let mut r = rng(500 + i as u64);
            let numel: usize = cfg.input_shape().iter().product();
            let x: Vec<f32> = if ties {
                (0..numel).map(|_| (rand::Rng::random_range(&mut r, 0..3)) as f32).collect()
            } else {
                uniform(&mut r, numel, -1.0, 1.0)
            };
            let out_n: usize = cfg.output_shape().iter().product();
            let dy = uniform(&mut r, out_n, -1.0, 1.0);
            let tx = upload(&gpu, "x", &cfg.input_shape(), &x);
            let ty = zeros(&gpu, "y", &cfg.output_shape());
            let targ = zeros(&gpu, "argmax", &cfg.output_shape());
            run(&gpu, &pool::max_pool2d_forward(&gpu, cfg, &tx, &ty, &targ).unwrap());
            let (y, arg) = reference::pool::max_pool2d_forward(cfg, &to_f64(&x));
            // Exact: a max selects, it does not round.
            assert_close(&format!("max_pool2d_forward case {i} ties={ties}"), &read(&gpu, &ty), &y, 0.0, 0.0);
            assert_eq!(targ.read::<u32>(&gpu).unwrap(), arg, "max_pool2d argmax case {i} ties={ties} {cfg:?}");

            let tdy = upload(&gpu, "dy", &cfg.output_shape(), &dy);
            let tdx = zeros(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &pool::max_pool2d_backward(&gpu, cfg, &targ, &tdy, &tdx).unwrap());
            // Sums of at most 9 gradients (overlapping windows), in a different order from the reference.
            let want = reference::pool::max_pool2d_backward(cfg, &arg, &to_f64(&dy));
            assert_close(&format!("max_pool2d_backward case {i} ties={ties}"), &read(&gpu, &tdx), &want, 1e-6, 1e-6);
        }
    }
}

#[test]
fn global_avg_pool_matches_reference() {
    let gpu = gpu();
    for (i, shape) in [[1, 3, 5, 7], [4, 1024, 2, 2], [2, 64, 32, 32], [3, 10, 1, 1]].into_iter().enumerate() {
        let mut r = rng(600 + i as u64);
        let x = uniform(&mut r, shape.iter().product(), -1.0, 1.0);
        let dy = uniform(&mut r, shape[0] * shape[1], -1.0, 1.0);
        let tx = upload(&gpu, "x", &shape, &x);
        let ty = zeros(&gpu, "y", &shape[..2]);
        run(&gpu, &pool::global_avg_pool_forward(&gpu, &tx, &ty).unwrap());
        // A mean of at most 1,024 values in [-1, 1]: f32 rounding ~1e-7.
        assert_close(
            &format!("global_avg_pool_forward {shape:?}"),
            &read(&gpu, &ty),
            &reference::pool::global_avg_pool_forward(shape, &to_f64(&x)),
            1e-6,
            1e-6,
        );
        let tdy = upload(&gpu, "dy", &shape[..2], &dy);
        let tdx = zeros(&gpu, "dx", &shape);
        run(&gpu, &pool::global_avg_pool_backward(&gpu, &tdy, &tdx).unwrap());
        assert_close(
            &format!("global_avg_pool_backward {shape:?}"),
            &read(&gpu, &tdx),
            &reference::pool::global_avg_pool_backward(shape, &to_f64(&dy)),
            1e-7,
            1e-6,
        );
    }
}

/// pool.wgsl's AFFINE prologue (a batch norm from its running statistics and its ReLU, applied as
/// each value is loaded; the base SENet's evaluation pass after its SE block) on every pool case,
/// f32 and f16: bit for bit `batch_norm_forward_eval` with its ReLU then `max_pool2d_forward`,
/// and the f64 reference within 1e-5 (f32: one normalisation's rounding, values O(1)) or half
/// an f16 ulp more (f16). Argmaxes agree with the composed kernels exactly; against the
/// reference, where the ReLU leaves a window all zero the first element wins in both.
#[test]
fn max_pool2d_with_a_batch_norm_prologue_is_the_batch_norm_then_the_pool() {
    use crate::{F16_RTOL, read_f16, upload_f16};
    use senet_wgpu::ops::batch_norm::{self, BatchNormConfig, BnForward};
    let gpu = gpu();
    for (i, cfg) in pool_cases().iter().enumerate() {
        for f16 in [false, true] {
            let mut r = rng(800 + i as u64);
            let numel: usize = cfg.input_shape().iter().product();
            let x = uniform(&mut r, numel, -2.0, 3.0);
            let x = if f16 { x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect() } else { x };
            let [gamma, beta, mean] =
                [(0.5, 1.5), (-0.5, 0.5), (-0.3, 0.3)].map(|(lo, hi)| uniform(&mut r, cfg.c, lo, hi));
            let var = uniform(&mut r, cfg.c, 0.5, 2.0);
            let act = |label: &str, shape: &[usize]| {
                if f16 { zeros_f16(&gpu, label, shape) } else { zeros(&gpu, label, shape) }
            };
            let tx = if f16 {
                upload_f16(&gpu, "x", &cfg.input_shape(), &x)
            } else {
                upload(&gpu, "x", &cfg.input_shape(), &x)
            };
            let [tg, tb, tm, tv] = [&gamma, &beta, &mean, &var].map(|v| upload(&gpu, "bn", &[cfg.c], v));
            let eps = BatchNormConfig::new(1, 1, 1, 1).eps;
            let (out, argmax) = (act("out", &cfg.output_shape()), zeros(&gpu, "argmax", &cfg.output_shape()));
            let affine = pool::PoolAffine { gamma: &tg, beta: &tb, running_mean: &tm, running_var: &tv, eps };
            run(&gpu, &pool::max_pool2d_forward_affine(&gpu, cfg, [&tx, &out, &argmax], &affine).unwrap());
            // The batch norm (eval, its ReLU fused) then the pool.
            let bn = BatchNormConfig::new(cfg.n, cfg.c, cfg.h, cfg.w).with_relu();
            let (y, stats) = (act("bn out", &cfg.input_shape()), zeros(&gpu, "stats", &[2, cfg.c]));
            let t = BnForward {
                inp: &tx,
                gamma: &tg,
                beta: &tb,
                running_mean: &tm,
                running_var: &tv,
                stats: &stats,
                out: &y,
            };
            run(&gpu, &batch_norm::batch_norm_forward_eval(&gpu, &bn, &t).unwrap());
            let (out2, argmax2) = (act("out 2", &cfg.output_shape()), zeros(&gpu, "argmax 2", &cfg.output_shape()));
            run(&gpu, &pool::max_pool2d_forward(&gpu, cfg, &y, &out2, &argmax2).unwrap());
            let what = format!("case {i} (f16 {f16}) {cfg:?}");
            let read_act = |t| if f16 { read_f16(&gpu, t) } else { read(&gpu, t) };
            let (got, apart) = (read_act(&out), read_act(&out2));
            assert!(
                got.iter().zip(&apart).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: pooled values differ from BN then pool"
            );
            let (am, am2) = (argmax.read::<u32>(&gpu).unwrap(), argmax2.read::<u32>(&gpu).unwrap());
            assert_eq!(am, am2, "{what}: argmax differs from BN then pool");
            let (want, _) = reference::pool::max_pool2d_forward_affine(
                cfg,
                &to_f64(&x),
                &to_f64(&gamma),
                &to_f64(&beta),
                &to_f64(&mean),
                &to_f64(&var),
                eps,
            );
            let tol = if f16 { 1e-5 + F16_RTOL } else { 1e-5 };
            assert_close(&what, &got, &want, tol, tol);
        }
    }
}
