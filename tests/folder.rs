//! Image folders: torchvision's transforms against torchvision's own output, the streaming loader's
//! determinism (worker count, resume), its memory bound, unreadable files (the stop and its
//! resume checkpoint, `--skip-bad-images`), and refusals that name the file or flag.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use senet_wgpu::data::augment::{EraseMode, RandAugment, RandomErasing};
use senet_wgpu::data::folder::{self, FolderOptions};
use senet_wgpu::data::loader::{self, LoadOptions, Preprocess};
use senet_wgpu::data::transforms::{self, Rect, Rgb};

fn senet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_senet"))
}

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/transforms");

/// A photo-like test image: smooth colour, an edge, a little deterministic texture.
fn pattern(w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let t = (x * 7 + y * 13 + seed * 31) % 23;
        let edge = if x * 3 > w + seed % 5 { 60 } else { 0 };
        image::Rgb([
            ((x * 255 / w.max(1)) as u8).wrapping_add(t as u8),
            ((y * 255 / h.max(1)) as u8).wrapping_add(edge),
            (128u32.wrapping_add(seed * 40) % 256) as u8 ^ (t as u8 * 3),
        ])
    })
}

/// Write image `k` of a test folder at `path` in a mode that cycles through JPEG RGB, PNG RGB,
/// PNG grey, PNG RGBA, JPEG grey and PNG 16-bit grey, at a size that varies with `k`.
fn write_image(path: &Path, k: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let (w, h) = (17 + (k * 7) % 23, 13 + (k * 11) % 19);
    let rgb = pattern(w, h, k);
    let dynimg = image::DynamicImage::ImageRgb8(rgb);
    match k % 6 {
        0 => dynimg.save_with_format(path, image::ImageFormat::Jpeg),
        1 => dynimg.save_with_format(path, image::ImageFormat::Png),
        2 => image::DynamicImage::ImageLuma8(dynimg.to_luma8()).save_with_format(path, image::ImageFormat::Png),
        3 => image::DynamicImage::ImageRgba8(dynimg.to_rgba8()).save_with_format(path, image::ImageFormat::Png),
        4 => image::DynamicImage::ImageLuma8(dynimg.to_luma8()).save_with_format(path, image::ImageFormat::Jpeg),
        _ => image::DynamicImage::ImageLuma16(dynimg.to_luma16()).save_with_format(path, image::ImageFormat::Png),
    }
    .unwrap();
}

/// A folder of `per_class` training and `per_val` validation images in each of three classes,
/// JPEG and PNG in several modes and sizes. Returns the training files, sorted as the index is.
fn write_folder(dir: &Path, per_class: u32, per_val: u32) -> Vec<PathBuf> {
    let mut train = Vec::new();
    for (c, class) in ["cat", "dog", "eel"].iter().enumerate() {
        for i in 0..per_class {
            let k = c as u32 * 100 + i;
            let ext = if matches!(k % 6, 0 | 4) { "jpg" } else { "png" };
            let p = dir.join("train").join(class).join(format!("{i:03}.{ext}"));
            write_image(&p, k);
            train.push(p);
        }
        for i in 0..per_val {
            let k = 1000 + c as u32 * 100 + i;
            let ext = if matches!(k % 6, 0 | 4) { "jpg" } else { "png" };
            write_image(&dir.join("val").join(class).join(format!("{i:03}.{ext}")), k);
        }
    }
    train.sort();
    train
}

// ---------------------------------------------------------------------------------------------
// The transforms against torchvision

struct Golden {
    cases: Vec<serde_json::Value>,
    tensors: HashMap<String, (Vec<usize>, Vec<u8>)>,
}

fn golden() -> Golden {
    let bytes = std::fs::read(format!("{GOLDEN}/golden.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(meta.metadata().as_ref().unwrap().get("cases").unwrap()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st.tensors().into_iter().map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec()))).collect();
    Golden { cases, tensors }
}

/// An HWC u8 golden as an image.
fn as_rgb(shape: &[usize], data: &[u8]) -> Rgb {
    assert_eq!(shape.len(), 3, "RGB goldens are HWC");
    Rgb { height: shape[0], width: shape[1], pixels: data.to_vec() }
}

/// Largest absolute difference, and how many values differ.
fn diff(a: &Rgb, b: &Rgb) -> (u8, usize) {
    assert_eq!((a.width, a.height), (b.width, b.height), "sizes differ");
    let d = a.pixels.iter().zip(&b.pixels).map(|(x, y)| x.abs_diff(*y));
    (d.clone().max().unwrap_or(0), d.filter(|&v| v > 0).count())
}

fn apply(case: &serde_json::Value, img: &Rgb) -> Rgb {
    let size = |k: &str| -> [usize; 2] {
        let v = case[k].as_array().unwrap();
        [v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize]
    };
    match case["op"].as_str().unwrap() {
        "convert" => img.clone(),
        "eval" => transforms::eval_transform(img, size("size"), case["crop_pct"].as_f64().unwrap()),
        "rrc" => {
            let b: Vec<usize> = case["box"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let [oh, ow] = size("size");
            transforms::resized_crop(img, Rect { y0: b[0], x0: b[1], h: b[2], w: b[3] }, ow, oh)
        }
        op => panic!("unknown op {op}"),
    }
}

/// Resize, CenterCrop and the crop-and-resize of RandomResizedCrop, on PIL's own decoded pixels,
/// are torchvision's output exactly (tolerance 0: the same integer arithmetic as Pillow's
/// Resample.c), for every mode, size and crop in the golden file: shrinking (antialiased),
/// enlarging, stretching, odd offsets (Python's round-half-even in CenterCrop).
#[test]
fn transforms_are_torchvisions_bit_for_bit_on_the_same_pixels() {
    let g = golden();
    let mut failed = Vec::new();
    for case in &g.cases {
        let name = case["name"].as_str().unwrap();
        let image = case["image"].as_str().unwrap();
        let (shape, pil) = &g.tensors[&format!("{image}/convert")];
        let src = as_rgb(shape, pil);
        let (s, want) = &g.tensors[name];
        let got = apply(case, &src);
        let (max, n) = diff(&got, &as_rgb(s, want));
        if max > 0 {
            failed.push(format!("{name}: {n} values differ from torchvision's, by up to {max}"));
        }
    }
    assert!(g.cases.len() >= 60, "only {} cases", g.cases.len());
    assert!(failed.is_empty(), "{} of {} cases differ:\n{}", failed.len(), g.cases.len(), failed.join("\n"));
}

/// From the file: our decoding and `.convert("RGB")` are PIL's exactly for every lossless mode
/// (grey, grey + alpha, RGBA, palette, 16-bit grey — clipped to 255 as PIL's "I;16" conversion
/// does — and 16-bit RGB, its high byte). JPEGs are decoded by zune-jpeg, not libjpeg-turbo: its
/// IDCT and chroma upsampling round differently, so JPEG pixels (and every transform of them) are
/// within a tolerance only: at most 6 levels, and the mean difference under 1 level, measured
/// here on the committed JPEGs (RGB 4:2:0, grey, and Adobe CMYK, whose c·k/255 conversion also
/// rounds differently from PIL's cmyk2rgb).
#[test]
fn decoding_and_rgb_conversion_match_pil() {
    let g = golden();
    for case in g.cases.iter().filter(|c| c["op"] == "convert") {
        let image = case["image"].as_str().unwrap();
        let ours = folder::decode_rgb(&Path::new(GOLDEN).join(image)).unwrap();
        let (shape, pil) = &g.tensors[case["name"].as_str().unwrap()];
        let (max, n) = diff(&ours, &as_rgb(shape, pil));
        let mean = ours.pixels.iter().zip(pil).map(|(a, b)| f64::from(a.abs_diff(*b))).sum::<f64>() / pil.len() as f64;
        eprintln!("{image} ({}): max {max}, {n} of {} values differ, mean {mean:.3}", case["mode"], pil.len());
        if image.ends_with(".jpg") {
            assert!(max <= 6 && mean < 1.0, "{image}: max difference {max}, mean {mean:.3} from PIL's decoding");
        } else {
            assert_eq!(max, 0, "{image} ({}): {n} values differ from PIL's convert(\"RGB\")", case["mode"]);
        }
    }
    // And the whole evaluation transform from the JPEG file stays within the decoder's tolerance.
    for case in g.cases.iter().filter(|c| c["op"] == "eval" && c["image"] == "rgb.jpg") {
        let ours = apply(case, &folder::decode_rgb(&Path::new(GOLDEN).join("rgb.jpg")).unwrap());
        let (s, want) = &g.tensors[case["name"].as_str().unwrap()];
        let (max, _) = diff(&ours, &as_rgb(s, want));
        assert!(max <= 6, "{}: {max}", case["name"]);
    }
}

/// RandomResizedCrop's parameters follow torchvision's rules: every crop lies inside the image,
/// its area is 8–100 % of it and its aspect ratio 3/4–4/3 (or it is the central fallback crop);
/// the flip comes up about half the time.
#[test]
fn random_resized_crop_parameters_keep_torchvisions_ranges() {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    for (w, h) in [(500, 375), (375, 500), (40, 13), (13, 40), (1, 1), (224, 224)] {
        for _ in 0..500 {
            let r = transforms::random_resized_crop_params(w, h, &mut rng);
            assert!(r.w >= 1 && r.h >= 1 && r.x0 + r.w <= w && r.y0 + r.h <= h, "{r:?} outside {w}x{h}");
            let (area, ratio) = ((r.w * r.h) as f64 / (w * h) as f64, r.w as f64 / r.h as f64);
            let fallback = r.x0 == (w - r.w) / 2 && r.y0 == (h - r.h) / 2;
            // Rounding the side lengths moves area and ratio by up to a pixel's worth.
            let slack = 1.0 / r.w.min(r.h) as f64;
            assert!(
                fallback
                    || (area >= 0.08 - 2.0 * slack && ratio >= 0.75 - 2.0 * slack && ratio <= 4.0 / 3.0 + 2.0 * slack),
                "{w}x{h}: {r:?} (area {area:.3}, ratio {ratio:.3})"
            );
        }
    }
    // Red rises left to right: a crop keeps that order, a flip reverses it.
    let img = Rgb { width: 64, height: 64, pixels: (0..64 * 64).flat_map(|q| [(q % 64 * 4) as u8, 0, 0]).collect() };
    let flips = (0..400)
        .filter(|_| {
            let out = transforms::train_transform(&img, [4, 16], &mut rng);
            out.pixels[0] > out.pixels[15 * 3]
        })
        .count();
    assert!((150..250).contains(&flips), "{flips} of 400 flipped");
}

// ---------------------------------------------------------------------------------------------
// The loader

fn folder_set(dir: &Path, size: usize, cache_mb: u64) -> senet_wgpu::data::Splits {
    folder::load(dir, FolderOptions { size: Some([size, size]), crop_pct: 0.875, cache_bytes: cache_mb << 20 }).unwrap()
}

/// The batches of 5 of epoch `epoch` (the order shuffled as epoch 1's, so that epochs differ in
/// their random draws alone).
fn all_batches(ds: &Arc<senet_wgpu::data::Dataset>, workers: usize, augment: bool, epoch: usize) -> Vec<loader::Batch> {
    let order = loader::epoch_order(ds.len(), true, 7, 1);
    let chunks: Vec<Vec<usize>> = order.chunks(5).map(<[usize]>::to_vec).collect();
    let pre = Preprocess {
        normalize: Some(vec![(0.485, 0.229), (0.456, 0.224), (0.406, 0.225)]),
        augment,
        load: LoadOptions { workers, ..LoadOptions::default() },
        ..Preprocess::default()
    };
    loader::stream(ds.clone(), chunks, pre, 7, epoch).map(|b| b.unwrap()).collect()
}

fn bits(b: &[loader::Batch]) -> Vec<(Vec<u32>, Vec<u32>)> {
    b.iter().map(|b| (b.images.iter().map(|v| v.to_bits()).collect(), b.labels.clone())).collect()
}

/// The batches of an epoch (decoded, RandomResizedCrop'd, flipped, normalised) are the same bit
/// for bit with 1, 3 or 8 workers, with the decoded images held in memory or not, and a loader
/// started at batch k gives the uninterrupted epoch's batches from k on. Another epoch draws
/// other crops.
#[test]
fn batches_do_not_depend_on_workers_cache_or_where_the_epoch_starts() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), 8, 2);
    let s = folder_set(dir.path(), 12, 0);
    assert_eq!(s.train.classes, ["cat", "dog", "eel"]);
    assert_eq!((s.train.len(), s.test.len(), s.train.shape), (24, 6, [3, 12, 12]));
    let train = Arc::new(s.train);
    let one = all_batches(&train, 1, true, 1);
    assert_eq!(one.len(), 5);
    assert!(bits(&one) == bits(&all_batches(&train, 3, true, 1)), "3 workers differ from 1");
    assert!(bits(&one) == bits(&all_batches(&train, 8, true, 1)), "8 workers differ from 1");
    let cached = Arc::new(folder_set(dir.path(), 12, 64).train);
    assert!(cached.files.as_ref().unwrap().cache.is_some(), "a 64 MB budget holds this folder");
    assert!(bits(&one) == bits(&all_batches(&cached, 4, true, 1)), "cached images differ");
    assert!(bits(&one) == bits(&all_batches(&cached, 2, true, 1)), "a second pass over the cache differs");
    assert!(bits(&one) != bits(&all_batches(&train, 2, true, 2)), "epoch 2 draws the same crops as epoch 1");
    // Started at batch 3, as a resumed run's loader is.
    let order = loader::epoch_order(train.len(), true, 7, 1);
    let rest: Vec<Vec<usize>> = order.chunks(5).skip(3).map(<[usize]>::to_vec).collect();
    let pre = Preprocess {
        normalize: Some(vec![(0.485, 0.229), (0.456, 0.224), (0.406, 0.225)]),
        augment: true,
        load: LoadOptions { workers: 2, ..LoadOptions::default() },
        ..Preprocess::default()
    };
    let resumed: Vec<loader::Batch> = loader::stream(train.clone(), rest, pre, 7, 1).map(|b| b.unwrap()).collect();
    assert!(bits(&resumed) == bits(&one[3..]), "a loader started at batch 3 differs");
    // The evaluation transform: no draws, the same in any epoch.
    assert!(bits(&all_batches(&train, 2, false, 1)) == bits(&all_batches(&train, 1, false, 5)));
}

/// timm's augmentations on the loader's workers: every training image is RandomResizedCrop, flip,
/// RandAugment, ToTensor + Normalize, RandomErasing in that order (timm's
/// `transforms_imagenet_train`), all drawn from the sample's one stream, so the batches are the
/// same with 1 or 3 workers; evaluation batches never get them.
#[test]
fn timm_augmentations_run_in_timms_order_whatever_the_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path(), 4, 1);
    let train = Arc::new(folder_set(dir.path(), 12, 0).train);
    let ra = RandAugment::parse("rand-m9-n3-mstd0.5", [124, 116, 104]).unwrap();
    let re = RandomErasing { prob: 0.7, mode: EraseMode::Pixel, max_count: 2 };
    let norm = vec![(0.485f32, 0.229f32), (0.456, 0.224), (0.406, 0.225)];
    let pre = |workers, timm: bool, augment: bool| Preprocess {
        normalize: Some(norm.clone()),
        augment,
        aa: timm.then(|| ra.clone().into()),
        erase: timm.then(|| re.clone()),
        load: LoadOptions { workers, ..LoadOptions::default() },
    };
    let order = loader::epoch_order(train.len(), true, 7, 1);
    let chunks: Vec<Vec<usize>> = order.chunks(5).map(<[usize]>::to_vec).collect();
    let run = |p: Preprocess| -> Vec<loader::Batch> {
        loader::stream(train.clone(), chunks.clone(), p, 7, 1).map(|b| b.unwrap()).collect()
    };
    let one = run(pre(1, true, true));
    assert!(bits(&one) == bits(&run(pre(3, true, true))), "3 workers differ from 1");
    assert!(bits(&one) != bits(&run(pre(1, false, true))), "--aa and --reprob changed nothing");
    assert!(bits(&run(pre(2, true, false))) == bits(&run(pre(1, false, false))), "evaluation batches augmented");
    let files = train.files.as_ref().unwrap();
    let [c, h, w] = train.shape;
    let len = c * h * w;
    let mut erased = 0;
    for (b, idx) in one.iter().zip(&chunks) {
        for (k, &i) in idx.iter().enumerate() {
            let mut rng = folder::sample_rng(7, 1, i);
            let img = transforms::train_transform(&files.image(i).unwrap(), [h, w], &mut rng);
            let img = ra.apply(img, &mut rng);
            let mut t: Vec<f32> = (0..len)
                .map(|q| {
                    let (ch, p) = (q / (h * w), q % (h * w));
                    (f32::from(img.pixels[p * 3 + ch]) / 255.0 - norm[ch].0) / norm[ch].1
                })
                .collect();
            let plain = t.clone();
            re.apply(&mut t, [c, h, w], &mut rng);
            erased += usize::from(t != plain);
            let got: Vec<u32> = b.images[k * len..][..len].iter().map(|v| v.to_bits()).collect();
            assert!(got == t.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "sample {i} is not timm's order");
        }
    }
    assert!(erased > 0, "no image erased at --reprob 0.7");
}

/// A file that does not decode ends the pass with an error naming it (after the batches before
/// it), or with `skip_bad` is left out of its batch and named there.
#[test]
fn an_unreadable_file_is_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_folder(dir.path(), 4, 1);
    std::fs::write(&files[5], b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let ds = Arc::new(folder_set(dir.path(), 8, 0).train);
    let chunks: Vec<Vec<usize>> = (0..12).collect::<Vec<_>>().chunks(4).map(<[usize]>::to_vec).collect();
    let pre =
        |skip_bad| Preprocess { load: LoadOptions { workers: 2, skip_bad, fail_at: None }, ..Preprocess::default() };
    let got: Vec<_> = loader::stream(ds.clone(), chunks.clone(), pre(false), 0, 1).collect();
    assert_eq!(got.len(), 2, "batch 0, then batch 1's error, then nothing");
    let err = got[1].as_ref().unwrap_err();
    let bad = err.downcast_ref::<folder::BadImage>().expect("a BadImage error");
    assert_eq!(bad.path, files[5]);
    assert!(format!("{err:#}").contains(&files[5].display().to_string()), "{err:#}");
    let got: Vec<loader::Batch> = loader::stream(ds, chunks, pre(true), 0, 1).map(|b| b.unwrap()).collect();
    assert_eq!(got.iter().map(|b| b.labels.len()).collect::<Vec<_>>(), [4, 3, 4]);
    assert_eq!(got[1].skipped.len(), 1);
    assert_eq!(got[1].skipped[0].path, files[5]);
}

/// Peak resident memory of a child process, in bytes (`wait4`'s ru_maxrss, in kB on Linux).
fn run_peak_rss(cmd: &mut Command) -> (std::process::ExitStatus, String, u64) {
    use std::os::unix::process::ExitStatusExt;
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // Output is small (a few lines): the pipes do not fill before the child ends.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    let mut out = String::new();
    let mut err = String::new();
    use std::io::Read;
    let mut child = child;
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (std::process::ExitStatus::from_raw(status), format!("{out}{err}"), usage.ru_maxrss as u64 * 1024)
}

/// Memory does not grow with the dataset: a folder whose decoded images (30 of 1600×1200, 165 MB)
/// exceed a 16 MB budget is streamed through the training transforms with a peak resident set
/// under the budget plus what the loader has in flight (2 workers, each one decoded image and its
/// RGB copy, 11.5 MB apiece, and at most 4 batches of 4 tiny tensors) plus the process itself
/// (under 40 MB without a GPU). The same pass with a budget that holds the folder keeps every
/// image: its peak is above the decoded total, so the measurement sees what a cache holds.
#[test]
fn a_folder_larger_than_the_budget_is_streamed_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (1600u32, 1200u32);
    for i in 0..30u32 {
        let class = ["a", "b"][i as usize % 2];
        let p = dir.path().join("train").join(class).join(format!("{i:02}.jpg"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::DynamicImage::ImageRgb8(pattern(w, h, i)).save_with_format(&p, image::ImageFormat::Jpeg).unwrap();
    }
    write_image(&dir.path().join("val/a/0.png"), 1);
    let decoded = 30 * 3 * u64::from(w * h);
    let bench = |cache_mb: &str| {
        let mut cmd = senet();
        cmd.args(["bench", "--data-only", "--dataset", "folder", "--image-size", "16", "--batch-size", "4"])
            .args(["--steps", "8", "--workers", "2", "--json", "--cache-mb", cache_mb, "--data-dir"])
            .arg(dir.path());
        let (status, out, rss) = run_peak_rss(&mut cmd);
        assert!(status.success(), "bench --cache-mb {cache_mb}: {out}");
        let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(v["train_images"], 30, "{out}");
        (v, rss)
    };
    let (streamed, rss) = bench("16");
    assert_eq!(streamed["cached"], false);
    let in_flight = 2 * 2 * 3 * u64::from(w * h) + 4 * 4 * 3 * 16 * 16 * 4;
    let bound = (16 << 20) + in_flight + (40 << 20);
    eprintln!("streamed: peak RSS {} MB, bound {} MB, decoded {} MB", rss >> 20, bound >> 20, decoded >> 20);
    assert!(rss < bound, "peak RSS {} MB over the bound {} MB", rss >> 20, bound >> 20);
    let (cached, rss_cached) = bench("1024");
    assert_eq!(cached["cached"], true);
    eprintln!("cached: peak RSS {} MB", rss_cached >> 20);
    assert!(rss_cached > decoded, "holding all {} MB decoded peaked at only {} MB", decoded >> 20, rss_cached >> 20);
}

// ---------------------------------------------------------------------------------------------
// Training on a folder

/// Small-model training flags on a folder at 16 px.
fn train_args(data: &Path, out: &Path, seed: u64, workers: &str) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--dataset", "folder", "--image-size", "16", "--model", "se-resnet8"]
        .into_iter()
        .map(String::from)
        .collect();
    v.extend(
        ["--width", "0.25", "--reduction", "4", "--augment", "--epochs", "1", "--batch-size", "6"].map(String::from),
    );
    v.extend(["--seed".into(), seed.to_string(), "--workers".into(), workers.into(), "--data-dir".into()]);
    v.push(data.display().to_string());
    v.push("--out".into());
    v.push(out.display().to_string());
    v
}

/// An unreadable image in the middle of an epoch stops the run as Ctrl-C does: the steps before
/// its batch done and saved in resume.safetensors, the file named, exit code 1. With the file
/// replaced, `--resume` (here with 3 workers instead of 1) ends with the weights of an
/// uninterrupted run on the repaired folder, bit for bit: the resumed loader starts at the failed
/// batch and draws the same crops. `--skip-bad-images` instead trains on, naming and counting it.
#[test]
fn a_bad_image_stops_and_resumes_exactly_or_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let files = write_folder(&data, 8, 2);
    // A seed whose epoch-1 order puts the broken file in a middle batch (4 batches of 6).
    let bad_index = 9;
    let seed = (0..100u64)
        .find(|&s| {
            let pos = loader::epoch_order(24, true, s, 1).iter().position(|&i| i == bad_index).unwrap();
            (1..3).contains(&(pos / 6))
        })
        .unwrap();
    let bad = &files[bad_index];
    let good_bytes = std::fs::read(bad).unwrap();
    std::fs::write(bad, b"\xff\xd8\xff\xe0 a truncated JPEG").unwrap();

    let stopped = dir.path().join("stopped");
    let o = senet().args(train_args(&data, &stopped, seed, "3")).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&bad.display().to_string()) && stderr.contains("not a readable image"), "{stderr}");
    assert!(stderr.contains("--resume") && stderr.contains("--skip-bad-images"), "{stderr}");
    assert!(stopped.join("resume.safetensors").is_file(), "no resume checkpoint: {stderr}");

    // --skip-bad-images: trains on, names the file, counts it in the table and metrics.csv.
    let skipped = dir.path().join("skipped");
    let o = senet().args(train_args(&data, &skipped, seed, "2")).arg("--skip-bad-images").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains(&bad.display().to_string()), "{stderr}");
    assert!(stdout.contains("1 unreadable images skipped"), "{stdout}");
    let csv = std::fs::read_to_string(skipped.join("metrics.csv")).unwrap();
    let column = csv.lines().next().unwrap().split(',').position(|h| h == "skipped_images").expect("the column");
    assert_eq!(csv.lines().nth(1).unwrap().split(',').nth(column), Some("1"), "{csv}");

    // Repair the file: resume the stopped run, and compare with an uninterrupted one.
    std::fs::write(bad, good_bytes).unwrap();
    let o = senet().args(["train", "--resume"]).arg(&stopped).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "resume: {stderr}");
    assert!(stdout.contains("steps of the next"), "not a mid-epoch resume: {stdout}");
    let whole = dir.path().join("whole");
    let o = senet().args(train_args(&data, &whole, seed, "1")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |d: &Path| std::fs::read(d.join("last.safetensors")).unwrap();
    assert!(read(&stopped) == read(&whole), "the resumed run's weights differ from the uninterrupted run's");
}

/// `--aa`, `--reprob`, `--remode`, `--recount`: refusals that name the flag and the bad part;
/// saved in config.json and restored by `--resume` (1 epoch + 1 resumed = 2 epochs, bit for bit).
#[test]
fn timm_augment_flags_are_checked_saved_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_folder(&data, 4, 1);
    let run = |out: &str, epochs: &str, extra: &[&str]| {
        let mut args = train_args(&data, &dir.path().join(out), 3, "2");
        let i = args.iter().position(|a| a == "--epochs").unwrap();
        args[i + 1] = epochs.into();
        args.extend(extra.iter().map(|s| s.to_string()));
        senet().args(&args).output().unwrap()
    };
    for (extra, expect) in [
        (&["--aa", "rand-m9-x3"][..], &["--aa", "\"x3\"", "unknown key"][..]),
        (&["--aa", "trivial"], &["--aa", "spelt `trivialaugment`", "rand-m9-mstd0.5"]),
        (&["--aa", "rand-m9", "--no-augment"], &["--augment"]),
        (&["--reprob", "1.5"], &["--reprob"]),
        (&["--reprob", "0.5", "--recount", "0"], &["--recount"]),
    ] {
        let o = run("never", "1", extra);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {stderr}");
        for e in expect {
            assert!(stderr.contains(e), "{extra:?}: expected {e:?} in {stderr}");
        }
    }
    let o = senet()
        .args(["train", "--dataset", "sample", "--augment", "--aa", "rand-m9", "--epochs", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("image folders"), "{stderr}");
    assert!(!dir.path().join("never").exists(), "a refusal left a run folder");

    let timm = ["--aa", "rand-m9-mstd0.5", "--reprob", "0.5", "--remode", "pixel", "--recount", "2"];
    let o = run("whole", "2", &timm);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("RandomHorizontalFlip + RandAugment(n=2, m=9")
            && stdout.contains("RandomErasing(p=0.5, pixel, 1..=2"),
        "{stdout}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("whole/config.json")).unwrap()).unwrap();
    let t = &v["train"];
    assert_eq!(
        (t["aa"].as_str(), t["reprob"].as_f64(), t["remode"].as_str(), t["recount"].as_u64()),
        (Some("rand-m9-mstd0.5"), Some(0.5), Some("pixel"), Some(2))
    );
    let o = run("halves", "1", &timm);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = senet().args(["train", "--epochs", "2", "--resume"]).arg(dir.path().join("halves")).output().unwrap();
    assert!(o.status.success(), "resume: {}", String::from_utf8_lossy(&o.stderr));
    let read = |d: &str| std::fs::read(dir.path().join(d).join("last.safetensors")).unwrap();
    assert!(read("halves") == read("whole"), "the resumed run's weights differ from the uninterrupted run's");
    // Without the augmentations the weights differ: they did something.
    let o = run("plain", "2", &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(read("plain") != read("whole"), "--aa and --reprob changed nothing");

    // --aa trivialaugment (torchvision's TrivialAugmentWide): named in the banner, saved, resumed
    // bit for bit, and it changes the weights.
    let ta = ["--aa", "trivialaugment"];
    let o = run("ta-whole", "2", &ta);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("RandomHorizontalFlip + TrivialAugmentWide(num_magnitude_bins=31")
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("ta-whole/config.json")).unwrap()).unwrap();
    assert_eq!(v["train"]["aa"].as_str(), Some("trivialaugment"));
    assert!(run("ta-halves", "1", &ta).status.success());
    let o = senet().args(["train", "--epochs", "2", "--resume"]).arg(dir.path().join("ta-halves")).output().unwrap();
    assert!(o.status.success(), "resume: {}", String::from_utf8_lossy(&o.stderr));
    assert!(read("ta-halves") == read("ta-whole"), "the resumed TrivialAugment run's weights differ");
    assert!(read("ta-whole") != read("plain"), "--aa trivialaugment changed nothing");
}

/// `--recipe imagenet` fills in the ImageNet recipe (lr 0.1 per 256 images, scaled with the
/// batch), keeps what is given, and the first lines say how the folder is read and transformed.
#[test]
fn the_imagenet_recipe_is_a_preset_and_the_banner_names_the_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_folder(&data, 2, 1);
    let out = dir.path().join("run");
    let mut args = train_args(&data, &out, 0, "2");
    args.extend(["--recipe", "imagenet", "--cache-mb", "64"].map(String::from));
    let i = args.iter().position(|a| a == "--batch-size").unwrap();
    args.drain(i..i + 2); // the recipe's batch, 256 (the whole folder is one batch)
    let o = senet().args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let t = &v["train"];
    assert_eq!((t["optimizer"].as_str(), t["batch_size"].as_u64()), (Some("sgd"), Some(256)));
    assert_eq!(
        (t["lr"].as_f64(), t["momentum"].as_f64(), t["weight_decay"].as_f64()),
        (Some(0.1), Some(0.9), Some(1e-4))
    );
    assert_eq!(
        (t["schedule"].as_str(), t["epochs"].as_u64(), t["augment"].as_bool()),
        (Some("step30"), Some(1), Some(true))
    );
    assert_eq!(v["model"]["normalize"][0], serde_json::json!([0.485f32, 0.229f32]));
    assert!(stdout.contains("held decoded in memory") && stdout.contains("RandomResizedCrop((16, 16)"), "{stdout}");
    assert!(stdout.contains("Resize(18) + CenterCrop((16, 16))"), "{stdout}");
    // Batch 64 given: lr 0.025.
    let out2 = dir.path().join("run2");
    let mut args = train_args(&data, &out2, 0, "2");
    args.extend(["--recipe", "imagenet"].map(String::from));
    let i = args.iter().position(|a| a == "--batch-size").unwrap();
    args[i + 1] = "64".into();
    let o = senet().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out2.join("config.json")).unwrap()).unwrap();
    assert_eq!(v["train"]["lr"].as_f64(), Some(0.025));
}

/// Refusals name the flag or the file: a crop_pct out of range, a folder without an evaluation
/// split, an evaluation class the training split lacks, `--workers 0`, `--data-only` elsewhere.
#[test]
fn folder_refusals_name_the_flag_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_folder(&data, 1, 1);
    let refused = |args: &[&str], expect: &[&str]| {
        let o = senet().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
        for e in expect {
            assert!(stderr.contains(e), "{args:?}: expected {e:?} in {stderr}");
        }
    };
    let d = data.to_str().unwrap();
    let out = dir.path().join("never");
    let o = out.to_str().unwrap();
    let base = ["train", "--dataset", "folder", "--data-dir", d, "--out", o];
    refused(&[&base[..], &["--crop-pct", "1.5"]].concat(), &["--crop-pct"]);
    refused(&[&base[..], &["--workers", "0"]].concat(), &["--workers"]);
    std::fs::create_dir_all(data.join("val/zebra")).unwrap();
    write_image(&data.join("val/zebra/1.png"), 3);
    refused(&base, &["zebra", "val"]);
    std::fs::rename(data.join("val"), data.join("elsewhere")).unwrap();
    refused(&base, &["no evaluation split", d]);
    refused(&["bench", "--data-only", "--dataset", "sample", "--data-dir", d], &["--data-only"]);
    assert!(!out.exists(), "a refusal left a run folder");
}
