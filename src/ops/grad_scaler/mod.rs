//! grad_scaler — host side of `grad_scaler.wgsl`; CPU oracle in `reference.rs` beside it.
//!
//! Dynamic loss scaling for f16 plans with `torch.amp.GradScaler`'s rules and defaults. The state
//! lives on the GPU; a step reads nothing back (the host reads it when it logs).

pub mod reference;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::to_u32;
use crate::gpu::{Bind, Dispatch, Gpu, Pass, Tensor};

/// `torch.amp.GradScaler`'s hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
}

impl Default for GradScalerConfig {
    /// PyTorch's defaults: 2^16, ×2 after 2,000 finite steps, ×0.5 on inf/NaN.
    fn default() -> Self {
        GradScalerConfig { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

/// Layout of the scaler's state buffer (f32; the counters hold u32 bit patterns).
pub mod state {
    pub const SCALE: usize = 0;
    pub const INV_SCALE: usize = 1;
    pub const FOUND_INF: usize = 2;
    pub const TRACKER: usize = 3;
    /// Optimizer steps taken (finite steps).
    pub const STEPS: usize = 4;
    pub const SKIPPED: usize = 5;
    /// Steps skipped since the last finite one.
    pub const SKIPPED_IN_A_ROW: usize = 6;
    pub const LEN: usize = 8;
}

/// Mirrors `Params` in grad_scaler.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len: u32,
    flag_base: u32,
    growth_interval: u32,
    _pad0: u32,
    growth_factor: f32,
    backoff_factor: f32,
    _pad1: [f32; 2],
}

const WG: u32 = 256;
/// Workgroups checking each chunk of gradients.
const GROUPS: u32 = 256;

/// The scaler's state as the log shows it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScalerState {
    pub scale: f32,
    pub growth_tracker: u32,
    pub steps: u32,
    pub skipped: u32,
    pub skipped_in_a_row: u32,
    /// Whether the last step overflowed (and was skipped).
    pub found_inf: bool,
}

pub struct GradScaler {
    pub config: GradScalerConfig,
    /// See [`state`].
    pub state: Tensor,
    /// One check per gradient chunk, then the update: to run after the backward pass and before
    /// the optimizer, which reads `state`.
    pub dispatches: Vec<Dispatch>,
}

impl GradScaler {
    /// A scaler over gradient `chunks` (views of the flat gradient buffer, each within one binding).
    pub fn new(gpu: &Gpu, config: GradScalerConfig, chunks: &[&Tensor]) -> Result<GradScaler> {
        ensure!(!chunks.is_empty(), "grad_scaler: no gradients to check");
        ensure!(
            config.init_scale > 0.0 && config.growth_factor >= 1.0 && (0.0..1.0).contains(&config.backoff_factor),
            "grad_scaler: scale must be positive, growth >= 1 and backoff in (0, 1), got {config:?}"
        );
        let mut init = [0.0f32; state::LEN];
        init[state::SCALE] = config.init_scale as f32;
        init[state::INV_SCALE] = (1.0 / config.init_scale) as f32;
        let st = Tensor::from_slice(gpu, "loss scaler state", &[state::LEN], &init)?;
        let flags = Tensor::zeros(gpu, "loss scaler overflow flags", &[chunks.len() * GROUPS as usize])?;
        let consts = [("WG", WG as f64), ("GROUPS", GROUPS as f64)];
        let params = |len: usize, flag_base: usize| -> Result<wgpu::Buffer> {
            Ok(gpu.uniform(
                "grad_scaler params",
                &Params {
                    len: to_u32("gradients", len)?,
                    flag_base: to_u32("flags", flag_base)?,
                    growth_interval: config.growth_interval,
                    _pad0: 0,
                    growth_factor: config.growth_factor as f32,
                    backoff_factor: config.backoff_factor as f32,
                    _pad1: [0.0; 2],
                },
            ))
        };
        let mut dispatches = Vec::new();
        for (k, g) in chunks.iter().enumerate() {
            let p = params(g.numel(), k * GROUPS as usize)?;
            let binds = [Bind::Uniform(0, &p), Bind::Tensor(1, g), Bind::Tensor(2, &flags)];
            let d = gpu.dispatch("grad_scaler", "grad_scaler_reduce", &consts, &binds, [GROUPS, 1, 1])?;
            dispatches.push(d.with_cost(g.numel() as f64, 4.0 * g.numel() as f64));
        }
        let p = params(flags.numel(), 0)?;
        let binds = [Bind::Uniform(0, &p), Bind::Tensor(2, &flags), Bind::Tensor(3, &st)];
        // The overflow flags read once, the scaler state read and written.
        let d = gpu.dispatch("grad_scaler", "grad_scaler_step", &consts, &binds, [1, 1, 1])?;
        dispatches.push(d.with_cost(flags.numel() as f64, (4 * flags.numel() + 8 * st.numel()) as f64));
        for d in &mut dispatches {
            (d.layer, d.pass) = ("loss scaler".to_string(), Pass::Optimizer);
        }
        Ok(GradScaler { config, state: st, dispatches })
    }

    /// Read the state back (waits for the GPU).
    pub fn read(&self, gpu: &Gpu) -> Result<ScalerState> {
        Ok(ScalerState::from_slice(&self.state.read::<f32>(gpu)?))
    }

    /// Overwrite the state (a resumed run's).
    pub fn write(&self, gpu: &Gpu, s: &ScalerState) -> Result<()> {
        self.state.write(gpu, &s.to_vec())
    }
}

impl ScalerState {
    pub fn from_slice(v: &[f32]) -> ScalerState {
        ScalerState {
            scale: v[state::SCALE],
            growth_tracker: v[state::TRACKER].to_bits(),
            steps: v[state::STEPS].to_bits(),
            skipped: v[state::SKIPPED].to_bits(),
            skipped_in_a_row: v[state::SKIPPED_IN_A_ROW].to_bits(),
            found_inf: v[state::FOUND_INF] != 0.0,
        }
    }

    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0f32; state::LEN];
        v[state::SCALE] = self.scale;
        v[state::INV_SCALE] = 1.0 / self.scale;
        v[state::FOUND_INF] = f32::from(u8::from(self.found_inf));
        v[state::TRACKER] = f32::from_bits(self.growth_tracker);
        v[state::STEPS] = f32::from_bits(self.steps);
        v[state::SKIPPED] = f32::from_bits(self.skipped);
        v[state::SKIPPED_IN_A_ROW] = f32::from_bits(self.skipped_in_a_row);
        v
    }
}
