//! Every kernel, forward and every backward output, GPU against the f64 CPU reference, on
//! awkward shapes: batch 1, odd and non-square H×W, channel counts that are multiples of no tile
//! (the GEMM kernels work in 4×4 blocks, reductions in 256-wide workgroups) nor of r.
//!
//! Tolerances are |gpu - ref| <= atol + rtol·|ref|, stated per op with the reason. The inputs are
//! f32 values the reference reads exactly, so the difference is the GPU's f32 rounding alone;
//! an indexing bug shows up as errors of order 0.1, orders of magnitude above every tolerance.
//!
//! One module per op (`conv2d::`, `batch_norm::`, …); `cargo test --test kernels <filter>` selects
//! by substring, so a filter naming a test or an op still works.

#[path = "../common/mod.rs"]
mod common;

mod add;
mod batch_norm;
mod bn_fold;
mod cast;
mod clip_grad_norm;
mod conv2d;
mod cross_entropy;
mod ema;
mod errors;
mod f16;
mod grad_accum;
mod grad_scaler;
mod linear;
mod optimizer;
mod pool;
mod relu;
mod se_block;

use common::*;
use senet_wgpu::gpu::Tensor;

// ---------------------------------------------------------------------------------------------
// f16 variants (--precision f16): every kernel that moves activations, compiled with `act = f16`.
//
// Inputs are f16 values (uploaded as f16; the f64 reference reads the same values widened), every
// sum is f32, and each f16 output is rounded once when stored: a correct kernel is within the f32
// kernel's tolerance plus half an f16 ulp of the result, 2^-11 relative (4.88e-4; F16_RTOL rounds
// up), and half the f16 subnormal spacing (2^-25, 3e-8) absolute. f32 outputs (weight and bias
// gradients, statistics, the loss) carry the f32 tolerance alone: products of two f16 values are
// exact in f32. An indexing or conversion bug gives errors of order 0.1.

const F16_RTOL: f64 = 4.9e-4;
const F16_ATOL: f64 = 3e-8;

/// `v` rounded to the nearest f16 (the values an f16 tensor holds), as f32.
fn f16_values(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// An f16 tensor holding `v` rounded to f16.
fn upload_f16(gpu: &senet_wgpu::gpu::Gpu, label: &str, shape: &[usize], v: &[f32]) -> Tensor {
    let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
    Tensor::from_slice(gpu, label, shape, &h).expect("upload f16")
}

fn read_f16(gpu: &senet_wgpu::gpu::Gpu, t: &Tensor) -> Vec<f32> {
    assert_eq!(t.dtype, senet_wgpu::gpu::Dtype::F16, "{} should hold f16", t.label);
    t.read_f32(gpu).expect("read back")
}

/// Random values in [lo, hi) rounded to f16.
fn uniform_f16(r: &mut rand_chacha::ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    f16_values(&uniform(r, n, lo, hi))
}

/// The test machine's adapter must have f16 (lavapipe does): never pass by skipping.
fn gpu_f16() -> std::sync::Arc<senet_wgpu::gpu::Gpu> {
    let g = gpu();
    assert!(
        g.features.contains(wgpu::Features::SHADER_F16),
        "{} has no SHADER_F16: the f16 kernels cannot be tested here",
        g.describe()
    );
    g
}

// ---------------------------------------------------------------------------------------------
// gradient accumulation (--grad-accum-steps) and the model EMA (--model-ema)

/// The flat views a network binds: `sizes` elements each, every start a multiple of the
/// adapter's offset alignment (the chunks of a flat buffer past one binding are).
fn aligned_flat(
    gpu: &senet_wgpu::gpu::Gpu,
    label: &str,
    sizes: &[usize],
    data: &[f32],
) -> (senet_wgpu::gpu::Tensor, Vec<senet_wgpu::gpu::Tensor>) {
    let flat = senet_wgpu::gpu::Tensor::flat(gpu, label, data).unwrap();
    let mut start = 0;
    let views = sizes
        .iter()
        .map(|&n| {
            let v = flat.view(gpu, &format!("{label} {start}.."), start, &[n]).unwrap();
            start += n;
            v
        })
        .collect();
    (flat, views)
}

/// Chunk sizes in elements: multiples of the adapter's offset alignment but the last.
fn accum_cases(gpu: &senet_wgpu::gpu::Gpu) -> Vec<Vec<usize>> {
    let a = (gpu.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
    vec![vec![1], vec![255], vec![257], vec![70_001], vec![5 * a, 21 * a, 1]]
}
