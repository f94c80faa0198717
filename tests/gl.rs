//! wgpu's GL backend, executed: Mesa's llvmpipe through EGL (surfaceless, no display needed), the
//! second backend a machine without a GPU can run. One whole training step against the CPU
//! reference step, and `senet devices --backend gl` saying what GL cannot run (f16, subgroups,
//! cooperative matrices: the step runs f32 with workgroup-memory reductions there). With no GL
//! adapter these tests fail with the adapter error: they never pass by skipping.

mod common;

use std::sync::Arc;

use common::*;
use senet_wgpu::gpu::{Gpu, GpuOptions};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::cross_entropy::result;
use senet_wgpu::ops::optimizer::OptimizerConfig;
use senet_wgpu::reference;

fn gl() -> Arc<Gpu> {
    let opts = GpuOptions {
        backend: Some("gl".into()),
        tune: Some(senet_wgpu::gpu::tune::TuneMode::Off),
        ..Default::default()
    };
    let gpu = Gpu::new(&opts).unwrap_or_else(|e| panic!("the GL test cannot run: {e:#}"));
    assert_eq!(gpu.info.backend, wgpu::Backend::Gl, "{}", gpu.describe());
    gpu
}

/// A small base SENet: width 1/16, 3×16×16 input, five classes (as tests/train_step.rs).
fn tiny() -> ModelConfig {
    ModelConfig {
        model: "senet".into(),
        width: 1.0 / 16.0,
        reduction: 16,
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

/// Ignored in the plain `cargo test`: building the step's pipelines on GL compiles each GLSL
/// program in llvmpipe, ~90 s with Mesa's shader cache cold on the shared 2-core machine (1-2 s
/// warm). .ci/run runs it with `--ignored`.
#[test]
#[ignore = "GL compiles every pipeline in llvmpipe (~90 s cold); run by .ci/run"]
fn a_training_step_on_gl_equals_the_reference_step() {
    let gpu = gl();
    assert!(!gpu.subgroups && gpu.coop_tile.is_none(), "GL runs workgroup trees and register kernels");
    let (n, classes) = (4, 5);
    let opt = OptimizerConfig::Sgd { lr: 0.1, momentum: 0.9, dampening: 0.0, weight_decay: 1e-4, nesterov: false };
    let mut net = Network::new(gpu.clone(), tiny(), opt, 7).expect("network on GL");
    let plan = net.plan(n).expect("plan on GL");
    let x = uniform(&mut rng(11), n * 3 * 16 * 16, 0.0, 1.0);
    let labels: Vec<u32> = (0..n as u32).map(|i| (i * 3 + 1) % classes as u32).collect();
    let (params, buffers) = reference_state(&net);
    let want = reference::model::train_step(&net.graph, &params, &buffers, n, &to_f64(&x), &labels).expect("ref");

    plan.write_batch(&gpu, &x, &labels).expect("batch");
    net.train_step(&plan);
    gpu.wait().expect("the step runs on GL");

    // The tolerances of tests/train_step.rs's Vulkan step: the kernels are the same f32 WGSL, only
    // translated to GLSL (loss: a mean of log-sum-exps through 17 layers, rtol 1e-4; gradients:
    // errors compound through batch norm's 1/std, atol 2e-4, rtol 1e-3).
    let res = read(&gpu, &plan.train_result);
    assert_close("loss", &[res[result::LOSS]], &[want.loss], 1e-5, 1e-4);
    assert_eq!(res[result::CORRECT] as usize, want.correct, "correct count");
    assert_close("logits", &read(&gpu, plan.logits()), &want.logits, 1e-4, 1e-4);
    for p in &net.params {
        let name = &p.spec.name;
        assert_close(&format!("grad {name}"), &read(&gpu, &p.grad), &want.grads[name], 2e-4, 1e-3);
    }
    for b in &net.bn {
        let key = format!("{}.running_var", b.name);
        assert_close(&key, &read(&gpu, &b.running_var), &want.buffers[&key], 1e-5, 1e-4);
    }
}

#[test]
fn senet_devices_on_gl_says_what_gl_cannot_run() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_senet"))
        .args(["devices", "--backend", "gl"])
        .output()
        .expect("run senet");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("(Gl, "), "{stdout}");
    assert!(stdout.contains("f16 (--precision f16)  off: naga's GLSL back end writes no f16"), "{stdout}");
    assert!(stdout.contains("subgroup reductions    off: wgpu's GL backend offers no subgroups"), "{stdout}");
    assert!(stdout.contains("cooperative matrices   off: "), "{stdout}");
    assert!(stdout.contains("selected: ") && stdout.contains("Gl, "), "{stdout}");
}
