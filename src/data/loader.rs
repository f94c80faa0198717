//! Batches: seeded shuffling, optional augmentation, conversion to f32 (/255, then optional
//! per-channel normalisation), made while the GPU computes.
//!
//! In-memory datasets (CIFAR-10, IDX, the sample): one background thread, two batches ahead; the
//! augmentation is a random crop with `hparams::CROP_PADDING` (4) pixels of zero padding and a
//! horizontal flip, drawn from one stream per epoch.
//!
//! Image folders: `LoadOptions::workers` threads decode, transform and batch (each worker a whole
//! batch, as PyTorch's DataLoader), at most `workers + 2` batches made or waiting at a time, handed
//! out in order. Every random draw of sample `i` in `epoch` comes from its own stream
//! ([`folder::sample_rng`]), so a batch is a function of (seed, epoch, its indices) alone: the
//! same with 1 or 16 workers, and a resumed epoch starts at its batch without making the others.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Dataset;
use super::augment::{AutoAugment, RandomErasing};
use super::folder::{self, BadImage};
use crate::exit::RuntimeFailure;

/// How images become tensors.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Preprocess {
    /// Per-channel (mean, std) applied after /255; None = `ToTensor()` only.
    pub normalize: Option<Vec<(f32, f32)>>,
    /// Training augmentation: in-memory datasets a random crop (pad `hparams::CROP_PADDING`) +
    /// horizontal flip; image folders `RandomResizedCrop` + horizontal flip.
    pub augment: bool,
    /// Image folders, with `augment`: timm's RandAugment or torchvision's TrivialAugmentWide
    /// after the flip (`--aa`).
    pub aa: Option<AutoAugment>,
    /// Image folders, with `augment`: timm's RandomErasing on the normalised tensor (`--reprob`).
    pub erase: Option<RandomErasing>,
    /// How batches are made.
    pub load: LoadOptions,
}

/// How the loader works (none of it changes a batch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Threads decoding an image folder (0 counts as 1).
    pub workers: usize,
    /// An image folder's file that fails to decode is left out of its batch and counted
    /// ([`Batch::skipped`]) instead of ending the pass with a [`BadImage`] error.
    pub skip_bad: bool,
    /// Testing the failure path: the loader panics before making batch `k` (0-based), as a bug in
    /// it would.
    pub fail_at: Option<usize>,
}

impl LoadOptions {
    /// The default worker count: the machine's cores but one (the one that drives the GPU), at
    /// least one.
    pub fn default_workers() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1)).max(1)
    }
}

/// Per-channel mean and std of an in-memory dataset's pixels in [0, 1] (two passes, f64).
pub fn channel_stats(ds: &Dataset) -> Vec<(f32, f32)> {
    debug_assert!(ds.files.is_none(), "channel_stats reads in-memory pixels");
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
#[derive(Debug, PartialEq)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    /// Image-folder files left out of this batch (`LoadOptions::skip_bad`): they failed to decode.
    pub skipped: Vec<BadImage>,
    /// `--mixup`/`--cutmix`: the batch's soft targets [n, classes], set by the training loop.
    pub targets: Option<Vec<f32>>,
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
    Batch { images, labels: idx.iter().map(|&i| ds.labels[i]).collect(), skipped: Vec::new(), targets: None }
}

/// Build the batch of image-folder samples `idx`: each decoded, transformed (training transform
/// with draws from (`seed`, `epoch`, sample) when `pre.augment`, else the evaluation transform)
/// and normalised, in timm's order: RandomResizedCrop, flip, RandAugment (`pre.aa`), ToTensor,
/// Normalize, RandomErasing (`pre.erase`), every draw from the sample's one stream. A file that
/// fails to decode is an error, or with `skip_bad` left out and named in [`Batch::skipped`].
pub fn make_folder_batch(
    ds: &Dataset,
    files: &folder::Files,
    idx: &[usize],
    pre: &Preprocess,
    seed: u64,
    epoch: usize,
) -> Result<Batch, BadImage> {
    let [c, h, w] = ds.shape;
    let (plane, len) = (h * w, ds.image_len());
    let mut b =
        Batch { images: Vec::with_capacity(idx.len() * len), labels: Vec::new(), skipped: Vec::new(), targets: None };
    for &i in idx {
        let mut rng = folder::sample_rng(seed, epoch, i);
        let img = if pre.augment {
            files.train_transformed(i, pre.aa.as_ref(), &mut rng)
        } else {
            files.transformed(i, false, seed, epoch)
        };
        let img = match img {
            Ok(img) => img,
            Err(bad) if pre.load.skip_bad => {
                b.skipped.push(bad);
                continue;
            }
            Err(bad) => return Err(bad),
        };
        debug_assert_eq!(img.pixels.len(), plane * c);
        let start = b.images.len();
        b.images.resize(start + len, 0.0);
        let out = &mut b.images[start..];
        for ch in 0..c {
            let (mean, std) = pre.normalize.as_ref().map_or((0.0, 1.0), |n| n[ch]);
            for (q, o) in out[ch * plane..][..plane].iter_mut().enumerate() {
                *o = (f32::from(img.pixels[q * 3 + ch]) / 255.0 - mean) / std;
            }
        }
        if let Some(erase) = pre.erase.as_ref().filter(|_| pre.augment) {
            erase.apply(out, [c, h, w], &mut rng);
        }
        b.labels.push(ds.labels[i]);
    }
    Ok(b)
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
    if ds.files.is_some() {
        let chunks = order.chunks(batch.max(1)).map(<[usize]>::to_vec).collect();
        return stream(ds, chunks, pre, seed, epoch);
    }
    batches_of(ds, order, batch, pre, seed.wrapping_add(0x5EED).wrapping_add(epoch as u64))
}

/// Batches of the samples `order` (in that order), made on a background thread two ahead of
/// the consumer; augmentation draws from a stream seeded with `aug_seed`. The last batch may be
/// partial. A data-parallel rank passes its share of the epoch's order (`dist::shard`).
pub fn batches_of(ds: Arc<Dataset>, order: Vec<usize>, batch: usize, pre: Preprocess, aug_seed: u64) -> Batches {
    let (tx, rx) = sync_channel(2);
    let fail_at = pre.load.fail_at;
    let spawned = std::thread::Builder::new().name("senet-loader".into()).spawn(move || {
        let mut rng = ChaCha8Rng::seed_from_u64(aug_seed);
        for (k, idx) in order.chunks(batch).enumerate() {
            assert!(fail_at != Some(k), "batch {k}: injected data loader failure (--fail-loader-at)");
            if tx.send(make_batch(&ds, idx, &pre, &mut rng)).is_err() {
                return; // the consumer stopped early
            }
        }
    });
    match spawned {
        Ok(thread) => Batches { rx: Some(rx), thread: Some(thread), error: None, stream: None },
        Err(e) => Batches {
            rx: None,
            thread: None,
            error: Some(format!("could not start the data loader: {e}")),
            stream: None,
        },
    }
}

/// What a worker sends: batch `k`, or its decoding failure, or its panic.
type Made = (usize, std::thread::Result<Result<Batch, BadImage>>);

/// The worker pool of an image folder's pass.
struct Stream {
    results: Receiver<Made>,
    /// One ticket per batch a worker may start; the consumer returns one per batch it takes.
    tickets: SyncSender<()>,
    /// Made batches waiting for their turn.
    pending: BTreeMap<usize, std::thread::Result<Result<Batch, BadImage>>>,
    next: usize,
    total: usize,
    stop: Arc<AtomicBool>,
    /// Never joined: a worker ends when no batch is left or the ticket channel closes.
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock workers waiting for a ticket: the sender goes with `self`, after this.
    }
}

/// The image-folder batches `batches` (lists of sample indices, in order), made by
/// `pre.load.workers` threads, handed out in order. With `pre.augment` the training transform
/// draws from (`seed`, `epoch`, sample); the evaluation transform draws nothing.
pub fn stream(ds: Arc<Dataset>, batches: Vec<Vec<usize>>, pre: Preprocess, seed: u64, epoch: usize) -> Batches {
    let workers = pre.load.workers.max(1);
    let cap = workers + 2;
    let total = batches.len();
    let (ticket_tx, ticket_rx) = sync_channel::<()>(cap);
    for _ in 0..cap {
        let _ = ticket_tx.try_send(());
    }
    let (result_tx, result_rx) = channel::<Made>();
    let stop = Arc::new(AtomicBool::new(false));
    // The ticket receiver and the next batch to start, taken together.
    let shared = Arc::new(Mutex::new((ticket_rx, 0usize)));
    let batches = Arc::new(batches);
    let mut handles = Vec::new();
    let mut error = None;
    for n in 0..workers {
        let (ds, pre, shared, batches, tx, stop) =
            (ds.clone(), pre.clone(), shared.clone(), batches.clone(), result_tx.clone(), stop.clone());
        let spawned = std::thread::Builder::new().name(format!("senet-loader-{n}")).spawn(move || {
            loop {
                let k = {
                    let Ok(mut g) = shared.lock() else { return };
                    if g.1 >= batches.len() || g.0.recv().is_err() {
                        return;
                    }
                    g.1 += 1;
                    g.1 - 1
                };
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    assert!(pre.load.fail_at != Some(k), "batch {k}: injected data loader failure (--fail-loader-at)");
                    let files = ds.files.as_ref().expect("stream() is for image folders");
                    make_folder_batch(&ds, files, &batches[k], &pre, seed, epoch)
                }));
                if tx.send((k, made)).is_err() {
                    return;
                }
            }
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                error = Some(format!("could not start the data loader's worker threads: {e}"));
                break;
            }
        }
    }
    drop(result_tx);
    let stream = Stream {
        results: result_rx,
        tickets: ticket_tx,
        pending: BTreeMap::new(),
        next: 0,
        total,
        stop,
        workers: handles,
    };
    match error {
        Some(e) => Batches { rx: None, thread: None, error: Some(e), stream: None },
        None => Batches { rx: None, thread: None, error: None, stream: Some(stream) },
    }
}

impl Stream {
    /// The next batch in order, waiting for it; None after the last.
    fn next(&mut self) -> Option<anyhow::Result<Batch>> {
        if self.next >= self.total {
            // The workers end by themselves: no batch left, or their ticket channel closed.
            self.stop.store(true, Ordering::SeqCst);
            self.workers.clear();
            return None;
        }
        loop {
            if let Some(made) = self.pending.remove(&self.next) {
                self.next += 1;
                let _ = self.tickets.try_send(());
                return Some(match made {
                    Ok(Ok(b)) => Ok(b),
                    Ok(Err(bad)) => {
                        self.total = self.next; // nothing after a failure
                        Err(bad.into())
                    }
                    Err(payload) => {
                        self.total = self.next;
                        Err(RuntimeFailure(format!(
                            "the data loader failed: {}",
                            crate::exit::panic_message(payload.as_ref())
                        ))
                        .into())
                    }
                });
            }
            match self.results.recv() {
                Ok((k, made)) => {
                    self.pending.insert(k, made);
                }
                Err(_) => {
                    self.total = self.next;
                    return Some(Err(RuntimeFailure(format!(
                        "the data loader's workers ended before batch {}",
                        self.next
                    ))
                    .into()));
                }
            }
        }
    }
}

/// The batches of one epoch ([`epoch_batches`], [`stream`]): each `Ok`, then, if the loader
/// failed, one `Err` naming the failure (a [`RuntimeFailure`], or the [`BadImage`] that stopped
/// it), then the end.
pub struct Batches {
    rx: Option<Receiver<Batch>>,
    thread: Option<std::thread::JoinHandle<()>>,
    error: Option<String>,
    stream: Option<Stream>,
}

impl Iterator for Batches {
    type Item = anyhow::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(s) = &mut self.stream {
            return s.next();
        }
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
