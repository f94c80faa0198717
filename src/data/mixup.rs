//! timm's `Mixup` (`timm/data/mixup.py`), on the host: each image i mixed with image n − 1 − i of
//! its batch (the batch's mirror image), and the soft targets of `mixup_target`. `--mixup-mode`
//! says how the draws are shared: `batch` one λ (and box) per batch, `pair` one per pair
//! (i, n − 1 − i), `elem` one per image. The draws are a function of (seed, epoch, step), so a
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
//! Per pair and per image, as `_params_per_elem`, `_mix_pair` and `_mix_elem`: λ is float32 (the
//! mixed images are x·λ + x′·(1 − λ) in float32 with that λ, and the corrected CutMix λ is stored
//! back as float32); with both alphas each image (pair) is CutMix with probability `switch_prob`,
//! its λ from that one's Beta; with probability 1 − `prob` it is not mixed (λ = 1); CutMix boxes are
//! `rand_bbox`'s with its float32 arithmetic for a float32 λ. A pair's two images paste the same
//! box from each other.
//!
//! timm asserts an even batch; flipping pairs an odd batch's middle image with itself (mixing it
//! with itself), which batch and elem mode allow here: the epoch's last batch may be odd. In pair
//! mode the middle image of an odd batch has no pair and is not mixed (`--batch-size` itself must
//! be even, as timm asserts).

use anyhow::{Result, ensure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};

/// `--mixup-mode`: timm's `Mixup(mode=…)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixupMode {
    /// One λ (and CutMix box) for the whole batch.
    #[default]
    Batch,
    /// One λ per pair (i, n − 1 − i): the two images mix with each other by the same λ.
    Pair,
    /// One λ per image, each mixed with its mirror image n − 1 − i.
    Elem,
}

impl MixupMode {
    /// The flag's value (`batch`, `pair`, `elem`).
    pub fn name(self) -> &'static str {
        match self {
            MixupMode::Batch => "batch",
            MixupMode::Pair => "pair",
            MixupMode::Elem => "elem",
        }
    }
}

/// `--mixup`, `--cutmix`, `--mixup-prob`, `--mixup-switch-prob`, `--mixup-mode`,
/// `--mixup-off-epoch` and the label smoothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixupConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    pub prob: f64,
    pub switch_prob: f64,
    pub smoothing: f64,
    pub classes: usize,
    pub mode: MixupMode,
    /// Mixing stops from this (1-based) epoch + 1 on: timm's `--mixup-off-epoch N` with its
    /// 0-based `epoch >= N`, i.e. after N epochs. 0: never.
    pub off_epoch: usize,
}

/// The per-image (per-pair) draws of timm's `_params_per_elem`: λ in float32 (1: not mixed) and
/// whether the image (pair) is CutMix rather than Mixup.
#[derive(Clone, Debug, PartialEq)]
pub struct ElemParams {
    pub lam: Vec<f32>,
    pub cutmix: Vec<bool>,
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
        ensure!(
            self.mode == MixupMode::Batch || self.active(),
            "--mixup-mode {} says how Mixup/CutMix draw, but neither is on: give --mixup or --cutmix",
            self.mode.name()
        );
        ensure!(
            self.off_epoch == 0 || self.active(),
            "--mixup-off-epoch {} stops Mixup/CutMix, but neither is on: give --mixup or --cutmix",
            self.off_epoch
        );
        Ok(())
    }

    /// `--mixup-mode pair` with batches of `batch_size`: timm asserts an even batch.
    pub fn check_batch_size(&self, batch_size: usize) -> Result<()> {
        ensure!(
            self.mode != MixupMode::Pair || batch_size.is_multiple_of(2),
            "--mixup-mode pair mixes image i with image n-1-i in pairs, so --batch-size must be even (timm asserts \
             it), got {batch_size}"
        );
        Ok(())
    }

    /// Whether any mixing can happen (timm's `mixup_active`).
    pub fn active(&self) -> bool {
        self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0
    }

    /// Whether batches of (1-based) `epoch` are mixed: not from `--mixup-off-epoch` on.
    pub fn enabled(&self, epoch: usize) -> bool {
        self.active() && (self.off_epoch == 0 || epoch <= self.off_epoch)
    }

    /// The generator of batch `step` (0-based) of `epoch`.
    fn rng(seed: u64, epoch: usize, step: usize) -> ChaCha8Rng {
        let key = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add((epoch as u64) << 32).wrapping_add(step as u64)
            ^ 0x4D49_5855_5000_0000; // "MIXUP"
        ChaCha8Rng::seed_from_u64(key)
    }

    /// How each of the `n` images of batch `step` (0-based) of (1-based) `epoch` is mixed, in the
    /// mode's way; image i's partner is n − 1 − i. Nothing is mixed from `--mixup-off-epoch` on.
    pub fn draw_samples(&self, seed: u64, epoch: usize, step: usize, n: usize, [h, w]: [usize; 2]) -> Vec<Mix> {
        if !self.enabled(epoch) {
            return vec![Mix::None; n];
        }
        let mut rng = Self::rng(seed, epoch, step);
        let count = if self.mode == MixupMode::Pair { n / 2 } else { n };
        match self.mode {
            MixupMode::Batch => vec![self.draw_batch(&mut rng, h, w); n],
            MixupMode::Pair | MixupMode::Elem => {
                let params = self.params_per_elem(count, &mut rng);
                let mut centre = || (rng.random_range(0..h.max(1)), rng.random_range(0..w.max(1)));
                elem_mixes(&params, n, self.mode, h, w, &mut centre)
            }
        }
    }

    /// timm's `_params_per_elem(count)`: the CutMix flags (with both alphas), λ from the chosen
    /// alpha's Beta, then each mixed with probability `prob` (else λ = 1), λ rounded to float32.
    pub fn params_per_elem(&self, count: usize, rng: &mut ChaCha8Rng) -> ElemParams {
        let both = self.mixup_alpha > 0.0 && self.cutmix_alpha > 0.0;
        let cutmix: Vec<bool> = (0..count)
            .map(|_| if both { rng.random::<f64>() < self.switch_prob } else { self.mixup_alpha <= 0.0 })
            .collect();
        // Beta(α, α) with α > 0 always constructs; a failure would be a bug, not user input.
        let beta = |a: f64, rng: &mut ChaCha8Rng| Beta::new(a, a).map(|b| b.sample(rng)).unwrap_or(1.0);
        let lam_mix: Vec<f64> =
            cutmix.iter().map(|&c| beta(if c { self.cutmix_alpha } else { self.mixup_alpha }, rng)).collect();
        let lam = lam_mix.iter().map(|&l| if rng.random::<f64>() < self.prob { l as f32 } else { 1.0 }).collect();
        ElemParams { lam, cutmix }
    }

    /// The batch-mode draw of batch `step` (0-based) of `epoch` for images of `h`×`w` (what
    /// [`Self::draw_samples`] gives every image in batch mode).
    pub fn draw(&self, seed: u64, epoch: usize, step: usize, h: usize, w: usize) -> Mix {
        self.draw_batch(&mut Self::rng(seed, epoch, step), h, w)
    }

    /// timm's `_params_per_batch` and its box.
    fn draw_batch(&self, rng: &mut ChaCha8Rng, h: usize, w: usize) -> Mix {
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
        let lam = Beta::new(alpha, alpha).map(|b| b.sample(rng)).unwrap_or(1.0);
        if !cutmix {
            return Mix::Mixup { lam };
        }
        // rand_bbox's centre: uniform over the image.
        let cy = rng.random_range(0..h.max(1));
        let cx = rng.random_range(0..w.max(1));
        cutmix_box(lam, h, w, cy, cx)
    }
}

/// timm's `_mix_elem` (mode elem: `n` parameters) and `_mix_pair` (mode pair: n / 2 parameters,
/// image n − 1 − i taking pair i's mix): each image's mix, its CutMix box centre drawn by
/// `centre()` (`rand_bbox`'s randint, y then x) in image order, only for CutMix images with λ ≠ 1;
/// the box from the float32 λ in float32 ([`cutmix_box_f32`]), the corrected λ rounded to float32.
pub fn elem_mixes(
    p: &ElemParams,
    n: usize,
    mode: MixupMode,
    h: usize,
    w: usize,
    centre: &mut impl FnMut() -> (usize, usize),
) -> Vec<Mix> {
    let mut mixes = vec![Mix::None; n];
    for (i, (&lam, &cutmix)) in p.lam.iter().zip(&p.cutmix).enumerate() {
        let mix = if lam == 1.0 {
            Mix::None
        } else if cutmix {
            let (cy, cx) = centre();
            match cutmix_box_f32(lam, h, w, cy, cx) {
                Mix::Cutmix { lam, y0, y1, x0, x1 } => Mix::Cutmix { lam: f64::from(lam as f32), y0, y1, x0, x1 },
                other => other,
            }
        } else {
            Mix::Mixup { lam: f64::from(lam) }
        };
        mixes[i] = mix;
        if mode == MixupMode::Pair {
            mixes[n - 1 - i] = mix;
        }
    }
    mixes
}

/// timm's `cutmix_bbox_and_lam` with `correct_lam` for a drawn λ and box centre (cy, cx): the box
/// of int(H·√(1−λ)) × int(W·√(1−λ)) around it (`rand_bbox`), clipped to the image, and
/// λ = 1 − its area / (H·W).
pub fn cutmix_box(lam: f64, h: usize, w: usize, cy: usize, cx: usize) -> Mix {
    let ratio = (1.0 - lam).sqrt();
    box_of((h as f64 * ratio) as i64, (w as f64 * ratio) as i64, h, w, cy, cx)
}

/// [`cutmix_box`] for a float32 λ (modes pair and elem), as numpy computes `rand_bbox` for one:
/// √(1 − λ) and H·√(1 − λ) in float32.
pub fn cutmix_box_f32(lam: f32, h: usize, w: usize, cy: usize, cx: usize) -> Mix {
    let ratio = (1.0 - lam).sqrt();
    box_of((h as f32 * ratio) as i64, (w as f32 * ratio) as i64, h, w, cy, cx)
}

/// `rand_bbox`'s box of cut_h × cut_w around (cy, cx), clipped, and the corrected λ.
fn box_of(cut_h: i64, cut_w: i64, h: usize, w: usize, cy: usize, cx: usize) -> Mix {
    let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
    let (cy, cx) = (cy as i64, cx as i64);
    // timm's bounds: cy - cut_h // 2 .. cy + (cut_h + 1) // 2 (an odd side's extra row below).
    let (y0, y1) = (clip(cy - cut_h / 2, h), clip(cy + (cut_h + 1) / 2, h));
    let (x0, x1) = (clip(cx - cut_w / 2, w), clip(cx + (cut_w + 1) / 2, w));
    let lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
    Mix::Cutmix { lam, y0, y1, x0, x1 }
}

/// Mix `images` ([n, c, h, w], in place) as `mix` says for the whole batch (batch mode) and return
/// the soft targets [n, classes] (`mixup_target`).
pub fn mix_batch(
    mix: Mix,
    images: &mut [f32],
    labels: &[u32],
    shape: [usize; 4],
    classes: usize,
    smoothing: f64,
) -> Vec<f32> {
    mix_samples(&vec![mix; shape[0]], images, labels, shape, classes, smoothing)
}

/// Mix each image i of `images` ([n, c, h, w], in place) with the original of image n − 1 − i as
/// `mixes[i]` says, and return the soft targets [n, classes]: row i is
/// λᵢ·onehot(yᵢ) + (1 − λᵢ)·onehot(y₍ₙ₋₁₋ᵢ₎) (`mixup_target` with a per-image λ). The arithmetic is
/// timm's in f32: x·λ + x′·(1 − λ).
pub fn mix_samples(
    mixes: &[Mix],
    images: &mut [f32],
    labels: &[u32],
    [n, c, h, w]: [usize; 4],
    classes: usize,
    smoothing: f64,
) -> Vec<f32> {
    let per = c * h * w;
    let flipped: Vec<f32> = (0..n).flat_map(|i| images[(n - 1 - i) * per..][..per].to_vec()).collect();
    for (i, mix) in mixes.iter().enumerate() {
        let (img, other) = (&mut images[i * per..][..per], &flipped[i * per..][..per]);
        match *mix {
            Mix::None => {}
            Mix::Mixup { lam } => {
                let (a, b) = (lam as f32, (1.0 - lam) as f32);
                for (x, f) in img.iter_mut().zip(other) {
                    *x = *x * a + *f * b;
                }
            }
            Mix::Cutmix { y0, y1, x0, x1, .. } => {
                for plane in 0..c {
                    for y in y0..y1 {
                        let row = plane * h * w + y * w;
                        img[row + x0..row + x1].copy_from_slice(&other[row + x0..row + x1]);
                    }
                }
            }
        }
    }
    let off = smoothing / classes as f64;
    let on = 1.0 - smoothing + off;
    let onehot = |y: u32, k: usize| if y as usize == k { on } else { off };
    (0..n * classes)
        .map(|i| {
            let (s, k) = (i / classes, i % classes);
            let lam = mixes[s].lam();
            (onehot(labels[s], k) * lam + onehot(labels[n - 1 - s], k) * (1.0 - lam)) as f32
        })
        .collect()
}
