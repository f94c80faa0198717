//! Whole-run fidelity: K = 300 Adam steps from one initial state over one fixed sequence of
//! batches, four ways — PyTorch float64 and float32 (`scripts/torch_divergence.py`, its snapshots
//! committed in tests/golden/divergence), our GPU step (f32) and our CPU reference (f64) — and
//! how far the parameters drift from PyTorch float64 as the steps go by.
//!
//! Training is chaotic: any rounding difference grows roughly exponentially with the steps, so
//! PyTorch float32 itself drifts away from float64. That drift is the yardstick. Our f32 GPU step
//! may drift no faster than PyTorch float32 does (within a stated factor); a kernel with a
//! systematic error (a biased reduction, a low-precision exp, a wrong count) drifts faster. The
//! f64 reference must stay on PyTorch float64's trajectory to ~1e-9: that certifies the oracle.
//!
//! Model and data: base SENet at width 1/16 on the first 1,024 training images of the bundled
//! Fashion-MNIST sample (1×28×28, pixels/255), batch 16, Adam lr 1e-3, train mode.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use senet_wgpu::checkpoint;
use senet_wgpu::data::{self, DatasetKind};
use senet_wgpu::model::plan::Network;
use senet_wgpu::model::{Conv2d, ModelConfig};
use senet_wgpu::ops::optimizer::OptimizerConfig;
use senet_wgpu::reference;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/divergence");
const POOL: usize = 1024;
const LR: f64 = 1e-3;

/// How much faster than PyTorch float32 our GPU step may drift from PyTorch float64: the relative
/// distance (parameters; running statistics) may be at most this multiple of PyTorch float32's.
/// Two f32 implementations with different, unbiased summation orders land at different distances
/// from the f64 path; on lavapipe the ratio is 1.00 after 50 steps and 0.79 after 300 (the table
/// the test prints). 4 leaves room for another adapter's rounding; a systematic error is far
/// outside it. Planted, each failing at step 50: the SE gate rounded to multiples of 1/1024
/// (ratio 93,655 at step 50, 1.85 at step 300) and BN's 1/std scaled by 1 + 4e-6 (42,697; 1.55).
/// Chaos saturates both paths by the end, which is why the first snapshot carries the test.
const FACTOR: f64 = 4.0;

/// The f64 reference may stray from PyTorch float64 by this relative distance (parameters and
/// running statistics) at any snapshot. Measured: 1.3e-14 after 50 steps, 3.2e-14 after 300 —
/// f64 rounding amplified by the same chaos that takes f32's 2e-7 to 4e-2. Before this test
/// existed the reference used BN's eps and momentum rounded to f32 (1e-5f32, 0.1f32) and sat at
/// 5e-9 on the running statistics: 1e-11 catches an oracle error of that size.
const REF_TOL: f64 = 1e-11;

fn config(width: f64) -> ModelConfig {
    ModelConfig {
        model: "senet".into(),
        width,
        reduction: 16,
        in_channels: 1,
        num_classes: 10,
        input_hw: [28, 28],
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
        block: Default::default(),
    }
}

/// Every tensor of a golden file as (shape, f64 values).
/// The golden folder; `SENET_DIVERGENCE_DIR` points the test at another run of the script (a
/// larger batch, say) for experiments.
fn dir() -> std::path::PathBuf {
    std::env::var_os("SENET_DIVERGENCE_DIR").map_or_else(|| Path::new(DIR).to_path_buf(), Into::into)
}

fn load(name: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    load_golden(&dir().join(name))
}

type Tensors = HashMap<String, Vec<f64>>;

/// x <= bound, false for NaN.
fn within(x: f64, bound: f64) -> bool {
    x <= bound
}

/// ||a - b|| / ||b|| over every named tensor of `b` together, and the tensor whose own relative
/// distance is largest.
fn drift(a: &Tensors, b: &Tensors) -> (f64, String, f64) {
    let (mut num, mut den) = (0.0, 0.0);
    let mut worst = (String::new(), 0.0);
    let mut names: Vec<&String> = b.keys().collect();
    names.sort();
    for name in names {
        let (x, y) = (&a[name], &b[name]);
        assert_eq!(x.len(), y.len(), "{name}");
        let d: f64 = x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum();
        let n: f64 = y.iter().map(|q| q * q).sum();
        num += d;
        den += n;
        let rel = (d / n.max(1e-30)).sqrt();
        if rel > worst.1 {
            worst = (name.clone(), rel);
        }
    }
    ((num / den).sqrt(), worst.0, worst.1)
}

/// A state split by what it does to the network's function.
///
/// A conv bias that feeds a batch norm directly is a *gauge* direction: the BN subtracts it again,
/// its exact gradient is 0, and what any implementation computes for it is rounding noise — which
/// Adam, dividing by sqrt(v) + 1e-8, turns into steps of up to lr. Those biases random-walk apart
/// between any two implementations (PyTorch float32 against float64: 7 % after 50 steps, while
/// every other parameter agrees to 2e-7), and so does that BN's running mean, which averages the
/// walking bias over the last ~10 steps. Both are kept out of the two distances the test bounds
/// and reported on their own; the running variances (shift-invariant) and the other running
/// means are the statistics compared.
struct Split {
    params: Tensors,
    stats: Tensors,
    gauge: Tensors,
}

fn split(state: &Tensors, graph: &senet_wgpu::model::Graph) -> Split {
    use senet_wgpu::model::Layer;
    let consumers = graph.consumers();
    let mut gauge = Vec::new();
    for (k, node) in graph.nodes.iter().enumerate() {
        if let (Layer::Conv2d(Conv2d { bias: true, .. }), [j]) = (&node.layer, &consumers[k + 1][..])
            && matches!(graph.nodes[*j].layer, Layer::BatchNorm2d(_))
        {
            gauge.push(format!("{}.bias", node.name));
            gauge.push(format!("{}.running_mean", graph.nodes[*j].name));
        }
    }
    let mut out = Split { params: Tensors::new(), stats: Tensors::new(), gauge: Tensors::new() };
    for (name, v) in state {
        let to = if gauge.contains(name) {
            &mut out.gauge
        } else if name.ends_with(".running_mean") || name.ends_with(".running_var") {
            &mut out.stats
        } else {
            &mut out.params
        };
        to.insert(name.clone(), v.clone());
    }
    out
}

#[test]
fn three_hundred_steps_drift_from_pytorch_float64_no_faster_than_pytorch_float32() {
    let init = checkpoint::load(&dir().join("init.safetensors")).unwrap();
    // The width the script used (1/16 for the committed golden): the first conv's 64*width outputs.
    let width = init["features.0.weight"].shape[0] as f64 / 64.0;
    // Experiments only (a larger model or batch): SENET_DIVERGENCE_NO_REF=1 skips the f64
    // reference, SENET_DIVERGENCE_SAVE=FILE writes our final state dict for evaluation.
    let with_ref = std::env::var_os("SENET_DIVERGENCE_NO_REF").is_none();
    let run = load("run.safetensors");
    // K steps of BATCH images (the batches' shape), snapshots at the steps the file holds.
    let (k_steps, batch_size) = (run["batches"].0[0], run["batches"].0[1]);
    let mut snaps: Vec<usize> =
        run.keys().filter_map(|k| k.strip_prefix("f64.")?.split('.').next()?.parse().ok()).collect();
    snaps.sort();
    snaps.dedup();
    assert!(snaps.len() >= 2 && snaps[snaps.len() - 1] == k_steps, "snapshots {snaps:?} of {k_steps} steps");

    // The data: the pool as the script read it (pixels/255 in f32), checked by its sum.
    let mut sample = data::load(DatasetKind::Sample, None, Default::default()).unwrap().train;
    let pool = run["batches"].1.iter().fold(0.0f64, |a, &b| a.max(b)) as usize + 1;
    assert!(pool >= POOL, "the batches draw from {pool} images");
    sample.truncate(pool);
    let x: Vec<f32> = sample.images.iter().map(|&v| f32::from(v) / 255.0).collect();
    let x_sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
    assert!((x_sum - run["x_sum"].1[0]).abs() < 1e-6, "pool pixel sum {x_sum} != the script's {}", run["x_sum"].1[0]);
    let image = 28 * 28;
    let batches: Vec<Vec<usize>> =
        run["batches"].1.chunks(batch_size).map(|b| b.iter().map(|&i| i as usize).collect()).collect();
    let batch = |s: usize| -> (Vec<f32>, Vec<u32>) {
        let idx = &batches[s];
        let xb = idx.iter().flat_map(|&i| x[i * image..][..image].iter().copied()).collect();
        (xb, idx.iter().map(|&i| sample.labels[i]).collect())
    };
    // PyTorch's state at step s, float64 or float32.
    let snapshot = |tag: &str, s: usize, names: &[String]| -> Tensors {
        names.iter().map(|n| (n.clone(), run[&format!("{tag}.{s}.{n}")].1.clone())).collect()
    };

    // Ours on the GPU, f32.
    let gpu = gpu();
    let mut net = Network::new(gpu.clone(), config(width), OptimizerConfig::adam(LR), 0).unwrap();
    checkpoint::apply(&mut net, &init, "divergence init").unwrap();
    let plan = net.plan(batch_size).unwrap();
    let param_names: Vec<String> = net.params.iter().map(|p| p.spec.name.clone()).collect();
    let buffer_names: Vec<String> =
        net.bn.iter().flat_map(|b| [format!("{}.running_mean", b.name), format!("{}.running_var", b.name)]).collect();

    // Ours on the CPU, f64: the reference step and the reference Adam from the same state.
    let graph = config(width).graph().unwrap();
    let init_f64 = |n: &String| match &init[n.as_str()].value {
        checkpoint::Value::F32(v) => to_f64(v),
        checkpoint::Value::I64(_) => panic!("{n} is not float32 in init.safetensors"),
    };
    let mut ref_params: HashMap<String, Vec<f64>> = param_names.iter().map(|n| (n.clone(), init_f64(n))).collect();
    let mut ref_buffers: HashMap<String, Vec<f64>> = buffer_names.iter().map(|n| (n.clone(), init_f64(n))).collect();
    let mut ref_state: HashMap<String, Vec<Vec<f64>>> =
        param_names.iter().map(|n| (n.clone(), vec![vec![0.0; ref_params[n].len()]; 2])).collect();
    let adam = OptimizerConfig::adam(LR);

    let (loss64, loss32) = (&run["loss64"].1, &run["loss32"].1);
    let (mut worst_loss_gpu, mut worst_loss_ref) = (0.0f64, 0.0f64);
    let mut table = vec![format!(
        "{:>5} {:>10} {:>10} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}  worst GPU tensor",
        "step", "torch f32", "ours GPU", "ratio", "ours f64", "stats t32", "stats GPU", "gauge t32", "gauge GPU"
    )];
    let mut failures = Vec::new();
    for (s, &want_loss) in loss64.iter().enumerate() {
        let (xb, yb) = batch(s);
        plan.write_batch(&gpu, &xb, &yb).unwrap();
        net.train_step(&plan);
        gpu.wait().unwrap();
        let per_sample = read(&gpu, &plan.per_sample);
        let gpu_loss: f64 =
            per_sample.chunks(senet_wgpu::ops::cross_entropy::per_sample::LEN).map(|r| f64::from(r[0])).sum::<f64>()
                / batch_size as f64;

        worst_loss_gpu = worst_loss_gpu.max((gpu_loss - want_loss).abs());
        if with_ref {
            let want =
                reference::model::train_step(&graph, &ref_params, &ref_buffers, batch_size, &to_f64(&xb), &yb).unwrap();
            for n in &param_names {
                let p = ref_params.get_mut(n).unwrap();
                let state = ref_state.get_mut(n).unwrap();
                reference::optimizer::optimizer_step(&adam, s as u64 + 1, p, &want.grads[n], state);
            }
            ref_buffers = want.buffers;
            worst_loss_ref = worst_loss_ref.max((want.loss - want_loss).abs());
        }

        let step = s + 1;
        if !snaps.contains(&step) {
            continue;
        }
        let mut ours: Tensors =
            net.params.iter().map(|p| (p.spec.name.clone(), to_f64(&read(&gpu, &p.value)))).collect();
        for b in &net.bn {
            ours.insert(format!("{}.running_mean", b.name), to_f64(&read(&gpu, &b.running_mean)));
            ours.insert(format!("{}.running_var", b.name), to_f64(&read(&gpu, &b.running_var)));
        }
        let mut ours_ref = ref_params.clone();
        ours_ref.extend(ref_buffers.iter().map(|(k, v)| (k.clone(), v.clone())));
        let all: Vec<String> = param_names.iter().chain(&buffer_names).cloned().collect();
        let (t64, t32) = (split(&snapshot("f64", step, &all), &graph), split(&snapshot("f32", step, &all), &graph));
        let (ours, ours_ref) = (split(&ours, &graph), split(&ours_ref, &graph));
        let (d32, _, _) = drift(&t32.params, &t64.params);
        let (dgpu, worst, worst_rel) = drift(&ours.params, &t64.params);
        let (dref, _, _) = drift(&ours_ref.params, &t64.params);
        let (dref_stats, _, _) = drift(&ours_ref.stats, &t64.stats);
        let (d32_stats, _, _) = drift(&t32.stats, &t64.stats);
        let (dgpu_stats, _, _) = drift(&ours.stats, &t64.stats);
        let (d32_gauge, _, _) = drift(&t32.gauge, &t64.gauge);
        let (dgpu_gauge, _, _) = drift(&ours.gauge, &t64.gauge);
        table.push(format!(
            "{step:>5} {d32:>10.3e} {dgpu:>10.3e} {:>6.2} {dref:>10.3e} {d32_stats:>10.3e} {dgpu_stats:>10.3e} \
             {d32_gauge:>10.3e} {dgpu_gauge:>10.3e}  {worst} {worst_rel:.2e}",
            dgpu / d32
        ));
        // Bounded where the comparison means something on any adapter: at the first snapshot,
        // where both f32 paths are still at their per-step rounding level, and at the end, where
        // chaos has taken both to the same plateau. In between, the drift moves in jumps (a max-pool
        // window or a ReLU flipping for one image) whose timing is itself chance: printed, not bounded.
        let bounded = step == snaps[0] || step == k_steps;
        if step == snaps[0] && with_ref {
            // The first snapshot carries the test: it must come before chaos has taken PyTorch
            // float32 away from float64 (2e-7 after 50 steps here), else any error would hide.
            assert!(
                step <= 50 && d32 < 1e-5,
                "the first snapshot (step {step}, PyTorch float32 drift {d32:.1e}) comes too late to test anything"
            );
            // Each tensor on its own, so an error in a small one (a bias, an SE layer) is not
            // diluted by the large ones: within FACTOR of PyTorch float32's drift of the same
            // tensor, or of 1e-6 where that is smaller (single-ulp noise in a few values).
            for (name, want) in &t64.params {
                let rel = |a: &Tensors| {
                    let d: f64 = a[name].iter().zip(want).map(|(p, q)| (p - q) * (p - q)).sum();
                    (d / want.iter().map(|q| q * q).sum::<f64>().max(1e-30)).sqrt()
                };
                let (mine, theirs) = (rel(&ours.params), rel(&t32.params));
                if !within(mine, FACTOR * theirs.max(1e-6)) {
                    failures.push(format!("step {step}: {name} drifts {mine:.3e}, PyTorch float32 {theirs:.3e}"));
                }
            }
        }
        // The gauge biases random-walk on rounding noise (see Split); a bound 10x looser than the
        // others still catches a BN running-mean update gone wrong, which only they carry here.
        if bounded && !within(dgpu_gauge, 10.0 * FACTOR * d32_gauge) {
            failures.push(format!(
                "step {step}: gauge drift {dgpu_gauge:.3e} > {} x PyTorch float32's {d32_gauge:.3e}",
                10.0 * FACTOR
            ));
        }
        if bounded && !within(dgpu, FACTOR * d32) {
            failures.push(format!("step {step}: GPU drift {dgpu:.3e} > {FACTOR} x PyTorch float32's {d32:.3e}"));
        }
        if bounded && !within(dgpu_stats, FACTOR * d32_stats) {
            failures.push(format!(
                "step {step}: GPU running-statistics drift {dgpu_stats:.3e} > {FACTOR} x PyTorch float32's {d32_stats:.3e}"
            ));
        }
        if with_ref && !(within(dref, REF_TOL) && within(dref_stats, REF_TOL)) {
            failures.push(format!(
                "step {step}: f64 reference drift {dref:.3e} (statistics {dref_stats:.3e}) > {REF_TOL:e}"
            ));
        }
    }
    if let Some(path) = std::env::var_os("SENET_DIVERGENCE_SAVE") {
        checkpoint::save(&net, Path::new(&path)).unwrap();
    }
    if !with_ref {
        println!("{}", table.join("\n"));
    }
    assert!(with_ref, "SENET_DIVERGENCE_NO_REF is for experiments: nothing was compared");
    let worst_loss32 = loss32.iter().zip(loss64).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    table.push(format!(
        "largest per-step loss difference from PyTorch float64: torch f32 {worst_loss32:.3e}, ours GPU \
         {worst_loss_gpu:.3e}, ours f64 {worst_loss_ref:.3e}; loss {:.4} -> {:.4}",
        loss64[0],
        loss64[k_steps - 1]
    ));
    // Per-step losses: a plain bound as a second, independent look (the drift above is the test).
    if !within(worst_loss_ref, REF_TOL) {
        failures.push(format!("f64 reference loss strays {worst_loss_ref:.3e} from PyTorch float64's"));
    }
    eprintln!("relative distance from PyTorch float64 (parameters; BN running statistics; gauge biases):");
    for line in &table {
        eprintln!("{line}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
