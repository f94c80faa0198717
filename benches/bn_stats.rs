//! `cargo bench [--profile dev] --bench bn_stats`: a convolution and the training batch norm that
//! alone reads its output, the batch norm's statistics written by the convolution per block of its
//! output pixels and merged by the batch norm (`--bn-stats on`: `ConvBuffers::out_stats`,
//! `BatchNormConfig::partial_rows`) against the batch norm reading its input for them
//! (`--bn-stats off`). Register blocks this adapter picks, f32 (and f16 where the adapter has it),
//! base SENet layers at batch 32 and SE-ResNet-50 layers at batch 8. Each row times the
//! convolution, the batch norm and the two together (one submit), best of 3 runs per round,
//! alternating which goes first; ms and the time with over the time without. Arguments (after
//! `--`): rounds (default 3). Compare figures from one run.

mod common;

use senet_wgpu::gpu::{Dispatch, Gpu, Precision, Tensor};
use senet_wgpu::ops::batch_norm::{self, BatchNormConfig, BnForward, BnFused};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles};

fn main() {
    let gpu = common::adapter();
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(3);
    let sq = Conv2dConfig::square;
    let layers = [
        ("senet features.4 64->128 3x3 32x32 b32", sq(32, 64, (32, 32), 128, 3, 1, 1, true)),
        ("senet features.11 256->512 3x3 8x8 b32", sq(32, 256, (8, 8), 512, 3, 1, 1, true)),
        ("se-resnet50 layer1 conv1 256->64 1x1 56x56 b8", sq(8, 256, (56, 56), 64, 1, 1, 0, false)),
        ("se-resnet50 layer1 conv3 64->256 1x1 56x56 b8", sq(8, 64, (56, 56), 256, 1, 1, 0, false)),
        ("se-resnet50 layer3 conv2 256->256 3x3 14x14 b8", sq(8, 256, (14, 14), 256, 3, 1, 1, false)),
    ];
    let mut precisions = vec![Precision::F32];
    if gpu.features.contains(wgpu::Features::SHADER_F16) {
        precisions.push(Precision::F16);
    }
    println!("{:<48} {:<4} {:<10} {:>10} {:>10} {:>7}", "layer", "", "dispatch", "with ms", "without ms", "ratio");
    for (name, cfg) in layers {
        for &precision in &precisions {
            let tiles = RegisterTiles::for_layer(&gpu, &cfg);
            let t = |shape: &[usize]| Tensor::zeros_of(&gpu, "bench", shape, precision.dtype()).expect("alloc");
            let f = |shape: &[usize]| Tensor::zeros(&gpu, "bench", shape).expect("alloc");
            let (x, w, y, out) =
                (t(&cfg.input_shape()), t(&cfg.weight_shape()), t(&cfg.output_shape()), t(&cfg.output_shape()));
            let bias = f(&[cfg.c_out]);
            let [n, c, oh, ow] = cfg.output_shape();
            let bn_cfg = BatchNormConfig::new(n, c, oh, ow);
            // Statistics blocks as a plan makes them: the GEMM's rows of one invocation or of a subgroup.
            let rows = conv2d::stats_rows(&gpu, ConvKernel::Register(tiles)).expect("register rows");
            let partials = f(&bn_cfg.partials_shape(rows));
            let (gamma, beta, rm, rv, stats) = (f(&[c]), f(&[c]), f(&[c]), f(&[c]), f(&[2, c]));
            let bn = BnForward {
                inp: &y,
                gamma: &gamma,
                beta: &beta,
                running_mean: &rm,
                running_var: &rv,
                stats: &stats,
                out: &out,
            };
            let record = |with: bool| -> (Vec<Dispatch>, Vec<Dispatch>) {
                let b = cfg.bias.then_some(&bias);
                let lanes = conv2d::stats_lanes(&gpu);
                let bufs = ConvBuffers {
                    out_stats: with.then_some((&partials, lanes)),
                    ..ConvBuffers::forward(&x, &w, b, &y)
                };
                let conv = conv2d::conv2d_pass(&gpu, &cfg, ConvPass::Forward, ConvKernel::Register(tiles), &bufs)
                    .expect("record");
                let bn = if with {
                    let fused = BnFused { partials: Some(&partials), ..BnFused::default() };
                    batch_norm::batch_norm_forward_train_fused(&gpu, &bn_cfg.with_partials(rows), &bn, fused)
                } else {
                    batch_norm::batch_norm_forward_train(&gpu, &bn_cfg, &bn)
                };
                (conv, bn.expect("record"))
            };
            let ((conv_on, bn_on), (conv_off, bn_off)) = (record(true), record(false));
            let both = |a: &[Dispatch], b: &[Dispatch]| -> Vec<Dispatch> { a.iter().chain(b).cloned().collect() };
            let rows: [(&str, Vec<Dispatch>, Vec<Dispatch>); 3] = [
                ("conv", conv_on.clone(), conv_off.clone()),
                ("batch norm", bn_on.clone(), bn_off.clone()),
                ("both", both(&conv_on, &bn_on), both(&conv_off, &bn_off)),
            ];
            for (what, on, off) in rows {
                let (a, b) = common::ab_secs((&gpu as &Gpu, &on), (&gpu as &Gpu, &off), rounds);
                println!(
                    "{name:<48} {:<4} {what:<10} {:>10.2} {:>10.2} {:>7.3}",
                    precision.name(),
                    a * 1e3,
                    b * 1e3,
                    a / b
                );
            }
        }
    }
}
