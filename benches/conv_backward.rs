//! `cargo bench [--profile dev] --bench conv_backward`: a convolution's input and weight gradients as two
//! dispatches (`BackwardInput`, `BackwardWeight`) against one (`conv2d::conv2d_backward_joint`,
//! what `--fuse on` records), on the register blocks this adapter picks, f32, for the base
//! SENet's 3x3 layers at width 1 (batch 32) and two SE-ResNet-50 layers (batch 8). Each round
//! times both forms, best of 3 runs each, alternating which goes first; the table gives the best
//! of all rounds and the joint time over the separate one. Arguments (after `--`): rounds
//! (default 3). Compare figures from one run. Measured on lavapipe (dev profile, 2 cores, one run
//! each): joint / separate 1.88, 1.59, 1.60 and 1.75 for the four layers with the input gradient's
//! workgroups all before the weight gradient's (lavapipe gives each thread one contiguous run of a
//! dispatch's workgroups, so one thread did most of the work), 1.00, 1.01, 1.07 and 1.03 with the
//! two interleaved (`joint_slot`), the weight gradient walking a kernel row at a time where its
//! own pass does and both blocks entered unconditionally.

mod common;

use senet_wgpu::gpu::Tensor;
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles};

fn main() {
    let gpu = common::adapter();
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(3);
    let sq = Conv2dConfig::square;
    let layers = [
        ("senet features.4  64->128 3x3 32x32 b32", sq(32, 64, (32, 32), 128, 3, 1, 1, true)),
        ("senet features.11 256->512 3x3 8x8 b32", sq(32, 256, (8, 8), 512, 3, 1, 1, true)),
        ("se-resnet50 layer1 conv1 256->64 1x1 56x56 b8", sq(8, 256, (56, 56), 64, 1, 1, 0, false)),
        ("se-resnet50 layer4 conv2 512->512 3x3 7x7 b8", sq(8, 512, (7, 7), 512, 3, 1, 1, false)),
    ];
    println!("{:<48} {:>12} {:>12} {:>7}", "layer", "separate ms", "joint ms", "ratio");
    for (name, cfg) in layers {
        let tiles = RegisterTiles::for_layer(&gpu, &cfg);
        let k = ConvKernel::Register(tiles);
        let t = |shape: &[usize]| Tensor::zeros(&gpu, "bench", shape).expect("alloc");
        let (x, w, dy) = (t(&cfg.input_shape()), t(&cfg.weight_shape()), t(&cfg.output_shape()));
        let (dx, dw) = (t(&cfg.input_shape()), t(&cfg.weight_shape()));
        let b = ConvBuffers {
            inp: Some(&x),
            weight: Some(&w),
            dout: Some(&dy),
            dinp: Some(&dx),
            dweight: Some(&dw),
            ..ConvBuffers::default()
        };
        let mut separate = conv2d::conv2d_pass(&gpu, &cfg, ConvPass::BackwardInput, k, &b).expect("record");
        separate.extend(conv2d::conv2d_pass(&gpu, &cfg, ConvPass::BackwardWeight, k, &b).expect("record"));
        let splits = conv2d::splits_for(&gpu, &cfg, k);
        let joint = conv2d::conv2d_backward_joint(&gpu, &cfg, ConvKernel::Register(tiles), &b, splits).expect("record");
        // After a warm-up run each (every pipeline built).
        let (s, j) = common::ab_secs((&gpu, &separate), (&gpu, &joint), rounds);
        println!("{name:<48} {:>12.2} {:>12.2} {:>7.3}", s * 1e3, j * 1e3, j / s);
    }
}
