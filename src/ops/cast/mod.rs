//! cast — host side of `cast.wgsl`; CPU oracle in `reference.rs` beside it.

pub mod reference;

use anyhow::{Result, ensure};

use super::{LenParams, same_shape};
use crate::gpu::{Bind, Dispatch, Dtype, Gpu, Precision, Tensor};

const WG: u32 = 256;

/// out = inp narrowed to `out`'s element type (f16; f32 is a copy).
pub fn cast_forward(gpu: &Gpu, inp: &Tensor, out: &Tensor) -> Result<Vec<Dispatch>> {
    same_shape("cast", "output", inp, out)?;
    ensure!(inp.dtype == Dtype::F32, "cast: {} holds {}, the cast reads f32", inp.label, inp.dtype.name());
    let params = gpu.uniform("cast params", &LenParams::of(inp)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(2, out)];
    let grid = gpu.grid_1d(inp.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(out), "cast", "cast_forward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(0.0, ((4 + out.dtype.bytes()) * inp.numel()) as f64)])
}
