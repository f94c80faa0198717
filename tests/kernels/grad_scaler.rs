//! The loss scaler of --precision f16 (torch's GradScaler) and the optimizer steps it gates.

use crate::common::*;
use senet_wgpu::ops::optimizer::{OptimizerConfig, OptimizerStep};
use senet_wgpu::reference;

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
