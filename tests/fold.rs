//! Batch norm folded into the convolution before it in evaluation (`--fuse on`; src/model/plan/
//! fold.rs, ops/bn_fold): whole evaluation passes of folded plans against unfused ones
//! (`--fuse off`, a batch-norm dispatch per batch norm) and against the f64 reference model,
//! f32 and f16, for the base SENet, a CIFAR SE-ResNet, an ImageNet bottleneck SE-ResNet and an
//! SE-ResNeXt (grouped) at small sizes, with batch-norm parameters and running statistics far
//! from their initial values, before and after a training step (which changes the weights the
//! fold reads).

mod common;

use std::sync::{Arc, OnceLock};

use common::*;
use senet_wgpu::gpu::{Fuse, Gpu, GpuOptions, Precision};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::{Network, StepPlan};
use senet_wgpu::ops::cross_entropy::{per_sample, result};
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

/// A model at a small size: (name, width, reduction, input H×W).
fn config(model: &str, width: f64, reduction: usize, hw: usize) -> ModelConfig {
    small_model(model, width, reduction, hw, 5)
}

/// The models: the base SENet (conv biases, a BN after the SE block that stays a BN), a CIFAR
/// SE-ResNet (basic blocks, projection shortcuts), an ImageNet bottleneck SE-ResNet (7×7 stem,
/// stride-2 3×3s, 1×1 projections) and a bottleneck SE-ResNeXt (grouped 3×3s).
fn models() -> Vec<(&'static str, ModelConfig)> {
    vec![
        ("senet", config("senet", 0.125, 4, 32)),
        ("se-resnet8", config("se-resnet8", 0.5, 4, 8)),
        ("se-resnet50", config("se-resnet50", 1.0 / 32.0, 4, 48)),
        // Grouped 3×3s: 32 groups of one channel each at this width.
        ("se-resnext50-32x4d", config("se-resnext50-32x4d", 0.25, 4, 32)),
    ]
}

/// Every batch norm's gamma, beta (parameters) and running mean and variance set to values far
/// from 1, 0, 0, 1 (the same for every network built from the same seed): gamma U(0.5, 1.5),
/// beta U(−0.5, 0.5), mean U(−0.5, 0.5), var U(0.5, 2).
fn perturb_batch_norms(net: &Network, seed: u64) {
    let mut r = rng(seed);
    for b in &net.bn {
        let c = b.running_mean.numel();
        let param = |s: &str| net.param(&format!("{}.{s}", b.name)).unwrap();
        param("weight").value.write(&net.gpu, &uniform(&mut r, c, 0.5, 1.5)).unwrap();
        param("bias").value.write(&net.gpu, &uniform(&mut r, c, -0.5, 0.5)).unwrap();
        b.running_mean.write(&net.gpu, &uniform(&mut r, c, -0.5, 0.5)).unwrap();
        b.running_var.write(&net.gpu, &uniform(&mut r, c, 0.5, 2.0)).unwrap();
    }
}

/// An evaluation pass's logits, loss, correct count and per-sample predictions.
struct Eval {
    logits: Vec<f32>,
    loss: f32,
    correct: f32,
    predicted: Vec<usize>,
}

fn eval(net: &Network, plan: &StepPlan, x: &[f32], labels: &[u32]) -> Eval {
    let g = &net.gpu;
    plan.write_batch(g, x, labels).unwrap();
    net.eval_batch(plan);
    g.wait().unwrap();
    let res = read(g, &plan.eval_result);
    let rows = read(g, &plan.per_sample);
    Eval {
        logits: read_as(g, plan.logits()),
        loss: res[result::LOSS],
        correct: res[result::CORRECT],
        predicted: rows.chunks(per_sample::LEN).map(|r| r[per_sample::PREDICTED] as usize).collect(),
    }
}

/// The evaluation kernels of a plan.
fn eval_kernels(net: &Network, plan: &StepPlan) -> Vec<String> {
    net.eval_dispatches(plan).iter().map(|d| d.label.to_string()).collect()
}

/// Predictions, loss and correct count against the f64 reference's. No logit is further than
/// δ from the reference's (checked before), so a sample whose top two reference logits are more
/// than 2δ apart cannot change its prediction: every such sample must be predicted alike (and
/// at least half the samples must be such, or the check says nothing); the correct count then
/// matches when every sample is; the loss within `loss_rtol`.
fn check_outcome(what: &str, got: &Eval, want: &[f64], labels: &[u32], loss_rtol: f64) {
    let delta = got.logits.iter().zip(want).fold(0.0f64, |m, (&g, w)| m.max((f64::from(g) - w).abs()));
    let margin = 2.0 * delta;
    let classes = want.len() / labels.len();
    let ce = reference::cross_entropy::cross_entropy_forward_backward(want, labels, classes);
    let loss = f64::from(got.loss);
    assert!((loss - ce.loss).abs() <= loss_rtol * ce.loss.abs(), "{what}: loss {loss} vs reference {}", ce.loss);
    let mut clear = 0;
    for (s, row) in want.chunks(classes).enumerate() {
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > margin {
            clear += 1;
            let arg = row.iter().position(|&v| v == sorted[0]).unwrap_or(0);
            assert_eq!(got.predicted[s], arg, "{what}: sample {s} predicted {} vs reference {arg}", got.predicted[s]);
        }
    }
    assert!(2 * clear >= labels.len(), "{what}: only {clear} of {} samples have a clear prediction", labels.len());
    if clear == labels.len() {
        assert_eq!(got.correct as usize, ce.correct, "{what}: correct count");
    }
}

/// Builds a network (`precision`) on `gpu` from seed 5, perturbs its batch norms and plans batch `n`.
fn build(gpu: &Arc<Gpu>, cfg: &ModelConfig, precision: Precision, n: usize) -> (Network, StepPlan) {
    let net = Network::new_in(gpu.clone(), cfg.clone(), OptimizerConfig::sgd(0.01, 0.9), 5, precision).unwrap();
    perturb_batch_norms(&net, 17);
    let plan = net.plan(n).unwrap();
    (net, plan)
}

/// The plans: a folded evaluation pass has one `bn_fold` dispatch and no batch-norm dispatch —
/// where no convolution precedes the batch norm (the base SENet's BN after its SE block), the max
/// pool after its ReLU applies it as it loads (pool.wgsl, AFFINE); the unfused pass has one per
/// batch norm; both run the same convolutions.
#[test]
fn folded_evaluation_passes_run_no_batch_norm_after_a_convolution() {
    for (name, cfg) in models() {
        let (on, plan_on) = build(&gpu(), &cfg, Precision::F32, 2);
        let (off, plan_off) = build(&gpu_unfused(), &cfg, Precision::F32, 2);
        let (k_on, k_off) = (eval_kernels(&on, &plan_on), eval_kernels(&off, &plan_off));
        let bn = |k: &[String]| k.iter().filter(|k| k.starts_with("batch_norm")).count();
        let folds = k_on.iter().filter(|k| *k == "bn_fold_forward").count();
        assert_eq!(folds, 1, "{name}: one fold dispatch per evaluation pass: {k_on:?}");
        assert_eq!(bn(&k_off), on.bn.len(), "{name}: --fuse off keeps a batch norm dispatch each");
        assert_eq!(bn(&k_on), 0, "{name}: batch norms left in the folded pass: {k_on:?}");
        let conv = |k: &[String]| k.iter().filter(|k| k.starts_with("conv2d")).count();
        assert_eq!(conv(&k_on), conv(&k_off), "{name}: the same convolutions");
    }
}

/// f32: the folded pass against the unfused one and both against the f64 reference (eval-mode
/// `reference::model::eval_forward`), before and after a training step.
///
/// Folding changes rounding only: w·s is rounded once more (half an ulp per weight), the bias
/// starts the conv's sum instead of following it, and the BN's separate roundings of
/// (x − mean)·invstd·gamma + beta go. Each is a relative change of a few f32 ulps (~1e-7) per
/// layer, the same order as the GPU's own difference from the f64 reference, which
/// tests/train_step.rs bounds at 1e-4 (atol and rtol) for logits; so folded and unfused each stay
/// within that bound of the reference, and of each other within twice it; the folded logits'
/// relative L2 error 1e-5 (measured 9e-8–4e-7). Loss rtol 1e-4. A fold of the wrong channel's
/// statistics, a lost bias or ReLU is off by O(0.1–1).
#[test]
fn folded_f32_evaluation_matches_unfused_and_reference() {
    let n = 4;
    let labels = [0u32, 3, 1, 4];
    for (name, cfg) in models() {
        // The two networks train between the rounds and must stay equal: the folded one's plans
        // keep the batch norms' own statistics (`--bn-stats off`, whose steps are the unfused
        // ones bit for bit), since SE-ResNeXt's last stage normalises 4 values per channel here
        // and another summation order would move its state by more than these bounds.
        let (mut on, plan_on) = build(&gpu_without_bn_stats(), &cfg, Precision::F32, n);
        let (mut off, plan_off) = build(&gpu_unfused(), &cfg, Precision::F32, n);
        let len = n * 3 * cfg.input_hw[0] * cfg.input_hw[1];
        for round in 0..2 {
            let what = format!("{name} f32 round {round}");
            let x = uniform(&mut rng(30 + round), len, 0.0, 1.0);
            let (params, buffers) = reference_state(&on);
            let want = reference::model::eval_forward(&on.graph, &params, &buffers, n, &to_f64(&x)).unwrap();
            let (got, unfused) = (eval(&on, &plan_on, &x, &labels), eval(&off, &plan_off, &x, &labels));
            let d = assert_close(&format!("{what}: folded logits vs reference"), &got.logits, &want, 1e-4, 1e-4);
            let d0 = assert_close(&format!("{what}: unfused logits vs reference"), &unfused.logits, &want, 1e-4, 1e-4);
            let f =
                assert_close(&format!("{what}: folded vs unfused"), &got.logits, &to_f64(&unfused.logits), 2e-4, 2e-4);
            // Beside the element bound, the whole tensor: relative L2 1e-5 (measured ~1e-7).
            let l2 = assert_rel_l2(&format!("{what}: folded logits"), &got.logits, &want, 1e-5, 1e-6);
            check_outcome(&what, &got, &want, &labels, 1e-4);
            eprintln!(
                "{what}: largest logit difference folded–reference {d:.2e}, unfused–reference {d0:.2e}, \
                 folded–unfused {f:.2e}; relative L2 folded–reference {l2:.2e}"
            );
            // A training step changes every weight and running statistic the fold reads.
            for (net, plan) in [(&mut on, &plan_on), (&mut off, &plan_off)] {
                plan.write_batch(&net.gpu, &x, &labels).unwrap();
                net.train_step(plan);
                net.gpu.wait().unwrap();
            }
        }
    }
}

/// f16: the same passes with f16 activations and GEMM weights. The unfused pass rounds the
/// conv's output and then the BN's to f16, the folded one rounds w·s to f16 (instead of w) and
/// the output once: both are f16 roundings of the same f32 sums, relative 2^-11 per rounding,
/// compounding over the depth. Bound: each pass's logits within relative L2 error 5e-3 of the f64
/// reference (f32 arithmetic, unrounded; measured 2.4e-4–5.4e-4 for either pass, ten 2^-11
/// roundings' worth), and the folded
/// pass no further from it than 1.5× the unfused pass's error plus 2e-3 — folding must not
/// make f16 evaluation worse. Predictions where the logits' error cannot flip them must agree;
/// loss rtol 1e-2.
#[test]
fn folded_f16_evaluation_matches_unfused_and_reference() {
    let n = 4;
    let labels = [2u32, 0, 4, 1];
    for (name, cfg) in models() {
        let (on, plan_on) = build(&gpu(), &cfg, Precision::F16, n);
        let (off, plan_off) = build(&gpu_unfused(), &cfg, Precision::F16, n);
        let what = format!("{name} f16");
        let x = uniform(&mut rng(40), n * 3 * cfg.input_hw[0] * cfg.input_hw[1], 0.0, 1.0);
        let (params, buffers) = reference_state(&on);
        let want = reference::model::eval_forward(&on.graph, &params, &buffers, n, &to_f64(&x)).unwrap();
        let (got, unfused) = (eval(&on, &plan_on, &x, &labels), eval(&off, &plan_off, &x, &labels));
        let e = assert_rel_l2(&format!("{what}: folded logits"), &got.logits, &want, 5e-3, 1e-6);
        let e0 = assert_rel_l2(&format!("{what}: unfused logits"), &unfused.logits, &want, 5e-3, 1e-6);
        assert!(e <= 1.5 * e0 + 2e-3, "{what}: folding made the logits worse: {e:.2e} vs unfused {e0:.2e}");
        check_outcome(&what, &got, &want, &labels, 1e-2);
        let mut convs: Vec<String> =
            eval_kernels(&on, &plan_on).into_iter().filter(|k| k.starts_with("conv2d")).collect();
        convs.dedup();
        eprintln!("{what}: logits relative L2 error folded {e:.2e}, unfused {e0:.2e} (kernels {convs:?})");
    }
}
