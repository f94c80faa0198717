//! The f16 variants of add, relu, pooling and linear.

use crate::common::*;
use crate::pool::pool_cases;
use crate::{F16_ATOL, F16_RTOL, gpu_f16, read_f16, uniform_f16, upload_f16};
use senet_wgpu::ops::add;
use senet_wgpu::ops::linear::{self, LinearConfig};
use senet_wgpu::ops::pool;
use senet_wgpu::ops::relu;
use senet_wgpu::reference;

#[test]
fn f16_elementwise_pooling_and_linear_match_reference() {
    let gpu = gpu_f16();
    let mut r = rng(1800);
    // relu and add: the same f16 values in and out (relu exact; add rounds the exact sum once).
    for shape in [vec![1usize], vec![2, 3, 5, 7], vec![3, 17, 33, 31]] {
        let n: usize = shape.iter().product();
        let (a, b, dy) =
            (uniform_f16(&mut r, n, -1.0, 1.0), uniform_f16(&mut r, n, -1.0, 1.0), uniform_f16(&mut r, n, -1.0, 1.0));
        let (ta, tb, tdy) =
            (upload_f16(&gpu, "a", &shape, &a), upload_f16(&gpu, "b", &shape, &b), upload_f16(&gpu, "dy", &shape, &dy));
        let (out, da, db) =
            (zeros_f16(&gpu, "out", &shape), zeros_f16(&gpu, "da", &shape), zeros_f16(&gpu, "db", &shape));
        run(&gpu, &add::add_forward(&gpu, &ta, &tb, &out).unwrap());
        run(&gpu, &add::add_backward(&gpu, &tdy, &da, &db).unwrap());
        let want = reference::add::add_forward(&to_f64(&a), &to_f64(&b));
        assert_close(&format!("f16 add_forward {shape:?}"), &read_f16(&gpu, &out), &want, F16_ATOL, F16_RTOL);
        assert_close(&format!("f16 add_backward {shape:?}"), &read_f16(&gpu, &da), &to_f64(&dy), 0.0, 0.0);
        assert_close(&format!("f16 add_backward {shape:?}"), &read_f16(&gpu, &db), &to_f64(&dy), 0.0, 0.0);
        let ty = zeros_f16(&gpu, "y", &shape);
        run(&gpu, &relu::relu_forward(&gpu, &ta, &ty).unwrap());
        let y = reference::relu::relu_forward(&to_f64(&a));
        assert_close(&format!("f16 relu_forward {shape:?}"), &read_f16(&gpu, &ty), &y, 0.0, 0.0);
        let tdx = zeros_f16(&gpu, "dx", &shape);
        run(&gpu, &relu::relu_backward(&gpu, &ty, &tdy, &tdx).unwrap());
        let want = reference::relu::relu_backward(&y, &to_f64(&dy));
        assert_close(&format!("f16 relu_backward {shape:?}"), &read_f16(&gpu, &tdx), &want, 0.0, 0.0);
    }
    // Max pooling picks one of its inputs: exact, and its gradient sums at most a few f16 values.
    for (i, cfg) in pool_cases().iter().enumerate() {
        let x = uniform_f16(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let dy = uniform_f16(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0);
        let (tx, ty) = (upload_f16(&gpu, "x", &cfg.input_shape(), &x), zeros_f16(&gpu, "y", &cfg.output_shape()));
        let argmax = zeros(&gpu, "argmax", &cfg.output_shape());
        run(&gpu, &pool::max_pool2d_forward(&gpu, cfg, &tx, &ty, &argmax).unwrap());
        let (y, am) = reference::pool::max_pool2d_forward(cfg, &to_f64(&x));
        assert_close(&format!("f16 max_pool2d_forward case {i}"), &read_f16(&gpu, &ty), &y, 0.0, 0.0);
        assert_eq!(argmax.read::<u32>(&gpu).unwrap(), am, "f16 max_pool2d argmax case {i}");
        let (tdy, tdx) = (upload_f16(&gpu, "dy", &cfg.output_shape(), &dy), zeros_f16(&gpu, "dx", &cfg.input_shape()));
        run(&gpu, &pool::max_pool2d_backward(&gpu, cfg, &argmax, &tdy, &tdx).unwrap());
        let want = reference::pool::max_pool2d_backward(cfg, &am, &to_f64(&dy));
        assert_close(&format!("f16 max_pool2d_backward case {i}"), &read_f16(&gpu, &tdx), &want, F16_ATOL, F16_RTOL);
    }
    for shape in [[1, 3, 5, 7], [4, 1024, 2, 2], [3, 10, 1, 1]] {
        let x = uniform_f16(&mut r, shape.iter().product(), -1.0, 1.0);
        let dy = uniform_f16(&mut r, shape[0] * shape[1], -1.0, 1.0);
        let (tx, ty) = (upload_f16(&gpu, "x", &shape, &x), zeros_f16(&gpu, "y", &shape[..2]));
        run(&gpu, &pool::global_avg_pool_forward(&gpu, &tx, &ty).unwrap());
        let want = reference::pool::global_avg_pool_forward(shape, &to_f64(&x));
        assert_close(
            &format!("f16 global_avg_pool_forward {shape:?}"),
            &read_f16(&gpu, &ty),
            &want,
            1e-6,
            1e-6 + F16_RTOL,
        );
        let (tdy, tdx) = (upload_f16(&gpu, "dy", &shape[..2], &dy), zeros_f16(&gpu, "dx", &shape));
        run(&gpu, &pool::global_avg_pool_backward(&gpu, &tdy, &tdx).unwrap());
        let want = reference::pool::global_avg_pool_backward(shape, &to_f64(&dy));
        assert_close(
            &format!("f16 global_avg_pool_backward {shape:?}"),
            &read_f16(&gpu, &tdx),
            &want,
            F16_ATOL,
            1e-6 + F16_RTOL,
        );
    }
    // The classifier: f16 activations, f32 weights and weight gradients.
    for (i, cfg) in [
        LinearConfig { n: 1, in_features: 7, out_features: 3, bias: true },
        LinearConfig { n: 3, in_features: 1024, out_features: 10, bias: true },
        LinearConfig { n: 4, in_features: 9, out_features: 13, bias: false },
    ]
    .iter()
    .enumerate()
    {
        let x = uniform_f16(&mut r, cfg.n * cfg.in_features, -1.0, 1.0);
        let w = uniform(&mut r, cfg.out_features * cfg.in_features, -1.0, 1.0);
        let b = uniform(&mut r, cfg.out_features, -1.0, 1.0);
        let dy = uniform_f16(&mut r, cfg.n * cfg.out_features, -1.0, 1.0);
        let tx = upload_f16(&gpu, "x", &[cfg.n, cfg.in_features], &x);
        let tw = upload(&gpu, "w", &[cfg.out_features, cfg.in_features], &w);
        let tb = upload(&gpu, "b", &[cfg.out_features], &b);
        let ty = zeros_f16(&gpu, "y", &[cfg.n, cfg.out_features]);
        run(&gpu, &linear::linear_forward(&gpu, cfg, &tx, &tw, cfg.bias.then_some(&tb), &ty).unwrap());
        let b64 = to_f64(&b);
        let want = reference::linear::linear_forward(cfg, &to_f64(&x), &to_f64(&w), cfg.bias.then_some(&b64[..]));
        assert_close(
            &format!("f16 linear_forward case {i}"),
            &read_f16(&gpu, &ty),
            &want,
            CONV_ATOL,
            CONV_RTOL + F16_RTOL,
        );
        let tdy = upload_f16(&gpu, "dy", &[cfg.n, cfg.out_features], &dy);
        let tdx = zeros_f16(&gpu, "dx", &[cfg.n, cfg.in_features]);
        let (tdw, tdb) =
            (zeros(&gpu, "dw", &[cfg.out_features, cfg.in_features]), zeros(&gpu, "db", &[cfg.out_features]));
        run(&gpu, &linear::linear_backward(&gpu, cfg, &tx, &tw, &tdy, &tdx, &tdw, cfg.bias.then_some(&tdb)).unwrap());
        let (dx, dw, db) = reference::linear::linear_backward(cfg, &to_f64(&x), &to_f64(&w), &to_f64(&dy));
        assert_close(
            &format!("f16 linear_backward dinp case {i}"),
            &read_f16(&gpu, &tdx),
            &dx,
            CONV_ATOL,
            CONV_RTOL + F16_RTOL,
        );
        assert_close(&format!("f16 linear_backward dweight case {i}"), &read(&gpu, &tdw), &dw, CONV_ATOL, CONV_RTOL);
        if cfg.bias {
            assert_close(&format!("f16 linear_backward dbias case {i}"), &read(&gpu, &tdb), &db, CONV_ATOL, CONV_RTOL);
        }
    }
}
