//! IDX files (MNIST, Fashion-MNIST), raw or gzipped.
//!
//! Format: a big-endian magic `0x0000 TT DD` (TT = 0x08 for unsigned bytes, DD = number of
//! dimensions), then DD big-endian u32 sizes, then the data. Images are 3-D [n, h, w], labels 1-D [n].

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};

use super::{Dataset, Splits};

/// Read a whole file, gunzipping when it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    gunzip_if_gz(raw, &path.display().to_string())
}

/// `raw` itself, or its gzip content when it starts with the gzip magic.
pub fn gunzip_if_gz(raw: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{what}: corrupt or truncated gzip data"))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse IDX bytes with `dims` dimensions of u8 data; returns (sizes, data).
pub fn parse<'a>(bytes: &'a [u8], dims: usize, what: &str) -> Result<(Vec<usize>, &'a [u8])> {
    ensure!(bytes.len() >= 4, "{what}: {} bytes is too short for an IDX header", bytes.len());
    ensure!(
        bytes[0] == 0 && bytes[1] == 0 && bytes[2] == 0x08,
        "{what}: bad magic number {:02x}{:02x}{:02x}{:02x}; expected 000008{dims:02x} (IDX, unsigned bytes)",
        bytes[0],
        bytes[1],
        bytes[2],
        bytes[3]
    );
    ensure!(bytes[3] as usize == dims, "{what}: {} dimensions, expected {dims}", bytes[3]);
    let header = 4 + 4 * dims;
    ensure!(bytes.len() >= header, "{what}: the header needs {header} bytes, the file has {}", bytes.len());
    let sizes: Vec<usize> = (0..dims)
        .map(|d| u32::from_be_bytes([bytes[4 + 4 * d], bytes[5 + 4 * d], bytes[6 + 4 * d], bytes[7 + 4 * d]]) as usize)
        .collect();
    let want = sizes.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).context("IDX sizes overflow")?;
    let data = &bytes[header..];
    ensure!(
        data.len() >= want,
        "{what}: the header promises {sizes:?} = {want} bytes of data, the file has {}",
        data.len()
    );
    Ok((sizes, &data[..want]))
}

/// The file `stem` in `dir`, gzipped or not.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{}: neither {stem} nor {stem}.gz found", dir.display())
}

/// Images and labels from two IDX files.
pub fn load_pair(images: &Path, labels: &Path, classes: Vec<String>) -> Result<Dataset> {
    let ib = read_maybe_gz(images)?;
    let lb = read_maybe_gz(labels)?;
    pair_from_bytes(&ib, &lb, (&images.display().to_string(), &labels.display().to_string()), classes)
}

/// Images and labels from the (ungzipped) bytes of two IDX files named `names` in errors.
pub fn pair_from_bytes(ib: &[u8], lb: &[u8], names: (&str, &str), classes: Vec<String>) -> Result<Dataset> {
    let (isz, idata) = parse(ib, 3, names.0)?;
    let (lsz, ldata) = parse(lb, 1, names.1)?;
    ensure!(isz[0] == lsz[0], "{} holds {} images but {} holds {} labels", names.0, isz[0], names.1, lsz[0]);
    let ds = Dataset {
        shape: [1, isz[1], isz[2]],
        images: idata.to_vec(),
        labels: ldata.iter().map(|&l| u32::from(l)).collect(),
        classes,
        files: None,
    };
    ds.validate(names.1)?;
    Ok(ds)
}

/// The four files of a split, as published (gzipped), with their MD5s (torchvision's).
pub type Files = [(&'static str, &'static str); 4];

/// MNIST, from torchvision's mirror.
pub const MNIST_URL: &str = "https://ossci-datasets.s3.amazonaws.com/mnist";
pub const MNIST_FILES: Files = [
    ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
];
/// Fashion-MNIST, from Zalando's repository.
pub const FASHION_MNIST_URL: &str =
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion";
pub const FASHION_MNIST_FILES: Files = [
    ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
];

/// Whether `dir` holds the four files of a split (gzipped or not).
pub fn present(dir: &Path) -> bool {
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        .iter()
        .all(|stem| find(dir, stem).is_ok())
}

/// `--download`: fetch each of `files` from `base_url` into `dir` (unless there), check its MD5;
/// a file that does not match is removed and named with both checksums.
pub fn download(dir: &Path, base_url: &str, files: &Files) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, md5) in files {
        let path = dir.join(name);
        if !path.is_file() {
            super::cifar10::fetch(&format!("{base_url}/{name}"), &path)?;
        }
        let got = super::cifar10::md5_hex(&path)?;
        if got != *md5 {
            let _ = std::fs::remove_file(&path);
            bail!(
                "{}: MD5 {got}, expected {md5} (a corrupt or different file; removed, run --download again)",
                path.display()
            );
        }
    }
    Ok(())
}

/// The standard four files (`train-images-idx3-ubyte`, …, optionally .gz) from `dir`.
pub fn load_split(name: &str, dir: &Path, classes: Vec<String>) -> Result<Splits> {
    let train =
        load_pair(&find(dir, "train-images-idx3-ubyte")?, &find(dir, "train-labels-idx1-ubyte")?, classes.clone())?;
    let test = load_pair(&find(dir, "t10k-images-idx3-ubyte")?, &find(dir, "t10k-labels-idx1-ubyte")?, classes)?;
    Ok(Splits { name: name.into(), train, test })
}

/// Encode `n` images of `h`×`w` (or labels when `hw` is None) as IDX bytes.
pub fn encode(data: &[u8], n: usize, hw: Option<(usize, usize)>) -> Vec<u8> {
    let mut out = vec![0, 0, 8, if hw.is_some() { 3 } else { 1 }];
    out.extend((n as u32).to_be_bytes());
    if let Some((h, w)) = hw {
        out.extend((h as u32).to_be_bytes());
        out.extend((w as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Write the first `n_train` / `n_test` samples of `src` as gzipped IDX files in `out`
/// (how `assets/fashion-mnist-sample` is made: `senet make-sample`).
pub fn write_subset(src: &Splits, n_train: usize, n_test: usize, out: &Path) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (ds, n, prefix) in [(&src.train, n_train, "train"), (&src.test, n_test, "t10k")] {
        let n = n.min(ds.len());
        let [c, h, w] = ds.shape;
        ensure!(c == 1, "IDX holds one channel; {} has {c}", src.name);
        let labels: Vec<u8> = ds.labels[..n].iter().map(|&l| l as u8).collect();
        for (bytes, stem) in [
            (encode(&ds.images[..n * h * w], n, Some((h, w))), format!("{prefix}-images-idx3-ubyte.gz")),
            (encode(&labels, n, None), format!("{prefix}-labels-idx1-ubyte.gz")),
        ] {
            let path = out.join(stem);
            let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::best());
            gz.write_all(&bytes)
                .and_then(|_| gz.finish().map(|_| ()))
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
