//! `cargo bench [--profile dev] --bench conv_3x3`: the base SENet's 3x3 convolutions (stride 1,
//! padding 1) at batch 16 through the register GEMM's 3-wide form (`--conv-3x3 on`: a kernel row's
//! three taps from one vec4 and two neighbours per quad of pixels) against its general form
//! (`--conv-3x3 off`), forward and input gradient, and the weight gradient's 3-wide walk (each
//! input value loaded once for a kernel row's three taps) against its one-tap walk, f32 (and f16
//! where the adapter has it), on the register blocks this adapter picks. After one warm-up run each, each round times both forms,
//! best of 3 runs each, alternating which goes first; the table gives the best of all rounds,
//! GFLOP/s, and the general form's time over the 3-wide form's. Arguments (after `--`): rounds
//! (default 3). Compare figures from one run only. Measured on lavapipe: docs/performance.md,
//! "3x3 convolutions a kernel row at a time".

mod common;

use senet_wgpu::gpu::{ConvForm, Gpu, GpuOptions};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvPass};

fn main() {
    let row3 = common::adapter();
    let general = Gpu::new(&GpuOptions { conv_3x3: ConvForm::Off, ..GpuOptions::default() }).expect("adapter");
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(3);
    let sq = |c_in, hw, c_out| Conv2dConfig::square(16, c_in, (hw, hw), c_out, 3, 1, 1, false);
    let layers = [
        ("features.0 3->64 32x32", sq(3, 32, 64)),
        ("features.4 64->128 16x16", sq(64, 16, 128)),
        ("features.8 128->256 8x8", sq(128, 8, 256)),
        ("features.11 256->512 8x8", sq(256, 8, 512)),
        ("features.15 512->1024 4x4", sq(512, 4, 1024)),
    ];
    for (_, cfg) in &layers {
        assert!(conv2d::row3_gemm(&row3, cfg) && !conv2d::row3_gemm(&general, cfg));
        assert!(conv2d::row3_wgrad(&row3, cfg) && !conv2d::row3_wgrad(&general, cfg));
    }
    let passes = [ConvPass::Forward, ConvPass::BackwardInput, ConvPass::BackwardWeight];
    common::form_table([("3-wide", &row3), ("general", &general)], &layers, &passes, rounds);
}
