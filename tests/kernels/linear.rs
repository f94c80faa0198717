//! `linear`: forward and every backward output.

use crate::common::*;
use senet_wgpu::ops::linear::{self, LinearConfig};
use senet_wgpu::reference;

#[test]
fn linear_forward_and_backward_match_reference() {
    let gpu = gpu();
    let cases = [
        LinearConfig { n: 1, in_features: 7, out_features: 3, bias: true },
        LinearConfig { n: 5, in_features: 64, out_features: 10, bias: true },
        LinearConfig { n: 3, in_features: 1024, out_features: 10, bias: true },
        LinearConfig { n: 4, in_features: 9, out_features: 13, bias: false },
    ];
    for (i, cfg) in cases.iter().enumerate() {
        let mut r = rng(800 + i as u64);
        let x = uniform(&mut r, cfg.n * cfg.in_features, -1.0, 1.0);
        let w = uniform(&mut r, cfg.out_features * cfg.in_features, -1.0, 1.0);
        let b = uniform(&mut r, cfg.out_features, -1.0, 1.0);
        let dy = uniform(&mut r, cfg.n * cfg.out_features, -1.0, 1.0);
        let tx = upload(&gpu, "x", &[cfg.n, cfg.in_features], &x);
        let tw = upload(&gpu, "w", &[cfg.out_features, cfg.in_features], &w);
        let tb = upload(&gpu, "b", &[cfg.out_features], &b);
        let ty = zeros(&gpu, "y", &[cfg.n, cfg.out_features]);
        run(&gpu, &linear::linear_forward(&gpu, cfg, &tx, &tw, cfg.bias.then_some(&tb), &ty).unwrap());
        let b64 = to_f64(&b);
        let want = reference::linear::linear_forward(cfg, &to_f64(&x), &to_f64(&w), cfg.bias.then_some(&b64[..]));
        // Sums of up to 1,024 products in [-1, 1]: as conv2d.
        assert_close(&format!("linear_forward case {i}"), &read(&gpu, &ty), &want, CONV_ATOL, CONV_RTOL);

        let tdy = upload(&gpu, "dy", &[cfg.n, cfg.out_features], &dy);
        let tdx = zeros(&gpu, "dx", &[cfg.n, cfg.in_features]);
        let tdw = zeros(&gpu, "dw", &[cfg.out_features, cfg.in_features]);
        let tdb = zeros(&gpu, "db", &[cfg.out_features]);
        run(&gpu, &linear::linear_backward(&gpu, cfg, &tx, &tw, &tdy, &tdx, &tdw, cfg.bias.then_some(&tdb)).unwrap());
        let (dx, dw, db) = reference::linear::linear_backward(cfg, &to_f64(&x), &to_f64(&w), &to_f64(&dy));
        assert_close(&format!("linear_backward dinp case {i}"), &read(&gpu, &tdx), &dx, CONV_ATOL, CONV_RTOL);
        assert_close(&format!("linear_backward dweight case {i}"), &read(&gpu, &tdw), &dw, CONV_ATOL, CONV_RTOL);
        if cfg.bias {
            assert_close(&format!("linear_backward dbias case {i}"), &read(&gpu, &tdb), &db, CONV_ATOL, CONV_RTOL);
        }
    }
}
