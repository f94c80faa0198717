//! timm's SE-ResNets load and run as timm runs them. `scripts/timm_golden.py` (run once with timm,
//! its outputs committed in tests/golden/timm) writes state dicts exactly as timm's
//! `model.state_dict()` — timm's own ResNet class and SE module, the seresnet18 and seresnet50
//! definitions at an eighth of the width — with an input batch and timm's eval-mode logits in
//! float64. From the bare files we read the model (SE widths rounded as timm's
//! `make_divisible(C / 16, 8)`, bottlenecks striding in the 3x3), then compare the f64 reference
//! forward and the GPU's f32 eval forward with timm's logits. Then fine-tuning's classifier
//! re-initialisation and the refusals of what does not fit.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;
use senet_wgpu::checkpoint::{self, Entry, StateDict, Value};
use senet_wgpu::gpu::Precision;
use senet_wgpu::model::plan::Network;
use senet_wgpu::model::{BottleneckStride, ModelConfig};
use senet_wgpu::ops::optimizer::OptimizerConfig;
use senet_wgpu::reference;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/timm");

/// (file stem, the model it is, whether it has bottlenecks).
const CASES: [(&str, &str, bool); 2] =
    [("seresnet18_w0125", "se-resnet18", false), ("seresnet50_w0125", "se-resnet50", true)];

fn path(stem: &str) -> PathBuf {
    Path::new(GOLDEN).join(format!("{stem}.safetensors"))
}

/// The input batch (f32 values) and timm's f64 logits.
fn io(stem: &str) -> (Vec<usize>, Vec<f32>, Vec<f64>) {
    let io = load_golden(&Path::new(GOLDEN).join(format!("{stem}.io.safetensors")));
    let (shape, x) = &io["input"];
    (shape.clone(), x.iter().map(|&v| v as f32).collect(), io["logits"].1.clone())
}

fn f32s(e: &Entry) -> Vec<f64> {
    match &e.value {
        Value::F32(v) => to_f64(v),
        Value::I64(v) => v.iter().map(|&x| x as f64).collect(),
    }
}

/// Logits of the eval-mode forward of `cfg` with `sd`'s weights: (GPU f32, reference f64).
fn logits(cfg: &ModelConfig, sd: &StateDict, shape: &[usize], x: &[f32]) -> (Vec<f32>, Vec<f64>) {
    let gpu = gpu();
    let mut net = Network::new_in(gpu.clone(), cfg.clone(), OptimizerConfig::sgd(0.0, 0.0), 0, Precision::F32).unwrap();
    checkpoint::apply(&mut net, sd, "golden").unwrap();
    let n = shape[0];
    let plan = net.plan(n).unwrap();
    plan.write_batch(&gpu, x, &vec![0; n]).unwrap();
    net.eval_batch(&plan);
    let got = read(&gpu, plan.logits());
    let graph = cfg.graph().unwrap();
    let params: HashMap<String, Vec<f64>> =
        graph.parameters().iter().map(|p| (p.name.clone(), f32s(&sd[&p.name]))).collect();
    let buffers: HashMap<String, Vec<f64>> =
        sd.iter().filter(|(k, _)| k.contains("running_")).map(|(k, e)| (k.clone(), f32s(e))).collect();
    let want = reference::model::eval_forward(&graph, &params, &buffers, n, &to_f64(x)).unwrap();
    (got, want)
}

#[test]
fn timm_state_dicts_tell_their_model() {
    for (stem, model, bottleneck) in CASES {
        let sd = checkpoint::load(&path(stem)).unwrap();
        let cfg = checkpoint::infer_config(&sd, [64, 64], stem).unwrap();
        let stride = if bottleneck { BottleneckStride::Conv3x3 } else { BottleneckStride::Conv1x1 };
        assert_eq!(
            (
                cfg.model.as_str(),
                cfg.width,
                cfg.reduction,
                cfg.se.divisor,
                cfg.se_bias,
                cfg.in_channels,
                cfg.num_classes
            ),
            (model, 0.125, 16, 8, true, 3, 10),
            "{stem}"
        );
        assert_eq!(cfg.block.stride, stride, "{stem}");
        // Every SE width as timm rounds it: 8 for C <= 128 (here C/16 < 8), 16 for C = 256.
        for node in cfg.graph().unwrap().nodes {
            if let senet_wgpu::model::Layer::SeBlock(senet_wgpu::model::SeBlock { c, hidden, .. }) = node.layer {
                assert_eq!(hidden, if c <= 128 { 8 } else { 16 }, "{stem} {}", node.name);
            }
        }
    }
}

/// SE hidden widths as timm's SE module computes them, `make_divisible(C * (1 / r), d,
/// round_limit=0.)`: (C, r, d, timm's width), printed by timm 1.0.31 for these arguments.
#[test]
fn se_widths_round_as_timms() {
    let timm = [
        (64, 16, 8, 8),
        (8, 16, 8, 8),
        (200, 16, 8, 16),
        (192, 16, 8, 16),
        (100, 16, 8, 8),
        (30, 4, 8, 8),
        (96, 16, 4, 8),
        (2048, 16, 8, 128),
        (40, 3, 8, 16),
    ];
    for (c, r, d, want) in timm {
        assert_eq!(senet_wgpu::model::se_hidden(c, r, d), want, "C {c} r {r} divisor {d}");
    }
    // Divisor 0: the paper's C // r.
    assert_eq!(senet_wgpu::model::se_hidden(200, 16, 0), 12);
}

/// Tolerances: the reference forward is float64 with timm's float32 weights, as timm's float64
/// forward: the two differ by summation order only (~1e-13 measured), 1e-9 allowed. The GPU
/// forward is float32 through 20-50 layers with logits of order 1; its error is a few 1e-6
/// (measured on lavapipe: see the printed figure), 1e-4 + 1e-4·|logit| allowed.
#[test]
fn our_eval_forward_reproduces_timms_logits() {
    for (stem, _, bottleneck) in CASES {
        let sd = checkpoint::load(&path(stem)).unwrap();
        let (shape, x, want) = io(stem);
        let cfg = checkpoint::infer_config(&sd, [shape[2], shape[3]], stem).unwrap();
        let (gpu_logits, ref_logits) = logits(&cfg, &sd, &shape, &x);
        let ref_err = ref_logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(ref_err < 1e-9, "{stem}: the f64 reference is {ref_err:e} from timm's logits");
        let worst = assert_close(&format!("{stem} logits"), &gpu_logits, &want, 1e-4, 1e-4);
        eprintln!("{stem}: GPU f32 logits within {worst:.2e} of timm's, the f64 reference within {ref_err:.2e}");
        if bottleneck {
            // The layout matters: the same weights striding in the 1x1 give other logits.
            let mut ours = cfg.clone();
            ours.block.stride = BottleneckStride::Conv1x1;
            let (_, other) = logits(&ours, &sd, &shape, &x);
            let diff = other.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(diff > 1e-2, "{stem}: striding in the 1x1 changes the logits by only {diff:e}");
        }
    }
}

/// timm's ResNeXt and SENet-154 at a sixteenth of the width (scripts/timm_golden.py): (file stem,
/// the model inferred, SE divisor). Both infer width 1/16, r = 16, SE biases, 10 classes.
const FAMILY_CASES: [(&str, &str, usize); 2] =
    [("seresnext50_32x4d_w00625", "se-resnext50-32x4d", 8), ("legacy_senet154_w00625", "senet154", 0)];

/// The model a bare timm ResNeXt / SENet-154 state dict describes, and strict semantics: our
/// graph's parameters and batch-norm buffers are exactly the file's tensors, names and shapes.
#[test]
fn timm_resnext_and_senet154_state_dicts_tell_their_model() {
    for (stem, model, divisor) in FAMILY_CASES {
        let sd = checkpoint::load(&path(stem)).unwrap();
        let cfg = checkpoint::infer_config(&sd, [64, 64], stem).unwrap();
        assert_eq!(
            (
                cfg.model.as_str(),
                cfg.width,
                cfg.reduction,
                cfg.se.divisor,
                cfg.se_bias,
                cfg.in_channels,
                cfg.num_classes
            ),
            (model, 0.0625, 16, divisor, true, 3, 10),
            "{stem}"
        );
        assert_eq!(cfg.block.stride, BottleneckStride::Conv3x3, "{stem}");
        assert!(cfg.se.stages.is_empty(), "{stem}: SE in every stage");
        let graph = cfg.graph().unwrap();
        let mut ours: Vec<(String, Vec<usize>)> = graph.parameters().into_iter().map(|p| (p.name, p.shape)).collect();
        for (bn, c) in graph.batch_norms() {
            ours.push((format!("{bn}.running_mean"), vec![c]));
            ours.push((format!("{bn}.running_var"), vec![c]));
            ours.push((format!("{bn}.num_batches_tracked"), vec![]));
        }
        ours.sort();
        let mut theirs: Vec<(String, Vec<usize>)> = sd.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect();
        theirs.sort();
        assert_eq!(ours, theirs, "{stem}: our tensors against timm's");
    }
}

/// As `our_eval_forward_reproduces_timms_logits`, same tolerances and reasons (50 and 154
/// layers): the f64 reference within 1e-9 of timm's float64 logits, the GPU's f32 within
/// 1e-4 + 1e-4·|logit|. SENet-154's stem pool rounds up (ceil_mode): in floor mode the same
/// weights give other logits, which is what makes this golden see it.
#[test]
fn our_eval_forward_reproduces_timms_resnext_and_senet154_logits() {
    for (stem, _, _) in FAMILY_CASES {
        let sd = checkpoint::load(&path(stem)).unwrap();
        let (shape, x, want) = io(stem);
        let cfg = checkpoint::infer_config(&sd, [shape[2], shape[3]], stem).unwrap();
        let (gpu_logits, ref_logits) = logits(&cfg, &sd, &shape, &x);
        let ref_err = ref_logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(ref_err < 1e-9, "{stem}: the f64 reference is {ref_err:e} from timm's logits");
        let worst = assert_close(&format!("{stem} logits"), &gpu_logits, &want, 1e-4, 1e-4);
        eprintln!("{stem}: GPU f32 logits within {worst:.2e} of timm's, the f64 reference within {ref_err:.2e}");
    }
    let stem = "legacy_senet154_w00625";
    let sd = checkpoint::load(&path(stem)).unwrap();
    let (shape, x, want) = io(stem);
    let cfg = checkpoint::infer_config(&sd, [shape[2], shape[3]], stem).unwrap();
    let mut graph = cfg.graph().unwrap();
    for node in &mut graph.nodes {
        if let senet_wgpu::model::Layer::MaxPool2d(senet_wgpu::model::MaxPool2d { ceil, .. }) = &mut node.layer {
            *ceil = false;
        }
    }
    let params: HashMap<String, Vec<f64>> =
        graph.parameters().iter().map(|p| (p.name.clone(), f32s(&sd[&p.name]))).collect();
    let buffers: HashMap<String, Vec<f64>> =
        sd.iter().filter(|(k, _)| k.contains("running_")).map(|(k, e)| (k.clone(), f32s(e))).collect();
    let floor = reference::model::eval_forward(&graph, &params, &buffers, shape[0], &to_f64(&x)).unwrap();
    let diff = floor.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(diff > 1e-3, "{stem}: pool0 in floor mode changes the logits by only {diff:e}");
}

/// What inference cannot read from a ResNeXt or SENet-154 file is one error naming the file and
/// the tensor.
#[test]
fn resnext_and_senet154_inference_errors_name_the_file_and_tensor() {
    let infer = |sd: &StateDict| format!("{:#}", checkpoint::infer_config(sd, [64, 64], "t.safetensors").unwrap_err());
    let entry = |shape: Vec<usize>| Entry { value: Value::F32(vec![0.0; shape.iter().product()]), shape };

    // SENet-154 with a unit missing from layer3: its depth is fixed.
    let sd = checkpoint::load(&path("legacy_senet154_w00625")).unwrap();
    let mut short = sd.clone();
    short.retain(|k, _| !k.starts_with("layer3.35."));
    let e = infer(&short);
    assert!(e.contains("t.safetensors") && e.contains("units per stage [3, 8, 35, 3]"), "{e}");
    // Groups another width would have: 8 groups at width 1/16 (4).
    let mut groups = sd.clone();
    groups.insert("layer1.0.conv2.weight".into(), entry(vec![16, 1, 3, 3]));
    let e = infer(&groups);
    assert!(e.contains("t.safetensors: layer1.0.conv2.weight [16, 1, 3, 3] has 8 groups"), "{e}");
    // An SE width no rule gives.
    let mut se = sd.clone();
    se.insert("layer2.3.se_module.fc1.weight".into(), entry(vec![3, 32, 1, 1]));
    let e = infer(&se);
    assert!(e.contains("t.safetensors") && e.contains("layer2.3.se_module.fc1.weight 32→3"), "{e}");
    // No last_linear: not claimed by SENet-154, and the error says what is looked for.
    let mut headless = sd.clone();
    headless.remove("last_linear.weight");
    let e = infer(&headless);
    assert!(e.contains("t.safetensors: cannot infer the model") && e.contains("last_linear.weight"), "{e}");

    // A ResNeXt of a depth that is none of 50/101/152.
    let sd = checkpoint::load(&path("seresnext50_32x4d_w00625")).unwrap();
    let mut deep = sd.clone();
    deep.retain(|k, _| !k.starts_with("layer3.5."));
    let e = infer(&deep);
    assert!(e.contains("t.safetensors: ResNeXt units per stage [3, 4, 5, 3]"), "{e}");
}

/// A checkpoint with another class count: everything but the classifier loads, the classifier
/// keeps its fresh initialisation, and the note names both counts.
#[test]
fn a_classifier_of_another_class_count_is_reinitialised() {
    let stem = "seresnet18_w0125";
    let mut sd = checkpoint::load(&path(stem)).unwrap();
    let mut r = rng(5);
    sd.insert(
        "fc.weight".into(),
        Entry { shape: vec![1000, 64], value: Value::F32(uniform(&mut r, 64_000, -0.1, 0.1)) },
    );
    sd.insert("fc.bias".into(), Entry { shape: vec![1000], value: Value::F32(uniform(&mut r, 1000, -0.1, 0.1)) });
    let mut cfg = checkpoint::infer_config(&sd, [32, 32], stem).unwrap();
    assert_eq!(cfg.num_classes, 1000);
    cfg.num_classes = 10;
    let mut net = Network::new(gpu(), cfg, OptimizerConfig::sgd(0.1, 0.9), 3).unwrap();
    let fresh = checkpoint::state_dict(&net).unwrap();
    let note = checkpoint::apply_init(&mut net, &sd, "timm.safetensors").unwrap().expect("a note");
    assert!(
        note.contains("timm.safetensors") && note.contains("fc") && note.contains("1000") && note.contains("10"),
        "{note}"
    );
    let loaded = checkpoint::state_dict(&net).unwrap();
    for (name, e) in &loaded {
        let want = if name.starts_with("fc.") { &fresh[name] } else { &sd[name] };
        assert_eq!(e, want, "{name}");
    }
    // The same class count: no note, every tensor loaded.
    let sd = checkpoint::load(&path(stem)).unwrap();
    let cfg = checkpoint::infer_config(&sd, [32, 32], stem).unwrap();
    let mut net = Network::new(gpu(), cfg, OptimizerConfig::sgd(0.1, 0.9), 3).unwrap();
    assert_eq!(checkpoint::apply_init(&mut net, &sd, "timm.safetensors").unwrap(), None);
    assert_eq!(checkpoint::state_dict(&net).unwrap(), sd);
}

/// What does not fit is one error naming the file and the tensor, and it never says the
/// checkpoint fits the very model it refuses.
#[test]
fn what_does_not_fit_is_refused_naming_the_file_and_tensor() {
    let stem = "seresnet18_w0125";
    let sd = checkpoint::load(&path(stem)).unwrap();
    let cfg = checkpoint::infer_config(&sd, [32, 32], stem).unwrap();
    let net = || Network::new(gpu(), cfg.clone(), OptimizerConfig::sgd(0.1, 0.9), 3).unwrap();
    let err = |sd: &StateDict| format!("{:#}", checkpoint::apply_init(&mut net(), sd, "t.safetensors").unwrap_err());

    // An SE width no rule gives: inference names the block.
    let mut odd = sd.clone();
    odd.insert(
        "layer3.1.se.fc1.weight".into(),
        Entry { shape: vec![7, 32, 1, 1], value: Value::F32(vec![0.0; 7 * 32]) },
    );
    odd.insert("layer3.1.se.fc1.bias".into(), Entry { shape: vec![7], value: Value::F32(vec![0.0; 7]) });
    odd.insert(
        "layer3.1.se.fc2.weight".into(),
        Entry { shape: vec![32, 7, 1, 1], value: Value::F32(vec![0.0; 7 * 32]) },
    );
    let e = format!("{:#}", checkpoint::infer_config(&odd, [32, 32], "t.safetensors").unwrap_err());
    assert!(e.contains("t.safetensors") && e.contains("layer3.1.se.fc1.weight 32→7"), "{e}");
    let e = err(&odd);
    assert!(
        e.contains("t.safetensors")
            && e.contains("layer3.1.se.fc1.weight has shape [7, 32, 1, 1], expected [8, 32, 1, 1]"),
        "{e}"
    );

    // Grey input channels against an RGB model.
    let mut grey = sd.clone();
    grey.insert("conv1.weight".into(), Entry { shape: vec![8, 1, 7, 7], value: Value::F32(vec![0.0; 8 * 49]) });
    let e = err(&grey);
    assert!(
        e.contains("t.safetensors") && e.contains("conv1.weight has shape [8, 1, 7, 7], expected [8, 3, 7, 7]"),
        "{e}"
    );
    assert!(e.contains("fits a model se-resnet18") && e.contains("in_channels 1"), "{e}");

    // The paper's SE widths (C // 16) asked of timm's: the message says which model it fits.
    let mut paper = cfg.clone();
    paper.se.divisor = 0;
    let mut net =
        Network::new(gpu(), ModelConfig { reduction: 4, ..paper }, OptimizerConfig::sgd(0.1, 0.9), 3).unwrap();
    let e = format!("{:#}", checkpoint::apply_init(&mut net, &sd, "t.safetensors").unwrap_err());
    assert!(e.contains("does not fit the model se-resnet18 width 0.125 reduction 4 in_channels"), "{e}");
    assert!(
        e.contains("fits a model se-resnet18 width 0.125 reduction 16 (SE widths rounded to multiples of 8)"),
        "{e}"
    );

    // What the shapes cannot tell apart (where the SE blocks sit) is not claimed to fit: the
    // message names the misshapen tensors and no "fits a model" that is the refused one.
    let mut pre = cfg.clone();
    pre.se.placement = senet_wgpu::model::SePlacement::Pre;
    let mut net = Network::new(gpu(), pre, OptimizerConfig::sgd(0.1, 0.9), 3).unwrap();
    let e = format!("{:#}", checkpoint::apply_init(&mut net, &sd, "t.safetensors").unwrap_err());
    assert!(e.contains("layer2.0.se.fc1.weight has shape [8, 16, 1, 1], expected [8, 8, 1, 1]"), "{e}");
    assert!(!e.contains("fits a model"), "{e}");

    // A missing and an unexpected tensor.
    let mut missing = sd.clone();
    missing.remove("layer2.0.downsample.1.running_var");
    let e = err(&missing);
    assert!(e.contains("t.safetensors: missing tensors") && e.contains("layer2.0.downsample.1.running_var"), "{e}");
    let mut extra = sd.clone();
    extra.insert("head.weight".into(), Entry { shape: vec![1], value: Value::F32(vec![0.0]) });
    let e = err(&extra);
    assert!(e.contains("t.safetensors: unexpected tensors") && e.contains("head.weight"), "{e}");

    // A classifier on other features is no class-count change: refused.
    let mut fc = sd.clone();
    fc.insert("fc.weight".into(), Entry { shape: vec![1000, 32], value: Value::F32(vec![0.0; 32_000]) });
    let e = err(&fc);
    assert!(e.contains("fc.weight has shape [1000, 32], expected [10, 64]"), "{e}");
}

/// `senet train --init` on a bare timm file with no model flags: the model comes from the
/// checkpoint (said in the first line), the 1000-class classifier is re-initialised for the
/// folder's 10 classes (said in a note), and the run's config.json records timm's layout.
#[test]
fn train_init_takes_the_model_from_a_timm_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut sd = checkpoint::load(&path("seresnet18_w0125")).unwrap();
    let mut r = rng(6);
    sd.insert(
        "fc.weight".into(),
        Entry { shape: vec![1000, 64], value: Value::F32(uniform(&mut r, 64_000, -0.1, 0.1)) },
    );
    sd.insert("fc.bias".into(), Entry { shape: vec![1000], value: Value::F32(vec![0.0; 1000]) });
    let init = dir.path().join("seresnet18.safetensors");
    std::fs::write(&init, checkpoint::to_bytes(&sd).unwrap()).unwrap();
    // Ten classes of RGB pictures.
    let folder = dir.path().join("photos");
    for (split, n) in [("train", 2), ("test", 1)] {
        for class in 0..10u8 {
            let d = folder.join(split).join(format!("class{class}"));
            std::fs::create_dir_all(&d).unwrap();
            for k in 0..n {
                let img =
                    image::RgbImage::from_fn(32, 32, |x, y| image::Rgb([class * 20, (x * 8) as u8, (y * 8 + k) as u8]));
                img.save(d.join(format!("{k}.png"))).unwrap();
            }
        }
    }
    let out = dir.path().join("run");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_senet"))
        .args(["train", "--dataset", "folder", "--epochs", "1", "--batch-size", "10", "--init"])
        .arg(&init)
        .arg("--data-dir")
        .arg(&folder)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "train failed: {}{stdout}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("model se-resnet18 width 0.125 reduction 16 (SE widths multiples of 8), SE biases"),
        "{stdout}"
    );
    assert!(stdout.contains("classifier fc has 1000 classes, the data 10: fc is re-initialised"), "{stdout}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let m = &config["model"];
    assert_eq!(
        (&m["model"], &m["se"]["divisor"], &m["se_bias"], &m["num_classes"]),
        (&"se-resnet18".into(), &8.into(), &true.into(), &10.into())
    );
}
