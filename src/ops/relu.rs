//! relu — host side of `shaders/relu.wgsl`; CPU oracle in `reference/relu.rs`.

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::to_u32;
use crate::gpu::{Bind, Dispatch, Gpu, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len: u32,
    _pad: [u32; 3],
}

const WG: u32 = 256;

fn same_shape(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    ensure!(a.shape == b.shape, "relu: {what} shape {:?} differs from {:?}", b.shape, a.shape);
    Ok(())
}

pub fn relu_forward(gpu: &Gpu, inp: &Tensor, out: &Tensor) -> Result<Vec<Dispatch>> {
    same_shape(inp, out, "output")?;
    let params = gpu.uniform("relu params", &Params { len: to_u32("elements", inp.numel())?, _pad: [0; 3] });
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(2, out)];
    let d = gpu.dispatch("relu", "relu_forward", &[("WG", WG as f64)], &binds, gpu.grid_1d(inp.numel(), WG))?;
    Ok(vec![d.with_cost(inp.numel() as f64, 8.0 * inp.numel() as f64)])
}

/// `out` is the forward's output: the gradient passes where it is positive.
pub fn relu_backward(gpu: &Gpu, out: &Tensor, dout: &Tensor, dinp: &Tensor) -> Result<Vec<Dispatch>> {
    same_shape(out, dout, "dout")?;
    same_shape(out, dinp, "dinp")?;
    let params = gpu.uniform("relu params", &Params { len: to_u32("elements", out.numel())?, _pad: [0; 3] });
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(3, out), Bind::Tensor(4, dout), Bind::Tensor(5, dinp)];
    let d = gpu.dispatch("relu", "relu_backward", &[("WG", WG as f64)], &binds, gpu.grid_1d(out.numel(), WG))?;
    Ok(vec![d.with_cost(out.numel() as f64, 12.0 * out.numel() as f64)])
}
