//! Image folders, as torchvision's `ImageFolder` reads them: `DIR/train/<class>/*.jpg|png|…` and
//! `DIR/val/<class>/…` (or `DIR/test/<class>/…`). Classes are the training sub-folders' names,
//! sorted; the evaluation split may lack some, not add any; files are the extensions below,
//! sorted by path within each class.
//!
//! Loading only indexes the files (paths and labels). Images are decoded when a batch needs them,
//! in the loader's worker threads ([`super::loader`]), converted to RGB as PIL's
//! `.convert("RGB")` and transformed as torchvision's `RandomResizedCrop` + flip (training with
//! `--augment`, then timm's RandAugment with `--aa`) or `Resize` + `CenterCrop` (evaluation, and
//! training without augmentation); see [`super::transforms`] and [`super::augment`]. A folder whose decoded images fit `--cache-mb` is held decoded in memory
//! once read (each image decoded once per run); a larger one is read from disk every epoch, so
//! memory does not grow with the dataset.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail, ensure};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::augment::AutoAugment;
use super::transforms::{self, Rgb};
use super::{Dataset, Splits};

/// torchvision's `IMG_EXTENSIONS` (lower case; matched case-insensitively).
pub const EXTENSIONS: [&str; 10] = ["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp", "gif"];

/// Folders with more files than this are never scanned for their decoded size (nor cached): the
/// scan reads every file's header, seconds per ten thousand files on a cold disk.
const CACHE_SCAN_MAX_FILES: usize = 50_000;

/// Decoded images by path, shared by the loader's workers.
pub type Cache = Arc<Mutex<HashMap<PathBuf, Arc<Rgb>>>>;

/// How a folder's images become tensors, and where decoded images are kept.
#[derive(Clone, Debug)]
pub struct Files {
    /// One path per sample (the dataset's labels are beside them).
    pub paths: Vec<PathBuf>,
    /// Output [h, w] of every transform.
    pub size: [usize; 2],
    /// timm's crop_pct: the evaluation transform resizes to `floor(size / crop_pct)` and crops `size`.
    pub crop_pct: f64,
    /// Decoded images held in memory (when the folder fits the budget), by path.
    pub cache: Option<Cache>,
    /// What the whole folder's decoded images take (both splits), when it was measured, and the
    /// budget it was held against.
    pub decoded_bytes: Option<u64>,
    pub cache_budget: u64,
}

impl PartialEq for Files {
    fn eq(&self, other: &Self) -> bool {
        self.paths == other.paths && self.size == other.size && self.crop_pct == other.crop_pct
    }
}

/// An image that could not be read or decoded: the file and why.
#[derive(Clone, Debug, PartialEq)]
pub struct BadImage {
    pub path: PathBuf,
    pub reason: String,
}

impl std::fmt::Display for BadImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: not a readable image ({})", self.path.display(), self.reason)
    }
}

impl std::error::Error for BadImage {}

/// Decode `path` (the format from its content, as PIL) and convert it to RGB.
pub fn decode_rgb(path: &Path) -> Result<Rgb, BadImage> {
    let bad = |e: &dyn std::fmt::Display| BadImage { path: path.to_path_buf(), reason: e.to_string() };
    let img = image::ImageReader::open(path)
        .map_err(|e| bad(&e))?
        .with_guessed_format()
        .map_err(|e| bad(&e))?
        .decode()
        .map_err(|e| bad(&e))?;
    Ok(transforms::to_rgb(img))
}

/// The random stream of sample `index` in `epoch` of a run seeded `seed`: the same whichever
/// worker draws it, and wherever in the epoch a resumed run starts.
pub fn sample_rng(seed: u64, epoch: usize, index: usize) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&(epoch as u64).to_le_bytes());
    s[16..24].copy_from_slice(&(index as u64).to_le_bytes());
    s[24..].copy_from_slice(b"rrc+flip");
    ChaCha8Rng::from_seed(s)
}

impl Files {
    /// How the folder is read and transformed (`augment`: the training transform, followed by
    /// `train_extra`, timm's augmentations when given), for the first lines of a run.
    pub fn describe(&self, augment: bool, train_extra: &str) -> String {
        let mb = |b: u64| b as f64 / (1u64 << 20) as f64;
        let [h, w] = self.size;
        let [rh, rw] = transforms::eval_resize_size(self.size, self.crop_pct);
        let resize = if h == w { format!("Resize({rh})") } else { format!("Resize(({rh}, {rw}))") };
        let held = match (self.decoded_bytes, &self.cache) {
            (Some(b), Some(_)) => {
                format!(
                    "held decoded in memory once read ({:.0} MB, within --cache-mb {:.0})",
                    mb(b),
                    mb(self.cache_budget)
                )
            }
            (Some(b), None) => format!(
                "decoded from disk every epoch ({:.0} MB decoded would exceed --cache-mb {:.0})",
                mb(b),
                mb(self.cache_budget)
            ),
            (None, _) if self.cache_budget == 0 => "decoded from disk every epoch (--cache-mb 0)".into(),
            (None, _) => format!("decoded from disk every epoch (more than {CACHE_SCAN_MAX_FILES} files: never held)"),
        };
        let eval = format!("{resize} + CenterCrop(({h}, {w})) (crop_pct {})", self.crop_pct);
        let train = if augment {
            format!(
                "RandomResizedCrop(({h}, {w}), scale=(0.08, 1), ratio=(3/4, 4/3)) + RandomHorizontalFlip{train_extra}"
            )
        } else {
            "the evaluation transform (no --augment)".to_string()
        };
        format!("images {held}; training {train}, evaluation {eval}")
    }

    /// The decoded RGB image of sample `i` (from the cache when it holds it).
    pub fn image(&self, i: usize) -> Result<Arc<Rgb>, BadImage> {
        let path = &self.paths[i];
        if let Some(img) = self.cache.as_ref().and_then(|c| c.lock().ok()?.get(path).cloned()) {
            return Ok(img);
        }
        let img = Arc::new(decode_rgb(path)?);
        if let Some(mut m) = self.cache.as_ref().and_then(|c| c.lock().ok()) {
            m.insert(path.clone(), img.clone());
        }
        Ok(img)
    }

    /// Sample `i` transformed: the training transform with its random draws from
    /// (`seed`, `epoch`, `i`) when `augment`, else the evaluation transform. RGB, `size`.
    pub fn transformed(&self, i: usize, augment: bool, seed: u64, epoch: usize) -> Result<Rgb, BadImage> {
        if augment {
            return self.train_transformed(i, None, &mut sample_rng(seed, epoch, i));
        }
        let img = self.image(i)?;
        Ok(transforms::eval_transform(&img, self.size, self.crop_pct))
    }

    /// Sample `i` through the training transform, drawing from `rng` (the sample's stream):
    /// `RandomResizedCrop`, the flip, then RandAugment or TrivialAugmentWide when `aa` is given. RGB, `size`.
    pub fn train_transformed(&self, i: usize, aa: Option<&AutoAugment>, rng: &mut ChaCha8Rng) -> Result<Rgb, BadImage> {
        let img = self.image(i)?;
        let out = transforms::train_transform(&img, self.size, rng);
        Ok(match aa {
            Some(ra) => ra.apply(out, rng),
            None => out,
        })
    }
}

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

/// The image files under a class folder (sub-folders too, as ImageFolder walks them), sorted.
fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e.with_context(|| format!("reading {}", d.display()))?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let ext = p.extension().map(|x| x.to_string_lossy().to_lowercase()).unwrap_or_default();
            if p.is_file() && EXTENSIONS.contains(&ext.as_str()) {
                files.push(p);
            }
        }
    }
    files.sort();
    ensure!(!files.is_empty(), "{}: an empty class (no {} files)", dir.display(), EXTENSIONS.join("/"));
    Ok(files)
}

/// Index the class folders `present` of `dir`, labelled by their index in `classes`.
fn index_split(dir: &Path, classes: &[String], present: &[String]) -> Result<(Vec<PathBuf>, Vec<u32>)> {
    let (mut paths, mut labels) = (Vec::new(), Vec::new());
    for (label, class) in classes.iter().enumerate().filter(|(_, c)| present.contains(c)) {
        for f in images_in(&dir.join(class))? {
            paths.push(f);
            labels.push(label as u32);
        }
    }
    Ok((paths, labels))
}

/// How a folder is read: output size, crop_pct and the decoded-image budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FolderOptions {
    /// Output [h, w]; None: the first training image's size.
    pub size: Option<[usize; 2]>,
    pub crop_pct: f64,
    /// Hold decoded images in memory when all of them fit in this many bytes.
    pub cache_bytes: u64,
}

impl Default for FolderOptions {
    fn default() -> Self {
        FolderOptions { size: None, crop_pct: 0.875, cache_bytes: 0 }
    }
}

/// What the folder's decoded images would take, when it was worth asking: (images, bytes).
pub fn decoded_bytes(paths: &[PathBuf]) -> Option<u64> {
    if paths.len() > CACHE_SCAN_MAX_FILES {
        return None;
    }
    let mut total = 0u64;
    for p in paths {
        // An unreadable header is a bad image, named when a batch needs it; it holds nothing.
        let dims = image::ImageReader::open(p).ok().and_then(|r| r.with_guessed_format().ok()?.into_dimensions().ok());
        if let Some((w, h)) = dims {
            total += 3 * u64::from(w) * u64::from(h);
        }
    }
    Some(total)
}

/// Index `dir`: its training split and its evaluation split (`val/`, else `test/`).
pub fn load(dir: &Path, opts: FolderOptions) -> Result<Splits> {
    transforms::check_crop_pct(opts.crop_pct)?;
    let train_dir = dir.join("train");
    let eval_dir = ["val", "test"].map(|s| dir.join(s)).into_iter().find(|d| d.is_dir());
    let Some(eval_dir) = eval_dir else {
        if !train_dir.is_dir() {
            bail!(
                "{}: no class folders (expected {}/train/<class>/<images> and {}/val/<class>/… or test/<class>/…)",
                dir.display(),
                dir.display(),
                dir.display()
            );
        }
        bail!("{}: no evaluation split (expected val/<class>/… or test/<class>/… beside train/)", dir.display())
    };
    let train_classes = classes(&train_dir)?;
    // An evaluation set may lack classes (a small one often does); it may not bring new ones.
    let eval_classes = classes(&eval_dir)?;
    let unknown: Vec<&String> = eval_classes.iter().filter(|c| !train_classes.contains(c)).collect();
    if !unknown.is_empty() {
        bail!("{}: classes {unknown:?} are not among the training classes {train_classes:?}", eval_dir.display());
    }
    let (train_paths, train_labels) = index_split(&train_dir, &train_classes, &train_classes)?;
    let (eval_paths, eval_labels) = index_split(&eval_dir, &train_classes, &eval_classes)?;
    let size = match opts.size {
        Some(s) => s,
        None => {
            let first = &train_paths[0];
            let (w, h) = image::ImageReader::open(first)
                .and_then(|r| r.with_guessed_format())
                .map_err(anyhow::Error::from)
                .and_then(|r| r.into_dimensions().map_err(anyhow::Error::from))
                .with_context(|| format!("{}: not a readable image", first.display()))?;
            [h as usize, w as usize]
        }
    };
    // One cache for both splits, when all their decoded images fit the budget.
    let all: Vec<PathBuf> = train_paths.iter().chain(&eval_paths).cloned().collect();
    let decoded = if opts.cache_bytes > 0 { decoded_bytes(&all) } else { None };
    let fits = decoded.is_some_and(|b| b <= opts.cache_bytes);
    let cache = fits.then(|| Arc::new(Mutex::new(HashMap::new())));
    let split = |paths: Vec<PathBuf>, labels: Vec<u32>| Dataset {
        shape: [3, size[0], size[1]],
        images: Vec::new(),
        labels,
        classes: train_classes.clone(),
        files: Some(Files {
            paths,
            size,
            crop_pct: opts.crop_pct,
            cache: cache.clone(),
            decoded_bytes: decoded,
            cache_budget: opts.cache_bytes,
        }),
    };
    Ok(Splits {
        name: format!("folder {}", dir.display()),
        train: split(train_paths, train_labels),
        test: split(eval_paths, eval_labels),
    })
}

/// Decode one image for `predict`: converted to RGB as PIL does (grey as its luma for a 1-channel
/// model) and resized to `hw` (bilinear, antialiased, the aspect ratio not kept), NCHW bytes.
pub fn decode(path: &Path, c: usize, hw: [usize; 2]) -> Result<Vec<u8>> {
    let rgb = decode_rgb(path).map_err(anyhow::Error::from)?;
    let [h, w] = hw;
    let img = transforms::resized_crop(&rgb, transforms::Rect { x0: 0, y0: 0, w: rgb.width, h: rgb.height }, w, h);
    Ok(planar(&img, c))
}

/// One image file as the evaluation split of a folder is read: Resize(size / crop_pct) and the
/// centre crop (`transforms::eval_transform`), as `c` planar channels.
pub fn decode_center_crop(path: &Path, c: usize, hw: [usize; 2], crop_pct: f64) -> Result<Vec<u8>> {
    transforms::check_crop_pct(crop_pct)?;
    let rgb = decode_rgb(path).map_err(anyhow::Error::from)?;
    Ok(planar(&transforms::eval_transform(&rgb, hw, crop_pct), c))
}

/// An RGB image as `c` planar channels: RGB, or PIL's luma for one channel.
fn planar(img: &transforms::Rgb, c: usize) -> Vec<u8> {
    let (h, w) = (img.height, img.width);
    let mut out = vec![0u8; c * h * w];
    for (i, px) in img.pixels.chunks_exact(3).enumerate() {
        if c == 1 {
            // PIL's "RGB" → "L": ITU-R 601-2 luma in 16-bit fixed point.
            let l = (u32::from(px[0]) * 19595 + u32::from(px[1]) * 38470 + u32::from(px[2]) * 7471 + 0x8000) >> 16;
            out[i] = l as u8;
        } else {
            for ch in 0..3 {
                out[ch * h * w + i] = px[ch];
            }
        }
    }
    out
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
        ensure!(ds.files.is_none(), "{}: write_subset takes in-memory datasets", src.name);
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
