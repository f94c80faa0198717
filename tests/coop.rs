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
use senet_wgpu::gpu::tune::TuneMode;
use senet_wgpu::gpu::{Dtype, Gpu, GpuOptions, Precision, Tensor};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass};
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

/// The three GEMMs on cooperative matrices against the f64 reference of the same op names
/// (ops/conv2d/reference.rs) on the f32 kernels' cases (common::conv_cases: batch 1, odd non-square
/// planes, K and channel counts that are multiples of neither 8 nor 16, stride, dilation, padding
/// wider than the image, the 7x7/2 stem, a strided 1x1 projection, 131 output channels). Inputs
/// are f16 values in [-1, 1] (the reference reads the same values widened). Products of two f16
/// values are exact in f32 and every sum is f32, over at most 2,048 terms here (the 32x32 case's
/// weight gradient): a few 1e-6 at most against the f32 kernels' atol 1e-4 and rtol 1e-5
/// (CONV_ATOL / CONV_RTOL). The forward output and the input gradient are then rounded to f16 when
/// stored, half an ulp: 2^-11 relative, 4.9e-4 added to rtol. The weight gradient is f32 (no
/// rounding): the f32 tolerance alone, for every split count (its slices are summed in a fixed
/// order, so a repeated run is bit for bit the same).
#[test]
#[ignore = "needs an adapter with cooperative matrices: .ci/run runs it under Mesa 26's lavapipe"]
fn conv2d_passes_on_cooperative_matrices_match_reference() {
    const F16_RTOL: f64 = 4.9e-4;
    let gpu = coop_gpu();
    let _ = WHY;
    let round = |v: Vec<f32>| -> Vec<f32> { v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect() };
    let mut worst = [0.0f64; 3]; // |gpu - reference| per pass, for the log
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(3000 + i as u64);
        let x = round(uniform(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0));
        let w = round(uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0));
        let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
        let dy = round(uniform(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0));
        let (tx, tw, tb, tdy) = (
            f16_tensor(&gpu, "x", &cfg.input_shape(), &x),
            f16_tensor(&gpu, "w", &cfg.weight_shape(), &w),
            upload(&gpu, "b", &[cfg.c_out], &b),
            f16_tensor(&gpu, "dy", &cfg.output_shape(), &dy),
        );
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        let what = |pass: &str| format!("{pass} (coop {:?}) case {i} {cfg:?}", gpu.coop_tile);

        let ty = Tensor::zeros_of(&gpu, "y", &cfg.output_shape(), Dtype::F16).unwrap();
        let bias = cfg.bias.then_some(&tb);
        run(&gpu, &coop_pass(&gpu, cfg, ConvPass::Forward, &ConvBuffers::forward(&tx, &tw, bias, &ty)).unwrap());
        let want = reference::conv2d::conv2d_forward(cfg, &x64, &w64, cfg.bias.then_some(&b64[..]));
        let e =
            assert_close(&what("conv2d_forward"), &ty.read_f32(&gpu).unwrap(), &want, CONV_ATOL, CONV_RTOL + F16_RTOL);
        worst[0] = worst[0].max(e);
        // The forward's ReLU epilogue, biased (an evaluation pass's convolution with its batch
        // norm folded in): max(y, 0), exact, on the same bound.
        let folded = Conv2dConfig { bias: true, ..*cfg };
        let ty = Tensor::zeros_of(&gpu, "y", &cfg.output_shape(), Dtype::F16).unwrap();
        let bufs = ConvBuffers { relu: true, ..ConvBuffers::forward(&tx, &tw, Some(&tb), &ty) };
        run(&gpu, &coop_pass(&gpu, &folded, ConvPass::Forward, &bufs).unwrap());
        let want = reference::conv2d::conv2d_forward(&folded, &x64, &w64, Some(&b64[..]));
        let want: Vec<f64> = want.into_iter().map(|y| y.max(0.0)).collect();
        let got = ty.read_f32(&gpu).unwrap();
        assert_close(&what("conv2d_forward + relu"), &got, &want, CONV_ATOL, CONV_RTOL + F16_RTOL);

        let tdx = Tensor::zeros_of(&gpu, "dx", &cfg.input_shape(), Dtype::F16).unwrap();
        let b = ConvBuffers::backward_input(&tdy, &tw, &tdx);
        run(&gpu, &coop_pass(&gpu, cfg, ConvPass::BackwardInput, &b).unwrap());
        let want = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
        let e = assert_close(
            &what("conv2d_backward_input"),
            &tdx.read_f32(&gpu).unwrap(),
            &want,
            CONV_ATOL,
            CONV_RTOL + F16_RTOL,
        );
        worst[1] = worst[1].max(e);

        let want = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
        let planned = conv2d::splits_for(&gpu, cfg, ConvKernel::Coop(gpu.coop_tile.unwrap()));
        for splits in [1, 2, 3, planned] {
            let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
            let d = coop_weight_grad(&gpu, cfg, &ConvBuffers::backward_weight(&tx, &tdy, &tdw), splits).unwrap();
            run(&gpu, &d);
            let got = read(&gpu, &tdw);
            let e = assert_close(
                &what(&format!("conv2d_backward_weight splits {splits}")),
                &got,
                &want,
                CONV_ATOL,
                CONV_RTOL,
            );
            worst[2] = worst[2].max(e);
            // Again: the fixed-order reduction gives the same bits.
            let again = zeros(&gpu, "dw again", &cfg.weight_shape());
            run(&gpu, &coop_weight_grad(&gpu, cfg, &ConvBuffers::backward_weight(&tx, &tdy, &again), splits).unwrap());
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&read(&gpu, &again)), bits(&got), "{}: not deterministic", what("conv2d_backward_weight"));
        }
    }
    eprintln!(
        "coop GEMMs, worst |gpu - reference|: forward {:.2e}, input gradient {:.2e}, weight gradient {:.2e}",
        worst[0], worst[1], worst[2]
    );
    // Split K really runs split: 3 splits asked of case 1's 30 output pixels (2 of 16, whole
    // 8-deep K steps) write partial slices that a second dispatch reduces.
    let cfg = &conv_cases()[1];
    let (x, dy) = (zeros_f16(&gpu, "x", &cfg.input_shape()), zeros_f16(&gpu, "dy", &cfg.output_shape()));
    let dw = zeros(&gpu, "dw", &cfg.weight_shape());
    assert_eq!(coop_weight_grad(&gpu, cfg, &ConvBuffers::backward_weight(&x, &dy, &dw), 3).unwrap().len(), 2);
    // f32 operands are refused by each pass (cooperative matrices here take f16).
    let (x, w, y) = (
        zeros(&gpu, "x", &cfg.input_shape()),
        zeros(&gpu, "w", &cfg.weight_shape()),
        zeros(&gpu, "y", &cfg.output_shape()),
    );
    let errs = [
        coop_pass(&gpu, cfg, ConvPass::Forward, &ConvBuffers::forward(&x, &w, None, &y)).unwrap_err(),
        coop_pass(&gpu, cfg, ConvPass::BackwardInput, &ConvBuffers::backward_input(&y, &w, &x)).unwrap_err(),
        coop_weight_grad(&gpu, cfg, &ConvBuffers::backward_weight(&x, &y, &w), 1).unwrap_err(),
    ];
    for e in errs {
        let e = e.to_string();
        assert!(e.contains("f16"), "{e}");
    }
}

/// The input gradient with an addend (`ConvBuffers::dinp_addend`: a plan's fork sum fused into
/// the first reader's backward) on cooperative matrices, on every case: against the f64
/// reference and bit for bit against the input gradient stored apart plus `add::add_forward`
/// (tolerances: common::check_conv_backward_input_accumulate).
#[test]
#[ignore = "needs an adapter with cooperative matrices: .ci/run runs it under Mesa 26's lavapipe"]
fn conv2d_backward_input_accumulate_on_cooperative_matrices_matches_reference() {
    let gpu = coop_gpu();
    let k = ConvKernel::Coop(gpu.coop_tile.expect("coop_gpu lists a cooperative matrix"));
    for (i, cfg) in conv_cases().iter().enumerate() {
        check_conv_backward_input_accumulate(&gpu, Dtype::F16, i, cfg, &[k]);
    }
}

/// A whole f16 training step of a residual network on cooperative matrices (the f16 plan's
/// built-in choice here), fused (`--fuse on`: every fork's gradient sum inside its first reader's
/// input gradient, no separate addition) against `--fuse off`: the loss and every gradient bit
/// for bit (the fused store rounds as the unfused addition does; ResNet-8 has no SE block, whose
/// fused tail rounds differently in f16).
#[test]
#[ignore = "needs an adapter with cooperative matrices: .ci/run runs it under Mesa 26's lavapipe"]
fn a_fused_f16_residual_step_on_cooperative_matrices_equals_the_unfused_one() {
    let (on, off) = (coop_gpu(), gpu_unfused());
    let n = 3;
    let cfg = small_model("resnet8", 0.5, 4, 8, 4);
    let x = uniform(&mut rng(41), n * 3 * 8 * 8, 0.0, 1.0);
    let labels = [0u32, 3, 1];
    let step = |g: &std::sync::Arc<Gpu>| {
        let opt = OptimizerConfig::sgd(0.0, 0.0);
        let mut net = Network::new_in(g.clone(), cfg.clone(), opt, 5, Precision::F16).unwrap();
        let plan = net.plan(n).unwrap();
        let kernels: Vec<String> = net.train_dispatches(&plan).iter().map(|d| d.label.to_string()).collect();
        plan.write_batch(g, &x, &labels).unwrap();
        net.train_step(&plan);
        g.wait().unwrap();
        let mut bits = vec![read(g, &plan.train_result)[result::LOSS].to_bits()];
        for p in &net.params {
            bits.extend(read_as(g, &p.grad).iter().map(|v| v.to_bits()));
        }
        (kernels, bits)
    };
    let ((k_on, on_bits), (k_off, off_bits)) = (step(&on), step(&off));
    assert!(k_on.iter().any(|k| k == "conv2d_backward_input (coop)"), "the fused plan runs coop input gradients");
    assert_eq!(k_on.iter().filter(|k| *k == "add_forward").count(), 0, "fork sums left in the fused plan");
    assert!(k_off.iter().any(|k| k == "add_forward"), "the unfused plan sums its forks apart");
    let differ = on_bits.iter().zip(&off_bits).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} loss and gradient values differ fused vs unfused", on_bits.len());
}

/// One pass on this adapter's cooperative matrices (`conv2d::conv2d_pass` with `ConvKernel::Coop`).
fn coop_pass(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    pass: ConvPass,
    b: &ConvBuffers<'_>,
) -> anyhow::Result<Vec<senet_wgpu::gpu::Dispatch>> {
    let k = ConvKernel::Coop(gpu.coop_tile.expect("coop_gpu lists a cooperative matrix"));
    conv2d::conv2d_pass(gpu, cfg, pass, k, b)
}

/// The weight gradient on cooperative matrices, split `splits` ways.
fn coop_weight_grad(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    b: &ConvBuffers<'_>,
    splits: usize,
) -> anyhow::Result<Vec<senet_wgpu::gpu::Dispatch>> {
    let k = ConvKernel::Coop(gpu.coop_tile.expect("coop_gpu lists a cooperative matrix"));
    conv2d::conv2d_backward_weight_split(gpu, cfg, k, b, splits)
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
        block: Default::default(),
    }
}

/// A whole f16 step whose convolutions run all three GEMMs on cooperative matrices (the f16 plan's
/// built-in choice where the adapter lists them; the weight gradients split over K, the first
/// layer's 2,048 pixels 8 ways) equals the reference that emulates f16 storage, with the
/// tolerances of tests/train_step.rs's f16 test: every gradient tensor within 2e-2 in L2 norm and
/// the median within 2e-3 (an activation gradient rounded to f16 on the other side of a tie in
/// one sum moves what follows by an f16 ulp, 2^-11 = 4.9e-4 relative, and a few such flips
/// through the backward pass compound), the loss within 1e-4 relative (f32 sums of f16 logits).
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
    for (pass, convs) in [(ConvPass::Forward, 5), (ConvPass::BackwardInput, 4), (ConvPass::BackwardWeight, 5)] {
        let coop = plan.conv_kernels.iter().filter(|(_, p, k)| *p == pass && matches!(k, ConvKernel::Coop(_)));
        assert_eq!(coop.count(), convs, "every conv's {pass:?} on cooperative matrices: {:?}", plan.conv_kernels);
    }
    let first = ConvKernel::Coop(gpu.coop_tile.unwrap());
    let stem = Conv2dConfig::square(n, 3, (16, 16), 4, 3, 1, 1, true);
    assert!(conv2d::splits_for(&gpu, &stem, first) > 1, "the step should exercise a split weight gradient");
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

/// The tuner times an f16 plan's candidates in f16, cooperative matrices among them: fully tuned,
/// every conv pass of the tiny SENet is timed under a key that names the precision and the tile
/// (" f16 coop8"), the coop GEMM was built for all three passes, and no f32 convolution kernel
/// was built at all (before, the tuner timed f32 kernels for f16 plans and never timed coop).
#[test]
#[ignore = "needs an adapter with cooperative matrices: .ci/run runs it under Mesa 26's lavapipe"]
fn the_tuner_times_an_f16_plan_in_f16_with_cooperative_matrices() {
    let t = coop_gpu().coop_tile.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("tune.json");
    let opts = GpuOptions { tune: Some(TuneMode::Full), tune_cache: Some(cache.clone()), ..Default::default() };
    let gpu = Gpu::new(&opts).unwrap();
    let net = Network::new_in(gpu.clone(), tiny(5), OptimizerConfig::adam(1e-3), 0, Precision::F16).unwrap();
    let plan = net.plan(2).unwrap();
    let s = gpu.tuner.summary();
    assert_eq!((s.timed, s.cached), (14, 0), "{s:?}");
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    let keys: Vec<String> =
        file["devices"].as_object().unwrap().values().flat_map(|d| d.as_object().unwrap().keys().cloned()).collect();
    assert_eq!(keys.len(), 14);
    let suffix = format!(" f16 coop{t}");
    assert!(keys.iter().all(|k| k.ends_with(&suffix)), "keys without {suffix:?}: {keys:?}");
    let built = gpu.built_pipelines();
    for mode in 0..3 {
        let coop = format!(
            "conv2d_coop::conv2d_gemm_coop:f16[(\"WG\", {}.0), (\"MODE\", {mode}.0)]",
            gpu.info.subgroup_max_size
        );
        assert!(built.contains(&coop), "{coop} was not built (timed): {built:?}");
    }
    let f32_conv: Vec<_> = built.iter().filter(|k| k.starts_with("conv2d") && k.contains(":f32")).collect();
    assert!(f32_conv.is_empty(), "an f16 plan's tuner built f32 conv kernels: {f32_conv:?}");
    eprintln!(
        "tuned f16 coop plan: {:?}",
        plan.conv_kernels.iter().map(|(l, p, k)| format!("{l} {p:?} {k}")).collect::<Vec<_>>()
    );
}
