//! Hyper-parameters: every default of `senet train` (and of the model flags `bench`, `plan` and
//! `summary` share) in one table, a comment each, airbench style. The clap attributes in
//! [`crate::args`], the optimizer, the recipe and the learning-rate schedule read from here.
//!
//! The base recipe is the seed document's: SENet width 1, Adam lr 1e-3, batch 128, 10 epochs,
//! `ToTensor()` preprocessing only. `--recipe paper` is the SENet paper's CIFAR recipe (§6.1).

use crate::gpu::Precision;
use crate::model::SePlacement;
use crate::ops::se_block::{Excitation, Squeeze};

// --- Network --------------------------------------------------------------------------------
/// The base SENet of the seed document.
pub const MODEL: &str = "senet";
/// Channel width multiplier: 1.0 = 64…1024 channels for senet, 16/32/64 for the CIFAR ResNets.
pub const WIDTH: f64 = 1.0;
/// SE reduction ratio r: the excitation's hidden width is C/r (the paper's choice, §6.1).
pub const REDUCTION: usize = 16;
/// The paper's squeeze: global average pooling.
pub const SQUEEZE: Squeeze = Squeeze::Avg;
/// The paper's gate: a sigmoid.
pub const EXCITATION: Excitation = Excitation::Sigmoid;
/// The paper's standard SE-ResNet block: SE on the residual branch, before the addition.
pub const SE_PLACEMENT: SePlacement = SePlacement::Standard;
/// Stochastic depth (timm's `drop_path_rate`): off, as the paper and timm's default.
pub const DROP_PATH: f64 = 0.0;
/// Input size, channels and classes when no dataset says them (`bench`, `plan`, `summary`; the
/// input size of a bare state dict in `predict`): CIFAR-10's 3×32×32 images in 10 classes.
pub const IMAGE_SIZE: usize = 32;
pub const IN_CHANNELS: usize = 3;
pub const NUM_CLASSES: usize = 10;

// --- Training -------------------------------------------------------------------------------
/// Passes over the training set.
pub const EPOCHS: usize = 10;
/// Images per step (and per evaluation batch).
pub const BATCH_SIZE: usize = 128;
/// Adam: the seed document's optimizer.
pub const OPTIMIZER: OptimizerKind = OptimizerKind::Adam;
/// Adam's usual learning rate.
pub const LR: f64 = 1e-3;
/// SGD momentum (used by `--optimizer sgd` only).
pub const MOMENTUM: f64 = 0.9;
/// No weight decay in the base recipe.
pub const WEIGHT_DECAY: f64 = 0.0;
/// Seeds the initial weights, the shuffling and the augmentation.
pub const SEED: u64 = 0;
/// A constant learning rate in the base recipe.
pub const SCHEDULE: Schedule = Schedule::Constant;
/// No warm-up in the base recipe.
pub const WARMUP_EPOCHS: f64 = 0.0;
/// Adam/AdamW betas and epsilon: PyTorch's defaults.
pub const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
pub const ADAM_EPS: f64 = 1e-8;
/// No gradient clipping in the base recipe (`--clip-grad-norm MAX` turns it on: the total 2-norm
/// of all gradients scaled down to MAX, as `torch.nn.utils.clip_grad_norm_`).
pub const CLIP_GRAD_NORM: Option<f64> = None;
/// One batch per optimizer step (`--grad-accum-steps N`: the gradients of N batches summed, each
/// batch's loss divided by N, as timm's train.py; the effective batch is N × --batch-size).
pub const GRAD_ACCUM_STEPS: usize = 1;
/// `--model-ema`'s decay: timm's train.py default (`--model-ema-decay 0.9998`).
pub const MODEL_EMA_DECAY: f64 = 0.9998;
/// SGD as `torch.optim.SGD`'s defaults: no dampening, no Nesterov (`--nesterov` turns it on).
pub const SGD_DAMPENING: f64 = 0.0;
/// `--schedule step`: the learning rate is multiplied by `STEP_FACTOR` when the run reaches
/// each fraction (numerator, denominator) of its epochs — ÷10 at 50 % and at 75 %, the paper's.
pub const STEP_MILESTONES: [(usize, usize); 2] = [(1, 2), (3, 4)];
pub const STEP_FACTOR: f64 = 0.1;
/// `--augment`: random crop from the image zero-padded by this many pixels on each side (then a
/// horizontal flip with probability ½), the usual CIFAR augmentation.
pub const CROP_PADDING: usize = 4;

// --- The paper's CIFAR recipe (`--recipe paper`; flags given explicitly win) ------------------
/// SGD with momentum 0.9, lr 0.1, weight decay 1e-4, the step schedule; crop + flip and
/// per-channel normalisation switched on.
pub const PAPER_OPTIMIZER: OptimizerKind = OptimizerKind::Sgd;
pub const PAPER_LR: f64 = 0.1;
pub const PAPER_MOMENTUM: f64 = 0.9;
pub const PAPER_WEIGHT_DECAY: f64 = 1e-4;
pub const PAPER_SCHEDULE: Schedule = Schedule::Step;

// --- The ImageNet recipe (`--recipe imagenet`; flags given explicitly win) ----------------------
/// SGD with momentum 0.9 and weight decay 1e-4 (the paper's), lr 0.1 per 256 images scaled
/// linearly with the batch (Goyal et al.; torchvision's reference recipe), ÷10 every
/// `STEP30_EPOCHS` epochs (`--schedule step30`), 100 epochs; RandomResizedCrop + flip and the
/// ImageNet mean/std.
pub const IMAGENET_BATCH_SIZE: usize = 256;
pub const IMAGENET_LR_PER_256: f64 = 0.1;
pub const IMAGENET_EPOCHS: usize = 100;
/// `--schedule step30`: the learning rate is multiplied by `STEP_FACTOR` every this many epochs.
pub const STEP30_EPOCHS: usize = 30;

// --- Image folders ----------------------------------------------------------------------------
/// timm's default crop_pct: the evaluation transform resizes to size / 0.875 and crops the centre.
pub const CROP_PCT: f64 = 0.875;
/// Hold a folder's decoded images in memory when they fit in this many MB.
pub const CACHE_MB: u64 = 1024;
/// The per-channel mean and std of ImageNet's training images (torchvision's and timm's
/// defaults): image folders are normalised with them unless `--mean/--std` say otherwise.
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

// --- Precision (`--precision`) ---------------------------------------------------------------
/// f32 everywhere; f16 is AMP, opted into.
pub const PRECISION: Precision = Precision::F32;
// f16's loss scaler: `torch.amp.GradScaler`'s defaults (start 2^16, ×2 after 2,000 finite steps,
// ×0.5 and the step skipped on inf/NaN) live in `ops::grad_scaler::GradScalerConfig::default`.

// --- Outputs --------------------------------------------------------------------------------
/// The run folder: config.json, metrics.csv, metrics.png, checkpoints.
pub const OUT: &str = "runs/latest";
/// Read the running loss every this many steps (the only host wait inside an epoch).
pub const LOG_EVERY: usize = 20;
/// `predict`: how many classes to print per image.
pub const PREDICT_TOP_K: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adam,
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Constant,
    Step,
    Cosine,
    /// ÷10 every 30 epochs (`STEP30_EPOCHS`), the ImageNet recipe's.
    Step30,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipe {
    Paper,
    Imagenet,
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
            let drops = STEP_MILESTONES.iter().filter(|&&(num, den)| den * epoch >= num * epochs).count();
            base * STEP_FACTOR.powi(drops as i32)
        }
        Schedule::Step30 => base * STEP_FACTOR.powi((step / per_epoch.max(1) / STEP30_EPOCHS) as i32),
        Schedule::Cosine => {
            let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
            base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }
}
