//! Every op, one folder each (`ops/<op>/`): its WGSL kernels (`<op>.wgsl`), the host side in
//! `mod.rs` (configuration and shape checks, workgroup math and bind groups, forward and backward
//! side by side), its f64 CPU oracle (`reference.rs`) and, for an op that can be a node of a
//! model graph, its [`layer::LayerOp`] implementation (`layer.rs`).
//!
//! Each function checks its tensors against the configuration (once, when the plan is built)
//! and returns the dispatches to record. Scratch buffers and parameter blocks are allocated
//! here, at plan time, and kept alive by the bind groups that use them.

pub mod add;
pub mod batch_norm;
pub mod bn_fold;
pub mod cast;
pub mod clip_grad_norm;
pub mod conv2d;
pub mod cross_entropy;
pub mod drop_path;
pub mod dropout;
pub mod grad_accum;
pub mod grad_scaler;
pub mod layer;
pub mod linear;
pub mod model_ema;
pub mod optimizer;
pub mod pool;
pub mod relu;
pub mod se_block;

use anyhow::{Result, ensure};

use crate::gpu::{Gpu, Tensor};

/// The tensor has exactly this shape, or a host error naming it.
pub(crate) fn expect_shape(what: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    ensure!(t.shape == shape, "{what}: expected shape {shape:?}, got {:?}", t.shape);
    Ok(())
}

/// A one-element placeholder for a binding the kernel declares but the configuration does not
/// use (a missing bias): WGSL entry points bind every buffer they mention.
pub(crate) fn placeholder(gpu: &Gpu) -> Result<Tensor> {
    Tensor::zeros(gpu, "unused", &[1])
}

/// A placeholder for an unused binding of the kernel's `act` type (f16 in an f16 kernel).
pub(crate) fn placeholder_like(gpu: &Gpu, t: &Tensor) -> Result<Tensor> {
    Tensor::zeros_of(gpu, "unused", &[1], t.dtype)
}

/// Bytes per element of `t` (4, or 2 for an f16 plan's activations), for dispatch costs.
pub(crate) fn el(t: &Tensor) -> f64 {
    t.dtype.bytes() as f64
}

/// The parameter block of the elementwise kernels (relu, add): the element count, padded to 16
/// bytes as WGSL's uniform layout wants.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LenParams {
    len: u32,
    _pad: [u32; 3],
}

impl LenParams {
    pub(crate) fn of(t: &Tensor) -> Result<LenParams> {
        Ok(LenParams { len: to_u32("elements", t.numel())?, _pad: [0; 3] })
    }
}

/// `b` has `a`'s shape, or a host error naming the op and the operand.
pub(crate) fn same_shape(op: &str, what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    ensure!(a.shape == b.shape, "{op}: {what} shape {:?} differs from {:?}", b.shape, a.shape);
    Ok(())
}

/// Every count the kernels index with must fit a u32.
pub(crate) fn to_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit the kernels' 32-bit indices"))
}
