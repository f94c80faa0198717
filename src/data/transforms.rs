//! torchvision's image transforms on PIL images, reproduced: `.convert("RGB")`, `Resize` (short
//! side, or an exact size), `CenterCrop`, `RandomResizedCrop` and the horizontal flip.
//!
//! The resampling is Pillow's `Image.resize(size, BILINEAR)` (torchvision's default on PIL images,
//! antialiased: the triangle filter widened by the downscaling factor) written from Pillow 13's
//! `libImaging/Resample.c`: the same coefficients (f64, normalised per output pixel, then 22-bit
//! fixed point), two passes with the first one's result rounded to u8, in Pillow 13's order
//! ([`vertical_first`]). On the same decoded pixels the output is bit for bit Pillow 13's (tested
//! against torchvision's own output on committed images, `tests/golden/transforms/`, made by
//! `scripts/transforms_golden.py`); Pillow 12 and earlier always ran the horizontal pass first,
//! which rounds the other cases differently by at most one level.
//! JPEG decoding is the `image` crate's (zune-jpeg), not libjpeg-turbo's: its pixels differ from
//! PIL's by a few levels, so on JPEG inputs only a tolerance holds (stated in the tests).
//!
//! Images are interleaved RGB u8 (`Rgb`), row after row.

use anyhow::{Result, ensure};
use image::DynamicImage;
use rand::Rng;

/// An interleaved RGB u8 image.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    /// height × width × 3 bytes.
    pub pixels: Vec<u8>,
}

/// A decoded image as PIL's `.convert("RGB")` makes it. Grey (and grey + alpha) planes are
/// repeated; alpha is dropped, never composited; palette images arrive expanded by the decoder;
/// 16-bit colour keeps the high byte (PIL reads 16-bit PNGs as "RGB;16B"/"RGBA;16B"/"LA;16B");
/// 16-bit grey is clipped to 255 (PIL reads it as mode "I;16", whose conversion to RGB clips);
/// CMYK JPEGs are converted by the decoder (`c·k/255`, as PIL's `cmyk2rgb` on Adobe's inverted
/// CMYK, within one level).
pub fn to_rgb(img: DynamicImage) -> Rgb {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let grey = |v: &mut dyn Iterator<Item = u8>| -> Vec<u8> { v.flat_map(|g| [g, g, g]).collect() };
    let pixels = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageLuma8(b) => grey(&mut b.into_raw().into_iter()),
        DynamicImage::ImageLumaA8(b) => grey(&mut b.into_raw().into_iter().step_by(2)),
        DynamicImage::ImageRgba8(b) => b.into_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma16(b) => grey(&mut b.into_raw().into_iter().map(|v| v.min(255) as u8)),
        DynamicImage::ImageLumaA16(b) => grey(&mut b.into_raw().into_iter().step_by(2).map(|v| (v >> 8) as u8)),
        DynamicImage::ImageRgb16(b) => b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => {
            b.into_raw().chunks_exact(4).flat_map(|p| [p[0] >> 8, p[1] >> 8, p[2] >> 8]).map(|v| v as u8).collect()
        }
        // f32 images (OpenEXR, HDR; not among the folder's extensions): the crate's conversion.
        other => other.to_rgb8().into_raw(),
    };
    Rgb { width, height, pixels }
}

/// Pillow's fixed-point precision for 8-bit images (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `bilinear_filter`: the triangle of support 1.
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// One output pixel's taps: the first input index and its fixed-point weights.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for `out` pixels from the input range
/// [in0, in1) of an axis `in_size` long.
fn coeffs(in_size: usize, in0: f64, in1: f64, out: usize) -> Taps {
    let scale = (in1 - in0) / out as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0 × filterscale
    let mut taps = Taps { first: Vec::with_capacity(out), weights: Vec::with_capacity(out) };
    for xx in 0..out {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) truncates toward zero; then clamped.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let w: Vec<f64> = (0..n).map(|x| bilinear((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let ww: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&k| {
                let k = if ww != 0.0 { k / ww } else { k };
                let v = k * f64::from(1u32 << PRECISION_BITS);
                (if k < 0.0 { -0.5 + v } else { 0.5 + v }) as i32
            })
            .collect();
        taps.first.push(xmin);
        taps.weights.push(fixed);
    }
    taps
}

/// Pillow's `clip8`: the accumulator shifted back to 8 bits, clamped.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// A rectangle of an image: `w`×`h` pixels from (`x0`, `y0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x0: usize,
    pub y0: usize,
    pub w: usize,
    pub h: usize,
}

/// Pillow 13's order of the two passes (`ImagingResampleInner`): vertical first when the height
/// shrinks by more than twice as many pixels as the width does, else horizontal first (the only
/// order of Pillow 12 and earlier, whose output differs from 13's by one level where they differ).
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let dy = in_h as i64 - out_h as i64;
    dy > 0 && dy > (in_w as i64 - out_w as i64) * 2
}

/// One pass along rows: `src` is `rows` rows of `in_w` RGB pixels (`stride` bytes apart, the
/// first at byte `offset`); each becomes `taps.first.len()` pixels in `dst`.
fn pass_horizontal(src: &[u8], offset: usize, stride: usize, rows: usize, taps: &Taps, dst: &mut [u8]) {
    let out_w = taps.first.len();
    for y in 0..rows {
        let row = &src[offset + y * stride..];
        let d = &mut dst[y * out_w * 3..][..out_w * 3];
        for xx in 0..out_w {
            let (first, k) = (taps.first[xx], &taps.weights[xx]);
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(first + x) * 3..][..3];
                for c in 0..3 {
                    ss[c] += i32::from(p[c]) * kx;
                }
            }
            for c in 0..3 {
                d[xx * 3 + c] = clip8(ss[c]);
            }
        }
    }
}

/// One pass along columns: `src` rows of `width` RGB pixels (`stride` bytes apart, the first at
/// byte `offset`, `row0` rows before the taps' indices start); `taps.first.len()` rows out.
fn pass_vertical(src: &[u8], offset: usize, stride: usize, width: usize, row0: usize, taps: &Taps, dst: &mut [u8]) {
    let out_stride = width * 3;
    for (yy, (first, k)) in taps.first.iter().zip(&taps.weights).enumerate() {
        let d = &mut dst[yy * out_stride..][..out_stride];
        for (i, v) in d.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss += i32::from(src[offset + (first - row0 + y) * stride + i]) * ky;
            }
            *v = clip8(ss);
        }
    }
}

/// `img.crop(rect).resize((out_w, out_h), Image.BILINEAR)` as Pillow 13 computes it.
pub fn resized_crop(img: &Rgb, r: Rect, out_w: usize, out_h: usize) -> Rgb {
    debug_assert!(r.x0 + r.w <= img.width && r.y0 + r.h <= img.height && r.w > 0 && r.h > 0);
    let stride = img.width * 3;
    let need_h = out_w != r.w;
    let need_v = out_h != r.h;
    let origin = r.y0 * stride + r.x0 * 3;
    if need_h && need_v && vertical_first(r.w, r.h, out_w, out_h) {
        let vert = coeffs(r.h, 0.0, r.h as f64, out_h);
        let mut tmp = vec![0u8; out_h * r.w * 3];
        pass_vertical(&img.pixels, origin, stride, r.w, 0, &vert, &mut tmp);
        let horiz = coeffs(r.w, 0.0, r.w as f64, out_w);
        let mut out = vec![0u8; out_h * out_w * 3];
        pass_horizontal(&tmp, 0, r.w * 3, out_h, &horiz, &mut out);
        return Rgb { width: out_w, height: out_h, pixels: out };
    }
    let vert = coeffs(r.h, 0.0, r.h as f64, out_h);
    // Rows of the crop the vertical pass reads (all of them unless it shrinks).
    let (row0, row1) = if need_v {
        let last = out_h - 1;
        (vert.first[0], vert.first[last] + vert.weights[last].len())
    } else {
        (0, r.h)
    };
    // Horizontal pass over those rows: `tmp` is (row1 - row0) × out_w.
    let tmp: Vec<u8> = if need_h {
        let horiz = coeffs(r.w, 0.0, r.w as f64, out_w);
        let mut tmp = vec![0u8; (row1 - row0) * out_w * 3];
        pass_horizontal(&img.pixels, origin + row0 * stride, stride, row1 - row0, &horiz, &mut tmp);
        tmp
    } else {
        (row0..row1).flat_map(|y| img.pixels[(r.y0 + y) * stride + r.x0 * 3..][..r.w * 3].iter().copied()).collect()
    };
    if !need_v {
        return Rgb { width: out_w, height: out_h, pixels: tmp };
    }
    let mut out = vec![0u8; out_h * out_w * 3];
    pass_vertical(&tmp, 0, out_w * 3, out_w, row0, &vert, &mut out);
    Rgb { width: out_w, height: out_h, pixels: out }
}

/// Python's `round` (half to even), as torchvision's crop arithmetic uses it.
pub(crate) fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 { (2.0 * (x / 2.0).round()) as i64 } else { r as i64 }
}

/// The evaluation transform's resize size: `floor(size / crop_pct)` per side, timm's
/// `transforms_factory` (224 at 0.875 → 256).
pub fn eval_resize_size(size: [usize; 2], crop_pct: f64) -> [usize; 2] {
    size.map(|s| (s as f64 / crop_pct).floor() as usize)
}

/// The evaluation transform: `Resize` then `CenterCrop(size)`, as timm builds it for `size` and
/// `crop_pct`. A square size resizes the short side to `floor(size / crop_pct)` (the long side
/// `int(that · long / short)`, torchvision's); a non-square one resizes to exactly
/// `floor(h / crop_pct)` × `floor(w / crop_pct)`. The crop's offsets are torchvision's
/// `int(round((side − crop) / 2))`.
pub fn eval_transform(img: &Rgb, size: [usize; 2], crop_pct: f64) -> Rgb {
    let [sh, sw] = eval_resize_size(size, crop_pct);
    let (w, h) = (img.width, img.height);
    let (rw, rh) = if size[0] == size[1] {
        let short = sh;
        if w <= h { (short, (short * h) / w) } else { ((short * w) / h, short) }
    } else {
        (sw, sh)
    };
    let (rw, rh) = (rw.max(1), rh.max(1));
    let resized = if (rw, rh) == (w, h) { img.clone() } else { resized_crop(img, Rect { x0: 0, y0: 0, w, h }, rw, rh) };
    center_crop(&resized, size)
}

/// torchvision's `CenterCrop(size)`: offsets `int(round((side − crop) / 2))`; where the image is
/// smaller than the crop it is padded with zeros first (torchvision pads symmetrically, the extra
/// pixel on the right/bottom).
pub fn center_crop(img: &Rgb, [ch, cw]: [usize; 2]) -> Rgb {
    let (w, h) = (img.width, img.height);
    // Pad (as torchvision does) when the crop is larger than the image.
    let (pl, pt) = (cw.saturating_sub(w) / 2, ch.saturating_sub(h) / 2);
    let (pw, ph) = (w.max(cw), h.max(ch));
    let top = round_half_even((ph - ch) as f64 / 2.0) as usize;
    let left = round_half_even((pw - cw) as f64 / 2.0) as usize;
    let mut out = vec![0u8; ch * cw * 3];
    for y in 0..ch {
        let sy = (y + top) as i64 - pt as i64;
        if sy < 0 || sy >= h as i64 {
            continue;
        }
        for x in 0..cw {
            let sx = (x + left) as i64 - pl as i64;
            if sx < 0 || sx >= w as i64 {
                continue;
            }
            let s = (sy as usize * w + sx as usize) * 3;
            out[(y * cw + x) * 3..][..3].copy_from_slice(&img.pixels[s..s + 3]);
        }
    }
    Rgb { width: cw, height: ch, pixels: out }
}

/// torchvision's `RandomResizedCrop.get_params(img, scale=(0.08, 1), ratio=(3/4, 4/3))`, with
/// draws from `rng` in its order: up to ten tries of (area fraction, log aspect ratio) and, on a
/// fit, the top then left offsets; else the central fallback crop.
pub fn random_resized_crop_params(width: usize, height: usize, rng: &mut impl Rng) -> Rect {
    const SCALE: (f64, f64) = (0.08, 1.0);
    const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
    let area = (width * height) as f64;
    let (lr0, lr1) = (RATIO.0.ln(), RATIO.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(SCALE.0..SCALE.1);
        let aspect = rng.random_range(lr0..lr1).exp();
        let w = round_half_even((target * aspect).sqrt());
        let h = round_half_even((target / aspect).sqrt());
        if 0 < w && w as usize <= width && 0 < h && h as usize <= height {
            let (w, h) = (w as usize, h as usize);
            let y0 = rng.random_range(0..=height - h);
            let x0 = rng.random_range(0..=width - w);
            return Rect { x0, y0, w, h };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < RATIO.0 {
        (width, round_half_even(width as f64 / RATIO.0) as usize)
    } else if in_ratio > RATIO.1 {
        (round_half_even(height as f64 * RATIO.1) as usize, height)
    } else {
        (width, height)
    };
    Rect { x0: (width - w) / 2, y0: (height - h) / 2, w, h }
}

/// The training transform: `RandomResizedCrop(size)` then `RandomHorizontalFlip()`, drawing from
/// `rng` (crop parameters first, then the flip).
pub fn train_transform(img: &Rgb, [oh, ow]: [usize; 2], rng: &mut impl Rng) -> Rgb {
    let r = random_resized_crop_params(img.width, img.height, rng);
    let mut out = resized_crop(img, r, ow, oh);
    if rng.random_bool(0.5) {
        flip_horizontal(&mut out);
    }
    out
}

pub fn flip_horizontal(img: &mut Rgb) {
    let w = img.width;
    for row in img.pixels.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

/// Check `--crop-pct`.
pub fn check_crop_pct(crop_pct: f64) -> Result<()> {
    ensure!(
        crop_pct > 0.0 && crop_pct <= 1.0,
        "--crop-pct must be in (0, 1] (the centre crop's share of the resized image, timm's crop_pct), got {crop_pct}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_round_is_half_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, 2.4, 2.6].map(round_half_even), [0, 2, 2, 0, 2, 3]);
    }

    #[test]
    fn identity_resize_keeps_pixels() {
        let img = Rgb { width: 5, height: 3, pixels: (0..45).map(|v| v as u8 * 5).collect() };
        let r = resized_crop(&img, Rect { x0: 0, y0: 0, w: 5, h: 3 }, 5, 3);
        assert_eq!(r, img);
    }

    #[test]
    fn eval_sizes_follow_timm() {
        assert_eq!(eval_resize_size([224, 224], 0.875), [256, 256]);
        assert_eq!(eval_resize_size([112, 112], 0.875), [128, 128]);
    }
}
