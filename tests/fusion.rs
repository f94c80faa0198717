//! Fused epilogues (`--fuse on`, src/model/plan.rs's fusion pass): the residual addition with the
//! ReLU after it (add.wgsl's `_relu` kernels) against its f64 reference on awkward lengths in f32
//! and f16, where the plan fuses it, and whole training steps and evaluation passes of fused
//! plans against unfused ones (`--fuse off`) from the same start.

mod common;

use std::sync::{Arc, OnceLock};

use common::*;
use senet_wgpu::gpu::{Dtype, Fuse, Gpu, GpuOptions, Precision, Tensor};
use senet_wgpu::model::plan::{Network, StepPlan};
use senet_wgpu::model::{ModelConfig, SePlacement};
use senet_wgpu::ops::add;
use senet_wgpu::ops::cross_entropy::result;
use senet_wgpu::ops::optimizer::OptimizerConfig;
use senet_wgpu::reference;

/// The same adapter as `gpu()`, whose plans fuse only the batch norm's ReLU (`--fuse off`).
fn gpu_unfused() -> Arc<Gpu> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    let opts = GpuOptions { tune: Some(senet_wgpu::gpu::tune::TuneMode::Off), fuse: Fuse::Off, ..Default::default() };
    match GPU.get_or_init(|| Gpu::new(&opts).map_err(|e| format!("{e:#}"))) {
        Ok(g) => g.clone(),
        Err(e) => panic!("GPU test cannot run: {e}"),
    }
}

/// f32: one rounding of a + b (then the exact max): |error| <= half an ulp, rtol 1e-6 with room.
/// f16: the result rounded to f16, half an f16 ulp (2^-11 = 4.9e-4 relative) plus the subnormal
/// spacing (6e-8). A mask read from the wrong tensor or a missing operand is an error of O(1).
fn act_tolerance(dtype: Dtype) -> (f64, f64) {
    match dtype {
        Dtype::F16 => (6e-8, 4.9e-4),
        _ => (0.0, 1e-6),
    }
}

#[test]
fn add_relu_forward_and_backward_match_the_reference() {
    let gpu = gpu();
    // 1 element, odd lengths (a 5x7 plane, 3x5x7), a partial last workgroup of 256, two rows of
    // the 2-D grid's worth would need > 2^24 elements: 65 * 256 + 3 covers a non-multiple.
    for dtype in [Dtype::F32, Dtype::F16] {
        let (atol, rtol) = act_tolerance(dtype);
        for (i, len) in [1usize, 35, 105, 65 * 256 + 3].into_iter().enumerate() {
            let what = format!("{dtype:?} len {len}");
            let (ta, a) = upload_as(&gpu, dtype, &[len], &uniform(&mut rng(10 + i as u64), len, -2.0, 2.0));
            let (tb, b) = upload_as(&gpu, dtype, &[len], &uniform(&mut rng(20 + i as u64), len, -2.0, 2.0));
            let (tdy, dy) = upload_as(&gpu, dtype, &[len], &uniform(&mut rng(30 + i as u64), len, -1.0, 1.0));
            let zeros = |label| Tensor::zeros_of(&gpu, label, &[len], dtype).expect("allocate");
            let (tout, tda, tdb) = (zeros("out"), zeros("da"), zeros("db"));
            let fwd = add::add_forward_relu(&gpu, &ta, &tb, &tout).unwrap();
            assert_eq!(fwd.len(), 1, "{what}: one forward pass");
            run(&gpu, &fwd);
            let want = reference::add::add_forward_relu(&to_f64(&a), &to_f64(&b));
            let out = read_as(&gpu, &tout);
            assert_close(&format!("{what} forward"), &out, &want, atol, rtol);
            assert!(out.iter().any(|&v| v == 0.0) || len < 35, "{what}: some outputs are clipped");
            let bwd = add::add_backward_relu(&gpu, &tout, &tdy, &tda, &tdb).unwrap();
            assert_eq!(bwd.len(), 1, "{what}: both gradients from one pass");
            run(&gpu, &bwd);
            // The mask is the forward's output as stored, and a masked gradient is dout or 0:
            // exact in both precisions.
            let (da, db) = reference::add::add_backward_relu(&to_f64(&out), &to_f64(&dy));
            assert_close(&format!("{what} da"), &read_as(&gpu, &tda), &da, 0.0, 0.0);
            assert_close(&format!("{what} db"), &read_as(&gpu, &tdb), &db, 0.0, 0.0);
        }
    }
}

fn cifar(model: &str, placement: SePlacement) -> ModelConfig {
    let mut se = senet_wgpu::model::SeOptions::default();
    se.placement = placement;
    ModelConfig {
        model: model.into(),
        width: 0.5,
        reduction: 4,
        in_channels: 3,
        num_classes: 4,
        input_hw: [8, 8],
        classes: vec![],
        normalize: None,
        se_bias: true,
        se,
        block: Default::default(),
    }
}

/// Kernel names of a plan's training step and evaluation pass.
fn kernels(net: &Network, plan: &StepPlan) -> (Vec<String>, Vec<String>) {
    let names = |l: Vec<&senet_wgpu::gpu::Dispatch>| l.iter().map(|d| d.label.to_string()).collect::<Vec<_>>();
    (names(net.train_dispatches(plan)), names(net.eval_dispatches(plan)))
}

fn count(list: &[String], kernel: &str) -> usize {
    list.iter().filter(|k| *k == kernel).count()
}

/// Where the plan fuses: every residual block of ResNet-8 (3) runs add + ReLU as one pass each
/// way; SE-ResNet-8 with the standard placement runs SE + add + ReLU as one forward pass and one
/// per-sample backward pass per block, leaving no separate addition, ReLU of a block output or SE
/// pass; `--fuse off` plans none of the fused kernels; and fused steps move fewer bytes.
#[test]
fn fused_plans_replace_the_block_tails() {
    let (on, off) = (gpu(), gpu_unfused());
    for (model, placement) in [("resnet8", SePlacement::Standard)] {
        let build = |g: &Arc<Gpu>| {
            let net = Network::new(g.clone(), cifar(model, placement), OptimizerConfig::sgd(0.1, 0.9), 4).unwrap();
            let plan = net.plan(2).unwrap();
            let (train, eval) = kernels(&net, &plan);
            let bytes: f64 = net.train_dispatches(&plan).iter().map(|d| d.bytes).sum();
            (train, eval, bytes)
        };
        let ((train, eval, bytes), (train_off, eval_off, bytes_off)) = (build(&on), build(&off));
        let blocks = 3;
        let se = model.starts_with("se-");
        let fused =
            ["add_forward_relu", "add_backward_relu", "se_block_forward_add_relu", "se_block_backward_input_add_relu"];
        for k in fused {
            assert_eq!(count(&train_off, k) + count(&eval_off, k), 0, "{model} --fuse off runs {k}");
        }
        let (fwd, bwd) = if se {
            ("se_block_forward_add_relu", "se_block_backward_input_add_relu")
        } else {
            ("add_forward_relu", "add_backward_relu")
        };
        assert_eq!(count(&train, fwd), blocks, "{model}: {fwd} per block in training");
        assert_eq!(count(&eval, fwd), blocks, "{model}: {fwd} per block in evaluation");
        assert_eq!(count(&train, bwd), blocks, "{model}: {bwd} per block");
        for k in ["add_backward", "relu_forward", "relu_backward", "se_block_forward", "se_block_backward_input"] {
            assert_eq!(count(&train, k) + count(&eval, k), 0, "{model}: {k} left in a fused plan");
        }
        // The forward's additions are gone; the backward's fork sums (one per block) remain.
        assert_eq!(count(&train, "add_forward"), blocks, "{model}: only the fork sums add");
        assert_eq!(count(&eval, "add_forward"), 0, "{model}: evaluation adds nothing apart");
        // Per block, forward: add and relu into one (1 fewer), or se, add and relu into one (2);
        // backward: relu and add into one (1), or relu, add and the SE's input pass (2).
        let per_pass = if se { 2 } else { 1 };
        assert_eq!(train_off.len() - train.len(), 2 * per_pass * blocks, "{model}: training dispatches saved");
        assert_eq!(eval_off.len() - eval.len(), per_pass * blocks, "{model}: evaluation dispatches saved");
        assert!(bytes < bytes_off, "{model}: fused step moves {bytes} bytes, unfused {bytes_off}");
    }
}

/// Gradients, updates and statistics of a fused step against the unfused step.
///
/// f32: the fused kernels keep the unfused order of operations (x * s rounded to f32, then + r,
/// then the max; the masked gradient is the same product), so the two agree bitwise unless the
/// driver contracts x * s + r into an FMA (one rounding less per element). Any such difference is
/// rounding, which the GPU-against-reference bounds of tests/train_step.rs already accept:
/// loss rtol 1e-4, logits 1e-4, gradients atol 2e-4 + rtol 1e-3, updates atol 2.5e-5. A mask
/// from the wrong tensor, a missing gate factor or a lost shortcut gradient is O(1) off.
#[test]
fn fused_training_steps_and_evaluation_equal_unfused_ones() {
    let (on, off) = (gpu(), gpu_unfused());
    let n = 3;
    let cases = [("resnet8", SePlacement::Standard), ("se-resnet8", SePlacement::Standard)];
    for (model, placement) in cases {
        let what = format!("{model} ({placement:?})");
        let cfg = cifar(model, placement);
        let x = uniform(&mut rng(21), n * 3 * 8 * 8, 0.0, 1.0);
        let labels = [0u32, 3, 1];
        let run_step = |g: &Arc<Gpu>| {
            let mut net = Network::new(g.clone(), cfg.clone(), OptimizerConfig::sgd(0.1, 0.9), 4).unwrap();
            let plan = net.plan(n).unwrap();
            plan.write_batch(g, &x, &labels).unwrap();
            net.train_step(&plan);
            g.wait().unwrap();
            let step = StepState::read(&net, &plan);
            net.eval_batch(&plan);
            g.wait().unwrap();
            (step, read(g, &plan.eval_result), read(g, plan.logits()))
        };
        let ((fused, eval, eval_logits), (unfused, eval_off, eval_logits_off)) = (run_step(&on), run_step(&off));
        fused.assert_close(&unfused, &what, (2e-4, 1e-3));
        assert_close(
            &format!("{what} eval loss"),
            &[eval[result::LOSS]],
            &[f64::from(eval_off[result::LOSS])],
            1e-5,
            1e-4,
        );
        assert_close(&format!("{what} eval logits"), &eval_logits, &to_f64(&eval_logits_off), 1e-4, 1e-4);
        eprintln!("{what}: fused vs unfused, largest difference {:.3e}", fused.max_diff(&unfused));
    }
}

/// What a training step leaves: the loss, logits, every parameter's gradient and new value, the
/// running statistics.
struct StepState {
    loss: f32,
    logits: Vec<f32>,
    grads: Vec<(String, Vec<f32>)>,
    values: Vec<(String, Vec<f32>)>,
    stats: Vec<(String, Vec<f32>)>,
}

impl StepState {
    fn read(net: &Network, plan: &StepPlan) -> StepState {
        let g = &net.gpu;
        let per_param = |f: &dyn Fn(&senet_wgpu::model::plan::Param) -> &Tensor| {
            net.params.iter().map(|p| (p.spec.name.clone(), read_as(g, f(p)))).collect()
        };
        let stats = net
            .bn
            .iter()
            .flat_map(|b| {
                [
                    (format!("{}.running_mean", b.name), read(g, &b.running_mean)),
                    (format!("{}.running_var", b.name), read(g, &b.running_var)),
                ]
            })
            .collect();
        StepState {
            loss: read(g, &plan.train_result)[result::LOSS],
            logits: read_as(g, plan.logits()),
            grads: per_param(&|p| &p.grad),
            values: per_param(&|p| &p.value),
            stats,
        }
    }

    /// Every value within (atol, rtol) of `want`'s: gradients, and the update (new value's
    /// difference) within lr (0.1) times that plus f32 rounding, as tests/train_step.rs bounds it.
    fn assert_close(&self, want: &StepState, what: &str, (atol, rtol): (f64, f64)) {
        assert_close(&format!("{what} loss"), &[self.loss], &[f64::from(want.loss)], 1e-5, 1e-4);
        assert_close(&format!("{what} logits"), &self.logits, &to_f64(&want.logits), 1e-4, 1e-4);
        for ((name, got), (_, w)) in self.grads.iter().zip(&want.grads) {
            assert_close(&format!("{what} grad {name}"), got, &to_f64(w), atol, rtol);
        }
        for ((name, got), (_, w)) in self.values.iter().zip(&want.values) {
            assert_close(&format!("{what} updated {name}"), got, &to_f64(w), 2.5e-5, 1e-3);
        }
        for ((name, got), (_, w)) in self.stats.iter().zip(&want.stats) {
            assert_close(&format!("{what} {name}"), got, &to_f64(w), 1e-5, 1e-4);
        }
    }

    fn max_diff(&self, other: &StepState) -> f64 {
        let all = |s: &StepState| -> Vec<f32> {
            let mut v = vec![s.loss];
            v.extend(&s.logits);
            for (_, t) in s.grads.iter().chain(&s.values).chain(&s.stats) {
                v.extend(t);
            }
            v
        };
        all(self).iter().zip(all(other)).map(|(&a, b)| f64::from((a - b).abs())).fold(0.0, f64::max)
    }
}

/// The same in f16. The unfused SE path rounds x * s to f16 before the addition, the fused one
/// does not (half an f16 ulp, 4.9e-4 relative, per element of every SE block's output), and the
/// difference travels through the rest of the step in f16. Bounds as tests/train_step.rs's f16
/// step against its reference: loss within 1e-3 relative, each gradient within 2e-2 in relative
/// L2 norm and their median within 2e-3 (gradients of L2 norm below 1e-5, zero but for rounding,
/// skipped); the mistakes above are O(1).
#[test]
fn fused_f16_training_steps_equal_unfused_ones() {
    let (on, off) = (gpu(), gpu_unfused());
    let n = 4;
    for model in ["resnet8"] {
        let cfg = cifar(model, SePlacement::Standard);
        let x = uniform(&mut rng(31), n * 3 * 8 * 8, 0.0, 1.0);
        let labels = [0u32, 3, 1, 2];
        let run_step = |g: &Arc<Gpu>| {
            let opt = OptimizerConfig::sgd(0.0, 0.0);
            let mut net = Network::new_in(g.clone(), cfg.clone(), opt, 5, Precision::F16).unwrap();
            let plan = net.plan(n).unwrap();
            plan.write_batch(g, &x, &labels).unwrap();
            net.train_step(&plan);
            g.wait().unwrap();
            StepState::read(&net, &plan)
        };
        let (fused, unfused) = (run_step(&on), run_step(&off));
        let (a, b) = (f64::from(fused.loss), f64::from(unfused.loss));
        assert!((a - b).abs() <= 1e-3 * b.abs(), "{model} f16: fused loss {a} vs unfused {b}");
        let mut errs = Vec::new();
        for ((name, got), (_, want)) in fused.grads.iter().zip(&unfused.grads) {
            let norm = want.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
            if norm < 1e-5 {
                continue;
            }
            let diff = got.iter().zip(want).map(|(&u, &v)| f64::from(u - v).powi(2)).sum::<f64>().sqrt();
            let rel = diff / norm;
            assert!(rel < 2e-2, "{model} f16: gradient of {name} off by {rel:.2e} (L2, relative)");
            errs.push(rel);
        }
        errs.sort_by(f64::total_cmp);
        let median = errs[errs.len() / 2];
        assert!(median < 2e-3, "{model} f16: median gradient difference {median:.2e}");
        eprintln!(
            "{model} f16: fused vs unfused loss {a:.6} / {b:.6}, median gradient difference {median:.2e}, worst {:.2e}",
            errs[errs.len() - 1]
        );
    }
}
