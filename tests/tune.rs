//! The conv kernel tuner: it times once and remembers, reads its cache on the next start without
//! timing anything, survives a corrupt, truncated or foreign cache file (ignored with a warning,
//! rewritten, never a crash, never an unknown kernel), and the kernels it may pick run a whole
//! training step equal to the CPU reference.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use common::*;
use senet_wgpu::gpu::tune::TuneMode;
use senet_wgpu::gpu::{Gpu, GpuOptions, Precision};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::conv2d::ConvKernel;
use senet_wgpu::ops::cross_entropy::result;
use senet_wgpu::ops::optimizer::OptimizerConfig;
use senet_wgpu::reference;

/// A small base SENet: width 1/16 on 3x16x16 (4..64 channels), 5 classes.
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

/// A device of its own with this tuning mode and cache file.
fn device(mode: TuneMode, cache: &Path) -> Arc<Gpu> {
    Gpu::new(&GpuOptions { tune: Some(mode), tune_cache: Some(cache.to_path_buf()), ..Default::default() })
        .expect("GPU test cannot run")
}

fn planned_kernels(gpu: &Arc<Gpu>, n: usize) -> Vec<String> {
    let net = Network::new(gpu.clone(), tiny(), OptimizerConfig::adam(1e-3), 0).unwrap();
    let plan = net.plan(n).unwrap();
    plan.conv_kernels.iter().map(|(layer, pass, k)| format!("{layer} {pass:?} {k}")).collect()
}

fn cache_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("cache written")).expect("cache is valid JSON")
}

#[test]
fn tuning_is_timed_once_then_read_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("sub").join("tune.json");
    let first = device(TuneMode::Full, &cache);
    let kernels = planned_kernels(&first, 2);
    let s = first.tuner.summary();
    // 5 convs: forward and weight gradient each, input gradient for the 4 past the first.
    assert_eq!((s.timed, s.cached), (14, 0), "first build: {s:?}");
    assert!(s.seconds > 0.0);
    let entries = &cache_json(&cache)["devices"];
    assert_eq!(entries.as_object().map(|d| d.len()), Some(1), "one device in {entries}");

    // A new process (device) with the same cache: nothing timed, the same kernels.
    let second = device(TuneMode::Quick, &cache);
    assert_eq!(planned_kernels(&second, 2), kernels);
    let s = second.tuner.summary();
    assert_eq!((s.timed, s.cached), (0, 14), "second build: {s:?}");

    // Another batch size is another shape: timed then, and added beside the first.
    let _ = planned_kernels(&second, 3);
    if second.is_cpu() {
        assert_eq!(second.tuner.summary().timed, 0, "quick mode on a CPU adapter times nothing");
    }
    // Full times batch 3 (again, where quick chose on a GPU: full tries more kernels).
    let third = device(TuneMode::Full, &cache);
    let _ = planned_kernels(&third, 3);
    assert_eq!(third.tuner.summary().timed, 14);
    let dev = cache_json(&cache)["devices"].as_object().unwrap().values().next().unwrap().clone();
    assert_eq!(dev.as_object().unwrap().len(), 28, "both batch sizes kept");

    // Off times nothing and reads nothing: the built-in register blocks everywhere.
    let off = device(TuneMode::Off, &cache);
    assert!(planned_kernels(&off, 2).iter().all(|k| k.contains("register")));
    assert_eq!(off.tuner.summary().cached, 0);
}

#[test]
fn a_corrupt_truncated_or_foreign_cache_is_ignored_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let good = {
        let gpu = device(TuneMode::Full, &cache);
        planned_kernels(&gpu, 1)
    };
    let valid = std::fs::read(&cache).unwrap();
    let unknown = with_every_choice(&String::from_utf8(valid.clone()).unwrap(), "register:99,16,8,16");
    let bad: [(&str, Vec<u8>); 4] = [
        ("garbage", vec![0xff, 0x00, 0x13, 0x37]),
        ("truncated", valid[..valid.len() / 2].to_vec()),
        ("another version", br#"{"version": 99, "devices": {}}"#.to_vec()),
        ("unknown kernels", unknown.into_bytes()),
    ];
    for (what, bytes) in bad {
        std::fs::write(&cache, &bytes).unwrap();
        let gpu = device(TuneMode::Full, &cache);
        let kernels = planned_kernels(&gpu, 1);
        assert_eq!(kernels.len(), good.len(), "{what}");
        let s = gpu.tuner.summary();
        assert!(s.timed > 0, "{what}: nothing was timed again: {s:?}");
        // Rewritten: valid again, every entry a kernel this build knows.
        let text = serde_json::to_string(&cache_json(&cache)).unwrap();
        assert!(!text.contains("register:99"), "{what}: an unknown kernel survived: {text}");
        assert!(!kernels.iter().any(|k| k.contains("99")), "{what}: an unknown kernel ran: {kernels:?}");
    }
    // The last rewrite is used whole by the next start.
    let again = device(TuneMode::Full, &cache);
    let _ = planned_kernels(&again, 1);
    assert_eq!(again.tuner.summary().timed, 0, "the rewritten cache was not used");
}

/// An f16 plan is tuned in f16: its cache keys name the precision (" f16", and the tile where
/// cooperative matrices are candidates) beside the f32 plan's in one file, timing it built f16
/// convolution kernels only (before, the tuner timed f32 kernels for f16 plans and an f16 plan
/// reused the f32 plan's choices), and a second start reads it back. The f32 keys are the shapes
/// alone, spelled as before precisions existed: a cache an earlier build wrote stays valid, so the
/// file keeps its version (pinned here by one literal key).
#[test]
fn an_f16_plan_is_tuned_in_f16_beside_the_f32_plan() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let f16_kernels = |gpu: &Arc<Gpu>| -> Vec<String> {
        let net = Network::new_in(gpu.clone(), tiny(), OptimizerConfig::adam(1e-3), 0, Precision::F16).unwrap();
        let plan = net.plan(2).unwrap();
        plan.conv_kernels.iter().map(|(layer, pass, k)| format!("{layer} {pass:?} {k}")).collect()
    };
    let first = device(TuneMode::Full, &cache);
    let _ = planned_kernels(&first, 2);
    assert_eq!(first.tuner.summary().timed, 14);

    let second = device(TuneMode::Full, &cache);
    let kernels = f16_kernels(&second);
    let s = second.tuner.summary();
    assert_eq!((s.timed, s.cached), (14, 0), "the f16 plan must not take the f32 plan's choices: {s:?}");
    let f32_conv: Vec<String> =
        second.built_pipelines().into_iter().filter(|k| k.starts_with("conv2d") && k.contains(":f32")).collect();
    assert!(f32_conv.is_empty(), "an f16 plan's tuner built f32 conv kernels: {f32_conv:?}");

    let dev = cache_json(&cache)["devices"].as_object().unwrap().values().next().unwrap().clone();
    let keys: Vec<&String> = dev.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), 28, "f32 and f16 entries side by side: {keys:?}");
    let suffix = match second.coop_tile {
        None => " f16".to_string(),
        Some(t) => format!(" f16 coop{t}"),
    };
    assert_eq!(keys.iter().filter(|k| k.ends_with(&suffix)).count(), 14, "{suffix:?} keys: {keys:?}");
    assert!(
        keys.iter().any(|k| *k == "conv2d Forward n2 c3->4 16x16 k3x3 s1x1 p1x1 d1x1 bias1"),
        "the f32 key spelling changed (an existing cache would no longer be read): {keys:?}"
    );

    let third = device(TuneMode::Quick, &cache);
    assert_eq!(f16_kernels(&third), kernels);
    let s = third.tuner.summary();
    assert_eq!((s.timed, s.cached), (0, 14), "second f16 start: {s:?}");
}

/// Every conv pass forced onto the workgroup-memory kernels through the cache (as a GPU's tuner
/// would choose them): the training step equals the CPU reference, as with the register kernels
/// (tests/train_step.rs, same tolerances).
#[test]
fn the_workgroup_kernels_run_a_training_step_equal_to_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let n = 3;
    {
        let gpu = device(TuneMode::Full, &cache);
        let _ = planned_kernels(&gpu, n);
    }
    let text = String::from_utf8(std::fs::read(&cache).unwrap()).unwrap();
    std::fs::write(&cache, with_every_choice(&text, "tiled:64,64,16,4,4")).unwrap();

    let gpu = device(TuneMode::Quick, &cache);
    let opt = OptimizerConfig::sgd(0.1, 0.0);
    let mut net = Network::new(gpu.clone(), tiny(), opt, 7).unwrap();
    let plan = net.plan(n).unwrap();
    assert!(plan.conv_kernels.iter().all(|(_, _, k)| matches!(k, ConvKernel::Workgroup(_))), "{:?}", plan.conv_kernels);
    let x = uniform(&mut rng(3), n * 3 * 16 * 16, 0.0, 1.0);
    let labels = [1u32, 4, 0];
    let params: HashMap<String, Vec<f64>> =
        net.params.iter().map(|p| (p.spec.name.clone(), to_f64(&read(&gpu, &p.value)))).collect();
    let mut buffers = HashMap::new();
    for b in &net.bn {
        buffers.insert(format!("{}.running_mean", b.name), to_f64(&read(&gpu, &b.running_mean)));
        buffers.insert(format!("{}.running_var", b.name), to_f64(&read(&gpu, &b.running_var)));
    }
    let want = reference::model::train_step(&net.graph, &params, &buffers, n, &to_f64(&x), &labels).unwrap();
    plan.write_batch(&gpu, &x, &labels).unwrap();
    net.train_step(&plan);
    gpu.wait().unwrap();
    assert_close("loss", &[read(&gpu, &plan.train_result)[result::LOSS]], &[want.loss], 1e-5, 1e-4);
    for p in &net.params {
        // Gradients read after the update are still the step's gradients (SGD writes values only).
        let name = &p.spec.name;
        assert_close(&format!("grad {name} (workgroup kernels)"), &read(&gpu, &p.grad), &want.grads[name], 2e-4, 1e-3);
    }
}

/// Every conv kernel family takes grouped convolutions, so the tuner offers all of them for a
/// grouped layer as for any other (ops::conv2d::tune::candidates); a grouped layer is timed under a key
/// of its own that names its groups (an ungrouped layer's key is spelled as before, pinned in
/// an_f16_plan_is_tuned_in_f16_beside_the_f32_plan). Then every pass forced onto the workgroup kernels
/// through the cache: the step of common::grouped_network equals the CPU reference.
#[test]
fn grouped_layers_are_tuned_under_their_own_keys_and_the_workgroup_kernels_run_them() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let (n, h, w) = (2, 9, 7);
    let cfg = ModelConfig { model: "grouped".into(), input_hw: [h, w], ..tiny() };
    let net = |gpu: &Arc<Gpu>, opt| {
        Network::with_graph(gpu.clone(), cfg.clone(), grouped_network(h, w), opt, 7, Precision::F32).unwrap()
    };
    {
        let gpu = device(TuneMode::Full, &cache);
        let _ = net(&gpu, OptimizerConfig::adam(1e-3)).plan(n).unwrap();
        // 3 convs: forward and weight gradient each, input gradient for the 2 past the first.
        assert_eq!(gpu.tuner.summary().timed, 8);
    }
    let dev = cache_json(&cache)["devices"].as_object().unwrap().values().next().unwrap().clone();
    let keys: Vec<&String> = dev.as_object().unwrap().keys().collect();
    for (groups, count) in [(" g4 ", 3), (" g16 ", 3)] {
        assert_eq!(keys.iter().filter(|k| k.contains(groups)).count(), count, "{groups:?} in {keys:?}");
    }
    assert!(keys.iter().any(|k| *k == "conv2d Forward n2 c16->16 9x7 k3x3 s1x1 p1x1 d1x1 g4 bias0"), "{keys:?}");

    let text = String::from_utf8(std::fs::read(&cache).unwrap()).unwrap();
    std::fs::write(&cache, with_every_choice(&text, "tiled:32,128,16,4,4")).unwrap();
    let gpu = device(TuneMode::Quick, &cache);
    let mut net = net(&gpu, OptimizerConfig::sgd(0.1, 0.0));
    let plan = net.plan(n).unwrap();
    assert!(plan.conv_kernels.iter().all(|(_, _, k)| matches!(k, ConvKernel::Workgroup(_))), "{:?}", plan.conv_kernels);
    let x = uniform(&mut rng(5), n * 3 * h * w, 0.0, 1.0);
    let labels = [2u32, 0];
    let (params, buffers) = reference_state(&net);
    let want = reference::model::train_step(&net.graph, &params, &buffers, n, &to_f64(&x), &labels).unwrap();
    plan.write_batch(&gpu, &x, &labels).unwrap();
    net.train_step(&plan);
    gpu.wait().unwrap();
    // Tolerances of the whole step (tests/train_step.rs).
    assert_close("loss", &[read(&gpu, &plan.train_result)[result::LOSS]], &[want.loss], 1e-5, 1e-4);
    for p in &net.params {
        let name = &p.spec.name;
        assert_close(&format!("grad {name} (workgroup kernels)"), &read(&gpu, &p.grad), &want.grads[name], 2e-4, 1e-3);
    }
}

/// The cache file `text` with every choice replaced by `choice`.
fn with_every_choice(text: &str, choice: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    for dev in v["devices"].as_object_mut().unwrap().values_mut() {
        for entry in dev.as_object_mut().unwrap().values_mut() {
            entry["choice"] = serde_json::Value::String(choice.into());
        }
    }
    serde_json::to_string(&v).unwrap()
}
