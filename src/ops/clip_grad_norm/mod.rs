//! clip_grad_norm — host side of `clip_grad_norm.wgsl`; CPU oracle in
//! `reference.rs` beside it.
//!
//! `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)` (norm_type 2, every gradient
//! together) over the flat gradient buffer, every step, between the backward pass (and the loss
//! scaler's check) and the optimizer. The norm stays on the GPU; the host reads it when it logs.

pub mod reference;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::to_u32;
use crate::gpu::{Bind, Dispatch, Gpu, Pass, Tensor};

/// Layout of the state buffer (f32).
pub mod state {
    /// The last step's total gradient norm (of the unscaled gradients, before clipping).
    pub const TOTAL_NORM: usize = 0;
    /// The coefficient the gradients were multiplied by: min(max_norm / (norm + 1e-6), 1).
    pub const COEF: usize = 1;
    pub const LEN: usize = 4;
}

/// Mirrors `Params` in clip_grad_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len: u32,
    base: u32,
    _pad0: [u32; 2],
    max_norm: f32,
    _pad1: [f32; 3],
}

/// The reductions' workgroup size (the prelude's RED_WG) and the scale kernel's.
const WG: u32 = 256;
/// At most this many workgroups sum each chunk's squares (a chunk smaller than GROUPS × WG gets
/// one workgroup per WG elements): enough to fill a GPU, few enough for one workgroup to add up.
const GROUPS: usize = 256;

/// The last step's figures, as the log shows them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipState {
    pub total_norm: f32,
    pub coef: f32,
}

pub struct ClipGradNorm {
    pub max_norm: f64,
    /// See [`state`].
    pub state: Tensor,
    /// The partial sums per chunk, the reduction, then the scale per chunk: to run after the
    /// backward pass (after the loss scaler's dispatches in an f16 plan), before the optimizer.
    pub dispatches: Vec<Dispatch>,
}

impl ClipGradNorm {
    /// Clipping of the gradients in `chunks` (views of the flat gradient buffer, each within one
    /// binding) to total norm `max_norm`. `scaler`: an f16 plan's loss-scaler state, whose
    /// inverse scale unscales the gradients for the norm.
    pub fn new(gpu: &Gpu, max_norm: f64, chunks: &[&Tensor], scaler: Option<&Tensor>) -> Result<ClipGradNorm> {
        ensure!(!chunks.is_empty(), "clip_grad_norm: no gradients to clip");
        ensure!(
            max_norm.is_finite() && max_norm > 0.0 && (max_norm as f32).is_finite(),
            "clip_grad_norm: max_norm must be a finite number above 0, got {max_norm}"
        );
        let groups: Vec<usize> = chunks.iter().map(|g| g.numel().div_ceil(WG as usize).clamp(1, GROUPS)).collect();
        let slots: usize = groups.iter().sum();
        let st = Tensor::zeros(gpu, "gradient clipping state", &[state::LEN])?;
        let partial = Tensor::zeros(gpu, "gradient clipping partial sums", &[slots])?;
        let no_scaler = super::placeholder(gpu)?;
        let scaler_state = scaler.unwrap_or(&no_scaler);
        let consts = [("WG", WG as f64), ("SCALED", f64::from(u8::from(scaler.is_some())))];
        let params = |len: usize, base: usize| -> Result<wgpu::Buffer> {
            Ok(gpu.uniform(
                "clip_grad_norm params",
                &Params {
                    len: to_u32("gradients", len)?,
                    base: to_u32("partial sums", base)?,
                    _pad0: [0; 2],
                    max_norm: max_norm as f32,
                    _pad1: [0.0; 3],
                },
            ))
        };
        let mut dispatches = Vec::new();
        let mut base = 0;
        for (g, &n) in chunks.iter().zip(&groups) {
            let p = params(g.numel(), base)?;
            let binds =
                [Bind::Uniform(0, &p), Bind::Tensor(1, g), Bind::Tensor(2, &partial), Bind::Tensor(4, scaler_state)];
            let d = gpu.dispatch("clip_grad_norm", "clip_grad_norm_partial", &consts, &binds, [n as u32, 1, 1])?;
            dispatches.push(d.with_cost(2.0 * g.numel() as f64, 4.0 * g.numel() as f64));
            base += n;
        }
        let p = params(slots, 0)?;
        let binds = [Bind::Uniform(0, &p), Bind::Tensor(2, &partial), Bind::Tensor(3, &st)];
        // The partial sums read once, the clipping state written.
        let d = gpu.dispatch("clip_grad_norm", "clip_grad_norm_reduce", &consts, &binds, [1, 1, 1])?;
        dispatches.push(d.with_cost(partial.numel() as f64, (4 * partial.numel() + 4 * st.numel()) as f64));
        for g in chunks {
            let p = params(g.numel(), 0)?;
            let binds = [Bind::Uniform(0, &p), Bind::Tensor(1, g), Bind::Tensor(3, &st)];
            let grid = gpu.grid_1d(g.numel(), WG);
            let d = gpu.dispatch("clip_grad_norm", "clip_grad_norm_scale", &consts, &binds, grid)?;
            dispatches.push(d.with_cost(g.numel() as f64, 8.0 * g.numel() as f64));
        }
        for d in &mut dispatches {
            (d.layer, d.pass) = ("gradient clipping".to_string(), Pass::Optimizer);
        }
        Ok(ClipGradNorm { max_norm, state: st, dispatches })
    }

    /// Read the last step's norm and coefficient back (waits for the GPU).
    pub fn read(&self, gpu: &Gpu) -> Result<ClipState> {
        let v = self.state.read::<f32>(gpu)?;
        Ok(ClipState { total_norm: v[state::TOTAL_NORM], coef: v[state::COEF] })
    }
}
