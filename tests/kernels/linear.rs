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

/// The pooled classifier where one workgroup per sample would loop past what llvmpipe allows one
/// invocation (`Gpu::loop_cap`: 65,535 iterations between all its loops, then every loop ends,
/// silently): 2,048 features at 7 x 7 into 1,000 classes (SE-ResNet-50's head) and into 3,000 (past
/// the cap: unguarded, 1,016 of those outputs came back partial on lavapipe), the first in one
/// dispatch, the second as the pool and the linear pass (one dispatch on an adapter without a cap). All-ones inputs and weights, so every
/// pooled value is 1 and every output 2,048, exactly.
#[test]
fn pooled_linear_sums_every_feature_under_the_drivers_loop_cap() {
    let gpu = gpu();
    for classes in [1000, 3000] {
        let cfg = LinearConfig { n: 2, in_features: 2048, out_features: classes, bias: false };
        let x = upload(&gpu, "x", &[2, 2048, 7, 7], &vec![1.0; 2 * 2048 * 49]);
        let w = upload(&gpu, "w", &[classes, 2048], &vec![1.0; classes * 2048]);
        let (pooled, out) = (zeros(&gpu, "pooled", &[2, 2048]), zeros(&gpu, "out", &[2, classes]));
        let d = linear::linear_forward_pooled(&gpu, &cfg, &x, &pooled, &w, None, &out).unwrap();
        // One dispatch where it fits under the cap (or there is none), the pool and the linear pass
        // past it.
        let past = classes == 3000 && gpu.loop_cap().is_some();
        assert_eq!(d.len(), if past { 2 } else { 1 }, "{classes} classes: dispatches");
        run(&gpu, &d);
        assert_close(&format!("{classes} classes: pooled"), &read(&gpu, &pooled), &vec![1.0; 2 * 2048], 0.0, 0.0);
        assert_close(&format!("{classes} classes: logits"), &read(&gpu, &out), &vec![2048.0; 2 * classes], 0.0, 0.0);
    }
}

/// The global average pool before the classifier taken into it (`--fuse on`): the forward
/// (`linear_forward_pooled`) and the backward (`linear_backward_spread`, the input gradient
/// spread over the pool's pixels) are bit for bit global_avg_pool_forward then linear_forward,
/// and linear_backward then global_avg_pool_backward — outputs, the pooled values the forward
/// stores, every gradient — in f32 and f16, and match the f64 reference of the two passes (CONV
/// tolerances in f32, as the linear test; f16 adds the stored roundings, 2 half-ulps relative).
/// Pools of 1×1, 3×5 (odd, non-square) and 7×7 pixels; batch 1; 1,024 features; and 4,100
/// features, past the forward's workgroup row, where it runs the two passes itself.
#[test]
fn pooled_linear_is_the_pool_and_linear_passes_bit_for_bit() {
    use senet_wgpu::ops::pool;
    let gpu = gpu();
    let cases = [
        (LinearConfig { n: 1, in_features: 7, out_features: 3, bias: true }, 1usize, 1usize),
        (LinearConfig { n: 5, in_features: 64, out_features: 10, bias: true }, 3, 5),
        (LinearConfig { n: 3, in_features: 1024, out_features: 10, bias: false }, 7, 7),
        (LinearConfig { n: 2, in_features: 4100, out_features: 3, bias: true }, 2, 1),
    ];
    for f16 in [false, true] {
        for (i, (cfg, h, w)) in cases.iter().enumerate() {
            let what = format!("pooled linear case {i} ({h}x{w}, {} features, f16 {f16})", cfg.in_features);
            let mut r = rng(820 + i as u64);
            let pooled_shape = [cfg.n, cfg.in_features, *h, *w];
            let x = uniform(&mut r, cfg.n * cfg.in_features * h * w, -1.0, 1.0);
            let wt = uniform(&mut r, cfg.out_features * cfg.in_features, -1.0, 1.0);
            let bias = uniform(&mut r, cfg.out_features, -1.0, 1.0);
            let dy = uniform(&mut r, cfg.n * cfg.out_features, -1.0, 1.0);
            let act = |label: &str, shape: &[usize], v: &[f32]| {
                if f16 { crate::upload_f16(&gpu, label, shape, v) } else { upload(&gpu, label, shape, v) }
            };
            let act_zeros = |label: &str, shape: &[usize]| {
                if f16 { zeros_f16(&gpu, label, shape) } else { zeros(&gpu, label, shape) }
            };
            let read_act = |t: &senet_wgpu::gpu::Tensor| if f16 { crate::read_f16(&gpu, t) } else { read(&gpu, t) };
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let (tx, tdy) = (act("x", &pooled_shape, &x), act("dy", &[cfg.n, cfg.out_features], &dy));
            let (tw, tb) = (
                upload(&gpu, "w", &[cfg.out_features, cfg.in_features], &wt),
                upload(&gpu, "b", &[cfg.out_features], &bias),
            );
            let tb = cfg.bias.then_some(&tb);
            // Forward: the two passes, then the pooled one.
            let (tp2, ty2) = (
                act_zeros("pooled, two passes", &[cfg.n, cfg.in_features]),
                act_zeros("y, two passes", &[cfg.n, cfg.out_features]),
            );
            run(&gpu, &pool::global_avg_pool_forward(&gpu, &tx, &tp2).unwrap());
            run(&gpu, &linear::linear_forward(&gpu, cfg, &tp2, &tw, tb, &ty2).unwrap());
            let (tp1, ty1) =
                (act_zeros("pooled", &[cfg.n, cfg.in_features]), act_zeros("y", &[cfg.n, cfg.out_features]));
            let d = linear::linear_forward_pooled(&gpu, cfg, &tx, &tp1, &tw, tb, &ty1).unwrap();
            let passes = if cfg.in_features > 4096 { 2 } else { 1 };
            assert_eq!(d.len(), passes, "{what}: forward dispatches");
            run(&gpu, &d);
            assert_eq!(bits(read_act(&tp1)), bits(read_act(&tp2)), "{what}: the pooled values");
            assert_eq!(bits(read_act(&ty1)), bits(read_act(&ty2)), "{what}: the output");
            let xs = if f16 { crate::f16_values(&x) } else { x.clone() };
            let pooled_want = reference::pool::global_avg_pool_forward(pooled_shape, &to_f64(&xs));
            let round = |v: Vec<f64>| {
                if f16 { to_f64(&crate::f16_values(&v.iter().map(|&x| x as f32).collect::<Vec<_>>())) } else { v }
            };
            let b64 = to_f64(&bias);
            let want = reference::linear::linear_forward(
                cfg,
                &round(pooled_want.clone()),
                &to_f64(&wt),
                cfg.bias.then_some(&b64[..]),
            );
            let (atol, rtol) = if f16 { (CONV_ATOL, 2.0 * 4.9e-4) } else { (CONV_ATOL, CONV_RTOL) };
            assert_close(&format!("{what}: pooled against the reference"), &read_act(&tp1), &pooled_want, atol, rtol);
            assert_close(&format!("{what}: output against the reference"), &read_act(&ty1), &want, atol, rtol);
            // Backward, from the pooled values the forward stored.
            let grads = |label: &str| {
                (zeros(&gpu, label, &[cfg.out_features, cfg.in_features]), zeros(&gpu, label, &[cfg.out_features]))
            };
            let (tdw2, tdb2) = grads("two passes");
            let tdpool = act_zeros("pooled grad", &[cfg.n, cfg.in_features]);
            let tdx2 = act_zeros("pool dinp, two passes", &pooled_shape);
            let db2 = cfg.bias.then_some(&tdb2);
            run(&gpu, &linear::linear_backward(&gpu, cfg, &tp1, &tw, &tdy, &tdpool, &tdw2, db2).unwrap());
            run(&gpu, &pool::global_avg_pool_backward(&gpu, &tdpool, &tdx2).unwrap());
            let (tdw1, tdb1) = grads("spread");
            let tdx1 = act_zeros("pool dinp, spread", &pooled_shape);
            let d = linear::linear_backward_spread(&gpu, cfg, &tp1, &tw, &tdy, &tdx1, &tdw1, cfg.bias.then_some(&tdb1))
                .unwrap();
            assert_eq!(d.len(), 2, "{what}: the input and weight gradients, no pool pass");
            run(&gpu, &d);
            assert_eq!(bits(read_act(&tdx1)), bits(read_act(&tdx2)), "{what}: the pool's input gradient");
            assert_eq!(bits(read(&gpu, &tdw1)), bits(read(&gpu, &tdw2)), "{what}: dweight");
            assert_eq!(bits(read(&gpu, &tdb1)), bits(read(&gpu, &tdb2)), "{what}: dbias");
            let dys = if f16 { crate::f16_values(&dy) } else { dy.clone() };
            let (dpool, _, _) =
                reference::linear::linear_backward(cfg, &round(pooled_want), &to_f64(&wt), &to_f64(&dys));
            let want = reference::pool::global_avg_pool_backward(pooled_shape, &dpool);
            assert_close(
                &format!("{what}: the pool's input gradient against the reference"),
                &read_act(&tdx1),
                &want,
                atol,
                rtol,
            );
        }
    }
}
