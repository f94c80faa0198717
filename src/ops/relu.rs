//! relu — host side of `shaders/relu.wgsl`; CPU oracle in `reference/relu.rs`.

use anyhow::Result;

use super::{LenParams, same_shape};
use crate::gpu::{Bind, Dispatch, Gpu, Tensor};

const WG: u32 = 256;

pub fn relu_forward(gpu: &Gpu, inp: &Tensor, out: &Tensor) -> Result<Vec<Dispatch>> {
    same_shape("relu", "output", inp, out)?;
    let params = gpu.uniform("relu params", &LenParams::of(inp)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(2, out)];
    let d = gpu.dispatch("relu", "relu_forward", &[("WG", WG as f64)], &binds, gpu.grid_1d(inp.numel(), WG))?;
    Ok(vec![d.with_cost(inp.numel() as f64, 8.0 * inp.numel() as f64)])
}

/// `out` is the forward's output: the gradient passes where it is positive.
pub fn relu_backward(gpu: &Gpu, out: &Tensor, dout: &Tensor, dinp: &Tensor) -> Result<Vec<Dispatch>> {
    same_shape("relu", "dout", out, dout)?;
    same_shape("relu", "dinp", out, dinp)?;
    let params = gpu.uniform("relu params", &LenParams::of(out)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(3, out), Bind::Tensor(4, dout), Bind::Tensor(5, dinp)];
    let d = gpu.dispatch("relu", "relu_backward", &[("WG", WG as f64)], &binds, gpu.grid_1d(out.numel(), WG))?;
    Ok(vec![d.with_cost(out.numel() as f64, 12.0 * out.numel() as f64)])
}
