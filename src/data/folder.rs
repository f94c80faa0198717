//! Image folders: `DIR/train/<class>/*.png|jpg|…` and `DIR/test/<class>/…`. Classes are the
//! sub-folder names sorted; images are decoded with the `image` crate, converted to the channel
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

fn load_split(dir: &Path, classes: &[String], c: usize, hw: [usize; 2]) -> Result<Dataset> {
    let mut ds =
        Dataset { shape: [c, hw[0], hw[1]], images: Vec::new(), labels: Vec::new(), classes: classes.to_vec() };
    for (label, class) in classes.iter().enumerate() {
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
    let test_classes = classes(&test_dir)?;
    if train_classes != test_classes {
        bail!("{}: train classes {train_classes:?} differ from test classes {test_classes:?}", dir.display());
    }
    // The first training image decides channels (grey or RGB) and, unless given, the size.
    let first = images_in(&train_dir.join(&train_classes[0]))?.remove(0);
    let probe = image::open(&first).with_context(|| format!("{}: not a readable image", first.display()))?;
    let c = if probe.color().has_color() { 3 } else { 1 };
    let hw = hw.unwrap_or([probe.height() as usize, probe.width() as usize]);
    Ok(Splits {
        name: format!("folder {}", dir.display()),
        train: load_split(&train_dir, &train_classes, c, hw)?,
        test: load_split(&test_dir, &train_classes, c, hw)?,
    })
}
