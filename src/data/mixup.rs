//! timm's `Mixup` in batch mode (`timm/data/mixup.py`, `mode='batch'`), on the host: one λ per
//! batch, each image mixed with the batch's mirror image (the batch flipped along its first axis),
//! and the soft targets of `mixup_target`. The draws are a function of (seed, epoch, step), so a
//! run is the same with any loader and resumes exactly.
//!
//! Per batch, as `Mixup._params_per_batch` and `_mix_batch`: with probability `prob` the batch is
//! mixed, else λ = 1 (targets still smoothed). Mixed: with both alphas above 0, CutMix with
//! probability `switch_prob`, else Mixup; λ ~ Beta(α, α) of the one chosen. Mixup:
//! x = λ·x + (1 − λ)·flip(x). CutMix: a box of (int(H·√(1−λ)), int(W·√(1−λ))) around a uniform
//! centre, clipped to the image (`rand_bbox`), pasted from flip(x), and λ corrected to
//! 1 − box area / (H·W) (`correct_lam`). Targets: λ·onehot(y) + (1 − λ)·onehot(flip(y)) with
//! onehot's on value 1 − ε + ε/K and off value ε/K (ε = label smoothing).
//!
//! timm asserts an even batch; flipping pairs an odd batch's middle image with itself (mixing it
//! with itself), which this module allows: the epoch's last batch may be odd.

use anyhow::{Result, ensure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

/// `--mixup`, `--cutmix`, `--mixup-prob`, `--mixup-switch-prob` and the label smoothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixupConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub prob: f64,
    pub switch_prob: f64,
    pub smoothing: f64,
    pub classes: usize,
}

/// How one batch is mixed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mix {
    /// Not mixed (λ = 1): targets are the smoothed one-hots.
    None,
    /// x = λ·x + (1 − λ)·flip(x).
    Mixup { lam: f64 },
    /// The box rows y0..y1, columns x0..x1 pasted from flip(x); λ the corrected one.
    Cutmix { lam: f64, y0: usize, y1: usize, x0: usize, x1: usize },
}

impl Mix {
    pub fn lam(&self) -> f64 {
        match *self {
            Mix::None => 1.0,
            Mix::Mixup { lam } | Mix::Cutmix { lam, .. } => lam,
        }
    }
}

impl MixupConfig {
    pub fn validate(&self) -> Result<()> {
        for (flag, a) in [("--mixup", self.mixup_alpha), ("--cutmix", self.cutmix_alpha)] {
            ensure!(
                a >= 0.0 && a.is_finite(),
                "{flag} must be a finite number >= 0 (the Beta distribution's alpha), got {a}"
            );
        }
        for (flag, p) in [("--mixup-prob", self.prob), ("--mixup-switch-prob", self.switch_prob)] {
            ensure!((0.0..=1.0).contains(&p), "{flag} must be a probability in [0, 1], got {p}");
        }
        ensure!(self.classes >= 1, "mixup needs at least one class");
        Ok(())
    }

    /// Whether any mixing can happen (timm's `mixup_active`).
    pub fn active(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0
    }

    /// The draws of batch `step` (0-based) of `epoch` for images of `h`×`w`.
    pub fn draw(&self, seed: u64, epoch: usize, step: usize, h: usize, w: usize) -> Mix {
        let key = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add((epoch as u64) << 32).wrapping_add(step as u64)
            ^ 0x4D49_5855_5000_0000; // "MIXUP"
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        if !self.active() || rng.random::<f64>() >= self.prob {
            return Mix::None;
        }
        let cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.random::<f64>() < self.switch_prob,
            (false, true) => true,
            _ => false,
        };
        let alpha = if cutmix { self.cutmix_alpha } else { self.mixup_alpha };
        // Beta(α, α) with α > 0 always constructs; a failure would be a bug, not user input.
        let lam = Beta::new(alpha, alpha).map(|b| b.sample(&mut rng)).unwrap_or(1.0);
        if !cutmix {
            return Mix::Mixup { lam };
        }
        // rand_bbox's centre: uniform over the image.
        let cy = rng.random_range(0..h.max(1));
        let cx = rng.random_range(0..w.max(1));
        cutmix_box(lam, h, w, cy, cx)
    }
}

/// timm's `cutmix_bbox_and_lam` with `correct_lam` for a drawn λ and box centre (cy, cx): the box
/// of int(H·√(1−λ)) × int(W·√(1−λ)) around it (`rand_bbox`), clipped to the image, and
/// λ = 1 − its area / (H·W).
pub fn cutmix_box(lam: f64, h: usize, w: usize, cy: usize, cx: usize) -> Mix {
    let ratio = (1.0 - lam).sqrt();
    let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    let (cy, cx) = (cy as i64, cx as i64);
    // timm's bounds: cy - cut_h // 2 .. cy + (cut_h + 1) // 2 (an odd side's extra row below).
    let (y0, y1) = (clip(cy - cut_h / 2, h), clip(cy + (cut_h + 1) / 2, h));
    let (x0, x1) = (clip(cx - cut_w / 2, w), clip(cx + (cut_w + 1) / 2, w));
    let lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
    Mix::Cutmix { lam, y0, y1, x0, x1 }
}

/// Mix `images` ([n, c, h, w], in place) as `mix` says and return the soft targets [n, classes]
/// (`mixup_target`). The arithmetic is timm's in f32: x·λ + flip(x)·(1 − λ).
pub fn mix_batch(
    mix: Mix,
    images: &mut [f32],
    labels: &[u32],
    shape: [usize; 4],
    classes: usize,
    smoothing: f64,
) -> Vec<f32> {
    let [n, c, h, w] = shape;
    let per = c * h * w;
    let flipped: Vec<f32> = (0..n).flat_map(|i| images[(n - 1 - i) * per..][..per].to_vec()).collect();
    match mix {
        Mix::None => {}
        Mix::Mixup { lam } => {
            let (a, b) = (lam as f32, (1.0 - lam) as f32);
            for (x, f) in images.iter_mut().zip(&flipped) {
                *x = *x * a + *f * b;
            }
        }
        Mix::Cutmix { y0, y1, x0, x1, .. } => {
            for plane in 0..n * c {
                for y in y0..y1 {
                    let row = plane * h * w + y * w;
                    images[row + x0..row + x1].copy_from_slice(&flipped[row + x0..row + x1]);
                }
            }
        }
    }
    let lam = mix.lam();
    let off = smoothing / classes as f64;
    let on = 1.0 - smoothing + off;
    let onehot = |y: u32, k: usize| if y as usize == k { on } else { off };
    (0..n * classes)
        .map(|i| {
            let (s, k) = (i / classes, i % classes);
            (onehot(labels[s], k) * lam + onehot(labels[n - 1 - s], k) * (1.0 - lam)) as f32
        })
        .collect()
}
