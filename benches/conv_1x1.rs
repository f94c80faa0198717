//! `cargo bench [--profile dev] --bench conv_1x1`: 1x1 convolutions of SE-ResNet-50's shapes at
//! batch 8 through the register GEMM's 1x1 form (`--conv-1x1 on`: no window arithmetic, four
//! pixels a load) against its general form (`--conv-1x1 off`), forward and input gradient, f32
//! (and f16 where the adapter has it), on the register blocks this adapter picks. Images of 28x28,
//! 14x14 and 8x8 (H*W a multiple of 4, as the 1x1 form needs). After one warm-up run each, each
//! round times both forms, best of 3 runs each, alternating which goes first; the table gives the
//! best of all rounds, GFLOP/s, and the general form's time over the 1x1 form's. Arguments (after
//! `--`): rounds (default 3). Compare figures from one run only. Measured on lavapipe (two runs): docs/performance.md,
//! "1x1 convolutions as plain GEMMs".

mod common;

use senet_wgpu::gpu::{Conv1x1Gemm, Gpu, GpuOptions, Precision, Tensor};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles};

fn main() {
    let plain = common::adapter();
    let general = Gpu::new(&GpuOptions { conv_1x1: Conv1x1Gemm::Off, ..GpuOptions::default() }).expect("adapter");
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(3);
    let sq = |c_in, hw, c_out| Conv2dConfig::square(8, c_in, (hw, hw), c_out, 1, 1, 0, false);
    let layers = [
        ("layer1 conv1 256->64 28x28", sq(256, 28, 64)),
        ("layer1 conv3 64->256 28x28", sq(64, 28, 256)),
        ("layer2 conv1 512->128 14x14", sq(512, 14, 128)),
        ("layer3 conv3 256->1024 8x8", sq(256, 8, 1024)),
        ("layer4 conv1 2048->512 8x8", sq(2048, 8, 512)),
    ];
    let mut precisions = vec![Precision::F32];
    if plain.features.contains(wgpu::Features::SHADER_F16) {
        precisions.push(Precision::F16);
    }
    println!(
        "{:<34} {:<5} {:<8} {:>10} {:>10} {:>8} {:>8} {:>7}",
        "layer", "", "pass", "1x1 ms", "general ms", "1x1 GF/s", "gen GF/s", "ratio"
    );
    for (name, cfg) in layers {
        assert!(conv2d::plain_gemm(&plain, &cfg) && !conv2d::plain_gemm(&general, &cfg));
        for &precision in &precisions {
            for pass in [ConvPass::Forward, ConvPass::BackwardInput] {
                let record = |gpu: &Gpu| {
                    let t = |shape: &[usize]| Tensor::zeros_of(gpu, "bench", shape, precision.dtype()).expect("alloc");
                    let (x, w, y) = (t(&cfg.input_shape()), t(&cfg.weight_shape()), t(&cfg.output_shape()));
                    let b = ConvBuffers {
                        inp: Some(&x),
                        weight: Some(&w),
                        out: Some(&y),
                        dout: Some(&y),
                        dinp: Some(&x),
                        ..ConvBuffers::default()
                    };
                    let k = ConvKernel::Register(RegisterTiles::for_layer(gpu, &cfg));
                    conv2d::conv2d_pass(gpu, &cfg, pass, k, &b).expect("record")
                };
                let (dp, dg) = (record(&plain), record(&general));
                let (p, g) = common::ab_secs((&plain, &dp), (&general, &dg), rounds);
                let gf = |s: f64| 2.0 * cfg.macs() as f64 / s / 1e9;
                let pass = if pass == ConvPass::Forward { "forward" } else { "dinput" };
                println!(
                    "{name:<34} {:<5} {pass:<8} {:>10.2} {:>10.2} {:>8.2} {:>8.2} {:>7.3}",
                    precision.name(),
                    p * 1e3,
                    g * 1e3,
                    gf(p),
                    gf(g),
                    g / p
                );
            }
        }
    }
}
