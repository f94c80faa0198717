//! `cargo bench --bench augment`: the training transform's pieces per image at 224×224 on the
//! CPU, one thread: RandomResizedCrop + flip from a 400×350 image, timm's RandAugment at a few
//! configs, random erasing (pixel noise) at p 0.25 and 1. JPEG decoding, which usually
//! dominates, is not included (`senet bench --data-only` times the whole pipeline).

use std::hint::black_box;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use senet_wgpu::data::augment::{EraseMode, RandAugment, RandomErasing};
use senet_wgpu::data::transforms::{self, Rgb};

/// Milliseconds per call of `f` over `n` calls.
fn time(n: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / n as f64
}

fn main() {
    let noise = |w: usize, h: usize| Rgb {
        width: w,
        height: h,
        pixels: (0..w * h * 3).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect(),
    };
    let (src, img) = (noise(400, 350), noise(224, 224));
    let n = 200;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    println!("per image, 224x224, one thread (ms):");
    let ms = time(n, || {
        black_box(transforms::train_transform(&src, [224, 224], &mut rng));
    });
    println!("  RandomResizedCrop + flip from 400x350  {ms:.3}");
    for config in ["rand-m9-mstd0.5", "rand-m9-n3-mstd0.5-inc1", "rand-m9-p1.0"] {
        let ra = RandAugment::parse(config, [124, 116, 104]).expect("a valid config");
        let ms = time(n, || {
            black_box(ra.apply(img.clone(), &mut rng));
        });
        println!("  {config:<38} {ms:.3}");
    }
    for prob in [0.25, 1.0] {
        let re = RandomErasing { prob, mode: EraseMode::Pixel, max_count: 1 };
        let mut t = vec![0f32; 3 * 224 * 224];
        let ms = time(n, || re.apply(&mut t, [3, 224, 224], &mut rng));
        println!("  random erasing p {prob:<4} pixel             {ms:.3}");
    }
}
