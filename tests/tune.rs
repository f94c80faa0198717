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
use senet_wgpu::gpu::{ConvForm, Gpu, GpuOptions, Precision};
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
    force_every_choice(&cache, tiny_net, n, "tiled:64,64,16,4,4");

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

/// A network on a device, with an optimizer.
type Build = fn(&Arc<Gpu>, OptimizerConfig) -> Network;

/// `tiny()`.
fn tiny_net(gpu: &Arc<Gpu>, opt: OptimizerConfig) -> Network {
    Network::new(gpu.clone(), tiny(), opt, 7).unwrap()
}

/// A graph in which a convolution reads a batch norm's ReLU and no batch norm follows it (its
/// evaluation forward is not folded): conv1 3 -> 8, BN, ReLU, conv2 8 -> 6 with a bias, the global
/// pool and the classifier, on 3 x 9 x 7.
fn preact_net(gpu: &Arc<Gpu>, opt: OptimizerConfig) -> Network {
    use senet_wgpu::model::{BatchNorm2d, Conv2d, Graph, Layer, Linear, Node};
    let conv = |c_in, c_out, bias| Layer::Conv2d(Conv2d { c_in, c_out, kernel: 3, stride: 1, pad: 1, groups: 1, bias });
    let layers = [
        ("conv1", conv(3, 8, false), vec![0]),
        ("bn1", Layer::BatchNorm2d(BatchNorm2d { c: 8 }), vec![1]),
        ("relu1", Layer::Relu, vec![2]),
        ("conv2", conv(8, 6, true), vec![3]),
        ("pool", Layer::GlobalAvgPool, vec![4]),
        ("fc", Layer::Linear(Linear { in_features: 6, out_features: 5, bias: true }), vec![5]),
    ];
    let nodes = layers.into_iter().map(|(name, layer, inputs)| Node { name: name.into(), layer, inputs }).collect();
    let cfg = ModelConfig { model: "preact".into(), input_hw: [9, 7], ..tiny() };
    Network::with_graph(gpu.clone(), cfg, Graph { input: [3, 9, 7], nodes }, opt, 7, Precision::F32).unwrap()
}

/// The tuning cache of `net` at batch `n` with every choice `choice` (as a GPU's tuner would
/// choose the workgroup tiles), written to `cache`.
fn force_every_choice(cache: &Path, net: Build, n: usize, choice: &str) {
    {
        let gpu = device(TuneMode::Full, cache);
        let _ = net(&gpu, OptimizerConfig::adam(1e-3)).plan(n).unwrap();
    }
    set_choices(cache, "", choice);
}

/// One SGD training step of `net` on a device with `opts` reading the tuning cache `cache`
/// (quick mode: the cache's choices, untimed), every conv pass on the workgroup tiles, then an
/// evaluation pass of the same batch: each training dispatch's label and bytes, the loss, each
/// parameter's gradient, the evaluation's logits.
struct TiledStep {
    costs: Vec<(&'static str, f64)>,
    loss: f32,
    grads: Vec<(String, Vec<f32>)>,
    logits: Vec<f32>,
    /// It ran on a CPU adapter.
    cpu: bool,
}

fn tiled_step(cache: &Path, net: Build, opts: GpuOptions, x: &[f32], labels: &[u32]) -> TiledStep {
    let opts = GpuOptions { tune: Some(TuneMode::Quick), tune_cache: Some(cache.to_path_buf()), ..opts };
    let gpu = Gpu::new(&opts).expect("GPU test cannot run");
    let mut net = net(&gpu, OptimizerConfig::sgd(0.1, 0.0));
    let plan = net.plan(labels.len()).unwrap();
    assert!(plan.conv_kernels.iter().all(|(_, _, k)| matches!(k, ConvKernel::Workgroup(_))));
    let costs = net.train_dispatches(&plan).iter().map(|d| (d.label, d.bytes)).collect();
    plan.write_batch(&gpu, x, labels).unwrap();
    net.train_step(&plan);
    gpu.wait().unwrap();
    let loss = read(&gpu, &plan.train_result)[result::LOSS];
    let grads = net.params.iter().map(|p| (p.spec.name.clone(), read(&gpu, &p.grad))).collect();
    net.eval_batch(&plan);
    gpu.wait().unwrap();
    TiledStep { costs, loss, grads, logits: read(&gpu, plan.logits()), cpu: gpu.is_cpu() }
}

/// The labels of the dispatches whose bytes differ between two plans of the same dispatches.
fn changed(a: &TiledStep, b: &TiledStep) -> Vec<&'static str> {
    assert_eq!(a.costs.iter().map(|c| c.0).collect::<Vec<_>>(), b.costs.iter().map(|c| c.0).collect::<Vec<_>>());
    a.costs.iter().zip(&b.costs).filter(|(p, q)| p.1 != q.1).map(|(p, _)| p.0).collect()
}

/// `--bn-stats` on the workgroup kernels: every pass forced onto the tiles through the cache, each
/// convolution whose output a batch norm alone reads (all of the base SENet's but the last, after
/// its SE block) writes that batch norm's block statistics as it stores its output — its forward
/// moves more bytes, the batch norm's forward reads the blocks — and nothing else in the plan
/// changes. The step is the `--bn-stats off` step up to the statistics' summation order (the
/// bounds of tests/fusion.rs's batch_norm_statistics_from_convolutions_keep_the_step); the test
/// above holds the default (`on`) step to the CPU reference.
#[test]
fn the_workgroup_kernels_give_batch_norms_their_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let labels = [0u32, 3, 2];
    force_every_choice(&cache, tiny_net, labels.len(), "tiled:128,64,16,8,4");
    let x = uniform(&mut rng(11), labels.len() * 3 * 16 * 16, 0.0, 1.0);
    // Batch norms applied by the convolutions after them would save their statistics only.
    let opts = |bn_stats| GpuOptions { bn_stats, bn_apply: ConvForm::Off, ..Default::default() };
    let on = tiled_step(&cache, tiny_net, opts(ConvForm::On), &x, &labels);
    let off = tiled_step(&cache, tiny_net, opts(ConvForm::Off), &x, &labels);
    let changed = changed(&on, &off);
    let bns = on.costs.iter().filter(|d| d.0 == "batch_norm_forward_train").count();
    let convs = changed.iter().filter(|&&l| l == "conv2d_forward (workgroup)").count();
    let merged = changed.iter().filter(|&&l| l == "batch_norm_forward_train").count();
    assert!(bns > 1, "no batch norms");
    assert_eq!(
        (convs, merged, changed.len()),
        (bns - 1, bns - 1, 2 * (bns - 1)),
        "dispatches that changed {changed:?}"
    );
    assert_close("loss", &[on.loss], &[f64::from(off.loss)], 2e-4, 1e-3);
    for ((name, g), (_, h)) in on.grads.iter().zip(&off.grads) {
        assert_close(&format!("grad {name}, --bn-stats on vs off (workgroup kernels)"), g, &to_f64(h), 2e-4, 1e-3);
    }
    assert_close("eval logits, --bn-stats on vs off", &on.logits, &to_f64(&off.logits), 1e-4, 1e-4);
}

/// `--bn-apply` on the workgroup kernels: every batch norm with a fused ReLU whose output a
/// convolution alone reads (the base SENet's without a fused max pool) saves its statistics only,
/// and the convolution's forward and weight gradient apply it and the ReLU as they load the batch
/// norm's input — its training forward moves less, the two convolution passes a few bytes more
/// (the statistics and parameters), nothing else changes — and the step is the `--bn-apply off`
/// step bit for bit on lavapipe (on a GPU within tests/fusion.rs's fused-step bounds, as a driver
/// may contract the batch norm's multiply-add into an FMA in one kernel only): the loads compute the batch norm's own expression and rounding — and so is
/// the evaluation after it, which reads the stored output as before. With and without the
/// statistics from the convolutions before (`--bn-stats`); on `tiny()` (every convolution followed
/// by a batch norm, which evaluation folds into it) and on `preact_net` (one that is not).
#[test]
fn the_workgroup_kernels_apply_batch_norms_as_they_load() {
    let labels = [4u32, 1, 0];
    for (name, net, hw) in [("senet", tiny_net as Build, [16, 16]), ("preact", preact_net as Build, [9, 7])] {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("tune.json");
        force_every_choice(&cache, net, labels.len(), "tiled:64,64,16,4,4");
        let x = uniform(&mut rng(13), labels.len() * 3 * hw[0] * hw[1], 0.0, 1.0);
        for bn_stats in [ConvForm::On, ConvForm::Off] {
            let what = format!("{name} --bn-stats {bn_stats:?}");
            let opts = |bn_apply| GpuOptions { bn_stats, bn_apply, ..Default::default() };
            let on = tiled_step(&cache, net, opts(ConvForm::On), &x, &labels);
            let off = tiled_step(&cache, net, opts(ConvForm::Off), &x, &labels);
            let changed = changed(&on, &off);
            let count = |l: &str| changed.iter().filter(|&&c| c == l).count();
            let applied = count("batch_norm_forward_train");
            assert!(applied > 0, "{what}: no batch norm applied by a convolution");
            eprintln!("{what}: {applied} batch norms applied by the convolutions after them");
            // The weight gradient applies it in its own pass, or in the joint dispatch with the
            // input gradient where that gradient is read (`--joint-backward`, on by default).
            let wgrad = count("conv2d_backward_weight (workgroup)") + count("conv2d_backward (workgroup)");
            assert_eq!(
                (count("conv2d_forward (workgroup)"), wgrad, changed.len()),
                (applied, applied, 3 * applied),
                "{what}: dispatches that changed {changed:?}"
            );
            for (a, b) in on.costs.iter().zip(&off.costs).filter(|(a, _)| a.0 == "batch_norm_forward_train") {
                assert!(a.1 <= b.1, "{what}: a batch norm's forward moves more bytes ({} against {})", a.1, b.1);
            }
            // A GPU driver may contract (x - mean) * scale + beta into an FMA in one kernel and not
            // the other: there the bounds of tests/fusion.rs's fused steps; lavapipe keeps both
            // apart, and there the steps are the same bits.
            let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            let gpu_bounds = !on.cpu;
            if gpu_bounds {
                assert_close(&format!("{what}: loss"), &[on.loss], &[f64::from(off.loss)], 1e-5, 1e-4);
            } else {
                assert_eq!(on.loss.to_bits(), off.loss.to_bits(), "{what}: loss {} vs {}", on.loss, off.loss);
            }
            for ((name, g), (_, h)) in on.grads.iter().zip(&off.grads) {
                if gpu_bounds {
                    assert_close(&format!("{what}: grad {name}"), g, &to_f64(h), 2e-4, 1e-3);
                } else {
                    assert!(same(g, h), "{what}: grad {name} differs with the batch norms applied on load");
                }
            }
            if gpu_bounds {
                assert_close(&format!("{what}: eval logits"), &on.logits, &to_f64(&off.logits), 1e-4, 1e-4);
            } else {
                assert!(same(&on.logits, &off.logits), "{what}: the evaluation's logits differ");
            }
        }
    }
}

/// `--joint-backward` on the workgroup kernels: every pass forced onto one tile shape through the
/// cache, each convolution whose input gradient is read (all of the base SENet's but the first) runs
/// its two gradients as one `conv2d_backward (workgroup)` dispatch — its weight-gradient tiles
/// applying the batch norm before (`--bn-apply`, on by default) — moving the bytes of the two
/// dispatches it replaces, and the step and the evaluation after it are the `--joint-backward off`
/// step's bit for bit on lavapipe (each tile is the workgroup its own pass runs; on a GPU within
/// tests/fusion.rs's fused-step bounds, as a driver may contract a multiply-add in one pipeline
/// only). Where the weight gradients chose another tile shape, the two gradients run apart.
#[test]
fn the_workgroup_kernels_run_both_gradients_in_one_dispatch() {
    use senet_wgpu::gpu::Switch;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let labels = [2u32, 0, 4];
    force_every_choice(&cache, tiny_net, labels.len(), "tiled:64,128,16,4,8");
    let x = uniform(&mut rng(17), labels.len() * 3 * 16 * 16, 0.0, 1.0);
    let opts = |joint_backward| GpuOptions { joint_backward, ..Default::default() };
    let on = tiled_step(&cache, tiny_net, opts(Switch::On), &x, &labels);
    let off = tiled_step(&cache, tiny_net, opts(Switch::Off), &x, &labels);
    let count = |s: &TiledStep, l: &str| s.costs.iter().filter(|c| c.0 == l).count();
    let (input, weight) = ("conv2d_backward_input (workgroup)", "conv2d_backward_weight (workgroup)");
    let joint = count(&on, "conv2d_backward (workgroup)");
    assert!(joint > 1, "{joint} joint dispatches");
    assert_eq!((count(&on, input), count(&off, input)), (0, joint), "input gradients apart");
    assert_eq!(count(&on, weight) + joint, count(&off, weight), "weight gradients apart");
    assert_eq!(on.costs.len() + joint, off.costs.len());
    let bytes = |s: &TiledStep| s.costs.iter().map(|c| c.1).sum::<f64>();
    assert_eq!(bytes(&on), bytes(&off), "bytes per step");
    let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
    if on.cpu {
        assert_eq!(on.loss.to_bits(), off.loss.to_bits(), "loss {} vs {}", on.loss, off.loss);
    } else {
        assert_close("loss", &[on.loss], &[f64::from(off.loss)], 1e-5, 1e-4);
    }
    for ((name, g), (_, h)) in on.grads.iter().zip(&off.grads) {
        if on.cpu {
            assert!(same(g, h), "grad {name} differs with the joint backward");
        } else {
            assert_close(&format!("grad {name}"), g, &to_f64(h), 2e-4, 1e-3);
        }
    }
    assert!(same(&on.logits, &off.logits), "the evaluation's logits differ");

    // The weight gradients on another tile shape: one pipeline holds one shape, so none is joint.
    set_choices(&cache, "conv2d BackwardWeight ", "tiled:64,64,16,4,4");
    let mixed = tiled_step(&cache, tiny_net, opts(Switch::On), &x, &labels);
    assert_eq!((count(&mixed, "conv2d_backward (workgroup)"), count(&mixed, input)), (0, joint), "mixed shapes");
}

/// A layer whose two gradients chose different tile shapes, with `--joint-backward on`: the tuner
/// times the two passes apart against one dispatch on every shape built (full tuning) under the
/// layer's own "BackwardJoint" key and the plan runs what won; the next start reads those choices
/// and times nothing, unless it is a full run and they were a quick one's. A cached joint choice is obeyed — a tile shape runs both gradients as one
/// dispatch of it, "apart" runs the two passes on their own shapes — one that names no tile shape
/// is timed again, and none is read for a pair of pass choices it was not timed against.
#[test]
fn a_layer_whose_gradients_chose_two_tile_shapes_is_timed_joint_and_apart() {
    use senet_wgpu::gpu::Switch;
    use senet_wgpu::ops::conv2d::{ConvPass, WorkgroupTiles};
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let n = 2;
    force_every_choice(&cache, tiny_net, n, "tiled:64,128,16,4,8");
    set_choices(&cache, "conv2d BackwardWeight ", "tiled:64,64,16,4,4");
    let (dgrad_tiles, wgrad_tiles) = (WorkgroupTiles::ALL[2], WorkgroupTiles::ALL[0]);
    let opts = |tune| GpuOptions {
        tune: Some(tune),
        tune_cache: Some(cache.clone()),
        joint_backward: Switch::On,
        ..Default::default()
    };
    // The plan's backward kernels per layer (input gradient, weight gradient) and its joint
    // dispatches; the tuner's timings.
    let planned = |tune| {
        let gpu = Gpu::new(&opts(tune)).expect("GPU test cannot run");
        let net = tiny_net(&gpu, OptimizerConfig::sgd(0.1, 0.0));
        let plan = net.plan(n).unwrap();
        let mut kernels: HashMap<String, (Option<ConvKernel>, Option<ConvKernel>)> = HashMap::new();
        for (layer, pass, k) in &plan.conv_kernels {
            let e = kernels.entry(layer.clone()).or_default();
            match pass {
                ConvPass::BackwardInput => e.0 = Some(*k),
                ConvPass::BackwardWeight => e.1 = Some(*k),
                ConvPass::Forward => {}
            }
        }
        kernels.retain(|_, (i, _)| i.is_some());
        let joint = net.train_dispatches(&plan).iter().filter(|d| d.label == "conv2d_backward (workgroup)").count();
        (kernels, joint, gpu.tuner.summary().timed)
    };
    let joint_keys = |cache: &Path| -> Vec<(String, String)> {
        let dev = cache_json(cache)["devices"].as_object().unwrap().values().next().unwrap().clone();
        let entries = dev.as_object().unwrap();
        let keys = entries.iter().filter(|(k, _)| k.starts_with("conv2d BackwardJoint "));
        keys.map(|(k, e)| (k.clone(), e["choice"].as_str().unwrap().to_string())).collect()
    };
    let set_joint = |choice: &str| set_choices(&cache, "conv2d BackwardJoint ", choice);

    // Timed: one entry per layer shape with an input gradient, each choice "apart" or a tile shape,
    // and the plan runs it.
    let (kernels, joint, timed) = planned(TuneMode::Full);
    let keys = joint_keys(&cache);
    assert!(!keys.is_empty() && timed == keys.len(), "{timed} timed, joint keys {keys:?}");
    for (key, choice) in &keys {
        assert!(key.ends_with(" of tiled:64,128,16,4,8+tiled:64,64,16,4,4"), "{key}: the pair it was timed for");
        let spelled = WorkgroupTiles::ALL.iter().any(|&t| spelled(t) == *choice);
        assert!(choice == "apart" || spelled, "{key}: {choice}");
    }
    let apart = kernels.values().filter(|&&(i, w)| i != w).count();
    assert_eq!(joint + apart, kernels.len(), "joint {joint}, apart {apart}, layers {kernels:?}");
    for (layer, &(i, w)) in &kernels {
        if i != w {
            assert_eq!(
                (i, w),
                (Some(ConvKernel::Workgroup(dgrad_tiles)), Some(ConvKernel::Workgroup(wgrad_tiles))),
                "{layer}"
            );
        }
    }
    // Read back: nothing timed, the same plan; a full run times again what a quick one chose.
    let again = planned(TuneMode::Quick);
    assert_eq!((&again.0, again.1, again.2), (&kernels, joint, 0), "second start");
    set_field(&cache, "conv2d BackwardJoint ", "mode", "quick");
    assert_eq!(planned(TuneMode::Full).2, keys.len(), "a full run reading quick joint choices");

    // Obeyed: a tile shape, then "apart".
    let forced = WorkgroupTiles::ALL[4];
    set_joint(&spelled(forced));
    let (kernels, joint, timed) = planned(TuneMode::Quick);
    assert_eq!((joint, timed), (kernels.len(), 0), "forced joint");
    assert!(kernels.values().all(|&k| k == (Some(ConvKernel::Workgroup(forced)), Some(ConvKernel::Workgroup(forced)))));
    set_joint("apart");
    let (kernels, joint, _) = planned(TuneMode::Quick);
    assert_eq!(joint, 0, "forced apart");
    assert!(
        kernels
            .values()
            .all(|&k| k == (Some(ConvKernel::Workgroup(dgrad_tiles)), Some(ConvKernel::Workgroup(wgrad_tiles))))
    );

    // Not a tile shape: timed again.
    set_joint("register:16,16,8,16");
    let (_, _, timed) = planned(TuneMode::Full);
    assert_eq!(timed, keys.len(), "unknown joint choices timed again");

    // A joint choice belongs to the pair of pass choices it was timed against: with every joint
    // forced onto one shape and then the weight gradients' choice changed, none is read for the
    // new pair (untimed here, so the two run apart).
    set_joint(&spelled(forced));
    let other = WorkgroupTiles::ALL[1];
    set_choices(&cache, "conv2d BackwardWeight ", &spelled(other));
    let (kernels, joint, timed) = planned(TuneMode::Quick);
    assert_eq!((joint, timed), (0, 0), "a joint choice read for another pair");
    assert!(
        kernels.values().all(|&k| k == (Some(ConvKernel::Workgroup(dgrad_tiles)), Some(ConvKernel::Workgroup(other))))
    );
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

/// The tuning cache file `cache` with the choice of every entry whose key starts with `prefix`
/// set to `choice` (`with_pass_choice`, in place).
fn set_choices(cache: &Path, prefix: &str, choice: &str) {
    set_field(cache, prefix, "choice", choice);
}

/// The tuning cache file `cache` with `field` of every entry whose key starts with `prefix` set
/// to `value`.
fn set_field(cache: &Path, prefix: &str, field: &str, value: &str) {
    let text = String::from_utf8(std::fs::read(cache).unwrap()).unwrap();
    std::fs::write(cache, with_pass_field(&text, prefix, field, value)).unwrap();
}

/// The tuning cache's spelling of a workgroup tile shape.
fn spelled(t: senet_wgpu::ops::conv2d::WorkgroupTiles) -> String {
    format!("tiled:{},{},{},{},{}", t.bm, t.bn, t.bk, t.tm, t.tn)
}

/// The cache file `text` with every choice replaced by `choice`.
fn with_every_choice(text: &str, choice: &str) -> String {
    with_pass_choice(text, "", choice)
}

/// `text` (a tuning cache) with the choice of every entry whose key starts with `prefix` (a pass:
/// "conv2d BackwardWeight ") set to `choice`.
fn with_pass_choice(text: &str, prefix: &str, choice: &str) -> String {
    with_pass_field(text, prefix, "choice", choice)
}

/// `text` (a tuning cache) with `field` of every entry whose key starts with `prefix` set to
/// `value`.
fn with_pass_field(text: &str, prefix: &str, field: &str, value: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    for dev in v["devices"].as_object_mut().unwrap().values_mut() {
        for (key, entry) in dev.as_object_mut().unwrap().iter_mut() {
            if key.starts_with(prefix) {
                entry[field] = serde_json::Value::String(value.into());
            }
        }
    }
    serde_json::to_string(&v).unwrap()
}
