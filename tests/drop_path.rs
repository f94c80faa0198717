//! The drop-path op (src/ops/drop_path/, timm's `drop_path(x, p, training, scale_by_keep=True)`):
//! its kernels against the f64 reference on awkward shapes in f32 and f16, the per-sample mask, the
//! statistics of its draw, the reference gradient, two training steps of an SE-ResNet with
//! `--drop-path` against the reference step (and one `--precision f16` step against the
//! f16-emulating reference), the depth rule of the rates against timm's, and the
//! setting's round trip through config.json.
//!
//! The mask is an integer hash both sides compute identically, so a kept element differs only by
//! the rounding of x / (1 - p): f32, |error| <= 1 ulp of the result (rtol 2.4e-7, taken as 1e-6);
//! f16, half an f16 ulp of the result (2^-11 relative, 4.9e-4) plus the f16 subnormal spacing. A
//! wrong mask or scale is an error of order |x|, orders of magnitude above either.

mod common;

use clap::Parser;
use common::*;
use senet_wgpu::args::{ModelArgs, TrainArgs};
use senet_wgpu::gpu::{Dtype, Tensor};
use senet_wgpu::model::plan::Network;
use senet_wgpu::model::{BottleneckStride, Layer, ModelConfig};
use senet_wgpu::ops::cross_entropy::result;
use senet_wgpu::ops::drop_path::{self, DropPathConfig};
use senet_wgpu::ops::optimizer::OptimizerConfig;
use senet_wgpu::reference;
use senet_wgpu::reference::model::StepOptions;

/// [n, ...]: batch 1, one element per sample, odd sizes, more than one workgroup per sample and
/// samples straddling workgroups.
const SHAPES: [&[usize]; 5] = [&[1, 3, 5, 7], &[9, 1], &[5, 7, 3, 3], &[3, 4099], &[13, 2, 3, 1]];
const PS: [f64; 4] = [0.0, 0.2, 0.5, 0.9];

#[test]
fn drop_path_forward_backward_and_eval_match_the_reference() {
    let gpu = gpu();
    let key = drop_path::step_key(12345, 3);
    for (dtype, atol, rtol) in [(Dtype::F32, 0.0, 1e-6), (Dtype::F16, 3e-8, 4.9e-4)] {
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (n, len) = (shape[0], shape.iter().product::<usize>());
            for &p in &PS {
                let what = format!("{dtype:?} shape {shape:?} p {p}");
                let cfg = DropPathConfig::new(p, &format!("layer{i}.0.drop_path"));
                let (tx, x) = upload_as(&gpu, dtype, shape, &uniform(&mut rng(i as u64), len, -2.0, 2.0));
                let (tdy, dy) = upload_as(&gpu, dtype, shape, &uniform(&mut rng(100 + i as u64), len, -2.0, 2.0));
                let zeros = |label| Tensor::zeros_of(&gpu, label, shape, dtype).expect("allocate");
                let (ty, teval, tdx) = (zeros("y"), zeros("eval"), zeros("dx"));
                let tkey = key_tensor(&gpu, key);
                run(&gpu, &drop_path::drop_path_forward(&gpu, &cfg, &tkey, &tx, &ty, true).unwrap());
                run(&gpu, &drop_path::drop_path_forward(&gpu, &cfg, &tkey, &tx, &teval, false).unwrap());
                run(&gpu, &drop_path::drop_path_backward(&gpu, &cfg, &tkey, &tdy, &tdx).unwrap());
                let want = drop_path::reference::drop_path_forward(&cfg, key, n, &to_f64(&x));
                assert_close(&format!("{what} forward"), &read_as(&gpu, &ty), &want, atol, rtol);
                let want = drop_path::reference::drop_path_backward(&cfg, key, n, &to_f64(&dy));
                assert_close(&format!("{what} backward"), &read_as(&gpu, &tdx), &want, atol, rtol);
                assert_eq!(read_as(&gpu, &teval), x, "{what}: evaluation is the identity");
            }
        }
    }
}

/// The kernel's output, sample by sample, is either the whole sample scaled by 1 / (1 - p) or all
/// zeros (inputs bounded away from 0, so a zero is a drop), and both happen: one draw per sample,
/// not per element. Samples of 37 elements straddle the 256-wide workgroups.
#[test]
fn each_sample_is_kept_whole_or_dropped_whole() {
    let gpu = gpu();
    let (n, per, p) = (64, 37, 0.5);
    let cfg = DropPathConfig::new(p, "layer2.1.drop_path");
    let key = drop_path::step_key(99, 17);
    let x: Vec<f32> = uniform(&mut rng(5), n * per, 0.5, 1.5);
    let tx = upload(&gpu, "x", &[n, per], &x);
    let ty = zeros(&gpu, "y", &[n, per]);
    run(&gpu, &drop_path::drop_path_forward(&gpu, &cfg, &key_tensor(&gpu, key), &tx, &ty, true).unwrap());
    let y = read(&gpu, &ty);
    let mut kept = 0;
    for s in 0..n {
        let (xs, ys) = (&x[s * per..(s + 1) * per], &y[s * per..(s + 1) * per]);
        let zeros = ys.iter().filter(|&&v| v == 0.0).count();
        if zeros == 0 {
            kept += 1;
            for (a, b) in xs.iter().zip(ys) {
                assert!((b / a - 2.0).abs() < 1e-6, "sample {s}: kept, but scaled by {} not 1/(1-p) = 2", b / a);
            }
        } else {
            assert_eq!(zeros, per, "sample {s}: {zeros} of its {per} elements dropped, not all or none");
        }
        assert_eq!(zeros == 0, drop_path::reference::keep(&cfg, key, s), "sample {s}: the reference's draw differs");
    }
    assert!(kept > 0 && kept < n, "p 0.5 over {n} samples kept {kept}: expected some of each");
}

/// Over 2^16 samples the kept fraction is 1 - p within 5 standard deviations; another step,
/// another layer and another seed each draw another mask (two independent masks agree on a
/// fraction p² + (1-p)² of samples, far from all of them).
#[test]
fn the_draw_keeps_one_minus_p_and_differs_per_step_layer_and_seed() {
    let n = 1 << 16;
    for p in [0.1, 0.2, 0.5, 0.9] {
        let mask = |cfg: &DropPathConfig, key| -> Vec<bool> {
            (0..n).map(|s| drop_path::reference::keep(cfg, key, s)).collect()
        };
        let cfg = DropPathConfig::new(p, "layer1.1.drop_path");
        let m = mask(&cfg, drop_path::step_key(7, 1));
        let kept = m.iter().filter(|&&k| k).count() as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((kept - (1.0 - p)).abs() < 5.0 * sd, "p {p}: kept {kept}");
        let agree_independent = p * p + (1.0 - p) * (1.0 - p);
        for (what, other) in [
            ("step", mask(&cfg, drop_path::step_key(7, 2))),
            ("layer", mask(&DropPathConfig::new(p, "layer1.2.drop_path"), drop_path::step_key(7, 1))),
            ("seed", mask(&cfg, drop_path::step_key(8, 1))),
        ] {
            let agree = m.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / n as f64;
            assert!((agree - agree_independent).abs() < 0.01, "p {p}: another {what} agrees on {agree}");
        }
    }
}

#[test]
fn drop_path_refuses_p_outside_0_to_1() {
    let gpu = gpu();
    let (x, y, key) = (zeros(&gpu, "x", &[2, 2]), zeros(&gpu, "y", &[2, 2]), key_tensor(&gpu, [0, 0]));
    for p in [1.0, -0.1, f64::NAN] {
        let e = drop_path::drop_path_forward(&gpu, &DropPathConfig::new(p, "d"), &key, &x, &y, true).unwrap_err();
        assert!(e.to_string().contains("p must be in [0, 1)"), "{e}");
    }
}

/// The reference backward against central finite differences of L = Σ w·drop_path(x) (the mask
/// held fixed by the key): the forward is linear in x, so the differences are exact up to f64
/// rounding of x ± h (1e-9 absolute at h 1e-4). 16 samples of 11: both outcomes occur at p 0.5.
#[test]
fn the_reference_gradient_matches_finite_differences() {
    let (n, per, key, h) = (16, 11, drop_path::step_key(3, 5), 1e-4);
    for p in PS {
        let cfg = DropPathConfig::new(p, "d");
        let x = to_f64(&uniform(&mut rng(7), n * per, -1.0, 1.0));
        let w = to_f64(&uniform(&mut rng(8), n * per, -1.0, 1.0));
        let loss = |x: &[f64]| -> f64 {
            drop_path::reference::drop_path_forward(&cfg, key, n, x).iter().zip(&w).map(|(y, w)| y * w).sum()
        };
        let numeric: Vec<f64> = (0..n * per)
            .map(|i| {
                let (mut a, mut b) = (x.clone(), x.clone());
                a[i] += h;
                b[i] -= h;
                (loss(&a) - loss(&b)) / (2.0 * h)
            })
            .collect();
        let got = drop_path::reference::drop_path_backward(&cfg, key, n, &w);
        for (i, (g, d)) in got.iter().zip(&numeric).enumerate() {
            assert!((g - d).abs() < 1e-9, "p {p} element {i}: backward {g}, finite differences {d}");
        }
    }
}

fn se_resnet(model: &str, drop_path: f64) -> ModelConfig {
    let block = senet_wgpu::model::BlockOptions { drop_path, ..Default::default() };
    ModelConfig { block, ..small_model(model, 0.5, 4, 8, 4) }
}

/// SE-ResNet-8 (one unit per stage) with `--drop-path 0.9`: layer2.0 drops with p 0.45 and
/// layer3.0 with 0.9 (layer1.0: none). Two training steps (two masks) against the reference steps
/// with the same keys, then eval mode (the identity). Tolerances as tests/train_step.rs's
/// residual steps for this model.
#[test]
fn steps_of_an_se_resnet_with_drop_path_equal_the_reference() {
    let gpu = gpu();
    let (n, hw, seed) = (4, 8, 21);
    let cfg = se_resnet("se-resnet8", 0.9);
    let layers: Vec<(String, f64)> = cfg
        .graph()
        .unwrap()
        .nodes
        .iter()
        .filter_map(|node| match node.layer {
            Layer::DropPath(d) => Some((node.name.clone(), d.p)),
            _ => None,
        })
        .collect();
    assert_eq!(layers, [("layer2.0.drop_path".to_string(), 0.45), ("layer3.0.drop_path".to_string(), 0.9)]);
    // The draws these steps make hold both outcomes, so a mask ignored or inverted shows.
    let draws: Vec<bool> = (1..=2u64)
        .flat_map(|step| {
            let layers = &layers;
            (0..n).flat_map(move |s| {
                layers.iter().map(move |(name, p)| {
                    drop_path::reference::keep(&DropPathConfig::new(*p, name), drop_path::step_key(seed, step), s)
                })
            })
        })
        .collect();
    assert!(draws.contains(&true) && draws.contains(&false), "the steps' draws: {draws:?}");
    let opt = OptimizerConfig::sgd(0.1, 0.9);
    let mut net = Network::new(gpu.clone(), cfg, opt, seed).unwrap();
    let plan = net.plan(n).unwrap();
    let labels = [1, 3, 2, 0];
    for step in 1..=2u64 {
        let what = format!("step {step}");
        let x = uniform(&mut rng(40 + step), n * 3 * hw * hw, 0.0, 1.0);
        let (params, buffers) = reference_state(&net);
        let opts = StepOptions { step_key: drop_path::step_key(seed, step), ..StepOptions::default() };
        let want =
            reference::model::train_step_with(&net.graph, &params, &buffers, n, &to_f64(&x), &labels, &opts).unwrap();
        plan.write_batch(&gpu, &x, &labels).unwrap();
        net.train_step(&plan);
        gpu.wait().unwrap();
        let res = read(&gpu, &plan.train_result);
        assert_close(&format!("{what} loss"), &[res[result::LOSS]], &[want.loss], 1e-5, 1e-4);
        assert_close(&format!("{what} logits"), &read(&gpu, plan.logits()), &want.logits, 1e-4, 1e-4);
        for p in &net.params {
            let name = &p.spec.name;
            assert_close(&format!("{what} grad {name}"), &read(&gpu, &p.grad), &want.grads[name], 2e-4, 1e-3);
        }
    }
    let x = uniform(&mut rng(50), n * 3 * hw * hw, 0.0, 1.0);
    let (params, buffers) = reference_state(&net);
    let want = reference::model::eval_forward(&net.graph, &params, &buffers, n, &to_f64(&x)).unwrap();
    plan.write_batch(&gpu, &x, &[0; 4]).unwrap();
    net.eval_batch(&plan);
    gpu.wait().unwrap();
    assert_close("eval logits", &read(&gpu, plan.logits()), &want, 1e-4, 1e-4);
}

/// One `--precision f16` step of SE-ResNet-8 with `--drop-path 0.9` (layer2.0 p 0.45, layer3.0 p
/// 0.9) against the f64 reference step emulating f16 storage (`StepOptions { precision: F16,
/// loss_scale, step_key }`: input, conv weights, every activation and activation gradient rounded to
/// f16 where the plan stores them, the loss gradient scaled by the loss scale), with the same step
/// key and so the same per-sample masks, which hold both outcomes. The drop path itself is exact in
/// both (a kept sample scaled by 1 / (1 − p) and rounded to f16 once, a dropped one 0), so the
/// tolerances are tests/train_step.rs's `an_f16_step_matches_the_f16_reference_step` for this model:
/// f32 against f64 arithmetic now and then moves a stored value across an f16 rounding boundary,
/// which batch norm's cancellation enlarges in the gradients: each gradient tensor within 2e-2 (L2,
/// relative), their median within 2e-3, the loss within 1e-4 relative (measured here: median 7.0e-5,
/// worst 1.05e-3, the loss equal to 6 digits). A wrong mask (another key,
/// another sample) zeroes or keeps a whole sample's branch: errors of order 1 (printed by the plant
/// that used the next step's key).
///
/// The plan is the unfused one (`--fuse off`): the f16 reference rounds to f16 after every op,
/// as the unfused kernels do, while a fused SE + addition + ReLU skips the rounding of x·s
/// (docs/performance.md, "Fused epilogues"). With drop-path's 1/(1 − p) scaling that one rounding
/// moves this step's gradients by ~1e-2 (median, measured), so the fused f16 kernels are checked
/// against the unfused ones in tests/fusion.rs, and the fused plan with drop-path in f32 above.
#[test]
fn an_f16_step_with_drop_path_matches_the_f16_reference_step() {
    use senet_wgpu::gpu::Precision;
    let gpu = gpu_unfused();
    let (n, hw, seed) = (8, 8, 21);
    let cfg = se_resnet("se-resnet8", 0.9);
    let layers = drop_paths(&cfg);
    let key = drop_path::step_key(seed, 1);
    let draws: Vec<bool> = (0..n)
        .flat_map(|s| {
            layers.iter().map(move |(name, p)| drop_path::reference::keep(&DropPathConfig::new(*p, name), key, s))
        })
        .collect();
    assert!(draws.contains(&true) && draws.contains(&false), "the step's draws: {draws:?}");
    let mut net = Network::new_in(gpu.clone(), cfg, OptimizerConfig::sgd(0.0, 0.0), seed, Precision::F16).unwrap();
    let plan = net.plan(n).unwrap();
    assert_eq!(plan.acts[1].dtype, Dtype::F16, "f16 activations");
    let scale = f64::from(net.scaler.as_ref().unwrap().read(&gpu).unwrap().scale);
    let x = uniform(&mut rng(60), n * 3 * hw * hw, 0.0, 1.0);
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
    let (params, buffers) = reference_state(&net);
    let opts = StepOptions { precision: Precision::F16, loss_scale: scale, step_key: key, ..StepOptions::default() };
    let want =
        reference::model::train_step_with(&net.graph, &params, &buffers, n, &to_f64(&x), &labels, &opts).unwrap();
    plan.write_batch(&gpu, &x, &labels).unwrap();
    net.train_step(&plan);
    gpu.wait().unwrap();
    let loss = f64::from(read(&gpu, &plan.train_result)[result::LOSS]);
    assert!((loss - want.loss).abs() < 1e-4 * want.loss, "f16 loss {loss} vs the f16 reference's {}", want.loss);
    let mut errs = Vec::new();
    for p in &net.params {
        let name = &p.spec.name;
        let (a, got) = (&want.grads[name], read(&gpu, &p.grad));
        let norm = a.iter().map(|v| v * v).sum::<f64>().sqrt();
        // A gradient that is zero up to rounding (a conv bias before a batch norm) has no relative size.
        if norm < 1e-5 {
            continue;
        }
        let diff = a.iter().zip(&got).map(|(&u, &v)| (u - f64::from(v) / scale).powi(2)).sum::<f64>().sqrt();
        let rel = diff / norm;
        assert!(rel < 2e-2, "gradient of {name} off by {rel:.2e} (L2, relative) from the f16 reference");
        errs.push((rel, name.clone()));
    }
    errs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (median, worst) = (errs[errs.len() / 2].0, errs.last().unwrap());
    assert!(median < 2e-3, "median gradient error {median:.2e} from the f16 reference");
    eprintln!(
        "f16 drop-path step vs the f16 reference: loss {loss:.6} / {:.6}, median gradient error {median:.2e}, worst {:.2e} ({}), {} tensors",
        want.loss,
        worst.0,
        worst.1,
        errs.len()
    );
}

/// The DropPath nodes of a built model: (name, p), in graph order.
fn drop_paths(cfg: &ModelConfig) -> Vec<(String, f64)> {
    let graph = cfg.graph().unwrap_or_else(|e| panic!("{}: {e:#}", cfg.model));
    graph
        .nodes
        .iter()
        .filter_map(|node| match node.layer {
            Layer::DropPath(d) => Some((node.name.clone(), d.p)),
            _ => None,
        })
        .collect()
}

/// The rates against timm 1.0.31's, printed by Python (the exact f64s of
/// `drop_path_rate * net_block_idx / (net_num_blocks - 1)`):
/// `[(n, m.drop_prob) for n, m in timm.create_model("seresnet50", drop_path_rate=0.2)
/// .named_modules() if type(m).__name__ == "DropPath"]`, the same for "seresnext50_32x4d" and
/// "resnet18" (0.1), and for the CIFAR SE-ResNet-20 (timm has none) `timm.models.resnet.make_blocks`
/// with three stages of three BasicBlocks, drop_path_rate=0.1. The first unit has no node, as in
/// timm (`DropPath(block_dpr) if block_dpr > 0. else None`), and the node sits where timm's
/// `self.drop_path` does: after the SE block, before the addition.
#[test]
fn the_rates_rise_with_depth_as_timms() {
    let with = |model: &str, p: f64| ModelConfig { input_hw: [32, 32], ..se_resnet(model, p) };
    let named = |v: &[(&str, f64)]| -> Vec<(String, f64)> { v.iter().map(|(n, p)| (n.to_string(), *p)).collect() };
    let cifar = drop_paths(&with("se-resnet20", 0.1));
    assert_eq!(
        cifar,
        named(&[
            ("layer1.1.drop_path", 0.0125),
            ("layer1.2.drop_path", 0.025),
            ("layer2.0.drop_path", 0.037500000000000006),
            ("layer2.1.drop_path", 0.05),
            ("layer2.2.drop_path", 0.0625),
            ("layer3.0.drop_path", 0.07500000000000001),
            ("layer3.1.drop_path", 0.08750000000000001),
            ("layer3.2.drop_path", 0.1),
        ])
    );
    let r18 = drop_paths(&with("resnet18", 0.1));
    assert_eq!(r18[0], ("layer1.1.drop_path".to_string(), 0.014285714285714287));
    assert_eq!(r18[2], ("layer2.1.drop_path".to_string(), 0.042857142857142864));
    assert_eq!(r18[6], ("layer4.1.drop_path".to_string(), 0.1));
    let r50 = drop_paths(&with("se-resnet50", 0.2));
    assert_eq!(r50.len(), 15);
    assert_eq!(
        r50[..5],
        named(&[
            ("layer1.1.drop_path", 0.013333333333333334),
            ("layer1.2.drop_path", 0.02666666666666667),
            ("layer2.0.drop_path", 0.04000000000000001),
            ("layer2.1.drop_path", 0.05333333333333334),
            ("layer2.2.drop_path", 0.06666666666666667),
        ])
    );
    let rx = drop_paths(&ModelConfig { width: 0.125, ..with("se-resnext50-32x4d", 0.2) });
    assert_eq!(rx[13..], named(&[("layer4.1.drop_path", 0.18666666666666668), ("layer4.2.drop_path", 0.2)]));
    // Where it sits: the SE block, then the drop path, then the addition.
    let g = with("se-resnet20", 0.1).graph().unwrap();
    let at = g.nodes.iter().position(|n| n.name == "layer2.1.drop_path").expect("layer2.1.drop_path");
    assert_eq!(g.nodes[at].inputs, [at], "reads the node before it");
    assert_eq!(g.nodes[at - 1].name, "layer2.1.se");
    assert_eq!(g.nodes[at + 1].name, "layer2.1.add");
    assert_eq!(g.nodes[at + 1].inputs[0], at + 1, "the addition reads the drop path");
    // P = 0: no node, the graph of a configuration without the setting.
    assert!(drop_paths(&with("se-resnet20", 0.0)).is_empty());
    assert_eq!(g.parameters(), with("se-resnet20", 0.0).graph().unwrap().parameters(), "no parameters added");
}

/// `--drop-path`: a range error and the families without stochastic depth refuse it, naming the
/// flag (and config.json's field when a graph is built from one).
#[test]
fn drop_path_is_refused_where_it_does_not_apply() {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        model: ModelArgs,
    }
    let err = |args: &[&str]| -> String {
        let cli = Cli::try_parse_from(std::iter::once("senet").chain(args.iter().copied())).expect("parses");
        format!("{:#}", cli.model.validate().expect_err("refused"))
    };
    for p in ["1", "-0.1", "1.5"] {
        let e = err(&["--model", "se-resnet20", &format!("--drop-path={p}")]);
        assert!(e.contains("--drop-path must be in [0, 1)"), "{e}");
    }
    for model in ["senet", "senet154"] {
        let e = err(&["--model", model, "--drop-path", "0.1"]);
        assert!(e.contains("--drop-path 0.1 does not apply to") && e.contains(model), "{e}");
    }
    let e = format!("{:#}", ModelConfig { width: 1.0 / 16.0, ..se_resnet("senet", 0.1) }.graph().unwrap_err());
    assert!(e.contains("block.drop_path 0.1 does not apply to senet"), "{e}");
    let e = format!("{:#}", se_resnet("se-resnet20", 1.0).graph().unwrap_err());
    assert!(e.contains("block.drop_path must be in [0, 1)"), "{e}");
}

/// config.json: `model` (ModelConfig) and `train` (TrainArgs, which --resume reads) carry the
/// rate and read it back; without it they are written as before (no field), and files written
/// before it existed read as 0.
#[test]
fn the_rate_round_trips_through_config_json() {
    let cfg = se_resnet("se-resnet20", 0.1);
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(json.contains(r#""block":{"stride":"1x1","drop_path":0.1}"#), "{json}");
    assert_eq!(serde_json::from_str::<ModelConfig>(&json).unwrap(), cfg);
    let off = serde_json::to_string(&se_resnet("se-resnet20", 0.0)).unwrap();
    assert!(!off.contains("block") && !off.contains("drop_path"), "written as before: {off}");
    assert_eq!(serde_json::from_str::<ModelConfig>(&off).unwrap().block.drop_path, 0.0);
    let mut timm_stride = se_resnet("se-resnet50", 0.0);
    timm_stride.block.stride = BottleneckStride::Conv3x3;
    let json = serde_json::to_string(&timm_stride).unwrap();
    assert!(json.contains(r#""block":{"stride":"3x3"}}"#), "written as before: {json}");

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }
    let parse = |args: &[&str]| Cli::try_parse_from(std::iter::once("senet").chain(args.iter().copied())).unwrap();
    let on = parse(&["--model", "se-resnet20", "--drop-path", "0.05"]).train;
    let text = serde_json::to_string(&on).unwrap();
    let back: TrainArgs = serde_json::from_str(&text).unwrap();
    assert_eq!(back.net.drop_path, 0.05);
    assert_eq!(back.net.config(3, [32, 32], 10, vec![]).block.drop_path, 0.05);
    let plain = serde_json::to_string(&parse(&["--model", "se-resnet20"]).train).unwrap();
    assert!(!plain.contains("drop_path"), "written as before: {plain}");
    let back: TrainArgs = serde_json::from_str(&plain).unwrap();
    assert_eq!(back.net.drop_path, 0.0);
}
