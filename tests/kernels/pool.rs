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
