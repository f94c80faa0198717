//! `cargo bench --bench conv_groups`: grouped 3x3 convolutions in every conv kernel family the
//! adapter runs — register blocks and workgroup-memory tiles in f32 and f16, cooperative matrices
//! where listed (f16) — reported as GFLOP/s (2 x multiply-adds / time) of the forward, the input
//! gradient and the weight gradient, best of 5 after a warm-up. The layer is ResNeXt-50's
//! stage-3 grouped 3x3 at a small batch: 128 -> 128 channels in 32 groups of 4, 14x14, batch 16,
//! beside the same shape ungrouped and depthwise (128 groups). Compare figures from one run.
//! Arguments (after `--`): the group counts to run (default 32 128 1), and `register` to time the
//! register blocks alone (the other families are 10-20x slower on lavapipe).

mod common;

use senet_wgpu::gpu::{Precision, Tensor};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles, WorkgroupTiles};

fn main() {
    let gpu = common::adapter();
    let base = Conv2dConfig::square(16, 128, (14, 14), 128, 3, 1, 1, false);
    let mut precisions = vec![Precision::F32];
    if gpu.features.contains(wgpu::Features::SHADER_F16) {
        precisions.push(Precision::F16);
    }
    println!("{:<44} {:>9} {:>9} {:>9}   GFLOP/s", "layer / kernel", "forward", "dinput", "dweight");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut group_counts: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    if group_counts.is_empty() {
        group_counts = vec![32, 128, 1];
    }
    let register_only = args.iter().any(|a| a == "register");
    for groups in group_counts {
        let cfg = base.grouped(groups);
        for &precision in &precisions {
            let mut kernels = vec![ConvKernel::Register(RegisterTiles::for_layer(&gpu, &cfg))];
            if !register_only {
                kernels.push(ConvKernel::Workgroup(WorkgroupTiles::ALL[0]));
            }
            if let (Precision::F16, Some(t), false) = (precision, gpu.coop_tile, register_only) {
                kernels.push(ConvKernel::Coop(t));
            }
            let t = |shape: &[usize]| Tensor::zeros_of(&gpu, "bench", shape, precision.dtype()).expect("alloc");
            let (x, w, y) = (t(&cfg.input_shape()), t(&cfg.weight_shape()), t(&cfg.output_shape()));
            let (dx, dy) = (t(&cfg.input_shape()), t(&cfg.output_shape()));
            let dw = Tensor::zeros(&gpu, "bench dweight", &cfg.weight_shape()).expect("alloc");
            let b = ConvBuffers {
                inp: Some(&x),
                weight: Some(&w),
                bias: None,
                out: Some(&y),
                dout: Some(&dy),
                dinp: Some(&dx),
                dweight: Some(&dw),
                relu: false,
                dinp_addend: None,
                out_stats: None,
                input_affine: None,
            };
            for k in kernels {
                let gflops: Vec<String> = [ConvPass::Forward, ConvPass::BackwardInput, ConvPass::BackwardWeight]
                    .into_iter()
                    .map(|pass| match conv2d::conv2d_pass(&gpu, &cfg, pass, k, &b) {
                        Ok(d) => {
                            common::best_secs(&gpu, &d, 1); // warm-up: pipelines built, caches filled
                            format!("{:>9.3}", 2.0 * cfg.macs() as f64 / common::best_secs(&gpu, &d, 5) / 1e9)
                        }
                        Err(e) => {
                            eprintln!("{k} {pass:?}: {e:#}");
                            format!("{:>9}", "-")
                        }
                    })
                    .collect();
                let name = format!("g{groups} {precision:?} {k}");
                println!("{name:<44} {}", gflops.join(" "));
            }
        }
    }
}
