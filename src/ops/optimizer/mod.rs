//! optimizer (Adam, AdamW, SGD) — host side of `optimizer.wgsl`; CPU oracle in
//! `reference.rs` beside it.
//!
//! The step number changes every step, so each update owns a small uniform buffer that
//! [`OptimizerStep::set_step`] rewrites (queue write, no allocation) before the step is submitted.

pub mod reference;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use super::to_u32;
use crate::gpu::{Bind, Dispatch, Gpu, Tensor};

/// Hyper-parameters, named and defaulted as `torch.optim`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerConfig {
    /// `torch.optim.Adam` (L2 weight decay added to the gradient) or, with `decoupled`,
    /// `torch.optim.AdamW` (weight decay applied to the parameter).
    Adam { lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, decoupled: bool },
    /// `torch.optim.SGD`.
    Sgd { lr: f64, momentum: f64, dampening: f64, weight_decay: f64, nesterov: bool },
}

impl OptimizerConfig {
    pub fn adam(lr: f64) -> Self {
        OptimizerConfig::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: false }
    }

    /// AdamW with PyTorch's default weight decay 0.01.
    pub fn adamw(lr: f64) -> Self {
        OptimizerConfig::Adam { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, decoupled: true }
    }

    pub fn sgd(lr: f64, momentum: f64) -> Self {
        OptimizerConfig::Sgd { lr, momentum, dampening: 0.0, weight_decay: 0.0, nesterov: false }
    }

    /// The same optimizer with learning rate `lr`.
    pub fn with_lr(self, lr: f64) -> Self {
        match self {
            OptimizerConfig::Adam { beta1, beta2, eps, weight_decay, decoupled, .. } => {
                OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, decoupled }
            }
            OptimizerConfig::Sgd { momentum, dampening, weight_decay, nesterov, .. } => {
                OptimizerConfig::Sgd { lr, momentum, dampening, weight_decay, nesterov }
            }
        }
    }

    /// Optimizer state tensors per parameter: Adam's two moments, SGD's momentum buffer.
    pub fn state_count(&self) -> usize {
        match self {
            OptimizerConfig::Adam { .. } => 2,
            OptimizerConfig::Sgd { momentum, .. } => usize::from(*momentum != 0.0),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, .. } => {
                ensure!(lr >= 0.0 && lr.is_finite(), "adam: lr must be >= 0, got {lr}");
                ensure!((0.0..1.0).contains(&beta1), "adam: beta1 must be in [0, 1), got {beta1}");
                ensure!((0.0..1.0).contains(&beta2), "adam: beta2 must be in [0, 1), got {beta2}");
                ensure!(eps >= 0.0, "adam: eps must be >= 0, got {eps}");
                ensure!(weight_decay >= 0.0, "adam: weight_decay must be >= 0, got {weight_decay}");
            }
            OptimizerConfig::Sgd { lr, momentum, dampening, weight_decay, nesterov } => {
                ensure!(lr >= 0.0 && lr.is_finite(), "sgd: lr must be >= 0, got {lr}");
                ensure!(momentum >= 0.0, "sgd: momentum must be >= 0, got {momentum}");
                ensure!(weight_decay >= 0.0, "sgd: weight_decay must be >= 0, got {weight_decay}");
                ensure!(
                    !nesterov || (momentum > 0.0 && dampening == 0.0),
                    "sgd: Nesterov momentum requires a momentum and zero dampening"
                );
            }
        }
        Ok(())
    }
}

/// Mirrors `AdamParams` in optimizer.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AdamParams {
    offset: u32,
    len: u32,
    decoupled: u32,
    _pad0: u32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    weight_decay: f32,
    decay_factor: f32,
    step_size: f32,
    bc2_sqrt: f32,
    lr: f32,
    ln_beta1: f32,
    ln_beta2: f32,
    _pad1: f32,
}

/// Mirrors `SgdParams` in optimizer.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SgdParams {
    offset: u32,
    len: u32,
    nesterov: u32,
    first_step: u32,
    lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    weight_decay: f32,
}

const WG: u32 = 256;

/// The update of one parameter range, recorded once and replayed every step.
pub struct OptimizerStep {
    pub config: OptimizerConfig,
    offset: u32,
    len: u32,
    params: wgpu::Buffer,
    pub dispatch: Dispatch,
}

impl OptimizerStep {
    /// Build the update of `param[offset..offset+len]` from `grad`, with state tensors
    /// (`config.state_count()` of them, each as large as `param`, zero-initialised).
    pub fn new(
        gpu: &Gpu,
        config: OptimizerConfig,
        param: &Tensor,
        grad: &Tensor,
        state: &[&Tensor],
        offset: usize,
        len: usize,
    ) -> Result<OptimizerStep> {
        OptimizerStep::new_scaled(gpu, config, param, grad, state, offset, len, None)
    }

    /// [`OptimizerStep::new`] reading a loss scaler's state (`ops::grad_scaler`): the step is
    /// skipped when the gradients overflowed, else they are unscaled first.
    #[allow(clippy::too_many_arguments)]
    pub fn new_scaled(
        gpu: &Gpu,
        config: OptimizerConfig,
        param: &Tensor,
        grad: &Tensor,
        state: &[&Tensor],
        offset: usize,
        len: usize,
        scaler: Option<&Tensor>,
    ) -> Result<OptimizerStep> {
        config.validate()?;
        check_shapes(&config, param, grad, state, offset, len)?;
        let (offset, len) = (to_u32("offset", offset)?, to_u32("length", len)?);
        gpu.stats.alloc(64);
        let params = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("optimizer params"),
            contents: &params_bytes(&config, offset, len, 1),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        });
        let consts = [("WG", WG as f64), ("SCALED", f64::from(u8::from(scaler.is_some())))];
        let grid = gpu.grid_1d(len as usize, WG);
        let no_scaler = super::placeholder(gpu)?;
        let scaler = scaler.unwrap_or(&no_scaler);
        let launch = Launch { gpu, params: &params, param, grad, scaler, consts: &consts, grid, len };
        let dispatch = match config {
            OptimizerConfig::Adam { .. } => launch.adam(state)?,
            OptimizerConfig::Sgd { momentum, .. } => launch.sgd(state, momentum)?,
        };
        Ok(OptimizerStep { config, offset, len, params, dispatch })
    }

    /// Set the 1-based step number (bias corrections, SGD's first step) for the next submit.
    pub fn set_step(&self, gpu: &Gpu, step: u64) {
        self.write_params(gpu, step.max(1));
    }

    fn write_params(&self, gpu: &Gpu, step: u64) {
        gpu.queue.write_buffer(&self.params, 0, &params_bytes(&self.config, self.offset, self.len, step));
    }
}

/// The gradient, the range and every state tensor against the parameter.
fn check_shapes(
    config: &OptimizerConfig,
    param: &Tensor,
    grad: &Tensor,
    state: &[&Tensor],
    offset: usize,
    len: usize,
) -> Result<()> {
    ensure!(
        grad.numel() == param.numel(),
        "optimizer: gradient has {} elements, parameter {}",
        grad.numel(),
        param.numel()
    );
    ensure!(
        offset + len <= param.numel(),
        "optimizer: range {offset}..{} outside a parameter of {}",
        offset + len,
        param.numel()
    );
    ensure!(
        state.len() == config.state_count(),
        "optimizer: {} state tensors given, {} needed",
        state.len(),
        config.state_count()
    );
    for s in state {
        ensure!(s.numel() == param.numel(), "optimizer: state has {} elements, parameter {}", s.numel(), param.numel());
    }
    Ok(())
}

/// What both update kernels bind and launch with: the uniform block, the parameter and its
/// gradient, the loss scaler's state (a placeholder when unscaled), the constants and the grid.
struct Launch<'a> {
    gpu: &'a Gpu,
    params: &'a wgpu::Buffer,
    param: &'a Tensor,
    grad: &'a Tensor,
    scaler: &'a Tensor,
    consts: &'a [(&'a str, f64)],
    grid: [u32; 3],
    len: u32,
}

impl Launch<'_> {
    /// `adam_step`: the two moments in `state`.
    fn adam(&self, state: &[&Tensor]) -> Result<Dispatch> {
        let binds = [
            Bind::Uniform(0, self.params),
            Bind::Tensor(2, self.param),
            Bind::Tensor(3, self.grad),
            Bind::Tensor(4, state[0]),
            Bind::Tensor(5, state[1]),
            Bind::Tensor(7, self.scaler),
        ];
        // Each parameter, m and v read and written, its gradient read (and the loss
        // scale); about a dozen flops per parameter (the moments, bias corrections, sqrt).
        let n = f64::from(self.len);
        Ok(self
            .gpu
            .dispatch("optimizer", "adam_step", self.consts, &binds, self.grid)?
            .with_cost(12.0 * n, 28.0 * n + 4.0))
    }

    /// `sgd_step`: the momentum buffer in `state` when `momentum` is not 0 (else a one-element
    /// stand-in the kernel never reads).
    fn sgd(&self, state: &[&Tensor], momentum: f64) -> Result<Dispatch> {
        let unused;
        let buf = if momentum != 0.0 {
            state[0]
        } else {
            unused = Tensor::zeros(self.gpu, "unused momentum", &[1])?;
            &unused
        };
        let binds = [
            Bind::Uniform(0, self.params),
            Bind::Tensor(2, self.param),
            Bind::Tensor(3, self.grad),
            Bind::Tensor(6, buf),
            Bind::Tensor(7, self.scaler),
        ];
        // Each parameter read and written and its gradient read, and the momentum buffer
        // read and written when there is one.
        let (n, state_bytes) = (f64::from(self.len), if momentum != 0.0 { 8.0 } else { 0.0 });
        Ok(self
            .gpu
            .dispatch("optimizer", "sgd_step", self.consts, &binds, self.grid)?
            .with_cost(4.0 * n, (12.0 + state_bytes) * n + 4.0))
    }
}

/// The uniform block for step `step` (1-based).
fn params_bytes(config: &OptimizerConfig, offset: u32, len: u32, step: u64) -> Vec<u8> {
    match *config {
        OptimizerConfig::Adam { lr, beta1, beta2, eps, weight_decay, decoupled } => {
            // As torch.optim.Adam computes them, in double precision.
            let t = step as f64;
            let bc1 = 1.0 - beta1.powf(t);
            let bc2 = 1.0 - beta2.powf(t);
            bytemuck::bytes_of(&AdamParams {
                offset,
                len,
                decoupled: u32::from(decoupled),
                _pad0: 0,
                one_minus_beta1: (1.0 - beta1) as f32,
                beta2: beta2 as f32,
                one_minus_beta2: (1.0 - beta2) as f32,
                eps: eps as f32,
                weight_decay: weight_decay as f32,
                decay_factor: (1.0 - lr * weight_decay) as f32,
                step_size: (lr / bc1) as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                lr: lr as f32,
                ln_beta1: beta1.ln() as f32,
                ln_beta2: beta2.ln() as f32,
                _pad1: 0.0,
            })
            .to_vec()
        }
        OptimizerConfig::Sgd { lr, momentum, dampening, weight_decay, nesterov } => bytemuck::bytes_of(&SgdParams {
            offset,
            len,
            nesterov: u32::from(nesterov),
            first_step: u32::from(step == 1),
            lr: lr as f32,
            momentum: momentum as f32,
            one_minus_dampening: (1.0 - dampening) as f32,
            weight_decay: weight_decay as f32,
        })
        .to_vec(),
    }
}
