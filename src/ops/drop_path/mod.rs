//! drop_path — timm's `drop_path(x, drop_prob, training, scale_by_keep=True)` (stochastic depth,
//! Huang et al. 2016): host side of `drop_path.wgsl`; CPU oracle in `reference.rs`; the graph node
//! in `layer.rs`. One draw per sample of the batch (dropout draws one per element), from
//! (sample, layer, seed, step), so the backward recomputes the mask instead of storing it, every
//! step draws a new one, and a resumed run draws the same ones as an uninterrupted run.

mod layer;
pub mod reference;

/// What the masks are drawn from (the plan's per-step key).
pub use crate::ops::layer::{StepKey, step_key};
pub use layer::DropPath;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::dropout::DropoutConfig;
use super::{expect_shape, same_shape, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

const WG: u32 = 256;

/// A drop-path layer's draw: probability `p` of dropping a sample's path, and the layer's own
/// stream (`salt`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropPathConfig {
    pub p: f64,
    pub salt: u32,
}

impl DropPathConfig {
    /// The layer `name`'s draw: its salt is a dropout layer's of that name (the FNV-1a hash of
    /// the name), so two layers draw different masks wherever they sit in the plan.
    pub fn new(p: f64, name: &str) -> DropPathConfig {
        DropPathConfig { p, salt: DropoutConfig::new(p, name).salt }
    }

    /// timm takes any rate; p = 1 (every path dropped, scale infinite) is refused here.
    pub fn validate(&self) -> Result<()> {
        ensure!((0.0..1.0).contains(&self.p), "drop_path: p must be in [0, 1), got {}", self.p);
        Ok(())
    }

    /// Samples whose draw is below this are dropped: p of 2^32, rounded.
    pub fn threshold(&self) -> u32 {
        (self.p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
    }

    /// The kernel's parameters for a tensor of `len` elements, `per_sample` of them per sample.
    fn params(&self, len: usize, per_sample: usize, training: bool) -> Result<Params> {
        Ok(Params {
            len: to_u32("drop_path elements", len)?,
            per_sample: to_u32("drop_path elements per sample", per_sample)?,
            threshold: self.threshold(),
            salt: self.salt,
            training: u32::from(training),
            scale: (1.0 / (1.0 - self.p)) as f32,
            _pad: [0; 2],
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len: u32,
    per_sample: u32,
    threshold: u32,
    salt: u32,
    training: u32,
    scale: f32,
    _pad: [u32; 2],
}

/// Elements per sample of `t` ([n, ...]): numel / n, at least one sample of at least one element.
fn per_sample(t: &Tensor) -> Result<usize> {
    let n = t.shape.first().copied().unwrap_or(0);
    ensure!(n >= 1 && t.numel() >= n, "drop_path: expected an [n, ...] tensor with n >= 1, got {:?}", t.shape);
    Ok(t.numel() / n)
}

/// The forward: each sample kept and scaled or zeroed in training, a copy in evaluation. `key` is
/// the plan's [2] step key.
pub fn drop_path_forward(
    gpu: &Gpu,
    cfg: &DropPathConfig,
    key: &Tensor,
    inp: &Tensor,
    out: &Tensor,
    training: bool,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    same_shape("drop_path", "output", inp, out)?;
    expect_shape("drop_path step key", key, &[2])?;
    let params = gpu.uniform("drop_path params", &cfg.params(inp.numel(), per_sample(inp)?, training)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(1, inp), Bind::Tensor(2, out), Bind::Tensor(3, key)];
    let grid = gpu.grid_1d(inp.numel(), WG);
    let d =
        gpu.dispatch_in(Precision::of(inp), "drop_path", "drop_path_forward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(inp.numel() as f64, (2 * inp.dtype.bytes() * inp.numel()) as f64)])
}

/// The backward (training mode): dinp = dout · the forward's factor, the mask drawn again.
pub fn drop_path_backward(
    gpu: &Gpu,
    cfg: &DropPathConfig,
    key: &Tensor,
    dout: &Tensor,
    dinp: &Tensor,
) -> Result<Vec<Dispatch>> {
    cfg.validate()?;
    same_shape("drop_path", "dinp", dout, dinp)?;
    expect_shape("drop_path step key", key, &[2])?;
    let params = gpu.uniform("drop_path params", &cfg.params(dout.numel(), per_sample(dout)?, true)?);
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(3, key), Bind::Tensor(4, dout), Bind::Tensor(5, dinp)];
    let grid = gpu.grid_1d(dout.numel(), WG);
    let d =
        gpu.dispatch_in(Precision::of(dout), "drop_path", "drop_path_backward", &[("WG", WG as f64)], &binds, grid)?;
    Ok(vec![d.with_cost(dout.numel() as f64, (2 * dout.dtype.bytes() * dout.numel()) as f64)])
}
