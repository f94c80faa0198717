//! timm's RandAugment (`timm.data.auto_augment.rand_augment_transform`) and RandomErasing
//! (`timm.data.random_erasing.RandomErasing`), on the training split of image folders.
//!
//! The ops work on u8 RGB images as PIL does (Pillow 13's `ImageOps`, `ImageEnhance`, and
//! `Image.transform(AFFINE, BILINEAR)` / `Image.rotate` from `libImaging/Geometry.c`, `Blend.c`,
//! `Filter.c`), with timm's magnitude mapping (`LEVEL_TO_ARG`), fill colour and per-op
//! probability. Geometric ops resample bilinearly: our `RandomResizedCrop` is bilinear, which is
//! timm's `transforms_imagenet_train(interpolation='bilinear')`, and then timm's ops are bilinear
//! too (with its default `'random'` each op picks bilinear or bicubic; we do not).
//!
//! Every draw goes through [`Draws`], named after the Python call timm makes (`random.random()`,
//! `random.gauss`, `random.uniform`, `random.randint`, `np.random.choice`), in timm's order. In
//! training they come from the sample's own stream ([`super::folder::sample_rng`]); the tests
//! replay draws that timm made (recorded by `scripts/augment_golden.py`) and must reach timm's
//! pixels and boxes.

use anyhow::Result;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::transforms::{Rect, Rgb, round_half_even};

/// The random draws the augmentations make, one method per Python call timm makes.
pub trait Draws {
    /// One of `n` choices, uniformly (`np.random.choice(ops, n_layers)` draws one per layer).
    fn index(&mut self, n: usize) -> usize;
    /// `random.random()`: uniform in [0, 1).
    fn random(&mut self) -> f64;
    /// `random.gauss(mu, sigma)`.
    fn gauss(&mut self, mu: f64, sigma: f64) -> f64;
    /// `random.uniform(a, b)`.
    fn uniform(&mut self, a: f64, b: f64) -> f64;
    /// `random.randint(a, b)`: a ≤ v ≤ b.
    fn randint(&mut self, a: usize, b: usize) -> usize;
    /// A standard normal value for erasing noise (`torch.Tensor.normal_()` in timm).
    fn normal(&mut self) -> f32;
}

/// A standard normal value by Box–Muller from two uniforms.
fn box_muller(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = Rng::random::<f64>(rng);
    let u2 = Rng::random::<f64>(rng);
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Draws for ChaCha8Rng {
    fn index(&mut self, n: usize) -> usize {
        self.random_range(0..n)
    }
    fn random(&mut self) -> f64 {
        Rng::random::<f64>(self)
    }
    fn gauss(&mut self, mu: f64, sigma: f64) -> f64 {
        mu + sigma * box_muller(self)
    }
    fn uniform(&mut self, a: f64, b: f64) -> f64 {
        a + (b - a) * Rng::random::<f64>(self)
    }
    fn randint(&mut self, a: usize, b: usize) -> usize {
        self.random_range(a..=b)
    }
    fn normal(&mut self) -> f32 {
        box_muller(self) as f32
    }
}

// ---------------------------------------------------------------------------------------------
// The ops

/// timm's RandAugment ops (`NAME_TO_OP`, the names of `_RAND_TRANSFORMS` and
/// `_RAND_INCREASING_TRANSFORMS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    PosterizeIncreasing,
    Solarize,
    SolarizeIncreasing,
    SolarizeAdd,
    Color,
    ColorIncreasing,
    Contrast,
    ContrastIncreasing,
    Brightness,
    BrightnessIncreasing,
    Sharpness,
    SharpnessIncreasing,
    ShearX,
    ShearY,
    TranslateXRel,
    TranslateYRel,
}

/// timm's `_RAND_TRANSFORMS`, in its order (the order `np.random.choice` indexes).
pub const RAND_TRANSFORMS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateXRel,
    Op::TranslateYRel,
];

/// timm's `_RAND_INCREASING_TRANSFORMS` (`inc1`), in its order.
pub const RAND_INCREASING_TRANSFORMS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::PosterizeIncreasing,
    Op::SolarizeIncreasing,
    Op::SolarizeAdd,
    Op::ColorIncreasing,
    Op::ContrastIncreasing,
    Op::BrightnessIncreasing,
    Op::SharpnessIncreasing,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateXRel,
    Op::TranslateYRel,
];

/// timm's `_LEVEL_DENOM`: magnitude 10 is an op's full strength.
const LEVEL_DENOM: f64 = 10.0;

impl Op {
    /// timm's name of the op.
    pub fn name(self) -> &'static str {
        match self {
            Op::AutoContrast => "AutoContrast",
            Op::Equalize => "Equalize",
            Op::Invert => "Invert",
            Op::Rotate => "Rotate",
            Op::Posterize => "Posterize",
            Op::PosterizeIncreasing => "PosterizeIncreasing",
            Op::Solarize => "Solarize",
            Op::SolarizeIncreasing => "SolarizeIncreasing",
            Op::SolarizeAdd => "SolarizeAdd",
            Op::Color => "Color",
            Op::ColorIncreasing => "ColorIncreasing",
            Op::Contrast => "Contrast",
            Op::ContrastIncreasing => "ContrastIncreasing",
            Op::Brightness => "Brightness",
            Op::BrightnessIncreasing => "BrightnessIncreasing",
            Op::Sharpness => "Sharpness",
            Op::SharpnessIncreasing => "SharpnessIncreasing",
            Op::ShearX => "ShearX",
            Op::ShearY => "ShearY",
            Op::TranslateXRel => "TranslateXRel",
            Op::TranslateYRel => "TranslateYRel",
        }
    }

    /// The op timm names `name`.
    pub fn from_name(name: &str) -> Option<Op> {
        RAND_TRANSFORMS.iter().chain(&RAND_INCREASING_TRANSFORMS).copied().find(|op| op.name() == name)
    }

    /// timm's `LEVEL_TO_ARG[name](magnitude)`: the op's argument at `magnitude` (0..=10 is the
    /// usual range), drawing the sign (`_randomly_negate`: `random.random() > 0.5` negates) for the
    /// ops that have one. None for the ops without an argument.
    pub fn level_arg(self, magnitude: f64, draws: &mut impl Draws) -> Option<f64> {
        let level = magnitude / LEVEL_DENOM;
        let mut negate = |v: f64| if draws.random() > 0.5 { -v } else { v };
        // Python's int() of a non-negative float: truncation.
        let posterize = (level * 4.0).trunc();
        let solarize = ((level * 256.0).trunc()).min(256.0);
        Some(match self {
            Op::AutoContrast | Op::Equalize | Op::Invert => return None,
            Op::Rotate => negate(level * 30.0),
            Op::Posterize => posterize,
            Op::PosterizeIncreasing => 4.0 - posterize,
            Op::Solarize => solarize,
            Op::SolarizeIncreasing => 256.0 - solarize,
            Op::SolarizeAdd => ((level * 110.0).trunc()).min(128.0),
            Op::Color | Op::Contrast | Op::Brightness | Op::Sharpness => level * 1.8 + 0.1,
            Op::ColorIncreasing | Op::ContrastIncreasing | Op::BrightnessIncreasing | Op::SharpnessIncreasing => {
                (1.0 + negate(level * 0.9)).max(0.1)
            }
            Op::ShearX | Op::ShearY => negate(level * 0.3),
            Op::TranslateXRel | Op::TranslateYRel => negate(level * 0.45),
        })
    }

    /// The op applied to `img` with its argument `arg` ([`Op::level_arg`]); `fill` colours what
    /// a geometric op uncovers.
    pub fn apply(self, img: &Rgb, arg: Option<f64>, fill: [u8; 3]) -> Rgb {
        let a = arg.unwrap_or(0.0);
        let (w, h) = (img.width as f64, img.height as f64);
        match self {
            Op::AutoContrast => auto_contrast(img),
            Op::Equalize => equalize(img),
            Op::Invert => lut(img, |v| 255 - v),
            Op::Solarize | Op::SolarizeIncreasing => lut(img, |v| if f64::from(v) < a { v } else { 255 - v }),
            Op::SolarizeAdd => lut(img, |v| if v < 128 { (f64::from(v) + a).min(255.0) as u8 } else { v }),
            Op::Posterize | Op::PosterizeIncreasing => {
                let bits = a as u32;
                if bits >= 8 {
                    return img.clone();
                }
                // Pillow 13 refuses 0 bits (ValueError); earlier Pillows (and this) give black.
                let mask = !((1u32 << (8 - bits)) - 1) as u8;
                lut(img, |v| v & mask)
            }
            Op::Color | Op::ColorIncreasing => blend(&greyscale(img), img, a as f32),
            Op::Contrast | Op::ContrastIncreasing => {
                let n = (img.width * img.height) as f64;
                let sum: u64 = img.pixels.chunks_exact(3).map(|p| u64::from(luma(p))).sum();
                let mean = (sum as f64 / n + 0.5) as u8;
                let grey = Rgb { pixels: vec![mean; img.pixels.len()], ..img.clone() };
                blend(&grey, img, a as f32)
            }
            Op::Brightness | Op::BrightnessIncreasing => {
                blend(&Rgb { pixels: vec![0; img.pixels.len()], ..img.clone() }, img, a as f32)
            }
            Op::Sharpness | Op::SharpnessIncreasing => blend(&smooth(img), img, a as f32),
            Op::ShearX => affine(img, [1.0, a, 0.0, 0.0, 1.0, 0.0], fill),
            Op::ShearY => affine(img, [1.0, 0.0, 0.0, a, 1.0, 0.0], fill),
            Op::TranslateXRel => affine(img, [1.0, 0.0, a * w, 0.0, 1.0, 0.0], fill),
            Op::TranslateYRel => affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, a * h], fill),
            Op::Rotate => rotate(img, a, fill),
        }
    }
}

/// A lookup table applied to every channel (`Image.point`).
fn lut(img: &Rgb, f: impl Fn(u8) -> u8) -> Rgb {
    let table: Vec<u8> = (0..=255u8).map(f).collect();
    Rgb { pixels: img.pixels.iter().map(|&v| table[usize::from(v)]).collect(), ..img.clone() }
}

/// Per-channel histograms (`Image.histogram()` of an RGB image).
fn histograms(img: &Rgb) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.pixels.chunks_exact(3) {
        for c in 0..3 {
            h[c][usize::from(p[c])] += 1;
        }
    }
    h
}

/// Per-channel tables applied (`Image.point` with 768 entries).
fn luts(img: &Rgb, tables: &[[u8; 256]; 3]) -> Rgb {
    let pixels = img.pixels.iter().enumerate().map(|(i, &v)| tables[i % 3][usize::from(v)]).collect();
    Rgb { pixels, ..img.clone() }
}

/// `ImageOps.autocontrast(img)` (cutoff 0): each channel's darkest value to 0, lightest to 255.
fn auto_contrast(img: &Rgb) -> Rgb {
    let hist = histograms(img);
    let mut tables = [[0u8; 256]; 3];
    for (h, table) in hist.iter().zip(&mut tables) {
        let lo = h.iter().position(|&n| n > 0).unwrap_or(255);
        let hi = h.iter().rposition(|&n| n > 0).unwrap_or(0);
        for (ix, t) in table.iter_mut().enumerate() {
            *t = if hi <= lo {
                ix as u8
            } else {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                // Python's int(): toward zero, then clamped.
                ((ix as f64 * scale + offset) as i64).clamp(0, 255) as u8
            };
        }
    }
    luts(img, &tables)
}

/// `ImageOps.equalize(img)`: each channel's cumulative histogram as its table.
fn equalize(img: &Rgb) -> Rgb {
    let hist = histograms(img);
    let mut tables = [[0u8; 256]; 3];
    for (h, table) in hist.iter().zip(&mut tables) {
        let used: Vec<u64> = h.iter().copied().filter(|&n| n > 0).collect();
        let step = if used.len() <= 1 { 0 } else { (used.iter().sum::<u64>() - used[used.len() - 1]) / 255 };
        if step == 0 {
            for (i, t) in table.iter_mut().enumerate() {
                *t = i as u8;
            }
            continue;
        }
        let mut n = step / 2;
        for (i, t) in table.iter_mut().enumerate() {
            // Pillow's table is a list of ints, clipped to u8 by `point`.
            *t = (n / step).min(255) as u8;
            n += h[i];
        }
    }
    luts(img, &tables)
}

/// Pillow's RGB → L: ITU-R 601-2 luma in 16-bit fixed point.
fn luma(p: &[u8]) -> u8 {
    ((u32::from(p[0]) * 19595 + u32::from(p[1]) * 38470 + u32::from(p[2]) * 7471 + 0x8000) >> 16) as u8
}

/// `img.convert("L").convert("RGB")`.
fn greyscale(img: &Rgb) -> Rgb {
    Rgb { pixels: img.pixels.chunks_exact(3).flat_map(|p| [luma(p); 3]).collect(), ..img.clone() }
}

/// `Image.blend(a, b, alpha)` (Blend.c): `a + alpha·(b − a)` in C float, truncated; clipped to
/// [0, 255] when extrapolating (alpha outside [0, 1]).
fn blend(a: &Rgb, b: &Rgb, alpha: f32) -> Rgb {
    if alpha == 0.0 {
        return a.clone();
    }
    if alpha == 1.0 {
        return b.clone();
    }
    let inside = (0.0..=1.0).contains(&alpha);
    let pixels = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(&x, &y)| {
            let v = f32::from(x) + alpha * (f32::from(y) - f32::from(x));
            if inside {
                v as u8
            } else if v <= 0.0 {
                0
            } else if v >= 255.0 {
                255
            } else {
                v as u8
            }
        })
        .collect();
    Rgb { pixels, ..a.clone() }
}

/// `img.filter(ImageFilter.SMOOTH)` (Filter.c's 3×3 path): kernel 1 1 1 / 1 5 1 / 1 1 1 over 13 in
/// C float, +0.5 and truncated; the border rows and columns are copied unchanged.
fn smooth(img: &Rgb) -> Rgb {
    let (w, h) = (img.width, img.height);
    let mut out = img.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let (k1, k5) = ((1.0f64 / 13.0) as f32, (5.0f64 / 13.0) as f32);
    let px = |x: usize, y: usize, c: usize| f32::from(img.pixels[(y * w + x) * 3 + c]);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                // Filter.c: offset (0 + 0.5), then the rows y+1, y, y−1, each a sum of three.
                let row = |yy: usize, mid: f32| px(x - 1, yy, c) * k1 + px(x, yy, c) * mid + px(x + 1, yy, c) * k1;
                let mut ss = 0.5f32;
                ss += row(y + 1, k1);
                ss += row(y, k5);
                ss += row(y - 1, k1);
                out.pixels[(y * w + x) * 3 + c] = if ss <= 0.0 {
                    0
                } else if ss >= 255.0 {
                    255
                } else {
                    ss as u8
                };
            }
        }
    }
    out
}

/// `img.transform(img.size, Image.AFFINE, a, resample=BILINEAR, fillcolor=fill)` (Geometry.c's
/// generic transform with `bilinear_filter32RGB`): output pixel (x, y) samples the input at
/// (a0·(x+½) + a1·(y+½) + a2, a3·(x+½) + a4·(y+½) + a5); outside the image it is `fill`; inside,
/// the four nearest pixels (edges clamped) blended in f64 and truncated.
pub fn affine(img: &Rgb, a: [f64; 6], fill: [u8; 3]) -> Rgb {
    let (w, h) = (img.width, img.height);
    let mut out = Vec::with_capacity(w * h * 3);
    let clip = |v: i64, n: usize| v.clamp(0, n as i64 - 1) as usize;
    for y in 0..h {
        for x in 0..w {
            let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
            let xin = a[0] * xo + a[1] * yo + a[2];
            let yin = a[3] * xo + a[4] * yo + a[5];
            if !(xin >= 0.0 && xin < w as f64 && yin >= 0.0 && yin < h as f64) {
                out.extend_from_slice(&fill);
                continue;
            }
            let (xs, ys) = (xin - 0.5, yin - 0.5);
            let (fx, fy) = (xs.floor(), ys.floor());
            let (dx, dy) = (xs - fx, ys - fy);
            let (ix, iy) = (fx as i64, fy as i64);
            let (x0, x1) = (clip(ix, w), clip(ix + 1, w));
            let row0 = clip(iy, h);
            let has_row1 = iy + 1 >= 0 && iy + 1 < h as i64;
            for c in 0..3 {
                let p = |xx: usize, yy: usize| f64::from(img.pixels[(yy * w + xx) * 3 + c]);
                let lerp = |a: f64, b: f64, d: f64| a + (b - a) * d;
                let v1 = lerp(p(x0, row0), p(x1, row0), dx);
                let v2 = if has_row1 { lerp(p(x0, (iy + 1) as usize), p(x1, (iy + 1) as usize), dx) } else { v1 };
                out.push(lerp(v1, v2, dy) as u8);
            }
        }
    }
    Rgb { width: w, height: h, pixels: out }
}

/// Python's `round(x, 15)` (correctly rounded through its decimal digits).
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// `img.rotate(degrees, resample=BILINEAR, fillcolor=fill)` (Pillow's `Image.rotate` without
/// expand): about the image centre, counter-clockwise, through [`affine`].
pub fn rotate(img: &Rgb, degrees: f64, fill: [u8; 3]) -> Rgb {
    let angle = degrees.rem_euclid(360.0);
    if angle == 0.0 {
        return img.clone();
    }
    // (90°, 180°, 270° are exact transposes in Pillow; timm's range, ±30°, never reaches them.)
    let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
    let t = -angle.to_radians();
    let (cos, sin) = (round15(t.cos()), round15(t.sin()));
    let mut m = [cos, sin, 0.0, round15(-t.sin()), cos, 0.0];
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx;
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy;
    affine(img, m, fill)
}

// ---------------------------------------------------------------------------------------------
// RandAugment

/// timm's `RandAugment` built by `rand_augment_transform(config)`: `num_layers` ops chosen with
/// replacement, each applied with probability `prob` at `magnitude` (perturbed by
/// `magnitude_std`), clipped to [0, `magnitude_max` or 10].
#[derive(Clone, Debug, PartialEq)]
pub struct RandAugment {
    pub ops: Vec<Op>,
    pub magnitude: f64,
    pub num_layers: usize,
    pub prob: f64,
    /// Standard deviation of the magnitude's normal noise; infinity: uniform in [0, magnitude].
    pub magnitude_std: f64,
    pub magnitude_max: Option<f64>,
    /// What geometric ops uncover (timm: `round(255 · mean)`).
    pub fill: [u8; 3],
}

/// What `--aa` accepts, for error messages.
pub const AA_GRAMMAR: &str = "timm's RandAugment config rand[-m<int>][-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc<0|1>], \
     e.g. rand-m9-mstd0.5 or rand-m9-n2-mstd0.5-inc1";

impl RandAugment {
    /// Parse timm's config string (`rand-m9-n2-mstd0.5-inc1-mmax10-p0.5`, sections in any order;
    /// defaults m10, n2, p0.5, mstd0, inc0). Where timm would ignore a section (one without a
    /// number) or accept nonsense (p outside [0, 1]) this refuses it. The error names the bad part.
    pub fn parse(config: &str, fill: [u8; 3]) -> Result<RandAugment, String> {
        let mut parts = config.split('-');
        match parts.next() {
            Some("rand") => {}
            Some(p @ ("v0" | "v0r" | "original" | "originalr" | "3a")) => {
                return Err(format!("timm's AutoAugment policy {p:?} is not implemented here; expected {AA_GRAMMAR}"));
            }
            Some(p) if p.starts_with("augmix") => {
                return Err(format!("timm's AugMix ({p:?}) is not implemented here; expected {AA_GRAMMAR}"));
            }
            Some(p) if p.to_ascii_lowercase().contains("trivial") || p.starts_with("ta") => {
                return Err(format!(
                    "{p:?}: timm 1.0 has no TrivialAugment policy (torchvision's TrivialAugmentWide is not one of \
                     timm's --aa values) and it is not implemented here; expected {AA_GRAMMAR}"
                ));
            }
            Some(p) => return Err(format!("{p:?} is not a policy timm's RandAugment knows; expected {AA_GRAMMAR}")),
            None => unreachable!("split yields at least one part"),
        }
        let mut ra = RandAugment {
            ops: RAND_TRANSFORMS.to_vec(),
            magnitude: LEVEL_DENOM,
            num_layers: 2,
            prob: 0.5,
            magnitude_std: 0.0,
            magnitude_max: None,
            fill,
        };
        let mut increasing = false;
        for c in parts {
            if c.starts_with('t') {
                return Err(format!(
                    "section {c:?}: timm's weighted transform sets (tweights, t3a, t3aw) are not implemented here; \
                     expected {AA_GRAMMAR}"
                ));
            }
            // timm splits each section at its first digit: key, then value.
            let Some(at) = c.find(|ch: char| ch.is_ascii_digit()) else {
                return Err(format!("section {c:?} has no number; expected {AA_GRAMMAR}"));
            };
            let (key, val) = c.split_at(at);
            let int = |what: &str| -> Result<u64, String> {
                val.parse::<u64>().map_err(|_| format!("section {c:?}: {what} takes a whole number, got {val:?}"))
            };
            let float = |what: &str| -> Result<f64, String> {
                match val.parse::<f64>() {
                    Ok(v) if v.is_finite() => Ok(v),
                    _ => Err(format!("section {c:?}: {what} takes a number, got {val:?}")),
                }
            };
            match key {
                "m" => ra.magnitude = int("m (the magnitude)")? as f64,
                "n" => {
                    let n = int("n (ops per image)")?;
                    if n > 64 {
                        return Err(format!("section {c:?}: n (ops per image) must be at most 64"));
                    }
                    ra.num_layers = n as usize;
                }
                "p" => {
                    let p = float("p (each op's probability)")?;
                    if !(0.0..=1.0).contains(&p) {
                        return Err(format!("section {c:?}: p (each op's probability) must be in [0, 1], got {p}"));
                    }
                    ra.prob = p;
                }
                "mstd" => {
                    let s = float("mstd (the magnitude's standard deviation)")?;
                    // timm: above 100, uniform sampling in [0, magnitude].
                    ra.magnitude_std = if s > 100.0 { f64::INFINITY } else { s };
                }
                // timm: `magnitude_max or 10`, so mmax0 is 10.
                "mmax" => {
                    ra.magnitude_max = Some(int("mmax (the magnitude's upper bound)")? as f64).filter(|&m| m > 0.0)
                }
                "inc" => match val {
                    "0" => increasing = false,
                    "1" => increasing = true,
                    _ => return Err(format!("section {c:?}: inc takes 0 or 1, got {val:?}")),
                },
                _ => {
                    return Err(format!(
                        "section {c:?}: unknown key {key:?} (expected m, n, p, mstd, mmax or inc); expected {AA_GRAMMAR}"
                    ));
                }
            }
        }
        if increasing {
            ra.ops = RAND_INCREASING_TRANSFORMS.to_vec();
        }
        Ok(ra)
    }

    /// timm's `RandAugment.__call__`: the layers' ops chosen first (with replacement), then each
    /// `AugmentOp.__call__` in turn: the probability draw (when p < 1), the magnitude draw (when
    /// mstd > 0), the sign draw (ops that have one), the op.
    pub fn apply(&self, img: Rgb, draws: &mut impl Draws) -> Rgb {
        let picks: Vec<Op> = (0..self.num_layers).map(|_| self.ops[draws.index(self.ops.len())]).collect();
        let mut img = img;
        for op in picks {
            if self.prob < 1.0 && draws.random() > self.prob {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std > 0.0 {
                m = if self.magnitude_std.is_infinite() {
                    draws.uniform(0.0, m)
                } else {
                    draws.gauss(m, self.magnitude_std)
                };
            }
            let m = m.min(self.magnitude_max.unwrap_or(LEVEL_DENOM)).max(0.0);
            let arg = op.level_arg(m, draws);
            img = op.apply(&img, arg, self.fill);
        }
        img
    }

    /// As timm's repr, for the first lines of a run.
    pub fn describe(&self) -> String {
        let mstd =
            if self.magnitude_std.is_infinite() { "uniform".to_string() } else { self.magnitude_std.to_string() };
        format!(
            "RandAugment(n={}, m={}, mstd={mstd}{}, p={}, {} ops{}, fill {:?})",
            self.num_layers,
            self.magnitude,
            self.magnitude_max.map(|m| format!(", mmax={m}")).unwrap_or_default(),
            self.prob,
            self.ops.len(),
            if self.ops[4] == Op::PosterizeIncreasing { " increasing" } else { "" },
            self.fill
        )
    }
}

/// timm's `img_mean` hparam: `min(255, round(255 · mean))` per channel (Python's round).
pub fn fill_of_mean(mean: [f64; 3]) -> [u8; 3] {
    mean.map(|m| round_half_even(255.0 * m).clamp(0, 255) as u8)
}

// ---------------------------------------------------------------------------------------------
// RandomErasing

/// What erased pixels become (timm's `--remode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EraseMode {
    /// 0 (the normalised mean).
    Const,
    /// One normal value per channel and box.
    Rand,
    /// A normal value per pixel and channel (timm's train.py default).
    #[default]
    Pixel,
}

/// timm's `RandomErasing(probability, mode, max_count)` with its default bounds: each box's area
/// a uniform fraction in [0.02, 1/3] of the image (divided by the box count), its log aspect
/// uniform in [ln 0.3, ln(1/0.3)], up to ten tries to fit.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomErasing {
    pub prob: f64,
    pub mode: EraseMode,
    /// The box count is uniform in 1..=max_count (1: always one).
    pub max_count: usize,
}

impl RandomErasing {
    const MIN_AREA: f64 = 0.02;
    const MAX_AREA: f64 = 1.0 / 3.0;
    const MIN_ASPECT: f64 = 0.3;

    /// The boxes `_erase` picks for an `h`×`w` image, in timm's draw order: the probability
    /// draw, the count (when it can vary), then per box up to ten (area, aspect) tries and, on a
    /// fit, top then left. Boxes may be empty (a side rounded to 0) and may overlap.
    pub fn boxes(&self, h: usize, w: usize, draws: &mut impl Draws) -> Vec<Rect> {
        if draws.random() > self.prob {
            return Vec::new();
        }
        let area = (h * w) as f64;
        let count = if self.max_count <= 1 { 1 } else { draws.randint(1, self.max_count) };
        let (la, lb) = (Self::MIN_ASPECT.ln(), (1.0 / Self::MIN_ASPECT).ln());
        let mut boxes = Vec::new();
        for _ in 0..count {
            for _ in 0..10 {
                let target = draws.uniform(Self::MIN_AREA, Self::MAX_AREA) * area / count as f64;
                let aspect = draws.uniform(la, lb).exp();
                let bh = round_half_even((target * aspect).sqrt());
                let bw = round_half_even((target / aspect).sqrt());
                if (bw as usize) < w && (bh as usize) < h {
                    let (bh, bw) = (bh as usize, bw as usize);
                    let y0 = draws.randint(0, h - bh);
                    let x0 = draws.randint(0, w - bw);
                    boxes.push(Rect { x0, y0, w: bw, h: bh });
                    break;
                }
            }
        }
        boxes
    }

    /// As timm's repr, for the first lines of a run.
    pub fn describe(&self) -> String {
        let mode = match self.mode {
            EraseMode::Const => "const",
            EraseMode::Rand => "rand",
            EraseMode::Pixel => "pixel",
        };
        format!(
            "RandomErasing(p={}, {mode}, 1..={} boxes, area 0.02..1/3, aspect 0.3..1/0.3)",
            self.prob,
            self.max_count.max(1)
        )
    }

    /// Erase boxes of one normalised CHW image (`c`×`h`×`w` floats), in place: the boxes first
    /// ([`Self::boxes`]), then each box's values in turn.
    pub fn apply(&self, img: &mut [f32], [c, h, w]: [usize; 3], draws: &mut impl Draws) {
        for r in self.boxes(h, w, draws) {
            let colour: Vec<f32> = match self.mode {
                EraseMode::Rand => (0..c).map(|_| draws.normal()).collect(),
                _ => vec![0.0; c],
            };
            for ch in 0..c {
                for y in r.y0..r.y0 + r.h {
                    for v in &mut img[(ch * h + y) * w + r.x0..][..r.w] {
                        *v = if self.mode == EraseMode::Pixel { draws.normal() } else { colour[ch] };
                    }
                }
            }
        }
    }
}

/// Check `--reprob` and `--recount`.
pub fn check_erasing(prob: f64, count: usize) -> Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&prob),
        "--reprob must be in [0, 1] (the probability that an image gets random erasing), got {prob}"
    );
    anyhow::ensure!(count >= 1, "--recount must be at least 1 (the most boxes erased per image), got {count}");
    Ok(())
}
