//! Datasets: CIFAR-10 binary, MNIST/Fashion-MNIST IDX, image folders, the bundled sample; and
//! the loader that shuffles, augments and batches them.
//!
//! CIFAR-10, IDX and the sample are held as u8 pixels, NCHW per image, and labels; an image
//! folder is an index of files ([`folder::Files`]) decoded and transformed as batches need them.
//! Conversion to f32 (/255 as `transforms.ToTensor()`, optional per-channel normalisation)
//! happens per batch.

pub mod augment;
pub mod cifar10;
pub mod folder;
pub mod idx;
pub mod loader;
pub mod mixup;
pub mod transforms;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail, ensure};

/// Images and labels of one split.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// [c, h, w] of every image (as batches hold them).
    pub shape: [usize; 3],
    /// u8 pixels, image after image, each NCHW (channel planes); empty for an image folder.
    pub images: Vec<u8>,
    pub labels: Vec<u32>,
    pub classes: Vec<String>,
    /// An image folder: the files, decoded as batches need them (None: `images` holds the pixels).
    pub files: Option<folder::Files>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The pixels of in-memory image `i` (not of an image folder's: see [`folder::Files`]).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * self.image_len()..][..self.image_len()]
    }

    /// Keep the first `n` samples (for quick runs).
    pub fn truncate(&mut self, n: usize) {
        if n < self.len() {
            self.labels.truncate(n);
            self.images.truncate(n * self.image_len());
            if let Some(f) = &mut self.files {
                f.paths.truncate(n);
            }
        }
    }

    /// Move `n` samples, chosen by a shuffle seeded with `seed`, into a new dataset (the
    /// validation split); both keep their samples in the original order.
    pub fn hold_out(&mut self, n: usize, seed: u64) -> Dataset {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x7A1D_5EED));
        let mut held = vec![false; self.len()];
        for &i in order.iter().take(n) {
            held[i] = true;
        }
        let len = self.image_len();
        let (mut keep, mut out) = (self.empty_like(), self.empty_like());
        for (i, &h) in held.iter().enumerate() {
            let to = if h { &mut out } else { &mut keep };
            match (&self.files, &mut to.files) {
                (Some(from), Some(f)) => f.paths.push(from.paths[i].clone()),
                _ => to.images.extend_from_slice(self.image(i)),
            }
            to.labels.push(self.labels[i]);
        }
        debug_assert_eq!(keep.images.len(), if keep.files.is_some() { 0 } else { keep.len() * len });
        *self = keep;
        out
    }

    fn empty_like(&self) -> Dataset {
        Dataset {
            shape: self.shape,
            images: Vec::new(),
            labels: Vec::new(),
            classes: self.classes.clone(),
            files: self.files.as_ref().map(|f| folder::Files { paths: Vec::new(), ..f.clone() }),
        }
    }

    /// Check that images and labels agree and every label names a class.
    pub fn validate(&self, what: &str) -> Result<()> {
        ensure!(!self.is_empty(), "{what}: no samples");
        let stored = match &self.files {
            Some(f) => f.paths.len() * self.image_len(),
            None => self.images.len(),
        };
        ensure!(
            stored == self.len() * self.image_len(),
            "{what}: {} pixel bytes for {} images of {:?}",
            self.images.len(),
            self.len(),
            self.shape
        );
        if let Some((i, l)) = self.labels.iter().enumerate().find(|(_, l)| **l as usize >= self.classes.len()) {
            bail!("{what}: sample {i} has label {l}, but there are {} classes", self.classes.len());
        }
        Ok(())
    }
}

/// A train/test pair with its name.
#[derive(Clone, Debug)]
pub struct Splits {
    pub name: String,
    pub train: Dataset,
    pub test: Dataset,
}

/// Which dataset to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Cifar10,
    FashionMnist,
    Mnist,
    Folder,
    Sample,
}

pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The bundled sample (a Fashion-MNIST subset) shipped in `assets/`, where the source tree is.
pub fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets").join("fashion-mnist-sample")
}

/// The bundled sample's four files, compiled into the binary, so that an installed `senet`
/// (`cargo install`) finds it from any folder, with or without the source tree.
static SAMPLE_FILES: [&[u8]; 4] = [
    include_bytes!("../../assets/fashion-mnist-sample/train-images-idx3-ubyte.gz"),
    include_bytes!("../../assets/fashion-mnist-sample/train-labels-idx1-ubyte.gz"),
    include_bytes!("../../assets/fashion-mnist-sample/t10k-images-idx3-ubyte.gz"),
    include_bytes!("../../assets/fashion-mnist-sample/t10k-labels-idx1-ubyte.gz"),
];

/// The bundled sample from the copy inside the binary.
pub fn bundled_sample() -> Result<Splits> {
    let classes: Vec<String> = FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect();
    let file = |k: usize, name: &str| idx::gunzip_if_gz(SAMPLE_FILES[k].to_vec(), &format!("bundled sample {name}"));
    let pair = |k: usize, names: (&str, &str)| -> Result<Dataset> {
        idx::pair_from_bytes(&file(k, names.0)?, &file(k + 1, names.1)?, names, classes.clone())
    };
    Ok(Splits {
        name: "sample (Fashion-MNIST subset)".into(),
        train: pair(0, ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"))?,
        test: pair(2, ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))?,
    })
}

/// Load `kind` from `dir` (or its default location); `folder` says how an image folder is read.
pub fn load(kind: DatasetKind, dir: Option<&Path>, folder: folder::FolderOptions) -> Result<Splits> {
    let named = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match kind {
        DatasetKind::Cifar10 => {
            let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("data"));
            cifar10::load(&cifar10::batches_dir(&dir))
        }
        DatasetKind::FashionMnist => {
            let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(FASHION_MNIST_DIR));
            idx::load_split("fashion-mnist", &dir, named(&FASHION_MNIST_CLASSES))
        }
        DatasetKind::Mnist => {
            let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("data/mnist"));
            idx::load_split("mnist", &dir, named(&MNIST_CLASSES))
        }
        DatasetKind::Sample => {
            let Some(dir) = dir else { return bundled_sample() };
            let mut s = idx::load_split("sample", dir, named(&FASHION_MNIST_CLASSES))?;
            s.name = "sample (Fashion-MNIST subset)".into();
            Ok(s)
        }
        DatasetKind::Folder => {
            let Some(dir) = dir else {
                bail!(
                    "--dataset folder needs --data-dir DIR (with DIR/train/<class>/ and DIR/val/<class>/ or DIR/test/<class>/)"
                )
            };
            folder::load(dir, folder)
        }
    }
}
