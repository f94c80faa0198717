//! `senet bench`: the device's ceilings measured by small kernels of ours, then a model's train
//! step and eval pass, and a per-kernel table from timestamp queries (wall clock without them).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytemuck::{Pod, Zeroable};
use serde::Serialize;

use crate::args::{InputArgs, ModelArgs};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};
use crate::model::plan::{Network, StepPlan};
use crate::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvPass};
use crate::ops::optimizer::OptimizerConfig;
use crate::ops::relu;

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    #[arg(long, default_value_t = crate::hparams::BATCH_SIZE)]
    pub batch_size: usize,
    /// Timed steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The plan's precision: f32, or f16 (AMP: f16 activations and convolution operands).
    #[arg(long, value_enum, default_value_t = crate::hparams::PRECISION)]
    pub precision: Precision,
    /// Time the data pipeline alone (no GPU): the training transforms over --steps batches, then
    /// the evaluation transforms, of `--dataset folder --data-dir DIR` at --image-size.
    #[arg(long, requires = "data_dir")]
    pub data_only: bool,
    /// With --data-only: the dataset (an image folder).
    #[arg(long, value_enum, requires = "data_only")]
    pub dataset: Option<crate::data::DatasetKind>,
    /// With --data-only: the image folder (DIR/train/<class>/…, DIR/val/ or DIR/test/).
    #[arg(long, requires = "data_only")]
    pub data_dir: Option<std::path::PathBuf>,
    /// With --data-only: loader threads [default: the machine's cores minus one, at least 1].
    #[arg(long, env = "SENET_WORKERS", requires = "data_only")]
    pub workers: Option<usize>,
    /// With --data-only: timm's RandAugment config for the training transform (as `train --aa`).
    #[arg(long, value_name = "CONFIG", value_parser = crate::args::parse_aa, requires = "data_only")]
    pub aa: Option<String>,
    /// With --data-only: random erasing's probability in the training transform (as `train --reprob`).
    #[arg(long, value_name = "P", default_value_t = 0.0, requires = "data_only")]
    pub reprob: f64,
    /// With --data-only: the evaluation transform's crop_pct.
    #[arg(long, default_value_t = crate::hparams::CROP_PCT)]
    pub crop_pct: f64,
    /// With --data-only: hold decoded images in memory when the folder fits in this many MB
    /// [default: 0, so every pass decodes, as a folder larger than memory is read].
    #[arg(long, value_name = "MB", default_value_t = 0)]
    pub cache_mb: u64,
}

/// `senet bench --data-only`: the loader's throughput.
#[derive(Clone, Debug, Serialize)]
pub struct DataBenchReport {
    pub dataset: String,
    pub image_size: [usize; 2],
    pub batch: usize,
    pub workers: usize,
    /// Images through the training transforms (decode, RandomResizedCrop, flip, normalise, batch).
    pub train_images: usize,
    pub train_images_per_s: f64,
    /// Images through the evaluation transforms (decode, Resize, CenterCrop, normalise, batch).
    pub eval_images: usize,
    pub eval_images_per_s: f64,
    /// Whether the decoded images were held in memory (`--cache-mb`).
    pub cached: bool,
    /// The training transform's RandAugment config (`--aa`) and random erasing probability.
    pub aa: Option<String>,
    pub reprob: f64,
}

/// Time the data pipeline of `args`' image folder: `--steps` training batches (the first epoch's
/// order), then as many evaluation batches (fewer if the split is smaller). No GPU is used.
pub fn bench_data(args: &BenchArgs) -> Result<DataBenchReport> {
    use crate::data::augment::{self, AutoAugment, EraseMode, RandomErasing};
    use crate::data::loader::{self, LoadOptions, Preprocess};
    use crate::data::{DatasetKind, folder};
    anyhow::ensure!(
        args.dataset.is_none_or(|k| k == DatasetKind::Folder),
        "--data-only times image folders (--dataset folder); the in-memory datasets need no loader"
    );
    anyhow::ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    anyhow::ensure!(args.steps >= 1, "--steps must be at least 1");
    let dir = args.data_dir.as_deref().context("--data-only needs --data-dir DIR")?;
    let size = args.input.image_size;
    let opts =
        folder::FolderOptions { size, crop_pct: args.crop_pct, cache_bytes: args.cache_mb.saturating_mul(1 << 20) };
    let splits = folder::load(dir, opts)?;
    let workers = args.workers.unwrap_or_else(LoadOptions::default_workers).max(1);
    let [_, h, w] = splits.train.shape;
    let cached = splits.train.files.as_ref().is_some_and(|f| f.cache.is_some());
    crate::data::augment::check_erasing(args.reprob, 1)?;
    let aa = match &args.aa {
        Some(s) => Some(
            AutoAugment::parse(s, augment::fill_of_mean(crate::hparams::IMAGENET_MEAN))
                .map_err(|e| anyhow::anyhow!("--aa {s}: {e}"))?,
        ),
        None => None,
    };
    let erase =
        (args.reprob > 0.0).then_some(RandomErasing { prob: args.reprob, mode: EraseMode::Pixel, max_count: 1 });
    let pre = |augment: bool| Preprocess {
        normalize: Some(vec![(0.485, 0.229), (0.456, 0.224), (0.406, 0.225)]),
        augment,
        aa: aa.clone().filter(|_| augment),
        erase: erase.clone().filter(|_| augment),
        load: LoadOptions { workers, skip_bad: false, fail_at: None },
    };
    let time = |ds: crate::data::Dataset, augment: bool, shuffle: bool| -> Result<(usize, f64)> {
        let ds = Arc::new(ds);
        let order = loader::epoch_order(ds.len(), shuffle, 0, 1);
        let chunks: Vec<Vec<usize>> = order.chunks(args.batch_size).take(args.steps).map(<[usize]>::to_vec).collect();
        let t = Instant::now();
        let mut n = 0;
        for b in loader::stream(ds, chunks, pre(augment), 0, 1) {
            n += b?.labels.len();
        }
        Ok((n, t.elapsed().as_secs_f64()))
    };
    let (train_images, train_s) = time(splits.train, true, true)?;
    let (eval_images, eval_s) = time(splits.test, false, false)?;
    Ok(DataBenchReport {
        dataset: splits.name,
        image_size: [h, w],
        batch: args.batch_size,
        workers,
        train_images,
        train_images_per_s: train_images as f64 / train_s,
        eval_images,
        eval_images_per_s: eval_images as f64 / eval_s,
        cached,
        aa: args.aa.clone(),
        reprob: args.reprob,
    })
}

/// The `--data-only` report as text.
pub fn format_data_report(r: &DataBenchReport) -> String {
    format!(
        "data pipeline of {} at {}x{}, batch {}, {} workers{}:\n  training transforms   {:>8.1} images/s ({} images{})\n  \
         evaluation transforms {:>8.1} images/s ({} images)\n",
        r.dataset,
        r.image_size[0],
        r.image_size[1],
        r.batch,
        r.workers,
        if r.cached { ", decoded images held in memory" } else { ", decoding every image" },
        r.train_images_per_s,
        r.train_images,
        [r.aa.as_ref().map(|a| format!(", --aa {a}")), (r.reprob > 0.0).then(|| format!(", --reprob {}", r.reprob))]
            .into_iter()
            .flatten()
            .collect::<String>(),
        r.eval_images_per_s,
        r.eval_images
    )
}

/// One row of the per-kernel table.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    pub name: String,
    pub dispatches: usize,
    pub ms: f64,
    pub share: f64,
    pub gflops: f64,
    pub gbps: f64,
    /// Achieved GFLOP/s over the FMA peak, or GB/s over the copy bandwidth, whichever the kernel
    /// is closer to (its bound).
    pub pct_of_ceiling: f64,
}

/// One pass of one conv layer: the kernel the tuner chose and how it did.
#[derive(Clone, Debug, Serialize)]
pub struct ConvLayerRow {
    pub layer: String,
    pub pass: String,
    pub kernel: String,
    pub ms: f64,
    pub gflops: f64,
}

/// A profiled step: per kernel, and per conv layer and pass.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub kernels: Vec<KernelRow>,
    pub conv_layers: Vec<ConvLayerRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub adapter: String,
    pub timing: &'static str,
    /// The higher of the two FMA probes, before and after the timed steps.
    pub fma_peak_gflops: f64,
    /// The two probes, before and after the timed steps.
    pub fma_probes_gflops: [f64; 2],
    pub gemm_gflops: f64,
    pub copy_gbps: f64,
    pub dispatch_overhead_us: f64,
    pub submit_overhead_us: f64,
    pub model: String,
    pub batch: usize,
    pub precision: Precision,
    pub first_step_s: f64,
    pub train_images_per_s: f64,
    pub eval_images_per_s: f64,
    pub train_step_gflop: f64,
    pub train_step_gflops: f64,
    pub peak_memory_bytes: u64,
    /// The tuner's work while the plan was built (0 timed when the cache answered).
    pub tuning: crate::gpu::tune::TuneSummary,
    pub tune_mode: crate::gpu::tune::TuneMode,
    pub kernels: Vec<KernelRow>,
    pub conv_layers: Vec<ConvLayerRow>,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    iters: u32,
    len: u32,
    _pad: [u32; 2],
}

fn best(gpu: &Gpu, group: &[&Dispatch], reps: usize) -> Result<f64> {
    let groups: Vec<Vec<&Dispatch>> = (0..reps).map(|_| group.to_vec()).collect();
    let times = gpu.time_passes(&groups)?;
    Ok(times.into_iter().fold(f64::INFINITY, f64::min))
}

/// FMA peak (GFLOP/s) and copy bandwidth (GB/s, bytes read + written).
pub fn ceilings(gpu: &Gpu) -> Result<(f64, f64)> {
    let fma = fma_peak(gpu)?;
    let copy_n = if gpu.is_cpu() { 1 << 20 } else { 1 << 24 };
    let src = Tensor::zeros(gpu, "bench src", &[copy_n * 4])?;
    let dst = Tensor::zeros(gpu, "bench dst", &[copy_n * 4])?;
    let p = gpu.uniform("bench params", &Params { iters: 0, len: copy_n as u32, _pad: [0; 2] });
    let binds = [Bind::Uniform(0, &p), Bind::Tensor(1, &src), Bind::Tensor(2, &dst)];
    let copy = gpu.dispatch("bench", "bench_copy", &[], &binds, gpu.grid_1d(copy_n, 256))?;
    let tc = best(gpu, &[&copy], 3)?;
    Ok((fma, 32.0 * copy_n as f64 / tc / 1e9))
}

/// FMA peak (GFLOP/s): the best of 3 runs of a kernel of independent vec4 FMAs.
pub fn fma_peak(gpu: &Gpu) -> Result<f64> {
    let n = if gpu.is_cpu() { 1 << 16 } else { 1 << 22 }; // vec4 elements
    let iters = if gpu.is_cpu() { 256 } else { 2048 };
    let dst = Tensor::zeros(gpu, "bench dst", &[n * 4])?;
    let p = gpu.uniform("bench params", &Params { iters, len: n as u32, _pad: [0; 2] });
    let binds = [Bind::Uniform(0, &p), Bind::Tensor(2, &dst)];
    let fma = gpu.dispatch("bench", "bench_fma", &[], &binds, gpu.grid_1d(n, 256))?;
    let t = best(gpu, &[&fma], 3)?;
    Ok(n as f64 * f64::from(iters) * 32.0 / t / 1e9)
}

/// Our conv2d forward as the implicit GEMM it is, on a shape that suits it (3×3, 256 → 256
/// channels): M = N·H·W pixels, N = channels, K = 9 · channels. (As a 1×1 plain GEMM the same
/// kernel measured 10–11 GFLOP/s on lavapipe, the 3×3 16–18: the 3×3 is our best GEMM.)
fn gemm(gpu: &Gpu) -> Result<f64> {
    // Enough blocks to keep every CPU thread or GPU core busy: M = 1,024 pixels on a CPU adapter.
    let (n, hw, c) = if gpu.is_cpu() { (4, 16, 256) } else { (4, 64, 1024) };
    let cfg = Conv2dConfig::square(n, c, (hw, hw), c, 3, 1, 1, false);
    let x = Tensor::zeros(gpu, "gemm a", &cfg.input_shape())?;
    let w = Tensor::zeros(gpu, "gemm b", &cfg.weight_shape())?;
    let y = Tensor::zeros(gpu, "gemm c", &cfg.output_shape())?;
    let kernel = conv2d::ConvKernel::Register(conv2d::RegisterTiles::for_layer(gpu, &cfg));
    let d = conv2d::conv2d_pass(gpu, &cfg, ConvPass::Forward, kernel, &ConvBuffers::forward(&x, &w, None, &y))?;
    let t = best(gpu, &d.iter().collect::<Vec<_>>(), 3)?;
    Ok(2.0 * cfg.macs() as f64 / t / 1e9)
}

/// Per-dispatch cost inside one pass, and per submit-and-wait.
fn overheads(gpu: &Gpu) -> Result<(f64, f64)> {
    let t = Tensor::zeros(gpu, "tiny", &[256])?;
    let u = Tensor::zeros(gpu, "tiny out", &[256])?;
    let d = relu::relu_forward(gpu, &t, &u)?.remove(0);
    let many: Vec<&Dispatch> = std::iter::repeat_n(&d, 500).collect();
    let per_dispatch = best(gpu, &many, 2)? / 500.0;
    gpu.run(&[]);
    gpu.wait()?;
    let reps = 30;
    let t0 = Instant::now();
    for _ in 0..reps {
        gpu.run(&[]);
        gpu.wait()?;
    }
    Ok((per_dispatch * 1e6, t0.elapsed().as_secs_f64() / reps as f64 * 1e6))
}

pub fn bench(gpu: Arc<Gpu>, args: &BenchArgs) -> Result<BenchReport> {
    let timing =
        if gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) { "timestamp queries" } else { "wall clock" };
    let (fma_before, copy_gbps) = ceilings(&gpu)?;
    let gemm_gflops = gemm(&gpu)?;
    let (dispatch_us, submit_us) = overheads(&gpu)?;

    // The model: start-up to the end of the first step, then timed steps.
    let t_start = Instant::now();
    let config = args.input.config(&args.model)?;
    let mut net = Network::new_in(gpu.clone(), config.clone(), OptimizerConfig::adam(1e-3), 0, args.precision)?;
    let n = args.batch_size;
    let plan = net.plan(n)?;
    let [h, w] = config.input_hw;
    let images: Vec<f32> = (0..n * config.in_channels * h * w).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let labels: Vec<u32> = (0..n).map(|i| (i % config.num_classes) as u32).collect();
    plan.write_batch(&gpu, &images, &labels)?;
    net.train_step(&plan);
    gpu.wait()?;
    let first_step_s = t_start.elapsed().as_secs_f64();
    net.train_step(&plan);
    gpu.wait()?;

    let steps = args.steps.max(1);
    let t0 = Instant::now();
    for _ in 0..steps {
        net.train_step(&plan);
    }
    gpu.wait()?;
    let train_s = t0.elapsed().as_secs_f64() / steps as f64;
    net.eval_batch(&plan);
    gpu.wait()?;
    let t0 = Instant::now();
    for _ in 0..steps {
        net.eval_batch(&plan);
    }
    gpu.wait()?;
    let eval_s = t0.elapsed().as_secs_f64() / steps as f64;
    // The probe again after the steps: a shared host's speed moves within minutes (lavapipe read
    // 22-36 GFLOP/s within one run), and the higher reading is the conservative peak.
    let fma_after = fma_peak(&gpu)?;
    let fma_peak = fma_before.max(fma_after);

    let step_flops: f64 = net.train_dispatches(&plan).iter().map(|d| d.flops).sum();
    let profile = profiled_step(&mut net, &plan, (fma_peak, copy_gbps))?;
    let (_, _, _, peak) = gpu.stats.snapshot();
    Ok(BenchReport {
        adapter: gpu.describe(),
        timing,
        fma_peak_gflops: fma_peak,
        fma_probes_gflops: [fma_before, fma_after],
        gemm_gflops,
        copy_gbps,
        dispatch_overhead_us: dispatch_us,
        submit_overhead_us: submit_us,
        model: format!(
            "{} width {} {}x{h}x{w} -> {}",
            config.model, config.width, config.in_channels, config.num_classes
        ),
        batch: n,
        precision: args.precision,
        first_step_s,
        train_images_per_s: n as f64 / train_s,
        eval_images_per_s: n as f64 / eval_s,
        train_step_gflop: step_flops / 1e9,
        train_step_gflops: step_flops / train_s / 1e9,
        peak_memory_bytes: peak,
        tuning: gpu.tuner.summary(),
        tune_mode: gpu.tuner.mode,
        kernels: profile.kernels,
        conv_layers: profile.conv_layers,
    })
}

/// Take one training step with every dispatch in a compute pass of its own, timed (timestamp
/// queries, else the wall clock), and sum the times per kernel. The step is a real one: its
/// results are the same as from one pass. `ceilings` = (FMA peak GFLOP/s, copy GB/s).
pub fn profiled_step(net: &mut Network, plan: &StepPlan, ceilings: (f64, f64)) -> Result<Profile> {
    net.begin_step();
    let list = net.train_dispatches(plan);
    let groups: Vec<Vec<&Dispatch>> = list.iter().map(|d| vec![*d]).collect();
    let times = net.gpu.time_passes(&groups)?;
    let mut rows: BTreeMap<&str, (usize, f64, f64, f64)> = BTreeMap::new();
    for (d, t) in list.iter().zip(&times) {
        let r = rows.entry(d.label).or_default();
        *r = (r.0 + 1, r.1 + t, r.2 + d.flops, r.3 + d.bytes);
    }
    let total: f64 = times.iter().sum();
    let mut kernels: Vec<KernelRow> = rows
        .into_iter()
        .map(|(name, (count, t, flops, bytes))| {
            let (gflops, gbps) = (flops / t / 1e9, bytes / t / 1e9);
            KernelRow {
                name: name.to_string(),
                dispatches: count,
                ms: t * 1e3,
                share: t / total,
                gflops,
                gbps,
                pct_of_ceiling: 100.0 * (gflops / ceilings.0).max(gbps / ceilings.1),
            }
        })
        .collect();
    kernels.sort_by(|a, b| b.ms.total_cmp(&a.ms));

    // Per conv layer and pass (the weight gradient's reduction counted with it), in plan order.
    let mut conv_layers: Vec<ConvLayerRow> = plan
        .conv_kernels
        .iter()
        .map(|(layer, pass, kernel)| ConvLayerRow {
            layer: layer.clone(),
            pass: format!("{pass:?}"),
            kernel: kernel.to_string(),
            ms: 0.0,
            gflops: 0.0,
        })
        .collect();
    for (d, t) in list.iter().zip(&times) {
        if d.label == "conv2d_backward" {
            join_backward_rows(&mut conv_layers, &d.layer);
        }
        let pass = if d.label == "conv2d_backward" {
            "Backward"
        } else if d.label.starts_with("conv2d_backward_weight") {
            "BackwardWeight"
        } else if d.label.starts_with("conv2d_backward_input") {
            "BackwardInput"
        } else if d.label.starts_with("conv2d_forward") {
            "Forward"
        } else {
            continue;
        };
        // A split weight gradient's reduce after a joint backward counts with it.
        let row = conv_layers.iter().position(|r| r.layer == d.layer && r.pass == pass);
        let row = row.or_else(|| conv_layers.iter().position(|r| r.layer == d.layer && r.pass == "Backward"));
        if let Some(row) = row.map(|i| &mut conv_layers[i]) {
            row.ms += t * 1e3;
            row.gflops += d.flops;
        }
    }
    for row in &mut conv_layers {
        row.gflops = if row.ms > 0.0 { row.gflops / (row.ms * 1e-3) / 1e9 } else { 0.0 };
    }
    Ok(Profile { kernels, conv_layers })
}

/// A layer's two gradient rows as one, `Backward`, for its joint dispatch (`conv2d_backward`, both
/// gradients at once): the kernel text names both passes' choices unless they agree.
fn join_backward_rows(rows: &mut Vec<ConvLayerRow>, layer: &str) {
    let find = |rows: &[ConvLayerRow], pass: &str| rows.iter().position(|r| r.layer == layer && r.pass == pass);
    let (Some(i), Some(w)) = (find(rows, "BackwardInput"), find(rows, "BackwardWeight")) else {
        return;
    };
    let weight = rows.remove(w);
    let input = &mut rows[if w < i { i - 1 } else { i }];
    if input.kernel != weight.kernel {
        input.kernel = format!("{} | {}", input.kernel, weight.kernel);
    }
    input.pass = "Backward".to_string();
}

/// The per-conv-layer table as text: which kernel ran each pass, and how fast.
pub fn format_conv_layers(rows: &[ConvLayerRow]) -> String {
    let mut s = format!("{:<24} {:<15} {:<28} {:>9} {:>9}\n", "conv layer", "pass", "kernel", "ms", "GFLOP/s");
    for r in rows {
        s += &format!("{:<24} {:<15} {:<28} {:>9.3} {:>9.1}\n", r.layer, r.pass, r.kernel, r.ms, r.gflops);
    }
    s
}

/// The per-kernel table as text.
pub fn format_kernels(kernels: &[KernelRow]) -> String {
    let mut s = format!(
        "{:<32} {:>5} {:>9} {:>6} {:>9} {:>8} {:>7}\n",
        "kernel", "n", "ms", "share", "GFLOP/s", "GB/s", "%ceil"
    );
    for k in kernels {
        s += &format!(
            "{:<32} {:>5} {:>9.3} {:>5.1}% {:>9.1} {:>8.1} {:>6.1}%\n",
            k.name,
            k.dispatches,
            k.ms,
            100.0 * k.share,
            k.gflops,
            k.gbps,
            k.pct_of_ceiling
        );
    }
    s
}

pub fn format_report(r: &BenchReport) -> String {
    let mut s = format!("adapter: {}\ntiming: {}\n\n", r.adapter, r.timing);
    let [before, after] = r.fma_probes_gflops;
    s += &format!(
        "FMA peak        {:>10.1} GFLOP/s (the higher of the probes before and after the steps: {before:.1}, {after:.1})\n",
        r.fma_peak_gflops
    );
    s += &format!("GEMM (conv 3x3) {:>10.1} GFLOP/s\n", r.gemm_gflops);
    s += &format!("copy            {:>10.1} GB/s\n", r.copy_gbps);
    s += &format!("per dispatch    {:>10.1} us (inside one pass)\n", r.dispatch_overhead_us);
    s += &format!("per submit      {:>10.1} us (submit and wait)\n\n", r.submit_overhead_us);
    s += &format!("{} batch {} ({})\n", r.model, r.batch, r.precision.name());
    s += &format!("first step      {:>10.2} s from start-up\n", r.first_step_s);
    s += &format!(
        "train           {:>10.1} images/s  ({:.2} GFLOP per step, {:.1} GFLOP/s = {:.0}% of FMA peak)\n",
        r.train_images_per_s,
        r.train_step_gflop,
        r.train_step_gflops,
        100.0 * r.train_step_gflops / r.fma_peak_gflops
    );
    s += &format!("eval            {:>10.1} images/s\n", r.eval_images_per_s);
    s += &format!(
        "peak memory     {:>10.1} MiB (our accounting of every buffer)\n\n",
        r.peak_memory_bytes as f64 / 1048576.0
    );
    s += &format!(
        "tuning          {:?}: {} conv shapes timed in {:.1} s, {} from the cache\n\n",
        r.tune_mode, r.tuning.timed, r.tuning.seconds, r.tuning.cached
    );
    s += &format_kernels(&r.kernels);
    s += "\n";
    s += &format_conv_layers(&r.conv_layers);
    s
}

/// `senet plan`: one step's dispatches in the order they run.
#[derive(Clone, Debug, clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    #[arg(long, default_value_t = crate::hparams::BATCH_SIZE)]
    pub batch_size: usize,
    /// The evaluation pass instead of the training step.
    #[arg(long)]
    pub eval: bool,
    /// The plan's precision.
    #[arg(long, value_enum, default_value_t = crate::hparams::PRECISION)]
    pub precision: Precision,
}

/// One dispatch of a plan, as `senet plan` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct PlanRow {
    pub layer: String,
    pub pass: crate::gpu::Pass,
    pub kernel: String,
    pub workgroups: [u32; 3],
    pub mflop: f64,
    pub bytes: f64,
}

/// What one list of dispatches adds up to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PassTotals {
    pub dispatches: usize,
    pub mflop: f64,
    /// The least the dispatches must move (each input read once, each output written once).
    pub bytes: f64,
    pub bytes_per_image: f64,
}

impl PassTotals {
    fn of(list: &[&Dispatch], batch: usize) -> PassTotals {
        let bytes: f64 = list.iter().map(|d| d.bytes).sum();
        PassTotals {
            dispatches: list.len(),
            mflop: list.iter().map(|d| d.flops).sum::<f64>() / 1e6,
            bytes,
            bytes_per_image: bytes / batch.max(1) as f64,
        }
    }
}

/// The training step's and the evaluation pass's totals at one batch size.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PlanTotals {
    pub batch_size: usize,
    pub train: PassTotals,
    pub eval: PassTotals,
}

/// `senet plan`: the dispatches of the step asked for, and both passes' totals.
#[derive(Clone, Debug, Serialize)]
pub struct PlanListing {
    pub rows: Vec<PlanRow>,
    pub totals: PlanTotals,
}

/// The dispatches of one training step (or evaluation pass) of `args`'s model, in order, and the
/// totals of both.
pub fn plan_rows(gpu: Arc<Gpu>, args: &PlanArgs) -> Result<PlanListing> {
    let net = Network::new_in(gpu, args.input.config(&args.model)?, OptimizerConfig::adam(1e-3), 0, args.precision)?;
    let plan = net.plan(args.batch_size)?;
    let (train, eval) = (net.train_dispatches(&plan), net.eval_dispatches(&plan));
    let totals = PlanTotals {
        batch_size: args.batch_size,
        train: PassTotals::of(&train, args.batch_size),
        eval: PassTotals::of(&eval, args.batch_size),
    };
    let list = if args.eval { eval } else { train };
    let rows = list
        .into_iter()
        .map(|d| PlanRow {
            layer: d.layer.clone(),
            pass: d.pass,
            kernel: d.label.to_string(),
            workgroups: d.workgroups,
            mflop: d.flops / 1e6,
            bytes: d.bytes,
        })
        .collect();
    Ok(PlanListing { rows, totals })
}

/// The totals lines below `senet plan`'s table.
pub fn format_plan_totals(t: &PlanTotals) -> String {
    let line = |what: &str, p: &PassTotals| {
        format!(
            "{what:<11} {:>5} dispatches {:>12.1} MFLOP {:>14.0} bytes ({:.0} per image, batch {})\n",
            p.dispatches, p.mflop, p.bytes, p.bytes_per_image, t.batch_size
        )
    };
    line("train step", &t.train) + &line("eval pass", &t.eval)
}

pub fn format_plan(rows: &[PlanRow]) -> String {
    let mut s = format!(
        "{:>4} {:<24} {:<10} {:<34} {:>18} {:>10} {:>12}\n",
        "#", "layer", "pass", "kernel", "workgroups", "MFLOP", "bytes"
    );
    for (i, r) in rows.iter().enumerate() {
        let [x, y, z] = r.workgroups;
        s += &format!(
            "{:>4} {:<24} {:<10} {:<34} {:>18} {:>10.1} {:>12.0}\n",
            i,
            r.layer,
            format!("{:?}", r.pass),
            r.kernel,
            format!("{x}x{y}x{z}"),
            r.mflop,
            r.bytes
        );
    }
    s
}

// ---------------------------------------------------------------------------------------------
// `mpirun -np N senet bench`: data-parallel scaling

/// What `mpirun -np N senet bench` measures: rank 0 training alone (the others waiting, asleep),
/// then every rank training data-parallel steps, in the same run on the same adapters.
#[derive(Clone, Debug, Serialize)]
pub struct DataParallelReport {
    pub ranks: usize,
    /// Each rank's adapter, in rank order.
    pub adapters: Vec<String>,
    pub model: String,
    pub batch_per_rank: usize,
    /// Floats in the flat gradient buffer (what one all-reduce moves, each way).
    pub gradient_floats: usize,
    /// Rank 0 alone: the one-process loop (steps pipelined, no exchange).
    pub alone_images_per_s: f64,
    /// Each rank's images/s in data-parallel steps.
    pub per_rank_images_per_s: Vec<f64>,
    pub total_images_per_s: f64,
    /// total / (ranks × alone): 1 is perfect scaling.
    pub efficiency: f64,
    /// Per rank: the host-staged all-reduce (read-back, MPI, write) per step, and its share of the step.
    pub allreduce_ms_per_step: Vec<f64>,
    pub allreduce_share: Vec<f64>,
    /// The same steps with `--sync-bn` (SyncBatchNorm), measured after: each rank's images/s,
    /// their total, and per rank the batch norms' exchanges per step (ms) and share of the step.
    pub sync_bn_per_rank_images_per_s: Vec<f64>,
    pub sync_bn_total_images_per_s: f64,
    pub sync_bn_exchange_ms_per_step: Vec<f64>,
    pub sync_bn_exchange_share: Vec<f64>,
    /// Host exchanges per `--sync-bn` step: two per batch norm.
    pub sync_bn_exchanges_per_step: usize,
}

/// Time `args.steps` steps alone on rank 0, then `args.steps` data-parallel steps on every rank,
/// then as many with `--sync-bn` (each after 2 warm-up steps). Every rank returns the same report.
pub fn bench_data_parallel(gpu: Arc<Gpu>, args: &BenchArgs, dist: &crate::dist::Dist) -> Result<DataParallelReport> {
    let config = args.input.config(&args.model)?;
    let mut net = Network::new(gpu.clone(), config.clone(), OptimizerConfig::adam(1e-3), 0)?;
    let n = args.batch_size;
    let plan = net.plan(n)?;
    let [h, w] = config.input_hw;
    let bench = DataParallelBench::new(&gpu, dist, &config, n, args.steps.max(1));
    plan.write_batch(&gpu, &bench.images, &bench.labels)?;

    let alone = bench.rank0_alone(&mut net, &plan)?;
    let all = bench.together(&mut net, &plan, false)?;
    let sync_plan = sync_bn_plan(&mut net, n, dist)?;
    let sync = bench.together(&mut net, &sync_plan, true)?;

    // Columns of the gathered [images/s, exchange ms per step, exchange share] rows, one per rank.
    let col = |v: &[f32], k: usize| -> Vec<f64> { v.chunks(3).map(|r| f64::from(r[k])).collect() };
    let per_rank = col(&all, 0);
    let total: f64 = per_rank.iter().sum();
    let alone = dist.from_root(|| Ok(alone))?;
    let names = dist.all_gather_bytes(gpu.describe().into_bytes())?;
    Ok(DataParallelReport {
        ranks: dist.size,
        adapters: names.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect(),
        model: format!(
            "{} width {} {}x{h}x{w} -> {}",
            config.model, config.width, config.in_channels, config.num_classes
        ),
        batch_per_rank: n,
        gradient_floats: net.flat.grads.numel(),
        alone_images_per_s: alone,
        per_rank_images_per_s: per_rank,
        total_images_per_s: total,
        efficiency: total / (dist.size as f64 * alone),
        allreduce_ms_per_step: col(&all, 1),
        allreduce_share: col(&all, 2),
        sync_bn_total_images_per_s: col(&sync, 0).iter().sum(),
        sync_bn_per_rank_images_per_s: col(&sync, 0),
        sync_bn_exchange_ms_per_step: col(&sync, 1),
        sync_bn_exchange_share: col(&sync, 2),
        sync_bn_exchanges_per_step: sync_plan.exchanges.len(),
    })
}

/// What the timed phases of [`bench_data_parallel`] share: the device, the job, this rank's
/// batch and the number of timed steps.
struct DataParallelBench<'a> {
    gpu: &'a Gpu,
    dist: &'a crate::dist::Dist,
    images: Vec<f32>,
    labels: Vec<u32>,
    n: usize,
    steps: usize,
}

impl<'a> DataParallelBench<'a> {
    /// A synthetic batch of `n` images, each rank its own (as in training).
    fn new(
        gpu: &'a Gpu,
        dist: &'a crate::dist::Dist,
        config: &crate::model::ModelConfig,
        n: usize,
        steps: usize,
    ) -> Self {
        let [h, w] = config.input_hw;
        let images: Vec<f32> = (0..n * config.in_channels * h * w)
            .map(|i| (((i + dist.rank * 131) * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let labels: Vec<u32> = (0..n).map(|i| ((i + dist.rank) % config.num_classes) as u32).collect();
        DataParallelBench { gpu, dist, images, labels, n, steps }
    }

    /// Rank 0 alone, the single-process loop (the other ranks wait at the barrier): images/s
    /// there, 0 on the other ranks.
    fn rank0_alone(&self, net: &mut Network, plan: &StepPlan) -> Result<f64> {
        let (gpu, dist) = (self.gpu, self.dist);
        dist.barrier();
        let mut alone = 0.0;
        if dist.is_root() {
            for _ in 0..2 {
                net.train_step(plan);
            }
            gpu.wait()?;
            let t0 = Instant::now();
            for _ in 0..self.steps {
                net.train_step(plan);
            }
            gpu.wait()?;
            alone = (self.n * self.steps) as f64 / t0.elapsed().as_secs_f64();
        }
        dist.barrier();
        Ok(alone)
    }

    /// Every rank together, data-parallel steps of `plan` (per-rank batch norm, or `--sync-bn`'s
    /// when `sync_bn`). Per rank, gathered in rank order: [images/s, ms of the exchange per step,
    /// its share of the step].
    fn together(&self, net: &mut Network, plan: &StepPlan, sync_bn: bool) -> Result<Vec<f32>> {
        let (gpu, dist, n, steps) = (self.gpu, self.dist, self.n, self.steps);
        plan.write_batch(gpu, &self.images, &self.labels)?;
        for _ in 0..2 {
            crate::model::data_parallel::data_parallel_step(net, plan, dist, false)?;
        }
        gpu.wait()?;
        dist.barrier();
        let t0 = Instant::now();
        let mut exchange = 0.0;
        for _ in 0..steps {
            let r = crate::model::data_parallel::data_parallel_step(net, plan, dist, false)?;
            exchange += if sync_bn { r.sync_bn_secs } else { r.allreduce_secs };
        }
        gpu.wait()?;
        let secs = t0.elapsed().as_secs_f64();
        let mine = [(n * steps) as f32 / secs as f32, (1e3 * exchange / steps as f64) as f32, (exchange / secs) as f32];
        dist.all_gather_f32(&mine)
    }
}

/// The step plan of batch `n` with `--sync-bn`'s exchanges (on more than one rank); the network
/// is left as it was, without them.
fn sync_bn_plan(net: &mut Network, n: usize, dist: &crate::dist::Dist) -> Result<StepPlan> {
    net.sync_bn = dist.size > 1;
    let p = net.plan(n);
    net.sync_bn = false;
    p
}

pub fn format_data_parallel(r: &DataParallelReport) -> String {
    let mut s = format!(
        "{} batch {} per rank, {} ranks; all-reduce of {} floats ({:.2} MB) per step, host-staged\n",
        r.model,
        r.batch_per_rank,
        r.ranks,
        r.gradient_floats,
        r.gradient_floats as f64 * 4e-6
    );
    s += &format!("rank 0 alone       {:>10.1} images/s\n", r.alone_images_per_s);
    for (k, rate) in r.per_rank_images_per_s.iter().enumerate() {
        s += &format!(
            "rank {k:<3}          {:>10.1} images/s, all-reduce {:.1} ms/step = {:.1} % of the step  ({})\n",
            rate,
            r.allreduce_ms_per_step[k],
            100.0 * r.allreduce_share[k],
            r.adapters.get(k).map_or("", String::as_str)
        );
    }
    s += &format!("total              {:>10.1} images/s\n", r.total_images_per_s);
    s += &format!(
        "scaling            {:>10.2}x one rank; efficiency {:.1} % (total / ({} x alone))\n",
        r.total_images_per_s / r.alone_images_per_s,
        100.0 * r.efficiency,
        r.ranks
    );
    s += &format!(
        "--sync-bn: {} batch-norm exchanges per step (statistics forward, gradient sums backward), host-staged\n",
        r.sync_bn_exchanges_per_step
    );
    for (k, rate) in r.sync_bn_per_rank_images_per_s.iter().enumerate() {
        s += &format!(
            "rank {k:<3} sync-bn  {:>10.1} images/s, exchanges {:.1} ms/step = {:.1} % of the step\n",
            rate,
            r.sync_bn_exchange_ms_per_step[k],
            100.0 * r.sync_bn_exchange_share[k]
        );
    }
    s += &format!(
        "total sync-bn      {:>10.1} images/s ({:.1} % of per-rank batch norm's)\n",
        r.sync_bn_total_images_per_s,
        100.0 * r.sync_bn_total_images_per_s / r.total_images_per_s
    );
    s
}
