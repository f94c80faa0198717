//! Every dispatch of a plan declares the bytes it must move (`Dispatch::with_cost`): the totals
//! `senet plan` prints are sums over the dispatches, and one that reports 0 bytes hides its
//! traffic from them. Checked for the base SENet, SE-ResNet-20 and an f16 plan (which adds the
//! casts and the loss scaler), training step and evaluation pass.

mod common;

use senet_wgpu::gpu::Precision;
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::optimizer::OptimizerConfig;

fn config(model: &str, width: f64) -> ModelConfig {
    ModelConfig {
        model: model.into(),
        width,
        reduction: 4,
        in_channels: 3,
        num_classes: 5,
        input_hw: [16, 16],
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
        block: Default::default(),
    }
}

/// The dispatches of `model`'s training step and evaluation pass that report no bytes.
fn zero_byte_dispatches(cfg: ModelConfig, precision: Precision, optimizer: OptimizerConfig) -> Vec<String> {
    let net = Network::new_in(common::gpu(), cfg, optimizer, 0, precision).expect("network");
    let plan = net.plan(2).expect("plan");
    let (train, eval) = (net.train_dispatches(&plan), net.eval_dispatches(&plan));
    assert!(!train.is_empty() && !eval.is_empty());
    train
        .iter()
        .map(|d| ("train", d))
        .chain(eval.iter().map(|d| ("eval", d)))
        .filter(|(_, d)| !(d.bytes > 0.0 && d.bytes.is_finite() && d.flops >= 0.0))
        .map(|(list, d)| format!("{list}: {} {:?} {} ({} bytes)", d.layer, d.pass, d.label, d.bytes))
        .collect()
}

#[test]
fn no_dispatch_of_a_plan_moves_zero_bytes() {
    let cases = [
        ("senet f32, adam", config("senet", 1.0 / 16.0), Precision::F32, OptimizerConfig::adam(1e-3)),
        ("se-resnet20 f32, adam", config("se-resnet20", 0.25), Precision::F32, OptimizerConfig::adam(1e-3)),
        ("se-resnet20 f16, adam", config("se-resnet20", 0.25), Precision::F16, OptimizerConfig::adam(1e-3)),
        ("senet f32, sgd", config("senet", 1.0 / 16.0), Precision::F32, OptimizerConfig::sgd(0.1, 0.9)),
    ];
    let mut failures = Vec::new();
    for (name, cfg, precision, optimizer) in cases {
        for z in zero_byte_dispatches(cfg, precision, optimizer) {
            failures.push(format!("{name}: {z}"));
        }
    }
    assert!(failures.is_empty(), "dispatches reporting no bytes:\n{}", failures.join("\n"));
}
