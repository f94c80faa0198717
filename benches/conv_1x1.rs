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

use senet_wgpu::gpu::{ConvForm, Gpu, GpuOptions};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvPass};

fn main() {
    let plain = common::adapter();
    let general = Gpu::new(&GpuOptions { conv_1x1: ConvForm::Off, ..GpuOptions::default() }).expect("adapter");
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(3);
    let sq = |c_in, hw, c_out| Conv2dConfig::square(8, c_in, (hw, hw), c_out, 1, 1, 0, false);
    let layers = [
        ("layer1 conv1 256->64 28x28", sq(256, 28, 64)),
        ("layer1 conv3 64->256 28x28", sq(64, 28, 256)),
        ("layer2 conv1 512->128 14x14", sq(512, 14, 128)),
        ("layer3 conv3 256->1024 8x8", sq(256, 8, 1024)),
        ("layer4 conv1 2048->512 8x8", sq(2048, 8, 512)),
    ];
    for (_, cfg) in &layers {
        assert!(conv2d::plain_gemm(&plain, cfg) && !conv2d::plain_gemm(&general, cfg));
    }
    common::form_table(
        [("1x1", &plain), ("general", &general)],
        &layers,
        &[ConvPass::Forward, ConvPass::BackwardInput],
        rounds,
    );
}
