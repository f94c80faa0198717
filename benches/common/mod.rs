//! What the GPU benches share: the adapter (or exit 2 saying why there is none), the best-of-N
//! wall-clock timer of a list of dispatches and an A/B of two lists. Not a bench of its own.
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

/// Two lists of dispatches (each on its own device, which may be the same one) timed side by side:
/// one warm-up each, then `rounds` rounds of the best of 3 runs of both, alternating which goes
/// first; the best of all rounds of each, in seconds.
pub fn ab_secs(a: (&Gpu, &[Dispatch]), b: (&Gpu, &[Dispatch]), rounds: usize) -> (f64, f64) {
    best_secs(a.0, a.1, 1);
    best_secs(b.0, b.1, 1);
    let (mut ta, mut tb) = (f64::INFINITY, f64::INFINITY);
    for round in 0..rounds {
        if round % 2 == 0 {
            ta = ta.min(best_secs(a.0, a.1, 3));
            tb = tb.min(best_secs(b.0, b.1, 3));
        } else {
            tb = tb.min(best_secs(b.0, b.1, 3));
            ta = ta.min(best_secs(a.0, a.1, 3));
        }
    }
    (ta, tb)
}
