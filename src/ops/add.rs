//! add — host side of `shaders/add.wgsl`; CPU oracle in `reference/add.rs`.

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

fn same(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    ensure!(a.shape == b.shape, "add: {what} shape {:?} differs from {:?}", b.shape, a.shape);
    Ok(())
}

/// out = a + b.
pub fn add_forward(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<Vec<Dispatch>> {
    same("second operand", a, b)?;
    same("output", a, out)?;
    let params = gpu.uniform("add params", &Params { len: to_u32("elements", a.numel())?, _pad: [0; 3] });
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, a), Bind::Tensor(2, b), Bind::Tensor(3, out)];
    let d = gpu.dispatch("add", "add_forward", &[("WG", WG as f64)], &binds, gpu.grid_1d(a.numel(), WG))?;
    Ok(vec![d.with_cost(a.numel() as f64, 12.0 * a.numel() as f64)])
}

/// da = db = dout.
pub fn add_backward(gpu: &Gpu, dout: &Tensor, da: &Tensor, db: &Tensor) -> Result<Vec<Dispatch>> {
    same("first gradient", dout, da)?;
    same("second gradient", dout, db)?;
    let params = gpu.uniform("add params", &Params { len: to_u32("elements", dout.numel())?, _pad: [0; 3] });
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(4, dout), Bind::Tensor(5, da), Bind::Tensor(6, db)];
    let d = gpu.dispatch("add", "add_backward", &[("WG", WG as f64)], &binds, gpu.grid_1d(dout.numel(), WG))?;
    Ok(vec![d.with_cost(0.0, 12.0 * dout.numel() as f64)])
}
