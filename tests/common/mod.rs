//! Shared test helpers: the one GPU, seeded random data, and the llm.c-style checker.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use senet_wgpu::gpu::{Gpu, GpuOptions, Subgroups, Tensor};

/// The device every GPU test runs on, created once per test binary. With no adapter every GPU
/// test fails with the adapter error: they never pass by skipping. Tuning is off, so the kernels
/// a test exercises never depend on timing or on a cache file left by another run (tests/tune.rs
/// covers the tuner and the kernels it may pick).
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    let opts = GpuOptions { tune: Some(senet_wgpu::gpu::tune::TuneMode::Off), ..Default::default() };
    match GPU.get_or_init(|| Gpu::new(&opts).map_err(|e| format!("{e:#}"))) {
        Ok(g) => g.clone(),
        Err(e) => panic!("GPU test cannot run: {e}"),
    }
}

/// The same adapter with reductions on workgroup-memory trees (no subgroups).
pub fn gpu_without_subgroups() -> Arc<Gpu> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    let opts = GpuOptions {
        tune: Some(senet_wgpu::gpu::tune::TuneMode::Off),
        subgroups: Some(Subgroups::Off),
        ..Default::default()
    };
    match GPU.get_or_init(|| Gpu::new(&opts).map_err(|e| format!("{e:#}"))) {
        Ok(g) => g.clone(),
        Err(e) => panic!("GPU test cannot run: {e}"),
    }
}

/// Both reduction paths for the kernels that reduce: the default device, which must use
/// subgroups (lavapipe has them; set SENET_TEST_NO_SUBGROUPS=1 on an adapter without, and only
/// the workgroup path is tested), and the same adapter without them.
pub fn gpus() -> Vec<(&'static str, Arc<Gpu>)> {
    let with = gpu();
    let without = gpu_without_subgroups();
    assert!(!without.subgroups, "SENET_SUBGROUPS=off must turn subgroups off");
    if std::env::var_os("SENET_TEST_NO_SUBGROUPS").is_some() {
        return vec![("workgroup trees", without)];
    }
    assert!(
        with.subgroups,
        "{} has no subgroups, so the subgroup kernels cannot be tested; set SENET_TEST_NO_SUBGROUPS=1 to test only \
         the workgroup path",
        with.describe()
    );
    vec![("subgroups", with), ("workgroup trees", without)]
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Uniform values in [lo, hi), as f32 (so the f64 oracle sees exactly what the GPU sees).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

pub fn upload(gpu: &Gpu, label: &str, shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::from_slice(gpu, label, shape, data).expect("upload")
}

pub fn zeros(gpu: &Gpu, label: &str, shape: &[usize]) -> Tensor {
    Tensor::zeros(gpu, label, shape).expect("allocate")
}

pub fn read(gpu: &Gpu, t: &Tensor) -> Vec<f32> {
    t.read::<f32>(gpu).expect("read back")
}

/// A network's parameters and batch-norm running statistics read back by state-dict name, as the
/// reference step (`reference::model::train_step[_in]`) takes them.
pub fn reference_state(
    net: &senet_wgpu::model::plan::Network,
) -> (std::collections::HashMap<String, Vec<f64>>, std::collections::HashMap<String, Vec<f64>>) {
    let gpu = &net.gpu;
    let params = net.params.iter().map(|p| (p.spec.name.clone(), to_f64(&read(gpu, &p.value)))).collect();
    let mut buffers = std::collections::HashMap::new();
    for b in &net.bn {
        buffers.insert(format!("{}.running_mean", b.name), to_f64(&read(gpu, &b.running_mean)));
        buffers.insert(format!("{}.running_var", b.name), to_f64(&read(gpu, &b.running_var)));
    }
    (params, buffers)
}

/// Run dispatches (one submit) and wait.
pub fn run(gpu: &Gpu, dispatches: &[senet_wgpu::gpu::Dispatch]) {
    let refs: Vec<&_> = dispatches.iter().collect();
    gpu.run(&refs);
    gpu.wait().expect("GPU wait");
}

/// Element-wise check |got - want| <= atol + rtol*|want|, printing the first mismatches and the
/// worst error. Returns the largest |got - want| so tests can report it.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: {} values from the GPU, {} from the reference", got.len(), want.len());
    let mut bad = 0;
    let mut worst = 0.0f64;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - w).abs();
        worst = worst.max(err);
        // A NaN on either side fails: written so that it is not "err > tol" (false for NaN).
        if err.is_nan() || err > atol + rtol * w.abs() {
            if bad < 5 {
                eprintln!("{what}[{i}]: gpu {g:.9e} reference {w:.9e} |diff| {err:.3e}");
            }
            bad += 1;
        }
    }
    assert!(
        bad == 0,
        "{what}: {bad} of {} values outside atol {atol:e} + rtol {rtol:e}; worst |diff| {worst:.3e}",
        got.len()
    );
    worst
}

/// Every tensor of a safetensors file (a PyTorch golden) as (shape, values in f64): F64, F32,
/// I64 and I32 tensors.
pub fn load_golden(path: &std::path::Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("golden file {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("golden safetensors");
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F64 => {
                    d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
                }
                safetensors::Dtype::F32 => {
                    d.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
                }
                safetensors::Dtype::I64 => {
                    d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                safetensors::Dtype::I32 => {
                    d.chunks_exact(4).map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap()))).collect()
                }
                other => panic!("golden tensor {k} has dtype {other:?}"),
            };
            (k, (v.shape().to_vec(), vals))
        })
        .collect()
}
