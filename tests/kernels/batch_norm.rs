//! Batch norm: training and evaluation, the fused ReLU, --sync-bn's split kernels, f32 and f16.

use crate::common::*;
use crate::{F16_RTOL, read_f16, uniform_f16, upload_f16};
use senet_wgpu::gpu::Tensor;
use senet_wgpu::ops::batch_norm::{self, BatchNormConfig};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig};
use senet_wgpu::ops::pool::{self, MaxPool2dConfig};
use senet_wgpu::ops::relu;
use senet_wgpu::reference;

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

/// The epilogues `--fuse on` runs inside the batch norm (batch_norm.wgsl REMASK, POOL, BIAS) on
/// awkward shapes: batch 1 with an odd, non-square plane whose floor-mode pool drops a row and a
/// column; overlapping 3x3/2 windows with padding; ceil mode (a window hanging over the edge);
/// 17 channels; 4,096 values per channel (more than the 256-wide reduction); a non-square window
/// and stride.
fn pool_cases() -> Vec<(BatchNormConfig, MaxPool2dConfig)> {
    let pool = |k: usize, s: usize, p: usize, ceil: bool| MaxPool2dConfig {
        kernel: (k, k),
        stride: (s, s),
        pad: (p, p),
        ceil,
        ..MaxPool2dConfig::two_by_two(1, 1, 1, 1)
    };
    vec![
        (BatchNormConfig::new(1, 3, 5, 7), pool(2, 2, 0, false)),
        (BatchNormConfig::new(2, 5, 9, 6), pool(3, 2, 1, false)),
        (BatchNormConfig::new(2, 3, 7, 7), pool(3, 2, 0, true)),
        (BatchNormConfig::new(3, 17, 8, 8), pool(2, 2, 0, false)),
        (BatchNormConfig::new(16, 2, 16, 16), pool(2, 2, 0, false)),
        // Non-square window and stride (3x2 / 2x1, padded rows only): a height read for a width fails.
        (
            BatchNormConfig::new(1, 5, 9, 6),
            MaxPool2dConfig { kernel: (3, 2), stride: (2, 1), pad: (1, 0), ..pool(1, 1, 0, false) },
        ),
    ]
}

/// What one variant leaves: [output, argmax (as f32 bits), saved statistics, running mean,
/// running var, dinp, dgamma, dbeta, conv bias gradient].
fn bn_pool_outputs(
    gpu: &senet_wgpu::gpu::Gpu,
    cfg: &BatchNormConfig,
    p: &MaxPool2dConfig,
    t: &[&Tensor; 4],
    fused: bool,
    f16: bool,
) -> Vec<Vec<f32>> {
    let [tx, tg, tb, tdy] = *t;
    let fused_cfg = cfg.with_pool(*p).with_conv_bias();
    let pool = fused_cfg.pool.expect("pooled");
    let act = |label: &str, shape: &[usize]| if f16 { zeros_f16(gpu, label, shape) } else { zeros(gpu, label, shape) };
    let (trm, trv) = (zeros(gpu, "rm", &[cfg.c]), upload(gpu, "rv", &[cfg.c], &vec![1.0; cfg.c]));
    let stats = zeros(gpu, "stats", &[2, cfg.c]);
    let (out, argmax) = (act("pooled", &pool.output_shape()), zeros(gpu, "argmax", &pool.output_shape()));
    let dx = act("dx", &cfg.shape());
    let (dg, db, dbias) =
        (zeros(gpu, "dgamma", &[cfg.c]), zeros(gpu, "dbeta", &[cfg.c]), zeros(gpu, "dbias", &[cfg.c]));
    if fused {
        let fwd = bn(tx, tg, tb, &trm, &trv, &stats, &out);
        let f = batch_norm::BnFused { argmax: Some(&argmax), ..Default::default() };
        run(gpu, &batch_norm::batch_norm_forward_train_fused(gpu, &fused_cfg, &fwd, f).unwrap());
        let g = batch_norm::BnBackward {
            inp: tx,
            gamma: tg,
            stats: &stats,
            relu_out: None,
            dout: tdy,
            dinp: &dx,
            dgamma: &dg,
            dbeta: &db,
        };
        let f = batch_norm::BnFused {
            argmax: Some(&argmax),
            conv_dbias: Some(&dbias),
            beta: Some(tb),
            se_grad: None,
            partials: None,
            se_weight: None,
        };
        run(gpu, &batch_norm::batch_norm_backward_fused(gpu, &fused_cfg, &g, f).unwrap());
    } else {
        // Batch norm with its ReLU, the pool, the pool's backward, the batch norm's, and the
        // convolution bias gradient as conv2d_backward_bias sums it.
        let relu_out = act("relu out", &cfg.shape());
        let fwd = bn(tx, tg, tb, &trm, &trv, &stats, &relu_out);
        run(gpu, &batch_norm::batch_norm_forward_train(gpu, &cfg.with_relu(), &fwd).unwrap());
        run(gpu, &pool::max_pool2d_forward(gpu, &pool, &relu_out, &out, &argmax).unwrap());
        let dpool = act("d relu out", &cfg.shape());
        run(gpu, &pool::max_pool2d_backward(gpu, &pool, &argmax, tdy, &dpool).unwrap());
        let d = batch_norm::batch_norm_backward(
            gpu,
            &cfg.with_relu(),
            tx,
            tg,
            &stats,
            Some(&relu_out),
            &dpool,
            &dx,
            &dg,
            &db,
        );
        run(gpu, &d.unwrap());
        let conv = Conv2dConfig::square(cfg.n, 1, (cfg.h, cfg.w), cfg.c, 1, 1, 0, true);
        run(gpu, &conv2d::conv2d_backward_bias(gpu, &conv, &dx, &dbias).unwrap());
    }
    let acts = |t: &Tensor| if f16 { read_f16(gpu, t) } else { read(gpu, t) };
    let bits: Vec<f32> = argmax.read::<u32>(gpu).unwrap().iter().map(|&a| f32::from_bits(a)).collect();
    vec![
        acts(&out),
        bits,
        read(gpu, &stats),
        read(gpu, &trm),
        read(gpu, &trv),
        acts(&dx),
        read(gpu, &dg),
        read(gpu, &db),
        read(gpu, &dbias),
    ]
}

/// The fused pool and convolution bias gradient give the unfused kernels' bits (batch norm with
/// its ReLU, max_pool2d forward and backward, conv2d_backward_bias), in f32 and f16, and match
/// the composed f64 references: f32 within BN_TOL; f16 within BN_TOL plus half an f16 ulp
/// (F16_RTOL) — except the bias gradient, a sum of dinp that cancels to rounding noise, which
/// is held to 1e-3 of the sum of |dinp| over its channel in f16 and 1e-5 in f32.
#[test]
fn batch_norm_fused_pool_and_bias_gradient_are_the_unfused_kernels_bit_for_bit() {
    for (path, gpu) in gpus() {
        for (i, (cfg, p)) in pool_cases().iter().enumerate() {
            for f16 in [false, true] {
                let mut r = rng(700 + i as u64);
                let numel: usize = cfg.shape().iter().product();
                let fused_cfg = cfg.with_pool(*p).with_conv_bias();
                let pooled: usize = fused_cfg.out_shape().iter().product();
                let vals = |r: &mut _, n, lo, hi| if f16 { uniform_f16(r, n, lo, hi) } else { uniform(r, n, lo, hi) };
                let x = vals(&mut r, numel, -2.0, 3.0);
                let (gamma, beta) = (uniform(&mut r, cfg.c, 0.5, 1.5), uniform(&mut r, cfg.c, -0.5, 0.5));
                let dy = vals(&mut r, pooled, -1.0, 1.0);
                let up = |label: &str, shape: &[usize], v: &[f32]| {
                    if f16 { upload_f16(&gpu, label, shape, v) } else { upload(&gpu, label, shape, v) }
                };
                let t = [
                    &up("x", &cfg.shape(), &x),
                    &upload(&gpu, "gamma", &[cfg.c], &gamma),
                    &upload(&gpu, "beta", &[cfg.c], &beta),
                    &up("dy", &fused_cfg.out_shape(), &dy),
                ];
                let (fused, apart) =
                    (bn_pool_outputs(&gpu, cfg, p, &t, true, f16), bn_pool_outputs(&gpu, cfg, p, &t, false, f16));
                let what = format!("case {i} ({path}, f16 {f16}) {cfg:?} {p:?}");
                let names = [
                    "output",
                    "argmax",
                    "statistics",
                    "running mean",
                    "running var",
                    "dinp",
                    "dgamma",
                    "dbeta",
                    "conv bias gradient",
                ];
                for (name, (f, a)) in names.iter().zip(fused.iter().zip(&apart)) {
                    let same = f.len() == a.len() && f.iter().zip(a).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(same, "{what}: fused {name} differs from the unfused kernels'");
                }
                let (tol, f64s) = (if f16 { BN_TOL + F16_RTOL } else { BN_TOL }, |v: &[f32]| to_f64(v));
                let (want, argmax) = reference::batch_norm::batch_norm_forward_train_fused(
                    &fused_cfg,
                    &f64s(&x),
                    &f64s(&gamma),
                    &f64s(&beta),
                    &vec![0.0; cfg.c],
                    &vec![1.0; cfg.c],
                );
                let argmax = argmax.expect("pooled");
                assert_close(&format!("{what} output"), &fused[0], &want.out, tol, tol);
                let got_argmax: Vec<u32> = fused[1].iter().map(|v| v.to_bits()).collect();
                let agree = got_argmax.iter().zip(&argmax).filter(|(a, b)| a == b).count();
                // Near-ties may pick another element of the window under f32 rounding.
                assert!(
                    agree * 100 >= argmax.len() * 98,
                    "{what}: argmax agrees with the reference at {agree} of {}",
                    argmax.len()
                );
                let (dx, dg, db, dbias) = reference::batch_norm::batch_norm_backward_fused(
                    &fused_cfg,
                    &f64s(&x),
                    &f64s(&gamma),
                    &f64s(&beta),
                    &want.mean,
                    &want.invstd,
                    Some(&got_argmax),
                    &f64s(&dy),
                );
                assert_close(&format!("{what} dinp"), &fused[5], &dx, tol, tol);
                // In f16 each gathered gradient is rounded to f16 (half an ulp, F16_RTOL) where
                // windows overlap, so dbeta and dgamma carry F16_RTOL times the channel's sum of
                // |g| and |g * xhat| on top of BN_TOL.
                let pool = fused_cfg.pool.expect("pooled");
                let g = reference::pool::max_pool2d_backward(&pool, &got_argmax, &f64s(&dy));
                let hw = cfg.h * cfg.w;
                for ch in 0..cfg.c {
                    let idx = (0..cfg.n).flat_map(|n| ((n * cfg.c + ch) * hw)..((n * cfg.c + ch + 1) * hw));
                    let xhat = |k: usize| (f64::from(x[k]) - want.mean[ch]) * want.invstd[ch];
                    let (sg, sgx) = idx.fold((0.0, 0.0), |(a, b), k| (a + g[k].abs(), b + (g[k] * xhat(k)).abs()));
                    let r16 = if f16 { F16_RTOL } else { 0.0 };
                    for (name, got, want, sum) in
                        [("dgamma", fused[6][ch], dg[ch], sgx), ("dbeta", fused[7][ch], db[ch], sg)]
                    {
                        let bound = BN_TOL * (1.0 + want.abs()) + r16 * sum;
                        assert!(
                            (f64::from(got) - want).abs() <= bound,
                            "{what}: {name}[{ch}] {got} vs {want} (bound {bound:.2e})"
                        );
                    }
                }
                let scale: Vec<f64> = (0..cfg.c)
                    .map(|ch| {
                        (0..cfg.n)
                            .flat_map(|n| (0..cfg.h * cfg.w).map(move |k| (n * cfg.c + ch) * cfg.h * cfg.w + k))
                            .map(|k| dx[k].abs())
                            .sum()
                    })
                    .collect();
                let rel = if f16 { 1e-3 } else { 1e-5 };
                for (ch, (got, want)) in fused[8].iter().zip(dbias.expect("bias")).enumerate() {
                    assert!(
                        (f64::from(*got) - want).abs() <= rel * scale[ch],
                        "{what}: conv bias gradient of channel {ch}: {got} vs {want} (scale {})",
                        scale[ch]
                    );
                }
            }
        }
    }
}

/// REMASK: the fused ReLU's mask recomputed from the input (no ReLU output read) gives the bits
/// of the mask read from the stored output, f32 and f16, on every batch-norm case.
#[test]
fn batch_norm_recomputed_relu_mask_is_the_stored_one_bit_for_bit() {
    for (path, gpu) in gpus() {
        for (i, cfg) in bn_cases().iter().enumerate() {
            for f16 in [false, true] {
                let mut r = rng(750 + i as u64);
                let numel: usize = cfg.shape().iter().product();
                let vals = |r: &mut _, n, lo, hi| if f16 { uniform_f16(r, n, lo, hi) } else { uniform(r, n, lo, hi) };
                let (x, dy) = (vals(&mut r, numel, -2.0, 3.0), vals(&mut r, numel, -1.0, 1.0));
                let (gamma, beta) = (uniform(&mut r, cfg.c, 0.5, 1.5), uniform(&mut r, cfg.c, -0.5, 0.5));
                let up = |label: &str, v: &[f32]| {
                    if f16 { upload_f16(&gpu, label, &cfg.shape(), v) } else { upload(&gpu, label, &cfg.shape(), v) }
                };
                let act = |label: &str| {
                    if f16 { zeros_f16(&gpu, label, &cfg.shape()) } else { zeros(&gpu, label, &cfg.shape()) }
                };
                let (tx, tdy) = (up("x", &x), up("dy", &dy));
                let (tg, tb) = (upload(&gpu, "gamma", &[cfg.c], &gamma), upload(&gpu, "beta", &[cfg.c], &beta));
                let (trm, trv) = (zeros(&gpu, "rm", &[cfg.c]), upload(&gpu, "rv", &[cfg.c], &vec![1.0; cfg.c]));
                let stats = zeros(&gpu, "stats", &[2, cfg.c]);
                let y = act("relu out");
                run(
                    &gpu,
                    &batch_norm::batch_norm_forward_train(
                        &gpu,
                        &cfg.with_relu(),
                        &bn(&tx, &tg, &tb, &trm, &trv, &stats, &y),
                    )
                    .unwrap(),
                );
                let backward = |remask: bool| {
                    let (dx, dg, db) = (act("dx"), zeros(&gpu, "dgamma", &[cfg.c]), zeros(&gpu, "dbeta", &[cfg.c]));
                    let c = if remask { cfg.with_remask() } else { cfg.with_relu() };
                    let g = batch_norm::BnBackward {
                        inp: &tx,
                        gamma: &tg,
                        stats: &stats,
                        relu_out: (!remask).then_some(&y),
                        dout: &tdy,
                        dinp: &dx,
                        dgamma: &dg,
                        dbeta: &db,
                    };
                    let f = batch_norm::BnFused { beta: remask.then_some(&tb), ..Default::default() };
                    run(&gpu, &batch_norm::batch_norm_backward_fused(&gpu, &c, &g, f).unwrap());
                    let acts = |t: &Tensor| if f16 { read_f16(&gpu, t) } else { read(&gpu, t) };
                    [acts(&dx), read(&gpu, &dg), read(&gpu, &db)]
                };
                let (fused, apart) = (backward(true), backward(false));
                for (name, (f, a)) in ["dinp", "dgamma", "dbeta"].iter().zip(fused.iter().zip(&apart)) {
                    let same = f.iter().zip(a).all(|(p, q)| p.to_bits() == q.to_bits());
                    assert!(
                        same,
                        "case {i} ({path}, f16 {f16}) {cfg:?}: recomputed-mask {name} differs from the stored mask's"
                    );
                }
            }
        }
    }
}

/// A batch norm's statistics from the convolution before it (`--bn-stats`; the conv kernels'
/// `stats`, batch_norm.wgsl's PARTIALS): the forward writes (mean, M2) per block of output pixels
/// and output channel as it stores its output — the register kernels one invocation's rows or a
/// subgroup's merged, the workgroup tiles a workgroup's columns — and the training forward merges
/// the blocks instead of reading its input for them. Awkward convolutions — batch 1 on 5×7 (35
/// pixels: the last block part-filled) with 5 output channels (a part-filled channel block), the
/// 1x1 and 3-wide forms, 37 output channels, 2 groups with stride 2 (50 pixels), 8,192 pixels (more
/// blocks than the batch norm's 256 threads, so each merges several), 32 groups of one channel —
/// each with the adapter's register blocks and 4-row ones, blocks of one invocation and of a
/// subgroup ([`conv2d::stats_lanes`]), and every workgroup tile shape; f32 and f16:
/// - every block's (mean, M2) against f64 sums over that block of the stored output (f32 sums
///   of at most 128 values: 1e-6 of the block's largest value, M2 1e-5 relative plus 1e-6 of
///   its count times that value squared);
/// - the merged forward against the f64 reference on the stored output (BN_TOL; f16 outputs plus
///   their rounding, as f16_batch_norm_matches_reference) and against the batch norm that reads
///   its input for them (the same f32 statistics merged in another order: 1e-5; an f16 output
///   within one f16 ulp, 2^-10 relative).
///
/// Blocks said to span twice the subgroup's lanes (where there are subgroups) are not one
/// subgroup's run of row blocks: the convolution marks every block (M2 < 0) and the batch norm
/// reads its input, giving its own statistics bit for bit.
#[test]
fn batch_norm_statistics_from_the_convolution_before_match_its_own() {
    use senet_wgpu::gpu::Dtype;
    use senet_wgpu::ops::conv2d::{ConvBuffers, ConvKernel, ConvPass, RegisterTiles, WorkgroupTiles};
    let gpu = crate::gpu_f16();
    let sq = Conv2dConfig::square;
    let cases = [
        sq(1, 3, (5, 7), 5, 3, 1, 1, true),
        sq(2, 8, (6, 6), 37, 1, 1, 0, false),
        sq(2, 6, (9, 9), 8, 3, 2, 1, true).grouped(2),
        sq(3, 4, (8, 8), 16, 3, 1, 1, false),
        sq(8, 16, (32, 32), 32, 3, 1, 1, false),
        sq(4, 32, (8, 8), 32, 3, 1, 1, false).grouped(32),
    ];
    let sub = conv2d::stats_lanes(&gpu);
    let mut lane_counts = vec![1, sub];
    if sub > 1 && 2 * sub <= 64 {
        lane_counts.push(2 * sub);
    }
    lane_counts.dedup();
    for dtype in [Dtype::F32, Dtype::F16] {
        for (i, cfg) in cases.iter().enumerate() {
            let base = RegisterTiles::for_layer(&gpu, cfg);
            let register = [base, RegisterTiles { gemm_m: 4, gemm_n: 8, ..base }]
                .into_iter()
                .flat_map(|t| lane_counts.iter().map(move |&l| (ConvKernel::Register(t), l, t.gemm_m * l)));
            let workgroup = WorkgroupTiles::ALL.into_iter().map(|t| (ConvKernel::Workgroup(t), 1, t.bn));
            for (k, lanes, block_rows) in register.chain(workgroup) {
                let marked = lanes > sub;
                let what = format!("case {i} {dtype:?} {cfg:?} {k}: blocks of {block_rows} rows ({lanes} invocations)");
                let mut r = rng(700 + i as u64);
                let numel = |s: &[usize]| s.iter().product::<usize>();
                let input = uniform(&mut r, numel(&cfg.input_shape()), -1.0, 2.0);
                let (tx, _) = upload_as(&gpu, dtype, &cfg.input_shape(), &input);
                let weight = uniform(&mut r, numel(&cfg.weight_shape()), -0.5, 0.5);
                let (tw, _) = upload_as(&gpu, dtype, &cfg.weight_shape(), &weight);
                let tbias = upload(&gpu, "bias", &[cfg.c_out], &uniform(&mut r, cfg.c_out, -1.0, 1.0));
                let shape = cfg.output_shape();
                let [n, c, oh, ow] = shape;
                let (hw, rows) = (oh * ow, n * oh * ow);
                let blocks = rows.div_ceil(block_rows);
                let ty = Tensor::zeros_of(&gpu, "y", &shape, dtype).unwrap();
                let partials = zeros(&gpu, "block statistics", &[blocks, c, 2]);
                let bias = cfg.bias.then_some(&tbias);
                let bufs =
                    ConvBuffers { out_stats: Some((&partials, lanes)), ..ConvBuffers::forward(&tx, &tw, bias, &ty) };
                if let ConvKernel::Workgroup(_) = k {
                    assert_eq!(conv2d::stats_rows(&gpu, k), Some(block_rows), "{what}: the plan's block size");
                }
                run(&gpu, &conv2d::conv2d_pass(&gpu, cfg, ConvPass::Forward, k, &bufs).unwrap());
                let y = read_as(&gpu, &ty);

                let p = read(&gpu, &partials);
                for b in 0..blocks {
                    for ch in 0..c {
                        let (gm, gm2) = (f64::from(p[(b * c + ch) * 2]), f64::from(p[(b * c + ch) * 2 + 1]));
                        if marked {
                            assert!(gm2 < 0.0, "{what}: block {b} channel {ch} not marked (M2 {gm2})");
                            continue;
                        }
                        let v: Vec<f64> = (b * block_rows..rows.min((b + 1) * block_rows))
                            .map(|m| f64::from(y[((m / hw) * c + ch) * hw + m % hw]))
                            .collect();
                        let k = v.len() as f64;
                        let mean = v.iter().sum::<f64>() / k;
                        let m2: f64 = v.iter().map(|x| (x - mean).powi(2)).sum();
                        let scale = v.iter().fold(0.0f64, |a, x| a.max(x.abs()));
                        assert!(
                            (gm - mean).abs() <= 1e-6 * scale,
                            "{what}: block {b} channel {ch} mean {gm} vs {mean}"
                        );
                        let tol = 1e-5 * m2 + 1e-6 * k * scale * scale;
                        assert!((gm2 - m2).abs() <= tol, "{what}: block {b} channel {ch} M2 {gm2} vs {m2}");
                    }
                }

                let bn_cfg = BatchNormConfig::new(n, c, oh, ow);
                let gamma = upload(&gpu, "gamma", &[c], &uniform(&mut r, c, 0.5, 1.5));
                let beta = upload(&gpu, "beta", &[c], &uniform(&mut r, c, -0.5, 0.5));
                let (rm, rv) = (uniform(&mut r, c, -0.2, 0.2), uniform(&mut r, c, 0.5, 2.0));
                // Both forwards from the same running statistics: output, saved statistics, running mean and var.
                let forward = |merged: bool| {
                    let (trm, trv) = (upload(&gpu, "rm", &[c], &rm), upload(&gpu, "rv", &[c], &rv));
                    let stats = zeros(&gpu, "stats", &[2, c]);
                    let out = Tensor::zeros_of(&gpu, "out", &shape, dtype).unwrap();
                    let t = bn(&ty, &gamma, &beta, &trm, &trv, &stats, &out);
                    let d = if merged {
                        let f = batch_norm::BnFused { partials: Some(&partials), ..Default::default() };
                        batch_norm::batch_norm_forward_train_fused(&gpu, &bn_cfg.with_partials(block_rows), &t, f)
                    } else {
                        batch_norm::batch_norm_forward_train(&gpu, &bn_cfg, &t)
                    };
                    run(&gpu, &d.unwrap());
                    [read_as(&gpu, &out), read(&gpu, &stats), read(&gpu, &trm), read(&gpu, &trv)]
                };
                let (merged, own) = (forward(true), forward(false));
                let names = ["output", "saved statistics", "running mean", "running var"];
                if marked {
                    for (j, name) in names.iter().enumerate() {
                        let same = merged[j].iter().zip(&own[j]).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{what}: {name} from the input (every block marked) differs from its own");
                    }
                    continue;
                }
                let f64s = |v: &[f32]| to_f64(v);
                let (g64, b64) = (f64s(&read(&gpu, &gamma)), f64s(&read(&gpu, &beta)));
                let want = reference::batch_norm::batch_norm_forward_train(
                    &bn_cfg,
                    &f64s(&y),
                    &g64,
                    &b64,
                    &f64s(&rm),
                    &f64s(&rv),
                );
                let out_tol = if dtype == Dtype::F16 { BN_TOL + F16_RTOL } else { BN_TOL };
                assert_close(&format!("{what}: output"), &merged[0], &want.out, out_tol, out_tol);
                assert_close(&format!("{what}: saved mean"), &merged[1][..c], &want.mean, BN_TOL, BN_TOL);
                assert_close(&format!("{what}: saved invstd"), &merged[1][c..], &want.invstd, BN_TOL, BN_TOL);
                assert_close(&format!("{what}: running mean"), &merged[2], &want.running_mean, BN_TOL, BN_TOL);
                assert_close(&format!("{what}: running var"), &merged[3], &want.running_var, BN_TOL, BN_TOL);
                // f16: an output may land one f16 ulp (2^-10 relative) from the other where the
                // statistics' last f32 bits move it across a rounding boundary.
                let own_tol = if dtype == Dtype::F16 { 1e-3 } else { 1e-5 };
                for (j, name) in names.iter().enumerate() {
                    let tol = if j == 0 { own_tol } else { 1e-5 };
                    assert_close(&format!("{what}: {name} merged vs own"), &merged[j], &to_f64(&own[j]), tol, tol);
                }
            }
        }
    }
}

/// The sliced kernels (`--bn-split`: a workgroup per channel and slice, two dispatches each way)
/// against the reference on every case, split 2, 3 and 7 ways (7 leaves the 1x1 case's last
/// slices empty), plain, with the fused ReLU (its output read for the mask, and the mask
/// recomputed) and statistics-only; f32, then f16 for the plain and ReLU forms. Tolerances as
/// the one-pass kernels' (BN_TOL, plus F16_RTOL on f16 outputs): the same sums in another order.
#[test]
fn batch_norm_sliced_kernels_match_reference() {
    for (path, gpu) in gpus() {
        for (i, base) in bn_cases().iter().enumerate() {
            let mut r = rng(2300 + i as u64);
            let numel: usize = base.shape().iter().product();
            let (x, dy) = (uniform(&mut r, numel, -2.0, 3.0), uniform(&mut r, numel, -1.0, 1.0));
            let (gamma, beta) = (uniform(&mut r, base.c, 0.5, 1.5), uniform(&mut r, base.c, -0.5, 0.5));
            let (rm, rv) = (uniform(&mut r, base.c, -0.2, 0.2), uniform(&mut r, base.c, 0.5, 2.0));
            let (g64, b64) = (to_f64(&gamma), to_f64(&beta));
            let forms = [
                ("plain", *base),
                ("relu", base.with_relu()),
                ("relu, mask recomputed", base.with_relu().with_remask()),
                ("statistics only", base.with_stats_only()),
            ];
            for (form, cfg) in forms {
                for (precision, f16) in [("f32", false), ("f16", true)] {
                    if f16 && (cfg.remask || cfg.stats_only) {
                        continue;
                    }
                    let tol = if f16 { BN_TOL + F16_RTOL } else { BN_TOL };
                    let act = |label: &str, v: &[f32]| {
                        if f16 {
                            upload_f16(&gpu, label, &cfg.shape(), v)
                        } else {
                            upload(&gpu, label, &cfg.shape(), v)
                        }
                    };
                    let act_zeros = |label: &str| {
                        if f16 { zeros_f16(&gpu, label, &cfg.shape()) } else { zeros(&gpu, label, &cfg.shape()) }
                    };
                    let read_act = |t: &Tensor| if f16 { read_f16(&gpu, t) } else { read(&gpu, t) };
                    // f16 inputs: the reference sees the values rounded to f16.
                    let (xr, dyr): (Vec<f32>, Vec<f32>) = if f16 {
                        (
                            x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                            dy.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                        )
                    } else {
                        (x.clone(), dy.clone())
                    };
                    let want = reference::batch_norm::batch_norm_forward_train(
                        base,
                        &to_f64(&xr),
                        &g64,
                        &b64,
                        &to_f64(&rm),
                        &to_f64(&rv),
                    );
                    let out_want: Vec<f64> =
                        if cfg.relu { want.out.iter().map(|v| v.max(0.0)).collect() } else { want.out.clone() };
                    // The gradient reaching the normalisation: with the ReLU, dy where its output is positive.
                    let g_want: Vec<f64> = if cfg.relu {
                        dyr.iter().zip(&out_want).map(|(&g, &y)| if y > 0.0 { f64::from(g) } else { 0.0 }).collect()
                    } else {
                        to_f64(&dyr)
                    };
                    let (dx, dg, db) = reference::batch_norm::batch_norm_backward(
                        base,
                        &to_f64(&xr),
                        &g64,
                        &want.mean,
                        &want.invstd,
                        &g_want,
                    );
                    for slices in [2, 3, 7] {
                        let tag = |s: &str| {
                            format!("sliced {s} ({form}, {precision}, {slices} slices) case {i} ({path}) {cfg:?}")
                        };
                        let tx = act("x", &xr);
                        let (tg, tb) = (upload(&gpu, "gamma", &[cfg.c], &gamma), upload(&gpu, "beta", &[cfg.c], &beta));
                        let (trm, trv) =
                            (upload(&gpu, "running_mean", &[cfg.c], &rm), upload(&gpu, "running_var", &[cfg.c], &rv));
                        let stats = zeros(&gpu, "stats", &[2, cfg.c]);
                        let ty = act_zeros("y");
                        let fwd = bn(&tx, &tg, &tb, &trm, &trv, &stats, &ty);
                        let d =
                            batch_norm::batch_norm_forward_train_sliced(&gpu, &cfg, &fwd, Default::default(), slices)
                                .unwrap();
                        assert_eq!(d.len(), 2, "{}", tag("forward dispatches"));
                        run(&gpu, &d);
                        let s = read(&gpu, &stats);
                        assert_close(&tag("saved mean"), &s[..cfg.c], &want.mean, BN_TOL, BN_TOL);
                        assert_close(&tag("saved invstd"), &s[cfg.c..], &want.invstd, BN_TOL, BN_TOL);
                        assert_close(&tag("running_mean"), &read(&gpu, &trm), &want.running_mean, BN_TOL, BN_TOL);
                        assert_close(&tag("running_var"), &read(&gpu, &trv), &want.running_var, BN_TOL, BN_TOL);
                        if cfg.stats_only {
                            continue;
                        }
                        assert_close(&tag("forward output"), &read_act(&ty), &out_want, tol, tol);
                        let tdy = act("dy", &dyr);
                        let tdx = act_zeros("dx");
                        let (tdg, tdb) = (zeros(&gpu, "dgamma", &[cfg.c]), zeros(&gpu, "dbeta", &[cfg.c]));
                        let relu_in = (cfg.relu && !cfg.remask).then_some(&ty);
                        let g = batch_norm::BnBackward {
                            inp: &tx,
                            gamma: &tg,
                            stats: &stats,
                            relu_out: relu_in,
                            dout: &tdy,
                            dinp: &tdx,
                            dgamma: &tdg,
                            dbeta: &tdb,
                        };
                        let f = batch_norm::BnFused { beta: cfg.remask.then_some(&tb), ..Default::default() };
                        let d = batch_norm::batch_norm_backward_sliced(&gpu, &cfg, &g, f, slices).unwrap();
                        assert_eq!(d.len(), 2, "{}", tag("backward dispatches"));
                        run(&gpu, &d);
                        assert_close(&tag("backward dinp"), &read_act(&tdx), &dx, tol, tol);
                        assert_close(&tag("backward dgamma"), &read(&gpu, &tdg), &dg, BN_TOL, BN_TOL);
                        assert_close(&tag("backward dbeta"), &read(&gpu, &tdb), &db, BN_TOL, BN_TOL);
                    }
                }
            }
        }
    }
}

/// A batch norm with its max pool fused runs a workgroup per channel over all of the channel's
/// values; where the driver caps one invocation's loops (`Gpu::loop_cap`: llvmpipe, 65,535
/// iterations between all its loops, then every loop ends, silently) and its loops would pass 90 %
/// of that, the forward and the backward refuse with an error naming `--fuse off` rather than
/// return partial results (batch 100 at 112 x 112: unguarded, lavapipe left half the input
/// gradient unwritten). SE-ResNet-50's stem at batch 41, the largest lavapipe fits in f32, runs; on
/// an adapter without a cap both do.
#[test]
fn a_fused_pool_refuses_batches_past_the_drivers_loop_cap() {
    let gpu = gpu();
    // Without a cap (a GPU) both batches run.
    let capped = gpu.loop_cap().is_some();
    let p = MaxPool2dConfig { kernel: (3, 3), stride: (2, 2), pad: (1, 1), ..MaxPool2dConfig::two_by_two(1, 1, 1, 1) };
    for (n, fits) in [(41, true), (100, !capped)] {
        let cfg = BatchNormConfig::new(n, 1, 112, 112).with_relu().with_pool(p);
        let pooled = cfg.pool.unwrap().output_shape();
        let x = zeros(&gpu, "x", &cfg.shape());
        let (g, b) = (upload(&gpu, "gamma", &[1], &[1.0]), zeros(&gpu, "beta", &[1]));
        let (rm, rv, stats) =
            (zeros(&gpu, "rm", &[1]), upload(&gpu, "rv", &[1], &[1.0]), zeros(&gpu, "stats", &[2, 1]));
        let (out, argmax, dy) =
            (zeros(&gpu, "out", &pooled), zeros(&gpu, "argmax", &pooled), zeros(&gpu, "dy", &pooled));
        let (dx, dg, db) = (zeros(&gpu, "dx", &cfg.shape()), zeros(&gpu, "dgamma", &[1]), zeros(&gpu, "dbeta", &[1]));
        let t = batch_norm::BnForward {
            inp: &x,
            gamma: &g,
            beta: &b,
            running_mean: &rm,
            running_var: &rv,
            stats: &stats,
            out: &out,
        };
        let f = batch_norm::BnFused { argmax: Some(&argmax), ..Default::default() };
        let fwd = batch_norm::batch_norm_forward_train_fused(&gpu, &cfg, &t, f);
        let bwd_in = batch_norm::BnBackward {
            inp: &x,
            gamma: &g,
            stats: &stats,
            relu_out: None,
            dout: &dy,
            dinp: &dx,
            dgamma: &dg,
            dbeta: &db,
        };
        let bwd =
            batch_norm::batch_norm_backward_fused(&gpu, &cfg, &bwd_in, batch_norm::BnFused { beta: Some(&b), ..f });
        for (pass, r) in [("forward", fwd.map(|_| ())), ("backward", bwd.map(|_| ()))] {
            match (fits, r) {
                (true, Ok(())) => {}
                (false, Err(e)) => assert!(format!("{e:#}").contains("--fuse off"), "batch {n} {pass}: {e:#}"),
                (true, Err(e)) => panic!("batch {n} {pass} refused: {e:#}"),
                (false, Ok(())) => panic!("batch {n} {pass}: a fused pool past the loop cap was recorded"),
            }
        }
    }
}
