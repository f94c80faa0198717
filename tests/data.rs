//! Dataset parsers on files the tests write, and the loader's batching rules.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use senet_wgpu::data::folder::FolderOptions;
use senet_wgpu::data::loader::{self, Preprocess};
use senet_wgpu::data::{self, DatasetKind, cifar10, idx};

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Write the four IDX files of `n_train`/`n_test` h×w images, gzipped or raw.
fn write_idx(dir: &Path, n_train: usize, n_test: usize, h: usize, w: usize, gzip: bool) {
    for (prefix, n) in [("train", n_train), ("t10k", n_test)] {
        let images: Vec<u8> = (0..n * h * w).map(|i| (i * 7 % 256) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        for (bytes, stem) in [
            (idx::encode(&images, n, Some((h, w))), format!("{prefix}-images-idx3-ubyte")),
            (idx::encode(&labels, n, None), format!("{prefix}-labels-idx1-ubyte")),
        ] {
            if gzip {
                std::fs::write(dir.join(format!("{stem}.gz")), gz(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(stem), bytes).unwrap();
            }
        }
    }
}

#[test]
fn idx_raw_and_gzip_load_the_same() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_idx(a.path(), 12, 5, 4, 3, false);
    write_idx(b.path(), 12, 5, 4, 3, true);
    let ra = data::load(DatasetKind::Mnist, Some(a.path()), FolderOptions::default()).unwrap();
    let rb = data::load(DatasetKind::Mnist, Some(b.path()), FolderOptions::default()).unwrap();
    assert_eq!(ra.train, rb.train);
    assert_eq!(ra.train.shape, [1, 4, 3]);
    assert_eq!(ra.train.len(), 12);
    assert_eq!(ra.test.len(), 5);
    assert_eq!(ra.train.labels[11], 1);
    assert_eq!(ra.train.image(1)[0], 12 * 7, "image 1 starts at byte 12 of the ramp i*7");
}

#[test]
fn idx_errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x-images");
    let check = |bytes: &[u8], dims: usize, expect: &str| {
        let err = idx::parse(bytes, dims, "x-images").unwrap_err().to_string();
        assert!(err.contains("x-images") && err.contains(expect), "{err}");
    };
    check(&[0, 0, 9, 3, 0, 0, 0, 1], 3, "bad magic");
    check(&[0, 0, 8, 2, 0, 0, 0, 1, 0, 0, 0, 1], 3, "2 dimensions, expected 3");
    let mut promise = idx::encode(&[1, 2, 3], 1, Some((2, 2)));
    check(&promise, 3, "promises");
    promise.truncate(6);
    check(&promise, 3, "header needs");
    // Counts that disagree, and corrupt gzip.
    write_idx(dir.path(), 4, 2, 2, 2, false);
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), idx::encode(&[1, 2, 3], 3, None)).unwrap();
    let err = format!("{:#}", data::load(DatasetKind::Mnist, Some(dir.path()), FolderOptions::default()).unwrap_err());
    assert!(err.contains("4 images") && err.contains("3 labels"), "{err}");
    std::fs::write(&p, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
    let err = format!("{:#}", idx::read_maybe_gz(&p).unwrap_err());
    assert!(err.contains("corrupt or truncated gzip"), "{err}");
}

fn cifar_records(n: usize, label: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(label(i));
        out.extend((0..3072).map(|p| ((p + i) % 251) as u8));
    }
    out
}

#[test]
fn cifar10_binary_batches_load() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&bin).unwrap();
    for f in cifar10::TRAIN_FILES {
        std::fs::write(bin.join(f), cifar_records(3, |i| i as u8)).unwrap();
    }
    std::fs::write(bin.join(cifar10::TEST_FILE), cifar_records(2, |_| 9)).unwrap();
    assert!(cifar10::present(dir.path()));
    let s = data::load(DatasetKind::Cifar10, Some(dir.path()), FolderOptions::default()).unwrap();
    assert_eq!(s.train.len(), 15);
    assert_eq!(s.test.len(), 2);
    assert_eq!(s.train.shape, [3, 32, 32]);
    assert_eq!(s.train.labels[..4], [0, 1, 2, 0]);
    assert_eq!(s.test.labels, [9, 9]);
    // Red plane first: pixel p of record i is (p + i) % 251.
    assert_eq!(s.train.image(1)[1024], ((1024 + 1) % 251) as u8);
    assert_eq!(s.train.classes[0], "airplane");
}

#[test]
fn cifar10_errors_name_the_file_and_the_problem() {
    let mut ds = data::Dataset { shape: [3, 32, 32], images: vec![], labels: vec![], classes: vec![], files: None };
    let err = cifar10::parse_into(&[], "data_batch_1.bin", &mut ds).unwrap_err().to_string();
    assert!(err.contains("data_batch_1.bin") && err.contains("empty"), "{err}");
    let err =
        cifar10::parse_into(&cifar_records(2, |_| 1)[..5000], "data_batch_2.bin", &mut ds).unwrap_err().to_string();
    assert!(err.contains("data_batch_2.bin") && err.contains("3,073-byte records"), "{err}");
    let err =
        cifar10::parse_into(&cifar_records(2, |i| 9 + i as u8), "test_batch.bin", &mut ds).unwrap_err().to_string();
    assert!(err.contains("record 1 has label 10"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err =
        format!("{:#}", data::load(DatasetKind::Cifar10, Some(dir.path()), FolderOptions::default()).unwrap_err());
    assert!(err.contains("data_batch_1.bin") && err.contains("--download"), "{err}");
}

fn png(path: &Path, w: u32, h: u32, rgb: bool, v: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    if rgb {
        image::RgbImage::from_fn(w, h, |x, _| image::Rgb([v, x as u8, 255 - v])).save(path).unwrap();
    } else {
        image::GrayImage::from_fn(w, h, |_, _| image::Luma([v])).save(path).unwrap();
    }
}

/// An image folder's sample `i` as the evaluation transform makes it: u8 planes (R, G, B).
fn folder_image(ds: &data::Dataset, i: usize) -> Vec<u8> {
    let img = ds.files.as_ref().unwrap().transformed(i, false, 0, 0).unwrap();
    (0..3).flat_map(|c| img.pixels.iter().skip(c).step_by(3).copied().collect::<Vec<_>>()).collect()
}

/// At crop_pct 1 and the images' own size, the evaluation transform changes nothing.
fn exact() -> FolderOptions {
    FolderOptions { crop_pct: 1.0, ..FolderOptions::default() }
}

#[test]
fn image_folders_load_sorted_classes_and_resize() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(&d.join("train/zebra/a.png"), 6, 4, true, 10);
    png(&d.join("train/ant/b.png"), 6, 4, true, 20);
    png(&d.join("train/ant/c.png"), 12, 8, true, 30); // resized to 6x4
    png(&d.join("test/ant/d.png"), 6, 4, true, 40);
    png(&d.join("test/zebra/e.png"), 6, 4, false, 50); // grey, converted to RGB
    std::fs::write(d.join("train/ant/notes.txt"), "not an image, not listed").unwrap();
    let s = data::load(DatasetKind::Folder, Some(d), exact()).unwrap();
    assert_eq!(s.train.classes, ["ant", "zebra"]);
    assert_eq!(s.train.shape, [3, 4, 6]);
    assert_eq!(s.train.labels, [0, 0, 1]);
    assert_eq!(s.test.labels, [0, 1]);
    // Plane layout: red plane of the first ant image is 20 everywhere.
    assert!(folder_image(&s.train, 0)[..24].iter().all(|&v| v == 20));
    assert!(folder_image(&s.test, 1).iter().all(|&v| v == 50), "grey becomes equal RGB planes");
    assert_eq!(folder_image(&s.train, 1).len(), 3 * 4 * 6, "12x8 resized to 6x4");
    let s = data::load(DatasetKind::Folder, Some(d), FolderOptions { size: Some([8, 8]), ..exact() }).unwrap();
    assert_eq!(s.train.shape, [3, 8, 8]);
    // val/ is the evaluation split where it exists, beside test/.
    png(&d.join("val/zebra/f.png"), 6, 4, true, 60);
    let s = data::load(DatasetKind::Folder, Some(d), exact()).unwrap();
    assert_eq!(s.test.labels, [1]);
}

#[test]
fn image_folder_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(&d.join("train/a/1.png"), 4, 4, false, 1);
    png(&d.join("test/b/1.png"), 4, 4, false, 1);
    let err = format!("{:#}", data::load(DatasetKind::Folder, Some(d), FolderOptions::default()).unwrap_err());
    assert!(err.contains("not among the training classes") && err.contains("test"), "{err}");
    std::fs::create_dir_all(d.join("test/a")).unwrap();
    std::fs::remove_dir_all(d.join("test/b")).unwrap();
    let err = format!("{:#}", data::load(DatasetKind::Folder, Some(d), FolderOptions::default()).unwrap_err());
    assert!(err.contains("empty class"), "{err}");
    // A broken file is named when a batch needs it (indexing reads no image).
    std::fs::write(d.join("test/a/broken.png"), b"not a png").unwrap();
    let s = data::load(DatasetKind::Folder, Some(d), FolderOptions::default()).unwrap();
    let err = format!("{}", s.test.files.as_ref().unwrap().transformed(0, false, 0, 0).unwrap_err());
    assert!(err.contains("broken.png") && err.contains("not a readable image"), "{err}");
    let err = format!("{:#}", data::load(DatasetKind::Folder, None, FolderOptions::default()).unwrap_err());
    assert!(err.contains("--data-dir"), "{err}");
}

#[test]
fn png_folders_written_by_make_sample_load_back_pixel_exact() {
    let src = data::load(DatasetKind::Sample, None, FolderOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    data::folder::write_subset(&src, 30, 12, dir.path()).unwrap();
    // "T-shirt/top" cannot be a folder name: its slash becomes a dash.
    assert!(dir.path().join("train/T-shirt-top").is_dir());
    let back = data::load(DatasetKind::Folder, Some(dir.path()), exact()).unwrap();
    assert_eq!(back.train.len(), 30);
    assert_eq!(back.test.len(), 12);
    assert_eq!(back.train.shape, [3, 28, 28], "grey PNGs become RGB, as ImageFolder's loader makes them");
    // The folder loader orders by class name then file name; every image comes back with its
    // class, pixel for pixel (PNG is lossless), in each of the three planes.
    let mut want: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            (data::folder::folder_name(&src.train.classes[src.train.labels[i] as usize]), src.train.image(i).repeat(3))
        })
        .collect();
    let mut got: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| (back.train.classes[back.train.labels[i] as usize].clone(), folder_image(&back.train, i)))
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    let big =
        data::load(DatasetKind::Folder, Some(dir.path()), FolderOptions { size: Some([64, 48]), ..exact() }).unwrap();
    assert_eq!(big.test.shape, [3, 64, 48]);
}

#[test]
fn the_bundled_sample_loads() {
    let s = data::load(DatasetKind::Sample, None, FolderOptions::default()).unwrap();
    assert_eq!(s.train.len(), 4000);
    assert_eq!(s.test.len(), 1000);
    assert_eq!(s.train.shape, [1, 28, 28]);
    assert_eq!(s.train.classes.len(), 10);
    // Real images: every class is present and the pixels are not constant.
    for c in 0..10 {
        assert!(s.train.labels.contains(&c), "class {c} missing from the sample");
    }
    assert!(s.train.image(0).iter().any(|&v| v != s.train.image(0)[0]));
}

#[test]
fn loader_shuffles_by_seed_and_keeps_the_last_partial_batch() {
    let ds = Arc::new(data::Dataset {
        shape: [1, 2, 2],
        images: (0..10 * 4).map(|i| i as u8).collect(),
        labels: (0..10).collect(),
        classes: (0..10).map(|i| i.to_string()).collect(),
        files: None,
    });
    let a = loader::epoch_order(10, true, 3, 1);
    assert_eq!(a, loader::epoch_order(10, true, 3, 1), "same seed and epoch, same order");
    assert_ne!(a, loader::epoch_order(10, true, 3, 2), "a new order each epoch");
    assert_eq!(loader::epoch_order(10, false, 3, 1), (0..10).collect::<Vec<_>>());
    let batches: Vec<_> =
        loader::epoch_batches(ds.clone(), 4, Preprocess::default(), true, 3, 1).map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.labels.len()).collect::<Vec<_>>(), [4, 4, 2]);
    let mut seen: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..10).collect::<Vec<_>>(), "every sample once per epoch");
    // ToTensor: /255, image k holds 4k..4k+3.
    let b = &loader::epoch_batches(ds.clone(), 10, Preprocess::default(), false, 0, 0).next().unwrap().unwrap();
    assert_eq!(b.images[4 * 3 + 1], 13.0 / 255.0);
    let pre = Preprocess { normalize: Some(vec![(0.5, 0.25)]), ..Preprocess::default() };
    let b = &loader::epoch_batches(ds.clone(), 10, pre, false, 0, 0).next().unwrap().unwrap();
    assert!((b.images[4 * 3 + 1] - (13.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
    let stats = loader::channel_stats(&ds);
    assert!((stats[0].0 - 19.5 / 255.0).abs() < 1e-6, "{stats:?}");
}

/// A loader thread that panics (here on a dataset whose pixels are cut short, so making batch 2
/// indexes past them) ends the batches with an error naming the failure, a runtime failure
/// (exit code 1), after the batches it did make — never a silently short epoch.
#[test]
fn a_failing_loader_thread_ends_the_epoch_with_its_error() {
    let ds = Arc::new(data::Dataset {
        shape: [1, 2, 2],
        images: vec![7; 4 * 5], // 5 images of the 10 the labels promise
        labels: (0..10).collect(),
        classes: (0..10).map(|i| i.to_string()).collect(),
        files: None,
    });
    let items: Vec<_> = loader::epoch_batches(ds, 2, Preprocess::default(), false, 0, 0).collect();
    assert_eq!(items.len(), 3, "two good batches, then the error, then the end");
    assert!(items[..2].iter().all(|b| b.is_ok()));
    let e = items[2].as_ref().expect_err("the third item is the loader's error");
    assert!(e.to_string().contains("the data loader failed") && e.to_string().contains("range"), "{e:#}");
    assert!(e.chain().any(|c| c.is::<senet_wgpu::exit::RuntimeFailure>()), "a runtime failure: exit 1");
}

/// `--val-split`: the held-out samples are chosen by the seed, the same for the same seed, and
/// leave the training set without them; both keep the original order.
#[test]
fn a_validation_split_is_seeded_and_disjoint() {
    let ds = data::Dataset {
        shape: [1, 1, 2],
        images: (0..40).map(|i| i as u8).collect(),
        labels: (0..20).collect(),
        classes: (0..20).map(|i| i.to_string()).collect(),
        files: None,
    };
    let split = |seed| {
        let mut train = ds.clone();
        let val = train.hold_out(5, seed);
        (train, val)
    };
    let (train, val) = split(7);
    assert_eq!((train.len(), val.len()), (15, 5));
    train.validate("train").unwrap();
    val.validate("val").unwrap();
    let mut all: Vec<u32> = train.labels.iter().chain(&val.labels).copied().collect();
    all.sort();
    assert_eq!(all, (0..20).collect::<Vec<_>>(), "every sample in exactly one split");
    assert!(val.labels.windows(2).all(|w| w[0] < w[1]) && train.labels.windows(2).all(|w| w[0] < w[1]));
    for (k, &l) in val.labels.iter().enumerate() {
        assert_eq!(val.image(k), [2 * l as u8, 2 * l as u8 + 1], "image {k} moved with its label");
    }
    assert_eq!(split(7).1, val, "the same seed holds out the same samples");
    assert_ne!(split(8).1.labels, val.labels, "another seed, other samples");
    assert_ne!(val.labels, (15..20).collect::<Vec<_>>(), "not simply the last samples");
    assert_eq!(senet_wgpu::args::val_count(0.1, 1000).unwrap(), 100);
    assert_eq!(senet_wgpu::args::val_count(0.001, 10).unwrap(), 1, "a fraction holds out at least one");
    assert_eq!(senet_wgpu::args::val_count(300.0, 1000).unwrap(), 300);
    assert!(senet_wgpu::args::val_count(10.0, 10).is_err(), "nothing left to train on");
}

#[test]
fn augmentation_crops_and_flips_within_the_padded_image() {
    let ds = data::Dataset {
        shape: [1, 8, 8],
        images: vec![255; 64],
        labels: vec![0],
        classes: vec!["x".into()],
        files: None,
    };
    let pre = Preprocess { augment: true, ..Preprocess::default() };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let mut shifted = 0;
    for _ in 0..50 {
        let b = loader::make_batch(&ds, &[0], &pre, &mut rng);
        assert_eq!(b.images.len(), 64);
        assert!(b.images.iter().all(|&v| v == 0.0 || v == 1.0), "pixels are the image's or the zero padding");
        shifted += usize::from(b.images.contains(&0.0));
    }
    assert!(shifted > 25, "random crops should usually reveal padding ({shifted}/50)");
}

/// On an image with every pixel different (a flip or shift is visible), each augmented copy is
/// the image or its mirror, shifted by at most the crop padding, zeros where it left the frame;
/// over 200 draws both mirrors and every shift in each direction occur.
#[test]
fn augmentation_is_a_padded_crop_of_the_image_or_its_mirror() {
    let (h, w) = (6usize, 7usize);
    let images: Vec<u8> = (0..h * w).map(|i| (i + 1) as u8).collect();
    let ds = data::Dataset {
        shape: [1, h, w],
        images: images.clone(),
        labels: vec![0],
        classes: vec!["x".into()],
        files: None,
    };
    let pre = Preprocess { augment: true, ..Preprocess::default() };
    let pad = senet_wgpu::hparams::CROP_PADDING as i64;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let got = loader::make_batch(&ds, &[0], &pre, &mut rng).images;
        // The (flip, dy, dx) that explain this copy: out[y][x] = src[y + dy][x' + dx] or 0.
        let explains = |flip: bool, dy: i64, dx: i64| {
            (0..h as i64).all(|y| {
                (0..w as i64).all(|x| {
                    let (sy, sx) = (y + dy, x + dx);
                    let want = if sy < 0 || sx < 0 || sy >= h as i64 || sx >= w as i64 {
                        0.0
                    } else {
                        let sx = if flip { w as i64 - 1 - sx } else { sx };
                        f32::from(images[(sy * w as i64 + sx) as usize]) / 255.0
                    };
                    got[(y * w as i64 + x) as usize] == want
                })
            })
        };
        let found: Vec<(bool, i64, i64)> = [false, true]
            .into_iter()
            .flat_map(|f| (-pad..=pad).flat_map(move |dy| (-pad..=pad).map(move |dx| (f, dy, dx))))
            .filter(|&(f, dy, dx)| explains(f, dy, dx))
            .collect();
        assert!(!found.is_empty(), "an augmented copy is no padded crop of the image or its mirror: {got:?}");
        seen.extend(found);
    }
    assert!(seen.iter().any(|s| s.0) && seen.iter().any(|s| !s.0), "both the image and its mirror occur");
    for d in [-pad, pad] {
        assert!(seen.iter().any(|s| s.1 == d) && seen.iter().any(|s| s.2 == d), "a shift of {d} occurs: {seen:?}");
    }
}

/// `--download`'s code path against a server on the loopback: fetch, MD5 check, unpack.
#[test]
fn cifar10_download_checks_md5_and_unpacks() {
    use std::io::{Read, Write};
    // A tar.gz shaped like the real archive, with tiny batch files.
    let mut tar_bytes = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar_bytes);
        for f in cifar10::TRAIN_FILES.iter().chain([&cifar10::TEST_FILE]) {
            let data = cifar_records(2, |i| i as u8);
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, format!("cifar-10-batches-bin/{f}"), &data[..]).unwrap();
        }
        b.finish().unwrap();
    }
    let archive = gz(&tar_bytes);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/cifar-10-binary.tar.gz", listener.local_addr().unwrap());
    let body = archive.clone();
    let server = std::thread::spawn(move || {
        // Serve exactly two requests, then stop.
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
            s.write_all(&body).unwrap();
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", cifar10::download(dir.path(), &url, "00000000000000000000000000000000").unwrap_err());
    assert!(err.contains("MD5") && err.contains("expected 00000000"), "{err}");
    assert!(!dir.path().join("cifar-10-binary.tar.gz").exists(), "a bad download is removed");
    let md5 = {
        let p = dir.path().join("reference.bin");
        std::fs::write(&p, &archive).unwrap();
        cifar10::md5_hex(&p).unwrap()
    };
    cifar10::download(dir.path(), &url, &md5).unwrap();
    server.join().unwrap();
    let s = data::load(DatasetKind::Cifar10, Some(dir.path()), FolderOptions::default()).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (10, 2));
}

#[test]
fn md5_of_a_known_string() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("abc");
    std::fs::write(&p, b"abc").unwrap();
    assert_eq!(cifar10::md5_hex(&p).unwrap(), "900150983cd24fb0d6963f7d28e17f72");
}

/// The sample inside the binary (what an installed `senet` uses, from any folder) is the one in
/// assets/, image for image and label for label, train and test the right way round.
#[test]
fn the_bundled_sample_is_compiled_in_and_equals_the_assets() {
    let inside = data::load(DatasetKind::Sample, None, FolderOptions::default()).unwrap();
    let on_disk = data::load(DatasetKind::Sample, Some(&data::sample_dir()), FolderOptions::default()).unwrap();
    assert_eq!((inside.train.len(), inside.test.len()), (4000, 1000));
    assert!(inside.train == on_disk.train && inside.test == on_disk.test);
    assert_eq!(inside.name, on_disk.name);
}

/// `--download` for MNIST and Fashion-MNIST against a loopback server: each of the four files is
/// fetched and its MD5 checked; a file with the wrong checksum is removed and named.
#[test]
fn idx_download_fetches_and_checks_each_file() {
    use std::io::{Read, Write};
    let (n_train, n_test) = (3, 2);
    let bodies: Vec<(String, Vec<u8>)> = [
        ("train-images-idx3-ubyte.gz", idx::encode(&vec![7u8; n_train * 28 * 28], n_train, Some((28, 28)))),
        ("train-labels-idx1-ubyte.gz", idx::encode(&[1, 2, 3], n_train, None)),
        ("t10k-images-idx3-ubyte.gz", idx::encode(&vec![9u8; n_test * 28 * 28], n_test, Some((28, 28)))),
        ("t10k-labels-idx1-ubyte.gz", idx::encode(&[4, 5], n_test, None)),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_string(), gz(&b)))
    .collect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/data", listener.local_addr().unwrap());
    let served = bodies.clone();
    let server = std::thread::spawn(move || {
        // The first try fetches one file (its MD5 is wrong, so it stops), the second all four.
        for _ in 0..5 {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 1024];
            let n = s.read(&mut req).unwrap();
            let line = String::from_utf8_lossy(&req[..n]).lines().next().unwrap_or("").to_string();
            let body = &served.iter().find(|(name, _)| line.contains(name.as_str())).unwrap().1;
            write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).unwrap();
            s.write_all(body).unwrap();
        }
    });
    let md5 = |b: &[u8]| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), b).unwrap();
        cifar10::md5_hex(f.path()).unwrap()
    };
    let sums: Vec<String> = bodies.iter().map(|(_, b)| md5(b)).collect();
    let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    let files = |first: &str| -> idx::Files {
        std::array::from_fn(|k| (leak(&bodies[k].0), if k == 0 { leak(first) } else { leak(&sums[k]) }))
    };
    let dir = tempfile::tempdir().unwrap();
    let err =
        format!("{:#}", idx::download(dir.path(), &base, &files("0123456789abcdef0123456789abcdef")).unwrap_err());
    assert!(err.contains("train-images-idx3-ubyte.gz: MD5") && err.contains("expected 0123456789abcdef"), "{err}");
    assert!(!dir.path().join("train-images-idx3-ubyte.gz").exists(), "a bad download is removed");
    assert!(!idx::present(dir.path()));
    idx::download(dir.path(), &base, &files(&sums[0])).unwrap();
    server.join().unwrap();
    assert!(idx::present(dir.path()));
    let s = data::load(DatasetKind::Mnist, Some(dir.path()), FolderOptions::default()).unwrap();
    assert_eq!((s.train.len(), s.test.len(), s.test.labels.clone()), (3, 2, vec![4, 5]));
}

/// Mixup/CutMix (`data::mixup`) against timm: `mixup_target`'s soft targets (λ 0.3, smoothing
/// 0.1, an odd batch whose middle sample pairs with itself) and `cutmix_bbox_and_lam`'s box and
/// corrected λ for fixed centres (boxes clipped at every edge, λ 0 the whole-height box), the
/// values printed by scripts/mixup_golden.py (timm 1.0.31): targets to f32 rounding (1e-7), boxes
/// exactly, λ to 1e-15. Then the images: Mixup is x·λ + flip(x)·(1 − λ), CutMix pastes the box
/// from the batch's mirror image and leaves the rest; and the draws are a function of (seed,
/// epoch, step) alone.
#[test]
fn mixup_matches_timm() {
    use senet_wgpu::data::mixup::{Mix, MixupConfig, cutmix_box, mix_batch};
    let golden = [
        0.295000017,
        0.025,
        0.025,
        0.654999971,
        0.025,
        0.025,
        0.295000017,
        0.654999971,
        0.025,
        0.924999952,
        0.025,
        0.025,
        0.025,
        0.025,
        0.654999971,
        0.295000017,
        0.654999971,
        0.025,
        0.025,
        0.295000017,
    ];
    let (n, c, h, w) = (5usize, 2usize, 3usize, 4usize);
    let x: Vec<f32> = (0..n * c * h * w).map(|i| i as f32).collect();
    let mut mixed = x.clone();
    let t = mix_batch(Mix::Mixup { lam: 0.3 }, &mut mixed, &[0, 2, 1, 3, 3], [n, c, h, w], 4, 0.1);
    for (i, (&got, &want)) in t.iter().zip(&golden).enumerate() {
        assert!((f64::from(got) - want).abs() < 1e-7, "target {i}: {got} vs timm's {want}");
    }
    let per = c * h * w;
    for (i, &v) in mixed.iter().enumerate() {
        let (s, j) = (i / per, i % per);
        let want = x[i] * 0.3 + x[(n - 1 - s) * per + j] * 0.7;
        assert_eq!(v, want, "mixup pixel {i}");
    }
    for ((lam, bh, bw, cy, cx), (y0, y1, x0, x1), lam2) in [
        ((0.6, 5, 6, 2, 3), (1, 4, 2, 5), 0.7),
        ((0.2, 7, 7, 0, 6), (0, 3, 3, 7), 0.7551020408163265),
        ((0.95, 28, 28, 13, 27), (10, 16, 24, 28), 0.9693877551020408),
        ((0.0, 4, 4, 1, 2), (0, 3, 0, 4), 0.25),
    ] {
        let Mix::Cutmix { lam: got, y0: a, y1: b, x0: cc, x1: d } = cutmix_box(lam, bh, bw, cy, cx) else {
            panic!("not a CutMix")
        };
        assert_eq!((a, b, cc, d), (y0, y1, x0, x1), "box for λ {lam} at ({cy}, {cx}) in {bh}x{bw}");
        assert!((got - lam2).abs() < 1e-15, "corrected λ {got} vs timm's {lam2}");
    }
    let mut cut = x.clone();
    let mix = cutmix_box(0.6, h, w, 1, 2);
    let Mix::Cutmix { y0, y1, x0, x1, .. } = mix else { panic!("not a CutMix") };
    mix_batch(mix, &mut cut, &[0, 1, 2, 3, 0], [n, c, h, w], 4, 0.0);
    for (i, &v) in cut.iter().enumerate() {
        let (s, y, xx) = (i / per, i % (h * w) / w, i % w);
        let inside = (y0..y1).contains(&y) && (x0..x1).contains(&xx);
        let want = if inside { x[(n - 1 - s) * per + i % per] } else { x[i] };
        assert_eq!(v, want, "cutmix pixel {i} (inside the box: {inside})");
    }
    let cfg = MixupConfig {
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        prob: 1.0,
        switch_prob: 0.5,
        smoothing: 0.1,
        classes: 4,
        mode: Default::default(),
        off_epoch: 0,
    };
    let draws: Vec<Mix> = (0..20).map(|s| cfg.draw(7, 2, s, 28, 28)).collect();
    assert_eq!(draws, (0..20).map(|s| cfg.draw(7, 2, s, 28, 28)).collect::<Vec<_>>(), "the same draws again");
    assert!(
        draws.iter().any(|m| matches!(m, Mix::Mixup { .. })) && draws.iter().any(|m| matches!(m, Mix::Cutmix { .. }))
    );
    assert_ne!(cfg.draw(7, 3, 0, 28, 28), cfg.draw(7, 2, 0, 28, 28), "another epoch draws anew");
}

/// `--mixup-mode elem` and `pair` against timm's `Mixup(mode=…)` (`scripts/mixup_golden.py`,
/// tests/golden/mixup/modes.safetensors): timm's per-image (per-pair) λ and CutMix flags and its
/// box centres fixed, our mixes from the same draws (`elem_mixes`: the λ = 1 image skips its box,
/// a pair's two images share λ and box, the float32 box arithmetic), then the images and targets.
/// Images: bit for bit (the same float32 x·λ + x′·(1 − λ) and the same pasted boxes). Targets: to
/// 1e-7, as the batch-mode targets: timm multiplies and adds in float32 (three roundings), we in f64
/// and round once, which can differ by one float32 ulp (6e-8 below 1).
#[test]
fn mixup_modes_match_timm() {
    use senet_wgpu::data::mixup::{ElemParams, MixupMode, elem_mixes, mix_samples};
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/mixup/modes.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(meta.metadata().as_ref().unwrap().get("cases").unwrap()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |k: &str| -> Vec<f32> {
        st.tensor(k).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    assert_eq!(cases.len(), 4);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let mode = if case["mode"] == "pair" { MixupMode::Pair } else { MixupMode::Elem };
        let shape: Vec<usize> =
            case["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let [n, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
        let labels: Vec<u32> = case["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let params = ElemParams {
            lam: case["lam"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect(),
            cutmix: case["cutmix"].as_array().unwrap().iter().map(|v| v.as_bool().unwrap()).collect(),
        };
        let mut centres = case["centres"]
            .as_array()
            .unwrap()
            .iter()
            .map(|yx| (yx[0].as_u64().unwrap() as usize, yx[1].as_u64().unwrap() as usize))
            .collect::<std::collections::VecDeque<_>>();
        let mut centre = || centres.pop_front().unwrap_or_else(|| panic!("{name}: a box centre timm did not draw"));
        let mixes = elem_mixes(&params, n, mode, h, w, &mut centre);
        assert!(centres.is_empty(), "{name}: timm drew {} more centres", centres.len());
        let mut images = f32s(&format!("{name}/x"));
        let targets = mix_samples(&mixes, &mut images, &labels, [n, c, h, w], 4, 0.1);
        let want = f32s(&format!("{name}/mixed"));
        for (i, (a, b)) in images.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{name}: pixel {i} (image {}): ours {a}, timm's {b}", i / (c * h * w));
        }
        for (i, (a, b)) in targets.iter().zip(&f32s(&format!("{name}/target"))).enumerate() {
            assert!((a - b).abs() <= 1e-7, "{name}: target {i} (image {}): ours {a}, timm's {b}", i / 4);
        }
    }
}

/// The modes' own draws: batch gives every image the batch draw; pair gives images i and n − 1 − i
/// the same mix (an odd batch's middle image none); elem draws per image (here, with both alphas
/// and prob 1, both kinds appear and the λs differ); `--mixup-off-epoch 2` mixes nothing from
/// epoch 3 on; the draws repeat for the same (seed, epoch, step).
#[test]
fn mixup_modes_draw_per_batch_pair_or_image() {
    use senet_wgpu::data::mixup::{Mix, MixupConfig, MixupMode};
    let cfg = |mode, off_epoch| MixupConfig {
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        prob: 1.0,
        switch_prob: 0.5,
        smoothing: 0.1,
        classes: 4,
        mode,
        off_epoch,
    };
    let batch = cfg(MixupMode::Batch, 0);
    for step in 0..5 {
        assert_eq!(batch.draw_samples(7, 2, step, 6, [28, 28]), vec![batch.draw(7, 2, step, 28, 28); 6]);
    }
    let pair = cfg(MixupMode::Pair, 0);
    for n in [8, 9] {
        let m = pair.draw_samples(7, 2, 1, n, [28, 28]);
        for i in 0..n / 2 {
            assert_eq!(m[i], m[n - 1 - i], "pair ({i}, {})", n - 1 - i);
        }
        if n % 2 == 1 {
            assert_eq!(m[n / 2], Mix::None, "the unpaired middle image");
        }
    }
    let elem = cfg(MixupMode::Elem, 2);
    let m = elem.draw_samples(7, 2, 1, 32, [28, 28]);
    assert_eq!(m, elem.draw_samples(7, 2, 1, 32, [28, 28]), "the same draws again");
    assert!(m.iter().any(|x| matches!(x, Mix::Mixup { .. })) && m.iter().any(|x| matches!(x, Mix::Cutmix { .. })));
    let lams: std::collections::BTreeSet<u64> = m.iter().map(|x| x.lam().to_bits()).collect();
    assert!(lams.len() > 16, "per-image λ: only {} distinct values in 32 images", lams.len());
    assert!(elem.enabled(2) && !elem.enabled(3));
    assert_eq!(elem.draw_samples(7, 3, 1, 32, [28, 28]), vec![Mix::None; 32], "mixed after --mixup-off-epoch 2");
}
