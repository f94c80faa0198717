//! Evaluation and prediction: the test-set pass used after every training epoch, `senet eval`
//! (loss, accuracy, per-class accuracy, confusion matrix of a checkpoint), the checkpoint
//! loading `eval`, `excitations` and `predict` share, and `senet predict`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use indicatif::ProgressBar;

use crate::args::DataArgs;
use crate::checkpoint;
use crate::data::loader::{self, Preprocess};
use crate::data::{self, DatasetKind};
use crate::dist::Dist;
use crate::gpu::{Gpu, Precision};
use crate::hparams as hp;
use crate::model::ModelConfig;
use crate::model::plan::{Network, StepPlan, clear_metrics};
use crate::ops::cross_entropy::{per_sample, result};
use crate::ops::optimizer::OptimizerConfig;
use crate::progress::bar;

// ---------------------------------------------------------------------------------------------
// The evaluation pass

/// Plans for every batch size the epoch uses (full and the last partial), built once.
pub(crate) fn plans_for(net: &Network, batch: usize, lens: &[usize]) -> Result<HashMap<usize, StepPlan>> {
    let mut plans = HashMap::new();
    for &len in lens {
        let full = batch.min(len);
        for n in [full, len % full] {
            if n > 0 && !plans.contains_key(&n) {
                plans.insert(n, net.plan(n)?);
            }
        }
    }
    Ok(plans)
}

/// Sum the metrics buffers of every plan: (loss sum, correct, count).
pub(crate) fn read_sums(net: &Network, plans: &HashMap<usize, StepPlan>, eval: bool) -> Result<(f64, f64, f64)> {
    let mut s = (0.0, 0.0, 0.0);
    for p in plans.values() {
        let r = if eval { &p.eval_result } else { &p.train_result }.read::<f32>(&net.gpu)?;
        s.0 += f64::from(r[result::SUM_LOSS]);
        s.1 += f64::from(r[result::SUM_CORRECT]);
        s.2 += f64::from(r[result::SUM_COUNT]);
    }
    Ok(s)
}

/// The running top-5 correct count of every plan's metrics buffer (the loss kernel's, on the GPU).
pub(crate) fn read_correct5(net: &Network, plans: &HashMap<usize, StepPlan>, eval: bool) -> Result<f64> {
    let mut s = 0.0;
    for p in plans.values() {
        let r = if eval { &p.eval_result } else { &p.train_result }.read::<f32>(&net.gpu)?;
        s += f64::from(r[result::SUM_CORRECT5]);
    }
    Ok(s)
}

/// Run `batches` through `net` in eval mode, each in the plan of its size (a batch that
/// `--skip-bad-images` made short in one built for it, kept in `extra`); the unreadable files left
/// out are named on stderr and counted.
fn eval_batches(
    net: &Network,
    plans: &HashMap<usize, StepPlan>,
    extra: &mut HashMap<usize, StepPlan>,
    batches: impl Iterator<Item = Result<loader::Batch>>,
    pb: &ProgressBar,
) -> Result<usize> {
    let mut skipped = 0;
    for b in batches {
        let b = b?;
        for bad in &b.skipped {
            pb.suspend(|| eprintln!("skipped (--skip-bad-images): {bad}"));
        }
        skipped += b.skipped.len();
        let n = b.labels.len();
        if n > 0 {
            if !plans.contains_key(&n) && !extra.contains_key(&n) {
                extra.insert(n, net.plan(n)?);
            }
            let plan = plans.get(&n).or_else(|| extra.get(&n)).context("no plan for this batch size")?;
            plan.write_batch(&net.gpu, &b.images, &b.labels)?;
            net.eval_batch(plan);
        }
        pb.inc(1);
    }
    Ok(skipped)
}

/// (loss sum, correct, count, top-5 correct) of the eval metrics of `plans` and `extra`.
fn eval_sums(net: &Network, plans: &HashMap<usize, StepPlan>, extra: &HashMap<usize, StepPlan>) -> Result<[f64; 4]> {
    let (a, b) = (read_sums(net, plans, true)?, read_sums(net, extra, true)?);
    let c5 = read_correct5(net, plans, true)? + read_correct5(net, extra, true)?;
    Ok([a.0 + b.0, a.1 + b.1, a.2 + b.2, c5])
}

/// Evaluate on `ds` with batch norm in eval mode: (mean loss, accuracy, top-5 accuracy, image
/// files left out as unreadable). A bar named `what` shows the pass on a terminal.
pub fn evaluate(
    net: &Network,
    plans: &HashMap<usize, StepPlan>,
    ds: &Arc<data::Dataset>,
    batch: usize,
    pre: &Preprocess,
    what: &str,
) -> Result<(f64, f64, f64, usize)> {
    for p in plans.values() {
        clear_metrics(&net.gpu, &p.eval_result);
    }
    let pb = bar(ds.len().div_ceil(batch.max(1)) as u64, what.to_string());
    let batches = loader::epoch_batches(ds.clone(), batch, Preprocess { augment: false, ..pre.clone() }, false, 0, 0);
    let mut extra = HashMap::new();
    let skipped = eval_batches(net, plans, &mut extra, batches, &pb)?;
    pb.finish_and_clear();
    let [loss, correct, count, correct5] = eval_sums(net, plans, &extra)?;
    Ok((loss / count.max(1.0), correct / count.max(1.0), correct5 / count.max(1.0), skipped))
}

/// [`evaluate`] split over the ranks of a data-parallel job: the test set is cut into the same
/// batches as one process would make, rank r evaluates batches r, r + N, r + 2N, … and the
/// (loss sum, correct, count) are summed over the ranks, so every image counts once and each is
/// evaluated in the very batch it would be in alone: the same predictions, the same accuracy.
/// The loss sum differs from one process's only by the order of its f32 additions.
pub fn evaluate_sharded(
    net: &Network,
    plans: &HashMap<usize, StepPlan>,
    ds: &Arc<data::Dataset>,
    batch: usize,
    pre: &Preprocess,
    dist: &Dist,
    what: &str,
) -> Result<(f64, f64, f64, usize)> {
    for p in plans.values() {
        clear_metrics(&net.gpu, &p.eval_result);
    }
    let pre = Preprocess { augment: false, ..pre.clone() };
    let order: Vec<usize> = (0..ds.len()).collect();
    // Rank 0's share on its bar; the other ranks draw nothing.
    let mine: Vec<Vec<usize>> =
        order.chunks(batch.max(1)).skip(dist.rank).step_by(dist.size.max(1)).map(<[usize]>::to_vec).collect();
    let pb = if dist.is_root() { bar(mine.len() as u64, what.to_string()) } else { ProgressBar::hidden() };
    let batches: Box<dyn Iterator<Item = Result<loader::Batch>>> = if ds.files.is_some() {
        Box::new(loader::stream(ds.clone(), mine, pre, 0, 0))
    } else {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let ds = ds.clone();
        Box::new(mine.into_iter().map(move |idx| Ok(loader::make_batch(&ds, &idx, &pre, &mut rng))))
    };
    let mut extra = HashMap::new();
    let skipped = eval_batches(net, plans, &mut extra, batches, &pb)?;
    pb.finish_and_clear();
    let mut sums = eval_sums(net, plans, &extra)?;
    dist.all_reduce_sum_f64(&mut sums)?;
    let [loss, correct, count, correct5] = sums;
    Ok((loss / count.max(1.0), correct / count.max(1.0), correct5 / count.max(1.0), skipped))
}

// ---------------------------------------------------------------------------------------------
// Evaluation of a checkpoint

#[derive(Clone, Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// A safetensors state dict (config from config.json beside it, else flags, else the shapes).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Model width when there is no config.json beside the checkpoint.
    #[arg(long)]
    pub width: Option<f64>,
    /// SE reduction when there is no config.json beside the checkpoint.
    #[arg(long)]
    pub reduction: Option<usize>,
    #[arg(long, default_value_t = hp::BATCH_SIZE)]
    pub batch_size: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Evaluate in f32 or f16 (f16 activations and convolution operands; any checkpoint, whatever
    /// precision it was trained in).
    #[arg(long, value_enum, default_value_t = hp::PRECISION)]
    pub precision: Precision,
}

/// Evaluation results with per-class figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub accuracy: f64,
    /// Share of images whose class is among the 5 highest logits.
    pub top5_accuracy: f64,
    pub loss: f64,
    pub correct: usize,
    pub total: usize,
    pub classes: Vec<String>,
    pub per_class_accuracy: Vec<f64>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<usize>>,
}

/// The model configuration saved beside a checkpoint (a run folder's config.json), if there is one.
fn saved_model_config(ckpt: &Path) -> Result<Option<ModelConfig>> {
    let Some(j) = ckpt.parent().map(|d| d.join("config.json")).filter(|j| j.is_file()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&j).with_context(|| format!("reading {}", j.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", j.display()))?;
    let model = v.get("model").cloned().unwrap_or(v);
    serde_json::from_value(model)
        .map(Some)
        .with_context(|| format!("{}: field \"model\" is not a model configuration", j.display()))
}

/// The model configuration for a checkpoint: config.json beside it, else flags over the shapes.
pub fn checkpoint_config(
    ckpt: &Path,
    sd: &checkpoint::StateDict,
    input_hw: [usize; 2],
    width: Option<f64>,
    reduction: Option<usize>,
) -> Result<ModelConfig> {
    if let Some(cfg) = saved_model_config(ckpt)? {
        // A flag that says otherwise than the run's own config.json is an error, never ignored.
        let json = ckpt.with_file_name("config.json");
        if let Some(w) = width.filter(|&w| w != cfg.width) {
            bail!("--width {w} contradicts {}: the model has width {}", json.display(), cfg.width);
        }
        if let Some(r) = reduction.filter(|&r| r != cfg.reduction) {
            bail!("--reduction {r} contradicts {}: the model has reduction {}", json.display(), cfg.reduction);
        }
        return Ok(cfg);
    }
    let mut cfg = checkpoint::infer_config(sd, input_hw, &ckpt.display().to_string())?;
    if let Some(w) = width {
        cfg.width = w;
    }
    if let Some(r) = reduction {
        cfg.reduction = r;
    }
    Ok(cfg)
}

/// Load a checkpoint and its test set, run the evaluation pass over every test image, and call
/// `on_batch` after each batch (its plan holds the batch's outputs). Returns the configuration
/// and (loss sum, correct, count).
pub fn evaluate_checkpoint(
    gpu: Arc<Gpu>,
    args: &EvalArgs,
    mut on_batch: impl FnMut(&Network, &StepPlan, &[u32]) -> Result<()>,
) -> Result<(ModelConfig, (f64, f64, f64))> {
    ensure!(args.batch_size >= 1, "--batch-size must be at least 1");
    let sd = checkpoint::load(&args.checkpoint)?;
    // Image folders are resized to the size the model was trained at, when the run says it.
    let trained_hw = saved_model_config(&args.checkpoint)?.map(|c| c.input_hw);
    let splits = args.data.load(trained_hw.filter(|_| args.data.dataset == Some(DatasetKind::Folder)))?;
    let test = Arc::new(splits.test);
    let [c, h, w] = test.shape;
    let mut config = checkpoint_config(&args.checkpoint, &sd, [h, w], args.width, args.reduction)?;
    ensure!(
        config.in_channels == c && config.input_hw == [h, w],
        "{}: the model takes {}x{}x{} images, {} has {c}x{h}x{w}",
        args.checkpoint.display(),
        config.in_channels,
        config.input_hw[0],
        config.input_hw[1],
        splits.name
    );
    if config.classes.is_empty() {
        config.classes = test.classes.clone();
    }
    let mut net = Network::new_in(gpu, config.clone(), OptimizerConfig::sgd(0.0, 0.0), 0, args.precision)?;
    checkpoint::apply(&mut net, &sd, &args.checkpoint.display().to_string())?;
    let plans = plans_for(&net, args.batch_size, &[test.len()])?;
    let pre =
        Preprocess { normalize: config.normalize.clone(), load: args.data.load_options(), ..Preprocess::default() };
    for p in plans.values() {
        clear_metrics(&net.gpu, &p.eval_result);
    }
    // On a terminal, a bar on stderr (stdout stays the report, or the --json object); else nothing.
    let pb = bar(test.len().div_ceil(args.batch_size) as u64, "eval".to_string());
    let mut extra = HashMap::new();
    for b in loader::epoch_batches(test.clone(), args.batch_size, pre, false, 0, 0) {
        let b = b?;
        for bad in &b.skipped {
            pb.suspend(|| eprintln!("skipped (--skip-bad-images): {bad}"));
        }
        let n = b.labels.len();
        if n == 0 {
            continue;
        }
        if !plans.contains_key(&n) && !extra.contains_key(&n) {
            extra.insert(n, net.plan(n)?);
        }
        let plan = plans.get(&n).or_else(|| extra.get(&n)).context("no plan for this batch size")?;
        plan.write_batch(&net.gpu, &b.images, &b.labels)?;
        net.eval_batch(plan);
        on_batch(&net, plan, &b.labels)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    let [loss, correct, count, _] = eval_sums(&net, &plans, &extra)?;
    Ok((config, (loss, correct, count)))
}

pub fn eval(gpu: Arc<Gpu>, args: &EvalArgs) -> Result<EvalReport> {
    let mut confusion: Vec<Vec<usize>> = Vec::new();
    let mut correct5 = 0.0;
    let (config, (loss, correct, count)) = evaluate_checkpoint(gpu, args, |net, plan, labels| {
        let k = net.config.num_classes;
        if confusion.is_empty() {
            confusion = vec![vec![0usize; k]; k];
        }
        let per = plan.per_sample.read::<f32>(&net.gpu)?;
        for (i, &t) in labels.iter().enumerate() {
            let pred = per[per_sample::LEN * i + per_sample::PREDICTED] as usize;
            correct5 += f64::from(per[per_sample::LEN * i + per_sample::CORRECT5]);
            if (t as usize) < k && pred < k {
                confusion[t as usize][pred] += 1;
            }
        }
        Ok(())
    })?;
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let n: usize = row.iter().sum();
            if n == 0 { 0.0 } else { row[i] as f64 / n as f64 }
        })
        .collect();
    Ok(EvalReport {
        accuracy: correct / count.max(1.0),
        top5_accuracy: correct5 / count.max(1.0),
        loss: loss / count.max(1.0),
        correct: correct as usize,
        total: count as usize,
        classes: config.classes,
        per_class_accuracy,
        confusion,
    })
}

/// The report as the tables `senet eval` prints.
pub fn format_report(r: &EvalReport) -> String {
    let mut s = format!(
        "test loss {:.4}  accuracy {:.4} ({}/{})  top-5 accuracy {:.4}\n\nper-class accuracy:\n",
        r.loss, r.accuracy, r.correct, r.total, r.top5_accuracy
    );
    for (name, a) in r.classes.iter().zip(&r.per_class_accuracy) {
        s += &format!("  {name:>14} {a:.4}\n");
    }
    s += "\nconfusion matrix (rows: true class, columns: predicted):\n";
    for (i, row) in r.confusion.iter().enumerate() {
        s += &format!("  {:>3} |", i);
        for v in row {
            s += &format!(" {v:>5}");
        }
        s += "\n";
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Prediction

/// Image files as given, and in place of each folder its image files (by extension), sorted.
pub fn expand_image_folders(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(p)
            .with_context(|| format!("reading folder {}", p.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| f.is_file() && image::ImageFormat::from_path(f).is_ok())
            .collect();
        ensure!(!files.is_empty(), "{}: a folder with no image files (png, jpg, bmp, …)", p.display());
        files.sort();
        out.extend(files);
    }
    Ok(out)
}

/// What `predict` takes beside the checkpoint and the images.
#[derive(Clone, Debug, Default)]
pub struct PredictOptions {
    /// How many classes per image.
    pub k: usize,
    /// Model width and SE reduction when there is no config.json beside the checkpoint.
    pub width: Option<f64>,
    pub reduction: Option<usize>,
    /// The input size when there is no config.json.
    pub image_size: Option<[usize; 2]>,
    /// Resize to size / crop_pct and crop the centre (timm's evaluation transform). None: as the
    /// run was evaluated — the centre crop at its crop_pct for a model trained on an image
    /// folder, else the whole image resized to the input size.
    pub crop_pct: Option<f64>,
}

/// The crop_pct of a run trained on an image folder (its config.json), whose evaluation split
/// was read through Resize + CenterCrop; None for other runs and bare state dicts.
fn saved_folder_crop_pct(ckpt: &Path) -> Result<Option<f64>> {
    let Some(j) = ckpt.parent().map(|d| d.join("config.json")).filter(|j| j.is_file()) else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&j).with_context(|| format!("reading {}", j.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", j.display()))?;
    let data = v.get("train").and_then(|t| t.get("data"));
    if data.and_then(|d| d.get("dataset")).and_then(|d| d.as_str()) != Some("folder") {
        return Ok(None);
    }
    Ok(Some(data.and_then(|d| d.get("crop_pct")).and_then(|c| c.as_f64()).unwrap_or(hp::CROP_PCT)))
}

/// Top-`k` (class, class index, probability) for each image file.
pub fn predict(
    gpu: Arc<Gpu>,
    ckpt: &Path,
    images: &[PathBuf],
    opts: &PredictOptions,
) -> Result<Vec<Vec<(String, usize, f32)>>> {
    let PredictOptions { k, width, reduction, image_size, crop_pct } = *opts;
    ensure!(!images.is_empty(), "predict needs at least one image");
    let crop_pct = match crop_pct {
        Some(c) => Some(c),
        None => saved_folder_crop_pct(ckpt)?,
    };
    let sd = checkpoint::load(ckpt)?;
    let config = checkpoint_config(ckpt, &sd, image_size.unwrap_or([hp::IMAGE_SIZE; 2]), width, reduction)?;
    if let Some([h, w]) = image_size.filter(|&s| s != config.input_hw) {
        let [mh, mw] = config.input_hw;
        bail!(
            "--image-size {h}x{w} contradicts {}: the model takes {mh}x{mw} images",
            ckpt.with_file_name("config.json").display()
        );
    }
    ensure!(
        (1..=config.num_classes).contains(&k),
        "--topk {k}: expected 1 to the model's {} classes",
        config.num_classes
    );
    let mut net = Network::new(gpu, config.clone(), OptimizerConfig::sgd(0.0, 0.0), 0)?;
    checkpoint::apply(&mut net, &sd, &ckpt.display().to_string())?;
    let plan = net.plan(1)?;
    let [h, w] = config.input_hw;
    let c = config.in_channels;
    let pre = Preprocess { normalize: config.normalize.clone(), ..Preprocess::default() };
    let mut out = Vec::new();
    for path in images {
        let pixels = match crop_pct {
            Some(pct) => data::folder::decode_center_crop(path, c, [h, w], pct)?,
            None => data::folder::decode(path, c, [h, w])?,
        };
        let ds = data::Dataset {
            shape: [c, h, w],
            images: pixels,
            labels: vec![0],
            classes: vec![String::new()],
            files: None,
        };
        let batch = loader::make_batch(&ds, &[0], &pre, &mut rand::SeedableRng::seed_from_u64(0));
        plan.write_batch(&net.gpu, &batch.images, &[0])?;
        net.eval_batch(&plan);
        let logits = plan.logits().read_f32(&net.gpu)?;
        let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = logits.iter().map(|&l| f64::from(l - mx).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let mut ranked: Vec<(usize, f64)> = exps.iter().map(|e| e / sum).enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        out.push(
            ranked
                .into_iter()
                .take(k)
                .map(|(i, p)| (config.classes.get(i).cloned().unwrap_or_else(|| format!("class {i}")), i, p as f32))
                .collect(),
        );
    }
    Ok(out)
}
