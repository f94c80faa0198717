//! Checkpoints: PyTorch state_dict names and shapes, save → load → identical predictions, and
//! clear errors for checkpoints that do not fit.

mod common;

use common::*;
use senet_wgpu::checkpoint::{self, Entry, Value};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::optimizer::OptimizerConfig;

fn config(width: f64, classes: usize) -> ModelConfig {
    ModelConfig {
        model: "senet".into(),
        width,
        reduction: 16,
        in_channels: 1,
        num_classes: classes,
        input_hw: [28, 28],
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
        block: Default::default(),
    }
}

#[test]
fn state_dict_names_and_shapes_are_pytorchs() {
    // The names and shapes `SENet(num_classes=10, in_channels=3, width=1.0).state_dict()` has.
    let mut cfg = config(1.0, 10);
    cfg.in_channels = 3;
    cfg.input_hw = [32, 32];
    let g = cfg.graph().unwrap();
    let params: Vec<(String, Vec<usize>)> = g.parameters().into_iter().map(|p| (p.name, p.shape)).collect();
    let expect: Vec<(&str, Vec<usize>)> = vec![
        ("features.0.weight", vec![64, 3, 3, 3]),
        ("features.0.bias", vec![64]),
        ("features.1.weight", vec![64]),
        ("features.1.bias", vec![64]),
        ("features.4.weight", vec![128, 64, 3, 3]),
        ("features.4.bias", vec![128]),
        ("features.5.weight", vec![128]),
        ("features.5.bias", vec![128]),
        ("features.8.weight", vec![256, 128, 3, 3]),
        ("features.8.bias", vec![256]),
        ("features.9.weight", vec![256]),
        ("features.9.bias", vec![256]),
        ("features.11.weight", vec![512, 256, 3, 3]),
        ("features.11.bias", vec![512]),
        ("features.12.weight", vec![512]),
        ("features.12.bias", vec![512]),
        ("features.15.weight", vec![1024, 512, 3, 3]),
        ("features.15.bias", vec![1024]),
        ("features.16.fc1.weight", vec![64, 1024, 1, 1]),
        ("features.16.fc2.weight", vec![1024, 64, 1, 1]),
        ("features.17.weight", vec![1024]),
        ("features.17.bias", vec![1024]),
        ("classifier.0.weight", vec![10, 1024]),
        ("classifier.0.bias", vec![10]),
    ];
    let expect: Vec<(String, Vec<usize>)> = expect.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
    assert_eq!(params, expect);
    let bns: Vec<&str> = g.batch_norms().map(|(n, _)| n).collect();
    assert_eq!(bns, ["features.1", "features.5", "features.9", "features.12", "features.17"]);
    // convs 1,792 + 73,856 + 295,168 + 1,180,160 + 4,719,616; BN 2·(64+128+256+512+1024) = 3,968;
    // SE 2·1024·64 = 131,072; classifier 10,250: 6,415,882.
    assert_eq!(g.parameter_count(), 6_415_882);
}

#[test]
fn save_load_eval_gives_identical_predictions() {
    let gpu = gpu();
    let cfg = config(0.125, 10);
    let mut net = Network::new(gpu.clone(), cfg.clone(), OptimizerConfig::adam(1e-3), 1).unwrap();
    let n = 5;
    let plan = net.plan(n).unwrap();
    let mut r = rng(2);
    let x = uniform(&mut r, n * 28 * 28, 0.0, 1.0);
    let labels = [1u32, 2, 3, 4, 5];
    plan.write_batch(&gpu, &x, &labels).unwrap();
    for _ in 0..3 {
        net.train_step(&plan);
    }
    net.eval_batch(&plan);
    let before = read(&gpu, plan.logits());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    checkpoint::save(&net, &path).unwrap();
    let sd = checkpoint::load(&path).unwrap();
    assert_eq!(sd["features.1.num_batches_tracked"], Entry { shape: vec![], value: Value::I64(vec![3]) });

    // A freshly initialised network with another seed, loaded from the file, predicts the same.
    let mut other = Network::new(gpu.clone(), cfg, OptimizerConfig::adam(1e-3), 99).unwrap();
    checkpoint::apply(&mut other, &sd, "ckpt").unwrap();
    let plan2 = other.plan(n).unwrap();
    plan2.write_batch(&gpu, &x, &labels).unwrap();
    other.eval_batch(&plan2);
    assert_eq!(read(&gpu, plan2.logits()), before, "bitwise equal logits after save and load");
    assert_eq!(other.bn[0].num_batches_tracked, 3);

    // The bytes round-trip unchanged, and the shapes tell the configuration.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(checkpoint::to_bytes(&checkpoint::from_bytes(&bytes, "x").unwrap()).unwrap(), bytes);
    let inferred = checkpoint::infer_config(&sd, [28, 28], "x").unwrap();
    assert_eq!((inferred.width, inferred.reduction, inferred.in_channels, inferred.num_classes), (0.125, 16, 1, 10));
}

#[test]
fn mismatched_checkpoints_are_clear_errors() {
    let gpu = gpu();
    let mut net = Network::new(gpu.clone(), config(0.125, 10), OptimizerConfig::adam(1e-3), 1).unwrap();
    let sd = checkpoint::state_dict(&net).unwrap();

    let mut wrong = sd.clone();
    wrong.get_mut("classifier.0.weight").unwrap().shape = vec![7, 128];
    let err = checkpoint::apply(&mut net, &wrong, "other.safetensors").unwrap_err().to_string();
    assert!(err.contains("classifier.0.weight") && err.contains("[7, 128]") && err.contains("[10, 128]"), "{err}");

    let mut missing = sd.clone();
    missing.remove("features.16.fc1.weight");
    let err = checkpoint::apply(&mut net, &missing, "m").unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("features.16.fc1.weight"), "{err}");

    let mut extra = sd.clone();
    extra.insert("features.16.fc1.bias".into(), Entry { shape: vec![8], value: Value::F32(vec![0.0; 8]) });
    let err = checkpoint::apply(&mut net, &extra, "e").unwrap_err().to_string();
    assert!(err.contains("unexpected") && err.contains("features.16.fc1.bias"), "{err}");

    // A checkpoint of another width.
    let wide = Network::new(gpu.clone(), config(0.25, 10), OptimizerConfig::adam(1e-3), 1).unwrap();
    let err = checkpoint::apply(&mut net, &checkpoint::state_dict(&wide).unwrap(), "wide").unwrap_err().to_string();
    assert!(
        err.contains("features.0.weight") && err.contains("[16, 1, 3, 3]") && err.contains("[8, 1, 3, 3]"),
        "{err}"
    );
    assert!(err.contains("fits a model senet width 0.25"), "{err}");

    // Not safetensors at all, and an int32 tensor.
    let err = format!("{:#}", checkpoint::from_bytes(b"garbage", "junk.safetensors").unwrap_err());
    assert!(err.contains("junk.safetensors") && err.contains("not a readable safetensors"), "{err}");
    let i32_bytes = safetensors::serialize(
        [("w", safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![1], &[0u8; 4]).unwrap())],
        None,
    )
    .unwrap();
    let err = checkpoint::from_bytes(&i32_bytes, "i32.safetensors").unwrap_err().to_string();
    assert!(err.contains("tensor w is I32") && err.contains("F16, BF16 or F64"), "{err}");
}

/// Checkpoints as people have them: F16, BF16 and F64 tensors load, converted to f32 — exactly
/// for F16 and BF16 (every value is an f32), rounded to nearest for F64.
#[test]
fn half_bfloat_and_double_tensors_load_as_f32() {
    use safetensors::{Dtype, tensor::TensorView};
    // F16: every one of the 65,536 bit patterns against the IEEE formula evaluated in f64.
    for h in 0..=u16::MAX {
        let (s, e, m) = (h >> 15, i32::from((h >> 10) & 0x1f), f64::from(h & 0x3ff));
        let want = match e {
            0 => m / 1024.0 * 2f64.powi(-14),
            31 if m == 0.0 => f64::INFINITY,
            31 => f64::NAN,
            _ => (1.0 + m / 1024.0) * 2f64.powi(e - 15),
        } * if s == 1 { -1.0 } else { 1.0 };
        let got = checkpoint::f16_to_f32(h);
        assert!(
            (want.is_nan() && got.is_nan()) || f64::from(got) == want,
            "f16 {h:#06x}: {got} (bits {:#010x}), expected {want}",
            got.to_bits()
        );
    }
    let vals = [1.0f32, -2.5, 0.15625, 65504.0, 6.103_515_6e-5];
    let f16: Vec<u8> = [0x3c00u16, 0xc100, 0x3100, 0x7bff, 0x0400].iter().flat_map(|b| b.to_le_bytes()).collect();
    let bf16: Vec<u8> = vals.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
    let f64s: Vec<u8> = [1.0f64, -2.5, 0.1, 1e300, 6.103_515_625e-5].iter().flat_map(|v| v.to_le_bytes()).collect();
    let bytes = safetensors::serialize(
        [
            ("h", TensorView::new(Dtype::F16, vec![5], &f16).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![5], &bf16).unwrap()),
            ("d", TensorView::new(Dtype::F64, vec![5], &f64s).unwrap()),
        ],
        None,
    )
    .unwrap();
    let sd = checkpoint::from_bytes(&bytes, "mixed.safetensors").unwrap();
    let f32s = |name: &str| match &sd[name].value {
        Value::F32(v) => v.clone(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(f32s("h"), vals);
    // bf16 is the top 16 bits of an f32: each loads as the f32 with its low 16 bits cleared.
    let want_b: Vec<f32> = vals.iter().map(|v| f32::from_bits(v.to_bits() & 0xffff_0000)).collect();
    assert_eq!(f32s("b"), want_b);
    assert_eq!(f32s("d"), [1.0, -2.5, 0.1f32, f32::INFINITY, 6.103_515_6e-5]);
    assert_eq!(sd["h"].shape, [5]);
}

/// Killing the process (SIGKILL, no chance to clean up) at any moment of a checkpoint write
/// leaves the previous checkpoint readable: writes go to a temporary file, are synced, then
/// renamed over the old one. The child is this test binary re-run as a writer.
#[test]
fn sigkill_during_checkpoint_writes_leaves_a_readable_file() {
    use checkpoint::StateDict;
    let version = |v: f32| -> Vec<u8> {
        let mut sd = StateDict::new();
        for k in 0..8 {
            sd.insert(
                format!("layer{k}.weight"),
                Entry { shape: vec![64 * 1024], value: Value::F32(vec![v; 64 * 1024]) },
            );
        }
        checkpoint::to_bytes(&sd).unwrap()
    };
    if let Ok(path) = std::env::var("SENET_TEST_CHECKPOINT_WRITER") {
        // The child: rewrite the checkpoint forever, alternating two versions, until killed.
        let (a, b) = (version(1.0), version(2.0));
        loop {
            checkpoint::write_atomic(std::path::Path::new(&path), &a).unwrap();
            checkpoint::write_atomic(std::path::Path::new(&path), &b).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("last.safetensors");
    let valid = [version(0.0), version(1.0), version(2.0)];
    checkpoint::write_atomic(&path, &valid[0]).unwrap();
    let mut r = rng(9);
    let mut rewritten = 0;
    for round in 0..12 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["sigkill_during_checkpoint_writes_leaves_a_readable_file", "--exact", "--test-threads", "1"])
            .env("SENET_TEST_CHECKPOINT_WRITER", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(rand::Rng::random_range(&mut r, 20..120)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(valid.contains(&bytes), "round {round}: the checkpoint is not one of the complete versions");
        checkpoint::from_bytes(&bytes, "last.safetensors").unwrap();
        rewritten += usize::from(bytes != valid[0]);
    }
    assert!(rewritten > 0, "the writer never got to write: the test did not exercise the kill");
}

/// A bare state dict (no config.json) tells its model: every family, SE or not, with SE biases,
/// SE in some stages only, odd widths and reductions.
#[test]
fn bare_state_dicts_tell_their_model() {
    let gpu = gpu();
    let cases: [(&str, f64, usize, bool, &[usize]); 13] = [
        ("senet", 0.125, 4, true, &[]),
        ("resnet20", 0.5, 16, false, &[]),
        ("se-resnet32", 0.5, 4, false, &[]),
        ("se-resnet56", 0.25, 2, true, &[2, 3]),
        ("resnet18", 0.125, 16, false, &[]),
        ("se-resnet34", 0.125, 8, false, &[]),
        ("se-resnet50", 0.125, 16, true, &[4]),
        ("resnet101", 0.0625, 16, false, &[]),
        ("se-resnet152", 0.0625, 4, false, &[]),
        ("resnext50-32x4d", 0.0625, 16, false, &[]),
        // One group left at this width (int(8 · 0.125)): told from a ResNet by its wider bottleneck.
        ("se-resnext101-8x16d", 0.125, 8, true, &[3, 4]),
        ("se-resnext50-32x4d", 0.125, 16, true, &[]),
        ("senet154", 0.0625, 8, true, &[1, 4]),
    ];
    for (model, width, reduction, se_bias, stages) in cases {
        let mut cfg = config(width, 7);
        cfg.model = model.into();
        cfg.reduction = reduction;
        cfg.in_channels = 3;
        cfg.se_bias = se_bias;
        cfg.se.stages = stages.to_vec();
        let net = Network::new(gpu.clone(), cfg.clone(), OptimizerConfig::adam(1e-3), 0).unwrap();
        let sd = checkpoint::state_dict(&net).unwrap();
        let got = checkpoint::infer_config(&sd, [28, 28], "bare").unwrap();
        let want = (cfg.model.as_str(), cfg.width, cfg.in_channels, cfg.num_classes, cfg.se_bias, &cfg.se.stages);
        assert_eq!(
            (got.model.as_str(), got.width, got.in_channels, got.num_classes, got.se_bias, &got.se.stages),
            want
        );
        if model.contains("se") {
            assert_eq!(got.reduction, reduction, "{model}");
        }
    }
}
