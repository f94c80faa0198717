//! dropout — `nn.Dropout(p)`: host side of `dropout.wgsl`; CPU oracle in `reference.rs`; the graph
//! node in `layer.rs`. The mask is a counter-based draw from (element, layer, seed, step), so the
//! backward recomputes it instead of storing it, every step draws a new one, and a resumed run
//! draws the same ones as an uninterrupted run.

mod layer;
pub mod reference;

/// What the masks are drawn from (the plan's per-step key).
pub use crate::ops::layer::{StepKey, step_key};
pub use layer::Dropout;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{expect_shape, same_shape, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

const WG: u32 = 256;

/// A dropout layer's draw: probability `p` of zeroing, the layer's own stream (`salt`), and how
/// many consecutive elements share one draw (`group`: 1 for dropout; drop_path draws once per
/// sample, [`DropoutConfig::grouped`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutConfig {
    pub p: f64,
    pub salt: u32,
    pub group: usize,
}

impl DropoutConfig {
    /// The layer `name`'s draw: its salt is the FNV-1a hash of the name, so two dropout layers
    /// draw different masks and a layer draws the same one wherever it sits in the plan.
    pub fn new(p: f64, name: &str) -> DropoutConfig {
        let salt = name.bytes().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
        DropoutConfig { p, salt, group: 1 }
    }

    /// This draw with `group` consecutive elements sharing each draw.
    pub fn grouped(self, group: usize) -> DropoutConfig {
        DropoutConfig { group, ..self }
    }

    /// PyTorch takes 0 <= p <= 1; p = 1 (every element zeroed, scale infinite) is refused here.
    pub fn validate(&self) -> Result<()> {
        ensure!((0.0..1.0).contains(&self.p), "dropout: p must be in [0, 1), got {}", self.p);
        ensure!(self.group >= 1, "dropout: a draw covers at least one element");
        Ok(())
    }

    /// Elements whose draw is below this are zeroed: p of 2^32, rounded.
    pub fn threshold(&self) -> u32 {
        (self.p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
    }

    fn params(&self, len: usize, training: bool) -> Result<Params> {
        Ok(Params {
            len: to_u32("dropout elements", len)?,
            threshold: self.threshold(),
            salt: self.salt,
            training: u32::from(training),
            scale: (1.0 / (1.0 - self.p)) as f32,
            group: to_u32("dropout elements per draw", self.group)?,
            _pad: [0; 2],
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len: u32,
    threshold: u32,
    salt: u32,
    training: u32,
    scale: f32,
    group: u32,
    _pad: [u32; 2],
}

/// The forward: masked and scaled in training, a copy in evaluation. `key` is the plan's [2]
/// step key.
pub fn dropout_forward(
    gpu: &Gpu,
    cfg: &DropoutConfig,
    key: &Tensor,
    inp: &Tensor,
    out: &Tensor,
    training: bool,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    same_shape("dropout", "output", inp, out)?;
    expect_shape("dropout step key", key, &[2])?;
    let params = gpu.uniform("dropout params", &cfg.params(inp.numel(), training)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(2, out), Bind::Tensor(3, key)];
    let grid = gpu.grid_1d(inp.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(inp), "dropout", "dropout_forward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(inp.numel() as f64, (2 * inp.dtype.bytes() * inp.numel()) as f64)])
}

/// The backward (training mode): dinp = dout · the forward's factor, the mask drawn again.
pub fn dropout_backward(
    gpu: &Gpu,
    cfg: &DropoutConfig,
    key: &Tensor,
    dout: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    same_shape("dropout", "dinp", dout, dinp)?;
    expect_shape("dropout step key", key, &[2])?;
    let params = gpu.uniform("dropout params", &cfg.params(dout.numel(), true)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(3, key), Bind::Tensor(4, dout), Bind::Tensor(5, dinp)];
    let grid = gpu.grid_1d(dout.numel(), WG);
    let d = gpu.dispatch_in(Precision::of(dout), "dropout", "dropout_backward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(dout.numel() as f64, (2 * dout.dtype.bytes() * dout.numel()) as f64)])
}
