//! Dynamic loss scaling against `torch.amp.GradScaler` itself: `scripts/torch_grad_scaler_golden.py`
//! (run once with PyTorch; its small outputs committed in tests/golden/grad_scaler) runs torch's
//! scaler on CPU tensors — torch's own `_amp_foreach_non_finite_check_and_unscale_` and
//! `_amp_update_scale_` kernels — over 14 steps of a float64 least-squares parameter, with inf,
//! NaN and -inf written into the scaled gradients at steps 1, 6, 10 and 11, growth interval 3,
//! under SGD with momentum, Adam + `clip_grad_norm_` after `unscale_`, and AdamW + clipping.
//!
//! Both our scalers replay it on the recorded scaled gradients: the f64 reference
//! (`reference::grad_scaler` with `reference::clip_grad_norm` and `reference::optimizer`) and the
//! GPU kernels (`ops::grad_scaler`, `ops::clip_grad_norm` reading the scaler's state, the
//! optimizer's SCALED variant). After every step: the scale, the growth tracker, whether the step
//! was skipped and the optimizer's step count exactly as torch's (powers of two and counters),
//! the clipping norm, and the parameter.
//!
//! Measured figures: `cargo test --test grad_scaler_golden -- --nocapture`.

mod common;

use common::*;
use senet_wgpu::ops::clip_grad_norm::ClipGradNorm;
use senet_wgpu::ops::grad_scaler::{GradScaler, GradScalerConfig};
use senet_wgpu::ops::optimizer::{OptimizerConfig, OptimizerStep};
use senet_wgpu::reference;
use senet_wgpu::reference::grad_scaler::{Scaler, grad_scaler_step};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/grad_scaler");
const CASES: [&str; 3] = ["sgd_momentum", "adam_clip", "adamw_clip"];

/// Our f64 reference against torch float64: the same arithmetic, the norm summed in another
/// order. Measured: at most 4.4e-16 on a parameter (|w| <= 2), 1.8e-15 on a norm (~10).
/// 1e-12 is far above rounding and far below any formula error (a skipped step wrongly taken
/// moves w by ~1e-2).
const F64_TOL: f64 = 1e-12;

/// The GPU's f32 parameter after each step against torch's float64: the parameter starts
/// f32-exact; each finite step rounds it (half an ulp of |w| <= 2: 1.2e-7), and the gradients
/// it reads are torch's rounded to f32 (relative 6e-8, scaled by lr ~1e-2). After 10 finite
/// steps at most ~1.2e-6; measured at most 2.7e-7. One skipped step taken or a step wrongly
/// skipped moves elements by ~lr = 1e-2, a wrong bias-correction count by ~1e-3.
const GPU_ATOL: f64 = 2e-6;
/// The clipping norm from f32 sums of 37 squares: relative ~1e-7; measured at most 8.6e-8.
/// Clipping the scaled gradients (before unscaling) would make the norm 2^14-2^16 times larger.
const GPU_NORM_RTOL: f64 = 1e-5;

fn golden(name: &str) -> (Golden, serde_json::Value) {
    golden_case(DIR, name)
}

fn vec_of<'a>(g: &'a Golden, key: &str) -> &'a [f64] {
    &g.get(key).unwrap_or_else(|| panic!("golden has no {key}")).1
}

fn f(c: &serde_json::Value, key: &str) -> f64 {
    c[key].as_f64().unwrap_or_else(|| panic!("golden config: {key} is not a number"))
}

/// The optimizer the script's JSON names.
fn optimizer_of(c: &serde_json::Value) -> OptimizerConfig {
    match c["opt"].as_str() {
        Some("sgd") => OptimizerConfig::Sgd {
            lr: f(c, "lr"),
            momentum: f(c, "momentum"),
            dampening: f(c, "dampening"),
            weight_decay: f(c, "weight_decay"),
            nesterov: c["nesterov"].as_bool().expect("nesterov"),
        },
        Some("adam") => OptimizerConfig::Adam {
            lr: f(c, "lr"),
            beta1: c["betas"][0].as_f64().expect("beta1"),
            beta2: c["betas"][1].as_f64().expect("beta2"),
            eps: f(c, "eps"),
            weight_decay: f(c, "weight_decay"),
            decoupled: c["decoupled"].as_bool().expect("decoupled"),
        },
        other => panic!("golden config: optimizer {other:?}"),
    }
}

fn scaler_of(c: &serde_json::Value) -> GradScalerConfig {
    let s = &c["scaler"];
    GradScalerConfig {
        init_scale: f(s, "init_scale"),
        growth_factor: f(s, "growth_factor"),
        backoff_factor: f(s, "backoff_factor"),
        growth_interval: s["growth_interval"].as_u64().expect("growth_interval") as u32,
    }
}

/// What torch recorded for step `t` (1-based).
struct Step<'a> {
    grad: &'a [f64],
    w: &'a [f64],
    scale_before: f64,
    scale_after: f64,
    tracker: u32,
    skipped: bool,
    total_norm: f64,
    opt_steps: u32,
    /// Steps skipped so far, this one included (our scalers count them for the log).
    skipped_so_far: u32,
}

fn steps<'a>(g: &'a Golden, c: &serde_json::Value) -> Vec<Step<'a>> {
    let t = c["steps"].as_u64().expect("steps") as usize;
    (1..=t)
        .map(|t| {
            let at = |k: &str| vec_of(g, k)[t - 1];
            Step {
                grad: vec_of(g, &format!("grad.{t}")),
                w: vec_of(g, &format!("w.{t}")),
                scale_before: at("scale_before"),
                scale_after: at("scale_after"),
                tracker: at("tracker_after") as u32,
                skipped: at("skipped") != 0.0,
                total_norm: at("total_norm"),
                opt_steps: at("opt_steps") as u32,
                skipped_so_far: vec_of(g, "skipped")[..t].iter().sum::<f64>() as u32,
            }
        })
        .collect()
}

/// Our defaults are `torch.amp.GradScaler()`'s.
#[test]
fn grad_scaler_defaults_are_torchs() {
    let (g, _) = golden("defaults");
    let d = GradScalerConfig::default();
    let want = vec_of(&g, "defaults");
    assert_eq!([d.init_scale, d.growth_factor, d.backoff_factor, f64::from(d.growth_interval)], want[..]);
}

/// torch never grows the scale to infinity: one finite step from 2^127 at growth interval 1 keeps
/// 2^127 and restarts the tracker ("ceiling" in the golden); the reference and the GPU likewise.
#[test]
fn grad_scaler_stops_below_infinity_as_torch() {
    let (g, _) = golden("defaults");
    let want = vec_of(&g, "ceiling");
    let cfg = GradScalerConfig { init_scale: 2f64.powi(127), growth_interval: 1, ..GradScalerConfig::default() };
    let s = Scaler { scale: cfg.init_scale, tracker: 0, steps: 0, skipped: 0 };
    let (next, skipped) = grad_scaler_step(s, &[cfg.init_scale; 3], (cfg.growth_factor, 1), cfg.backoff_factor);
    assert!(!skipped);
    assert_eq!([next.scale, f64::from(next.tracker)], want[..], "reference: (scale, tracker) after the step");
    let gpu = gpu();
    let grads = upload(&gpu, "scaled gradients", &[3], &[cfg.init_scale as f32; 3]);
    let scaler = GradScaler::new(&gpu, cfg, &[&grads]).unwrap();
    run(&gpu, &scaler.dispatches);
    let got = scaler.read(&gpu).unwrap();
    assert_eq!([f64::from(got.scale), f64::from(got.growth_tracker)], want[..], "GPU: (scale, tracker) after the step");
}

/// The golden is what the test needs: every case skips its first step, restarts the growth count
/// after an overflow that interrupted it, grows the scale and skips two steps in a row; the
/// clipping cases both clip and leave steps unclipped.
#[test]
fn grad_scaler_golden_covers_the_rules() {
    for name in CASES {
        let (g, c) = golden(name);
        let s = steps(&g, &c);
        assert!(s[0].skipped, "{name}: the first step must overflow");
        assert!(s.windows(2).any(|w| w[0].skipped && w[1].skipped), "{name}: two overflows in a row");
        assert!(s.iter().any(|x| x.scale_after > x.scale_before), "{name}: the scale must grow");
        let interrupted = s.windows(2).any(|w| !w[0].skipped && w[0].tracker > 0 && w[1].skipped);
        assert!(interrupted, "{name}: an overflow must interrupt a growth count");
        if let Some(m) = c["max_norm"].as_f64() {
            let finite: Vec<_> = s.iter().filter(|x| !x.skipped).collect();
            assert!(finite.iter().any(|x| x.total_norm > m) && finite.iter().any(|x| x.total_norm < m), "{name}");
        }
    }
}

/// The f64 reference replays torch: scale, tracker, skip and step count exactly, clip norm and
/// parameter after every step to 1e-12.
#[test]
fn reference_grad_scaler_replays_torch() {
    for name in CASES {
        let (g, c) = golden(name);
        let (opt, cfg) = (optimizer_of(&c), scaler_of(&c));
        let max_norm = c["max_norm"].as_f64();
        let mut w = vec_of(&g, "w0").to_vec();
        let mut st = vec![vec![0.0; w.len()]; opt.state_count()];
        let mut s = Scaler { scale: cfg.init_scale, tracker: 0, steps: 0, skipped: 0 };
        let (mut worst_w, mut worst_norm) = (0.0f64, 0.0f64);
        for (i, want) in steps(&g, &c).iter().enumerate() {
            let t = i + 1;
            assert_eq!(s.scale, want.scale_before, "{name}: scale before step {t}");
            let (next, skipped) =
                grad_scaler_step(s, want.grad, (cfg.growth_factor, cfg.growth_interval), cfg.backoff_factor);
            assert_eq!(
                (next.scale, next.tracker, skipped, next.steps, next.skipped),
                (want.scale_after, want.tracker, want.skipped, want.opt_steps, want.skipped_so_far),
                "{name}: (scale, growth tracker, skipped, optimizer steps, steps skipped) after step {t}"
            );
            if !skipped {
                // torch's unscale_: grad * inv_scale, inv_scale = 1/scale as an f32 (exact here).
                let inv = f64::from((1.0 / s.scale) as f32);
                let mut unscaled: Vec<f64> = want.grad.iter().map(|g| g * inv).collect();
                if let Some(m) = max_norm {
                    let norm = reference::clip_grad_norm::clip_grad_norm(&mut [&mut unscaled[..]], m);
                    worst_norm = worst_norm.max(assert_close64(
                        &format!("{name}: norm at step {t}"),
                        &[norm],
                        &[want.total_norm],
                        0.0,
                        F64_TOL,
                    ));
                }
                reference::optimizer::optimizer_step(&opt, u64::from(next.steps), &mut w, &unscaled, &mut st);
            }
            s = next;
            worst_w = worst_w.max(assert_close64(&format!("{name}: w after step {t}"), &w, want.w, F64_TOL, 0.0));
        }
        eprintln!("{name}: reference vs torch float64: w {worst_w:.2e}, norm {worst_norm:.2e}");
    }
}

/// The GPU scaler, clipping and optimizer replay torch step by step on its scaled gradients
/// (rounded to f32): the scaler's state exactly, parameters untouched bit for bit on skipped
/// steps, the clipping norm and the parameter within the f32 bounds above.
#[test]
fn gpu_grad_scaler_replays_torch() {
    let gpu = gpu();
    for name in CASES {
        let (g, c) = golden(name);
        let (opt, cfg) = (optimizer_of(&c), scaler_of(&c));
        let w0: Vec<f32> = vec_of(&g, "w0").iter().map(|&v| v as f32).collect();
        assert!(w0.iter().zip(vec_of(&g, "w0")).all(|(&a, &b)| f64::from(a) == b), "w0 must be f32 values");
        let n = w0.len();
        let tw = upload(&gpu, "param", &[n], &w0);
        let grads = zeros(&gpu, "scaled gradients", &[n]);
        let scaler = GradScaler::new(&gpu, cfg, &[&grads]).unwrap();
        let clip = c["max_norm"].as_f64().map(|m| ClipGradNorm::new(&gpu, m, &[&grads], Some(&scaler.state)).unwrap());
        let states: Vec<_> = (0..opt.state_count()).map(|_| zeros(&gpu, "optimizer state", &[n])).collect();
        let refs: Vec<&_> = states.iter().collect();
        let step = OptimizerStep::new_scaled(&gpu, opt, &tw, &grads, &refs, 0, n, Some(&scaler.state)).unwrap();
        let mut ds = scaler.dispatches.clone();
        ds.extend(clip.iter().flat_map(|c| c.dispatches.clone()));
        ds.push(step.dispatch.clone());
        let (mut worst_w, mut worst_norm) = (0.0f64, 0.0f64);
        for (i, want) in steps(&g, &c).iter().enumerate() {
            let t = i + 1;
            let g32: Vec<f32> = want.grad.iter().map(|&v| v as f32).collect();
            grads.write(&gpu, &g32).unwrap();
            // The host's count; a scaled step must take its count from the scaler's state.
            step.set_step(&gpu, t as u64);
            let before = read(&gpu, &tw);
            run(&gpu, &ds);
            let got = scaler.read(&gpu).unwrap();
            assert_eq!(
                (f64::from(got.scale), got.growth_tracker, got.found_inf, got.steps, got.skipped),
                (want.scale_after, want.tracker, want.skipped, want.opt_steps, want.skipped_so_far),
                "{name}: GPU (scale, growth tracker, skipped, optimizer steps, steps skipped) after step {t}"
            );
            let after = read(&gpu, &tw);
            if want.skipped {
                assert_eq!(after, before, "{name}: skipped step {t} moved the parameter");
                continue;
            }
            if let Some(clip) = &clip {
                let norm = clip.read(&gpu).unwrap().total_norm;
                let what = format!("{name}: GPU norm at step {t}");
                let err = assert_close(&what, &[norm], &[want.total_norm], 0.0, GPU_NORM_RTOL);
                worst_norm = worst_norm.max(err / want.total_norm);
            }
            worst_w =
                worst_w.max(assert_close(&format!("{name}: GPU w after step {t}"), &after, want.w, GPU_ATOL, 0.0));
        }
        eprintln!("{name}: GPU vs torch float64: w {worst_w:.2e}, norm (relative) {worst_norm:.2e}");
    }
}
