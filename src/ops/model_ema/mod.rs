//! model_ema — host side of `model_ema.wgsl`; CPU oracle in `reference.rs` beside it.
//!
//! timm's `--model-ema`: after every optimizer update, ema = lerp(ema, model, 1 - decay) over the
//! flat parameter buffer and the flat batch-norm buffer, in one dispatch (one per binding-sized
//! chunk of parameters past the adapter's largest binding). The decay changes per update (timm's
//! first update copies, `--model-ema-warmup` ramps it), so each dispatch owns a small uniform that
//! [`ModelEmaStep::set_weight`] rewrites (queue write, no allocation) before the step is submitted.

pub mod reference;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{placeholder, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Pass, Tensor};

/// The decay of optimizer update `step` (1-based), as timm's `ModelEmaV3.get_decay(step)` with its
/// defaults (`update_after_step` 0, `min_decay` 0, `warmup_gamma` 1, `warmup_power` 2/3): 0 on the
/// first update (a copy), then `decay`, or with `warmup` min(decay, 1 - (1 + s)^(-2/3)) with
/// s = step - 1. In f64, as timm computes it in Python floats. (The reference has its own,
/// `reference::model_ema::ema_decay`; both are checked against timm's values.)
pub fn ema_decay(decay: f64, warmup: bool, step: u64) -> f64 {
    let s = step.saturating_sub(1);
    match (s, warmup) {
        (0, _) => 0.0,
        (_, true) => (1.0 - (s as f64 + 1.0).powf(-2.0 / 3.0)).clamp(0.0, decay),
        (_, false) => decay,
    }
}

/// Mirrors `Params` in model_ema.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    len_a: u32,
    len_b: u32,
    _pad0: [u32; 2],
    weight: f32,
    _pad1: [f32; 3],
}

const WG: u32 = 256;

/// The EMA update's dispatches and their parameter blocks.
pub struct ModelEmaStep {
    pub dispatches: Vec<Dispatch>,
    /// Per dispatch: its uniform and its (len_a, len_b).
    params: Vec<(wgpu::Buffer, u32, u32)>,
}

impl ModelEmaStep {
    /// ema_a[i] = lerp(ema_a[i], model_a[i], w) over each (model, ema) pair of `a` (views of at
    /// most one binding each: the parameter chunks), and over the pair `b` (the batch-norm
    /// buffers) within the first dispatch. Models and their EMAs must have equal lengths.
    pub fn new(gpu: &Gpu, a: &[(&Tensor, &Tensor)], b: Option<(&Tensor, &Tensor)>) -> Result<ModelEmaStep> {
        ensure!(!a.is_empty(), "model_ema: no parameters");
        for (m, e) in a.iter().chain(&b) {
            ensure!(
                m.numel() == e.numel(),
                "model_ema: {} has {} elements, its EMA {} has {}",
                m.label,
                m.numel(),
                e.label,
                e.numel()
            );
        }
        let unused = (placeholder(gpu)?, placeholder(gpu)?);
        let mut dispatches = Vec::new();
        let mut params = Vec::new();
        for (k, &(m, e)) in a.iter().enumerate() {
            let (mb, eb) = match b.filter(|_| k == 0) {
                Some(pair) => pair,
                None => (&unused.0, &unused.1),
            };
            let len_a = to_u32("parameters", m.numel())?;
            let len_b = if b.is_some() && k == 0 { to_u32("batch-norm buffers", mb.numel())? } else { 0 };
            let total = to_u32("EMA elements", m.numel() + len_b as usize)?;
            let p =
                gpu.uniform("model_ema params", &Params { len_a, len_b, _pad0: [0; 2], weight: 1.0, _pad1: [0.0; 3] });
            let binds = [
                Bind::Uniform(0, &p),
                Bind::Tensor(1, m),
                Bind::Tensor(2, e),
                Bind::Tensor(3, mb),
                Bind::Tensor(4, eb),
            ];
            let grid = gpu.grid_1d(total as usize, WG);
            let mut d = gpu.dispatch("model_ema", "model_ema_step", &[("WG", WG as f64)], &binds, grid)?;
            d = d.with_cost(3.0 * f64::from(total), 12.0 * f64::from(total));
            (d.layer, d.pass) = ("model EMA".to_string(), Pass::Optimizer);
            dispatches.push(d);
            params.push((p, len_a, len_b));
        }
        Ok(ModelEmaStep { dispatches, params })
    }

    /// The lerp weight (1 - decay, rounded to f32) of the next submit.
    pub fn set_weight(&self, gpu: &Gpu, weight: f32) {
        for (buffer, len_a, len_b) in &self.params {
            let p = Params { len_a: *len_a, len_b: *len_b, _pad0: [0; 2], weight, _pad1: [0.0; 3] };
            gpu.queue.write_buffer(buffer, 0, bytemuck::bytes_of(&p));
        }
    }
}
