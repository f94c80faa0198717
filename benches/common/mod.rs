//! What the GPU benches share: the adapter (or exit 2 saying why there is none) and the best-of-N
//! wall-clock timer of a list of dispatches. Not a bench of its own.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Instant;

use senet_wgpu::gpu::{Dispatch, Gpu, GpuOptions};

/// The default adapter, its description printed; without one the bench exits with status 2.
pub fn adapter() -> Arc<Gpu> {
    let gpu = match Gpu::new(&GpuOptions::default()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("cargo bench needs an adapter: {e:#}");
            std::process::exit(2);
        }
    };
    println!("adapter: {}", gpu.describe());
    gpu
}

/// The fastest of `runs` submits of `d` (one submit and wait each), in seconds.
pub fn best_secs(gpu: &Gpu, d: &[Dispatch], runs: usize) -> f64 {
    let refs: Vec<&Dispatch> = d.iter().collect();
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            gpu.run(&refs);
            gpu.wait().expect("GPU");
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
