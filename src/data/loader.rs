//! Batches: seeded shuffling, optional augmentation (random crop with `hparams::CROP_PADDING`
//! (4) pixels of zero padding and horizontal flip), conversion to f32 (/255, then optional
//! per-channel normalisation), made on a background thread while the GPU computes.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Dataset;
use crate::exit::RuntimeFailure;

/// How images become tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Preprocess {
    /// Per-channel (mean, std) applied after /255; None = `ToTensor()` only.
    pub normalize: Option<Vec<(f32, f32)>>,
    /// Random crop (pad `hparams::CROP_PADDING`) + horizontal flip; training only.
    pub augment: bool,
}

/// Per-channel mean and std of a dataset's pixels in [0, 1] (two passes, f64).
pub fn channel_stats(ds: &Dataset) -> Vec<(f32, f32)> {
    let [c, h, w] = ds.shape;
    let plane = h * w;
    (0..c)
        .map(|ch| {
            let vals = || {
                (0..ds.len())
                    .flat_map(move |i| ds.image(i)[ch * plane..][..plane].iter().map(|&v| f64::from(v) / 255.0))
            };
            let n = (ds.len() * plane) as f64;
            let mean = vals().sum::<f64>() / n;
            let var = vals().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            (mean as f32, var.sqrt() as f32)
        })
        .collect()
}

/// One batch ready to upload.
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
}

/// Convert image `i` into `out` (length c*h*w), augmenting with `rng` when asked.
fn write_image(ds: &Dataset, i: usize, pre: &Preprocess, rng: &mut ChaCha8Rng, out: &mut [f32]) {
    let [c, h, w] = ds.shape;
    let img = ds.image(i);
    let (dy, dx, flip) = if pre.augment {
        let pad = crate::hparams::CROP_PADDING as i32;
        (rng.random_range(-pad..=pad), rng.random_range(-pad..=pad), rng.random_bool(0.5))
    } else {
        (0, 0, false)
    };
    for ch in 0..c {
        let (mean, std) = pre.normalize.as_ref().map_or((0.0, 1.0), |n| n[ch]);
        for y in 0..h {
            for x in 0..w {
                // Crop: output (y, x) reads input (y + dy, x + dx) of the zero-padded image.
                let sx = if flip { w - 1 - x } else { x } as i32 + dx;
                let sy = y as i32 + dy;
                let v = if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                    f32::from(img[ch * h * w + sy as usize * w + sx as usize]) / 255.0
                } else {
                    0.0
                };
                out[ch * h * w + y * w + x] = (v - mean) / std;
            }
        }
    }
}

/// The sample order of an epoch: a seeded shuffle, or the natural order.
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    }
    order
}

/// Build the batch of samples `idx`.
pub fn make_batch(ds: &Dataset, idx: &[usize], pre: &Preprocess, rng: &mut ChaCha8Rng) -> Batch {
    let len = ds.image_len();
    let mut images = vec![0.0f32; idx.len() * len];
    for (k, &i) in idx.iter().enumerate() {
        write_image(ds, i, pre, rng, &mut images[k * len..][..len]);
    }
    Batch { images, labels: idx.iter().map(|&i| ds.labels[i]).collect() }
}

/// Batches of one epoch, made on a background thread two ahead of the consumer. The last
/// partial batch is included (PyTorch's DataLoader default, drop_last=False). A failure of that
/// thread (a panic) is the last item, an error, so an epoch never ends short without a word.
pub fn epoch_batches(
    ds: Arc<Dataset>,
    batch: usize,
    pre: Preprocess,
    shuffle: bool,
    seed: u64,
    epoch: usize,
) -> Batches {
    let order = epoch_order(ds.len(), shuffle, seed, epoch);
    batches_of(ds, order, batch, pre, seed.wrapping_add(0x5EED).wrapping_add(epoch as u64))
}

/// Batches of the samples `order` (in that order), made on a background thread two ahead of
/// the consumer; augmentation draws from a stream seeded with `aug_seed`. The last batch may be
/// partial. A data-parallel rank passes its share of the epoch's order (`dist::shard`).
pub fn batches_of(ds: Arc<Dataset>, order: Vec<usize>, batch: usize, pre: Preprocess, aug_seed: u64) -> Batches {
    let (tx, rx) = sync_channel(2);
    // Test hook: SENET_FAIL_LOADER_AT=k makes the thread panic before making batch k (0-based),
    // as a bug in it would; tests/cli.rs checks that the run then ends with the error.
    let fail_at: Option<usize> = std::env::var("SENET_FAIL_LOADER_AT").ok().and_then(|v| v.parse().ok());
    let spawned = std::thread::Builder::new().name("senet-loader".into()).spawn(move || {
        let mut rng = ChaCha8Rng::seed_from_u64(aug_seed);
        for (k, idx) in order.chunks(batch).enumerate() {
            assert!(fail_at != Some(k), "SENET_FAIL_LOADER_AT={k}: injected data loader failure");
            if tx.send(make_batch(&ds, idx, &pre, &mut rng)).is_err() {
                return; // the consumer stopped early
            }
        }
    });
    match spawned {
        Ok(thread) => Batches { rx: Some(rx), thread: Some(thread), error: None },
        Err(e) => Batches { rx: None, thread: None, error: Some(format!("could not start the data loader: {e}")) },
    }
}

/// The batches of one epoch ([`epoch_batches`]): each `Ok`, then, if the loader thread failed,
/// one `Err` naming the failure (a [`RuntimeFailure`]), then the end.
pub struct Batches {
    rx: Option<Receiver<Batch>>,
    thread: Option<std::thread::JoinHandle<()>>,
    error: Option<String>,
}

impl Iterator for Batches {
    type Item = anyhow::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(b) = self.rx.as_ref().and_then(|rx| rx.recv().ok()) {
            return Some(Ok(b));
        }
        // The channel is closed: the thread has ended, finished or failed.
        self.rx = None;
        if let Some(Err(payload)) = self.thread.take().map(|t| t.join()) {
            self.error = Some(format!("the data loader failed: {}", crate::exit::panic_message(payload.as_ref())));
        }
        self.error.take().map(|e| Err(RuntimeFailure(e).into()))
    }
}
