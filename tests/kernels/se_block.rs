//! The SE block: the standard block, the paper's ablation variants, f32 and f16.

use crate::common::*;
use crate::{F16_RTOL, read_f16, uniform_f16, upload_f16};
use senet_wgpu::ops::se_block::{self, SeBlockConfig, SeGrads, SeWeights};
use senet_wgpu::reference;

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
    for (path, gpu) in se_gpus() {
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
            // Split: the squeeze, the FCs and the scale.
            assert_eq!(d.len(), if gpu.se_split { 3 } else { 1 }, "the SE forward's dispatches ({path})");
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

/// The paper's ablations of the SE block itself: max squeeze, tanh and ReLU gates, with and
/// without biases — forward and every backward output against the reference (tolerances as for
/// the standard block).
#[test]
fn se_block_ablation_variants_match_reference() {
    use senet_wgpu::ops::se_block::{Excitation, SeVariant, Squeeze};
    for (path, gpu) in se_gpus() {
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

#[test]
fn f16_se_block_matches_reference() {
    for (path, gpu) in se_gpus() {
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

/// The split form (`--se-split on`) against the one-pass form on the same reduction path: each
/// value is computed by the same shader helper in the same order (a subgroup, or an invocation,
/// per channel for the squeeze and ds; the FCs a workgroup per sample), so the output, the saved
/// activations, the input and weight gradients and, for the fused tail, the shortcut's gradient
/// are the same bit for bit, f32 and f16, on every case of `se_cases()` (batch 1, a plane of one
/// pixel, channels beyond one workgroup and not a multiple of the split's channel blocks).
#[test]
fn se_block_split_form_is_the_one_pass_form_bit_for_bit() {
    use senet_wgpu::gpu::{Dtype, Gpu, Tensor};
    use senet_wgpu::ops::se_block::AddReluGrads;
    let forms = se_gpus();
    let run_case = |gpu: &Gpu, cfg: &SeBlockConfig, dtype: Dtype, fused: bool, seed: u64| -> Vec<(&str, Vec<f32>)> {
        let mut r = rng(seed);
        let (c, cr) = (cfg.c, cfg.hidden());
        let shape = cfg.shape();
        let numel: usize = shape.iter().product();
        let (tx, _) = upload_as(gpu, dtype, &shape, &uniform(&mut r, numel, -1.0, 2.0));
        let (tres, _) = upload_as(gpu, dtype, &shape, &uniform(&mut r, numel, -1.5, 0.5));
        let (tdy, _) = upload_as(gpu, dtype, &shape, &uniform(&mut r, numel, -1.0, 1.0));
        let w1 = upload(gpu, "w1", &cfg.fc1_shape(), &uniform(&mut r, cr * c, -0.3, 0.3));
        let w2 = upload(gpu, "w2", &cfg.fc2_shape(), &uniform(&mut r, c * cr, -0.3, 0.3));
        let (b1, b2) = (
            upload(gpu, "b1", &[cr], &uniform(&mut r, cr, -0.5, 0.5)),
            upload(gpu, "b2", &[c], &uniform(&mut r, c, -0.5, 0.5)),
        );
        let weights = SeWeights { w1: &w1, b1: cfg.bias.then_some(&b1), w2: &w2, b2: cfg.bias.then_some(&b2) };
        let act = |label| Tensor::zeros_of(gpu, label, &shape, dtype).expect("allocate");
        let (out, dx, dres) = (act("out"), act("dx"), act("dres"));
        let (saved, dsaved) = (zeros(gpu, "saved", &cfg.saved_shape()), zeros(gpu, "dsaved", &cfg.dsaved_shape()));
        let (dw1, dw2) = (zeros(gpu, "dw1", &cfg.fc1_shape()), zeros(gpu, "dw2", &cfg.fc2_shape()));
        let (db1, db2) = (zeros(gpu, "db1", &[cr]), zeros(gpu, "db2", &[c]));
        let grads =
            SeGrads { dinp: &dx, dw1: &dw1, db1: cfg.bias.then_some(&db1), dw2: &dw2, db2: cfg.bias.then_some(&db2) };
        if fused {
            run(gpu, &se_block::se_block_forward_add_relu(gpu, cfg, &tx, &tres, &weights, &out, &saved).unwrap());
            let e = AddReluGrads {
                out: &out,
                dres: &dres,
                se_grad: None,
                input_affine: None,
                weight_grad_elsewhere: false,
            };
            run(
                gpu,
                &se_block::se_block_backward_add_relu(gpu, cfg, &tx, &weights, &saved, &tdy, e, &dsaved, &grads)
                    .unwrap(),
            );
        } else {
            run(gpu, &se_block::se_block_forward(gpu, cfg, &tx, &weights, &out, &saved).unwrap());
            run(gpu, &se_block::se_block_backward(gpu, cfg, &tx, &weights, &saved, &tdy, &dsaved, &grads).unwrap());
        }
        let mut v = vec![("out", read_as(gpu, &out)), ("dx", read_as(gpu, &dx)), ("saved", read(gpu, &saved))];
        v.extend([("dsaved", read(gpu, &dsaved)), ("dw1", read(gpu, &dw1)), ("dw2", read(gpu, &dw2))]);
        if cfg.bias {
            v.extend([("db1", read(gpu, &db1)), ("db2", read(gpu, &db2))]);
        }
        if fused {
            v.push(("dres", read_as(gpu, &dres)));
        }
        v
    };
    for pair in forms.chunks(2) {
        let [(one_path, one), (split_path, split)] = pair else { panic!("se_gpus() pairs the two forms") };
        assert!(!one.se_split && split.se_split, "{one_path} / {split_path}: the forms");
        for (i, cfg) in se_cases().iter().enumerate() {
            for dtype in [Dtype::F32, Dtype::F16] {
                for fused in [false, true] {
                    let seed = 2100 + i as u64;
                    let (a, b) = (run_case(one, cfg, dtype, fused, seed), run_case(split, cfg, dtype, fused, seed));
                    for ((name, x), (_, y)) in a.iter().zip(&b) {
                        let differ = x.iter().zip(y).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
                        assert_eq!(
                            differ,
                            0,
                            "{split_path}: {name} of case {i} {cfg:?} {dtype:?} fused {fused}: {differ} of {} values differ from the one-pass form's",
                            x.len()
                        );
                    }
                }
            }
        }
    }
}

/// The SE block's max squeeze (an ablation) a workgroup per sample scans whole channel planes per
/// subgroup; where the driver caps one invocation's loops (`Gpu::loop_cap`: llvmpipe) and that
/// would pass 90 % of the cap, the forward refuses with an error naming `--squeeze avg` rather than
/// return wrong maxima (1,024 channels at 56 x 56: unguarded, 384 of them wrong on lavapipe); 256
/// channels at 56 x 56 (SE-ResNet-50's first stage) run; on an adapter without a cap both do.
#[test]
fn a_max_squeeze_refuses_planes_past_the_drivers_loop_cap() {
    use senet_wgpu::ops::se_block::{Excitation, SeVariant, Squeeze};
    let gpu = gpu_se_one_pass();
    // Without a cap (a GPU) both run.
    let capped = gpu.loop_cap().is_some();
    for (c, fits) in [(256, true), (1024, !capped)] {
        let variant = SeVariant { squeeze: Squeeze::Max, excitation: Excitation::Sigmoid };
        let cfg = SeBlockConfig { n: 1, c, h: 56, w: 56, hidden: c / 16, bias: false, variant };
        let x = zeros(&gpu, "x", &cfg.shape());
        let (w1, w2) = (zeros(&gpu, "w1", &cfg.fc1_shape()), zeros(&gpu, "w2", &cfg.fc2_shape()));
        let weights = SeWeights { w1: &w1, b1: None, w2: &w2, b2: None };
        let (y, saved) = (zeros(&gpu, "y", &cfg.shape()), zeros(&gpu, "saved", &cfg.saved_shape()));
        match (fits, se_block::se_block_forward(&gpu, &cfg, &x, &weights, &y, &saved)) {
            (true, Ok(_)) => {}
            (false, Err(e)) => assert!(format!("{e:#}").contains("--squeeze avg"), "{c} channels: {e:#}"),
            (true, Err(e)) => panic!("{c} channels refused: {e:#}"),
            (false, Ok(_)) => panic!("{c} channels: a max squeeze past the loop cap was recorded"),
        }
    }
}
