//! The model EMA (--model-ema): the update kernel and timm's decay. Named `ema` so that the
//! filter `model_ema` (scripts/mutants.txt) selects the update test alone.

use crate::common::*;
use crate::{accum_cases, aligned_flat};
use senet_wgpu::reference;

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
