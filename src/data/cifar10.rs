//! CIFAR-10, binary version (`cifar-10-batches-bin/`): `data_batch_1.bin` … `data_batch_5.bin`
//! and `test_batch.bin`, each a run of 3,073-byte records: one label byte, then 3×32×32 pixels
//! as red, green and blue planes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

use super::{Dataset, Splits};

pub const RECORD: usize = 1 + 3 * 32 * 32;
pub const CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
pub const TRAIN_FILES: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
pub const TEST_FILE: &str = "test_batch.bin";

/// `dir/cifar-10-batches-bin` if that exists, else `dir` itself.
pub fn batches_dir(dir: &Path) -> PathBuf {
    let nested = dir.join("cifar-10-batches-bin");
    if nested.is_dir() { nested } else { dir.to_path_buf() }
}

/// True when every CIFAR-10 file is present in `dir` (or its `cifar-10-batches-bin`).
pub fn present(dir: &Path) -> bool {
    let d = batches_dir(dir);
    TRAIN_FILES.iter().chain(std::iter::once(&TEST_FILE)).all(|f| d.join(f).is_file())
}

/// Parse one batch file's bytes into `ds`.
pub fn parse_into(bytes: &[u8], what: &str, ds: &mut Dataset) -> Result<()> {
    ensure!(!bytes.is_empty(), "{what}: empty file; expected 3,073-byte CIFAR-10 records");
    ensure!(
        bytes.len().is_multiple_of(RECORD),
        "{what}: {} bytes is not a whole number of 3,073-byte records ({} records and {} bytes over)",
        bytes.len(),
        bytes.len() / RECORD,
        bytes.len() % RECORD
    );
    for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
        let label = rec[0];
        ensure!(label < 10, "{what}: record {i} has label {label}; CIFAR-10 labels are 0..=9");
        ds.labels.push(u32::from(label));
        ds.images.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

fn load_files(dir: &Path, files: &[&str]) -> Result<Dataset> {
    let mut ds = Dataset {
        shape: [3, 32, 32],
        images: Vec::new(),
        labels: Vec::new(),
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
    };
    for f in files {
        let path = dir.join(f);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("reading CIFAR-10 file {} (missing? try --download)", path.display()))?;
        parse_into(&bytes, &path.display().to_string(), &mut ds)?;
    }
    Ok(ds)
}

pub fn load(dir: &Path) -> Result<Splits> {
    Ok(Splits { name: "cifar10".into(), train: load_files(dir, &TRAIN_FILES)?, test: load_files(dir, &[TEST_FILE])? })
}
