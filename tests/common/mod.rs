//! Shared test helpers: the one GPU, seeded random data, and the llm.c-style checker.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use senet_wgpu::gpu::{Gpu, GpuOptions, Subgroups, Tensor};
use senet_wgpu::ops::conv2d::Conv2dConfig;

/// A test device with `opts`, tuning off, created once per test binary in `cell`: the error as
/// text where there is none.
/// Tuning is off (below); the sliced batch norms (`--bn-split`) are off unless a test asks for
/// them (should auto turn them on for some adapter): they sum in another order than the one-pass kernels, and a fused
/// epilogue (a bias gradient, a pool) keeps a batch norm in one pass, so plans a test compares bit
/// for bit would differ by where slicing applies. The sliced kernels have tests of their own
/// (tests/kernels/batch_norm.rs, tests/fusion.rs `sliced_batch_norms_keep_the_step`).
fn device(cell: &'static Cell, opts: GpuOptions) -> Result<Arc<Gpu>, String> {
    let bn_split = match opts.bn_split {
        senet_wgpu::gpu::Switch::Auto => senet_wgpu::gpu::Switch::Off,
        s => s,
    };
    let opts = GpuOptions { tune: Some(senet_wgpu::gpu::tune::TuneMode::Off), bn_split, ..opts };
    cell.get_or_init(|| Gpu::new(&opts).map_err(|e| format!("{e:#}"))).clone()
}

type Cell = OnceLock<Result<Arc<Gpu>, String>>;

/// `device`, or the panic every GPU test fails with where it cannot run.
fn required(cell: &'static Cell, opts: GpuOptions) -> Arc<Gpu> {
    device(cell, opts).unwrap_or_else(|e| panic!("GPU test cannot run: {e}"))
}

/// The device every GPU test runs on, created once per test binary. With no adapter every GPU
/// test fails with the adapter error: they never pass by skipping. Tuning is off, so the kernels
/// a test exercises never depend on timing or on a cache file left by another run (tests/tune.rs
/// covers the tuner and the kernels it may pick).
pub fn gpu() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    required(&GPU, GpuOptions::default())
}

/// The same adapter as `gpu()`, whose plans fuse only the batch norm's ReLU (`--fuse off`).
pub fn gpu_unfused() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    required(&GPU, GpuOptions { fuse: senet_wgpu::gpu::Fuse::Off, ..Default::default() })
}

/// `gpu_unfused()` with SE blocks in one workgroup per sample on any adapter (`--se-split off`).
pub fn gpu_unfused_se_one_pass() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    let opts =
        GpuOptions { fuse: senet_wgpu::gpu::Fuse::Off, se_split: senet_wgpu::gpu::Switch::Off, ..Default::default() };
    required(&GPU, opts)
}

/// The same adapter with every fusion but the batch norms' statistics from the convolutions
/// before them (which keep a batch norm's forward in one pass), its training batch norms sliced
/// over workgroups (`--bn-split on`) or not: [on].
pub fn gpu_bn_split(on: bool) -> Arc<Gpu> {
    static GPU: [Cell; 2] = [OnceLock::new(), OnceLock::new()];
    let opts = GpuOptions {
        bn_stats: senet_wgpu::gpu::ConvForm::Off,
        bn_split: if on { senet_wgpu::gpu::Switch::On } else { senet_wgpu::gpu::Switch::Off },
        ..Default::default()
    };
    required(&GPU[usize::from(on)], opts)
}

/// The same adapter with every fusion but the batch norms' statistics from the convolutions
/// before them (`--bn-stats off`): its fused plans keep the unfused arithmetic bit for bit.
pub fn gpu_without_bn_stats() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    required(&GPU, GpuOptions { bn_stats: senet_wgpu::gpu::ConvForm::Off, ..Default::default() })
}

/// The same adapter as `gpu_without_bn_stats()` whose fused plans run a convolution's two
/// gradients as one dispatch wherever the register kernels run both (`--joint-backward on`). Its
/// f16 plans keep to the register kernels (`--coop off`): on an adapter with cooperative matrices
/// an f16 plan's convolutions would run those, which have no joint form, and nothing joint would
/// be tested.
pub fn gpu_with_joint_backward() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    let opts = GpuOptions {
        bn_stats: senet_wgpu::gpu::ConvForm::Off,
        joint_backward: senet_wgpu::gpu::Switch::On,
        coop: senet_wgpu::gpu::Switch::Off,
        ..Default::default()
    };
    required(&GPU, opts)
}

/// `gpu_with_joint_backward()` with the two gradients apart (`--joint-backward off`).
pub fn gpu_with_separate_backward() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    let opts = GpuOptions {
        bn_stats: senet_wgpu::gpu::ConvForm::Off,
        joint_backward: senet_wgpu::gpu::Switch::Off,
        coop: senet_wgpu::gpu::Switch::Off,
        ..Default::default()
    };
    required(&GPU, opts)
}

/// The same adapter with reductions on workgroup-memory trees (no subgroups).
pub fn gpu_without_subgroups() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    required(&GPU, GpuOptions { subgroups: Some(Subgroups::Off), ..Default::default() })
}

/// The same adapter whose register convolutions load every value in every lane
/// (`--conv-lanes off`), for comparing against the shared loads of `gpu_with_lanes()`.
pub fn gpu_without_lanes() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    required(&GPU, GpuOptions { conv_lanes: senet_wgpu::gpu::Switch::Off, ..Default::default() })
}

/// The same adapter whose 1x1 convolutions run the register GEMM's general form
/// (`--conv-1x1 off`), for comparing against the 1x1 form `gpu()` runs.
pub fn gpu_without_plain() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    required(&GPU, GpuOptions { conv_1x1: senet_wgpu::gpu::ConvForm::Off, ..Default::default() })
}

/// The same adapter whose 3-wide convolutions run the register GEMM's general form
/// (`--conv-3x3 off`), for comparing against the 3-wide form `gpu()` runs.
pub fn gpu_without_row3() -> Arc<Gpu> {
    static GPU: Cell = OnceLock::new();
    required(&GPU, GpuOptions { conv_3x3: senet_wgpu::gpu::ConvForm::Off, ..Default::default() })
}

/// The same adapter with the shared conv loads forced on (`--conv-lanes on`), on any adapter whose
/// subgroups allow them (8 to 64 lanes), GPU or CPU. `None` where they do not.
pub fn gpu_with_lanes() -> Option<Arc<Gpu>> {
    static GPU: Cell = OnceLock::new();
    device(&GPU, GpuOptions { conv_lanes: senet_wgpu::gpu::Switch::On, ..Default::default() }).ok()
}

/// Both reduction paths for the kernels that reduce: the default device, which must use
/// subgroups (lavapipe has them; set SENET_TEST_NO_SUBGROUPS=1 on an adapter without, and only
/// the workgroup path is tested), and the same adapter without them.
pub fn gpus() -> Vec<(&'static str, Arc<Gpu>)> {
    let with = gpu();
    let without = gpu_without_subgroups();
    assert!(!without.subgroups, "SENET_SUBGROUPS=off must turn subgroups off");
    if std::env::var_os("SENET_TEST_NO_SUBGROUPS").is_some() {
        return vec![("workgroup trees", without)];
    }
    assert!(
        with.subgroups,
        "{} has no subgroups, so the subgroup kernels cannot be tested; set SENET_TEST_NO_SUBGROUPS=1 to test only \
         the workgroup path",
        with.describe()
    );
    vec![("subgroups", with), ("workgroup trees", without)]
}

/// The same adapter with SE blocks in their split form (`--se-split on`: reductions spread over
/// channel blocks, the FCs a workgroup per sample, elementwise passes) or in one workgroup per
/// sample (`--se-split off`), with subgroups or without: [split][subgroups].
fn se_form(split: bool, subgroups: bool) -> Arc<Gpu> {
    static GPU: [[Cell; 2]; 2] = [[OnceLock::new(), OnceLock::new()], [OnceLock::new(), OnceLock::new()]];
    let opts = GpuOptions {
        se_split: if split { senet_wgpu::gpu::Switch::On } else { senet_wgpu::gpu::Switch::Off },
        subgroups: (!subgroups).then_some(Subgroups::Off),
        ..Default::default()
    };
    required(&GPU[usize::from(split)][usize::from(subgroups)], opts)
}

pub fn gpu_se_split() -> Arc<Gpu> {
    se_form(true, true)
}

pub fn gpu_se_one_pass() -> Arc<Gpu> {
    se_form(false, true)
}

/// The SE block's two forms on the reduction paths of `gpus()`: the one-pass form (`gpus()`'s own
/// devices where the adapter runs it, as CPU adapters do) and the split form.
pub fn se_gpus() -> Vec<(&'static str, Arc<Gpu>)> {
    let mut all = Vec::new();
    for (_, g) in gpus() {
        let sub = g.subgroups;
        all.push((
            if sub { "subgroups, one pass" } else { "workgroup trees, one pass" },
            if g.se_split { se_form(false, sub) } else { g },
        ));
        all.push((if sub { "subgroups, split" } else { "workgroup trees, split" }, se_form(true, sub)));
    }
    all
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [lo, hi), as f32 (so the f64 oracle sees exactly what the GPU sees).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

pub fn upload(gpu: &Gpu, label: &str, shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_slice(gpu, label, shape, data).expect("upload")
}

pub fn zeros(gpu: &Gpu, label: &str, shape: &[usize]) -> Tensor {
    Tensor::zeros(gpu, label, shape).expect("allocate")
}

pub fn read(gpu: &Gpu, t: &Tensor) -> Vec<f32> {
    t.read::<f32>(gpu).expect("read back")
}

/// A network's parameters and batch-norm running statistics read back by state-dict name, as the
/// reference step (`reference::model::train_step[_in]`) takes them.
pub fn reference_state(
    net: &senet_wgpu::model::plan::Network,
) -> (std::collections::HashMap<String, Vec<f64>>, std::collections::HashMap<String, Vec<f64>>) {
    let gpu = &net.gpu;
    let params = net.params.iter().map(|p| (p.spec.name.clone(), to_f64(&read(gpu, &p.value)))).collect();
    let mut buffers = std::collections::HashMap::new();
    for b in &net.bn {
        buffers.insert(format!("{}.running_mean", b.name), to_f64(&read(gpu, &b.running_mean)));
        buffers.insert(format!("{}.running_var", b.name), to_f64(&read(gpu, &b.running_var)));
    }
    (params, buffers)
}

/// Run dispatches (one submit) and wait.
pub fn run(gpu: &Gpu, dispatches: &[senet_wgpu::gpu::Dispatch]) {
    let refs: Vec<&_> = dispatches.iter().collect();
    gpu.run(&refs);
    gpu.wait().expect("GPU wait");
}

/// Element-wise check |got - want| <= atol + rtol*|want|, printing the first mismatches and the
/// worst error. Returns the largest |got - want| so tests can report it.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: {} values from the GPU, {} from the reference", got.len(), want.len());
    let mut bad = 0;
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        worst = worst.max(err);
        // A NaN on either side fails: written so that it is not "err > tol" (false for NaN).
        if err.is_nan() || err > atol + rtol * w.abs() {
            if bad < 5 {
                eprintln!("{what}[{i}]: gpu {g:.9e} reference {w:.9e} |diff| {err:.3e}");
            }
            bad += 1;
        }
    }
    assert!(
        bad == 0,
        "{what}: {bad} of {} values outside atol {atol:e} + rtol {rtol:e}; worst |diff| {worst:.3e}",
        got.len()
    );
    worst
}

/// A model at a small size: `model` at `width` with SE reduction `reduction`, 3×`hw`×`hw`
/// inputs, `classes` classes, SE biases, the default SE block and residual units.
pub fn small_model(
    model: &str,
    width: f64,
    reduction: usize,
    hw: usize,
    classes: usize,
) -> senet_wgpu::model::ModelConfig {
    senet_wgpu::model::ModelConfig {
        model: model.into(),
        width,
        reduction,
        in_channels: 3,
        num_classes: classes,
        input_hw: [hw, hw],
        classes: vec![],
        normalize: None,
        se_bias: true,
        se: Default::default(),
        block: Default::default(),
    }
}

/// A golden's tensors as [`load_golden`] reads them.
pub type Golden = std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>;

/// The tensors of `dir/name.safetensors` and the case configuration the golden script wrote into
/// its `config` metadata (JSON).
pub fn golden_case(dir: &str, name: &str) -> (Golden, serde_json::Value) {
    let path = std::path::Path::new(dir).join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("golden header");
    let config = meta.metadata().as_ref().and_then(|m| m.get("config")).expect("golden config metadata");
    (load_golden(&path), serde_json::from_str(config).expect("golden config JSON"))
}

/// Every tensor of a safetensors file (a PyTorch golden) as (shape, values in f64): F64, F32,
/// I64 and I32 tensors.
pub fn load_golden(path: &std::path::Path) -> Golden {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden safetensors");
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F64 => {
                    d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
                }
                safetensors::Dtype::F32 => {
                    d.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
                }
                safetensors::Dtype::I64 => {
                    d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                safetensors::Dtype::I32 => {
                    d.chunks_exact(4).map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap()))).collect()
                }
                other => panic!("golden tensor {k} has dtype {other:?}"),
            };
            (k, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// Convolutions on awkward shapes, ordinary and grouped, for every conv kernel family
/// (tests/kernels/conv2d.rs: register blocks and workgroup-memory tiles; tests/coop.rs: cooperative
/// matrices).
pub fn conv_cases() -> Vec<Conv2dConfig> {
    let sq = Conv2dConfig::square;
    vec![
        // batch 1, odd non-square 7x5, 3x3 pad 1 (the SENet layer shape), bias
        sq(1, 3, (7, 5), 5, 3, 1, 1, true),
        // stride 2 on an odd 9x6 input, channels 5 -> 7, no bias
        sq(2, 5, (9, 6), 7, 3, 2, 1, false),
        // 1x1 convolution (the SE FCs are 1x1 convs in PyTorch), 8x8
        sq(3, 4, (8, 8), 6, 1, 1, 0, true),
        // everything uneven: 5x3 kernel, stride (2,1), padding (2,0), dilation (1,2)
        Conv2dConfig {
            n: 2,
            c_in: 3,
            h: 11,
            w: 7,
            c_out: 9,
            kh: 5,
            kw: 3,
            stride: (2, 1),
            pad: (2, 0),
            dilation: (1, 2),
            groups: 1,
            bias: true,
        },
        // the first SENet layer at width 0.25 on 32x32 (enough m for split reductions)
        sq(2, 3, (32, 32), 16, 3, 1, 1, true),
        // a single output pixel
        sq(1, 2, (3, 3), 3, 3, 1, 0, true),
        // channels past one 8-wide block on both sides (11 in, 13 out), 6x5
        sq(2, 11, (6, 5), 13, 3, 1, 1, true),
        // padding wider than the image: whole taps and whole output columns read only padding
        Conv2dConfig {
            n: 2,
            c_in: 5,
            h: 4,
            w: 3,
            c_out: 10,
            kh: 3,
            kw: 3,
            stride: (1, 2),
            pad: (3, 3),
            dilation: (2, 3),
            groups: 1,
            bias: false,
        },
        // channels past one workgroup tile of the tiled kernels (131 out > 128, 70 in > 64) and
        // past the 16-wide register blocks, on a 5x7 image
        sq(2, 70, (5, 7), 131, 3, 1, 1, true),
        // the ImageNet stem: 7x7, stride 2, padding 3, on an odd 23x19 input
        sq(2, 3, (23, 19), 9, 7, 2, 3, false),
        // a projection shortcut: 1x1, stride 2, 33 -> 65 channels
        sq(3, 33, (9, 9), 65, 1, 2, 0, false),
        // Grouped convolutions (weight [c_out, c_in/groups, kh, kw]); the columns of one group
        // are a block of their own in every family, so these put channels per group at, below
        // and past the block sizes:
        // ResNeXt's 32 groups: 64 -> 64 channels, 2 per group, batch 1, odd 7x5, bias
        sq(1, 64, (7, 5), 64, 3, 1, 1, true).grouped(32),
        // 2 groups, 34 -> 68 channels (17 -> 34 per group: past a 16-wide block), stride 2 on an
        // odd 9x7, no bias
        sq(2, 34, (9, 7), 68, 3, 2, 1, false).grouped(2),
        // 4 groups, 12 -> 20 channels (3 -> 5 per group), everything uneven: 5x3 kernel, stride
        // (2,1), padding (2,1), dilation (1,2), on 11x9
        Conv2dConfig {
            n: 2,
            c_in: 12,
            h: 11,
            w: 9,
            c_out: 20,
            kh: 5,
            kw: 3,
            stride: (2, 1),
            pad: (2, 1),
            dilation: (1, 2),
            groups: 4,
            bias: true,
        },
        // depthwise, 17 channels, dilation 2 (padding 2 keeps 13x11), bias
        Conv2dConfig {
            n: 2,
            c_in: 17,
            h: 13,
            w: 11,
            c_out: 17,
            kh: 3,
            kw: 3,
            stride: (1, 1),
            pad: (2, 2),
            dilation: (2, 2),
            groups: 17,
            bias: true,
        },
        // depthwise, 3 channels, stride 2 on an odd 9x7, batch 1, no bias
        sq(1, 3, (9, 7), 3, 3, 2, 1, false).grouped(3),
        // depthwise, 64 channels, stride 2 on 15x13 (m = 2*8*7: split weight gradients), bias
        sq(2, 64, (15, 13), 64, 3, 2, 1, true).grouped(64),
        // a channel multiplier of 2 (8 groups, 1 -> 2 channels each) in a 1x1, stride 2
        sq(3, 8, (9, 9), 16, 1, 2, 0, false).grouped(8),
    ]
}

/// A small network with grouped convolutions, written out as a graph (no model name builds one)
/// for a 3 x h x w input, five classes: conv1 3 -> 16 (3x3), BN, ReLU, then a residual block in
/// ResNeXt's shape — conv2 3x3 in 4 groups, BN, ReLU, conv3 depthwise 3x3 with a bias, BN, added
/// to the block's input, ReLU — then the global pool and the classifier.
pub fn grouped_network(h: usize, w: usize) -> senet_wgpu::model::Graph {
    use senet_wgpu::model::{BatchNorm2d, Conv2d, Graph, Layer, Linear, Node};
    let conv =
        |c_in, c_out, groups, bias| Layer::Conv2d(Conv2d { c_in, c_out, kernel: 3, stride: 1, pad: 1, groups, bias });
    let layers = [
        ("conv1", conv(3, 16, 1, false), vec![0]),
        ("bn1", Layer::BatchNorm2d(BatchNorm2d { c: 16 }), vec![1]),
        ("relu1", Layer::Relu, vec![2]),
        ("conv2", conv(16, 16, 4, false), vec![3]),
        ("bn2", Layer::BatchNorm2d(BatchNorm2d { c: 16 }), vec![4]),
        ("relu2", Layer::Relu, vec![5]),
        ("conv3", conv(16, 16, 16, true), vec![6]),
        ("bn3", Layer::BatchNorm2d(BatchNorm2d { c: 16 }), vec![7]),
        ("add", Layer::Add, vec![8, 3]),
        ("relu3", Layer::Relu, vec![9]),
        ("pool", Layer::GlobalAvgPool, vec![10]),
        ("fc", Layer::Linear(Linear { in_features: 16, out_features: 5, bias: true }), vec![11]),
    ];
    let nodes = layers.into_iter().map(|(name, layer, inputs)| Node { name: name.into(), layer, inputs }).collect();
    Graph { input: [3, h, w], nodes }
}

/// The conv tolerance: conv2d sums K = c_in*kh*kw products (forward), c_out*kh*kw (input grad) or n*oh*ow (weight
/// grad, up to 2048 here; a grouped layer's K counts one group's channels, so fewer) of values in [-1, 1]. f32 rounding grows like sqrt(K)*eps*|sum| ~ 1e-5
/// at these sizes: atol 1e-4, rtol 1e-5 leaves 10x headroom.
pub const CONV_ATOL: f64 = 1e-4;
pub const CONV_RTOL: f64 = 1e-5;

/// The relative L2 error of a whole tensor, ||got - want|| / ||want||, asserted at most `bound`
/// (beside the element-wise bound of [`assert_close`], which lets a tensor of many small entries
/// be off by a large fraction of its size). A tensor whose reference norm is below `floor` — a
/// gradient that is zero up to rounding, as a conv bias feeding a batch norm — has no relative
/// size and is left to the element-wise bound. Returns the relative error (for such a tensor,
/// the absolute one, unchecked).
#[track_caller]
pub fn assert_rel_l2(what: &str, got: &[f32], want: &[f64], bound: f64, floor: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: {} values from the GPU, {} from the reference", got.len(), want.len());
    let norm = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    let err = got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).powi(2)).sum::<f64>().sqrt();
    if norm < floor {
        return err;
    }
    let rel = err / norm;
    // Written so that a NaN fails.
    assert!(rel <= bound, "{what}: relative L2 error {rel:.3e} > {bound:e} (norm {norm:.3e})");
    rel
}

/// f64 against f64 (the reference against PyTorch float64): every element within
/// atol + rtol*|want|. Returns the largest |got - want|.
#[track_caller]
pub fn assert_close64(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: {} values, the reference has {}", got.len(), want.len());
    let mut worst = 0.0f64;
    let mut bad = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        worst = worst.max(err);
        if err.is_nan() || err > atol + rtol * w.abs() {
            if bad < 5 {
                eprintln!("{what}[{i}]: got {g:.15e} want {w:.15e} |diff| {err:.3e}");
            }
            bad += 1;
        }
    }
    assert!(bad == 0, "{what}: {bad} of {} values outside atol {atol:e} + rtol {rtol:e}; worst {worst:.3e}", got.len());
    worst
}

/// The plan's [2] step key tensor holding `key` (what stochastic ops draw from).
pub fn key_tensor(gpu: &Gpu, key: [u32; 2]) -> Tensor {
    Tensor::from_slice(gpu, "step key", &[2], &key).expect("upload key")
}

/// A `dtype` tensor of `shape` holding `v` (rounded to f16 for an f16 tensor), and the values it
/// holds, widened back to f32.
pub fn upload_as(gpu: &Gpu, dtype: senet_wgpu::gpu::Dtype, shape: &[usize], v: &[f32]) -> (Tensor, Vec<f32>) {
    match dtype {
        senet_wgpu::gpu::Dtype::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            let t = Tensor::from_slice(gpu, "x", shape, &h).expect("upload f16");
            (t, h.iter().map(|x| x.to_f32()).collect())
        }
        _ => (upload(gpu, "x", shape, v), v.to_vec()),
    }
}

/// `t`'s values as f32, whatever its element type.
pub fn read_as(gpu: &Gpu, t: &Tensor) -> Vec<f32> {
    match t.dtype {
        senet_wgpu::gpu::Dtype::F16 => t.read::<half::f16>(gpu).expect("read f16").iter().map(|x| x.to_f32()).collect(),
        _ => read(gpu, t),
    }
}

/// A zeroed f16 tensor.
pub fn zeros_f16(gpu: &Gpu, label: &str, shape: &[usize]) -> Tensor {
    Tensor::zeros_of(gpu, label, shape, senet_wgpu::gpu::Dtype::F16).expect("allocate f16")
}

/// The input gradient with an addend (`ConvBuffers::dinp_addend`: the other reader's gradient of
/// a forked activation, summed as the first reader's gradient is stored) on `cfg` in `dtype`, run
/// by each of `kernels`, checked twice:
///
/// - against `reference::conv2d::conv2d_backward_input_accumulate` (f64). The own gradient carries
///   the conv tolerance (CONV_ATOL + CONV_RTOL relative to it) and, in f16, its rounding to f16
///   before the sum (half an f16 ulp, 2^-11 = 4.9e-4 relative to it); the sum's rounding is
///   relative to the result (f32: an ulp, within CONV_RTOL; f16: 4.9e-4). The own gradient may be
///   larger than the sum (they cancel), so its share is an atol scaled by the largest |own| of the
///   case. A lost, misplaced or unscaled addend is off by |addend| ~ U(-1, 1).
/// - bit for bit against the unfused composition the plan ran before: the same kernel's input
///   gradient stored apart, then `add::add_forward` of it and the addend. This is the exact
///   contract (the fused plan's whole step is then bitwise the unfused one); it catches what the
///   tolerance cannot, e.g. an f16 own gradient not rounded before the sum (at most half an f16
///   ulp of it).
pub fn check_conv_backward_input_accumulate(
    gpu: &Gpu,
    dtype: senet_wgpu::gpu::Dtype,
    case: usize,
    cfg: &Conv2dConfig,
    kernels: &[senet_wgpu::ops::conv2d::ConvKernel],
) {
    use senet_wgpu::ops::conv2d::{self, ConvBuffers, ConvPass};
    const F16_RTOL: f64 = 4.9e-4;
    let mut r = rng(2100 + case as u64);
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let (tw, w) = upload_as(gpu, dtype, &cfg.weight_shape(), &uniform(&mut r, numel(&cfg.weight_shape()), -1.0, 1.0));
    let (tdy, dy) = upload_as(gpu, dtype, &cfg.output_shape(), &uniform(&mut r, numel(&cfg.output_shape()), -1.0, 1.0));
    let (tadd, add) = upload_as(gpu, dtype, &cfg.input_shape(), &uniform(&mut r, numel(&cfg.input_shape()), -1.0, 1.0));
    let (w64, dy64, add64) = (to_f64(&w), to_f64(&dy), to_f64(&add));
    let want = senet_wgpu::reference::conv2d::conv2d_backward_input_accumulate(cfg, &dy64, &w64, &add64);
    let own = senet_wgpu::reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
    let largest_own = own.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let f16_rtol = if dtype == senet_wgpu::gpu::Dtype::F16 { F16_RTOL } else { 0.0 };
    let (atol, rtol) = (CONV_ATOL + (CONV_RTOL + f16_rtol) * largest_own, CONV_RTOL + f16_rtol);
    let zeros = |label| Tensor::zeros_of(gpu, label, &cfg.input_shape(), dtype).expect("allocate");
    for &k in kernels {
        let what = format!("{} conv2d_backward_input + addend case {case} {k} {cfg:?}", dtype.name());
        let tdx = zeros("dx");
        let bufs = ConvBuffers { dinp_addend: Some(&tadd), ..ConvBuffers::backward_input(&tdy, &tw, &tdx) };
        let d = conv2d::conv2d_pass(gpu, cfg, ConvPass::BackwardInput, k, &bufs).expect("record");
        assert_eq!(d.len(), 1, "{what}: one dispatch");
        run(gpu, &d);
        let got = read_as(gpu, &tdx);
        assert_close(&what, &got, &want, atol, rtol);

        let (town, tsum) = (zeros("own dx"), zeros("dx sum"));
        let bufs = ConvBuffers::backward_input(&tdy, &tw, &town);
        let mut d = conv2d::conv2d_pass(gpu, cfg, ConvPass::BackwardInput, k, &bufs).expect("record");
        d.extend(senet_wgpu::ops::add::add_forward(gpu, &town, &tadd, &tsum).expect("record the add"));
        run(gpu, &d);
        let unfused = read_as(gpu, &tsum);
        let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != unfused[i].to_bits()).collect();
        if let Some(&i) = differ.first() {
            panic!(
                "{what}: {} of {} values differ from the unfused input gradient + add_forward; first [{i}]: fused {:e} unfused {:e}",
                differ.len(),
                got.len(),
                got[i],
                unfused[i]
            );
        }
    }
}
