//! What the GPU benches share: the adapter (or exit 2 saying why there is none), the best-of-N
//! wall-clock timer of a list of dispatches and an A/B of two lists. Not a bench of its own.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Instant;

use senet_wgpu::gpu::{Dispatch, Gpu, GpuOptions, Precision, Tensor};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles};

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

/// A table of two register-GEMM forms of the same layers, `(name, device)` each (the devices differ
/// only in which form a layer gets): each of `passes` (the forward, the input gradient, the weight
/// gradient split as a plan splits it, with its reduce), f32 (and f16 where the adapter has it), on the register blocks the adapter
/// picks, timed by [`ab_secs`] over `rounds`; ms, GFLOP/s and the second form's time over the
/// first's.
pub fn form_table(forms: [(&str, &Gpu); 2], layers: &[(&str, Conv2dConfig)], passes: &[ConvPass], rounds: usize) {
    let [(na, a), (nb, b)] = forms;
    let mut precisions = vec![Precision::F32];
    if a.features.contains(wgpu::Features::SHADER_F16) {
        precisions.push(Precision::F16);
    }
    let (ma, mb, ga, gb) = (format!("{na} ms"), format!("{nb} ms"), format!("{na} GF/s"), format!("{nb} GF/s"));
    println!("{:<34} {:<5} {:<8} {ma:>10} {mb:>10} {ga:>9} {gb:>9} {:>7}", "layer", "", "pass", "ratio");
    for (name, cfg) in layers {
        for &precision in &precisions {
            for &pass in passes {
                let record = |gpu: &Gpu| {
                    let t = |shape: &[usize]| Tensor::zeros_of(gpu, "bench", shape, precision.dtype()).expect("alloc");
                    let (x, w, y) = (t(&cfg.input_shape()), t(&cfg.weight_shape()), t(&cfg.output_shape()));
                    // Weight gradients are f32 in every plan.
                    let dw = Tensor::zeros(gpu, "bench", &cfg.weight_shape()).expect("alloc");
                    let bufs = ConvBuffers {
                        inp: Some(&x),
                        weight: Some(&w),
                        out: Some(&y),
                        dout: Some(&y),
                        dinp: Some(&x),
                        dweight: Some(&dw),
                        ..ConvBuffers::default()
                    };
                    let k = ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg));
                    conv2d::conv2d_pass(gpu, cfg, pass, k, &bufs).expect("record")
                };
                let (da, db) = (record(a), record(b));
                let (sa, sb) = ab_secs((a, &da), (b, &db), rounds);
                let gf = |s: f64| 2.0 * cfg.macs() as f64 / s / 1e9;
                let pass = match pass {
                    ConvPass::Forward => "forward",
                    ConvPass::BackwardInput => "dinput",
                    _ => "dweight",
                };
                println!(
                    "{name:<34} {:<5} {pass:<8} {:>10.2} {:>10.2} {:>9.2} {:>9.2} {:>7.3}",
                    precision.name(),
                    sa * 1e3,
                    sb * 1e3,
                    gf(sa),
                    gf(sb),
                    sb / sa
                );
            }
        }
    }
}
