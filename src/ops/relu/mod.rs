//! relu — host side of `relu.wgsl`; CPU oracle in `reference.rs` beside it.

mod layer;
pub mod reference;

pub use layer::Relu;

use anyhow::Result;

use super::{LenParams, same_shape};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

const WG: u32 = 256;

pub fn relu_forward(gpu: &Gpu, inp: &Tensor, out: &Tensor) -> Result<Vec<Dispatch>> {
    same_shape("relu", "output", inp, out)?;
    let params = gpu.uniform("relu params", &LenParams::of(inp)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(2, out)];
    let grid = gpu.grid_1d(inp.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(inp), "relu", "relu_forward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(inp.numel() as f64, (2 * inp.dtype.bytes() * inp.numel()) as f64)])
}

/// `out` is the forward's output: the gradient passes where it is positive.
pub fn relu_backward(gpu: &Gpu, out: &Tensor, dout: &Tensor, dinp: &Tensor) -> Result<Vec<Dispatch>> {
    same_shape("relu", "dout", out, dout)?;
    same_shape("relu", "dinp", out, dinp)?;
    let params = gpu.uniform("relu params", &LenParams::of(out)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(3, out), Bind::Tensor(4, dout), Bind::Tensor(5, dinp)];
    let grid = gpu.grid_1d(out.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(out), "relu", "relu_backward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(out.numel() as f64, (3 * out.dtype.bytes() * out.numel()) as f64)])
}
