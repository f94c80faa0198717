//! `cargo bench`: the conv2d kernels and whole training steps at small sizes, for regressions.
//! A harness of our own (no criterion): each case is timed over repeated submits after a warm-up
//! and reported as the median with min and max, in milliseconds. Compare figures from one run.

mod common;

use std::time::Instant;

use senet_wgpu::gpu::{Dispatch, Gpu, Tensor};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles};
use senet_wgpu::ops::optimizer::OptimizerConfig;

fn time(gpu: &Gpu, name: &str, reps: usize, mut f: impl FnMut()) {
    f();
    gpu.wait().expect("GPU");
    let mut ms: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            gpu.wait().expect("GPU");
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!("{name:<48} median {:>9.3} ms  min {:>9.3}  max {:>9.3}", ms[ms.len() / 2], ms[0], ms[ms.len() - 1]);
}

fn main() {
    let gpu = common::adapter();
    let reps = 7;
    for cfg in [
        Conv2dConfig::square(8, 16, (16, 16), 32, 3, 1, 1, true),
        Conv2dConfig::square(8, 64, (8, 8), 128, 3, 1, 1, true),
    ] {
        let t = |shape: &[usize]| Tensor::zeros(&gpu, "bench", shape).expect("alloc");
        let (x, w, b, y) = (t(&cfg.input_shape()), t(&cfg.weight_shape()), t(&[cfg.c_out]), t(&cfg.output_shape()));
        let (dx, dw) = (t(&cfg.input_shape()), t(&cfg.weight_shape()));
        let tag = format!("{}x{}x{}x{} -> {}", cfg.n, cfg.c_in, cfg.h, cfg.w, cfg.c_out);
        // The register blocks this adapter picks for the layer; the weight gradient split for ~256
        // workgroups, as on a CPU adapter.
        let tiles = RegisterTiles::for_layer(&gpu, &cfg);
        let k = ConvKernel::Register(tiles);
        let pass = |pass, b: ConvBuffers<'_>| conv2d::conv2d_pass(&gpu, &cfg, pass, k, &b).expect("plan");
        let splits = conv2d::weight_grad_splits(&cfg, tiles, 256);
        let cases: [(&str, Vec<Dispatch>); 3] = [
            ("conv2d_forward", pass(ConvPass::Forward, ConvBuffers::forward(&x, &w, Some(&b), &y))),
            ("conv2d_backward_input", pass(ConvPass::BackwardInput, ConvBuffers::backward_input(&y, &w, &dx))),
            (
                "conv2d_backward_weight",
                conv2d::conv2d_backward_weight_split(&gpu, &cfg, k, &ConvBuffers::backward_weight(&x, &y, &dw), splits)
                    .expect("plan"),
            ),
        ];
        for (name, d) in &cases {
            let refs: Vec<&Dispatch> = d.iter().collect();
            time(&gpu, &format!("{name} {tag}"), reps, || {
                gpu.run(&refs);
            });
        }
    }
    for (model, width, hw, n) in [("senet", 0.25, 32, 16), ("se-resnet20", 1.0, 32, 16)] {
        let cfg = ModelConfig {
            model: model.into(),
            width,
            reduction: 16,
            in_channels: 3,
            num_classes: 10,
            input_hw: [hw, hw],
            classes: vec![],
            normalize: None,
            se_bias: false,
            se: Default::default(),
            block: Default::default(),
        };
        let mut net = Network::new(gpu.clone(), cfg, OptimizerConfig::adam(1e-3), 0).expect("network");
        let plan = net.plan(n).expect("plan");
        let images = vec![0.5f32; n * 3 * hw * hw];
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
        plan.write_batch(&gpu, &images, &labels).expect("batch");
        time(&gpu, &format!("train step {model} width {width} batch {n}"), reps, || {
            net.train_step(&plan);
        });
    }
}
