//! The three parsers (CIFAR-10 records, IDX with optional gzip, safetensors into a model) fed
//! random and mutated inputs: each input must give a value or an error, never a panic. Seeded,
//! so a failure reproduces; the counts are printed (`cargo test --test fuzz -- --nocapture`).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use senet_wgpu::checkpoint;
use senet_wgpu::data::{Dataset, cifar10, idx};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::optimizer::OptimizerConfig;

/// Random bytes, or `seed` with a few bytes flipped, a stretch cut out, or its end truncated or
/// extended.
fn mutate(rng: &mut ChaCha8Rng, seed: &[u8]) -> Vec<u8> {
    match rng.random_range(0..5) {
        0 => {
            let mut v = vec![0u8; rng.random_range(0..64)];
            rng.fill_bytes(&mut v);
            v
        }
        1 => {
            let mut v = seed.to_vec();
            for _ in 0..rng.random_range(1..8) {
                if !v.is_empty() {
                    let i = rng.random_range(0..v.len());
                    v[i] = rng.random();
                }
            }
            v
        }
        2 => seed[..rng.random_range(0..=seed.len())].to_vec(),
        3 => {
            let mut v = seed.to_vec();
            let extra = rng.random_range(1..100);
            v.extend((0..extra).map(|_| rng.random::<u8>()));
            v
        }
        _ => {
            let mut v = seed.to_vec();
            if v.len() > 2 {
                let a = rng.random_range(0..v.len() - 1);
                let b = rng.random_range(a + 1..v.len());
                v.drain(a..b);
            }
            v
        }
    }
}

/// Run `f` on `n` mutated inputs; returns (ok, err) counts, failing on any panic.
fn fuzz(name: &str, n: usize, seed_input: &[u8], mut f: impl FnMut(&[u8]) -> bool) -> (usize, usize) {
    let mut rng = common::rng(0xF022);
    let (mut ok, mut err) = (0, 0);
    for i in 0..n {
        let input = mutate(&mut rng, seed_input);
        match catch_unwind(AssertUnwindSafe(|| f(&input))) {
            Ok(true) => ok += 1,
            Ok(false) => err += 1,
            Err(_) => {
                panic!("{name}: input {i} ({} bytes) panicked: {:02x?}", input.len(), &input[..input.len().min(64)])
            }
        }
    }
    eprintln!("fuzz {name}: {n} inputs, {ok} parsed, {err} rejected with an error, 0 panics");
    (ok, err)
}

#[test]
fn cifar10_parser_never_panics() {
    let mut valid = Vec::new();
    for i in 0..3u8 {
        valid.push(i);
        valid.extend((0..3072).map(|p| (p % 256) as u8));
    }
    let (ok, err) = fuzz("cifar10", 20_000, &valid, |bytes| {
        let mut ds = Dataset { shape: [3, 32, 32], images: vec![], labels: vec![], classes: vec![], files: None };
        cifar10::parse_into(bytes, "fuzz.bin", &mut ds).is_ok()
    });
    assert!(ok > 0 && err > 0, "the mutations should reach both outcomes");
}

#[test]
fn idx_parser_never_panics() {
    let images: Vec<u8> = (0..5 * 4 * 3).map(|i| i as u8).collect();
    let valid = idx::encode(&images, 5, Some((4, 3)));
    let (ok, err) = fuzz("idx", 20_000, &valid, |bytes| idx::parse(bytes, 3, "fuzz-idx3").is_ok());
    assert!(ok > 0 && err > 0);
    // The same through the gzip layer.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &valid).unwrap();
    let valid_gz = gz.finish().unwrap();
    fuzz("idx.gz", 5000, &valid_gz, |bytes| {
        idx::gunzip_if_gz(bytes.to_vec(), "fuzz.gz").and_then(|raw| idx::parse(&raw, 3, "fuzz.gz").map(|_| ())).is_ok()
    });
}

#[test]
fn safetensors_into_a_model_never_panics() {
    let gpu = common::gpu();
    let config = ModelConfig {
        model: "senet".into(),
        width: 1.0 / 64.0,
        reduction: 16,
        in_channels: 1,
        num_classes: 3,
        input_hw: [16, 16],
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
        block: Default::default(),
    };
    let mut net = Network::new(gpu.clone(), config, OptimizerConfig::adam(1e-3), 0).unwrap();
    let valid = checkpoint::to_bytes(&checkpoint::state_dict(&net).unwrap()).unwrap();
    let (ok, err) = fuzz("safetensors→model", 5000, &valid, |bytes| {
        let Ok(sd) = checkpoint::from_bytes(bytes, "fuzz.safetensors") else { return false };
        let _ = checkpoint::infer_config(&sd, [16, 16], "fuzz.safetensors");
        checkpoint::apply(&mut net, &sd, "fuzz.safetensors").is_ok()
    });
    assert!(err > 0);
    eprintln!("safetensors: {ok} mutated checkpoints still loaded (mutations inside tensor data)");
}
