//! The command-line pieces the subcommands share, their defaults read from [`crate::hparams`]:
//! where the data comes from ([`DataArgs`]), which network ([`ModelArgs`], flattened into
//! `train`, `bench`, `plan` and `summary`, so a `ModelConfig` is assembled from flags in one
//! place), the input shape when no dataset gives it ([`InputArgs`]), and `train`'s own settings.

use std::path::PathBuf;

use anyhow::{Result, bail, ensure};

use crate::data::augment::{self, AutoAugment, EraseMode, RandomErasing};
use crate::data::folder::FolderOptions;
use crate::data::loader::LoadOptions;
use crate::data::{self, DatasetKind, Splits, cifar10};
use crate::gpu::Precision;
use crate::hparams::{self as hp, OptimizerKind, Recipe, Schedule};
use crate::model::{BlockOptions, BottleneckStride, ModelConfig, SeOptions, SePlacement};
use crate::ops::optimizer::OptimizerConfig;
use crate::ops::se_block::{Excitation, Squeeze};

// ---------------------------------------------------------------------------------------------
// Data

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
    /// Fetch the dataset into --data-dir if it is not there, checking MD5s: CIFAR-10 (default
    /// ./data), MNIST (./data/mnist), Fashion-MNIST (./data/fashion-mnist).
    #[arg(long)]
    pub download: bool,
    /// Image folders: the size the transforms make, S (square) or HxW: training `RandomResizedCrop`
    /// (with --augment) and evaluation `Resize` + `CenterCrop` (torchvision's). Default: the first
    /// training image's size when training; the model's input size when evaluating a checkpoint.
    #[arg(long, value_parser = parse_image_size)]
    #[serde(default)]
    pub image_size: Option<[usize; 2]>,
    /// Image folders: the evaluation transform resizes to floor(size / crop-pct) (the short side
    /// for a square size) and crops the centre `--image-size` (timm's crop_pct; 224 → 256 → 224).
    #[arg(long, default_value_t = hp::CROP_PCT)]
    #[serde(default = "default_crop_pct")]
    pub crop_pct: f64,
    /// Image folders: threads that decode, transform and batch images [default: the machine's
    /// cores minus one, at least 1]. Batches are the same whatever the count.
    #[arg(long, env = "SENET_WORKERS")]
    #[serde(skip)]
    pub workers: Option<usize>,
    /// Image folders: hold the decoded images in memory (each decoded once per run) when all of
    /// them fit in this many MB; a larger folder is read from disk every epoch.
    #[arg(long, value_name = "MB", default_value_t = hp::CACHE_MB)]
    #[serde(skip, default = "default_cache_mb")]
    pub cache_mb: u64,
    /// Image folders: leave out images that fail to decode (counted in the epoch line and
    /// metrics.csv) instead of stopping the run (saved for --resume, the file named, exit code 1).
    #[arg(long)]
    #[serde(default)]
    pub skip_bad_images: bool,
    /// Testing the failure path: the data loader panics before making batch K, as a bug would.
    #[arg(long, hide = true, value_name = "K")]
    #[serde(skip)]
    pub fail_loader_at: Option<usize>,
}

fn default_recount() -> usize {
    1
}

/// `--aa`: `trivialaugment` or timm's RandAugment config string, checked (the fill colour is set
/// later).
pub fn parse_aa(s: &str) -> Result<String, String> {
    AutoAugment::parse(s, [0; 3]).map(|_| s.to_string())
}

fn default_crop_pct() -> f64 {
    hp::CROP_PCT
}

fn default_cache_mb() -> u64 {
    hp::CACHE_MB
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

/// `--val-split`: a whole number of images (at least 1) or a fraction in (0, 1).
pub fn parse_val_split(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v < 1.0 => Ok(v),
        Ok(v) if v >= 1.0 && v.fract() == 0.0 && v < 1e15 => Ok(v),
        _ => Err(format!("expected a number of images (5000) or a fraction in (0, 1) (0.1), got {s:?}")),
    }
}

/// The images `--val-split v` holds out of `n` training images: `v` itself, or the fraction `v`
/// of `n` rounded to the nearest (at least 1); an error unless some remain to train on.
pub fn val_count(v: f64, n: usize) -> Result<usize> {
    let k = if v < 1.0 { ((v * n as f64).round() as usize).max(1) } else { v as usize };
    ensure!(k < n, "--val-split {v} holds out {k} of the {n} training images and leaves none to train on");
    Ok(k)
}

impl DataArgs {
    /// How the loader works: `--workers`, `--skip-bad-images`, the failure hook.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            workers: self.workers.unwrap_or_else(LoadOptions::default_workers).max(1),
            skip_bad: self.skip_bad_images,
            fail_at: self.fail_loader_at,
        }
    }

    /// Load the dataset the arguments name, resolving the default (CIFAR-10 if present, else the
    /// sample); image folders are resized to `--image-size`, else `image_hw`, else their first image.
    pub fn load(&self, image_hw: Option<[usize; 2]>) -> Result<Splits> {
        // Where --download puts MNIST and Fashion-MNIST without --data-dir (Debian's
        // /usr/share/datasets is not ours to write).
        let mut download_dir = None;
        if self.download {
            use crate::data::idx;
            match self.dataset {
                None | Some(DatasetKind::Cifar10) => {
                    let dir = self.data_dir.clone().unwrap_or_else(|| PathBuf::from("data"));
                    if !cifar10::present(&dir) {
                        cifar10::download(&dir, cifar10::URL, cifar10::MD5)?;
                    }
                }
                Some(kind @ (DatasetKind::Mnist | DatasetKind::FashionMnist)) => {
                    let (sub, url, files) = if kind == DatasetKind::Mnist {
                        ("mnist", idx::MNIST_URL, &idx::MNIST_FILES)
                    } else {
                        ("fashion-mnist", idx::FASHION_MNIST_URL, &idx::FASHION_MNIST_FILES)
                    };
                    let dir = self.data_dir.clone().unwrap_or_else(|| PathBuf::from("data").join(sub));
                    if !idx::present(&dir) {
                        idx::download(&dir, url, files)?;
                    }
                    download_dir = Some(dir);
                }
                Some(other) => bail!("--download fetches cifar10, mnist and fashion-mnist, not {other:?}"),
            }
        }
        let kind = match self.dataset {
            Some(k) => k,
            None => {
                let dir = self.data_dir.clone().unwrap_or_else(|| PathBuf::from("data"));
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
        let dir = if kind == DatasetKind::Sample && self.dataset.is_none() {
            None
        } else {
            download_dir.as_deref().or(self.data_dir.as_deref())
        };
        ensure!(
            kind == DatasetKind::Folder || self.image_size.is_none(),
            "--image-size resizes image folders (--dataset folder) only; other datasets keep their images' size"
        );
        ensure!(self.workers != Some(0), "--workers must be at least 1 (the threads that decode image folders)");
        let folder = FolderOptions {
            size: self.image_size.or(image_hw),
            crop_pct: self.crop_pct,
            cache_bytes: self.cache_mb.saturating_mul(1 << 20),
        };
        let mut splits = data::load(kind, dir, folder)?;
        if let Some(n) = self.limit_test {
            ensure!(n >= 1, "--limit-test must be at least 1");
            splits.test.truncate(n);
        }
        Ok(splits)
    }
}

// ---------------------------------------------------------------------------------------------
// Network

fn default_betas() -> (f64, f64) {
    hp::ADAM_BETAS
}

fn default_eps() -> f64 {
    hp::ADAM_EPS
}

fn default_clip_grad_norm() -> Option<f64> {
    hp::CLIP_GRAD_NORM
}

/// `--betas`: `B1,B2`.
pub fn parse_betas(s: &str) -> Result<(f64, f64), String> {
    let err = || format!("expected two numbers B1,B2 (0.9,0.999), got {s:?}");
    let (a, b) = s.split_once(',').ok_or_else(err)?;
    Ok((a.trim().parse().map_err(|_| err())?, b.trim().parse().map_err(|_| err())?))
}

fn default_model() -> String {
    hp::MODEL.into()
}

/// The network: architecture, width and the SE block's options.
#[derive(Clone, Debug, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct ModelArgs {
    // The help lists every family's names: `model::registry::help`.
    #[arg(long, default_value = hp::MODEL, help = crate::model::registry::help())]
    #[serde(default = "default_model")]
    pub model: String,
    /// Channel width multiplier: 1.0 = 64…1024 channels for senet, 16/32/64 for the ResNets.
    #[arg(long, default_value_t = hp::WIDTH)]
    pub width: f64,
    /// SE reduction ratio r (hidden width C/r).
    #[arg(long, default_value_t = hp::REDUCTION)]
    pub reduction: usize,
    /// Biases in the SE blocks' FC layers.
    #[arg(long)]
    #[serde(default)]
    pub se_bias: bool,
    /// Ablation: the SE squeeze, mean or max over each channel.
    #[arg(long, value_enum, default_value_t = hp::SQUEEZE)]
    #[serde(default)]
    pub squeeze: Squeeze,
    /// Ablation: the SE gate.
    #[arg(long, value_enum, default_value_t = hp::EXCITATION)]
    #[serde(default)]
    pub excitation: Excitation,
    /// Ablation: where SE-ResNet blocks put the SE block.
    #[arg(long, value_enum, default_value_t = hp::SE_PLACEMENT)]
    #[serde(default)]
    pub se_placement: SePlacement,
    /// Ablation: the stages (1-based, comma-separated) whose blocks get SE [default: all].
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub se_stages: Vec<usize>,
    /// SE hidden widths: 0 = C // r (the paper); N = C / r rounded to a multiple of N, as timm's
    /// SE-ResNets and SE-ResNeXts (8) [default: 8 for the (SE-)ResNeXts, as timm's; else 0]
    #[arg(long, value_name = "N")]
    #[serde(default)]
    pub se_divisor: Option<usize>,
    /// Where a bottleneck (ResNet-50/101/152, ResNeXt, SENet-154) strides: 1x1 = its first
    /// convolution (the original ResNet, the SENet paper), 3x3 = its 3x3 convolution (timm,
    /// torchvision: "v1.5") [default: 3x3 for the ResNeXts and SENet-154, as timm's; else 1x1]
    #[arg(long, value_enum)]
    #[serde(default)]
    pub bottleneck_stride: Option<BottleneckStride>,
    /// Stochastic depth, as timm's --drop-path (drop_path_rate): in training each residual unit's
    /// branch is dropped per sample (kept ones scaled by 1/(1 - p)), p rising linearly from 0 at
    /// the first unit to P at the last; the identity in evaluation. The (SE-)ResNets and
    /// (SE-)ResNeXts; 0 = off
    #[arg(long, value_name = "P", default_value_t = hp::DROP_PATH)]
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub drop_path: f64,
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

impl ModelArgs {
    /// Reject a model name, width or reduction that cannot build, naming the flag.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.width > 0.0 && self.width <= 16.0, "--width must be in (0, 16], got {}", self.width);
        ensure!(
            (0.0..1.0).contains(&self.drop_path),
            "--drop-path must be in [0, 1) (the last unit's drop probability), got {}",
            self.drop_path
        );
        let family = crate::model::registry::family_or_err(&self.model, "--model")?;
        family.check_flags(&self.config(1, [hp::IMAGE_SIZE; 2], 1, vec![]))
    }

    /// The configuration for `in_channels`×H×W inputs in `classes` (names; may be empty, then
    /// `num_classes` unnamed ones). No normalisation: a training run sets it from its data.
    pub fn config(
        &self,
        in_channels: usize,
        input_hw: [usize; 2],
        num_classes: usize,
        classes: Vec<String>,
    ) -> ModelConfig {
        // What the flags leave open, the model's family decides (timm's layout for timm's models).
        let fixed = crate::model::registry::family(&self.model).map(|f| f.conventions()).unwrap_or_default();
        ModelConfig {
            model: self.model.clone(),
            width: self.width,
            reduction: self.reduction,
            in_channels,
            num_classes,
            input_hw,
            classes,
            normalize: None,
            se_bias: self.se_bias || fixed.se_bias,
            se: SeOptions {
                squeeze: self.squeeze,
                excitation: self.excitation,
                placement: self.se_placement,
                stages: self.se_stages.clone(),
                divisor: self.se_divisor.unwrap_or(fixed.se_divisor),
            },
            block: BlockOptions { stride: self.bottleneck_stride.unwrap_or(fixed.stride), drop_path: self.drop_path },
        }
    }
}

/// The input when no dataset gives it (`bench`, `plan`, `summary`). `--hw` and `--classes` are
/// the older spellings, kept as aliases.
#[derive(Clone, Debug, clap::Args)]
pub struct InputArgs {
    /// Input height and width: `32` or `HxW` [default: 32, `hparams::IMAGE_SIZE`].
    #[arg(long, visible_alias = "hw", value_parser = parse_image_size)]
    pub image_size: Option<[usize; 2]>,
    /// Input channels (3 for RGB, 1 for grey).
    #[arg(long, default_value_t = hp::IN_CHANNELS)]
    pub in_channels: usize,
    /// Classes: the outputs of the last layer.
    #[arg(long, visible_alias = "classes", default_value_t = hp::NUM_CLASSES)]
    pub num_classes: usize,
}

impl InputArgs {
    /// `model` on these inputs.
    pub fn config(&self, model: &ModelArgs) -> Result<ModelConfig> {
        model.validate()?;
        ensure!(self.in_channels >= 1, "--in-channels must be at least 1");
        ensure!(self.num_classes >= 1, "--num-classes must be at least 1");
        let hw = self.image_size.unwrap_or([hp::IMAGE_SIZE; 2]);
        Ok(model.config(self.in_channels, hw, self.num_classes, vec![]))
    }
}

// ---------------------------------------------------------------------------------------------
// Training

#[derive(Clone, Debug, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct TrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Train on the first N training images only.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Hold out a seeded part of the training set for validation: N images, or a fraction (0.1 =
    /// 10 %). best.safetensors is then chosen on validation accuracy, the test set reported beside.
    #[arg(long, value_name = "N|FRACTION", value_parser = parse_val_split)]
    #[serde(default)]
    pub val_split: Option<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub net: ModelArgs,
    /// Total epochs [default: 10; with --resume, the run's own].
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long, default_value_t = hp::BATCH_SIZE)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value_t = hp::OPTIMIZER)]
    pub optimizer: OptimizerKind,
    #[arg(long, default_value_t = hp::LR)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = hp::MOMENTUM)]
    pub momentum: f64,
    /// Label smoothing ε of the training loss, as torch.nn.CrossEntropyLoss(label_smoothing=ε):
    /// targets (1 − ε)·onehot + ε/classes (timm's --smoothing; with --mixup/--cutmix it smooths
    /// the mixed targets, as timm's mixup_target). Evaluation reports plain cross-entropy.
    #[arg(long, visible_alias = "smoothing", default_value_t = 0.0)]
    #[serde(default)]
    pub label_smoothing: f64,
    /// Clip the gradients' total 2-norm to MAX each step, as torch.nn.utils.clip_grad_norm_(
    /// model.parameters(), MAX) after backward (and AMP's unscale_), before the optimizer.
    #[arg(long, value_name = "MAX")]
    #[serde(default = "default_clip_grad_norm")]
    pub clip_grad_norm: Option<f64>,
    /// Adam/AdamW β1,β2 (torch.optim's betas).
    #[arg(long, value_parser = parse_betas, default_value = "0.9,0.999")]
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    /// Adam/AdamW ε, added to the root of the second moment (torch.optim's eps).
    #[arg(long, default_value_t = hp::ADAM_EPS)]
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// SGD with Nesterov momentum (torch.optim.SGD's nesterov=True).
    #[arg(long)]
    #[serde(default)]
    pub nesterov: bool,
    /// L2 (Adam, SGD) or decoupled (AdamW) weight decay.
    #[arg(long, default_value_t = hp::WEIGHT_DECAY)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = hp::SEED)]
    pub seed: u64,
    /// Learning-rate schedule over the run: constant, step (÷10 at 50 % and 75 % of the epochs,
    /// the paper's CIFAR schedule), step30 (÷10 every 30 epochs, the ImageNet recipe's) or cosine
    /// (to 0 at the end).
    #[arg(long, value_enum, default_value_t = hp::SCHEDULE)]
    #[serde(default)]
    pub schedule: Schedule,
    /// Linear warm-up from 0 over this many epochs (fractions allowed).
    #[arg(long, default_value_t = hp::WARMUP_EPOCHS)]
    #[serde(default)]
    pub warmup_epochs: f64,
    /// A preset: `paper` = the SENet paper's CIFAR recipe (SGD momentum 0.9, lr 0.1, weight decay
    /// 1e-4, step schedule, random crop + flip, per-channel normalisation); `imagenet` = the
    /// ImageNet recipe (SGD momentum 0.9, weight decay 1e-4, batch 256, lr 0.1 × batch / 256, ÷10
    /// every 30 epochs, 100 epochs, RandomResizedCrop + flip, ImageNet mean/std). Flags given
    /// explicitly keep their values.
    #[arg(long, value_enum)]
    #[serde(default)]
    pub recipe: Option<Recipe>,
    /// Normalise inputs with the training set's per-channel mean and std.
    #[arg(long)]
    pub normalize: bool,
    /// Normalise with these per-channel means instead (after /255, as transforms.Normalize;
    /// comma-separated, one per channel; with --std).
    #[arg(long, value_delimiter = ',', requires = "std")]
    #[serde(default)]
    pub mean: Vec<f64>,
    /// Per-channel standard deviations for --mean.
    #[arg(long, value_delimiter = ',', requires = "mean")]
    #[serde(default)]
    pub std: Vec<f64>,
    /// Random crop (4-pixel padding) and horizontal flip while training.
    #[arg(long)]
    pub augment: bool,
    /// Switch off the augmentation --recipe paper turns on.
    #[arg(long, conflicts_with = "augment")]
    #[serde(default)]
    pub no_augment: bool,
    /// Image folders, with --augment: timm's RandAugment after the flip, as timm's `--aa`:
    /// rand[-m<int>][-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc<0|1>], e.g. rand-m9-mstd0.5
    /// (see docs/data.md); or `trivialaugment`: torchvision's TrivialAugmentWide (docs/recipes.md).
    #[arg(long, value_name = "CONFIG", value_parser = parse_aa)]
    #[serde(default)]
    pub aa: Option<String>,
    /// Image folders, with --augment: the probability of timm's random erasing, on the normalised
    /// tensor (timm's `--reprob`).
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    #[serde(default)]
    pub reprob: f64,
    /// Random erasing's values: pixel (per-pixel normal noise), rand (one normal value per box and
    /// channel) or const (0) (timm's `--remode`).
    #[arg(long, value_enum, default_value_t = EraseMode::Pixel)]
    #[serde(default)]
    pub remode: EraseMode,
    /// Random erasing: up to N boxes per image, the count uniform in 1..=N (timm's `--recount`).
    #[arg(long, value_name = "N", default_value_t = 1)]
    #[serde(default = "default_recount")]
    pub recount: usize,
    /// Switch off the normalisation --recipe paper turns on.
    #[arg(long, conflicts_with_all = ["normalize", "mean"])]
    #[serde(default)]
    pub no_normalize: bool,
    /// Run folder for config.json, metrics.csv and checkpoints.
    #[arg(long, default_value = hp::OUT)]
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
    #[arg(long, default_value_t = hp::LOG_EVERY)]
    pub log_every: usize,
    /// Under `mpirun`: batch-norm statistics of all ranks' batches together (as PyTorch's
    /// SyncBatchNorm) instead of per rank; costs two small exchanges per batch norm per step. Needs
    /// the `mpi` feature; on one process it changes nothing.
    #[arg(long)]
    #[serde(default)]
    pub sync_bn: bool,
    /// f32, or f16 as PyTorch AMP: f16 activations and convolution operands, f32 accumulation,
    /// statistics and master weights, dynamic loss scaling (needs an adapter with f16 shaders).
    #[arg(long, value_enum, default_value_t = hp::PRECISION)]
    #[serde(default)]
    pub precision: Precision,
    /// Accumulate the gradients of N batches before each optimizer step (timm's flag): each
    /// batch's loss divided by N, one clip, loss-scaler update and (under mpirun) all-reduce per
    /// step; the effective batch is N × --batch-size and the schedule counts optimizer steps,
    /// ceil(batches per epoch / N) an epoch. Batch norm normalises each batch on its own.
    #[arg(long, value_name = "N", default_value_t = hp::GRAD_ACCUM_STEPS)]
    #[serde(default = "default_grad_accum_steps")]
    pub grad_accum_steps: usize,
    /// Keep an exponential moving average of the weights and batch-norm buffers (timm's
    /// ModelEmaV3), evaluated each epoch beside the model and saved as ema.safetensors.
    #[arg(long)]
    #[serde(default)]
    pub model_ema: bool,
    /// The EMA's decay per optimizer step (timm's default).
    #[arg(long, value_name = "DECAY", default_value_t = hp::MODEL_EMA_DECAY)]
    #[serde(default = "default_model_ema_decay")]
    pub model_ema_decay: f64,
    /// Ramp the EMA's decay up as timm does: min(DECAY, 1 - (1 + step)^(-2/3)).
    #[arg(long, requires = "model_ema")]
    #[serde(default)]
    pub model_ema_warmup: bool,
    /// Mixup's alpha (timm's `--mixup`): mix each batch with its mirror image by λ ~ Beta(A, A),
    /// soft targets; 0 = off.
    #[arg(long, value_name = "A", default_value_t = 0.0)]
    #[serde(default)]
    pub mixup: f64,
    /// CutMix's alpha (timm's `--cutmix`): paste a box of the mirror image, λ ~ Beta(A, A); 0 = off.
    #[arg(long, value_name = "A", default_value_t = 0.0)]
    #[serde(default)]
    pub cutmix: f64,
    /// Probability that a batch is mixed at all (timm's `--mixup-prob`).
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    #[serde(default = "default_one")]
    pub mixup_prob: f64,
    /// With both --mixup and --cutmix: probability of CutMix for a mixed batch (timm's).
    #[arg(long, value_name = "P", default_value_t = 0.5)]
    #[serde(default = "default_half")]
    pub mixup_switch_prob: f64,
    /// How Mixup/CutMix draw (timm's `--mixup-mode`): `batch` (one λ per batch, timm's default),
    /// `pair` (one per pair of images i, n-1-i; needs an even --batch-size) or `elem` (one per image).
    #[arg(long, value_enum, default_value_t = MixupMode::Batch)]
    #[serde(default)]
    pub mixup_mode: MixupMode,
    /// Stop Mixup/CutMix after N epochs (timm's `--mixup-off-epoch`): epochs N+1 on train on the
    /// unmixed (still smoothed) targets; 0 = never.
    #[arg(long, value_name = "N", default_value_t = 0)]
    #[serde(default)]
    pub mixup_off_epoch: usize,
    /// Which weights best.safetensors is chosen on and holds: `model`, or `ema` (the default with
    /// --model-ema, as timm's train.py, which replaces the evaluation metrics by the EMA's).
    #[arg(long, value_enum, value_name = "WHICH")]
    #[serde(default)]
    pub best_on: Option<BestOn>,
}

/// `--mixup-mode`: timm's modes.
pub use crate::data::mixup::MixupMode;

fn default_one() -> f64 {
    1.0
}

fn default_half() -> f64 {
    0.5
}

/// `--best-on`: the weights best.safetensors is chosen on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BestOn {
    Model,
    Ema,
}

fn default_grad_accum_steps() -> usize {
    hp::GRAD_ACCUM_STEPS
}

fn default_model_ema_decay() -> f64 {
    hp::MODEL_EMA_DECAY
}

impl TrainArgs {
    /// Reject nonsense before any work starts.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.epochs() >= 1, "--epochs must be at least 1, got {}", self.epochs());
        ensure!(self.batch_size >= 1, "--batch-size must be at least 1, got {}", self.batch_size);
        ensure!(self.lr > 0.0 && self.lr.is_finite(), "--lr must be a positive number, got {}", self.lr);
        ensure!(self.momentum >= 0.0 && self.momentum < 1.0, "--momentum must be in [0, 1), got {}", self.momentum);
        ensure!(self.weight_decay >= 0.0, "--weight-decay must be >= 0, got {}", self.weight_decay);
        ensure!(self.log_every >= 1, "--log-every must be at least 1");
        let (b1, b2) = self.betas;
        ensure!(
            (0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2),
            "--betas must be two numbers in [0, 1), got {b1},{b2}"
        );
        ensure!(
            (0.0..1.0).contains(&self.label_smoothing),
            "--label-smoothing must be in [0, 1), got {}",
            self.label_smoothing
        );
        ensure!(self.eps > 0.0 && self.eps.is_finite(), "--eps must be a positive number, got {}", self.eps);
        if let Some(max) = self.clip_grad_norm {
            ensure!(
                max > 0.0 && max.is_finite() && (max as f32).is_finite(),
                "--clip-grad-norm must be a finite number above 0 (the largest total gradient norm), got {max}"
            );
        }
        ensure!(
            !self.nesterov || (self.optimizer == OptimizerKind::Sgd && self.momentum > 0.0),
            "--nesterov needs --optimizer sgd and a --momentum above 0 (as torch.optim.SGD)"
        );
        ensure!(
            self.mean.len() == self.std.len(),
            "--mean has {} values and --std {}: give one of each per channel",
            self.mean.len(),
            self.std.len()
        );
        ensure!(self.std.iter().all(|&s| s > 0.0), "--std values must be positive, got {:?}", self.std);
        ensure!(
            !self.sync_bn || cfg!(feature = "mpi"),
            "--sync-bn merges batch-norm statistics across MPI ranks, but this senet was built without MPI \
             support; rebuild with `cargo build --release --features mpi` and launch with mpirun (see docs/distributed.md)"
        );
        if let Some(aa) = &self.aa {
            AutoAugment::parse(aa, [0; 3]).map_err(|e| anyhow::anyhow!("--aa {aa}: {e}"))?;
        }
        augment::check_erasing(self.reprob, self.recount)?;
        ensure!(
            self.augment || (self.aa.is_none() && self.reprob == 0.0),
            "--aa and --reprob add to the training transform (RandomResizedCrop + flip, as timm's): give --augment \
             (or --recipe imagenet) too"
        );
        self.mixup_config(1).validate()?;
        self.mixup_config(1).check_batch_size(self.batch_size)?;
        ensure!(
            self.grad_accum_steps >= 1,
            "--grad-accum-steps must be at least 1 (batches per optimizer step), got {}",
            self.grad_accum_steps
        );
        ensure!(
            !(self.profile && self.grad_accum_steps > 1),
            "--profile times one whole optimizer step of one batch; it cannot be combined with --grad-accum-steps {}",
            self.grad_accum_steps
        );
        ensure!(
            (0.0..1.0).contains(&self.model_ema_decay),
            "--model-ema-decay must be in [0, 1) (the weight kept per step, timm's 0.9998), got {}",
            self.model_ema_decay
        );
        ensure!(
            self.model_ema || self.best_on != Some(BestOn::Ema),
            "--best-on ema needs --model-ema (there is no EMA to choose)"
        );
        ensure!(
            self.warmup_epochs >= 0.0 && self.warmup_epochs < self.epochs() as f64,
            "--warmup-epochs must be in [0, epochs), got {}",
            self.warmup_epochs
        );
        self.net.validate()
    }

    /// Apply `--recipe` to every setting the user did not give (`given(field)` says which they did).
    pub fn apply_recipe(&mut self, given: impl Fn(&str) -> bool) {
        if self.recipe == Some(Recipe::Paper) {
            if !given("optimizer") {
                self.optimizer = hp::PAPER_OPTIMIZER;
            }
            if !given("lr") {
                self.lr = hp::PAPER_LR;
            }
            if !given("momentum") {
                self.momentum = hp::PAPER_MOMENTUM;
            }
            if !given("weight_decay") {
                self.weight_decay = hp::PAPER_WEIGHT_DECAY;
            }
            if !given("schedule") {
                self.schedule = hp::PAPER_SCHEDULE;
            }
            self.augment = !self.no_augment;
            self.normalize = !self.no_normalize;
        }
        if self.recipe == Some(Recipe::Imagenet) {
            if !given("optimizer") {
                self.optimizer = OptimizerKind::Sgd;
            }
            if !given("batch_size") {
                self.batch_size = hp::IMAGENET_BATCH_SIZE;
            }
            if !given("lr") {
                self.lr = hp::IMAGENET_LR_PER_256 * self.batch_size as f64 / 256.0;
            }
            if !given("momentum") {
                self.momentum = hp::PAPER_MOMENTUM;
            }
            if !given("weight_decay") {
                self.weight_decay = hp::PAPER_WEIGHT_DECAY;
            }
            if !given("schedule") {
                self.schedule = Schedule::Step30;
            }
            if !given("epochs") {
                self.epochs = Some(hp::IMAGENET_EPOCHS);
            }
            self.augment = !self.no_augment;
            // Image folders normalise with ImageNet's mean/std by default (see `train`'s data setup).
            self.normalize = !self.no_normalize;
        }
    }

    /// timm's training-split augmentations: RandAugment or TrivialAugmentWide (`--aa`) with timm's fill,
    /// `round(255 · mean)` of the normalisation's mean (ImageNet's when there is none, timm's
    /// default), and RandomErasing (`--reprob`, `--remode`, `--recount`).
    pub fn timm_augment(
        &self,
        normalize: Option<&[(f32, f32)]>,
    ) -> Result<(Option<AutoAugment>, Option<RandomErasing>)> {
        let mean = match normalize {
            Some([r, g, b]) => [r.0, g.0, b.0].map(f64::from),
            _ => hp::IMAGENET_MEAN,
        };
        let aa = match &self.aa {
            Some(s) => {
                Some(AutoAugment::parse(s, augment::fill_of_mean(mean)).map_err(|e| anyhow::anyhow!("--aa {s}: {e}"))?)
            }
            None => None,
        };
        let erase = (self.reprob > 0.0).then_some(RandomErasing {
            prob: self.reprob,
            mode: self.remode,
            max_count: self.recount,
        });
        Ok((aa, erase))
    }

    /// The weights best.safetensors is chosen on: `--best-on`, else the EMA's with `--model-ema`.
    pub fn best_on(&self) -> BestOn {
        self.best_on.unwrap_or(if self.model_ema { BestOn::Ema } else { BestOn::Model })
    }

    /// Mixup/CutMix for `classes` classes (active when `--mixup` or `--cutmix` is above 0).
    pub fn mixup_config(&self, classes: usize) -> crate::data::mixup::MixupConfig {
        crate::data::mixup::MixupConfig {
            mixup_alpha: self.mixup,
            cutmix_alpha: self.cutmix,
            prob: self.mixup_prob,
            switch_prob: self.mixup_switch_prob,
            smoothing: self.label_smoothing,
            classes,
            mode: self.mixup_mode,
            off_epoch: self.mixup_off_epoch,
        }
    }

    /// The model EMA's (decay, warmup), with `--model-ema`.
    pub fn model_ema_config(&self) -> Option<(f64, bool)> {
        self.model_ema.then_some((self.model_ema_decay, self.model_ema_warmup))
    }

    /// The epoch count, defaulting to the base recipe's.
    pub fn epochs(&self) -> usize {
        self.epochs.unwrap_or(hp::EPOCHS)
    }

    pub fn optimizer_config(&self) -> OptimizerConfig {
        let (beta1, beta2) = self.betas;
        let adam = |decoupled| OptimizerConfig::Adam {
            lr: self.lr,
            beta1,
            beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            decoupled,
        };
        match self.optimizer {
            OptimizerKind::Adam => adam(false),
            OptimizerKind::Adamw => adam(true),
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                lr: self.lr,
                momentum: self.momentum,
                dampening: hp::SGD_DAMPENING,
                weight_decay: self.weight_decay,
                nesterov: self.nesterov,
            },
        }
    }
}
