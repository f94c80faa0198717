//! Optimizers: Adam, AdamW and SGD over several steps.

use crate::common::*;
use senet_wgpu::ops::optimizer::{OptimizerConfig, OptimizerStep};
use senet_wgpu::reference;

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
