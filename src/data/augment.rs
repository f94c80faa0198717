//! timm's RandAugment (`timm.data.auto_augment.rand_augment_transform`), torchvision's
//! TrivialAugmentWide (`torchvision.transforms.TrivialAugmentWide`: timm 1.0.31 has no
//! TrivialAugment) and timm's RandomErasing (`timm.data.random_erasing.RandomErasing`), on the
//! training split of image folders.
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
            Op::Solarize | Op::SolarizeIncreasing => solarize(img, a),
            Op::SolarizeAdd => lut(img, |v| if v < 128 { (f64::from(v) + a).min(255.0) as u8 } else { v }),
            Op::Posterize | Op::PosterizeIncreasing => posterize(img, a as u32),
            Op::Color | Op::ColorIncreasing => enhance(Enhance::Color, img, a),
            Op::Contrast | Op::ContrastIncreasing => enhance(Enhance::Contrast, img, a),
            Op::Brightness | Op::BrightnessIncreasing => enhance(Enhance::Brightness, img, a),
            Op::Sharpness | Op::SharpnessIncreasing => enhance(Enhance::Sharpness, img, a),
            Op::ShearX => affine(img, [1.0, a, 0.0, 0.0, 1.0, 0.0], fill, BILINEAR),
            Op::ShearY => affine(img, [1.0, 0.0, 0.0, a, 1.0, 0.0], fill, BILINEAR),
            Op::TranslateXRel => affine(img, [1.0, 0.0, a * w, 0.0, 1.0, 0.0], fill, BILINEAR),
            Op::TranslateYRel => affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, a * h], fill, BILINEAR),
            Op::Rotate => rotate(img, a, fill, BILINEAR),
        }
    }
}

/// `ImageOps.solarize(img, threshold)`: values at or above the threshold inverted.
fn solarize(img: &Rgb, threshold: f64) -> Rgb {
    lut(img, |v| if f64::from(v) < threshold { v } else { 255 - v })
}

/// `ImageOps.posterize(img, bits)`: each value's low 8 − bits bits cleared.
fn posterize(img: &Rgb, bits: u32) -> Rgb {
    if bits >= 8 {
        return img.clone();
    }
    // Pillow 13 refuses 0 bits (ValueError); earlier Pillows (and this) give black.
    let mask = !((1u32 << (8 - bits)) - 1) as u8;
    lut(img, |v| v & mask)
}

/// Pillow's `ImageEnhance` classes: each blends the image with its own degenerate version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Enhance {
    /// Against the greyscale image (`ImageEnhance.Color`).
    Color,
    /// Against the mean grey level (`ImageEnhance.Contrast`).
    Contrast,
    /// Against black (`ImageEnhance.Brightness`).
    Brightness,
    /// Against the SMOOTH-filtered image (`ImageEnhance.Sharpness`).
    Sharpness,
}

/// `ImageEnhance.<kind>(img).enhance(factor)`: `Image.blend(degenerate, img, factor)`, the
/// factor passed to C as a float.
fn enhance(kind: Enhance, img: &Rgb, factor: f64) -> Rgb {
    let degenerate = match kind {
        Enhance::Color => greyscale(img),
        Enhance::Contrast => {
            let n = (img.width * img.height) as f64;
            let sum: u64 = img.pixels.chunks_exact(3).map(|p| u64::from(luma(p))).sum();
            let mean = (sum as f64 / n + 0.5) as u8;
            Rgb { pixels: vec![mean; img.pixels.len()], ..img.clone() }
        }
        Enhance::Brightness => Rgb { pixels: vec![0; img.pixels.len()], ..img.clone() },
        Enhance::Sharpness => smooth(img),
    };
    blend(&degenerate, img, factor as f32)
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

/// How the geometric ops resample (Pillow's `resample`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    /// `Image.NEAREST` (torchvision's `TrivialAugmentWide` default).
    Nearest,
    /// `Image.BILINEAR` (our timm RandAugment: see the module's first lines).
    Bilinear,
}

const BILINEAR: Interpolation = Interpolation::Bilinear;

/// `img.transform(img.size, Image.AFFINE, a, resample, fillcolor=fill)`: output pixel (x, y)
/// samples the input at (a0·(x+½) + a1·(y+½) + a2, a3·(x+½) + a4·(y+½) + a5); what falls outside
/// the image is `fill`. Bilinear: [`affine_bilinear`]; nearest: [`affine_nearest`].
pub fn affine(img: &Rgb, a: [f64; 6], fill: [u8; 3], interpolation: Interpolation) -> Rgb {
    match interpolation {
        Interpolation::Bilinear => affine_bilinear(img, a, fill),
        Interpolation::Nearest => affine_nearest(img, a, fill),
    }
}

/// Geometry.c's generic transform with `bilinear_filter32RGB`: inside the image, the four
/// nearest pixels (edges clamped) blended in f64 and truncated.
fn affine_bilinear(img: &Rgb, a: [f64; 6], fill: [u8; 3]) -> Rgb {
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

/// Geometry.c's `COORD`: a coordinate's pixel index, −1 for anything left of or above the image.
fn coord(v: f64) -> i64 {
    if v < 0.0 { -1 } else { v as i64 }
}

/// Geometry.c's nearest-neighbour affine transform (`ImagingTransformAffine` with filter 0), with
/// its three engines, each stepping across the image as Pillow does: a pure scale/translation
/// (`a1 = a3 = 0`: `ImagingScaleAffine`, f64 positions stepped by addition), 16.16 fixed point
/// (`affine_fixed`, when the four corners map inside ±32768) and f64 positions otherwise.
fn affine_nearest(img: &Rgb, a: [f64; 6], fill: [u8; 3]) -> Rgb {
    let (w, h) = (img.width, img.height);
    let mut out: Vec<u8> = fill.iter().copied().cycle().take(w * h * 3).collect();
    let mut put = |x: usize, y: usize, xin: i64, yin: i64| {
        if (0..w as i64).contains(&xin) && (0..h as i64).contains(&yin) {
            let (o, i) = ((y * w + x) * 3, (yin as usize * w + xin as usize) * 3);
            out[o..o + 3].copy_from_slice(&img.pixels[i..i + 3]);
        }
    };
    let fixed_ok =
        |x: f64, y: f64| (x * a[0] + y * a[1] + a[2]).abs() < 32768.0 && (x * a[3] + y * a[4] + a[5]).abs() < 32768.0;
    let (fw, fh) = (w as f64, h as f64);
    if a[1] == 0.0 && a[3] == 0.0 {
        let mut xo = a[2] + a[0] * 0.5;
        let xin: Vec<i64> = (0..w)
            .map(|_| {
                let v = coord(xo);
                xo += a[0];
                v
            })
            .collect();
        let mut yo = a[5] + a[4] * 0.5;
        for y in 0..h {
            let yin = coord(yo);
            for (x, &xi) in xin.iter().enumerate() {
                put(x, y, xi, yin);
            }
            yo += a[4];
        }
    } else if fixed_ok(0.0, 0.0) && fixed_ok(fw, fh) && fixed_ok(0.0, fh) && fixed_ok(fw, 0.0) {
        // FIX(v): floor(v·65536 + 0.5) as a C int.
        let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i32;
        let (a0, a1, a3, a4) = (fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4]));
        let (mut a2, mut a5) = (fix(a[2] + a[0] * 0.5 + a[1] * 0.5), fix(a[5] + a[3] * 0.5 + a[4] * 0.5));
        for y in 0..h {
            let (mut xx, mut yy) = (a2, a5);
            for x in 0..w {
                put(x, y, i64::from(xx >> 16), i64::from(yy >> 16));
                xx = xx.wrapping_add(a0);
                yy = yy.wrapping_add(a3);
            }
            a2 = a2.wrapping_add(a1);
            a5 = a5.wrapping_add(a4);
        }
    } else {
        let (mut xo, mut yo) = (a[2] + a[1] * 0.5 + a[0] * 0.5, a[5] + a[4] * 0.5 + a[3] * 0.5);
        for y in 0..h {
            let (mut xx, mut yy) = (xo, yo);
            for x in 0..w {
                put(x, y, coord(xx), coord(yy));
                xx += a[0];
                yy += a[3];
            }
            xo += a[1];
            yo += a[4];
        }
    }
    Rgb { width: w, height: h, pixels: out }
}

/// Python's `round(x, 15)` (correctly rounded through its decimal digits).
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// `img.rotate(degrees, resample, fillcolor=fill)` (Pillow's `Image.rotate` without expand):
/// about the image centre, counter-clockwise, through [`affine`].
pub fn rotate(img: &Rgb, degrees: f64, fill: [u8; 3], interpolation: Interpolation) -> Rgb {
    let angle = degrees.rem_euclid(360.0);
    if angle == 0.0 {
        return img.clone();
    }
    // Pillow transposes at 180° (and 90°, 270° of a square image). timm's range (±30°) and
    // TrivialAugmentWide's (±135°) never reach 180°; at ±90° of a square image the nearest
    // fixed-point walk below gives the transpose's pixels (tests/augment.rs checks it on a square
    // image against Pillow's transpose path).
    let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
    let t = -angle.to_radians();
    let (cos, sin) = (round15(t.cos()), round15(t.sin()));
    let mut m = [cos, sin, 0.0, round15(-t.sin()), cos, 0.0];
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx;
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy;
    affine(img, m, fill, interpolation)
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
pub const AA_GRAMMAR: &str = "trivialaugment (torchvision's TrivialAugmentWide) or timm's RandAugment config \
     rand[-m<int>][-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc<0|1>], e.g. rand-m9-mstd0.5 or rand-m9-n2-mstd0.5-inc1";

/// The first section of a RandAugment config: `rand`, or a refusal that names what the config
/// looks like instead.
fn check_rand_policy(first: &str) -> Result<(), String> {
    match first {
        "rand" => Ok(()),
        p @ ("v0" | "v0r" | "original" | "originalr" | "3a") => {
            Err(format!("timm's AutoAugment policy {p:?} is not implemented here; expected {AA_GRAMMAR}"))
        }
        p if p.starts_with("augmix") => {
            Err(format!("timm's AugMix ({p:?}) is not implemented here; expected {AA_GRAMMAR}"))
        }
        p if p.to_ascii_lowercase().contains("trivial") || p.starts_with("ta") => Err(format!(
            "{p:?}: TrivialAugment is spelt `trivialaugment` (torchvision's TrivialAugmentWide; timm 1.0 has no \
             TrivialAugment policy); expected {AA_GRAMMAR}"
        )),
        p => Err(format!("{p:?} is not a policy timm's RandAugment knows; expected {AA_GRAMMAR}")),
    }
}

impl RandAugment {
    /// Parse timm's config string (`rand-m9-n2-mstd0.5-inc1-mmax10-p0.5`, sections in any order;
    /// defaults m10, n2, p0.5, mstd0, inc0). Where timm would ignore a section (one without a
    /// number) or accept nonsense (p outside [0, 1]) this refuses it. The error names the bad part.
    pub fn parse(config: &str, fill: [u8; 3]) -> Result<RandAugment, String> {
        let mut parts = config.split('-');
        check_rand_policy(parts.next().unwrap_or_default())?;
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
            ra.set_section(c, &mut increasing)?;
        }
        if increasing {
            ra.ops = RAND_INCREASING_TRANSFORMS.to_vec();
        }
        Ok(ra)
    }

    /// One `<key><value>` section of the config (timm splits each at its first digit).
    fn set_section(&mut self, c: &str, increasing: &mut bool) -> Result<(), String> {
        if c.starts_with('t') {
            return Err(format!(
                "section {c:?}: timm's weighted transform sets (tweights, t3a, t3aw) are not implemented here; \
                 expected {AA_GRAMMAR}"
            ));
        }
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
            "m" => self.magnitude = int("m (the magnitude)")? as f64,
            "n" => {
                let n = int("n (ops per image)")?;
                if n > 64 {
                    return Err(format!("section {c:?}: n (ops per image) must be at most 64"));
                }
                self.num_layers = n as usize;
            }
            "p" => {
                let p = float("p (each op's probability)")?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("section {c:?}: p (each op's probability) must be in [0, 1], got {p}"));
                }
                self.prob = p;
            }
            "mstd" => {
                let s = float("mstd (the magnitude's standard deviation)")?;
                // timm: above 100, uniform sampling in [0, magnitude].
                self.magnitude_std = if s > 100.0 { f64::INFINITY } else { s };
            }
            // timm: `magnitude_max or 10`, so mmax0 is 10.
            "mmax" => self.magnitude_max = Some(int("mmax (the magnitude's upper bound)")? as f64).filter(|&m| m > 0.0),
            "inc" => match val {
                "0" => *increasing = false,
                "1" => *increasing = true,
                _ => return Err(format!("section {c:?}: inc takes 0 or 1, got {val:?}")),
            },
            _ => {
                return Err(format!(
                    "section {c:?}: unknown key {key:?} (expected m, n, p, mstd, mmax or inc); expected {AA_GRAMMAR}"
                ));
            }
        }
        Ok(())
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

// ---------------------------------------------------------------------------------------------
// TrivialAugment (torchvision's TrivialAugmentWide; timm 1.0.31 has no TrivialAugment)

/// torchvision's `TrivialAugmentWide` ops (the keys of its `_augmentation_space`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WideOp {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

/// `_augmentation_space`'s ops in its order (the order `torch.randint(14)` indexes).
pub const WIDE_OPS: [WideOp; 14] = [
    WideOp::Identity,
    WideOp::ShearX,
    WideOp::ShearY,
    WideOp::TranslateX,
    WideOp::TranslateY,
    WideOp::Rotate,
    WideOp::Brightness,
    WideOp::Color,
    WideOp::Contrast,
    WideOp::Sharpness,
    WideOp::Posterize,
    WideOp::Solarize,
    WideOp::AutoContrast,
    WideOp::Equalize,
];

/// `TrivialAugmentWide`'s default `num_magnitude_bins`.
pub const WIDE_BINS: usize = 31;

/// `torch.linspace(start, end, steps)[i]` in float32 as torch's CPU kernel computes it: step =
/// (end − start)/(steps − 1), the first half start + step·i, the second end − step·(steps − 1 − i),
/// each with one rounding (torch's build contracts them to fused multiply-adds).
fn torch_linspace(start: f32, end: f32, steps: usize, i: usize) -> f32 {
    let step = (end - start) / (steps - 1) as f32;
    if i < steps / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - 1 - i) as f32, end) }
}

/// torchvision's `_get_inverse_affine_matrix(center, angle, translate, scale, shear)` (degrees),
/// in its order of operations: the matrix `Image.transform` is given.
fn inverse_affine_matrix(center: [f64; 2], angle: f64, translate: [f64; 2], scale: f64, shear: [f64; 2]) -> [f64; 6] {
    let (rot, sx, sy) = (angle.to_radians(), shear[0].to_radians(), shear[1].to_radians());
    let ([cx, cy], [tx, ty]) = (center, translate);
    let a = (rot - sy).cos() / sy.cos();
    let b = -(rot - sy).cos() * sx.tan() / sy.cos() - rot.sin();
    let c = (rot - sy).sin() / sy.cos();
    let d = -(rot - sy).sin() * sx.tan() / sy.cos() + rot.cos();
    let mut m = [d, -b, 0.0, -c, a, 0.0].map(|x| x / scale);
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
    m
}

impl WideOp {
    /// torchvision's name of the op.
    pub fn from_name(name: &str) -> Option<WideOp> {
        WIDE_OPS.iter().copied().find(|op| format!("{op:?}") == name)
    }

    /// Whether the op draws a magnitude bin (its magnitudes are a tensor of `WIDE_BINS`).
    pub fn has_bins(self) -> bool {
        !matches!(self, WideOp::Identity | WideOp::AutoContrast | WideOp::Equalize)
    }

    /// Whether the op draws a sign for its magnitude.
    pub fn signed(self) -> bool {
        self.has_bins() && !matches!(self, WideOp::Posterize | WideOp::Solarize)
    }

    /// The magnitude of bin `bin` (< `WIDE_BINS`), as `float(magnitudes[bin].item())`: shear and
    /// the enhancements linspace(0, 0.99), translation linspace(0, 32) pixels, rotation
    /// linspace(0, 135) degrees, posterize 8 − round(arange(31) / 5) bits, solarize
    /// linspace(255, 0); 0 for the ops without magnitudes.
    pub fn magnitude(self, bin: usize) -> f64 {
        let lin = |start: f32, end: f32| f64::from(torch_linspace(start, end, WIDE_BINS, bin));
        match self {
            WideOp::Identity | WideOp::AutoContrast | WideOp::Equalize => 0.0,
            WideOp::ShearX | WideOp::ShearY => lin(0.0, 0.99),
            WideOp::Brightness | WideOp::Color | WideOp::Contrast | WideOp::Sharpness => lin(0.0, 0.99),
            WideOp::TranslateX | WideOp::TranslateY => lin(0.0, 32.0),
            WideOp::Rotate => lin(0.0, 135.0),
            // (arange(31) / ((31 − 1) / 6)) in float32, rounded half to even.
            WideOp::Posterize => f64::from(8 - (bin as f32 / ((WIDE_BINS - 1) as f32 / 6.0)).round_ties_even() as i32),
            WideOp::Solarize => lin(255.0, 0.0),
        }
    }

    /// torchvision's `_apply_op(img, name, magnitude, interpolation, fill)` on a PIL image, with
    /// the RandAugment ops' Pillow implementations: shear through `F.affine` about the top-left
    /// corner with shear atan(m) in degrees, translation by int(m) pixels, rotation by m degrees,
    /// the enhancements at factor 1 + m, posterize to int(m) bits, solarize at threshold m.
    pub fn apply(self, img: &Rgb, m: f64, fill: [u8; 3], interpolation: Interpolation) -> Rgb {
        let (w, h) = (img.width as f64, img.height as f64);
        let shear = |s: [f64; 2]| inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 0.0], 1.0, s);
        let translate = |t: [f64; 2]| inverse_affine_matrix([w * 0.5, h * 0.5], 0.0, t, 1.0, [0.0, 0.0]);
        match self {
            WideOp::Identity => img.clone(),
            WideOp::ShearX => affine(img, shear([m.atan().to_degrees(), 0.0]), fill, interpolation),
            WideOp::ShearY => affine(img, shear([0.0, m.atan().to_degrees()]), fill, interpolation),
            WideOp::TranslateX => affine(img, translate([m.trunc(), 0.0]), fill, interpolation),
            WideOp::TranslateY => affine(img, translate([0.0, m.trunc()]), fill, interpolation),
            WideOp::Rotate => rotate(img, m, fill, interpolation),
            WideOp::Brightness => enhance(Enhance::Brightness, img, 1.0 + m),
            WideOp::Color => enhance(Enhance::Color, img, 1.0 + m),
            WideOp::Contrast => enhance(Enhance::Contrast, img, 1.0 + m),
            WideOp::Sharpness => enhance(Enhance::Sharpness, img, 1.0 + m),
            WideOp::Posterize => posterize(img, m as u32),
            WideOp::Solarize => solarize(img, m),
            WideOp::AutoContrast => auto_contrast(img),
            WideOp::Equalize => equalize(img),
        }
    }
}

/// torchvision's `TrivialAugmentWide(num_magnitude_bins=31, interpolation, fill)`: one op drawn
/// uniformly, one magnitude bin uniformly, a random sign for the signed ops. `--aa trivialaugment`
/// uses torchvision's defaults, nearest resampling and fill 0.
#[derive(Clone, Debug, PartialEq)]
pub struct TrivialAugmentWide {
    pub interpolation: Interpolation,
    /// What geometric ops uncover (torchvision's `fill=None`: 0).
    pub fill: [u8; 3],
}

impl Default for TrivialAugmentWide {
    fn default() -> TrivialAugmentWide {
        TrivialAugmentWide { interpolation: Interpolation::Nearest, fill: [0; 3] }
    }
}

impl TrivialAugmentWide {
    /// `TrivialAugmentWide.forward`'s draws in its order: the op (`torch.randint(14)`), the
    /// magnitude bin (`torch.randint(31)`) for ops with magnitudes, the sign (`torch.randint(2)`,
    /// 1 negates) for signed ops; then the op.
    pub fn apply(&self, img: Rgb, draws: &mut impl Draws) -> Rgb {
        let op = WIDE_OPS[draws.index(WIDE_OPS.len())];
        let mut m = if op.has_bins() { op.magnitude(draws.index(WIDE_BINS)) } else { 0.0 };
        if op.signed() && draws.index(2) == 1 {
            m = -m;
        }
        if op == WideOp::Identity {
            return img;
        }
        op.apply(&img, m, self.fill, self.interpolation)
    }

    /// As torchvision's repr, for the first lines of a run.
    pub fn describe(&self) -> String {
        format!(
            "TrivialAugmentWide(num_magnitude_bins={WIDE_BINS}, interpolation={:?}, fill {:?}; torchvision's)",
            self.interpolation, self.fill
        )
    }
}

// ---------------------------------------------------------------------------------------------
// --aa

/// What `--aa` names: timm's RandAugment or torchvision's TrivialAugmentWide.
#[derive(Clone, Debug, PartialEq)]
pub enum AutoAugment {
    Rand(RandAugment),
    TrivialWide(TrivialAugmentWide),
}

impl From<RandAugment> for AutoAugment {
    fn from(ra: RandAugment) -> AutoAugment {
        AutoAugment::Rand(ra)
    }
}

impl AutoAugment {
    /// `trivialaugment`, or a RandAugment config ([`RandAugment::parse`]); `fill` is RandAugment's
    /// (TrivialAugmentWide fills with 0, torchvision's default).
    pub fn parse(config: &str, fill: [u8; 3]) -> Result<AutoAugment, String> {
        if config == "trivialaugment" {
            return Ok(AutoAugment::TrivialWide(TrivialAugmentWide::default()));
        }
        RandAugment::parse(config, fill).map(AutoAugment::Rand)
    }

    /// The augmentation applied to one image, drawing from `draws`.
    pub fn apply(&self, img: Rgb, draws: &mut impl Draws) -> Rgb {
        match self {
            AutoAugment::Rand(ra) => ra.apply(img, draws),
            AutoAugment::TrivialWide(ta) => ta.apply(img, draws),
        }
    }

    /// As the augmentation's repr, for the first lines of a run.
    pub fn describe(&self) -> String {
        match self {
            AutoAugment::Rand(ra) => ra.describe(),
            AutoAugment::TrivialWide(ta) => ta.describe(),
        }
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
