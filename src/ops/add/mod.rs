//! add — host side of `add.wgsl`; CPU oracle in `reference.rs` beside it.

mod layer;
pub mod reference;

pub use layer::Add;

use anyhow::Result;

use super::{LenParams, same_shape};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

const WG: u32 = 256;

fn same(what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    same_shape("add", what, a, b)
}

/// out = a + b.
pub fn add_forward(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<Vec<Dispatch>> {
    same("second operand", a, b)?;
    same("output", a, out)?;
    let params = gpu.uniform("add params", &LenParams::of(a)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, a), Bind::Tensor(2, b), Bind::Tensor(3, out)];
    let grid = gpu.grid_1d(a.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(a), "add", "add_forward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(a.numel() as f64, (3 * a.dtype.bytes() * a.numel()) as f64)])
}

/// da = db = dout.
pub fn add_backward(gpu: &Gpu, dout: &Tensor, da: &Tensor, db: &Tensor) -> Result<Vec<Dispatch>> {
    same("first gradient", dout, da)?;
    same("second gradient", dout, db)?;
    let params = gpu.uniform("add params", &LenParams::of(dout)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(4, dout), Bind::Tensor(5, da), Bind::Tensor(6, db)];
    let grid = gpu.grid_1d(dout.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(dout), "add", "add_backward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(0.0, (3 * dout.dtype.bytes() * dout.numel()) as f64)])
}

/// out = relu(a + b): the addition with the ReLU after it fused in, one pass.
pub fn add_forward_relu(gpu: &Gpu, a: &Tensor, b: &Tensor, out: &Tensor) -> Result<Vec<Dispatch>> {
    same("second operand", a, b)?;
    same("output", a, out)?;
    let params = gpu.uniform("add params", &LenParams::of(a)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, a), Bind::Tensor(2, b), Bind::Tensor(3, out)];
    let grid = gpu.grid_1d(a.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(a), "add", "add_forward_relu", &[("WG", WG as f64)], &binds, grid)?;
    // a and b read, out written; an add and a max per element.
    Ok(vec![d.with_cost(2.0 * a.numel() as f64, (3 * a.dtype.bytes() * a.numel()) as f64)])
}

/// da = db = dout * [out > 0], `out` the forward's output: the fused ReLU's mask applied once.
pub fn add_backward_relu(gpu: &Gpu, out: &Tensor, dout: &Tensor, da: &Tensor, db: &Tensor) -> Result<Vec<Dispatch>> {
    same("output gradient", out, dout)?;
    same("first gradient", out, da)?;
    same("second gradient", out, db)?;
    let params = gpu.uniform("add params", &LenParams::of(out)?);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(4, dout),
        Bind::Tensor(5, da),
        Bind::Tensor(6, db),
        Bind::Tensor(7, out),
    ];
    let grid = gpu.grid_1d(out.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(out), "add", "add_backward_relu", &[("WG", WG as f64)], &binds, grid)?;
    // out and dout read, da and db written; a comparison per element.
    Ok(vec![d.with_cost(out.numel() as f64, (4 * out.dtype.bytes() * out.numel()) as f64)])
}
