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

/// The classifier's input gradient spread over the global average pool before it
/// (`linear_backward_spread`, linear.wgsl's SPREAD_HW; `--fuse on`): bit for bit
/// linear_backward_input then global_avg_pool_backward, in f32 and f16, and against the f64
/// reference of the two (CONV tolerances in f32, as the linear test; f16 adds the two
/// roundings, 2 half-ulps relative), with the weight gradients unchanged. Pools of 1×1, 3×5
/// (odd, non-square) and 7×7 pixels; batch 1; 1,024 features.
#[test]
fn linear_backward_spread_is_linear_then_pool_backward_bit_for_bit() {
    use senet_wgpu::ops::pool;
    let gpu = gpu();
    let cases = [
        (LinearConfig { n: 1, in_features: 7, out_features: 3, bias: true }, 1usize, 1usize),
        (LinearConfig { n: 5, in_features: 64, out_features: 10, bias: true }, 3, 5),
        (LinearConfig { n: 3, in_features: 1024, out_features: 10, bias: false }, 7, 7),
    ];
    for f16 in [false, true] {
        for (i, (cfg, h, w)) in cases.iter().enumerate() {
            let what = format!("spread case {i} ({h}x{w}, f16 {f16})");
            let mut r = rng(820 + i as u64);
            let x = uniform(&mut r, cfg.n * cfg.in_features, -1.0, 1.0);
            let wt = uniform(&mut r, cfg.out_features * cfg.in_features, -1.0, 1.0);
            let dy = uniform(&mut r, cfg.n * cfg.out_features, -1.0, 1.0);
            let act = |label: &str, shape: &[usize], v: &[f32]| {
                if f16 { crate::upload_f16(&gpu, label, shape, v) } else { upload(&gpu, label, shape, v) }
            };
            let act_zeros = |label: &str, shape: &[usize]| {
                if f16 { zeros_f16(&gpu, label, shape) } else { zeros(&gpu, label, shape) }
            };
            let read_act = |t: &senet_wgpu::gpu::Tensor| if f16 { crate::read_f16(&gpu, t) } else { read(&gpu, t) };
            let (tx, tdy) = (act("x", &[cfg.n, cfg.in_features], &x), act("dy", &[cfg.n, cfg.out_features], &dy));
            let tw = upload(&gpu, "w", &[cfg.out_features, cfg.in_features], &wt);
            let pooled = [cfg.n, cfg.in_features, *h, *w];
            let grads = |label: &str| {
                (zeros(&gpu, label, &[cfg.out_features, cfg.in_features]), zeros(&gpu, label, &[cfg.out_features]))
            };
            // The two passes.
            let (tdw2, tdb2) = grads("two passes");
            let tdpool = act_zeros("pooled grad", &[cfg.n, cfg.in_features]);
            let tdx2 = act_zeros("pool dinp, two passes", &pooled);
            let db2 = cfg.bias.then_some(&tdb2);
            run(&gpu, &linear::linear_backward(&gpu, cfg, &tx, &tw, &tdy, &tdpool, &tdw2, db2).unwrap());
            run(&gpu, &pool::global_avg_pool_backward(&gpu, &tdpool, &tdx2).unwrap());
            // The spread one.
            let (tdw1, tdb1) = grads("spread");
            let tdx1 = act_zeros("pool dinp, spread", &pooled);
            let d = linear::linear_backward_spread(&gpu, cfg, &tx, &tw, &tdy, &tdx1, &tdw1, cfg.bias.then_some(&tdb1))
                .unwrap();
            assert_eq!(d.len(), 2, "{what}: the input and weight gradients, no pool pass");
            run(&gpu, &d);
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(bits(read_act(&tdx1)), bits(read_act(&tdx2)), "{what}: the pool's input gradient");
            assert_eq!(bits(read(&gpu, &tdw1)), bits(read(&gpu, &tdw2)), "{what}: dweight");
            assert_eq!(bits(read(&gpu, &tdb1)), bits(read(&gpu, &tdb2)), "{what}: dbias");
            let xs = if f16 { crate::f16_values(&x) } else { x.clone() };
            let dys = if f16 { crate::f16_values(&dy) } else { dy.clone() };
            let (dpool, _, _) = reference::linear::linear_backward(cfg, &to_f64(&xs), &to_f64(&wt), &to_f64(&dys));
            let want = reference::pool::global_avg_pool_backward(pooled, &dpool);
            let (atol, rtol) = if f16 { (CONV_ATOL, 2.0 * 4.9e-4) } else { (CONV_ATOL, CONV_RTOL) };
            assert_close(&format!("{what}: against the reference"), &read_act(&tdx1), &want, atol, rtol);
        }
    }
}
