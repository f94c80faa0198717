//! Every kernel, forward and every backward output, GPU against the f64 CPU reference, on
//! awkward shapes: batch 1, odd and non-square H×W, channel counts that are multiples of no tile
//! (the GEMM kernels work in 4×4 blocks, reductions in 256-wide workgroups) nor of r.
//!
//! Tolerances are |gpu - ref| <= atol + rtol·|ref|, stated per op with the reason. The inputs are
//! f32 values the reference reads exactly, so the difference is the GPU's f32 rounding alone;
//! an indexing bug shows up as errors of order 0.1, orders of magnitude above every tolerance.

mod common;

use common::*;
use senet_wgpu::gpu::{Dispatch, Gpu};
use senet_wgpu::ops::add;
use senet_wgpu::ops::batch_norm::{self, BatchNormConfig};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles, WorkgroupTiles};
use senet_wgpu::ops::cross_entropy::{self, result};
use senet_wgpu::ops::linear::{self, LinearConfig};
use senet_wgpu::ops::optimizer::{OptimizerConfig, OptimizerStep};
use senet_wgpu::ops::pool::{self, MaxPool2dConfig};
use senet_wgpu::ops::relu;
use senet_wgpu::ops::se_block::{self, SeBlockConfig, SeGrads, SeWeights};
use senet_wgpu::reference;

// ---------------------------------------------------------------------------------------------
// conv2d

/// One pass through `conv2d::conv2d_pass` (the weight gradient through its split entry), given
/// only the buffers that pass uses.
fn forward(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    k: ConvKernel,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    y: &Tensor,
) -> Vec<Dispatch> {
    conv2d::conv2d_pass(gpu, cfg, ConvPass::Forward, k, &ConvBuffers::forward(x, w, b, y)).unwrap()
}

fn try_forward(gpu: &Gpu, cfg: &Conv2dConfig, x: &Tensor, w: &Tensor, y: &Tensor) -> anyhow::Result<Vec<Dispatch>> {
    let k = ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg));
    conv2d::conv2d_pass(gpu, cfg, ConvPass::Forward, k, &ConvBuffers::forward(x, w, None, y))
}

fn backward_input(gpu: &Gpu, cfg: &Conv2dConfig, k: ConvKernel, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Vec<Dispatch> {
    conv2d::conv2d_pass(gpu, cfg, ConvPass::BackwardInput, k, &ConvBuffers::backward_input(dy, w, dx)).unwrap()
}

fn backward_weight(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    k: ConvKernel,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: usize,
) -> Vec<Dispatch> {
    conv2d::conv2d_backward_weight_split(gpu, cfg, k, &ConvBuffers::backward_weight(x, dy, dw), splits).unwrap()
}

/// The `Workgroup` kernels (`conv2d_tiled.wgsl`, every `WorkgroupTiles` shape) on every case, all
/// three GEMMs, the weight gradient unsplit and split 3 and 7 ways; tolerances common::CONV_ATOL /
/// CONV_RTOL (the same sums in another order).
#[test]
fn conv2d_workgroup_kernels_match_reference() {
    let gpu = gpu();
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(400 + i as u64);
        let x = uniform(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let w = uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
        let dy = uniform(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0);
        let (tx, tw, tb) = (
            upload(&gpu, "x", &cfg.input_shape(), &x),
            upload(&gpu, "w", &cfg.weight_shape(), &w),
            upload(&gpu, "b", &[cfg.c_out], &b),
        );
        let tdy = upload(&gpu, "dy", &cfg.output_shape(), &dy);
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        let want_y = reference::conv2d::conv2d_forward(cfg, &x64, &w64, cfg.bias.then_some(&b64[..]));
        let want_dx = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
        let want_dw = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
        for tiles in WorkgroupTiles::ALL {
            let what = |pass: &str| format!("{pass} (workgroup) case {i} {tiles:?} {cfg:?}");
            let k = ConvKernel::Workgroup(tiles);
            let ty = zeros(&gpu, "y", &cfg.output_shape());
            run(&gpu, &forward(&gpu, cfg, k, &tx, &tw, cfg.bias.then_some(&tb), &ty));
            assert_close(&what("conv2d_forward"), &read(&gpu, &ty), &want_y, CONV_ATOL, CONV_RTOL);
            let tdx = zeros(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, k, &tdy, &tw, &tdx));
            assert_close(&what("conv2d_backward_input"), &read(&gpu, &tdx), &want_dx, CONV_ATOL, CONV_RTOL);
            for splits in [1, 3, 7] {
                let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
                run(&gpu, &backward_weight(&gpu, cfg, k, &tx, &tdy, &tdw, splits));
                let what = what(&format!("conv2d_backward_weight splits {splits}"));
                assert_close(&what, &read(&gpu, &tdw), &want_dw, CONV_ATOL, CONV_RTOL);
            }
        }
    }
}

/// Every case runs with every register-block shape (`RegisterTiles::ALL`: 4 or 8 pixels per
/// forward / input-gradient invocation, 4 or 8 input channels per weight-gradient invocation),
/// so the shape an adapter picks is always a tested one.
#[test]
fn conv2d_register_forward_matches_reference() {
    let gpu = gpu();
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(100 + i as u64);
        let x = uniform(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let w = uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
        let tx = upload(&gpu, "x", &cfg.input_shape(), &x);
        let tw = upload(&gpu, "w", &cfg.weight_shape(), &w);
        let tb = upload(&gpu, "b", &[cfg.c_out], &b);
        let bias = to_f64(&b);
        let want = reference::conv2d::conv2d_forward(cfg, &to_f64(&x), &to_f64(&w), cfg.bias.then_some(&bias[..]));
        for tiles in RegisterTiles::ALL {
            let ty = zeros(&gpu, "y", &cfg.output_shape());
            let d = forward(&gpu, cfg, ConvKernel::Register(tiles), &tx, &tw, cfg.bias.then_some(&tb), &ty);
            run(&gpu, &d);
            let what = format!("conv2d_forward case {i} {tiles:?} {cfg:?}");
            assert_close(&what, &read(&gpu, &ty), &want, CONV_ATOL, CONV_RTOL);
        }
    }
}

#[test]
fn conv2d_register_backward_matches_reference() {
    let gpu = gpu();
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(200 + i as u64);
        let x = uniform(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let w = uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let dy = uniform(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0);
        let tx = upload(&gpu, "x", &cfg.input_shape(), &x);
        let tw = upload(&gpu, "w", &cfg.weight_shape(), &w);
        let tdy = upload(&gpu, "dy", &cfg.output_shape(), &dy);
        let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));

        let want = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
        for tiles in RegisterTiles::ALL {
            let tdx = zeros(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, ConvKernel::Register(tiles), &tdy, &tw, &tdx));
            let what = format!("conv2d_backward_input case {i} {tiles:?}");
            assert_close(&what, &read(&gpu, &tdx), &want, CONV_ATOL, CONV_RTOL);
        }

        // The weight gradient unsplit, split as the planner would, and split an odd number of ways.
        let want = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
        for tiles in RegisterTiles::ALL {
            for splits in [1, conv2d::weight_grad_splits(cfg, tiles, 4096), 3, 7] {
                let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
                run(&gpu, &backward_weight(&gpu, cfg, ConvKernel::Register(tiles), &tx, &tdy, &tdw, splits));
                let what = format!("conv2d_backward_weight case {i} {tiles:?} splits {splits}");
                assert_close(&what, &read(&gpu, &tdw), &want, CONV_ATOL, CONV_RTOL);
            }
        }

        if cfg.bias {
            // A reduction: on both paths.
            let want = reference::conv2d::conv2d_backward_bias(cfg, &dy64);
            for (path, g) in gpus() {
                let tdy = upload(&g, "dy", &cfg.output_shape(), &dy);
                let tdb = zeros(&g, "db", &[cfg.c_out]);
                run(&g, &conv2d::conv2d_backward_bias(&g, cfg, &tdy, &tdb).unwrap());
                let what = format!("conv2d_backward_bias case {i} ({path})");
                assert_close(&what, &read(&g, &tdb), &want, CONV_ATOL, CONV_RTOL);
            }
        }
    }
}

#[test]
fn conv2d_rejects_mismatched_shapes() {
    let gpu = gpu();
    let cfg = Conv2dConfig::square(2, 3, (8, 8), 4, 3, 1, 1, false);
    let x = zeros(&gpu, "x", &[2, 3, 8, 9]);
    let w = zeros(&gpu, "w", &cfg.weight_shape());
    let y = zeros(&gpu, "y", &cfg.output_shape());
    let err = try_forward(&gpu, &cfg, &x, &w, &y).unwrap_err().to_string();
    assert!(err.contains("conv2d input") && err.contains("[2, 3, 8, 8]") && err.contains("[2, 3, 8, 9]"), "{err}");
    let too_big = Conv2dConfig::square(1, 1, (2, 2), 1, 5, 1, 0, false);
    assert!(too_big.validate().unwrap_err().to_string().contains("does not fit"));
    // Groups must divide both channel counts; a grouped weight is [out, in/groups, k, k].
    for (groups, c_out) in [(2, 5), (3, 6), (0, 4)] {
        let bad = Conv2dConfig::square(1, 4, (5, 5), c_out, 3, 1, 1, false).grouped(groups);
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains(&format!("groups = {groups} must divide")), "{err}");
    }
    let grouped = Conv2dConfig::square(1, 4, (5, 5), 6, 3, 1, 1, false).grouped(2);
    let (x, y) = (zeros(&gpu, "x", &grouped.input_shape()), zeros(&gpu, "y", &grouped.output_shape()));
    let ungrouped_w = zeros(&gpu, "w", &[6, 4, 3, 3]);
    let err = try_forward(&gpu, &grouped, &x, &ungrouped_w, &y).unwrap_err().to_string();
    assert!(err.contains("conv2d weight") && err.contains("[6, 2, 3, 3]"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// batch norm

fn bn_cases() -> Vec<BatchNormConfig> {
    vec![
        BatchNormConfig::new(1, 3, 5, 7),     // batch 1, odd non-square
        BatchNormConfig::new(4, 5, 3, 3),     // small planes, many samples
        BatchNormConfig::new(2, 17, 8, 8),    // channels no multiple of anything
        BatchNormConfig::new(3, 2, 1, 1),     // 1x1 planes: statistics over the batch only
        BatchNormConfig::new(2, 3, 40, 40),   // 3,200 values per channel: > the 256-wide reduction
        BatchNormConfig::new(128, 3, 32, 32), // 131,072 values per channel: a batch of 128 at 32x32
    ]
}

/// The forward's tensors, in the order the tests name them.
fn bn<'a>(
    inp: &'a Tensor,
    gamma: &'a Tensor,
    beta: &'a Tensor,
    running_mean: &'a Tensor,
    running_var: &'a Tensor,
    stats: &'a Tensor,
    out: &'a Tensor,
) -> batch_norm::BnForward<'a> {
    batch_norm::BnForward { inp, gamma, beta, running_mean, running_var, stats, out }
}

/// Batch norm outputs are O(1) after normalisation; the statistics are f32 Welford reductions over
/// up to 131,072 values per channel (a batch of 128 at 32x32), merged pairwise, whose rounding
/// (~1e-6 relative) passes through invstd: atol/rtol 1e-4. The largest case fails if a kernel
/// reads only part of a channel beyond the sizes the smaller cases cover (planted: statistics
/// over the first 65,536 values only).
const BN_TOL: f64 = 1e-4;

#[test]
fn batch_norm_train_forward_and_backward_match_reference() {
    for (path, gpu) in gpus() {
        for (i, cfg) in bn_cases().iter().enumerate() {
            let mut r = rng(300 + i as u64);
            let numel: usize = cfg.shape().iter().product();
            let x = uniform(&mut r, numel, -2.0, 3.0);
            let gamma = uniform(&mut r, cfg.c, 0.5, 1.5);
            let beta = uniform(&mut r, cfg.c, -0.5, 0.5);
            let rm = uniform(&mut r, cfg.c, -0.2, 0.2);
            let rv = uniform(&mut r, cfg.c, 0.5, 2.0);
            let dy = uniform(&mut r, numel, -1.0, 1.0);
            let check = |label: &str, got: &[f32], want: &[f64]| {
                assert_close(&format!("{label} case {i} ({path}) {cfg:?}"), got, want, BN_TOL, BN_TOL)
            };

            let tx = upload(&gpu, "x", &cfg.shape(), &x);
            let tg = upload(&gpu, "gamma", &[cfg.c], &gamma);
            let tb = upload(&gpu, "beta", &[cfg.c], &beta);
            let trm = upload(&gpu, "running_mean", &[cfg.c], &rm);
            let trv = upload(&gpu, "running_var", &[cfg.c], &rv);
            let stats = zeros(&gpu, "stats", &[2, cfg.c]);
            let ty = zeros(&gpu, "y", &cfg.shape());
            run(
                &gpu,
                &batch_norm::batch_norm_forward_train(&gpu, cfg, &bn(&tx, &tg, &tb, &trm, &trv, &stats, &ty)).unwrap(),
            );
            let want = reference::batch_norm::batch_norm_forward_train(
                cfg,
                &to_f64(&x),
                &to_f64(&gamma),
                &to_f64(&beta),
                &to_f64(&rm),
                &to_f64(&rv),
            );
            check("batch_norm_forward (train) output", &read(&gpu, &ty), &want.out);
            check("batch_norm running_mean", &read(&gpu, &trm), &want.running_mean);
            check("batch_norm running_var (unbiased)", &read(&gpu, &trv), &want.running_var);
            let s = read(&gpu, &stats);
            check("batch_norm saved mean", &s[..cfg.c], &want.mean);
            check("batch_norm saved invstd", &s[cfg.c..], &want.invstd);

            let tdy = upload(&gpu, "dy", &cfg.shape(), &dy);
            let tdx = zeros(&gpu, "dx", &cfg.shape());
            let tdg = zeros(&gpu, "dgamma", &[cfg.c]);
            let tdb = zeros(&gpu, "dbeta", &[cfg.c]);
            run(
                &gpu,
                &batch_norm::batch_norm_backward(&gpu, cfg, &tx, &tg, &stats, None, &tdy, &tdx, &tdg, &tdb).unwrap(),
            );
            let (dx, dg, db) = reference::batch_norm::batch_norm_backward(
                cfg,
                &to_f64(&x),
                &to_f64(&gamma),
                &want.mean,
                &want.invstd,
                &to_f64(&dy),
            );
            check("batch_norm_backward dinp", &read(&gpu, &tdx), &dx);
            check("batch_norm_backward dgamma", &read(&gpu, &tdg), &dg);
            check("batch_norm_backward dbeta", &read(&gpu, &tdb), &db);

            // Eval mode normalises with the running statistics.
            let ty2 = zeros(&gpu, "y eval", &cfg.shape());
            run(
                &gpu,
                &batch_norm::batch_norm_forward_eval(&gpu, cfg, &bn(&tx, &tg, &tb, &trm, &trv, &stats, &ty2)).unwrap(),
            );
            let eval = reference::batch_norm::batch_norm_forward_eval(
                cfg,
                &to_f64(&x),
                &to_f64(&gamma),
                &to_f64(&beta),
                &want.running_mean,
                &want.running_var,
            );
            check("batch_norm_forward (eval)", &read(&gpu, &ty2), &eval);
        }
    }
}

/// BN with a fused ReLU gives, bit for bit, what BN then ReLU give (forward output, input, gamma
/// and beta gradients, in training and eval mode), and so what their references give.
#[test]
fn batch_norm_with_fused_relu_is_bn_then_relu_bit_for_bit() {
    for (path, gpu) in gpus() {
        for (i, cfg) in bn_cases().iter().enumerate() {
            let mut r = rng(350 + i as u64);
            let numel: usize = cfg.shape().iter().product();
            let x = uniform(&mut r, numel, -2.0, 3.0);
            let gamma = uniform(&mut r, cfg.c, 0.5, 1.5);
            let beta = uniform(&mut r, cfg.c, -0.5, 0.5);
            let dy = uniform(&mut r, numel, -1.0, 1.0);
            let (tx, tdy) = (upload(&gpu, "x", &cfg.shape(), &x), upload(&gpu, "dy", &cfg.shape(), &dy));
            let (tg, tb) = (upload(&gpu, "gamma", &[cfg.c], &gamma), upload(&gpu, "beta", &[cfg.c], &beta));
            // [forward output, dinp, dgamma, dbeta, eval output] of one variant.
            let outputs = |fused: bool| -> Vec<Vec<f32>> {
                let (trm, trv) = (zeros(&gpu, "rm", &[cfg.c]), upload(&gpu, "rv", &[cfg.c], &vec![1.0; cfg.c]));
                let stats = zeros(&gpu, "stats", &[2, cfg.c]);
                let (bn_out, relu_out) = (zeros(&gpu, "bn out", &cfg.shape()), zeros(&gpu, "relu out", &cfg.shape()));
                let (dbn, dx) = (zeros(&gpu, "d bn out", &cfg.shape()), zeros(&gpu, "dx", &cfg.shape()));
                let (dg, db) = (zeros(&gpu, "dgamma", &[cfg.c]), zeros(&gpu, "dbeta", &[cfg.c]));
                let eval_out = zeros(&gpu, "eval out", &cfg.shape());
                if fused {
                    let f = cfg.with_relu();
                    let t = bn(&tx, &tg, &tb, &trm, &trv, &stats, &relu_out);
                    run(&gpu, &batch_norm::batch_norm_forward_train(&gpu, &f, &t).unwrap());
                    let d = batch_norm::batch_norm_backward(
                        &gpu,
                        &f,
                        &tx,
                        &tg,
                        &stats,
                        Some(&relu_out),
                        &tdy,
                        &dx,
                        &dg,
                        &db,
                    );
                    run(&gpu, &d.unwrap());
                    let t = bn(&tx, &tg, &tb, &trm, &trv, &stats, &eval_out);
                    run(&gpu, &batch_norm::batch_norm_forward_eval(&gpu, &f, &t).unwrap());
                } else {
                    let t = bn(&tx, &tg, &tb, &trm, &trv, &stats, &bn_out);
                    run(&gpu, &batch_norm::batch_norm_forward_train(&gpu, cfg, &t).unwrap());
                    run(&gpu, &relu::relu_forward(&gpu, &bn_out, &relu_out).unwrap());
                    run(&gpu, &relu::relu_backward(&gpu, &relu_out, &tdy, &dbn).unwrap());
                    let d = batch_norm::batch_norm_backward(&gpu, cfg, &tx, &tg, &stats, None, &dbn, &dx, &dg, &db);
                    run(&gpu, &d.unwrap());
                    let t = bn(&tx, &tg, &tb, &trm, &trv, &stats, &bn_out);
                    run(&gpu, &batch_norm::batch_norm_forward_eval(&gpu, cfg, &t).unwrap());
                    run(&gpu, &relu::relu_forward(&gpu, &bn_out, &eval_out).unwrap());
                }
                [&relu_out, &dx, &dg, &db, &eval_out].iter().map(|t| read(&gpu, t)).collect()
            };
            let (fused, apart) = (outputs(true), outputs(false));
            for (what, (f, a)) in
                ["output", "dinp", "dgamma", "dbeta", "eval output"].iter().zip(fused.iter().zip(&apart))
            {
                let same = f.iter().zip(a).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "case {i} ({path}) {cfg:?}: fused {what} differs from BN then ReLU");
            }
            // And against the references composed.
            let want = reference::batch_norm::batch_norm_forward_train(
                cfg,
                &to_f64(&x),
                &to_f64(&gamma),
                &to_f64(&beta),
                &vec![0.0; cfg.c],
                &vec![1.0; cfg.c],
            );
            let y = reference::relu::relu_forward(&want.out);
            assert_close(&format!("fused output case {i} ({path})"), &fused[0], &y, BN_TOL, BN_TOL);
            let dbn = reference::relu::relu_backward(&y, &to_f64(&dy));
            let (dx, _, _) = reference::batch_norm::batch_norm_backward(
                cfg,
                &to_f64(&x),
                &to_f64(&gamma),
                &want.mean,
                &want.invstd,
                &dbn,
            );
            assert_close(&format!("fused dinp case {i} ({path})"), &fused[1], &dx, BN_TOL, BN_TOL);
        }
        // A fused BN's backward needs the ReLU's output, and an unfused one must not get it.
        let cfg = bn_cases()[0];
        let t = zeros(&gpu, "t", &cfg.shape());
        let c = zeros(&gpu, "c", &[cfg.c]);
        let s = zeros(&gpu, "s", &[2, cfg.c]);
        let err = batch_norm::batch_norm_backward(&gpu, &cfg.with_relu(), &t, &c, &s, None, &t, &t, &c, &c);
        assert!(format!("{:#}", err.unwrap_err()).contains("fused ReLU"));
        let err = batch_norm::batch_norm_backward(&gpu, &cfg, &t, &c, &s, Some(&t), &t, &t, &c, &c);
        assert!(format!("{:#}", err.unwrap_err()).contains("fused ReLU"));
    }
}

/// Mean 100, std 0.1: a one-pass E[x^2] - E[x]^2 in f32 loses the variance entirely (ulp(1e4) =
/// 1e-3 against a variance of 0.01). The two-pass kernel keeps it; what remains is the f32
/// quantisation of the inputs themselves (ulp(100)/std ~ 8e-5 in xhat): atol 1e-3.
#[test]
fn batch_norm_statistics_survive_a_large_mean() {
    for (path, gpu) in gpus() {
        let cfg = BatchNormConfig::new(8, 3, 16, 16);
        let mut r = rng(399);
        let numel: usize = cfg.shape().iter().product();
        let x: Vec<f32> = uniform(&mut r, numel, -0.17, 0.17).iter().map(|v| 100.0 + v).collect();
        let ones = vec![1.0f32; cfg.c];
        let zero = vec![0.0f32; cfg.c];
        let tx = upload(&gpu, "x", &cfg.shape(), &x);
        let tg = upload(&gpu, "gamma", &[cfg.c], &ones);
        let tb = upload(&gpu, "beta", &[cfg.c], &zero);
        let trm = upload(&gpu, "rm", &[cfg.c], &zero);
        let trv = upload(&gpu, "rv", &[cfg.c], &ones);
        let stats = zeros(&gpu, "stats", &[2, cfg.c]);
        let ty = zeros(&gpu, "y", &cfg.shape());
        run(
            &gpu,
            &batch_norm::batch_norm_forward_train(&gpu, &cfg, &bn(&tx, &tg, &tb, &trm, &trv, &stats, &ty)).unwrap(),
        );
        let want = reference::batch_norm::batch_norm_forward_train(
            &cfg,
            &to_f64(&x),
            &to_f64(&ones),
            &to_f64(&zero),
            &to_f64(&zero),
            &to_f64(&ones),
        );
        assert_close(&format!("batch_norm large-mean output ({path})"), &read(&gpu, &ty), &want.out, 1e-3, 0.0);
        let s = read(&gpu, &stats);
        assert_close(&format!("batch_norm large-mean invstd ({path})"), &s[cfg.c..], &want.invstd, 0.0, 1e-3);
    }
}

#[test]
fn batch_norm_refuses_one_value_per_channel_in_training() {
    let gpu = gpu();
    let cfg = BatchNormConfig::new(1, 2, 1, 1);
    let t = |s: &[usize]| zeros(&gpu, "t", s);
    let (x, g, b, rm, rv, st, y) = (t(&[1, 2, 1, 1]), t(&[2]), t(&[2]), t(&[2]), t(&[2]), t(&[2, 2]), t(&[1, 2, 1, 1]));
    let err = batch_norm::batch_norm_forward_train(&gpu, &cfg, &bn(&x, &g, &b, &rm, &rv, &st, &y)).unwrap_err();
    assert!(err.to_string().contains("more than one value per channel"), "{err}");
}

/// --sync-bn's split kernels over one rank — statistics, the one-rank merge, apply; gradient sums,
/// the one-rank sum, input gradient — give the fused kernels' bits: every output, the saved
/// statistics and the running estimates, with and without the fused ReLU. They share the fused
/// kernels' arithmetic line for line (src/ops/batch_norm/batch_norm.wgsl), so tolerance 0.
#[test]
fn batch_norm_split_kernels_on_one_rank_are_the_fused_ones_bit_for_bit() {
    for (path, gpu) in gpus() {
        for (i, base) in bn_cases().iter().enumerate() {
            for cfg in [*base, base.with_relu()] {
                let mut r = rng(500 + i as u64);
                let numel = cfg.numel();
                let x = uniform(&mut r, numel, -2.0, 3.0);
                let gamma = uniform(&mut r, cfg.c, 0.5, 1.5);
                let beta = uniform(&mut r, cfg.c, -0.5, 0.5);
                let rm = uniform(&mut r, cfg.c, -0.2, 0.2);
                let rv = uniform(&mut r, cfg.c, 0.5, 2.0);
                let dy = uniform(&mut r, numel, -1.0, 1.0);
                let (tx, tdy) = (upload(&gpu, "x", &cfg.shape(), &x), upload(&gpu, "dy", &cfg.shape(), &dy));
                let (tg, tb) = (upload(&gpu, "gamma", &[cfg.c], &gamma), upload(&gpu, "beta", &[cfg.c], &beta));
                // [output, mean|invstd, running_mean, running_var, dinp, dgamma, dbeta] of one path.
                let outputs = |split: bool| -> Vec<Vec<f32>> {
                    let (trm, trv) = (upload(&gpu, "rm", &[cfg.c], &rm), upload(&gpu, "rv", &[cfg.c], &rv));
                    let stats = zeros(&gpu, "stats", &[2, cfg.c]);
                    let y = zeros(&gpu, "y", &cfg.shape());
                    let (dx, dg, db) =
                        (zeros(&gpu, "dx", &cfg.shape()), zeros(&gpu, "dg", &[cfg.c]), zeros(&gpu, "db", &[cfg.c]));
                    let t = bn(&tx, &tg, &tb, &trm, &trv, &stats, &y);
                    let relu_out = cfg.relu.then_some(&y);
                    let g = batch_norm::BnBackward {
                        inp: &tx,
                        gamma: &tg,
                        stats: &stats,
                        relu_out,
                        dout: &tdy,
                        dinp: &dx,
                        dgamma: &dg,
                        dbeta: &db,
                    };
                    if split {
                        let exchange = zeros(&gpu, "exchange", &[batch_norm::ROWS, cfg.c]);
                        run(&gpu, &batch_norm::batch_norm_forward_stats(&gpu, &cfg, &tx, &exchange).unwrap());
                        let merged = batch_norm::merge_rank_statistics(&read(&gpu, &exchange), cfg.c).unwrap();
                        exchange.write(&gpu, &merged).unwrap();
                        run(&gpu, &batch_norm::batch_norm_forward_apply(&gpu, &cfg, &t, &exchange).unwrap());
                        run(&gpu, &batch_norm::batch_norm_backward_sums(&gpu, &cfg, &g, &exchange).unwrap());
                        let sums = batch_norm::sum_rank_grad_sums(&read(&gpu, &exchange), cfg.c).unwrap();
                        exchange.write(&gpu, &sums).unwrap();
                        run(&gpu, &batch_norm::batch_norm_backward_input(&gpu, &cfg, &g, &exchange).unwrap());
                    } else {
                        run(&gpu, &batch_norm::batch_norm_forward_train(&gpu, &cfg, &t).unwrap());
                        let d = batch_norm::batch_norm_backward(
                            &gpu, &cfg, &tx, &tg, &stats, relu_out, &tdy, &dx, &dg, &db,
                        );
                        run(&gpu, &d.unwrap());
                    }
                    [&y, &stats, &trm, &trv, &dx, &dg, &db].iter().map(|t| read(&gpu, t)).collect()
                };
                let (split, fused) = (outputs(true), outputs(false));
                let what = ["output", "saved statistics", "running_mean", "running_var", "dinp", "dgamma", "dbeta"];
                for (what, (s, f)) in what.iter().zip(split.iter().zip(&fused)) {
                    let diff = s.iter().zip(f).position(|(p, q)| p.to_bits() != q.to_bits());
                    assert!(
                        diff.is_none(),
                        "case {i} ({path}) {cfg:?}: split {what} differs from the fused kernel's at {diff:?}"
                    );
                }
            }
        }
    }
}

/// Ranks' batches (each `n` of the list) of one [c, h, w]: --sync-bn's cases.
struct SyncBnCase {
    ranks: &'static [usize],
    c: usize,
    h: usize,
    w: usize,
}

fn sync_bn_cases() -> Vec<SyncBnCase> {
    vec![
        // batch 1 on each of two ranks, odd non-square planes
        SyncBnCase { ranks: &[1, 1], c: 3, h: 5, w: 7 },
        // three ranks with unequal batches, 17 channels (a multiple of nothing), 3x3
        SyncBnCase { ranks: &[2, 1, 3], c: 17, h: 3, w: 3 },
        // 1x2 planes: a rank holds 2 values per channel
        SyncBnCase { ranks: &[1, 4], c: 5, h: 1, w: 2 },
        // past the 256-wide reduction on every rank
        SyncBnCase { ranks: &[3, 2], c: 4, h: 40, w: 40 },
        // two ranks of batch 64 at 32x32: 65,536 values per channel per rank
        SyncBnCase { ranks: &[64, 64], c: 3, h: 32, w: 32 },
    ]
}

/// The whole batch's tensor cut into the ranks' batches (along N).
fn split_batch(x: &[f32], ranks: &[usize], per_sample: usize) -> Vec<Vec<f32>> {
    let mut start = 0;
    ranks
        .iter()
        .map(|n| {
            let part = x[start..start + n * per_sample].to_vec();
            start += n * per_sample;
            part
        })
        .collect()
}

/// SyncBatchNorm's definition: batch norm over ranks' batches, statistics merged and gradient
/// sums added across them, is batch norm over the whole batch (the ranks' concatenated). Each
/// rank's split kernels, with the host's merge and sum between them, against the f64 reference on
/// the whole batch — output, saved statistics, running estimates (every rank's the same bits),
/// dinp, and dgamma / dbeta summed over the ranks — and each half against its own reference on
/// the rank's batch. Tolerances: BN_TOL as the one-process kernels (the same f32 reductions plus
/// one f32 merge per rank); the exchanged sums are f32 sums of up to 65,536 terms of size <= 3,
/// compared at rtol 1e-4 and atol 1e-6 per value summed (a pairwise tree's rounding is far below).
#[test]
fn batch_norm_split_over_ranks_is_batch_norm_over_the_whole_batch() {
    for (path, gpu) in gpus() {
        for (i, case) in sync_bn_cases().iter().enumerate() {
            for relu in [false, true] {
                let n: usize = case.ranks.iter().sum();
                let mut whole = BatchNormConfig::new(n, case.c, case.h, case.w);
                if relu {
                    whole = whole.with_relu();
                }
                let rank_cfg = |k: usize| BatchNormConfig { n: case.ranks[k], ..whole };
                let per_sample = case.c * case.h * case.w;
                let mut r = rng(600 + i as u64);
                let x = uniform(&mut r, whole.numel(), -2.0, 3.0);
                let gamma = uniform(&mut r, case.c, 0.5, 1.5);
                let beta = uniform(&mut r, case.c, -0.5, 0.5);
                let rm = uniform(&mut r, case.c, -0.2, 0.2);
                let rv = uniform(&mut r, case.c, 0.5, 2.0);
                let dy = uniform(&mut r, whole.numel(), -1.0, 1.0);
                let tag = |what: &str| format!("{what} case {i} ({path}) ranks {:?} {whole:?}", case.ranks);

                // The whole batch, in f64.
                let (g64, x64) = (to_f64(&gamma), to_f64(&x));
                let want = reference::batch_norm::batch_norm_forward_train(
                    &whole,
                    &x64,
                    &g64,
                    &to_f64(&beta),
                    &to_f64(&rm),
                    &to_f64(&rv),
                );
                let y64 = if relu { reference::relu::relu_forward(&want.out) } else { want.out.clone() };
                // The gradient reaching the normalisation (masked by the fused ReLU).
                let dbn = if relu { reference::relu::relu_backward(&y64, &to_f64(&dy)) } else { to_f64(&dy) };
                let (want_dx, want_dg, want_db) =
                    reference::batch_norm::batch_norm_backward(&whole, &x64, &g64, &want.mean, &want.invstd, &dbn);

                // Each rank's tensors.
                let (xs, dys, dbns) = (
                    split_batch(&x, case.ranks, per_sample),
                    split_batch(&dy, case.ranks, per_sample),
                    split_batch(&dbn.iter().map(|&v| v as f32).collect::<Vec<_>>(), case.ranks, per_sample),
                );
                let (tg, tb) = (upload(&gpu, "gamma", &[case.c], &gamma), upload(&gpu, "beta", &[case.c], &beta));
                struct Rank {
                    x: Tensor,
                    dy: Tensor,
                    rm: Tensor,
                    rv: Tensor,
                    stats: Tensor,
                    y: Tensor,
                    dx: Tensor,
                    dg: Tensor,
                    db: Tensor,
                    exchange: Tensor,
                }
                let ranks: Vec<Rank> = (0..case.ranks.len())
                    .map(|k| {
                        let s = rank_cfg(k).shape();
                        Rank {
                            x: upload(&gpu, "x", &s, &xs[k]),
                            dy: upload(&gpu, "dy", &s, &dys[k]),
                            rm: upload(&gpu, "rm", &[case.c], &rm),
                            rv: upload(&gpu, "rv", &[case.c], &rv),
                            stats: zeros(&gpu, "stats", &[2, case.c]),
                            y: zeros(&gpu, "y", &s),
                            dx: zeros(&gpu, "dx", &s),
                            dg: zeros(&gpu, "dg", &[case.c]),
                            db: zeros(&gpu, "db", &[case.c]),
                            exchange: zeros(&gpu, "exchange", &[batch_norm::ROWS, case.c]),
                        }
                    })
                    .collect();
                let backward = |k: usize| {
                    let t = &ranks[k];
                    batch_norm::BnBackward {
                        inp: &t.x,
                        gamma: &tg,
                        stats: &t.stats,
                        relu_out: relu.then_some(&t.y),
                        dout: &t.dy,
                        dinp: &t.dx,
                        dgamma: &t.dg,
                        dbeta: &t.db,
                    }
                };
                // What the ranks exchange, each half checked against its reference on the rank's batch.
                let stat_tol = |count: f64| 1e-6 * count;
                let rows = |v: &[f32]| -> Vec<Vec<f32>> { v.chunks(case.c).map(<[f32]>::to_vec).collect() };

                // Forward: statistics, the host merge in rank order, apply.
                let mut gathered = Vec::new();
                for (k, t) in ranks.iter().enumerate() {
                    run(&gpu, &batch_norm::batch_norm_forward_stats(&gpu, &rank_cfg(k), &t.x, &t.exchange).unwrap());
                    let mine = read(&gpu, &t.exchange);
                    let w = reference::batch_norm::batch_norm_forward_stats(&rank_cfg(k), &to_f64(&xs[k]));
                    let got = rows(&mine);
                    let m = rank_cfg(k).count() as f64;
                    assert_close(&tag("batch_norm_forward_stats count"), &got[0], &w.count, 0.0, 0.0);
                    assert_close(&tag("batch_norm_forward_stats mean"), &got[1], &w.mean, BN_TOL, BN_TOL);
                    assert_close(&tag("batch_norm_forward_stats M2"), &got[2], &w.m2, stat_tol(m), BN_TOL);
                    gathered.extend(mine);
                }
                let merged = batch_norm::merge_rank_statistics(&gathered, case.c).unwrap();
                for (k, t) in ranks.iter().enumerate() {
                    t.exchange.write(&gpu, &merged).unwrap();
                    let f = bn(&t.x, &tg, &tb, &t.rm, &t.rv, &t.stats, &t.y);
                    run(&gpu, &batch_norm::batch_norm_forward_apply(&gpu, &rank_cfg(k), &f, &t.exchange).unwrap());
                }
                let cat = |f: &dyn Fn(&Rank) -> &Tensor| -> Vec<f32> {
                    ranks.iter().flat_map(|t| read(&gpu, f(t))).collect()
                };
                assert_close(&tag("batch_norm_forward_apply output"), &cat(&|t| &t.y), &y64, BN_TOL, BN_TOL);
                let s = read(&gpu, &ranks[0].stats);
                assert_close(&tag("batch_norm_forward_apply mean"), &s[..case.c], &want.mean, BN_TOL, BN_TOL);
                assert_close(&tag("batch_norm_forward_apply invstd"), &s[case.c..], &want.invstd, BN_TOL, BN_TOL);
                let (rm0, rv0) = (read(&gpu, &ranks[0].rm), read(&gpu, &ranks[0].rv));
                assert_close(&tag("running_mean (merged)"), &rm0, &want.running_mean, BN_TOL, BN_TOL);
                assert_close(&tag("running_var (merged count, unbiased)"), &rv0, &want.running_var, BN_TOL, BN_TOL);
                for t in &ranks[1..] {
                    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same(&read(&gpu, &t.stats), &s), "{}", tag("every rank's statistics the same bits"));
                    assert!(same(&read(&gpu, &t.rm), &rm0) && same(&read(&gpu, &t.rv), &rv0), "{}", tag("running"));
                }

                // Backward: gradient sums, the host sum in rank order, input gradient.
                let mut gathered = Vec::new();
                for (k, t) in ranks.iter().enumerate() {
                    run(
                        &gpu,
                        &batch_norm::batch_norm_backward_sums(&gpu, &rank_cfg(k), &backward(k), &t.exchange).unwrap(),
                    );
                    let mine = read(&gpu, &t.exchange);
                    let want_s = reference::batch_norm::batch_norm_backward_sums(
                        &rank_cfg(k),
                        &to_f64(&xs[k]),
                        &want.mean,
                        &to_f64(&dbns[k]),
                    );
                    let got = rows(&mine);
                    let m = rank_cfg(k).count() as f64;
                    assert_close(&tag("batch_norm_backward_sums count"), &got[0], &want_s.count, 0.0, 0.0);
                    assert_close(
                        &tag("batch_norm_backward_sums sum dout"),
                        &got[1],
                        &want_s.sum_dout,
                        stat_tol(m),
                        BN_TOL,
                    );
                    assert_close(
                        &tag("batch_norm_backward_sums sum dout*(x-mean)"),
                        &got[2],
                        &want_s.sum_dout_xmu,
                        stat_tol(m),
                        BN_TOL,
                    );
                    gathered.extend(mine);
                }
                let summed = batch_norm::sum_rank_grad_sums(&gathered, case.c).unwrap();
                for (k, t) in ranks.iter().enumerate() {
                    t.exchange.write(&gpu, &summed).unwrap();
                    run(
                        &gpu,
                        &batch_norm::batch_norm_backward_input(&gpu, &rank_cfg(k), &backward(k), &t.exchange).unwrap(),
                    );
                }
                assert_close(&tag("batch_norm_backward_input dinp"), &cat(&|t| &t.dx), &want_dx, BN_TOL, BN_TOL);
                let over_ranks = |f: &dyn Fn(&Rank) -> &Tensor| -> Vec<f32> {
                    let mut s = vec![0.0f32; case.c];
                    for t in &ranks {
                        s.iter_mut().zip(read(&gpu, f(t))).for_each(|(a, b)| *a += b);
                    }
                    s
                };
                assert_close(&tag("dgamma summed over ranks"), &over_ranks(&|t| &t.dg), &want_dg, BN_TOL, BN_TOL);
                assert_close(&tag("dbeta summed over ranks"), &over_ranks(&|t| &t.db), &want_db, BN_TOL, BN_TOL);
            }
        }
    }
    // A gathered block that is not whole [3, C] blocks is an error, not a misread.
    let err = batch_norm::merge_rank_statistics(&[1.0; 7], 2).unwrap_err().to_string();
    assert!(err.contains("not whole [3, 2] blocks"), "{err}");
    assert!(batch_norm::sum_rank_grad_sums(&[], 2).is_err());
}

// ---------------------------------------------------------------------------------------------
// add (residual connections)

/// out = a + b and da = db = dout, exactly (one f32 addition, one copy), on sizes from one element
/// to past one workgroup row of the 1-D grid.
#[test]
fn add_forward_and_backward_match_reference() {
    let gpu = gpu();
    for (i, shape) in [vec![1usize], vec![2, 3, 5, 7], vec![3, 17, 33, 31]].into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut r = rng(450 + i as u64);
        let (a, b, dy) = (uniform(&mut r, n, -1.0, 1.0), uniform(&mut r, n, -1.0, 1.0), uniform(&mut r, n, -1.0, 1.0));
        let (ta, tb, tdy) =
            (upload(&gpu, "a", &shape, &a), upload(&gpu, "b", &shape, &b), upload(&gpu, "dy", &shape, &dy));
        let (out, da, db) = (zeros(&gpu, "out", &shape), zeros(&gpu, "da", &shape), zeros(&gpu, "db", &shape));
        run(&gpu, &add::add_forward(&gpu, &ta, &tb, &out).unwrap());
        run(&gpu, &add::add_backward(&gpu, &tdy, &da, &db).unwrap());
        // The f32 sum rounds once, the reference's f64 sum of the same values is exact: within
        // half an ulp, |err| <= 2^-24 |sum| (rtol 6e-8). The gradients are copies: exact.
        let want = reference::add::add_forward(&to_f64(&a), &to_f64(&b));
        assert_close(&format!("add_forward case {i}"), &read(&gpu, &out), &want, 0.0, 6e-8);
        let (want_a, want_b) = reference::add::add_backward(&to_f64(&dy));
        assert_close(&format!("add_backward da case {i}"), &read(&gpu, &da), &want_a, 0.0, 0.0);
        assert_close(&format!("add_backward db case {i}"), &read(&gpu, &db), &want_b, 0.0, 0.0);
    }
    let (a, b) = (zeros(&gpu, "a", &[2, 3]), zeros(&gpu, "b", &[3, 2]));
    let err = add::add_forward(&gpu, &a, &b, &a).unwrap_err().to_string();
    assert!(err.contains("add") && err.contains("second operand"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// relu

#[test]
fn relu_forward_and_backward_match_reference() {
    let gpu = gpu();
    for (i, n) in [1usize, 7, 1000, 65_537].into_iter().enumerate() {
        let mut r = rng(400 + i as u64);
        let x = uniform(&mut r, n, -1.0, 1.0);
        let dy = uniform(&mut r, n, -1.0, 1.0);
        let tx = upload(&gpu, "x", &[n], &x);
        let ty = zeros(&gpu, "y", &[n]);
        run(&gpu, &relu::relu_forward(&gpu, &tx, &ty).unwrap());
        let y = reference::relu::relu_forward(&to_f64(&x));
        // Exact: max(x, 0) and a select involve no rounding.
        assert_close(&format!("relu_forward n={n}"), &read(&gpu, &ty), &y, 0.0, 0.0);
        let tdy = upload(&gpu, "dy", &[n], &dy);
        let tdx = zeros(&gpu, "dx", &[n]);
        run(&gpu, &relu::relu_backward(&gpu, &ty, &tdy, &tdx).unwrap());
        assert_close(
            &format!("relu_backward n={n}"),
            &read(&gpu, &tdx),
            &reference::relu::relu_backward(&y, &to_f64(&dy)),
            0.0,
            0.0,
        );
    }
}

/// Past 65,535 workgroups the 1-D grid wraps into y; every element must still be visited once.
#[test]
fn elementwise_grid_wraps_past_the_workgroup_limit() {
    let gpu = gpu();
    let groups = gpu.limits.max_compute_workgroups_per_dimension as usize + 3;
    let n = groups * 256;
    let grid = gpu.grid_1d(n, 256);
    assert!(grid[1] > 1, "expected a 2-D grid for {n} elements, got {grid:?}");
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 - 500.0).collect();
    let tx = upload(&gpu, "x", &[n], &x);
    let ty = zeros(&gpu, "y", &[n]);
    run(&gpu, &relu::relu_forward(&gpu, &tx, &ty).unwrap());
    let y = read(&gpu, &ty);
    let first_bad = y.iter().zip(&x).position(|(&a, &b)| a != b.max(0.0));
    assert_eq!(first_bad, None, "relu over {n} elements in grid {grid:?}");
}

// ---------------------------------------------------------------------------------------------
// pooling

fn pool_cases() -> Vec<MaxPool2dConfig> {
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

// ---------------------------------------------------------------------------------------------
// SE block

fn se_cases() -> Vec<SeBlockConfig> {
    let mk = |n, c: usize, h, w, reduction: usize, bias| SeBlockConfig {
        n,
        c,
        h,
        w,
        hidden: c / reduction,
        bias,
        variant: Default::default(),
    };
    vec![
        mk(1, 64, 32, 32, 16, false), // batch 1, the widest plane: C=64 at 32x32
        mk(3, 1024, 2, 2, 16, false), // the base SENet's block: C=1024 at 2x2
        mk(2, 20, 3, 5, 3, true),     // C not a multiple of r (hidden 6), odd non-square plane
        mk(2, 300, 1, 1, 16, true),   // 1x1 plane, C > the 256-wide workgroup
        mk(4, 7, 5, 5, 7, true),      // hidden width 1
        mk(2, 2048, 1, 1, 16, false), // SE-ResNet-50's widest block
    ]
}

/// The SE block chains three f32 reductions (squeeze over H*W <= 1,024, fc1 over C <= 2,048, fc2
/// over Cr) and the exp of the sigmoid (a few ulp on GPUs); outputs are O(1): atol 2e-5, rtol 1e-4.
/// The weight gradients sum over the batch and over H*W in ds: same bound.
const SE_ATOL: f64 = 2e-5;
const SE_RTOL: f64 = 1e-4;

#[test]
fn se_block_forward_and_backward_match_reference() {
    for (path, gpu) in gpus() {
        for (i, cfg) in se_cases().iter().enumerate() {
            let mut r = rng(700 + i as u64);
            let (c, cr) = (cfg.c, cfg.hidden());
            let numel: usize = cfg.shape().iter().product();
            let x = uniform(&mut r, numel, -1.0, 2.0);
            // PyTorch's default init scale, 1/sqrt(fan_in), keeps the pre-activations O(1).
            let w1 = uniform(&mut r, cr * c, -1.0 / (c as f32).sqrt(), 1.0 / (c as f32).sqrt());
            let w2 = uniform(&mut r, c * cr, -1.0 / (cr as f32).sqrt(), 1.0 / (cr as f32).sqrt());
            let b1 = uniform(&mut r, cr, -0.5, 0.5);
            let b2 = uniform(&mut r, c, -0.5, 0.5);
            let dy = uniform(&mut r, numel, -1.0, 1.0);
            let tag = |s: &str| format!("{s} case {i} ({path}) {cfg:?}");

            let tx = upload(&gpu, "x", &cfg.shape(), &x);
            let tw1 = upload(&gpu, "w1", &cfg.fc1_shape(), &w1);
            let tw2 = upload(&gpu, "w2", &cfg.fc2_shape(), &w2);
            let tb1 = upload(&gpu, "b1", &[cr], &b1);
            let tb2 = upload(&gpu, "b2", &[c], &b2);
            let weights = SeWeights { w1: &tw1, b1: cfg.bias.then_some(&tb1), w2: &tw2, b2: cfg.bias.then_some(&tb2) };
            let ty = zeros(&gpu, "y", &cfg.shape());
            let saved = zeros(&gpu, "saved", &cfg.saved_shape());
            let d = se_block::se_block_forward(&gpu, cfg, &tx, &weights, &ty, &saved).unwrap();
            assert_eq!(d.len(), 1, "the SE forward is one dispatch");
            run(&gpu, &d);

            let (b1_64, b2_64) = (to_f64(&b1), to_f64(&b2));
            let (w1_64, w2_64) = (to_f64(&w1), to_f64(&w2));
            let p = reference::se_block::SeParams {
                w1: &w1_64,
                b1: cfg.bias.then_some(&b1_64[..]),
                w2: &w2_64,
                b2: cfg.bias.then_some(&b2_64[..]),
            };
            let x64 = to_f64(&x);
            let fwd = reference::se_block::se_block_forward(cfg, &x64, &p);
            assert_close(&tag("se_block_forward output"), &read(&gpu, &ty), &fwd.out, SE_ATOL, SE_RTOL);
            let sv = read(&gpu, &saved);
            let stride = 2 * c + cr;
            let pick = |off: usize, len: usize| -> Vec<f32> {
                (0..cfg.n).flat_map(|n| sv[n * stride + off..][..len].to_vec()).collect()
            };
            assert_close(&tag("se_block saved squeeze z"), &pick(0, c), &fwd.z, SE_ATOL, SE_RTOL);
            assert_close(&tag("se_block saved hidden h"), &pick(c, cr), &fwd.h, SE_ATOL, SE_RTOL);
            assert_close(&tag("se_block saved scale s"), &pick(c + cr, c), &fwd.s, SE_ATOL, SE_RTOL);

            let tdy = upload(&gpu, "dy", &cfg.shape(), &dy);
            let tdx = zeros(&gpu, "dx", &cfg.shape());
            let dsaved = zeros(&gpu, "dsaved", &cfg.dsaved_shape());
            let (tdw1, tdw2) = (zeros(&gpu, "dw1", &cfg.fc1_shape()), zeros(&gpu, "dw2", &cfg.fc2_shape()));
            let (tdb1, tdb2) = (zeros(&gpu, "db1", &[cr]), zeros(&gpu, "db2", &[c]));
            let grads = SeGrads {
                dinp: &tdx,
                dw1: &tdw1,
                db1: cfg.bias.then_some(&tdb1),
                dw2: &tdw2,
                db2: cfg.bias.then_some(&tdb2),
            };
            run(&gpu, &se_block::se_block_backward(&gpu, cfg, &tx, &weights, &saved, &tdy, &dsaved, &grads).unwrap());
            let g = reference::se_block::se_block_backward(cfg, &x64, &p, &fwd, &to_f64(&dy));
            assert_close(&tag("se_block_backward dinp"), &read(&gpu, &tdx), &g.dinp, SE_ATOL, SE_RTOL);
            assert_close(&tag("se_block_backward dw1"), &read(&gpu, &tdw1), &g.dw1, SE_ATOL, SE_RTOL);
            assert_close(&tag("se_block_backward dw2"), &read(&gpu, &tdw2), &g.dw2, SE_ATOL, SE_RTOL);
            if cfg.bias {
                assert_close(&tag("se_block_backward db1"), &read(&gpu, &tdb1), &g.db1, SE_ATOL, SE_RTOL);
                assert_close(&tag("se_block_backward db2"), &read(&gpu, &tdb2), &g.db2, SE_ATOL, SE_RTOL);
            }
        }
    }
}

#[test]
fn se_block_rejects_no_hidden_units() {
    let cfg = SeBlockConfig { n: 1, c: 8, h: 2, w: 2, hidden: 0, bias: false, variant: Default::default() };
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("no hidden units") && err.contains("c: 8"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// linear

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

// ---------------------------------------------------------------------------------------------
// cross-entropy

#[test]
fn cross_entropy_matches_reference_and_accumulates() {
    for (path, gpu) in gpus() {
        // (batch, classes, logit scale): batch 1; 3 classes; > 256 samples (strided reduction);
        // 1,000 classes; logits of +-60, where a naive exp overflows f32.
        for (i, (n, k, scale)) in
            [(1usize, 10usize, 3.0f32), (7, 3, 3.0), (300, 10, 3.0), (5, 1000, 3.0), (9, 10, 60.0), (64, 10, 0.0)]
                .into_iter()
                .enumerate()
        {
            let mut r = rng(900 + i as u64);
            // Scale 0: logits from {-1, -0.5, 0, 0.5, 1}, so the target often ties others and the
            // top-5 tie rule (lower index first) decides.
            let logits: Vec<f32> = if scale == 0.0 {
                uniform(&mut r, n * k, -1.25, 1.25).iter().map(|v| (v * 2.0).round() / 2.0).collect()
            } else {
                uniform(&mut r, n * k, -scale, scale)
            };
            let target: Vec<u32> = (0..n).map(|_| rand::Rng::random_range(&mut r, 0..k as u32)).collect();
            let tl = upload(&gpu, "logits", &[n, k], &logits);
            let tt = Tensor::from_slice(&gpu, "target", &[n], &target).unwrap();
            let tdl = zeros(&gpu, "dlogits", &[n, k]);
            let per = zeros(&gpu, "per-sample", &[n, cross_entropy::per_sample::LEN]);
            let res = zeros(&gpu, "result", &[result::LEN]);
            let d = cross_entropy::cross_entropy_forward_backward(&gpu, &tl, &tt, &tdl, &per, &res, None).unwrap();
            // Twice: the batch fields are overwritten, the running sums accumulate.
            run(&gpu, &d);
            run(&gpu, &d);
            let want = reference::cross_entropy::cross_entropy_forward_backward(&to_f64(&logits), &target, k);
            let got = read(&gpu, &res);
            // Loss: log-sum-exp over <= 1,000 exps and a mean over <= 300 samples: ~1e-6 relative.
            assert_close(
                &format!("cross_entropy loss case {i} ({path})"),
                &[got[result::LOSS]],
                &[want.loss],
                1e-5,
                1e-5,
            );
            assert_eq!(got[result::CORRECT], want.correct as f32, "cross_entropy correct case {i} ({path})");
            assert_close(
                &format!("cross_entropy summed loss case {i} ({path})"),
                &[got[result::SUM_LOSS]],
                &[2.0 * want.loss * n as f64],
                1e-4,
                1e-5,
            );
            assert_eq!(
                got[result::SUM_CORRECT],
                2.0 * want.correct as f32,
                "cross_entropy summed correct case {i} ({path})"
            );
            assert_eq!(got[result::SUM_COUNT], 2.0 * n as f32, "cross_entropy summed count case {i} ({path})");
            // Counts are exact: integers far below 2^24.
            assert_eq!(
                got[result::SUM_CORRECT5],
                2.0 * want.correct5 as f32,
                "cross_entropy summed top-5 correct case {i} ({path})"
            );
            assert!(want.correct5 >= want.correct && (k > 5 || want.correct5 == n), "top-5 ⊇ top-1; all when k <= 5");
            // Gradient entries are at most 1/n: absolute 1e-7 is ~1 ulp of the largest.
            assert_close(
                &format!("cross_entropy dlogits case {i} ({path})"),
                &read(&gpu, &tdl),
                &want.dlogits,
                1e-7,
                1e-5,
            );
            let per = read(&gpu, &per);
            for s in 0..n {
                let row = &logits[s * k..][..k];
                let first_max = row.iter().enumerate().fold(0, |a, (j, &v)| if v > row[a] { j } else { a });
                assert_eq!(
                    per[cross_entropy::per_sample::LEN * s + cross_entropy::per_sample::PREDICTED],
                    first_max as f32,
                    "cross_entropy predicted class, case {i} ({path}) sample {s}"
                );
            }
        }
    }
}

/// Label smoothing (torch's `label_smoothing`) on the GPU against the reference, on both
/// reduction paths: batch 1, 3 classes, 300 samples, 1,000 classes.
#[test]
fn cross_entropy_label_smoothing_matches_reference() {
    for (path, gpu) in gpus() {
        for (i, (n, k, e)) in
            [(1usize, 10usize, 0.1f32), (7, 3, 0.3), (300, 10, 0.1), (5, 1000, 0.5)].into_iter().enumerate()
        {
            let mut r = rng(950 + i as u64);
            let logits = uniform(&mut r, n * k, -3.0, 3.0);
            let target: Vec<u32> = (0..n).map(|_| rand::Rng::random_range(&mut r, 0..k as u32)).collect();
            let tl = upload(&gpu, "logits", &[n, k], &logits);
            let tt = Tensor::from_slice(&gpu, "target", &[n], &target).unwrap();
            let tdl = zeros(&gpu, "dlogits", &[n, k]);
            let per = zeros(&gpu, "per-sample", &[n, cross_entropy::per_sample::LEN]);
            let res = zeros(&gpu, "result", &[result::LEN]);
            let d = cross_entropy::cross_entropy_forward_backward_smoothed(&gpu, &tl, &tt, &tdl, &per, &res, e, None)
                .unwrap();
            run(&gpu, &d);
            let want = reference::cross_entropy::cross_entropy_forward_backward_smoothed(
                &to_f64(&logits),
                &target,
                k,
                f64::from(e),
            );
            // As the unsmoothed loss: log-sum-exp and sums over <= 1,000 terms in f32, ~1e-6 relative.
            assert_close(
                &format!("smoothed loss case {i} ({path})"),
                &[read(&gpu, &res)[result::LOSS]],
                &[want.loss],
                1e-5,
                1e-5,
            );
            // Entries are at most 1/n: absolute 1e-7 is ~1 ulp of the largest.
            assert_close(&format!("smoothed dlogits case {i} ({path})"), &read(&gpu, &tdl), &want.dlogits, 1e-7, 1e-5);
            assert_eq!(read(&gpu, &res)[result::CORRECT], want.correct as f32, "smoothing leaves the count");
        }
    }
}

/// Soft targets (timm's SoftTargetCrossEntropy, Mixup's loss) against
/// `reference::cross_entropy::cross_entropy_soft_forward_backward`: mixed smoothed one-hots as
/// timm's `mixup_target` makes them (λ·(1 − e + e/K at y, e/K elsewhere) + (1 − λ)·the same at
/// the flipped batch's label), arbitrary distributions, and rows that do not sum to 1 (the
/// gradient's softmax·Σt term); batch 1, 3 classes, > 256 samples,
/// 1,000 classes; a loss weight of 1/3 (a micro-batch of --grad-accum-steps 3) on one case.
/// Tolerances as the smoothed loss's (the same log-sum-exp and sums in f32). A gradient without
/// Σt, a target read from the wrong row, or the weight ignored are off by far more.
#[test]
fn cross_entropy_soft_targets_match_reference() {
    for (path, gpu) in gpus() {
        for (i, (n, k, mixed, weight)) in [
            (1usize, 10usize, true, 1.0f32),
            (7, 3, false, 1.0),
            (300, 10, true, 1.0 / 3.0),
            (5, 1000, true, 1.0),
            (9, 4, false, 0.5),
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = rng(970 + i as u64);
            let logits = uniform(&mut r, n * k, -3.0, 3.0);
            let targets: Vec<f32> = if mixed {
                let y: Vec<usize> = (0..n).map(|_| rand::Rng::random_range(&mut r, 0..k)).collect();
                let lam = uniform(&mut r, 1, 0.0, 1.0)[0];
                let (e, kf) = (0.1f32, k as f32);
                let onehot = |c: usize, j: usize| if c == j { 1.0 - e + e / kf } else { e / kf };
                (0..n * k)
                    .map(|x| lam * onehot(y[x / k], x % k) + (1.0 - lam) * onehot(y[n - 1 - x / k], x % k))
                    .collect()
            } else {
                let raw = uniform(&mut r, n * k, 0.0, 1.0);
                // Weight 0.5 marks the case whose rows are left unnormalised.
                let norm = |row: &[f32]| if weight == 0.5 { 1.0 } else { row.iter().sum::<f32>() };
                raw.chunks(k).flat_map(|row| row.iter().map(|v| v / norm(row)).collect::<Vec<_>>()).collect()
            };
            let tl = upload(&gpu, "logits", &[n, k], &logits);
            let tt = upload(&gpu, "soft targets", &[n, k], &targets);
            let tdl = zeros(&gpu, "dlogits", &[n, k]);
            let per = zeros(&gpu, "per-sample", &[n, cross_entropy::per_sample::LEN]);
            let res = zeros(&gpu, "result", &[result::LEN]);
            let (d, w) = cross_entropy::cross_entropy_soft_weighted(&gpu, &tl, &tt, &tdl, &per, &res, None).unwrap();
            w.set(&gpu, weight);
            run(&gpu, &d);
            let want =
                reference::cross_entropy::cross_entropy_soft_forward_backward(&to_f64(&logits), &to_f64(&targets), k);
            let what = format!("soft-target case {i} ({path})");
            let got = read(&gpu, &res);
            assert_close(&format!("{what}: loss"), &[got[result::LOSS]], &[want.loss], 1e-5, 1e-5);
            let dl: Vec<f64> = want.dlogits.iter().map(|g| g * f64::from(weight)).collect();
            assert_close(&format!("{what}: dlogits"), &read(&gpu, &tdl), &dl, 1e-7, 1e-5);
            assert_eq!(got[result::CORRECT], want.correct as f32, "{what}: correct (dominant class)");
            assert_eq!(got[result::SUM_CORRECT5], want.correct5 as f32, "{what}: top-5");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// optimizers

#[test]
fn optimizers_match_reference_over_several_steps() {
    let gpu = gpu();
    let configs = [
        OptimizerConfig::adam(1e-3),
        OptimizerConfig::Adam { lr: 1e-2, beta1: 0.8, beta2: 0.99, eps: 1e-6, weight_decay: 1e-4, decoupled: false },
        OptimizerConfig::adamw(1e-3),
        OptimizerConfig::sgd(0.1, 0.0),
        OptimizerConfig::sgd(0.1, 0.9),
        OptimizerConfig::Sgd { lr: 0.05, momentum: 0.9, dampening: 0.0, weight_decay: 5e-4, nesterov: true },
        OptimizerConfig::Sgd { lr: 0.05, momentum: 0.5, dampening: 0.3, weight_decay: 1e-4, nesterov: false },
    ];
    let n = 1003;
    // Update only [3, 1000): the rest must stay as it was.
    let (offset, len) = (3usize, 997usize);
    for (i, cfg) in configs.iter().enumerate() {
        let mut r = rng(1000 + i as u64);
        let p0 = uniform(&mut r, n, -1.0, 1.0);
        let tp = upload(&gpu, "param", &[n], &p0);
        let tg = zeros(&gpu, "grad", &[n]);
        let states: Vec<_> = (0..cfg.state_count()).map(|_| zeros(&gpu, "state", &[n])).collect();
        let state_refs: Vec<&_> = states.iter().collect();
        let step = OptimizerStep::new(&gpu, *cfg, &tp, &tg, &state_refs, offset, len).unwrap();
        let mut p = to_f64(&p0[offset..offset + len]);
        let mut st = vec![vec![0.0; len]; cfg.state_count()];
        for t in 1..=4u64 {
            let g = uniform(&mut r, n, -1.0, 1.0);
            tg.write(&gpu, &g).unwrap();
            step.set_step(&gpu, t);
            run(&gpu, std::slice::from_ref(&step.dispatch));
            reference::optimizer::optimizer_step(cfg, t, &mut p, &to_f64(&g[offset..offset + len]), &mut st);
        }
        let got = read(&gpu, &tp);
        // Parameters are O(1) and move by O(lr) per step; the f32 state and update round at ~1e-7
        // relative, and GPU sqrt/division are within a few ulp: atol 1e-6.
        assert_close(&format!("optimizer {cfg:?} param"), &got[offset..offset + len], &p, 1e-6, 1e-6);
        assert_eq!(&got[..offset], &p0[..offset], "optimizer {cfg:?} wrote before its range");
        assert_eq!(&got[offset + len..], &p0[offset + len..], "optimizer {cfg:?} wrote after its range");
        for (k, s) in states.iter().enumerate() {
            let got = read(&gpu, s);
            assert_close(&format!("optimizer {cfg:?} state {k}"), &got[offset..offset + len], &st[k], 1e-6, 1e-5);
        }
    }
}

use senet_wgpu::gpu::Tensor;

/// A mistake that wgpu catches (here: buffers that do not match the kernel's bindings) is an
/// error with the kernel's name, not a panic, and does not poison the device for later work.
#[test]
fn gpu_validation_errors_are_errors_not_panics() {
    let gpu = gpu();
    let t = zeros(&gpu, "t", &[4]);
    let p = gpu.uniform("p", &[4u32, 0, 0, 0]);
    let err = gpu
        .dispatch(
            "relu",
            "relu_forward",
            &[("WG", 256.0)],
            &[senet_wgpu::gpu::Bind::Uniform(0, &p), senet_wgpu::gpu::Bind::Tensor(1, &t)],
            [1, 1, 1],
        )
        .unwrap_err();
    assert!(format!("{err:#}").contains("relu::relu_forward"), "{err:#}");
    let err = gpu.pipeline("relu", senet_wgpu::gpu::Precision::F32, "no_such_entry", &[]).unwrap_err();
    assert!(format!("{err:#}").contains("no_such_entry"), "{err:#}");
    gpu.check().expect("scoped errors do not leak into the device's error list");
}

/// A lost device (here destroyed on purpose, as a driver reset would) surfaces as an error at the
/// next wait or read-back — the run can end with a message — instead of a panic or a hang.
#[test]
fn a_lost_device_is_an_error_not_a_panic() {
    let gpu = senet_wgpu::gpu::Gpu::new(&Default::default()).expect("GPU test cannot run");
    let x = upload(&gpu, "x", &[4], &[1.0, -1.0, 2.0, -2.0]);
    let y = zeros(&gpu, "y", &[4]);
    let d = relu::relu_forward(&gpu, &x, &y).unwrap();
    gpu.device.destroy();
    gpu.run(&d.iter().collect::<Vec<_>>());
    let err = match gpu.wait().and_then(|_| y.read::<f32>(&gpu).map(|_| ())) {
        Err(e) => format!("{e:#}"),
        Ok(()) => panic!("work on a destroyed device reported success"),
    };
    assert!(!err.is_empty(), "{err}");
    eprintln!("lost device reported as: {err}");
}

/// The paper's ablations of the SE block itself: max squeeze, tanh and ReLU gates, with and
/// without biases — forward and every backward output against the reference (tolerances as for
/// the standard block).
#[test]
fn se_block_ablation_variants_match_reference() {
    use senet_wgpu::ops::se_block::{Excitation, SeVariant, Squeeze};
    for (path, gpu) in gpus() {
        let shapes = [(2usize, 20usize, 3usize, 5usize, 3usize, true), (1, 64, 8, 8, 16, false)];
        for squeeze in [Squeeze::Avg, Squeeze::Max] {
            for excitation in [Excitation::Sigmoid, Excitation::Tanh, Excitation::Relu] {
                for (i, &(n, c, h, w, reduction, bias)) in shapes.iter().enumerate() {
                    let variant = SeVariant { squeeze, excitation };
                    let cfg = SeBlockConfig { n, c, h, w, hidden: c / reduction, bias, variant };
                    let cr = cfg.hidden();
                    let mut r = rng(1700 + i as u64);
                    let numel = n * c * h * w;
                    let x = uniform(&mut r, numel, -1.0, 2.0);
                    let w1 = uniform(&mut r, cr * c, -1.0 / (c as f32).sqrt(), 1.0 / (c as f32).sqrt());
                    let w2 = uniform(&mut r, c * cr, -1.0 / (cr as f32).sqrt(), 1.0 / (cr as f32).sqrt());
                    let (b1, b2) = (uniform(&mut r, cr, -0.5, 0.5), uniform(&mut r, c, -0.5, 0.5));
                    let dy = uniform(&mut r, numel, -1.0, 1.0);
                    let tag = |s: &str| format!("{s} {variant:?} case {i} ({path})");
                    let (tx, tw1, tw2) = (
                        upload(&gpu, "x", &cfg.shape(), &x),
                        upload(&gpu, "w1", &cfg.fc1_shape(), &w1),
                        upload(&gpu, "w2", &cfg.fc2_shape(), &w2),
                    );
                    let (tb1, tb2) = (upload(&gpu, "b1", &[cr], &b1), upload(&gpu, "b2", &[c], &b2));
                    let weights = SeWeights { w1: &tw1, b1: bias.then_some(&tb1), w2: &tw2, b2: bias.then_some(&tb2) };
                    let (ty, saved) = (zeros(&gpu, "y", &cfg.shape()), zeros(&gpu, "saved", &cfg.saved_shape()));
                    run(&gpu, &se_block::se_block_forward(&gpu, &cfg, &tx, &weights, &ty, &saved).unwrap());
                    let (b1_64, b2_64, w1_64, w2_64, x64) =
                        (to_f64(&b1), to_f64(&b2), to_f64(&w1), to_f64(&w2), to_f64(&x));
                    let p = reference::se_block::SeParams {
                        w1: &w1_64,
                        b1: bias.then_some(&b1_64[..]),
                        w2: &w2_64,
                        b2: bias.then_some(&b2_64[..]),
                    };
                    let fwd = reference::se_block::se_block_forward(&cfg, &x64, &p);
                    assert_close(&tag("forward"), &read(&gpu, &ty), &fwd.out, SE_ATOL, SE_RTOL);

                    let (tdy, tdx, dsaved) = (
                        upload(&gpu, "dy", &cfg.shape(), &dy),
                        zeros(&gpu, "dx", &cfg.shape()),
                        zeros(&gpu, "ds", &cfg.dsaved_shape()),
                    );
                    let (tdw1, tdw2, tdb1, tdb2) = (
                        zeros(&gpu, "dw1", &cfg.fc1_shape()),
                        zeros(&gpu, "dw2", &cfg.fc2_shape()),
                        zeros(&gpu, "db1", &[cr]),
                        zeros(&gpu, "db2", &[c]),
                    );
                    let grads = SeGrads {
                        dinp: &tdx,
                        dw1: &tdw1,
                        db1: bias.then_some(&tdb1),
                        dw2: &tdw2,
                        db2: bias.then_some(&tdb2),
                    };
                    run(
                        &gpu,
                        &se_block::se_block_backward(&gpu, &cfg, &tx, &weights, &saved, &tdy, &dsaved, &grads).unwrap(),
                    );
                    let g = reference::se_block::se_block_backward(&cfg, &x64, &p, &fwd, &to_f64(&dy));
                    assert_close(&tag("dinp"), &read(&gpu, &tdx), &g.dinp, SE_ATOL, SE_RTOL);
                    assert_close(&tag("dw1"), &read(&gpu, &tdw1), &g.dw1, SE_ATOL, SE_RTOL);
                    assert_close(&tag("dw2"), &read(&gpu, &tdw2), &g.dw2, SE_ATOL, SE_RTOL);
                    if bias {
                        assert_close(&tag("db1"), &read(&gpu, &tdb1), &g.db1, SE_ATOL, SE_RTOL);
                        assert_close(&tag("db2"), &read(&gpu, &tdb2), &g.db2, SE_ATOL, SE_RTOL);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// gradient clipping (--clip-grad-norm)

/// One clip_grad_norm case: the flat gradient buffer cut into chunks of these sizes (as a buffer
/// past one binding is), values uniform in ±`magnitude` (0: all zero), clipped to `max_norm`;
/// `loss_scale` > 1: the gradients are an f16 plan's, multiplied by the loss scale, and the
/// scaler's inverse scale unscales them for the norm.
struct ClipCase {
    what: &'static str,
    chunks: &'static [usize],
    magnitude: f32,
    max_norm: f64,
    loss_scale: f32,
    /// Whether the norm is above max_norm (checked against the reference, so a case cannot
    /// silently stop testing what it says).
    clips: bool,
}

/// clip_grad_norm's tolerance. The norm: each chain of f32 additions of positive squares is at
/// most 256 long (a lane's share of a chunk of up to 2^24 elements) plus 8 tree levels, then the
/// same for the partials: relative error <= 2 * 264 * 2^-24 = 3.1e-5 of the sum of squares, half
/// that after the square root (1.6e-5), plus the squares' own rounding: rtol 2e-5 on the norm.
/// The clipped gradients are g * coef, coef as exact as the norm: rtol 2e-5 + one rounding
/// (6e-8), and atol 0 (a zero gradient stays exactly zero). A norm below max_norm leaves coef at
/// exactly 1 and the gradients bit for bit. An indexing bug (a chunk or a workgroup's share left
/// out, counted twice) moves the norm by far more: a share is at least 1/4,096 of it here.
const CLIP_RTOL: f64 = 2e-5;

fn clip_cases() -> Vec<ClipCase> {
    let case = |what, chunks, magnitude, max_norm, loss_scale, clips| ClipCase {
        what,
        chunks,
        magnitude,
        max_norm,
        loss_scale,
        clips,
    };
    vec![
        case("1 element above max", &[1], 30.0, 0.5, 1.0, true),
        case("1 element, zero gradient", &[1], 0.0, 1.0, 1.0, false),
        case("257 elements below max", &[257], 1e-2, 1.0, 1.0, false),
        case("zero gradients in 3,000", &[3000], 0.0, 0.5, 1.0, false),
        // more than 256 workgroups x 256 values: the partial sums stride round their chunk
        case("70,001 elements above max", &[70_001], 1.0, 5.0, 1.0, true),
        // a chunk that ends off a workgroup, then one of one element: the partial slots of each
        case("chunks of 320, 1,333 and 1", &[320, 1333, 1], 1.0, 2.0, 1.0, true),
        // an f16 plan's: gradients x 2^16; clipped on their unscaled norm, still scaled after
        case("loss-scaled by 2^16, above max", &[64, 4097], 1e-3, 0.01, 65536.0, true),
        case("loss-scaled by 2^10, below max", &[5000], 1e-3, 1.0, 1024.0, false),
    ]
}

/// The gradients' total 2-norm and every clipped gradient on the GPU against the reference
/// (`reference::clip_grad_norm`, torch's clip_grad_norm_ in f64), on both reduction paths.
#[test]
fn clip_grad_norm_equals_the_reference() {
    use senet_wgpu::ops::clip_grad_norm::ClipGradNorm;
    use senet_wgpu::ops::grad_scaler::state;
    for (path, gpu) in gpus() {
        // Chunks start at multiples of the adapter's offset alignment, as the flat buffers' do.
        let align = (gpu.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        for (k, c) in clip_cases().iter().enumerate() {
            let what = format!("clip_grad_norm {} ({path})", c.what);
            let mut starts = Vec::new();
            let mut end = 0usize;
            for &len in c.chunks {
                let start = end.next_multiple_of(align);
                starts.push(start);
                end = start + len;
            }
            let mut r = rng(2200 + k as u64);
            let mut g = vec![0.0f32; end];
            for (&s, &len) in starts.iter().zip(c.chunks) {
                for v in &mut g[s..s + len] {
                    *v = rand::Rng::random_range(&mut r, -1.0..1.0f32) * c.magnitude * c.loss_scale;
                }
            }
            let grads = upload(&gpu, "grads", &[end], &g);
            let views: Vec<_> = starts
                .iter()
                .zip(c.chunks)
                .map(|(&s, &len)| grads.view(&gpu, &format!("grads {s}.."), s, &[len]).unwrap())
                .collect();
            let mut scaler_state = vec![0.0f32; state::LEN];
            (scaler_state[state::SCALE], scaler_state[state::INV_SCALE]) = (c.loss_scale, 1.0 / c.loss_scale);
            let scaler = upload(&gpu, "scaler", &[state::LEN], &scaler_state);
            let scaled = (c.loss_scale != 1.0).then_some(&scaler);
            let clip = ClipGradNorm::new(&gpu, c.max_norm, &views.iter().collect::<Vec<_>>(), scaled).unwrap();
            run(&gpu, &clip.dispatches);

            // The reference clips the unscaled gradients; the GPU's stay scaled (the optimizer
            // unscales them), so its result is compared after dividing by the scale.
            let inv = 1.0 / f64::from(c.loss_scale);
            let mut want: Vec<Vec<f64>> = starts
                .iter()
                .zip(c.chunks)
                .map(|(&s, &len)| g[s..s + len].iter().map(|&v| f64::from(v) * inv).collect())
                .collect();
            let mut slices: Vec<&mut [f64]> = want.iter_mut().map(|v| v.as_mut_slice()).collect();
            let norm = reference::clip_grad_norm::clip_grad_norm(&mut slices, c.max_norm);
            let coef = reference::clip_grad_norm::clip_coef(norm, c.max_norm);
            assert_eq!(norm > c.max_norm, c.clips, "{what}: norm {norm} against max_norm {}", c.max_norm);
            let got_state = clip.read(&gpu).unwrap();
            let err = assert_close(&format!("{what} total norm"), &[got_state.total_norm], &[norm], 0.0, CLIP_RTOL);
            eprintln!("{what}: total norm {norm:.6e}, relative error {:.2e}", err / norm.max(1e-300));
            assert_close(&format!("{what} coefficient"), &[got_state.coef], &[coef], 0.0, CLIP_RTOL);
            let after = read(&gpu, &grads);
            if coef == 1.0 {
                assert_eq!(got_state.coef, 1.0, "{what}: below max_norm the coefficient is exactly 1");
                assert_eq!(after, g, "{what}: below max_norm the gradients are untouched");
            } else {
                assert!(coef < 0.999, "{what}: the case must clip for real (coefficient {coef})");
            }
            for ((&s, &len), w) in starts.iter().zip(c.chunks).zip(&want) {
                let got: Vec<f32> = after[s..s + len].iter().map(|&v| (f64::from(v) * inv) as f32).collect();
                assert_close(&format!("{what} gradients {s}.."), &got, w, 0.0, CLIP_RTOL + 6e-8);
            }
            // The gaps between chunks (zeros in the flat buffers) are neither counted nor written.
            let mut gaps = vec![true; end];
            for (&s, &len) in starts.iter().zip(c.chunks) {
                gaps[s..s + len].iter_mut().for_each(|x| *x = false);
            }
            assert!(after.iter().zip(&gaps).all(|(&v, &gap)| !gap || v == 0.0), "{what}: a gap was written");
        }
    }
}

/// Past 65,535 workgroups of the scale kernel (2^24 + 257 gradients: the grid folds into two
/// dimensions) and 256 values per lane in the partial sums. One reduction path: the other is
/// covered above, and this case moves 64 MiB each way.
#[test]
fn clip_grad_norm_past_65535_workgroups() {
    use senet_wgpu::ops::clip_grad_norm::ClipGradNorm;
    let gpu = gpu();
    let n = (1usize << 24) + 257;
    assert!(n.div_ceil(256) > 65_535);
    let mut r = rng(2300);
    let g = uniform(&mut r, n, -1.0, 1.0);
    let grads = upload(&gpu, "grads", &[n], &g);
    let clip = ClipGradNorm::new(&gpu, 100.0, &[&grads], None).unwrap();
    run(&gpu, &clip.dispatches);
    let mut want = to_f64(&g);
    let norm = reference::clip_grad_norm::clip_grad_norm(&mut [want.as_mut_slice()], 100.0);
    let st = clip.read(&gpu).unwrap();
    let err = assert_close("clip_grad_norm 2^24 + 257 total norm", &[st.total_norm], &[norm], 0.0, CLIP_RTOL);
    eprintln!("clip_grad_norm 2^24 + 257: total norm {norm:.6e}, relative error {:.2e}", err / norm);
    assert!(st.coef < 0.1, "the case clips: norm {norm}");
    assert_close("clip_grad_norm 2^24 + 257 gradients", &read(&gpu, &grads), &want, 0.0, CLIP_RTOL + 6e-8);
}

/// max_norm must be finite, above 0 and an f32: else a host error naming it.
#[test]
fn clip_grad_norm_refuses_a_bad_max_norm() {
    use senet_wgpu::ops::clip_grad_norm::ClipGradNorm;
    let gpu = gpu();
    let grads = zeros(&gpu, "grads", &[4]);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e39] {
        let e = ClipGradNorm::new(&gpu, bad, &[&grads], None).err().expect("refused");
        assert!(format!("{e:#}").contains("max_norm must be a finite number above 0"), "{bad}: {e:#}");
    }
}

// ---------------------------------------------------------------------------------------------
// f16 variants (--precision f16): every kernel that moves activations, compiled with `act = f16`.
//
// Inputs are f16 values (uploaded as f16; the f64 reference reads the same values widened), every
// sum is f32, and each f16 output is rounded once when stored: a correct kernel is within the f32
// kernel's tolerance plus half an f16 ulp of the result, 2^-11 relative (4.88e-4; F16_RTOL rounds
// up), and half the f16 subnormal spacing (2^-25, 3e-8) absolute. f32 outputs (weight and bias
// gradients, statistics, the loss) carry the f32 tolerance alone: products of two f16 values are
// exact in f32. An indexing or conversion bug gives errors of order 0.1.

const F16_RTOL: f64 = 4.9e-4;
const F16_ATOL: f64 = 3e-8;

/// `v` rounded to the nearest f16 (the values an f16 tensor holds), as f32.
fn f16_values(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// An f16 tensor holding `v` rounded to f16.
fn upload_f16(gpu: &senet_wgpu::gpu::Gpu, label: &str, shape: &[usize], v: &[f32]) -> Tensor {
    let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
    Tensor::from_slice(gpu, label, shape, &h).expect("upload f16")
}

fn zeros_f16(gpu: &senet_wgpu::gpu::Gpu, label: &str, shape: &[usize]) -> Tensor {
    Tensor::zeros_of(gpu, label, shape, senet_wgpu::gpu::Dtype::F16).expect("allocate f16")
}

fn read_f16(gpu: &senet_wgpu::gpu::Gpu, t: &Tensor) -> Vec<f32> {
    assert_eq!(t.dtype, senet_wgpu::gpu::Dtype::F16, "{} should hold f16", t.label);
    t.read_f32(gpu).expect("read back")
}

/// Random values in [lo, hi) rounded to f16.
fn uniform_f16(r: &mut rand_chacha::ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    f16_values(&uniform(r, n, lo, hi))
}

/// The test machine's adapter must have f16 (lavapipe does): never pass by skipping.
fn gpu_f16() -> std::sync::Arc<senet_wgpu::gpu::Gpu> {
    let g = gpu();
    assert!(
        g.features.contains(wgpu::Features::SHADER_F16),
        "{} has no SHADER_F16: the f16 kernels cannot be tested here",
        g.describe()
    );
    g
}

/// The cast rounds to nearest even as `half` (PyTorch's .half()) does — ties, the largest finite
/// value, overflow to ±inf, subnormals, signed zero — bit for bit, on an odd count (the last
/// word half padding) and past one workgroup.
#[test]
fn cast_rounds_to_nearest_even_like_torch_half() {
    let gpu = gpu_f16();
    let mut r = rng(1500);
    let mut x = uniform(&mut r, 1001, -4.0, 4.0);
    let special = [
        65504.0f32,
        65519.0,
        65520.0,
        -70000.0,
        1e-7,
        -3e-8,
        6.1e-5,
        0.0,
        -0.0,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        2049.0,
        2051.0,
    ];
    x[..special.len()].copy_from_slice(&special);
    let tx = upload(&gpu, "x", &[x.len()], &x);
    let ty = zeros_f16(&gpu, "y", &[x.len()]);
    run(&gpu, &senet_wgpu::ops::cast::cast_forward(&gpu, &tx, &ty).unwrap());
    let got: Vec<u16> = ty.read::<half::f16>(&gpu).unwrap().iter().map(|h| h.to_bits()).collect();
    let want: Vec<u16> = x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "cast of {:e}: gpu {:#06x} reference {:#06x}", x[i], g, w);
    }
    // The oracle of the same name, widened: equal values (±inf included, so compared with ==).
    let r64 = reference::cast::cast_forward(&to_f64(&x));
    for (i, (g, w)) in read_f16(&gpu, &ty).iter().zip(&r64).enumerate() {
        assert!(f64::from(*g) == *w, "cast_forward of {:e}: gpu {g:e} reference {w:e}", x[i]);
    }
}

/// An f16 buffer bound where a kernel's variant reads f32 (or the reverse) is a plan-time error
/// naming the binding and the tensor, not a silent reinterpretation of its bytes.
#[test]
fn binding_an_f16_tensor_to_an_f32_kernel_is_an_error() {
    let gpu = gpu_f16();
    let (x, y) = (upload(&gpu, "x32", &[8], &[1.0; 8]), zeros_f16(&gpu, "y16", &[8]));
    // relu's variant is chosen by its input: f32 here, so the f16 output does not fit.
    let err = relu::relu_forward(&gpu, &x, &y).unwrap_err().to_string();
    assert!(err.contains("relu_forward") && err.contains("y16") && err.contains("f16"), "{err}");
}

#[test]
fn f16_conv2d_kernels_match_reference() {
    let gpu = gpu_f16();
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(1600 + i as u64);
        let x = uniform_f16(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let w = uniform_f16(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
        let dy = uniform_f16(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0);
        let (tx, tw, tdy) = (
            upload_f16(&gpu, "x", &cfg.input_shape(), &x),
            upload_f16(&gpu, "w", &cfg.weight_shape(), &w),
            upload_f16(&gpu, "dy", &cfg.output_shape(), &dy),
        );
        let tb = upload(&gpu, "b", &[cfg.c_out], &b);
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        let want_y = reference::conv2d::conv2d_forward(cfg, &x64, &w64, cfg.bias.then_some(&b64[..]));
        let want_dx = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
        let want_dw = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
        let bias = cfg.bias.then_some(&tb);
        // The register blocks the adapter picks and the extremes; every workgroup-memory shape.
        let mut tiles = vec![
            RegisterTiles::for_layer(&gpu, cfg),
            RegisterTiles::ALL[0],
            RegisterTiles::ALL[RegisterTiles::ALL.len() - 1],
        ];
        tiles.dedup();
        for t in tiles {
            let what = |pass: &str| format!("f16 {pass} case {i} {t:?} {cfg:?}");
            let ty = zeros_f16(&gpu, "y", &cfg.output_shape());
            run(&gpu, &forward(&gpu, cfg, ConvKernel::Register(t), &tx, &tw, bias, &ty));
            assert_close(&what("conv2d_forward"), &read_f16(&gpu, &ty), &want_y, CONV_ATOL, CONV_RTOL + F16_RTOL);
            let tdx = zeros_f16(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, ConvKernel::Register(t), &tdy, &tw, &tdx));
            let got = read_f16(&gpu, &tdx);
            assert_close(&what("conv2d_backward_input"), &got, &want_dx, CONV_ATOL, CONV_RTOL + F16_RTOL);
            for splits in [1, 3] {
                let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
                run(&gpu, &backward_weight(&gpu, cfg, ConvKernel::Register(t), &tx, &tdy, &tdw, splits));
                let what = what(&format!("conv2d_backward_weight splits {splits}"));
                assert_close(&what, &read(&gpu, &tdw), &want_dw, CONV_ATOL, CONV_RTOL);
            }
        }
        for t in WorkgroupTiles::ALL {
            let what = |pass: &str| format!("f16 {pass} (workgroup) case {i} {t:?}");
            let ty = zeros_f16(&gpu, "y", &cfg.output_shape());
            run(&gpu, &forward(&gpu, cfg, ConvKernel::Workgroup(t), &tx, &tw, bias, &ty));
            assert_close(&what("conv2d_forward"), &read_f16(&gpu, &ty), &want_y, CONV_ATOL, CONV_RTOL + F16_RTOL);
            let tdx = zeros_f16(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, ConvKernel::Workgroup(t), &tdy, &tw, &tdx));
            let got = read_f16(&gpu, &tdx);
            assert_close(&what("conv2d_backward_input"), &got, &want_dx, CONV_ATOL, CONV_RTOL + F16_RTOL);
            let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
            run(&gpu, &backward_weight(&gpu, cfg, ConvKernel::Workgroup(t), &tx, &tdy, &tdw, 3));
            assert_close(&what("conv2d_backward_weight"), &read(&gpu, &tdw), &want_dw, CONV_ATOL, CONV_RTOL);
        }
        if cfg.bias {
            let want = reference::conv2d::conv2d_backward_bias(cfg, &dy64);
            for (path, g) in gpus() {
                let tdy = upload_f16(&g, "dy", &cfg.output_shape(), &dy);
                let tdb = zeros(&g, "db", &[cfg.c_out]);
                run(&g, &conv2d::conv2d_backward_bias(&g, cfg, &tdy, &tdb).unwrap());
                assert_close(
                    &format!("f16 conv2d_backward_bias case {i} ({path})"),
                    &read(&g, &tdb),
                    &want,
                    CONV_ATOL,
                    CONV_RTOL,
                );
            }
        }
    }
}

#[test]
fn f16_batch_norm_matches_reference() {
    for (path, gpu) in gpus() {
        for (i, cfg) in bn_cases().iter().enumerate() {
            let mut r = rng(1700 + i as u64);
            let numel: usize = cfg.shape().iter().product();
            let x = uniform_f16(&mut r, numel, -2.0, 3.0);
            let gamma = uniform(&mut r, cfg.c, 0.5, 1.5);
            let beta = uniform(&mut r, cfg.c, -0.5, 0.5);
            let rm = uniform(&mut r, cfg.c, -0.2, 0.2);
            let rv = uniform(&mut r, cfg.c, 0.5, 2.0);
            let dy = uniform_f16(&mut r, numel, -1.0, 1.0);
            let tag = |s: &str| format!("f16 {s} case {i} ({path}) {cfg:?}");
            // f16 outputs: BN's tolerance plus the output rounding; f32 statistics and parameter
            // gradients: BN's tolerance.
            let (tol16, tol32) = (BN_TOL + F16_RTOL, BN_TOL);
            let tx = upload_f16(&gpu, "x", &cfg.shape(), &x);
            let tg = upload(&gpu, "gamma", &[cfg.c], &gamma);
            let tb = upload(&gpu, "beta", &[cfg.c], &beta);
            let trm = upload(&gpu, "running_mean", &[cfg.c], &rm);
            let trv = upload(&gpu, "running_var", &[cfg.c], &rv);
            let stats = zeros(&gpu, "stats", &[2, cfg.c]);
            let ty = zeros_f16(&gpu, "y", &cfg.shape());
            let fwd = bn(&tx, &tg, &tb, &trm, &trv, &stats, &ty);
            run(&gpu, &batch_norm::batch_norm_forward_train(&gpu, cfg, &fwd).unwrap());
            let (x64, g64, b64) = (to_f64(&x), to_f64(&gamma), to_f64(&beta));
            let want =
                reference::batch_norm::batch_norm_forward_train(cfg, &x64, &g64, &b64, &to_f64(&rm), &to_f64(&rv));
            assert_close(&tag("batch_norm_forward (train)"), &read_f16(&gpu, &ty), &want.out, tol16, tol16);
            assert_close(&tag("running_var"), &read(&gpu, &trv), &want.running_var, tol32, tol32);
            let s = read(&gpu, &stats);
            assert_close(&tag("saved mean"), &s[..cfg.c], &want.mean, tol32, tol32);
            assert_close(&tag("saved invstd"), &s[cfg.c..], &want.invstd, tol32, tol32);
            let tdy = upload_f16(&gpu, "dy", &cfg.shape(), &dy);
            let tdx = zeros_f16(&gpu, "dx", &cfg.shape());
            let (tdg, tdb) = (zeros(&gpu, "dgamma", &[cfg.c]), zeros(&gpu, "dbeta", &[cfg.c]));
            run(
                &gpu,
                &batch_norm::batch_norm_backward(&gpu, cfg, &tx, &tg, &stats, None, &tdy, &tdx, &tdg, &tdb).unwrap(),
            );
            let (dx, dg, db) =
                reference::batch_norm::batch_norm_backward(cfg, &x64, &g64, &want.mean, &want.invstd, &to_f64(&dy));
            assert_close(&tag("batch_norm_backward dinp"), &read_f16(&gpu, &tdx), &dx, tol16, tol16);
            assert_close(&tag("batch_norm_backward dgamma"), &read(&gpu, &tdg), &dg, tol32, tol32);
            assert_close(&tag("batch_norm_backward dbeta"), &read(&gpu, &tdb), &db, tol32, tol32);
            // Eval mode, and the fused ReLU (max(y, 0) of the same f16 values: exact).
            let ty2 = zeros_f16(&gpu, "y eval", &cfg.shape());
            run(
                &gpu,
                &batch_norm::batch_norm_forward_eval(&gpu, cfg, &bn(&tx, &tg, &tb, &trm, &trv, &stats, &ty2)).unwrap(),
            );
            let eval = reference::batch_norm::batch_norm_forward_eval(
                cfg,
                &x64,
                &g64,
                &b64,
                &want.running_mean,
                &want.running_var,
            );
            assert_close(&tag("batch_norm_forward (eval)"), &read_f16(&gpu, &ty2), &eval, tol16, tol16);
            let relu_cfg = cfg.with_relu();
            let ty3 = zeros_f16(&gpu, "y relu", &cfg.shape());
            run(
                &gpu,
                &batch_norm::batch_norm_forward_eval(&gpu, &relu_cfg, &bn(&tx, &tg, &tb, &trm, &trv, &stats, &ty3))
                    .unwrap(),
            );
            let relu_want: Vec<f64> = read_f16(&gpu, &ty2).iter().map(|&v| f64::from(v.max(0.0))).collect();
            assert_close(&tag("batch_norm_forward (eval) + fused relu"), &read_f16(&gpu, &ty3), &relu_want, 0.0, 0.0);
        }
    }
}

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

#[test]
fn f16_se_block_matches_reference() {
    for (path, gpu) in gpus() {
        for (i, cfg) in se_cases().iter().enumerate() {
            let mut r = rng(1900 + i as u64);
            let (c, cr) = (cfg.c, cfg.hidden());
            let numel: usize = cfg.shape().iter().product();
            let x = uniform_f16(&mut r, numel, -1.0, 2.0);
            let w1 = uniform(&mut r, cr * c, -1.0 / (c as f32).sqrt(), 1.0 / (c as f32).sqrt());
            let w2 = uniform(&mut r, c * cr, -1.0 / (cr as f32).sqrt(), 1.0 / (cr as f32).sqrt());
            let (b1, b2) = (uniform(&mut r, cr, -0.5, 0.5), uniform(&mut r, c, -0.5, 0.5));
            let dy = uniform_f16(&mut r, numel, -1.0, 1.0);
            let tag = |s: &str| format!("f16 {s} case {i} ({path}) {cfg:?}");
            let tx = upload_f16(&gpu, "x", &cfg.shape(), &x);
            let (tw1, tw2) = (upload(&gpu, "w1", &cfg.fc1_shape(), &w1), upload(&gpu, "w2", &cfg.fc2_shape(), &w2));
            let (tb1, tb2) = (upload(&gpu, "b1", &[cr], &b1), upload(&gpu, "b2", &[c], &b2));
            let weights = SeWeights { w1: &tw1, b1: cfg.bias.then_some(&tb1), w2: &tw2, b2: cfg.bias.then_some(&tb2) };
            let ty = zeros_f16(&gpu, "y", &cfg.shape());
            let saved = zeros(&gpu, "saved", &cfg.saved_shape());
            run(&gpu, &se_block::se_block_forward(&gpu, cfg, &tx, &weights, &ty, &saved).unwrap());
            let (w1_64, w2_64, b1_64, b2_64) = (to_f64(&w1), to_f64(&w2), to_f64(&b1), to_f64(&b2));
            let p = reference::se_block::SeParams {
                w1: &w1_64,
                b1: cfg.bias.then_some(&b1_64[..]),
                w2: &w2_64,
                b2: cfg.bias.then_some(&b2_64[..]),
            };
            let x64 = to_f64(&x);
            let fwd = reference::se_block::se_block_forward(cfg, &x64, &p);
            assert_close(&tag("se_block_forward"), &read_f16(&gpu, &ty), &fwd.out, SE_ATOL, SE_RTOL + F16_RTOL);
            let tdy = upload_f16(&gpu, "dy", &cfg.shape(), &dy);
            let tdx = zeros_f16(&gpu, "dx", &cfg.shape());
            let dsaved = zeros(&gpu, "dsaved", &cfg.dsaved_shape());
            let (tdw1, tdw2) = (zeros(&gpu, "dw1", &cfg.fc1_shape()), zeros(&gpu, "dw2", &cfg.fc2_shape()));
            let (tdb1, tdb2) = (zeros(&gpu, "db1", &[cr]), zeros(&gpu, "db2", &[c]));
            let grads = SeGrads {
                dinp: &tdx,
                dw1: &tdw1,
                db1: cfg.bias.then_some(&tdb1),
                dw2: &tdw2,
                db2: cfg.bias.then_some(&tdb2),
            };
            run(&gpu, &se_block::se_block_backward(&gpu, cfg, &tx, &weights, &saved, &tdy, &dsaved, &grads).unwrap());
            let g = reference::se_block::se_block_backward(cfg, &x64, &p, &fwd, &to_f64(&dy));
            assert_close(&tag("se_block_backward dinp"), &read_f16(&gpu, &tdx), &g.dinp, SE_ATOL, SE_RTOL + F16_RTOL);
            assert_close(&tag("se_block_backward dw1"), &read(&gpu, &tdw1), &g.dw1, SE_ATOL, SE_RTOL);
            assert_close(&tag("se_block_backward dw2"), &read(&gpu, &tdw2), &g.dw2, SE_ATOL, SE_RTOL);
            if cfg.bias {
                assert_close(&tag("se_block_backward db1"), &read(&gpu, &tdb1), &g.db1, SE_ATOL, SE_RTOL);
                assert_close(&tag("se_block_backward db2"), &read(&gpu, &tdb2), &g.db2, SE_ATOL, SE_RTOL);
            }
        }
    }
}

/// f16 logits: the loss and softmax in f32, the gradient times the loss scale (scaler state
/// [0]), rounded to f16. Scales 1 and 1024 (a power of two: scaling is exact before the rounding).
#[test]
fn f16_cross_entropy_scales_its_gradient() {
    use senet_wgpu::ops::grad_scaler::state;
    for (path, gpu) in gpus() {
        for (n, k, scale) in [(1usize, 3usize, 1.0f32), (37, 10, 1024.0), (300, 10, 65536.0)] {
            let mut r = rng(2000 + n as u64);
            let logits = uniform_f16(&mut r, n * k, -8.0, 8.0);
            let labels: Vec<u32> = (0..n).map(|i| (i * 7 % k) as u32).collect();
            let tl = upload_f16(&gpu, "logits", &[n, k], &logits);
            let tt = Tensor::from_slice(&gpu, "labels", &[n], &labels).unwrap();
            let tdl = zeros_f16(&gpu, "dlogits", &[n, k]);
            let (per, res) =
                (zeros(&gpu, "per", &[n, cross_entropy::per_sample::LEN]), zeros(&gpu, "res", &[result::LEN]));
            let mut st = vec![0.0f32; state::LEN];
            st[state::SCALE] = scale;
            let tst = upload(&gpu, "scaler", &[state::LEN], &st);
            run(
                &gpu,
                &cross_entropy::cross_entropy_forward_backward(&gpu, &tl, &tt, &tdl, &per, &res, Some(&tst)).unwrap(),
            );
            let want = reference::cross_entropy::cross_entropy_forward_backward(&to_f64(&logits), &labels, k);
            let scaled: Vec<f64> = want.dlogits.iter().map(|g| g * f64::from(scale)).collect();
            let what = format!("f16 cross_entropy n={n} k={k} scale {scale} ({path})");
            // The softmax is f32 (exp within a few ulp): 1e-6 of the largest gradient, scale/n, then
            // the f16 rounding.
            let atol = 1e-6 * f64::from(scale) / n as f64 + F16_ATOL;
            assert_close(&format!("{what} dlogits"), &read_f16(&gpu, &tdl), &scaled, atol, F16_RTOL);
            let got = read(&gpu, &res);
            assert_close(&format!("{what} loss"), &got[result::LOSS..=result::LOSS], &[want.loss], 1e-5, 1e-5);
            assert_eq!(got[result::CORRECT] as usize, want.correct, "{what} correct");
        }
    }
}

/// GradScaler on the GPU step by step against the reference, over two gradient chunks (as a flat
/// buffer past one binding is checked), with an inf planted in the second chunk at step 3 and a
/// NaN in the first at step 6, growth interval 3: the scale halves on each overflow and doubles
/// after three finite steps; skipped steps leave parameters and optimizer state untouched and do
/// not advance the step count; each finite step's update (new - old) equals the reference
/// optimizer's on the unscaled gradients. Adam (bias corrections from the GPU's count, f32
/// -expm1: 1e-6 of the update) and SGD with momentum, whose first step is skipped: its momentum
/// buffer must start at the first finite step.
#[test]
fn grad_scaler_skips_overflowing_steps_and_grows_as_torch() {
    use senet_wgpu::ops::grad_scaler::{GradScaler, GradScalerConfig};
    use senet_wgpu::reference::grad_scaler::{Scaler, grad_scaler_step};
    let gpu = gpu();
    let (n, half) = (140_032usize, 70_016usize); // two chunks, each past one pass of 256 x 256 values
    let cfg = GradScalerConfig { init_scale: 1024.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 3 };
    // Dampening, so that the first step (buffer = g) differs from a later one (buffer = 0.9 b + 0.7 g).
    let sgd = OptimizerConfig::Sgd { lr: 0.05, momentum: 0.9, dampening: 0.3, weight_decay: 1e-4, nesterov: false };
    for (opt, bad_steps) in [(OptimizerConfig::adam(1e-2), [3u32, 6]), (sgd, [1, 5])] {
        let grads = zeros(&gpu, "grads", &[n]);
        let chunks = [
            grads.view(&gpu, "grads 0..", 0, &[half]).unwrap(),
            grads.view(&gpu, "grads 1..", half, &[n - half]).unwrap(),
        ];
        let scaler = GradScaler::new(&gpu, cfg, &[&chunks[0], &chunks[1]]).unwrap();
        let mut r = rng(2100);
        let p0 = uniform(&mut r, n, -1.0, 1.0);
        let tp = upload(&gpu, "param", &[n], &p0);
        let states: Vec<_> = (0..opt.state_count()).map(|_| zeros(&gpu, "state", &[n])).collect();
        let refs: Vec<&_> = states.iter().collect();
        let step = OptimizerStep::new_scaled(&gpu, opt, &tp, &grads, &refs, 0, n, Some(&scaler.state)).unwrap();
        let mut want = Scaler { scale: cfg.init_scale, tracker: 0, steps: 0, skipped: 0 };
        let (mut p, mut st) = (to_f64(&p0), vec![vec![0.0; n]; opt.state_count()]);
        for t in 1..=9u32 {
            let mut g = uniform(&mut r, n, -1.0, 1.0);
            let scale = want.scale as f32;
            g.iter_mut().for_each(|v| *v *= scale);
            if t == bad_steps[0] {
                g[n - 1] = f32::INFINITY;
            } else if t == bad_steps[1] {
                g[12_345] = f32::NAN;
            }
            grads.write(&gpu, &g).unwrap();
            step.set_step(&gpu, u64::from(t)); // the host's count: a scaled step must not use it
            let before = read(&gpu, &tp);
            let mut ds: Vec<senet_wgpu::gpu::Dispatch> = scaler.dispatches.clone();
            ds.push(step.dispatch.clone());
            run(&gpu, &ds);
            let growth = (cfg.growth_factor, cfg.growth_interval);
            let (next, skipped) = grad_scaler_step(want, &to_f64(&g), growth, cfg.backoff_factor);
            assert_eq!(skipped, bad_steps.contains(&t), "{opt:?} step {t}");
            let old = p.clone();
            if !skipped {
                let unscaled: Vec<f64> = g.iter().map(|&v| f64::from(v * (1.0 / scale))).collect();
                reference::optimizer::optimizer_step(&opt, u64::from(next.steps), &mut p, &unscaled, &mut st);
            }
            want = next;
            let got = scaler.read(&gpu).unwrap();
            assert_eq!(
                (f64::from(got.scale), got.growth_tracker, got.steps, got.skipped, got.found_inf),
                (want.scale, want.tracker, want.steps, want.skipped, skipped),
                "{opt:?}: scaler state after step {t}"
            );
            let after = read(&gpu, &tp);
            let got_delta: Vec<f32> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            let want_delta: Vec<f64> = p.iter().zip(&old).map(|(a, b)| a - b).collect();
            if skipped {
                assert!(got_delta.iter().all(|&d| d == 0.0), "{opt:?}: a skipped step {t} moved the parameters");
            } else {
                // Each new f32 parameter (|p| <= 1) rounds to half an ulp of 1.0, 6e-8, so a delta to
                // one ulp: atol 1.2e-7 (1e-5 of a typical O(lr) = 1e-2 update); rtol 1e-4.
                assert_close(&format!("{opt:?}: update of step {t}"), &got_delta, &want_delta, 1.2e-7, 1e-4);
            }
        }
        assert_eq!((want.skipped, want.steps), (2, 7), "{opt:?}");
    }
}

/// The scale stops growing at the largest finite value (torch checks the grown scale is finite):
/// from 2^127 a growth would overflow f32, so the scale stays.
#[test]
fn grad_scaler_does_not_grow_to_infinity() {
    use senet_wgpu::ops::grad_scaler::{GradScaler, GradScalerConfig};
    let gpu = gpu();
    let cfg =
        GradScalerConfig { init_scale: 2f64.powi(127), growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 1 };
    let grads = zeros(&gpu, "grads", &[10]);
    let scaler = GradScaler::new(&gpu, cfg, &[&grads]).unwrap();
    run(&gpu, &scaler.dispatches);
    let st = scaler.read(&gpu).unwrap();
    assert_eq!((st.scale, st.growth_tracker, st.steps), (2f32.powi(127), 0, 1));
}

// ---------------------------------------------------------------------------------------------
// gradient accumulation (--grad-accum-steps) and the model EMA (--model-ema)

/// The flat views a network binds: `sizes` elements each, every start a multiple of the
/// adapter's offset alignment (the chunks of a flat buffer past one binding are).
fn aligned_flat(
    gpu: &senet_wgpu::gpu::Gpu,
    label: &str,
    sizes: &[usize],
    data: &[f32],
) -> (senet_wgpu::gpu::Tensor, Vec<senet_wgpu::gpu::Tensor>) {
    let flat = senet_wgpu::gpu::Tensor::flat(gpu, label, data).unwrap();
    let mut start = 0;
    let views = sizes
        .iter()
        .map(|&n| {
            let v = flat.view(gpu, &format!("{label} {start}.."), start, &[n]).unwrap();
            start += n;
            v
        })
        .collect();
    (flat, views)
}

/// Chunk sizes in elements: multiples of the adapter's offset alignment but the last.
fn accum_cases(gpu: &senet_wgpu::gpu::Gpu) -> Vec<Vec<usize>> {
    let a = (gpu.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
    vec![vec![1], vec![255], vec![257], vec![70_001], vec![5 * a, 21 * a, 1]]
}

/// grad_accum over micro-batch counts 2, 3 and 5 against `reference::grad_accum`: the gradient
/// buffer after the last micro-batch equals the f64 sum of every micro-batch's gradients. The
/// GPU adds in f32 in PyTorch's order (((g1 + g2) + g3) …): at most 4 roundings of sums of
/// values in ±1, so atol 5 · 2^-24 · 5 = 1.5e-6 (rtol 0: a sum that cancels is held to the same
/// absolute bound). A micro-batch left out or added twice moves elements by up to 1.
#[test]
fn grad_accum_equals_the_reference() {
    use senet_wgpu::ops::grad_accum::{GradAccum, MicroBatch};
    let gpu = gpu();
    for sizes in accum_cases(&gpu) {
        let total: usize = sizes.iter().sum();
        for count in [2, 3, 5] {
            let what = format!("grad_accum of {count} over chunks {sizes:?}");
            let (flat, views) = aligned_flat(&gpu, "gradients", &sizes, &vec![0.0; total]);
            let acc = GradAccum::new(&gpu, &views.iter().collect::<Vec<_>>(), total).unwrap();
            let mut r = rng(900 + total as u64 + count as u64);
            let mut want_grad = vec![0.0f64; total];
            let mut want_accum = vec![0.0f64; total];
            for i in 0..count {
                let g = uniform(&mut r, total, -1.0, 1.0);
                flat.write(&gpu, &g).unwrap();
                let m = MicroBatch::of(i, count);
                run(&gpu, acc.dispatches(m));
                want_grad = to_f64(&g);
                match m {
                    MicroBatch::First => reference::grad_accum::grad_accum_store(&want_grad, &mut want_accum),
                    MicroBatch::Middle => reference::grad_accum::grad_accum_add(&want_grad, &mut want_accum),
                    MicroBatch::Last => reference::grad_accum::grad_accum_finish(&mut want_grad, &want_accum),
                    MicroBatch::Whole => unreachable!("count > 1"),
                }
            }
            assert_close(&format!("{what}: gradients"), &read(&gpu, &flat), &want_grad, 1.5e-6, 0.0);
        }
    }
}

/// model_ema_step against `reference::model_ema` (torch's lerp) over parameter chunks and the
/// batch-norm buffers in one dispatch, at weights on both sides of lerp's 0.5 switch. Weight 1
/// (timm's first update) must copy the model bit for bit, weight 0 keep the EMA bit for bit.
/// Otherwise: lerp is 3 f32 roundings of values in ±2, atol 4 · 2^-24 · 2 = 5e-7. A skipped
/// element, the wrong buffer or the wrong side of the switch is off by up to 3.
#[test]
fn model_ema_equals_the_reference() {
    use senet_wgpu::ops::model_ema::ModelEmaStep;
    let gpu = gpu();
    for sizes in accum_cases(&gpu) {
        for bn_len in [0usize, 1, 300] {
            let total: usize = sizes.iter().sum();
            let mut r = rng(700 + total as u64 + bn_len as u64);
            let (model, ema0) = (uniform(&mut r, total, -1.0, 1.0), uniform(&mut r, total, -1.0, 1.0));
            let (bn_model, bn_ema0) = (uniform(&mut r, bn_len, 0.0, 2.0), uniform(&mut r, bn_len, 0.0, 2.0));
            let (_, model_views) = aligned_flat(&gpu, "parameters", &sizes, &model);
            let (ema_flat, ema_views) = aligned_flat(&gpu, "EMA", &sizes, &ema0);
            let (_, bm) = aligned_flat(&gpu, "bn", &[bn_len], &bn_model);
            let (bn_ema_flat, be) = aligned_flat(&gpu, "bn EMA", &[bn_len], &bn_ema0);
            let pairs: Vec<_> = model_views.iter().zip(&ema_views).collect();
            let b = (bn_len > 0).then(|| (&bm[0], &be[0]));
            let step = ModelEmaStep::new(&gpu, &pairs, b).unwrap();
            let mut want = to_f64(&ema0);
            let mut want_bn = to_f64(&bn_ema0);
            for weight in [0.3f32, 0.7, 2e-4, 1.0, 0.0] {
                let what = format!("model_ema chunks {sizes:?}, bn {bn_len}, weight {weight}");
                step.set_weight(&gpu, weight);
                run(&gpu, &step.dispatches);
                // The reference starts from the GPU's last state, so each weight is tested alone.
                reference::model_ema::model_ema_step(&to_f64(&model), &mut want, f64::from(weight));
                reference::model_ema::model_ema_step(&to_f64(&bn_model), &mut want_bn, f64::from(weight));
                let (got, got_bn) = (read(&gpu, &ema_flat), read(&gpu, &bn_ema_flat));
                if weight == 1.0 {
                    assert_eq!(got, model, "{what}: weight 1 copies the model");
                    assert_eq!(got_bn[..bn_len], bn_model[..], "{what}: weight 1 copies the BN buffers");
                } else {
                    assert_close(&format!("{what}: parameters"), &got, &want, 5e-7, 0.0);
                    assert_close(&format!("{what}: BN buffers"), &got_bn[..bn_len], &want_bn, 5e-7, 0.0);
                }
                want = to_f64(&got);
                want_bn = to_f64(&got_bn[..bn_len]);
            }
        }
    }
}

/// The decay the host writes (`ops::model_ema::ema_decay`) and the reference's
/// (`reference::model_ema::ema_decay`) are timm's ModelEmaV3.get_decay (decay 0.9998, with and
/// without warmup), the values printed by scripts/ema_decay_golden.py (timm 1.0.31), to 1e-15.
#[test]
fn ema_decay_is_timms() {
    for (what, ema_decay) in [
        ("ops", senet_wgpu::ops::model_ema::ema_decay as fn(f64, bool, u64) -> f64),
        ("reference", senet_wgpu::reference::model_ema::ema_decay),
    ] {
        ema_decay_matches(what, ema_decay);
    }
}

fn ema_decay_matches(what: &str, ema_decay: fn(f64, bool, u64) -> f64) {
    let golden: [(u64, f64, f64); 7] = [
        (1, 0.0, 0.0),
        (2, 0.9998, 0.3700394750525634),
        (3, 0.9998, 0.5192501432308638),
        (10, 0.9998, 0.7845565309968117),
        (1000, 0.9998, 0.99),
        (100_000, 0.9998, 0.9995358411166387),
        (10_000_000, 0.9998, 0.9998),
    ];
    for (step, plain, warm) in golden {
        assert!((ema_decay(0.9998, false, step) - plain).abs() < 1e-15, "{what}: step {step} without warmup");
        assert!((ema_decay(0.9998, true, step) - warm).abs() < 1e-15, "{what}: step {step} with warmup");
    }
}
