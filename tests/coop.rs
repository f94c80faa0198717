//! The cooperative-matrix kernels (f16 plans on adapters that list a square f16 -> f32
//! configuration) against the f64 reference. No adapter of the usual test machine has them (Mesa
//! 22's lavapipe), so these tests are ignored in a plain `cargo test` and run by `.ci/run` under
//! Mesa 26's lavapipe (`scripts/mesa26.sh`, 8x8x8 tiles):
//!
//!     eval "$(sh scripts/mesa26.sh ~/.cache/senet-wgpu/mesa26)"
//!     cargo test --test coop -- --ignored
//!
//! Run anywhere else, they fail saying the adapter has no cooperative matrices: never a pass by
//! skipping.

mod common;

use common::*;
use senet_wgpu::gpu::{Dtype, Gpu, Precision, Tensor};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvKernel, ConvPass};
use senet_wgpu::ops::cross_entropy::result;
use senet_wgpu::ops::optimizer::OptimizerConfig;
use senet_wgpu::reference;

const WHY: &str = "needs an adapter with cooperative matrices: .ci/run runs it under Mesa 26's lavapipe";

fn coop_gpu() -> std::sync::Arc<Gpu> {
    let g = gpu();
    assert!(
        g.coop_tile.is_some(),
        "{} lists no square f16 -> f32 cooperative matrix: run these tests under Mesa 26 (scripts/mesa26.sh)",
        g.describe()
    );
    g
}

fn f16_tensor(gpu: &Gpu, label: &str, shape: &[usize], v: &[f32]) -> Tensor {
    let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
    Tensor::from_slice(gpu, label, shape, &h).expect("upload f16")
}

/// Awkward shapes for 2T x 2T blocks and CT-deep K steps: batch 1, odd non-square planes, K and
/// channel counts that are multiples of neither 8 nor 16, stride, dilation, padding wider than
/// the image, the 7x7/2 stem, a strided 1x1 projection, 131 output channels.
fn cases() -> Vec<Conv2dConfig> {
    let sq = Conv2dConfig::square;
    vec![
        sq(1, 3, (7, 5), 5, 3, 1, 1, true),
        sq(2, 5, (9, 6), 7, 3, 2, 1, false),
        sq(3, 4, (8, 8), 6, 1, 1, 0, true),
        Conv2dConfig {
            n: 2,
            c_in: 3,
            h: 11,
            w: 7,
            c_out: 9,
            kh: 5,
            kw: 3,
            stride: (2, 1),
            pad: (2, 0),
            dilation: (1, 2),
            bias: true,
        },
        Conv2dConfig {
            n: 2,
            c_in: 5,
            h: 4,
            w: 3,
            c_out: 10,
            kh: 3,
            kw: 3,
            stride: (1, 2),
            pad: (3, 3),
            dilation: (2, 3),
            bias: false,
        },
        sq(2, 70, (5, 7), 131, 3, 1, 1, true),
        sq(2, 3, (23, 19), 9, 7, 2, 3, false),
        sq(3, 33, (9, 9), 65, 1, 2, 0, false),
    ]
}

/// The forward GEMM on cooperative matrices. Products of f16 values are exact in f32 and the sums
/// are f32 over K <= 630 terms in [-1, 1] (~1e-5), then the output rounds to f16 (2^-11
/// relative): atol 1e-4, rtol 1e-5 + 4.9e-4, as the f16 register kernels' test.
#[test]
#[ignore = "needs an adapter with cooperative matrices: .ci/run runs it under Mesa 26's lavapipe"]
fn conv2d_forward_on_cooperative_matrices_matches_reference() {
    let gpu = coop_gpu();
    let _ = WHY;
    for (i, cfg) in cases().iter().enumerate() {
        let mut r = rng(3000 + i as u64);
        let round = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
        let x = round(uniform(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0));
        let w = round(uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0));
        let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
        let (tx, tw, tb) = (
            f16_tensor(&gpu, "x", &cfg.input_shape(), &x),
            f16_tensor(&gpu, "w", &cfg.weight_shape(), &w),
            upload(&gpu, "b", &[cfg.c_out], &b),
        );
        let ty = Tensor::zeros_of(&gpu, "y", &cfg.output_shape(), Dtype::F16).unwrap();
        let bias = cfg.bias.then_some(&tb);
        run(&gpu, &conv2d::conv2d_forward_coop(&gpu, cfg, &tx, &tw, bias, &ty).unwrap());
        let b64 = to_f64(&b);
        let want = reference::conv2d::conv2d_forward(cfg, &to_f64(&x), &to_f64(&w), cfg.bias.then_some(&b64[..]));
        let what = format!("conv2d_forward (coop {:?}) case {i} {cfg:?}", gpu.coop_tile);
        assert_close(&what, &ty.read_f32(&gpu).unwrap(), &want, 1e-4, 1e-5 + 4.9e-4);
    }
    // f32 operands are refused (cooperative matrices here take f16).
    let cfg = &cases()[0];
    let (x, w) = (zeros(&gpu, "x", &cfg.input_shape()), zeros(&gpu, "w", &cfg.weight_shape()));
    let (b, y) = (zeros(&gpu, "b", &[cfg.c_out]), zeros(&gpu, "y", &cfg.output_shape()));
    let err = conv2d::conv2d_forward_coop(&gpu, cfg, &x, &w, Some(&b), &y).unwrap_err().to_string();
    assert!(err.contains("f16"), "{err}");
}

fn tiny(classes: usize) -> ModelConfig {
    ModelConfig {
        model: "senet".into(),
        width: 1.0 / 16.0,
        reduction: 16,
        in_channels: 3,
        num_classes: classes,
        input_hw: [16, 16],
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
    }
}

/// A whole f16 step whose convolutions run forward on cooperative matrices equals the reference
/// that emulates f16 storage, with the tolerances of tests/train_step.rs's f16 test (every
/// gradient tensor within 2e-2 in L2 norm, the median within 2e-3, the loss within 1e-4).
#[test]
#[ignore = "needs an adapter with cooperative matrices: .ci/run runs it under Mesa 26's lavapipe"]
fn an_f16_step_on_cooperative_matrices_matches_the_f16_reference() {
    let gpu = coop_gpu();
    let n = 8;
    let cfg = tiny(5);
    let mut r = rng(31);
    let x = uniform(&mut r, n * 3 * 16 * 16, 0.0, 1.0);
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 5).collect();
    let mut net = Network::new_in(gpu.clone(), cfg, OptimizerConfig::sgd(0.0, 0.0), 5, Precision::F16).unwrap();
    let plan = net.plan(n).unwrap();
    let coop: Vec<_> = plan
        .conv_kernels
        .iter()
        .filter(|(_, p, k)| *p == ConvPass::Forward && matches!(k, ConvKernel::Coop(_)))
        .collect();
    assert_eq!(coop.len(), 5, "every conv's forward on cooperative matrices: {:?}", plan.conv_kernels);
    let scale = f64::from(net.scaler.as_ref().unwrap().read(&gpu).unwrap().scale);
    let (params, buffers) = reference_state(&net);
    let want =
        reference::model::train_step_in(&net.graph, &params, &buffers, n, &to_f64(&x), &labels, Precision::F16, scale)
            .unwrap();
    let want32 = reference::model::train_step(&net.graph, &params, &buffers, n, &to_f64(&x), &labels).unwrap();
    plan.write_batch(&gpu, &x, &labels).unwrap();
    net.train_step(&plan);
    let loss = f64::from(read(&gpu, &plan.train_result)[result::LOSS]);
    assert!((loss - want.loss).abs() < 1e-4 * want.loss, "loss {loss} vs the f16 reference {}", want.loss);
    let mut errs = Vec::new();
    for p in &net.params {
        let w = &want.grads[&p.spec.name];
        let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
        if want32.grads[&p.spec.name].iter().map(|v| v * v).sum::<f64>().sqrt() < 1e-5 {
            continue; // a conv bias before a BN: zero but for rounding, so no relative size
        }
        let got = read(&gpu, &p.grad);
        let diff = w.iter().zip(&got).map(|(a, &b)| (a - f64::from(b) / scale).powi(2)).sum::<f64>().sqrt();
        let e = diff / norm;
        assert!(e < 2e-2, "gradient of {} off by {e:.2e} (L2, relative) from the f16 reference", p.spec.name);
        errs.push(e);
    }
    errs.sort_by(f64::total_cmp);
    assert!(errs[errs.len() / 2] < 2e-3, "median gradient error {:.2e}", errs[errs.len() / 2]);
    eprintln!("coop f16 step: median gradient error {:.2e}, worst {:.2e}", errs[errs.len() / 2], errs[errs.len() - 1]);
}
