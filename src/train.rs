//! Training and evaluation, top to bottom: hyper-parameters, data, network, training loop,
//! evaluation, outputs. The kernels live in `ops/`, the step plans in `model::plan`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint;
use crate::data::loader::{self, Preprocess};
use crate::data::{self, DatasetKind, Splits, cifar10};
use crate::gpu::Gpu;
use crate::model::ModelConfig;
use crate::model::plan::{Network, StepPlan, clear_metrics};
use crate::ops::cross_entropy::result;
use crate::ops::optimizer::OptimizerConfig;

// ---------------------------------------------------------------------------------------------
// Hyper-parameters. Defaults are the base recipe of the seed document: SENet width 1, Adam
// lr 1e-3, batch 128, 10 epochs, ToTensor() preprocessing only.

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Adamw,
    Sgd,
}

/// Where the data comes from (shared by train, eval).
#[derive(Clone, Debug, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct DataArgs {
    /// Dataset. Default: cifar10 when found in --data-dir (or ./data), else the bundled sample.
    #[arg(long, value_enum)]
    pub dataset: Option<DatasetKind>,
    /// Folder of the dataset (cifar10: holds cifar-10-batches-bin; fashion-mnist default:
    /// /usr/share/datasets/fashion-mnist; folder: DIR/train/<class>, DIR/test/<class>).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Evaluate on the first N test images only.
    #[arg(long)]
    pub limit_test: Option<usize>,
    /// Fetch CIFAR-10 into --data-dir (default ./data) if it is not there, checking its MD5.
    #[arg(long)]
    pub download: bool,
    /// Image folders: resize every image to H×W (`64` or `96x128`). Default: the first training
    /// image's size when training; the model's input size when evaluating a checkpoint.
    #[arg(long, value_parser = parse_image_size)]
    #[serde(default)]
    pub image_size: Option<[usize; 2]>,
}

/// `--image-size`: `S` (square) or `HxW`, each 1..=4096.
pub fn parse_image_size(s: &str) -> Result<[usize; 2], String> {
    let side = |t: &str| match t.trim().parse::<usize>() {
        Ok(v) if (1..=4096).contains(&v) => Ok(v),
        _ => Err(format!("expected a size from 1 to 4096 pixels, got {t:?}")),
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok([side(h)?, side(w)?]),
        None => side(s).map(|v| [v, v]),
    }
}

#[derive(Clone, Debug, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Train on the first N training images only.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// senet (the base model); [se-]resnet20/32/44/56/110 (CIFAR ResNets, any 6n+2 depth);
    /// [se-]resnet18/34/50/101/152 (ImageNet ResNets, for larger images).
    #[arg(long, default_value = "senet")]
    #[serde(default = "default_model")]
    pub model: String,
    /// Channel width multiplier: 1.0 = 64…1024 channels for senet, 16/32/64 for the ResNets.
    #[arg(long, default_value_t = 1.0)]
    pub width: f64,
    /// Biases in the SE blocks' FC layers.
    #[arg(long)]
    #[serde(default)]
    pub se_bias: bool,
    /// Ablation: the SE squeeze, mean or max over each channel.
    #[arg(long, value_enum, default_value_t = crate::ops::se_block::Squeeze::Avg)]
    #[serde(default)]
    pub squeeze: crate::ops::se_block::Squeeze,
    /// Ablation: the SE gate.
    #[arg(long, value_enum, default_value_t = crate::ops::se_block::Excitation::Sigmoid)]
    #[serde(default)]
    pub excitation: crate::ops::se_block::Excitation,
    /// Ablation: where SE-ResNet blocks put the SE block.
    #[arg(long, value_enum, default_value_t = crate::model::SePlacement::Standard)]
    #[serde(default)]
    pub se_placement: crate::model::SePlacement,
    /// Ablation: the stages (1-based, comma-separated) whose blocks get SE [default: all].
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub se_stages: Vec<usize>,
    /// SE reduction ratio r (hidden width C/r).
    #[arg(long, default_value_t = 16)]
    pub reduction: usize,
    /// Total epochs [default: 10; with --resume, the run's own].
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adam)]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// L2 (Adam, SGD) or decoupled (AdamW) weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Learning-rate schedule over the run: constant, step (÷10 at 50 % and 75 % of the epochs,
    /// the paper's CIFAR schedule) or cosine (to 0 at the end).
    #[arg(long, value_enum, default_value_t = Schedule::Constant)]
    #[serde(default)]
    pub schedule: Schedule,
    /// Linear warm-up from 0 over this many epochs (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    #[serde(default)]
    pub warmup_epochs: f64,
    /// A preset: `paper` = the SENet paper's CIFAR recipe (SGD momentum 0.9, lr 0.1, weight decay
    /// 1e-4, step schedule, random crop + flip, per-channel normalisation). Flags given
    /// explicitly keep their values.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub recipe: Option<Recipe>,
    /// Normalise inputs with the training set's per-channel mean and std.
    #[arg(long)]
    pub normalize: bool,
    /// Random crop (4-pixel padding) and horizontal flip while training.
    #[arg(long)]
    pub augment: bool,
    /// Run folder for config.json, metrics.csv and checkpoints.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Start from this state dict (safetensors).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue the run in RUN_DIR (its config.json and resume.safetensors) from its last
    /// finished epoch, with its own settings; --epochs may raise the total.
    #[arg(long, value_name = "RUN_DIR")]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Print the per-kernel time table (as `senet bench`) for one step after the first epoch.
    #[arg(long)]
    #[serde(default)]
    pub profile: bool,
    /// Read the running loss every N steps (the only host wait inside an epoch).
    #[arg(long, default_value_t = 20)]
    pub log_every: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Constant,
    Step,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    Paper,
}

/// The learning rate of (0-based) step `step` of `total` steps, `per_epoch` steps an epoch.
pub fn lr_at(base: f64, schedule: Schedule, warmup_epochs: f64, step: usize, per_epoch: usize, total: usize) -> f64 {
    let warmup = (warmup_epochs * per_epoch as f64).round() as usize;
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        Schedule::Constant => base,
        Schedule::Step => {
            let epoch = step / per_epoch.max(1);
            let epochs = total.div_ceil(per_epoch.max(1));
            // ÷10 at 50 % and at 75 % of the epochs.
            let drops = usize::from(2 * epoch >= epochs) + usize::from(4 * epoch >= 3 * epochs);
            base * 0.1f64.powi(drops as i32)
        }
        Schedule::Cosine => {
            let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
            base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}

fn default_model() -> String {
    "senet".into()
}

impl TrainArgs {
    /// Reject nonsense before any work starts.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.epochs() >= 1, "--epochs must be at least 1, got {}", self.epochs());
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1, got {}", self.batch_size);
        ensure!(self.lr > 0.0 && self.lr.is_finite(), "--lr must be a positive number, got {}", self.lr);
        ensure!(self.momentum >= 0.0 && self.momentum < 1.0, "--momentum must be in [0, 1), got {}", self.momentum);
        ensure!(self.weight_decay >= 0.0, "--weight-decay must be >= 0, got {}", self.weight_decay);
        ensure!(self.width > 0.0 && self.width <= 16.0, "--width must be in (0, 16], got {}", self.width);
        ensure!(self.log_every >= 1, "--log-every must be at least 1");
        ensure!(
            self.warmup_epochs >= 0.0 && self.warmup_epochs < self.epochs() as f64,
            "--warmup-epochs must be in [0, epochs), got {}",
            self.warmup_epochs
        );
        if self.model != "senet" {
            ensure!(
                crate::model::resnet::parse_name(&self.model).is_some(),
                "--model {:?}: expected senet, resnet20/32/56/110 or se-resnet20/32/56/110",
                self.model
            );
            return Ok(());
        }
        let (first, last) =
            (crate::model::senet::scaled(64, self.width), crate::model::senet::scaled(1024, self.width));
        ensure!(
            first >= 1,
            "--width {} rounds the first layer's 64 channels down to 0; the smallest width is {}",
            self.width,
            1.0 / 64.0
        );
        ensure!(
            self.reduction >= 1 && self.reduction <= last,
            "--reduction {} must be between 1 and the SE block's {last} channels at width {}",
            self.reduction,
            self.width
        );
        Ok(())
    }

    /// Apply `--recipe` to every setting the user did not give (`given(field)` says which they did).
    pub fn apply_recipe(&mut self, given: impl Fn(&str) -> bool) {
        if self.recipe == Some(Recipe::Paper) {
            if !given("optimizer") {
                self.optimizer = OptimizerKind::Sgd;
            }
            if !given("lr") {
                self.lr = 0.1;
            }
            if !given("momentum") {
                self.momentum = 0.9;
            }
            if !given("weight_decay") {
                self.weight_decay = 1e-4;
            }
            if !given("schedule") {
                self.schedule = Schedule::Step;
            }
            self.augment = true;
            self.normalize = true;
        }
    }

    /// The epoch count, defaulting to the base recipe's 10.
    pub fn epochs(&self) -> usize {
        self.epochs.unwrap_or(10)
    }

    pub fn optimizer_config(&self) -> OptimizerConfig {
        match self.optimizer {
            OptimizerKind::Adam => OptimizerConfig::Adam {
                lr: self.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: self.weight_decay,
                decoupled: false,
            },
            OptimizerKind::Adamw => OptimizerConfig::Adam {
                lr: self.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: self.weight_decay,
                decoupled: true,
            },
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                lr: self.lr,
                momentum: self.momentum,
                dampening: 0.0,
                weight_decay: self.weight_decay,
                nesterov: false,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Data

/// Load the dataset the arguments name, resolving the default (CIFAR-10 if present, else the sample).
pub fn load_data(args: &DataArgs, image_hw: Option<[usize; 2]>) -> Result<Splits> {
    if args.download {
        ensure!(
            matches!(args.dataset, None | Some(DatasetKind::Cifar10)),
            "--download fetches CIFAR-10; for {:?} see the README",
            args.dataset
        );
        let dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from("data"));
        if !cifar10::present(&dir) {
            cifar10::download(&dir, cifar10::URL, cifar10::MD5)?;
        }
    }
    let kind = match args.dataset {
        Some(k) => k,
        None => {
            let dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from("data"));
            if cifar10::present(&dir) {
                DatasetKind::Cifar10
            } else {
                eprintln!(
                    "note: no CIFAR-10 in {} — using the bundled Fashion-MNIST sample. For CIFAR-10, put \
                     cifar-10-batches-bin/ there (https://www.cs.toronto.edu/~kriz/cifar.html).",
                    dir.display()
                );
                DatasetKind::Sample
            }
        }
    };
    let dir = if kind == DatasetKind::Sample && args.dataset.is_none() { None } else { args.data_dir.as_deref() };
    ensure!(
        kind == DatasetKind::Folder || args.image_size.is_none(),
        "--image-size resizes image folders (--dataset folder) only; other datasets keep their images' size"
    );
    let mut splits = data::load(kind, dir, args.image_size.or(image_hw))?;
    if let Some(n) = args.limit_test {
        ensure!(n >= 1, "--limit-test must be at least 1");
        splits.test.truncate(n);
    }
    Ok(splits)
}

// ---------------------------------------------------------------------------------------------
// The loop

/// One line of metrics.csv.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub seconds: f64,
    pub train_images_per_s: f64,
}

const CSV_HEADER: &str = "epoch,train_loss,train_acc,test_loss,test_acc,seconds,train_images_per_s";
/// The model, optimizer state, step, metrics history of the last finished epoch.
pub const RESUME_FILE: &str = "resume.safetensors";

fn csv_line(m: &EpochMetrics) -> String {
    format!(
        "{},{},{},{},{},{:.3},{:.1}\n",
        m.epoch, m.train_loss, m.train_acc, m.test_loss, m.test_acc, m.seconds, m.train_images_per_s
    )
}

/// Set by Ctrl-C (SIGINT) or SIGTERM: finish the step, save, exit 130.
static STOP: AtomicBool = AtomicBool::new(false);

fn install_stop_handler() {
    // Only the first call in a process installs it; later runs share the flag.
    let _ = ctrlc::set_handler(|| STOP.store(true, Ordering::SeqCst));
}

/// Training was stopped by a signal after saving; `main` exits with 130.
#[derive(Debug)]
pub struct Interrupted {
    pub out: PathBuf,
    pub epoch: usize,
    pub step: usize,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted in epoch {} after step {}; saved {}. Continue with: senet train --resume {}",
            self.epoch,
            self.step,
            self.out.join(RESUME_FILE).display(),
            self.out.display()
        )
    }
}

impl std::error::Error for Interrupted {}

/// The loss went NaN or infinite: name the step and the first layer whose output (or the first
/// parameter) is not finite. Nothing is saved, so the last good checkpoint stays as it was.
fn divergence(net: &Network, plan: &StepPlan, epoch: usize, step: usize) -> anyhow::Error {
    let finite =
        |t: &crate::gpu::Tensor| t.read::<f32>(&net.gpu).map(|v| v.iter().all(|x| x.is_finite())).unwrap_or(true);
    let param = net.params.iter().find(|p| !finite(&p.value)).map(|p| format!("parameter {}", p.spec.name));
    let layer = net
        .graph
        .nodes
        .iter()
        .enumerate()
        .find(|(k, _)| !finite(&plan.acts[k + 1]))
        .map(|(_, n)| format!("the output of {} ({:?})", n.name, n.layer));
    let place = layer.or(param).unwrap_or_else(|| "the loss".into());
    anyhow::anyhow!(
        "training diverged at epoch {epoch} step {step} (optimizer step {}): the loss is not finite; first non-finite \
         value in {place}. Checkpoints were not overwritten; try a lower --lr",
        net.step
    )
}

/// What `train` returns.
pub struct TrainSummary {
    pub history: Vec<EpochMetrics>,
    pub best_acc: f64,
    pub out: PathBuf,
}

/// Plans for every batch size the epoch uses (full and the last partial), built once.
fn plans_for(net: &Network, batch: usize, lens: &[usize]) -> Result<HashMap<usize, StepPlan>> {
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
fn read_sums(net: &Network, plans: &HashMap<usize, StepPlan>, eval: bool) -> Result<(f64, f64, f64)> {
    let mut s = (0.0, 0.0, 0.0);
    for p in plans.values() {
        let r = if eval { &p.eval_result } else { &p.train_result }.read::<f32>(&net.gpu)?;
        s.0 += f64::from(r[result::SUM_LOSS]);
        s.1 += f64::from(r[result::SUM_CORRECT]);
        s.2 += f64::from(r[result::SUM_COUNT]);
    }
    Ok(s)
}

fn bar(len: u64, prefix: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

/// Evaluate on `ds` with batch norm in eval mode: (mean loss, accuracy).
pub fn evaluate(
    net: &Network,
    plans: &HashMap<usize, StepPlan>,
    ds: &Arc<data::Dataset>,
    batch: usize,
    pre: &Preprocess,
) -> Result<(f64, f64)> {
    for p in plans.values() {
        clear_metrics(&net.gpu, &p.eval_result);
    }
    for b in loader::epoch_batches(ds.clone(), batch, Preprocess { augment: false, ..pre.clone() }, false, 0, 0) {
        let plan = plans.get(&b.labels.len()).context("no plan for this batch size")?;
        plan.write_batch(&net.gpu, &b.images, &b.labels)?;
        net.eval_batch(plan);
    }
    let (loss, correct, count) = read_sums(net, plans, true)?;
    Ok((loss / count.max(1.0), correct / count.max(1.0)))
}

/// The settings of the run in `dir` (its config.json), for `--resume`.
fn saved_args(dir: &Path) -> Result<TrainArgs> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("--resume: reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let train = v.get("train").cloned().with_context(|| format!("{}: no field \"train\"", path.display()))?;
    serde_json::from_value(train)
        .with_context(|| format!("{}: field \"train\" is not a training configuration", path.display()))
}

pub fn train(gpu: Arc<Gpu>, args: &TrainArgs) -> Result<TrainSummary> {
    // --resume: the run's own settings, its folder, and --epochs if given.
    let resumed = match &args.resume {
        Some(dir) => {
            let mut saved = saved_args(dir)?;
            saved.out = dir.clone();
            saved.epochs = args.epochs.or(saved.epochs);
            saved.resume = Some(dir.clone());
            Some(saved)
        }
        None => None,
    };
    let args = resumed.as_ref().unwrap_or(args);
    args.validate()?;
    let splits = load_data(&args.data, None)?;
    let mut train_set = splits.train;
    if let Some(n) = args.limit_train {
        ensure!(n >= 1, "--limit-train must be at least 1");
        train_set.truncate(n);
    }
    let normalize = args.normalize.then(|| loader::channel_stats(&train_set));
    let pre = Preprocess { normalize: normalize.clone(), augment: args.augment };
    let [c, h, w] = train_set.shape;
    let config = ModelConfig {
        model: args.model.clone(),
        width: args.width,
        reduction: args.reduction,
        in_channels: c,
        num_classes: train_set.classes.len(),
        input_hw: [h, w],
        classes: train_set.classes.clone(),
        normalize,
        se_bias: args.se_bias,
        se: crate::model::SeOptions {
            squeeze: args.squeeze,
            excitation: args.excitation,
            placement: args.se_placement,
            stages: args.se_stages.clone(),
        },
    };

    // Network
    let mut net = Network::new(gpu.clone(), config.clone(), args.optimizer_config(), args.seed)?;
    if let Some(init) = &args.init {
        let sd = checkpoint::load(init)?;
        checkpoint::apply(&mut net, &sd, &init.display().to_string())?;
    }
    let train_set = Arc::new(train_set);
    let test_set = Arc::new(splits.test);
    ensure!(
        test_set.shape == train_set.shape,
        "test images {:?} differ from training images {:?}",
        test_set.shape,
        train_set.shape
    );
    let plans = plans_for(&net, args.batch_size, &[train_set.len(), test_set.len()])?;
    let tuned = gpu.tuner.summary();
    if tuned.timed + tuned.cached > 0 {
        let cache = gpu.tuner.path.as_ref().map_or("memory only".to_string(), |p| p.display().to_string());
        println!(
            "conv kernels ({:?} tuning): {} shapes timed in {:.1} s, {} from the cache ({cache})",
            gpu.tuner.mode, tuned.timed, tuned.seconds, tuned.cached
        );
    }

    let mut history = Vec::new();
    let mut best_acc = f64::NEG_INFINITY;
    // (steps done, metric sums) of an epoch interrupted part-way.
    let mut partial: Option<(usize, (f32, f32, f32))> = None;
    let csv_path = args.out.join("metrics.csv");
    let mut csv = if args.resume.is_some() {
        let path = args.out.join(RESUME_FILE);
        let meta = checkpoint::load_resume(&path, &mut net)?;
        let field = |k: &str| meta.get(k).with_context(|| format!("{}: metadata field {k} missing", path.display()));
        history = serde_json::from_str(field("history")?)
            .with_context(|| format!("{}: metadata field history", path.display()))?;
        if let Some(steps) = meta.get("epoch_steps") {
            let steps: usize =
                steps.parse().with_context(|| format!("{}: metadata field epoch_steps", path.display()))?;
            let sums: (f32, f32, f32) = serde_json::from_str(field("epoch_sums")?)
                .with_context(|| format!("{}: metadata field epoch_sums", path.display()))?;
            partial = Some((steps, sums));
        }
        best_acc =
            field("best_acc")?.parse().with_context(|| format!("{}: metadata field best_acc", path.display()))?;
        // Keep the lines of the finished epochs only (a crash may have left a later one).
        let mut text = format!("{CSV_HEADER}\n");
        for m in &history {
            text += &csv_line(m);
        }
        checkpoint::write_atomic(&csv_path, text.as_bytes())?;
        println!(
            "resuming {} after epoch {}{} (optimizer step {})",
            args.out.display(),
            history.len(),
            partial.map_or(String::new(), |(k, _)| format!(" and {k} steps of the next")),
            net.step
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&csv_path)
            .with_context(|| format!("opening {}", csv_path.display()))?
    } else {
        std::fs::create_dir_all(&args.out).with_context(|| format!("creating run folder {}", args.out.display()))?;
        let run_config = serde_json::json!({ "model": config, "train": args, "dataset": splits.name });
        checkpoint::write_atomic(&args.out.join("config.json"), serde_json::to_string_pretty(&run_config)?.as_bytes())?;
        let mut f = std::fs::File::create(&csv_path).with_context(|| format!("creating {}", csv_path.display()))?;
        writeln!(f, "{CSV_HEADER}")?;
        f
    };

    println!(
        "{} width {} (r={}) on {}: {} params | {} train / {} test images {:?} | {} | batch {} | {:?}",
        args.model,
        args.width,
        args.reduction,
        splits.name,
        net.graph.parameter_count(),
        train_set.len(),
        test_set.len(),
        train_set.shape,
        gpu.describe(),
        args.batch_size,
        args.optimizer
    );
    println!(
        "{:>5} {:>10} {:>9} {:>10} {:>9} {:>8} {:>9}",
        "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img/s"
    );

    let steps_per_epoch = train_set.len().div_ceil(args.batch_size);
    let total_steps = steps_per_epoch * args.epochs();
    let first_epoch = history.len() + 1;
    install_stop_handler();
    for epoch in first_epoch..=args.epochs() {
        let t0 = Instant::now();
        for p in plans.values() {
            clear_metrics(&gpu, &p.train_result);
        }
        // Resuming inside an epoch: its metric sums so far go back into the buffer of the
        // full-batch plan, the one every step before the last uses.
        let skip = partial.take().map_or(0, |(steps, sums)| {
            if let Some(p) = plans.get(&args.batch_size.min(train_set.len())) {
                let mut v = [0.0f32; result::LEN];
                (v[result::SUM_LOSS], v[result::SUM_CORRECT], v[result::SUM_COUNT]) = sums;
                gpu.queue.write_buffer(&p.train_result.buffer, p.train_result.offset, bytemuck::cast_slice(&v));
            }
            steps
        });
        let pb = bar(steps_per_epoch as u64, format!("epoch {epoch}/{}", args.epochs()));
        pb.set_position(skip as u64);
        let mut in_flight: Option<wgpu::SubmissionIndex> = None;
        let batches = loader::epoch_batches(train_set.clone(), args.batch_size, pre.clone(), true, args.seed, epoch);
        // Skipped batches are still made, so the augmentation's random stream is where it was.
        for (step, b) in batches.into_iter().enumerate().skip(skip) {
            let plan = plans.get(&b.labels.len()).context("no plan for this batch size")?;
            plan.write_batch(&gpu, &b.images, &b.labels)?;
            let global = (epoch - 1) * steps_per_epoch + step;
            net.set_lr(lr_at(args.lr, args.schedule, args.warmup_epochs, global, steps_per_epoch, total_steps));
            if args.profile && step == skip && epoch == args.epochs().min(first_epoch + 1) {
                // --profile: this step runs timed, one pass per dispatch (same results).
                let ceilings = crate::bench::ceilings(&gpu)?;
                let profile = crate::bench::profiled_step(&mut net, plan, ceilings)?;
                pb.suspend(|| {
                    println!(
                        "per-kernel profile of epoch {epoch}, step {}:\n{}\n{}",
                        step + 1,
                        crate::bench::format_kernels(&profile.kernels),
                        crate::bench::format_conv_layers(&profile.conv_layers)
                    )
                });
                in_flight = None;
                pb.inc(1);
                continue;
            }
            let idx = net.train_step(plan);
            // At most two steps in flight: wait for the previous one, not this one, so the next
            // batch is prepared and queued while the GPU works.
            if let Some(prev) = in_flight.replace(idx) {
                gpu.device
                    .poll(wgpu::PollType::Wait { submission_index: Some(prev), timeout: None })
                    .context("waiting for the GPU")?;
            }
            pb.inc(1);
            let stop = STOP.load(Ordering::SeqCst);
            if (step + 1) % args.log_every == 0 || stop {
                let (l, c, n) = read_sums(&net, &plans, false)?;
                if !l.is_finite() {
                    return Err(divergence(&net, plan, epoch, step + 1));
                }
                let rate = n / t0.elapsed().as_secs_f64();
                let msg = format!("loss {:.4} acc {:.4} {:.0} img/s", l / n, c / n, rate);
                if pb.is_hidden() {
                    println!("epoch {epoch} step {}/{steps_per_epoch} {msg}", step + 1);
                }
                pb.set_message(msg);
                if epoch == first_epoch && step + 1 == args.log_every && gpu.is_cpu() {
                    pb.suspend(|| {
                        eprintln!(
                            "note: {} is a CPU adapter; expect about {:.0} s per epoch",
                            gpu.info.name,
                            train_set.len() as f64 / rate
                        )
                    });
                }
            }
            if stop && step + 1 < steps_per_epoch {
                // Ctrl-C: the step is done; keep everything needed to continue exactly here.
                gpu.wait()?;
                pb.finish_and_clear();
                checkpoint::save(&net, &args.out.join("last.safetensors"))?;
                let (l, c, n) = read_sums(&net, &plans, false)?;
                let sums = (l as f32, c as f32, n as f32);
                let meta = HashMap::from([
                    ("history".to_string(), serde_json::to_string(&history)?),
                    ("best_acc".to_string(), best_acc.to_string()),
                    ("epoch_steps".to_string(), (step + 1).to_string()),
                    ("epoch_sums".to_string(), serde_json::to_string(&sums)?),
                ]);
                checkpoint::save_resume(&net, meta, &args.out.join(RESUME_FILE))?;
                return Err(Interrupted { out: args.out.clone(), epoch, step: step + 1 }.into());
            }
        }
        gpu.wait()?;
        let (l, c, n) = read_sums(&net, &plans, false)?;
        let train_secs = t0.elapsed().as_secs_f64();
        pb.finish_and_clear();
        if !l.is_finite() {
            let tail = train_set.len() - (steps_per_epoch - 1) * args.batch_size;
            let last = plans.get(&tail).context("no plan for the last batch")?;
            return Err(divergence(&net, last, epoch, steps_per_epoch));
        }
        let (test_loss, test_acc) = evaluate(&net, &plans, &test_set, args.batch_size, &pre)?;
        let m = EpochMetrics {
            epoch,
            train_loss: l / n,
            train_acc: c / n,
            test_loss,
            test_acc,
            seconds: t0.elapsed().as_secs_f64(),
            train_images_per_s: n / train_secs,
        };
        println!(
            "{:>5} {:>10.4} {:>9.4} {:>10.4} {:>9.4} {:>8.1} {:>9.0}",
            m.epoch, m.train_loss, m.train_acc, m.test_loss, m.test_acc, m.seconds, m.train_images_per_s
        );
        csv.write_all(csv_line(&m).as_bytes())?;
        csv.flush()?;
        if m.test_acc > best_acc {
            best_acc = m.test_acc;
            checkpoint::save(&net, &args.out.join("best.safetensors"))?;
        }
        history.push(m);
        checkpoint::save(&net, &args.out.join("last.safetensors"))?;
        // Last: everything --resume needs, in one atomically written file.
        let meta = HashMap::from([
            ("history".to_string(), serde_json::to_string(&history)?),
            ("best_acc".to_string(), best_acc.to_string()),
        ]);
        checkpoint::save_resume(&net, meta, &args.out.join(RESUME_FILE))?;
        // A plot that cannot be drawn costs the picture, never the run.
        if let Err(e) = crate::plot::plot_history(&history, &args.out.join("metrics.png")) {
            eprintln!("warning: could not draw metrics.png: {e:#}");
        }
        if STOP.load(Ordering::SeqCst) && epoch < args.epochs() {
            return Err(Interrupted { out: args.out.clone(), epoch: epoch + 1, step: 0 }.into());
        }
    }
    println!("best test accuracy {best_acc:.4}; checkpoints and metrics in {}", args.out.display());
    Ok(TrainSummary { history, best_acc, out: args.out.clone() })
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
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Evaluation results with per-class figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EvalReport {
    pub accuracy: f64,
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
    let splits = load_data(&args.data, trained_hw.filter(|_| args.data.dataset == Some(DatasetKind::Folder)))?;
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
    let mut net = Network::new(gpu, config.clone(), OptimizerConfig::sgd(0.0, 0.0), 0)?;
    checkpoint::apply(&mut net, &sd, &args.checkpoint.display().to_string())?;
    let plans = plans_for(&net, args.batch_size, &[test.len()])?;
    let pre = Preprocess { normalize: config.normalize.clone(), augment: false };
    for p in plans.values() {
        clear_metrics(&net.gpu, &p.eval_result);
    }
    for b in loader::epoch_batches(test.clone(), args.batch_size, pre, false, 0, 0) {
        let plan = plans.get(&b.labels.len()).context("no plan for this batch size")?;
        plan.write_batch(&net.gpu, &b.images, &b.labels)?;
        net.eval_batch(plan);
        on_batch(&net, plan, &b.labels)?;
    }
    Ok((config, read_sums(&net, &plans, true)?))
}

pub fn eval(gpu: Arc<Gpu>, args: &EvalArgs) -> Result<EvalReport> {
    let mut confusion: Vec<Vec<usize>> = Vec::new();
    let (config, (loss, correct, count)) = evaluate_checkpoint(gpu, args, |net, plan, labels| {
        let k = net.config.num_classes;
        if confusion.is_empty() {
            confusion = vec![vec![0usize; k]; k];
        }
        let per = plan.per_sample.read::<f32>(&net.gpu)?;
        for (i, &t) in labels.iter().enumerate() {
            let pred = per[3 * i + 2] as usize;
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
        "test loss {:.4}  accuracy {:.4} ({}/{})\n\nper-class accuracy:\n",
        r.loss, r.accuracy, r.correct, r.total
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

/// Top-`k` (class, probability) for each image file.
pub fn predict(
    gpu: Arc<Gpu>,
    ckpt: &Path,
    images: &[PathBuf],
    k: usize,
    width: Option<f64>,
    reduction: Option<usize>,
    image_size: Option<[usize; 2]>,
) -> Result<Vec<Vec<(String, f32)>>> {
    ensure!(!images.is_empty(), "predict needs at least one image");
    let sd = checkpoint::load(ckpt)?;
    let config = checkpoint_config(ckpt, &sd, image_size.unwrap_or([32, 32]), width, reduction)?;
    let mut net = Network::new(gpu, config.clone(), OptimizerConfig::sgd(0.0, 0.0), 0)?;
    checkpoint::apply(&mut net, &sd, &ckpt.display().to_string())?;
    let plan = net.plan(1)?;
    let [h, w] = config.input_hw;
    let c = config.in_channels;
    let pre = Preprocess { normalize: config.normalize.clone(), augment: false };
    let mut out = Vec::new();
    for path in images {
        let pixels = data::folder::decode(path, c, [h, w])?;
        let ds = data::Dataset { shape: [c, h, w], images: pixels, labels: vec![0], classes: vec![String::new()] };
        let batch = loader::make_batch(&ds, &[0], &pre, &mut rand::SeedableRng::seed_from_u64(0));
        plan.write_batch(&net.gpu, &batch.images, &[0])?;
        net.eval_batch(&plan);
        let logits = plan.logits().read::<f32>(&net.gpu)?;
        let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = logits.iter().map(|&l| f64::from(l - mx).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let mut ranked: Vec<(usize, f64)> = exps.iter().map(|e| e / sum).enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        out.push(
            ranked
                .into_iter()
                .take(k)
                .map(|(i, p)| (config.classes.get(i).cloned().unwrap_or_else(|| format!("class {i}")), p as f32))
                .collect(),
        );
    }
    Ok(out)
}
