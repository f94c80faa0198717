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
        files: None,
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

/// Where `--download` fetches CIFAR-10 from, and the archive's published MD5.
pub const URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// Download `url` into `dest` with a progress bar (temporary file, renamed when complete).
pub fn fetch(url: &str, dest: &Path) -> Result<()> {
    use std::io::{Read, Write};
    let mut resp = ureq::get(url).call().with_context(|| format!("downloading {url}"))?;
    let total = resp.body().content_length();
    let pb = indicatif::ProgressBar::new(total.unwrap_or(0));
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(format!("downloading {}", url.rsplit('/').next().unwrap_or(url)));
    let tmp = dest.with_extension("part");
    let mut out = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut reader = resp.body_mut().with_config().limit(1 << 31).reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).with_context(|| format!("reading {url}"))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n]).with_context(|| format!("writing {}", tmp.display()))?;
        pb.inc(n as u64);
    }
    out.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    pb.finish_and_clear();
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

/// The MD5 of a file as lowercase hex.
pub fn md5_hex(path: &Path) -> Result<String> {
    use md5::Digest;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = md5::Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Fetch (unless the archive is already there), check the MD5, unpack into `dir`.
pub fn download(dir: &Path, url: &str, md5: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let archive = dir.join("cifar-10-binary.tar.gz");
    if !archive.is_file() {
        fetch(url, &archive)?;
    }
    let got = md5_hex(&archive)?;
    if got != md5 {
        let _ = std::fs::remove_file(&archive);
        anyhow::bail!(
            "{}: MD5 {got}, expected {md5} (a corrupt or different file; removed, run --download again)",
            archive.display()
        );
    }
    let f = std::fs::File::open(&archive).with_context(|| format!("opening {}", archive.display()))?;
    tar::Archive::new(flate2::read::GzDecoder::new(f))
        .unpack(dir)
        .with_context(|| format!("unpacking {} into {}", archive.display(), dir.display()))?;
    ensure!(
        present(dir),
        "{}: the archive did not contain cifar-10-batches-bin/ with all six batch files",
        archive.display()
    );
    Ok(())
}
