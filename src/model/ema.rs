//! timm's `--model-ema` on the GPU: an exponential moving average of every floating-point entry
//! of the state dict (parameters and batch-norm running statistics) kept in two flat buffers laid
//! out as the network's ([`Network::flat`]'s values, [`Network::bn_flat`]), moved towards the
//! model by one `model_ema_step` dispatch after every optimizer update ([`ModelEmaStep`]), with
//! `ModelEmaV3`'s decay ([`ema_decay`]); `num_batches_tracked` is
//! copied, as `ModelEmaV3` copies integer entries. Nothing is read back in the step.
//!
//! Evaluation swaps the EMA into the network's own buffers ([`Network::swap_ema`], GPU copies)
//! and runs the network's evaluation plans, then swaps back: no second set of plans.

use anyhow::Result;

use super::plan::Network;
use crate::gpu::{Dispatch, Gpu, Tensor};
use crate::ops::model_ema::{ModelEmaStep, ema_decay};

pub struct ModelEma {
    /// `--model-ema-decay`.
    pub decay: f64,
    /// `--model-ema-warmup`.
    pub warmup: bool,
    /// The EMA of the flat parameter buffer (same layout).
    pub values: Tensor,
    /// The EMA of the flat batch-norm buffer (same layout).
    pub bn: Tensor,
    /// Each batch norm's `num_batches_tracked` as of the last update.
    pub num_batches_tracked: Vec<i64>,
    step: ModelEmaStep,
    /// Room for one side of a swap (the larger of the two flat buffers).
    scratch: Tensor,
}

impl ModelEma {
    /// The EMA of `net`, started as a copy of its current parameters and buffers (timm copies the
    /// model when it makes the EMA; its first update copies it again).
    pub fn new(net: &Network, decay: f64, warmup: bool) -> Result<ModelEma> {
        anyhow::ensure!((0.0..=1.0).contains(&decay), "model EMA: the decay must be in [0, 1], got {decay}");
        let gpu = &net.gpu;
        let values = Tensor::flat(gpu, "EMA parameters", &net.flat.values.read::<f32>(gpu)?)?;
        let bn = Tensor::flat(gpu, "EMA batch-norm buffers", &net.bn_flat.read::<f32>(gpu)?)?;
        let scratch = Tensor::flat_zeros(gpu, "EMA swap", values.numel().max(bn.numel()))?;
        let chunks = net.chunks();
        let view = |t: &Tensor, what: &str, (start, len): (usize, usize)| {
            t.view(gpu, &format!("{what} {start}.."), start, &[len])
        };
        let model: Vec<Tensor> =
            chunks.iter().map(|&c| view(&net.flat.values, "parameters", c)).collect::<Result<_>>()?;
        let ema: Vec<Tensor> = chunks.iter().map(|&c| view(&values, "EMA parameters", c)).collect::<Result<_>>()?;
        let pairs: Vec<(&Tensor, &Tensor)> = model.iter().zip(&ema).collect();
        let bn_pair = (net.bn_flat.numel() > 0 && !net.bn.is_empty())
            .then(|| -> Result<(Tensor, Tensor)> {
                let len = net.bn_flat.numel();
                Ok((
                    view(&net.bn_flat, "batch-norm buffers", (0, len))?,
                    view(&bn, "EMA batch-norm buffers", (0, len))?,
                ))
            })
            .transpose()?;
        let step = ModelEmaStep::new(gpu, &pairs, bn_pair.as_ref().map(|(m, e)| (m, e)))?;
        Ok(ModelEma {
            decay,
            warmup,
            values,
            bn,
            num_batches_tracked: net.bn.iter().map(|b| b.num_batches_tracked).collect(),
            step,
            scratch,
        })
    }

    /// The update's dispatches, run after the optimizer's.
    pub fn dispatches(&self) -> &[Dispatch] {
        &self.step.dispatches
    }

    /// Before optimizer update `step` (1-based, as timm's `num_updates`) is submitted: its lerp
    /// weight 1 - decay, and the batch counts the model will have after it.
    pub fn begin_update(&mut self, gpu: &Gpu, step: u64, num_batches_tracked: Vec<i64>) {
        self.step.set_weight(gpu, (1.0 - ema_decay(self.decay, self.warmup, step)) as f32);
        self.num_batches_tracked = num_batches_tracked;
    }
}

impl Network {
    /// Exchange the model's parameters and batch-norm buffers with the EMA's (GPU copies, queued
    /// before the next submit), so the evaluation plans evaluate the EMA. Twice is the identity,
    /// bit for bit. The batch counts stay (evaluation does not read them). Without an EMA, nothing.
    pub fn swap_ema(&self) {
        let Some(ema) = &self.ema else { return };
        let mut enc =
            self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("EMA swap") });
        for (model, avg) in [(&self.flat.values, &ema.values), (&self.bn_flat, &ema.bn)] {
            let bytes = (model.numel() * 4) as u64;
            enc.copy_buffer_to_buffer(&model.buffer, model.offset, &ema.scratch.buffer, 0, bytes);
            enc.copy_buffer_to_buffer(&avg.buffer, avg.offset, &model.buffer, model.offset, bytes);
            enc.copy_buffer_to_buffer(&ema.scratch.buffer, 0, &avg.buffer, avg.offset, bytes);
        }
        self.gpu.queue.submit([enc.finish()]);
    }
}
