//! Image folders: `DIR/train/<class>/*.png|jpg|…` and `DIR/test/<class>/…`. Classes are the
//! training sub-folder names sorted (the test split may lack some, not add any); images are decoded with the `image` crate, converted to the channel
//! count of the first image (grey stays grey, colour becomes RGB) and resized to `hw` (default:
//! the first image's size) when they differ.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use image::imageops::FilterType;

use super::{Dataset, Splits};

const EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif"];

fn classes(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading image folder {}", dir.display()))? {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        if e.path().is_dir() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    ensure!(!names.is_empty(), "{}: no class folders (expected {}/<class>/<images>)", dir.display(), dir.display());
    Ok(names)
}

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e.with_context(|| format!("reading {}", dir.display()))?.path();
        let ext = p.extension().map(|x| x.to_string_lossy().to_lowercase()).unwrap_or_default();
        if p.is_file() && EXTENSIONS.contains(&ext.as_str()) {
            files.push(p);
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "{}: an empty class (no {} files)", dir.display(), EXTENSIONS.join("/"));
    Ok(files)
}

/// Decode one image as `c` channels (1 or 3) of `hw`, NCHW bytes.
pub fn decode(path: &Path, c: usize, hw: [usize; 2]) -> Result<Vec<u8>> {
    let img = image::open(path).with_context(|| format!("{}: not a readable image", path.display()))?;
    let img = if img.width() as usize != hw[1] || img.height() as usize != hw[0] {
        img.resize_exact(hw[1] as u32, hw[0] as u32, FilterType::Triangle)
    } else {
        img
    };
    let (h, w) = (hw[0], hw[1]);
    let mut out = vec![0u8; c * h * w];
    if c == 1 {
        out.copy_from_slice(img.to_luma8().as_raw());
    } else {
        let rgb = img.to_rgb8();
        for (i, px) in rgb.pixels().enumerate() {
            for ch in 0..3 {
                out[ch * h * w + i] = px.0[ch];
            }
        }
    }
    Ok(out)
}

/// Load the class folders `present` of `dir`, labelled by their index in `classes`.
fn load_split(dir: &Path, classes: &[String], present: &[String], c: usize, hw: [usize; 2]) -> Result<Dataset> {
    let mut ds =
        Dataset { shape: [c, hw[0], hw[1]], images: Vec::new(), labels: Vec::new(), classes: classes.to_vec() };
    for (label, class) in classes.iter().enumerate().filter(|(_, c)| present.contains(c)) {
        for f in images_in(&dir.join(class))? {
            ds.images.extend(decode(&f, c, hw)?);
            ds.labels.push(label as u32);
        }
    }
    Ok(ds)
}

pub fn load(dir: &Path, hw: Option<[usize; 2]>) -> Result<Splits> {
    let (train_dir, test_dir) = (dir.join("train"), dir.join("test"));
    let train_classes = classes(&train_dir)?;
    // A test set may lack classes (a small one often does); it may not bring new ones.
    let test_classes = classes(&test_dir)?;
    let unknown: Vec<&String> = test_classes.iter().filter(|c| !train_classes.contains(c)).collect();
    if !unknown.is_empty() {
        bail!("{}: test classes {unknown:?} are not among the training classes {train_classes:?}", test_dir.display());
    }
    // The first training image decides channels (grey or RGB) and, unless given, the size.
    let first = images_in(&train_dir.join(&train_classes[0]))?.remove(0);
    let probe = image::open(&first).with_context(|| format!("{}: not a readable image", first.display()))?;
    let c = if probe.color().has_color() { 3 } else { 1 };
    let hw = hw.unwrap_or([probe.height() as usize, probe.width() as usize]);
    Ok(Splits {
        name: format!("folder {}", dir.display()),
        train: load_split(&train_dir, &train_classes, &train_classes, c, hw)?,
        test: load_split(&test_dir, &train_classes, &test_classes, c, hw)?,
    })
}

/// A class name as a folder name: path separators become `-` ("T-shirt/top" → "T-shirt-top").
pub fn folder_name(class: &str) -> String {
    class.chars().map(|ch| if matches!(ch, '/' | '\\') { '-' } else { ch }).collect()
}

/// Write the first `n_train` / `n_test` images of `src` as PNG files in the layout `load` reads:
/// `out/train/<class>/00000.png`, `out/test/<class>/…` (grey or RGB, as the images are).
pub fn write_subset(src: &Splits, n_train: usize, n_test: usize, out: &Path) -> Result<()> {
    for (ds, n, split) in [(&src.train, n_train, "train"), (&src.test, n_test, "test")] {
        let [c, h, w] = ds.shape;
        ensure!(c == 1 || c == 3, "{}: PNG holds grey or RGB images, these have {c} channels", src.name);
        for i in 0..n.min(ds.len()) {
            let px = ds.image(i);
            // NCHW planes → interleaved pixels.
            let raw: Vec<u8> = (0..h * w).flat_map(|q| (0..c).map(move |ch| px[ch * h * w + q])).collect();
            let color = if c == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
            let class = ds
                .classes
                .get(ds.labels[i] as usize)
                .with_context(|| format!("{}: label {} of image {i} names no class", src.name, ds.labels[i]))?;
            let d = out.join(split).join(folder_name(class));
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            let path = d.join(format!("{i:05}.png"));
            image::save_buffer(&path, &raw, w as u32, h as u32, color)
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
