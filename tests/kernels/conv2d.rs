//! `conv2d`: the register-block and workgroup-memory kernels, every pass, f32 and f16.

use crate::common::*;
use crate::{F16_RTOL, gpu_f16, read_f16, uniform_f16, upload_f16};
use senet_wgpu::gpu::{Dispatch, Dtype, Gpu, Tensor};
use senet_wgpu::ops::conv2d::{self, Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles, WorkgroupTiles};
use senet_wgpu::reference;

/// One pass through `conv2d::conv2d_pass` (the weight gradient through its split entry), given
/// only the buffers that pass uses.
fn forward(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    k: ConvKernel,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    y: &Tensor,
) -> Vec<Dispatch> {
    conv2d::conv2d_pass(gpu, cfg, ConvPass::Forward, k, &ConvBuffers::forward(x, w, b, y)).unwrap()
}

fn try_forward(gpu: &Gpu, cfg: &Conv2dConfig, x: &Tensor, w: &Tensor, y: &Tensor) -> anyhow::Result<Vec<Dispatch>> {
    let k = ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg));
    conv2d::conv2d_pass(gpu, cfg, ConvPass::Forward, k, &ConvBuffers::forward(x, w, None, y))
}

fn backward_input(gpu: &Gpu, cfg: &Conv2dConfig, k: ConvKernel, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Vec<Dispatch> {
    conv2d::conv2d_pass(gpu, cfg, ConvPass::BackwardInput, k, &ConvBuffers::backward_input(dy, w, dx)).unwrap()
}

fn backward_weight(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    k: ConvKernel,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    splits: usize,
) -> Vec<Dispatch> {
    conv2d::conv2d_backward_weight_split(gpu, cfg, k, &ConvBuffers::backward_weight(x, dy, dw), splits).unwrap()
}

/// The `Workgroup` kernels (`conv2d_tiled.wgsl`, every `WorkgroupTiles` shape) on every case, all
/// three GEMMs, the weight gradient unsplit and split 3 and 7 ways; tolerances common::CONV_ATOL /
/// CONV_RTOL (the same sums in another order).
#[test]
fn conv2d_workgroup_kernels_match_reference() {
    let gpu = gpu();
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(400 + i as u64);
        let x = uniform(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let w = uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
        let dy = uniform(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0);
        let (tx, tw, tb) = (
            upload(&gpu, "x", &cfg.input_shape(), &x),
            upload(&gpu, "w", &cfg.weight_shape(), &w),
            upload(&gpu, "b", &[cfg.c_out], &b),
        );
        let tdy = upload(&gpu, "dy", &cfg.output_shape(), &dy);
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        let want_y = reference::conv2d::conv2d_forward(cfg, &x64, &w64, cfg.bias.then_some(&b64[..]));
        let want_dx = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
        let want_dw = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
        for tiles in WorkgroupTiles::ALL {
            let what = |pass: &str| format!("{pass} (workgroup) case {i} {tiles:?} {cfg:?}");
            let k = ConvKernel::Workgroup(tiles);
            let ty = zeros(&gpu, "y", &cfg.output_shape());
            run(&gpu, &forward(&gpu, cfg, k, &tx, &tw, cfg.bias.then_some(&tb), &ty));
            assert_close(&what("conv2d_forward"), &read(&gpu, &ty), &want_y, CONV_ATOL, CONV_RTOL);
            let tdx = zeros(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, k, &tdy, &tw, &tdx));
            assert_close(&what("conv2d_backward_input"), &read(&gpu, &tdx), &want_dx, CONV_ATOL, CONV_RTOL);
            for splits in [1, 3, 7] {
                let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
                run(&gpu, &backward_weight(&gpu, cfg, k, &tx, &tdy, &tdw, splits));
                let what = what(&format!("conv2d_backward_weight splits {splits}"));
                assert_close(&what, &read(&gpu, &tdw), &want_dw, CONV_ATOL, CONV_RTOL);
            }
        }
    }
}

/// The workgroup kernels number a strided input gradient's columns by stride phase and skip the
/// K loop of a tile whose columns no tap reaches (conv2d_tiled.wgsl's `tile_live`). Layers where
/// such phases are most of the pixels and come first or last: 1x1 stride 2 with padding 1 (only
/// phase (1, 1) is reached, after three dead ones), 1x1 stride (3, 2) on odd planes (one phase of
/// six), batch 1; against the reference on every tile shape (CONV_ATOL / CONV_RTOL), and with an
/// addend (which a skipped tile still stores) against the reference and, bit for bit, the input
/// gradient stored apart plus `add_forward` (f32 and f16).
#[test]
fn conv2d_workgroup_strided_input_gradients_skip_unreached_phases() {
    let gpu = gpu_f16();
    let cases = [
        Conv2dConfig::square(2, 6, (9, 7), 5, 1, 2, 1, false),
        Conv2dConfig { stride: (3, 2), ..Conv2dConfig::square(1, 4, (11, 9), 8, 1, 1, 0, false) },
        Conv2dConfig::square(3, 16, (17, 15), 24, 1, 2, 0, false),
    ];
    for (i, cfg) in cases.iter().enumerate() {
        let mut r = rng(950 + i as u64);
        let w = uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let dy = uniform(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0);
        let (tw, tdy) = (upload(&gpu, "w", &cfg.weight_shape(), &w), upload(&gpu, "dy", &cfg.output_shape(), &dy));
        let want = reference::conv2d::conv2d_backward_input(cfg, &to_f64(&dy), &to_f64(&w));
        let kernels: Vec<ConvKernel> = WorkgroupTiles::ALL.into_iter().map(ConvKernel::Workgroup).collect();
        for &k in &kernels {
            let tdx = zeros(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, k, &tdy, &tw, &tdx));
            let what = format!("conv2d_backward_input (workgroup) case {i} {k} {cfg:?}");
            assert_close(&what, &read(&gpu, &tdx), &want, CONV_ATOL, CONV_RTOL);
        }
        for dtype in [Dtype::F32, Dtype::F16] {
            check_conv_backward_input_accumulate(&gpu, dtype, 60 + i, cfg, &kernels);
        }
    }
}

/// `got` (the batch norm applied on load) against `want` (on its stored output): bit for bit on a
/// CPU adapter; on a GPU within the conv tolerances, as a driver may contract (x − mean)·scale + beta
/// into an FMA in one kernel and not in the other (one rounding, which then moves a sum's last bits).
fn same_or_close(what: &str, got: &[f32], want: &[f32], bitwise: bool) {
    if bitwise {
        let differ = got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{what}: {differ} of {} values differ from the stored output's", got.len());
    } else {
        assert_close(what, got, &to_f64(want), CONV_ATOL, CONV_RTOL);
    }
}

/// A training batch norm and its ReLU applied by the workgroup kernels as the forward and the
/// weight gradient load its input (`ConvBuffers::input_affine`, conv2d_tiled.wgsl's `affine_in`,
/// `--bn-apply`): on every case (batch 1, odd and non-square planes, stride, dilation, groups,
/// depthwise), every tile shape in f32 and two in f16, the forward and the weight gradient (unsplit and
/// split 3 ways) of the batch norm's input with the batch norm applied equal those of the output
/// the batch norm stores, bit for bit (on a GPU within the conv tolerances: `same_or_close`): the
/// loads compute its expression and rounding, and the padding stays 0 (not the batch norm of 0).
/// The kernels without it refuse it.
#[test]
fn conv2d_workgroup_kernels_apply_a_batch_norm_as_they_load() {
    use senet_wgpu::ops::batch_norm::{self, BatchNormConfig, BnAffine, BnForward};
    let gpu = gpu_f16();
    for dtype in [Dtype::F32, Dtype::F16] {
        for (i, cfg) in conv_cases().iter().enumerate() {
            let mut r = rng(900 + i as u64);
            let numel = |s: &[usize]| s.iter().product::<usize>();
            let (z, _) =
                upload_as(&gpu, dtype, &cfg.input_shape(), &uniform(&mut r, numel(&cfg.input_shape()), -2.0, 2.0));
            let (tw, _) =
                upload_as(&gpu, dtype, &cfg.weight_shape(), &uniform(&mut r, numel(&cfg.weight_shape()), -1.0, 1.0));
            let (tdy, _) =
                upload_as(&gpu, dtype, &cfg.output_shape(), &uniform(&mut r, numel(&cfg.output_shape()), -1.0, 1.0));
            let tb = upload(&gpu, "b", &[cfg.c_out], &uniform(&mut r, cfg.c_out, -1.0, 1.0));
            let c = cfg.c_in;
            let gamma = upload(&gpu, "gamma", &[c], &uniform(&mut r, c, -1.5, 1.5));
            let beta = upload(&gpu, "beta", &[c], &uniform(&mut r, c, -0.5, 0.5));
            let (rm, rv) = (zeros(&gpu, "running mean", &[c]), upload(&gpu, "running var", &[c], &vec![1.0; c]));
            let stats = zeros(&gpu, "stats", &[2, c]);
            let y = Tensor::zeros_of(&gpu, "bn output", &cfg.input_shape(), dtype).unwrap();
            let [n, _, h, w] = cfg.input_shape();
            let t = BnForward {
                inp: &z,
                gamma: &gamma,
                beta: &beta,
                running_mean: &rm,
                running_var: &rv,
                stats: &stats,
                out: &y,
            };
            run(
                &gpu,
                &batch_norm::batch_norm_forward_train(&gpu, &BatchNormConfig::new(n, c, h, w).with_relu(), &t).unwrap(),
            );
            let affine = BnAffine { stats: &stats, gamma: &gamma, beta: &beta };
            // f16 on two tile shapes (its loads are the same code).
            let shapes = if dtype == Dtype::F32 { &WorkgroupTiles::ALL[..] } else { &WorkgroupTiles::ALL[4..] };
            for &tiles in shapes {
                let what =
                    |pass: &str| format!("{pass} (workgroup, batch norm on load) {dtype:?} case {i} {tiles:?} {cfg:?}");
                let k = ConvKernel::Workgroup(tiles);
                let bits = |t: &Tensor| read_as(&gpu, t);
                let out = |applied: bool| {
                    let ty = Tensor::zeros_of(&gpu, "y", &cfg.output_shape(), dtype).unwrap();
                    let b = ConvBuffers {
                        input_affine: applied.then_some(affine),
                        ..ConvBuffers::forward(if applied { &z } else { &y }, &tw, cfg.bias.then_some(&tb), &ty)
                    };
                    run(&gpu, &conv2d::conv2d_pass(&gpu, cfg, ConvPass::Forward, k, &b).unwrap());
                    bits(&ty)
                };
                same_or_close(&what("conv2d_forward"), &out(true), &out(false), gpu.is_cpu());
                for splits in [1, 3] {
                    let dw = |applied: bool| {
                        let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
                        let b = ConvBuffers {
                            input_affine: applied.then_some(affine),
                            ..ConvBuffers::backward_weight(if applied { &z } else { &y }, &tdy, &tdw)
                        };
                        run(&gpu, &conv2d::conv2d_backward_weight_split(&gpu, cfg, k, &b, splits).unwrap());
                        bits(&tdw)
                    };
                    let what = what(&format!("conv2d_backward_weight splits {splits}"));
                    same_or_close(&what, &dw(true), &dw(false), gpu.is_cpu());
                }
            }
            if dtype == Dtype::F32 {
                let k = ConvKernel::Register(RegisterTiles::for_layer(&gpu, cfg));
                let ty = zeros(&gpu, "y", &cfg.output_shape());
                let bias = cfg.bias.then_some(&tb);
                let b = ConvBuffers { input_affine: Some(affine), ..ConvBuffers::forward(&z, &tw, bias, &ty) };
                let Err(e) = conv2d::conv2d_pass(&gpu, cfg, ConvPass::Forward, k, &b) else {
                    panic!("case {i}: the register kernels took a batch norm to apply");
                };
                assert!(format!("{e:#}").contains("only the workgroup tiles"), "{e:#}");
            }
        }
    }
}

/// Both gradients in one dispatch of the workgroup tiles (`conv2d::conv2d_backward_joint` with
/// `ConvKernel::Workgroup`, conv2d_tiled.wgsl's MODE 3, what a `--fuse on` plan runs on a GPU where
/// both passes chose one tile shape): on every case (batch 1, odd and non-square planes, stride,
/// dilation, groups, depthwise, a single output pixel), every tile shape in f32 and two in f16,
/// bit for bit the input gradient and weight gradient the two passes store apart with the same
/// options — plain and unsplit; with the addend and split 3 ways; with the addend, the batch norm
/// applied to the weight gradient's input and the plan's own split — each tile being the
/// workgroup its own pass runs. One dispatch, then the reduce where split; the plain f32 results
/// within the conv tolerances of the f64 reference. The register kernels' joint backward refuses a
/// batch norm to apply; the cooperative matrices have no joint form.
#[test]
fn conv2d_workgroup_joint_backward_is_the_two_passes_bit_for_bit() {
    use senet_wgpu::ops::batch_norm::BnAffine;
    let gpu = gpu_f16();
    for dtype in [Dtype::F32, Dtype::F16] {
        for (i, cfg) in conv_cases().iter().enumerate() {
            let mut r = rng(2700 + i as u64);
            let mut up =
                |shape: &[usize]| upload_as(&gpu, dtype, shape, &uniform(&mut r, shape.iter().product(), -1.0, 1.0));
            let ((tx, x), (tw, w)) = (up(&cfg.input_shape()), up(&cfg.weight_shape()));
            let ((tdy, dy), (tadd, _)) = (up(&cfg.output_shape()), up(&cfg.input_shape()));
            let c = cfg.c_in;
            let mut f32s = |n: usize, lo: f32, hi: f32| uniform(&mut r, n, lo, hi);
            let (mean, invstd) = (f32s(c, -0.5, 0.5), f32s(c, 0.5, 2.0));
            let stats = upload(&gpu, "stats", &[2, c], &[mean, invstd].concat());
            let gamma = upload(&gpu, "gamma", &[c], &f32s(c, -1.5, 1.5));
            let beta = upload(&gpu, "beta", &[c], &f32s(c, -0.5, 0.5));
            let affine = BnAffine { stats: &stats, gamma: &gamma, beta: &beta };
            let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
            let want_dx = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
            let want_dw = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
            let zeros_dx = || Tensor::zeros_of(&gpu, "dx", &cfg.input_shape(), dtype).expect("allocate");
            let shapes = if dtype == Dtype::F32 { &WorkgroupTiles::ALL[..] } else { &WorkgroupTiles::ALL[4..] };
            for &tiles in shapes {
                let k = ConvKernel::Workgroup(tiles);
                let options = [
                    (None, 1, None),
                    (Some(&tadd), 3, None),
                    (Some(&tadd), conv2d::splits_for(&gpu, cfg, k), Some(affine)),
                ];
                for (addend, splits, affine) in options {
                    let what = format!(
                        "{} conv2d_backward (workgroup) case {i} {tiles:?} splits {splits} addend {} affine {} {cfg:?}",
                        dtype.name(),
                        addend.is_some(),
                        affine.is_some()
                    );
                    let (jdx, jdw) = (zeros_dx(), zeros(&gpu, "dw", &cfg.weight_shape()));
                    let joint = ConvBuffers {
                        inp: Some(&tx),
                        dweight: Some(&jdw),
                        dinp_addend: addend,
                        input_affine: affine,
                        ..ConvBuffers::backward_input(&tdy, &tw, &jdx)
                    };
                    let d = conv2d::conv2d_backward_joint(&gpu, cfg, k, &joint, splits).unwrap();
                    assert_eq!(d[0].label, "conv2d_backward (workgroup)", "{what}");
                    assert!(d.len() == 1 || (d.len() == 2 && splits > 1), "{what}: one dispatch, then the reduce");
                    run(&gpu, &d);

                    let (sdx, sdw) = (zeros_dx(), zeros(&gpu, "dw", &cfg.weight_shape()));
                    let input = ConvBuffers { dinp_addend: addend, ..ConvBuffers::backward_input(&tdy, &tw, &sdx) };
                    let mut d = conv2d::conv2d_pass(&gpu, cfg, ConvPass::BackwardInput, k, &input).unwrap();
                    let weight = ConvBuffers { input_affine: affine, ..ConvBuffers::backward_weight(&tx, &tdy, &sdw) };
                    d.extend(conv2d::conv2d_backward_weight_split(&gpu, cfg, k, &weight, splits).unwrap());
                    run(&gpu, &d);

                    let (got_dx, got_dw) = (read_as(&gpu, &jdx), read(&gpu, &jdw));
                    assert_bits(&format!("{what} dinp"), &got_dx, &read_as(&gpu, &sdx));
                    assert_bits(&format!("{what} dweight"), &got_dw, &read(&gpu, &sdw));
                    if dtype == Dtype::F32 && addend.is_none() {
                        assert_close(&format!("{what} dinp"), &got_dx, &want_dx, CONV_ATOL, CONV_RTOL);
                        assert_close(&format!("{what} dweight"), &got_dw, &want_dw, CONV_ATOL, CONV_RTOL);
                    }
                }
            }
            if dtype == Dtype::F32 {
                let (dx, dw) = (zeros_dx(), zeros(&gpu, "dw", &cfg.weight_shape()));
                let b = ConvBuffers {
                    inp: Some(&tx),
                    dweight: Some(&dw),
                    input_affine: Some(affine),
                    ..ConvBuffers::backward_input(&tdy, &tw, &dx)
                };
                let k = ConvKernel::Register(RegisterTiles::for_layer(&gpu, cfg));
                let Err(e) = conv2d::conv2d_backward_joint(&gpu, cfg, k, &b, 1) else {
                    panic!("case {i}: the register kernels' joint backward took a batch norm to apply");
                };
                assert!(format!("{e:#}").contains("only the workgroup tiles"), "{e:#}");
                let b = ConvBuffers { input_affine: None, ..b };
                assert!(
                    conv2d::conv2d_backward_joint(&gpu, cfg, ConvKernel::Coop(8), &b, 1).is_err(),
                    "case {i}: coop joint"
                );
            }
        }
    }
}

/// The joint backward's grid past one row of the adapter's workgroups per dimension (65,535 on
/// every adapter this runs on): a 1x1 layer of one channel over 2,048 x 2,047 pixels gives the
/// 64-column tiles 65,504 input-gradient tiles (one row's worth, as the pass apart needs) and the
/// weight gradient 64 or more (its K split: 128 under llvmpipe's loop cap), so the joint grid is two
/// rows, the second part-filled with the
/// last weight-gradient tiles. Bit for bit the two passes apart, and the input gradient within the
/// conv tolerances of the reference (each value one product).
#[test]
fn conv2d_workgroup_joint_backward_numbers_workgroups_past_one_grid_row() {
    let gpu = gpu();
    let cfg = Conv2dConfig::square(1, 1, (2048, 2047), 1, 1, 1, 0, false);
    let tiles = WorkgroupTiles::ALL[0];
    let mut r = rng(2800);
    let mut up = |shape: [usize; 4]| {
        let v = uniform(&mut r, shape.iter().product(), -1.0, 1.0);
        (upload(&gpu, "t", &shape, &v), v)
    };
    let ((tx, _), (tw, w), (tdy, dy)) = (up(cfg.input_shape()), up(cfg.weight_shape()), up(cfg.output_shape()));
    let k = ConvKernel::Workgroup(tiles);
    let splits = conv2d::splits_for(&gpu, &cfg, k);
    let (jdx, jdw) = (zeros(&gpu, "dx", &cfg.input_shape()), zeros(&gpu, "dw", &cfg.weight_shape()));
    let joint = ConvBuffers { inp: Some(&tx), dweight: Some(&jdw), ..ConvBuffers::backward_input(&tdy, &tw, &jdx) };
    let d = conv2d::conv2d_backward_joint(&gpu, &cfg, k, &joint, splits).unwrap();
    assert_eq!(d[0].workgroups, [65535, 2, 1], "the joint grid");
    run(&gpu, &d);
    let (sdx, sdw) = (zeros(&gpu, "dx", &cfg.input_shape()), zeros(&gpu, "dw", &cfg.weight_shape()));
    let mut d = backward_input(&gpu, &cfg, k, &tdy, &tw, &sdx);
    d.extend(backward_weight(&gpu, &cfg, k, &tx, &tdy, &sdw, splits));
    run(&gpu, &d);
    let got_dx = read(&gpu, &jdx);
    assert_bits("dinp past one grid row", &got_dx, &read(&gpu, &sdx));
    assert_bits("dweight past one grid row", &read(&gpu, &jdw), &read(&gpu, &sdw));
    let want_dx = reference::conv2d::conv2d_backward_input(&cfg, &to_f64(&dy), &to_f64(&w));
    assert_close("dinp past one grid row", &got_dx, &want_dx, CONV_ATOL, CONV_RTOL);
}

/// Weight gradients whose K (the batch's output pixels) runs far past what one invocation of
/// llvmpipe may loop (`Gpu::loop_cap`: 65,535 iterations between all its loops; past it every loop
/// ends, silently): with all-ones inputs each weight is a count of pixels, exact in f32, and on
/// every kernel that reaches lavapipe — the register kernels with shared loads (the default) and
/// with their own (`--conv-lanes off`), the 3-wide walk and its one-tap form, their joint backward,
/// the workgroup tiles with 16- and 8-deep K steps and their joint backward, f32 and (register)
/// f16 — the launch splits
/// K so that none comes back partial, whatever split it is asked for (1 here). Layers: one-pixel-wide
/// rows (the most iterations per pixel), 65,280 pixels (past what the tiles sum unsplit), a 3x3
/// layer at batch 128 on 32x32 (131,072 pixels), a strided 1x1 layer. Unsplit, the register kernels summed 61,681 of the 3x3 layer's
/// 131,072 pixels and the tiles 58,255 of 65,280 (a 1x1 layer) on lavapipe.
#[test]
fn conv2d_weight_gradients_sum_every_pixel_under_the_drivers_loop_cap() {
    let cases = [
        Conv2dConfig::square(4, 2, (40_000, 1), 3, 1, 1, 0, false),
        // 65,280 pixels: one split's worth of the cap, past what the tiles summed unsplit.
        Conv2dConfig::square(1, 2, (256, 255), 3, 1, 1, 0, false),
        Conv2dConfig::square(128, 2, (32, 32), 3, 3, 1, 1, false),
        Conv2dConfig::square(8, 3, (256, 256), 2, 1, 2, 0, false),
    ];
    let devices =
        [("default", gpu_f16()), ("--conv-lanes off", gpu_without_lanes()), ("--conv-3x3 off", gpu_without_row3())];
    for (i, cfg) in cases.iter().enumerate() {
        let numel = |s: [usize; 4]| s.iter().product::<usize>();
        let want = reference::conv2d::conv2d_backward_weight(
            cfg,
            &vec![1.0; numel(cfg.input_shape())],
            &vec![1.0; numel(cfg.output_shape())],
        );
        for (name, gpu) in &devices {
            let gpu: &Gpu = gpu;
            let mut kernels = vec![ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg))];
            if *name == "default" {
                // The 16-deep and the 8-deep K steps (the most loop iterations per pixel).
                kernels.extend([WorkgroupTiles::ALL[0], WorkgroupTiles::ALL[5]].map(ConvKernel::Workgroup));
            }
            let dtypes: &[Dtype] = if *name == "default" { &[Dtype::F32, Dtype::F16] } else { &[Dtype::F32] };
            for &dtype in dtypes {
                let ones = |shape: [usize; 4]| upload_as(gpu, dtype, &shape, &vec![1.0; numel(shape)]).0;
                let (tx, tdy, tw) = (ones(cfg.input_shape()), ones(cfg.output_shape()), ones(cfg.weight_shape()));
                for &k in kernels.iter().filter(|k| dtype == Dtype::F32 || matches!(k, ConvKernel::Register(_))) {
                    let what = format!("case {i} {name} {} {k}", dtype.name());
                    let dw = zeros(gpu, "dw", &cfg.weight_shape());
                    run(
                        gpu,
                        &conv2d::conv2d_backward_weight_split(
                            gpu,
                            cfg,
                            k,
                            &ConvBuffers::backward_weight(&tx, &tdy, &dw),
                            1,
                        )
                        .unwrap(),
                    );
                    assert_close(&format!("{what} dweight"), &read(gpu, &dw), &want, 0.0, 0.0);
                    let (dx, jdw) = (
                        Tensor::zeros_of(gpu, "dx", &cfg.input_shape(), dtype).unwrap(),
                        zeros(gpu, "dw", &cfg.weight_shape()),
                    );
                    let b = ConvBuffers {
                        inp: Some(&tx),
                        dweight: Some(&jdw),
                        ..ConvBuffers::backward_input(&tdy, &tw, &dx)
                    };
                    run(gpu, &conv2d::conv2d_backward_joint(gpu, cfg, k, &b, 1).unwrap());
                    assert_close(&format!("{what} joint dweight"), &read(gpu, &jdw), &want, 0.0, 0.0);
                }
            }
        }
    }
}

/// Every case runs with every register-block shape (`RegisterTiles::ALL`: 4, 8 or 16 pixels x 8
/// or 16 channels per forward / input-gradient invocation, 4, 8 or 16 input channels x 8 or 16
/// output channels per weight-gradient invocation; each GEMM's block once, as only its own fields
/// reach its pipeline), so the shape an adapter picks is always a tested one.
/// `RegisterTiles::ALL` once per forward / input-gradient block (the weight-gradient fields fixed).
fn gemm_blocks() -> impl Iterator<Item = RegisterTiles> {
    RegisterTiles::ALL.into_iter().filter(|t| (t.wgrad_ci, t.wgrad_n) == (4, 8))
}

/// `RegisterTiles::ALL` once per weight-gradient block (the GEMM fields fixed).
fn wgrad_blocks() -> impl Iterator<Item = RegisterTiles> {
    RegisterTiles::ALL.into_iter().filter(|t| (t.gemm_m, t.gemm_n) == (4, 8))
}

#[test]
fn conv2d_register_forward_matches_reference() {
    let gpu = gpu();
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(100 + i as u64);
        let x = uniform(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let w = uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
        let tx = upload(&gpu, "x", &cfg.input_shape(), &x);
        let tw = upload(&gpu, "w", &cfg.weight_shape(), &w);
        let tb = upload(&gpu, "b", &[cfg.c_out], &b);
        let bias = to_f64(&b);
        let want = reference::conv2d::conv2d_forward(cfg, &to_f64(&x), &to_f64(&w), cfg.bias.then_some(&bias[..]));
        for tiles in gemm_blocks() {
            let ty = zeros(&gpu, "y", &cfg.output_shape());
            let d = forward(&gpu, cfg, ConvKernel::Register(tiles), &tx, &tw, cfg.bias.then_some(&tb), &ty);
            run(&gpu, &d);
            let what = format!("conv2d_forward case {i} {tiles:?} {cfg:?}");
            assert_close(&what, &read(&gpu, &ty), &want, CONV_ATOL, CONV_RTOL);
        }
    }
}

#[test]
fn conv2d_register_backward_matches_reference() {
    let gpu = gpu();
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(200 + i as u64);
        let x = uniform(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let w = uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let dy = uniform(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0);
        let tx = upload(&gpu, "x", &cfg.input_shape(), &x);
        let tw = upload(&gpu, "w", &cfg.weight_shape(), &w);
        let tdy = upload(&gpu, "dy", &cfg.output_shape(), &dy);
        let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));

        let want = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
        for tiles in gemm_blocks() {
            let tdx = zeros(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, ConvKernel::Register(tiles), &tdy, &tw, &tdx));
            let what = format!("conv2d_backward_input case {i} {tiles:?}");
            assert_close(&what, &read(&gpu, &tdx), &want, CONV_ATOL, CONV_RTOL);
        }

        // The weight gradient unsplit, split as the planner would, and split an odd number of ways.
        let want = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
        for tiles in wgrad_blocks() {
            for splits in [1, conv2d::weight_grad_splits(cfg, tiles, 4096), 3, 7] {
                let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
                run(&gpu, &backward_weight(&gpu, cfg, ConvKernel::Register(tiles), &tx, &tdy, &tdw, splits));
                let what = format!("conv2d_backward_weight case {i} {tiles:?} splits {splits}");
                assert_close(&what, &read(&gpu, &tdw), &want, CONV_ATOL, CONV_RTOL);
            }
        }

        if cfg.bias {
            // A reduction: on both paths.
            let want = reference::conv2d::conv2d_backward_bias(cfg, &dy64);
            for (path, g) in gpus() {
                let tdy = upload(&g, "dy", &cfg.output_shape(), &dy);
                let tdb = zeros(&g, "db", &[cfg.c_out]);
                run(&g, &conv2d::conv2d_backward_bias(&g, cfg, &tdy, &tdb).unwrap());
                let what = format!("conv2d_backward_bias case {i} ({path})");
                assert_close(&what, &read(&g, &tdb), &want, CONV_ATOL, CONV_RTOL);
            }
        }
    }
}

#[test]
fn conv2d_rejects_mismatched_shapes() {
    let gpu = gpu();
    let cfg = Conv2dConfig::square(2, 3, (8, 8), 4, 3, 1, 1, false);
    let x = zeros(&gpu, "x", &[2, 3, 8, 9]);
    let w = zeros(&gpu, "w", &cfg.weight_shape());
    let y = zeros(&gpu, "y", &cfg.output_shape());
    let err = try_forward(&gpu, &cfg, &x, &w, &y).unwrap_err().to_string();
    assert!(err.contains("conv2d input") && err.contains("[2, 3, 8, 8]") && err.contains("[2, 3, 8, 9]"), "{err}");
    let too_big = Conv2dConfig::square(1, 1, (2, 2), 1, 5, 1, 0, false);
    assert!(too_big.validate().unwrap_err().to_string().contains("does not fit"));
    // Groups must divide both channel counts; a grouped weight is [out, in/groups, k, k].
    for (groups, c_out) in [(2, 5), (3, 6), (0, 4)] {
        let bad = Conv2dConfig::square(1, 4, (5, 5), c_out, 3, 1, 1, false).grouped(groups);
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains(&format!("groups = {groups} must divide")), "{err}");
    }
    let grouped = Conv2dConfig::square(1, 4, (5, 5), 6, 3, 1, 1, false).grouped(2);
    let (x, y) = (zeros(&gpu, "x", &grouped.input_shape()), zeros(&gpu, "y", &grouped.output_shape()));
    let ungrouped_w = zeros(&gpu, "w", &[6, 4, 3, 3]);
    let err = try_forward(&gpu, &grouped, &x, &ungrouped_w, &y).unwrap_err().to_string();
    assert!(err.contains("conv2d weight") && err.contains("[6, 2, 3, 3]"), "{err}");
}

#[test]
fn f16_conv2d_kernels_match_reference() {
    let gpu = gpu_f16();
    for (i, cfg) in conv_cases().iter().enumerate() {
        let mut r = rng(1600 + i as u64);
        let x = uniform_f16(&mut r, cfg.input_shape().iter().product(), -1.0, 1.0);
        let w = uniform_f16(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0);
        let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
        let dy = uniform_f16(&mut r, cfg.output_shape().iter().product(), -1.0, 1.0);
        let (tx, tw, tdy) = (
            upload_f16(&gpu, "x", &cfg.input_shape(), &x),
            upload_f16(&gpu, "w", &cfg.weight_shape(), &w),
            upload_f16(&gpu, "dy", &cfg.output_shape(), &dy),
        );
        let tb = upload(&gpu, "b", &[cfg.c_out], &b);
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        let want_y = reference::conv2d::conv2d_forward(cfg, &x64, &w64, cfg.bias.then_some(&b64[..]));
        let want_dx = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
        let want_dw = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
        let bias = cfg.bias.then_some(&tb);
        // The register blocks the adapter picks and the extremes; every workgroup-memory shape.
        let mut tiles = vec![
            RegisterTiles::for_layer(&gpu, cfg),
            RegisterTiles::ALL[0],
            RegisterTiles::ALL[RegisterTiles::ALL.len() - 1],
        ];
        tiles.dedup();
        for t in tiles {
            let what = |pass: &str| format!("f16 {pass} case {i} {t:?} {cfg:?}");
            let ty = zeros_f16(&gpu, "y", &cfg.output_shape());
            run(&gpu, &forward(&gpu, cfg, ConvKernel::Register(t), &tx, &tw, bias, &ty));
            assert_close(&what("conv2d_forward"), &read_f16(&gpu, &ty), &want_y, CONV_ATOL, CONV_RTOL + F16_RTOL);
            let tdx = zeros_f16(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, ConvKernel::Register(t), &tdy, &tw, &tdx));
            let got = read_f16(&gpu, &tdx);
            assert_close(&what("conv2d_backward_input"), &got, &want_dx, CONV_ATOL, CONV_RTOL + F16_RTOL);
            for splits in [1, 3] {
                let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
                run(&gpu, &backward_weight(&gpu, cfg, ConvKernel::Register(t), &tx, &tdy, &tdw, splits));
                let what = what(&format!("conv2d_backward_weight splits {splits}"));
                assert_close(&what, &read(&gpu, &tdw), &want_dw, CONV_ATOL, CONV_RTOL);
            }
        }
        for t in WorkgroupTiles::ALL {
            let what = |pass: &str| format!("f16 {pass} (workgroup) case {i} {t:?}");
            let ty = zeros_f16(&gpu, "y", &cfg.output_shape());
            run(&gpu, &forward(&gpu, cfg, ConvKernel::Workgroup(t), &tx, &tw, bias, &ty));
            assert_close(&what("conv2d_forward"), &read_f16(&gpu, &ty), &want_y, CONV_ATOL, CONV_RTOL + F16_RTOL);
            let tdx = zeros_f16(&gpu, "dx", &cfg.input_shape());
            run(&gpu, &backward_input(&gpu, cfg, ConvKernel::Workgroup(t), &tdy, &tw, &tdx));
            let got = read_f16(&gpu, &tdx);
            assert_close(&what("conv2d_backward_input"), &got, &want_dx, CONV_ATOL, CONV_RTOL + F16_RTOL);
            let tdw = zeros(&gpu, "dw", &cfg.weight_shape());
            run(&gpu, &backward_weight(&gpu, cfg, ConvKernel::Workgroup(t), &tx, &tdy, &tdw, 3));
            assert_close(&what("conv2d_backward_weight"), &read(&gpu, &tdw), &want_dw, CONV_ATOL, CONV_RTOL);
        }
        if cfg.bias {
            let want = reference::conv2d::conv2d_backward_bias(cfg, &dy64);
            for (path, g) in gpus() {
                let tdy = upload_f16(&g, "dy", &cfg.output_shape(), &dy);
                let tdb = zeros(&g, "db", &[cfg.c_out]);
                run(&g, &conv2d::conv2d_backward_bias(&g, cfg, &tdy, &tdb).unwrap());
                assert_close(
                    &format!("f16 conv2d_backward_bias case {i} ({path})"),
                    &read(&g, &tdb),
                    &want,
                    CONV_ATOL,
                    CONV_RTOL,
                );
            }
        }
    }
}

/// The forward's ReLU epilogue (`ConvBuffers::relu`, what an evaluation pass with a batch norm
/// folded in runs: always with a bias, the folded one) on every case, biased, f32 and f16: the
/// register blocks the adapter picks and the extremes, every workgroup-memory shape. Reference:
/// max(conv2d_forward, 0), the conv tolerances (+ half an f16 ulp for f16 outputs); the max is
/// exact, so a missing ReLU is off by |y| ~ O(1) on the negative half of the outputs.
#[test]
fn conv2d_forward_relu_epilogue_matches_reference() {
    for (dtype, gpu) in [(Dtype::F32, gpu()), (Dtype::F16, gpu_f16())] {
        for (i, cfg) in conv_cases().iter().enumerate() {
            let cfg = Conv2dConfig { bias: true, ..*cfg };
            let mut r = rng(1900 + i as u64);
            let (tx, x) = upload_as(
                &gpu,
                dtype,
                &cfg.input_shape(),
                &uniform(&mut r, cfg.n * cfg.c_in * cfg.h * cfg.w, -1.0, 1.0),
            );
            let (tw, w) = upload_as(
                &gpu,
                dtype,
                &cfg.weight_shape(),
                &uniform(&mut r, cfg.weight_shape().iter().product(), -1.0, 1.0),
            );
            let b = uniform(&mut r, cfg.c_out, -1.0, 1.0);
            let tb = upload(&gpu, "b", &[cfg.c_out], &b);
            let want: Vec<f64> = reference::conv2d::conv2d_forward(&cfg, &to_f64(&x), &to_f64(&w), Some(&to_f64(&b)))
                .into_iter()
                .map(|y| y.max(0.0))
                .collect();
            assert!(want.contains(&0.0), "case {i}: no negative output to clip");
            let rtol = if dtype == Dtype::F16 { CONV_RTOL + F16_RTOL } else { CONV_RTOL };
            let mut kernels = vec![
                ConvKernel::Register(RegisterTiles::for_layer(&gpu, &cfg)),
                ConvKernel::Register(RegisterTiles::ALL[0]),
                ConvKernel::Register(RegisterTiles::ALL[RegisterTiles::ALL.len() - 1]),
            ];
            kernels.extend(WorkgroupTiles::ALL.map(ConvKernel::Workgroup));
            for k in kernels {
                let ty = Tensor::zeros_of(&gpu, "y", &cfg.output_shape(), dtype).unwrap();
                let bufs = ConvBuffers { relu: true, ..ConvBuffers::forward(&tx, &tw, Some(&tb), &ty) };
                run(&gpu, &conv2d::conv2d_pass(&gpu, &cfg, ConvPass::Forward, k, &bufs).unwrap());
                let what = format!("{} conv2d_forward + relu case {i} {k} {cfg:?}", dtype.name());
                assert_close(&what, &read_as(&gpu, &ty), &want, CONV_ATOL, rtol);
            }
        }
    }
}

/// The input gradient with an addend (`ConvBuffers::dinp_addend`, what a plan's first reader of a
/// forked activation runs under `--fuse on`) on every case, f32 and f16, in every family this
/// adapter offers: the register blocks the adapter picks and the extremes, every workgroup-memory
/// shape, and in f16 the cooperative matrices where the adapter lists them (under Mesa 26's
/// lavapipe; tests/coop.rs checks them there in CI). Tolerances and the bitwise check against the
/// unfused composition: common::check_conv_backward_input_accumulate.
#[test]
fn conv2d_backward_input_accumulate_matches_reference() {
    for (dtype, gpu) in [(Dtype::F32, gpu()), (Dtype::F16, gpu_f16())] {
        for (i, cfg) in conv_cases().iter().enumerate() {
            let mut kernels = vec![
                ConvKernel::Register(RegisterTiles::for_layer(&gpu, cfg)),
                ConvKernel::Register(RegisterTiles::ALL[0]),
                ConvKernel::Register(RegisterTiles::ALL[RegisterTiles::ALL.len() - 1]),
            ];
            kernels.dedup();
            kernels.extend(WorkgroupTiles::ALL.map(ConvKernel::Workgroup));
            if let (Dtype::F16, Some(t)) = (dtype, gpu.coop_tile) {
                kernels.push(ConvKernel::Coop(t));
            }
            check_conv_backward_input_accumulate(&gpu, dtype, i, cfg, &kernels);
        }
    }
}

/// An addend that is not the input gradient's shape, type or a buffer of its own is an error
/// naming it, in every family.
#[test]
fn conv2d_backward_input_rejects_a_wrong_addend() {
    let gpu = gpu_f16();
    let cfg = Conv2dConfig::square(2, 3, (5, 4), 4, 3, 1, 1, false);
    let (dy, w, dx) = (
        zeros(&gpu, "dy", &cfg.output_shape()),
        zeros(&gpu, "w", &cfg.weight_shape()),
        zeros(&gpu, "dx", &cfg.input_shape()),
    );
    let wrong_shape = zeros(&gpu, "wrong shape", &[2, 3, 5, 5]);
    let wrong_type = zeros_f16(&gpu, "wrong type", &cfg.input_shape());
    let kernels =
        [ConvKernel::Register(RegisterTiles::for_layer(&gpu, &cfg)), ConvKernel::Workgroup(WorkgroupTiles::ALL[0])];
    for k in kernels {
        let with = |a: &Tensor, dx: &Tensor| {
            let b = ConvBuffers { dinp_addend: Some(a), ..ConvBuffers::backward_input(&dy, &w, dx) };
            conv2d::conv2d_pass(&gpu, &cfg, ConvPass::BackwardInput, k, &b).unwrap_err().to_string()
        };
        let err = with(&wrong_shape, &dx);
        assert!(err.contains("conv2d dinp addend") && err.contains("[2, 3, 5, 4]"), "{k}: {err}");
        let err = with(&wrong_type, &dx);
        assert!(err.contains("wrong type") && err.contains("f16") && err.contains("f32"), "{k}: {err}");
        let err = with(&dx, &dx);
        assert!(err.contains("own buffer"), "{k}: {err}");
    }
}

/// The f16 input gradient's addend path rounds the own gradient before the sum exactly as a
/// store to f16 does (the shader prelude's `act_rounded`), on the values where a rounding can go
/// wrong: a 1x1 convolution from 1 to 2 channels with weights 1.5 and 0.125 makes each own
/// gradient one exact f32 product of two f16 values — ties at every magnitude (odd last mantissa
/// bits times 1.5), the f16 subnormals and their ties (k·2^-24 times 1.5), values below half the
/// smallest subnormal (times 0.125), the largest finite f16 and overflow to infinity. Against the
/// same composition on the CPU (`half`: round to nearest even), bit for bit: f16(f32(f16(own)) +
/// addend), in every family this adapter offers.
#[test]
fn f16_backward_input_addend_rounds_as_a_store() {
    let gpu = gpu_f16();
    let tiny = 2f32.powi(-24);
    let mut dy: Vec<f32> = vec![
        1.0 + 2f32.powi(-10),
        -(1.0 + 3.0 * 2f32.powi(-10)),
        2.0 + 2f32.powi(-9),
        1000.0 + 0.5,
        65504.0,
        -43690.0,
        43712.0,
        2f32.powi(-14) * (1.0 + 2f32.powi(-10)),
        2f32.powi(-14),
        tiny,
        -3.0 * tiny,
        5.0 * tiny,
        1023.0 * tiny,
        0.0,
        -0.0,
        0.1,
        -7.3,
    ];
    dy.extend(uniform(&mut rng(2300), 15, -4.0, 4.0));
    let dy: Vec<f32> = dy.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    let len = dy.len();
    let cfg = Conv2dConfig::square(1, 2, (1, len), 1, 1, 1, 0, false);
    let w = [1.5f32, 0.125];
    let mut add = vec![0.0f32; len];
    add.extend(uniform(&mut rng(2301), len, -2.0, 2.0));
    let (tdy, tw) = (upload_f16(&gpu, "dy", &cfg.output_shape(), &dy), upload_f16(&gpu, "w", &cfg.weight_shape(), &w));
    let tadd = upload_f16(&gpu, "addend", &cfg.input_shape(), &add);
    let add: Vec<f32> = add.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
    let want: Vec<f32> = (0..2 * len)
        .map(|i| {
            let own = half::f16::from_f32(dy[i % len] * w[i / len]).to_f32();
            half::f16::from_f32(own + add[i]).to_f32()
        })
        .collect();
    let mut kernels = vec![
        ConvKernel::Register(RegisterTiles::for_layer(&gpu, &cfg)),
        ConvKernel::Register(RegisterTiles::ALL[0]),
        ConvKernel::Workgroup(WorkgroupTiles::ALL[0]),
    ];
    if let Some(t) = gpu.coop_tile {
        kernels.push(ConvKernel::Coop(t));
    }
    for k in kernels {
        let tdx = zeros_f16(&gpu, "dx", &cfg.input_shape());
        let b = ConvBuffers { dinp_addend: Some(&tadd), ..ConvBuffers::backward_input(&tdy, &tw, &tdx) };
        run(&gpu, &conv2d::conv2d_pass(&gpu, &cfg, ConvPass::BackwardInput, k, &b).unwrap());
        let got = read_f16(&gpu, &tdx);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits(),
                "{k}: element {i} (own {} x {}, addend {}): gpu {g:e}, want {w:e}",
                dy[i % len],
                [1.5, 0.125][i / len],
                add[i]
            );
        }
    }
}

/// Both gradients in one dispatch (`conv2d::conv2d_backward_joint`, what a `--fuse on` plan runs
/// where the register blocks run both) on every case, f32 and f16, with and without the input
/// gradient's addend, the weight gradient unsplit, split 3 ways and as the planner would: bit for
/// bit the `BackwardInput` and `BackwardWeight` passes of the same blocks (each joint block is the
/// invocation those would run), and the weight gradient (and the f32 input gradient without an
/// addend) within the conv tolerances of the f64 reference. Block pairs: the adapter's, and the
/// smallest GEMM block with the largest weight-gradient block and the reverse — a joint dispatch's
/// two GEMMs keep their own shapes, so the workgroup numbering must not assume they agree.
#[test]
fn conv2d_backward_joint_is_the_two_passes_bit_for_bit() {
    for (dtype, gpu) in [(Dtype::F32, gpu()), (Dtype::F16, gpu_f16())] {
        for (i, cfg) in conv_cases().iter().enumerate() {
            let mut r = rng(2500 + i as u64);
            let mut up =
                |shape: [usize; 4]| upload_as(&gpu, dtype, &shape, &uniform(&mut r, shape.iter().product(), -1.0, 1.0));
            let ((tx, x), (tw, w)) = (up(cfg.input_shape()), up(cfg.weight_shape()));
            let ((tdy, dy), (tadd, _)) = (up(cfg.output_shape()), up(cfg.input_shape()));
            let (x64, w64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&dy));
            let want_dx = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
            let want_dw = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
            let (small, large) = (RegisterTiles::ALL[0], RegisterTiles::ALL[RegisterTiles::ALL.len() - 1]);
            let pairs = [
                RegisterTiles::for_layer(&gpu, cfg),
                RegisterTiles { wgrad_ci: large.wgrad_ci, wgrad_n: large.wgrad_n, ..small },
                RegisterTiles { wgrad_ci: small.wgrad_ci, wgrad_n: small.wgrad_n, ..large },
            ];
            let zeros_dx = || Tensor::zeros_of(&gpu, "dx", &cfg.input_shape(), dtype).expect("allocate");
            for tiles in pairs {
                let k = ConvKernel::Register(tiles);
                for addend in [None, Some(&tadd)] {
                    for splits in [1, 3, conv2d::splits_for(&gpu, cfg, k)] {
                        let what = format!(
                            "{} conv2d_backward case {i} {tiles:?} splits {splits} addend {} {cfg:?}",
                            dtype.name(),
                            addend.is_some()
                        );
                        let (jdx, jdw) = (zeros_dx(), zeros(&gpu, "dw", &cfg.weight_shape()));
                        let bufs = ConvBuffers {
                            dinp_addend: addend,
                            ..ConvBuffers { inp: Some(&tx), ..ConvBuffers::backward_input(&tdy, &tw, &jdx) }
                        };
                        let joint = ConvBuffers { dweight: Some(&jdw), ..bufs };
                        let d = conv2d::conv2d_backward_joint(&gpu, cfg, k, &joint, splits).unwrap();
                        assert!(
                            d[0].label == "conv2d_backward" && d.len() <= 2,
                            "{what}: one dispatch, then the reduce"
                        );
                        run(&gpu, &d);

                        let (sdx, sdw) = (zeros_dx(), zeros(&gpu, "dw", &cfg.weight_shape()));
                        let input = ConvBuffers { dinp_addend: addend, ..ConvBuffers::backward_input(&tdy, &tw, &sdx) };
                        let mut d = conv2d::conv2d_pass(&gpu, cfg, ConvPass::BackwardInput, k, &input).unwrap();
                        d.extend(backward_weight(&gpu, cfg, k, &tx, &tdy, &sdw, splits));
                        run(&gpu, &d);

                        let (got_dx, got_dw) = (read_as(&gpu, &jdx), read(&gpu, &jdw));
                        assert_bits(&format!("{what} dinp"), &got_dx, &read_as(&gpu, &sdx));
                        assert_bits(&format!("{what} dweight"), &got_dw, &read(&gpu, &sdw));
                        assert_close(&format!("{what} dweight"), &got_dw, &want_dw, CONV_ATOL, CONV_RTOL);
                        if dtype == Dtype::F32 && addend.is_none() {
                            assert_close(&format!("{what} dinp"), &got_dx, &want_dx, CONV_ATOL, CONV_RTOL);
                        }
                    }
                }
            }
        }
    }
}

/// The register kernels with shared loads (`conv2d_lanes.wgsl`: the GEMM's column weights and the
/// weight gradient's dout loaded once per subgroup and broadcast, what the default device — a CPU
/// adapter with subgroups — runs, so every other register test here, the joint backward's
/// included, tests it against the reference), forced on (`--conv-lanes on`, so that a GPU with
/// subgroups of 8 to 64 lanes runs it here too), against every lane loading its own (`--conv-lanes
/// off`): the forward (with the bias, and with the ReLU epilogue), the input gradient (with and
/// without the addend) and the weight gradient (unsplit and split 3 ways), in f32 with the
/// adapter's blocks (16 x 16 on a CPU: both halves broadcast) and the smallest (4 x 8: one half),
/// in f16 with the adapter's, on every case plus one with three column blocks (37 channels) and a
/// workgroup whose last subgroup is part-filled with rows (3 x 9 x 7 = 189 rows: 11 blocks of 16,
/// then 13) — the weight gradient's grids end part-filled on every case (9 taps of a 3 x 3 kernel
/// in a 64-invocation workgroup): bit for bit (only the loads differ; the weight gradient's masked
/// padding adds exact zeros), the own loads' forward and input gradient (f32) and both weight
/// gradients within the conv tolerances of the f64 reference. Two block shapes, not all: each
/// pipeline costs seconds to compile on lavapipe with a cold shader cache.
#[test]
fn conv2d_lanes_are_the_own_loads_bit_for_bit() {
    let own = gpu_without_lanes();
    assert!(!own.conv_lanes, "--conv-lanes off must turn the shared loads off");
    let Some(lanes) = gpu_with_lanes() else {
        // Only an adapter without subgroups of 8 to 64 lanes, and only when told so.
        assert!(
            std::env::var_os("SENET_TEST_NO_SUBGROUPS").is_some(),
            "{}: cannot run the shared conv loads (--conv-lanes on); set SENET_TEST_NO_SUBGROUPS=1 on an adapter \
             without subgroups of 8 to 64 lanes",
            own.describe()
        );
        return;
    };
    assert!(lanes.conv_lanes, "--conv-lanes on must turn the shared loads on");
    let mut cases = conv_cases();
    cases.push(Conv2dConfig::square(3, 20, (9, 7), 37, 3, 1, 1, true));
    for dtype in [Dtype::F32, Dtype::F16] {
        let blocks = match dtype {
            Dtype::F16 => vec![RegisterTiles::for_adapter(&lanes)],
            _ => vec![RegisterTiles::for_adapter(&lanes), RegisterTiles::ALL[0]],
        };
        for (i, cfg) in cases.iter().enumerate() {
            let what = format!("{} case {i} {cfg:?}: shared against own loads", dtype.name());
            let passes = RegisterPasses { blocks: blocks.clone(), wgrad_splits: vec![1, 3], joint: None };
            assert_register_paths_agree(&what, (&lanes, &own), cfg, dtype, 2600 + i as u64, &passes, Agree::Bits);
        }
    }
}

/// The register GEMM's 1x1 form (`PLAIN`: no window arithmetic, four pixels a load; what `gpu()`
/// runs for a 1x1 layer with stride 1, no padding and H*W a multiple of 4) against its general
/// form (`--conv-1x1 off`): the forward (with the bias, with the ReLU epilogue), the input
/// gradient (with and without the addend) and the joint backward's input gradient, bit for bit: f32
/// with the adapter's blocks (16 x 16 on a CPU) and the smallest (4 x 8, also the joint
/// backward's), f16 with the adapter's (each pipeline costs seconds to compile on lavapipe with a
/// cold shader cache); the f32 forward and input gradient also within the conv tolerances of the
/// f64 reference. The weight gradient has no 1x1 form. Cases:
/// batch 1 on a 2x2 image (one quad), non-square 3x4 and 1x8, 36 rows (two 16-row blocks and a
/// part-filled one), channels that leave partial column blocks (5 -> 37, 37 -> 5), 2 groups. Shapes
/// the 1x1 form must not take (3x3 = 9 and 2x3 = 6 pixels, stride 2, padding 1, a 3x3 kernel) are
/// checked to go to the general form.
#[test]
fn conv2d_plain_is_the_general_form_bit_for_bit() {
    let (plain, general) = (gpu(), gpu_without_plain());
    assert!(plain.conv_1x1 && !general.conv_1x1, "--conv-1x1 must switch the 1x1 form");
    let sq = Conv2dConfig::square;
    let cases = [
        sq(1, 3, (2, 2), 5, 1, 1, 0, true),
        sq(2, 5, (3, 4), 37, 1, 1, 0, false),
        sq(3, 37, (1, 8), 5, 1, 1, 0, true),
        sq(3, 8, (3, 4), 12, 1, 1, 0, true).grouped(2),
    ];
    for cfg in &cases {
        assert!(conv2d::plain_gemm(&plain, cfg) && !conv2d::plain_gemm(&general, cfg), "{cfg:?}");
    }
    let general_only = [
        sq(2, 4, (3, 3), 6, 1, 1, 0, true),
        sq(2, 4, (2, 3), 6, 1, 1, 0, true),
        sq(2, 4, (8, 8), 6, 1, 2, 0, true),
        sq(2, 4, (8, 8), 6, 1, 1, 1, true),
    ];
    for cfg in general_only {
        assert!(!conv2d::plain_gemm(&plain, &cfg), "{cfg:?} is not a plain GEMM");
    }
    assert!(!conv2d::plain_gemm(&plain, &sq(2, 4, (8, 8), 6, 3, 1, 1, true)));
    assert_form_cases("1x1 form", (&plain, &general), &cases, 2700, Agree::Bits);
}

/// The register GEMM's 3-wide form (`ROW3`: a kernel row's three taps from one vec4 and two
/// neighbours per quad of pixels; what `gpu()` runs for a layer 3 wide with padding 1, stride 1 and
/// W a multiple of 4) against its general form (`--conv-3x3 off`): the same products summed in
/// another order, so not bit for bit. The forward (with the bias, with the ReLU epilogue), the input
/// gradient (with and without the addend) and the joint backward: in f32 both forms within the conv
/// tolerances of the f64 reference (each sum of at most 45 products of values in [-1, 1]) and of
/// each other; in f16 within [`Agree::Sums`]' bound of each other (both sum in f32 and round).
/// f32 with the adapter's blocks and the smallest (4 x 8, also the joint backward's), f16 with the
/// adapter's. Cases: batch 1 on 4x4 (one quad a row: both neighbours are padding), non-square 3x8
/// and 5x12 (three quads a row, 180 rows: part-filled blocks), channels that leave partial column
/// blocks (5 -> 37, 37 -> 5), 2 groups, and the kernel heights and vertical geometry the form
/// leaves alone: 1x3 with no vertical padding, 5x3 with vertical padding 4 and dilation 2. Shapes it
/// must not take (W = 6, stride 2, horizontal padding 0 or 2, a 5-wide kernel, horizontal dilation,
/// a vertical stride) are checked to go to the general form.
#[test]
fn conv2d_row3_matches_the_general_form() {
    let (row3, general) = (gpu(), gpu_without_row3());
    assert!(row3.conv_3x3 && !general.conv_3x3, "--conv-3x3 must switch the 3-wide form");
    let sq = Conv2dConfig::square;
    let tall = |kh, pad_h, dil_h| Conv2dConfig {
        kh,
        pad: (pad_h, 1),
        dilation: (dil_h, 1),
        ..sq(2, 6, (7, 8), 9, 3, 1, 1, true)
    };
    let cases = [
        sq(1, 3, (4, 4), 5, 3, 1, 1, true),
        sq(2, 5, (3, 8), 37, 3, 1, 1, false),
        sq(3, 37, (5, 12), 5, 3, 1, 1, true),
        sq(2, 8, (2, 4), 12, 3, 1, 1, true).grouped(2),
        tall(1, 0, 1),
        tall(5, 4, 2),
    ];
    for cfg in &cases {
        assert!(conv2d::row3_gemm(&row3, cfg) && !conv2d::row3_gemm(&general, cfg), "{cfg:?}");
    }
    let general_only = not_three_wide().into_iter().chain([sq(2, 4, (4, 6), 6, 3, 1, 1, true)]);
    for cfg in general_only {
        assert!(!conv2d::row3_gemm(&row3, &cfg), "{cfg:?} is not a 3-wide GEMM");
    }
    assert_form_cases("3-wide form", (&row3, &general), &cases, 2800, Agree::Sums);
}

/// The weight gradient a kernel row at a time (`WGRAD_ROW3`: what `gpu()` runs for a layer 3 wide
/// with padding 1, dilation 1 and stride 1) against the one-tap walk (`--conv-3x3 off`), bit for
/// bit: each tap's sum runs over the same pixels in the same order, a tap in the padding adding a
/// 0 product. f32 with the adapter's blocks and the smallest (4 x 8: 8 output channels a block),
/// f16 with the adapter's, each split 1 and 4 ways (a split of 4 starts mid-row in every case). The
/// widths are not multiples of 4, so the forward and input gradient take the general form on both
/// devices and agree bit for bit too. Cases: batch 1 on a 1x1 image (both neighbours padding),
/// non-square 3x5 and 5x7, channels that leave partial blocks (5 -> 37, 37 -> 5: 4-channel blocks
/// of input, 16-channel blocks of output), 2 groups, 88 input channels (3 kernel rows x 22 blocks:
/// 66 invocations, past one 64-invocation workgroup), and kernel heights the form leaves alone: 1x3
/// with no vertical padding, 5x3 with vertical padding 4 and dilation 2. Shapes it must not take
/// (stride 2, horizontal padding 0 or 2, a 5-wide kernel, horizontal dilation, a vertical stride)
/// are checked to go to the one-tap walk.
#[test]
fn conv2d_row3_weight_gradient_is_the_one_tap_walk_bit_for_bit() {
    let (row3, general) = (gpu(), gpu_without_row3());
    let sq = Conv2dConfig::square;
    let tall = |kh, pad_h, dil_h| Conv2dConfig {
        kh,
        pad: (pad_h, 1),
        dilation: (dil_h, 1),
        ..sq(2, 6, (7, 6), 9, 3, 1, 1, true)
    };
    let cases = [
        sq(1, 3, (1, 1), 5, 3, 1, 1, true),
        sq(2, 5, (3, 5), 37, 3, 1, 1, false),
        sq(3, 37, (5, 7), 5, 3, 1, 1, true),
        sq(2, 8, (3, 6), 12, 3, 1, 1, true).grouped(2),
        sq(1, 88, (2, 3), 20, 3, 1, 1, false),
        tall(1, 0, 1),
        tall(5, 4, 2),
    ];
    for cfg in &cases {
        assert!(conv2d::row3_wgrad(&row3, cfg) && !conv2d::row3_wgrad(&general, cfg), "{cfg:?}");
        assert!(!conv2d::row3_gemm(&row3, cfg), "{cfg:?}: the forward must keep its general form here");
    }
    for cfg in not_three_wide() {
        assert!(!conv2d::row3_wgrad(&row3, &cfg), "{cfg:?} is not a 3-wide weight gradient");
    }
    for dtype in [Dtype::F32, Dtype::F16] {
        for (i, cfg) in cases.iter().enumerate() {
            let (adapter, small) = (RegisterTiles::for_layer(&row3, cfg), RegisterTiles::ALL[0]);
            let blocks = if dtype == Dtype::F16 { vec![adapter] } else { vec![adapter, small] };
            let passes = RegisterPasses { blocks, wgrad_splits: vec![1, 4], joint: None };
            let what = format!("{} case {i} {cfg:?}: the weight gradient a kernel row at a time", dtype.name());
            assert_register_paths_agree(&what, (&row3, &general), cfg, dtype, 2900 + i as u64, &passes, Agree::Bits);
        }
    }
}

/// 8x8 layers whose horizontal geometry no 3-wide form takes: stride 2, horizontal padding 0 or
/// 2, a 5-wide kernel, horizontal dilation, a vertical stride.
fn not_three_wide() -> [Conv2dConfig; 6] {
    let sq = Conv2dConfig::square;
    [
        sq(2, 4, (8, 8), 6, 3, 2, 1, true),
        sq(2, 4, (8, 8), 6, 3, 1, 0, true),
        sq(2, 4, (8, 8), 6, 3, 1, 2, true),
        sq(2, 4, (8, 8), 6, 5, 1, 1, true),
        Conv2dConfig { dilation: (1, 2), ..sq(2, 4, (8, 8), 6, 3, 1, 1, true) },
        Conv2dConfig { stride: (2, 1), ..sq(2, 4, (8, 8), 6, 3, 1, 1, true) },
    ]
}

/// A form of the register GEMM's forward and input gradient (`form` on device `a`) against the
/// general form (`b`) on each of `cases`, agreeing as `agree` says: f32 with the adapter's blocks
/// and the smallest (4 x 8, also the joint backward's), f16 with the adapter's (each pipeline
/// costs seconds to compile on lavapipe with a cold shader cache); no weight gradient (its 3-wide
/// walk has a test of its own, `conv2d_row3_weight_gradient_is_the_one_tap_walk_bit_for_bit`).
/// Inputs seeded from `seed` on.
fn assert_form_cases(form: &str, (a, b): (&Gpu, &Gpu), cases: &[Conv2dConfig], seed: u64, agree: Agree) {
    for dtype in [Dtype::F32, Dtype::F16] {
        for (i, cfg) in cases.iter().enumerate() {
            let (adapter, small) = (RegisterTiles::for_layer(a, cfg), RegisterTiles::ALL[0]);
            let passes = match dtype {
                Dtype::F16 => RegisterPasses { blocks: vec![adapter], wgrad_splits: vec![], joint: None },
                _ => RegisterPasses { blocks: vec![adapter, small], wgrad_splits: vec![], joint: Some(small) },
            };
            let what = format!("{} case {i} {cfg:?}: {form} against the general form", dtype.name());
            assert_register_paths_agree(&what, (a, b), cfg, dtype, seed + i as u64, &passes, agree);
        }
    }
}

/// Which register passes [`assert_register_paths_agree`] runs: the forward and the input gradient
/// with each of `blocks`, the weight gradient with each of them split each of `wgrad_splits` ways,
/// and the joint backward with `joint`'s blocks (split 2 ways).
struct RegisterPasses {
    blocks: Vec<RegisterTiles>,
    wgrad_splits: Vec<usize>,
    joint: Option<RegisterTiles>,
}

/// How two register paths must agree: bit for bit, or as the same products summed in another
/// order — each f32 output within the conv tolerances of the f64 reference (so the two within
/// twice them of each other), each f16 output within 2^-10 relative plus 2^-6 absolute of the
/// other path's: the two f32 sums round to f16 at most one f16 step apart (2^-10 relative), and
/// with the addend that step (at most 2^-8 for the sums below 8 these shapes give) is carried
/// through the addition and its rounding.
#[derive(Clone, Copy, PartialEq)]
enum Agree {
    Bits,
    Sums,
}

/// Two devices of one adapter whose register kernels differ only in one path (`a` with it, `b`
/// without), from the same inputs of `cfg` in `dtype` (seeded by `seed`; values the dtype holds
/// exactly, so the f64 reference sees what the device sees): every output of `passes` — the forward
/// with and without the ReLU epilogue (with the bias where `cfg` has one), the input gradient with
/// and without the addend, the weight gradients — alike on both as `agree` says; the f32 forward and
/// input gradient without epilogue or addend, and every weight gradient, also within the conv
/// tolerances of the f64 reference (both devices' with [`Agree::Sums`]). Panics naming `what` and
/// the first difference.
fn assert_register_paths_agree(
    what: &str,
    (a, b): (&Gpu, &Gpu),
    cfg: &Conv2dConfig,
    dtype: Dtype,
    seed: u64,
    passes: &RegisterPasses,
    agree: Agree,
) {
    let mut r = rng(seed);
    let mut data = |shape: &[usize]| {
        let v = uniform(&mut r, shape.iter().product(), -1.0, 1.0);
        match dtype {
            Dtype::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
            _ => v,
        }
    };
    let (x, w, bias) = (data(&cfg.input_shape()), data(&cfg.weight_shape()), data(&[cfg.c_out]));
    let (dy, add) = (data(&cfg.output_shape()), data(&cfg.input_shape()));
    // Every output of every pass on one device, named.
    let outputs = |g: &Gpu| -> Vec<(String, Vec<f32>)> {
        let up = |shape: &[usize], v: &[f32]| upload_as(g, dtype, shape, v).0;
        let (tx, tw, tdy, tadd) = (
            up(&cfg.input_shape(), &x),
            up(&cfg.weight_shape(), &w),
            up(&cfg.output_shape(), &dy),
            up(&cfg.input_shape(), &add),
        );
        let tb = upload(g, "b", &[cfg.c_out], &bias);
        let act = |shape: &[usize]| Tensor::zeros_of(g, "out", shape, dtype).expect("allocate");
        let mut out = Vec::new();
        for &tiles in &passes.blocks {
            let k = ConvKernel::Register(tiles);
            for relu in [false, true] {
                let ty = act(&cfg.output_shape());
                let bufs = ConvBuffers { relu, ..ConvBuffers::forward(&tx, &tw, cfg.bias.then_some(&tb), &ty) };
                run(g, &conv2d::conv2d_pass(g, cfg, ConvPass::Forward, k, &bufs).unwrap());
                out.push((format!("conv2d_forward {tiles:?} relu {relu}"), read_as(g, &ty)));
            }
            for addend in [None, Some(&tadd)] {
                let tdx = act(&cfg.input_shape());
                let bufs = ConvBuffers { dinp_addend: addend, ..ConvBuffers::backward_input(&tdy, &tw, &tdx) };
                run(g, &conv2d::conv2d_pass(g, cfg, ConvPass::BackwardInput, k, &bufs).unwrap());
                out.push((format!("conv2d_backward_input {tiles:?} addend {}", addend.is_some()), read_as(g, &tdx)));
            }
            for &splits in &passes.wgrad_splits {
                let tdw = zeros(g, "dw", &cfg.weight_shape());
                run(g, &backward_weight(g, cfg, k, &tx, &tdy, &tdw, splits));
                out.push((format!("conv2d_backward_weight {tiles:?} splits {splits} dweight"), read(g, &tdw)));
            }
        }
        if let Some(tiles) = passes.joint {
            let (tdx, tdw) = (act(&cfg.input_shape()), zeros(g, "dw", &cfg.weight_shape()));
            let bufs =
                ConvBuffers { inp: Some(&tx), dweight: Some(&tdw), ..ConvBuffers::backward_input(&tdy, &tw, &tdx) };
            run(g, &conv2d::conv2d_backward_joint(g, cfg, ConvKernel::Register(tiles), &bufs, 2).unwrap());
            out.push((format!("conv2d_backward {tiles:?} dinp addend false"), read_as(g, &tdx)));
            out.push((format!("conv2d_backward {tiles:?} dweight"), read(g, &tdw)));
        }
        out
    };
    let (got, want) = (outputs(a), outputs(b));
    assert_eq!(got.len(), want.len());
    let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&bias), to_f64(&dy));
    let want_y = reference::conv2d::conv2d_forward(cfg, &x64, &w64, cfg.bias.then_some(&b64[..]));
    let want_dx = reference::conv2d::conv2d_backward_input(cfg, &dy64, &w64);
    let want_dw = reference::conv2d::conv2d_backward_weight(cfg, &x64, &dy64);
    for ((name, got), (_, want)) in got.iter().zip(&want) {
        let what = format!("{what}: {name}");
        match agree {
            Agree::Bits => assert_bits(&what, got, want),
            Agree::Sums if dtype == Dtype::F16 => {
                assert_close(&what, got, &to_f64(want), 1.0 / 64.0, 1.0 / 1024.0);
            }
            Agree::Sums => {
                let other = format!("{what} (against the other path)");
                assert_close(&other, got, &to_f64(want), 2.0 * CONV_ATOL, 2.0 * CONV_RTOL);
            }
        }
        // The reference for both paths' f32 outputs without epilogue or addend (for the path under
        // test only where it may differ from the other).
        let checked: &[&Vec<f32>] = if agree == Agree::Bits { &[want] } else { &[want, got] };
        for v in checked {
            if dtype == Dtype::F32 && name.ends_with("relu false") {
                assert_close(&what, v, &want_y, CONV_ATOL, CONV_RTOL);
            }
            if dtype == Dtype::F32 && name.ends_with("addend false") {
                assert_close(&what, v, &want_dx, CONV_ATOL, CONV_RTOL);
            }
            if name.ends_with("dweight") {
                assert_close(&what, v, &want_dw, CONV_ATOL, CONV_RTOL);
            }
        }
    }
}

/// `got` equals `want` bit for bit, or a panic naming the first difference.
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
    if let Some(&i) = differ.first() {
        panic!(
            "{what}: {} of {} values differ; first [{i}]: {:e} against {:e}",
            differ.len(),
            got.len(),
            got[i],
            want[i]
        );
    }
}
