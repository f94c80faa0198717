//! A whole training step on the CPU: the reference ops composed over a model graph, forward in
//! training mode, loss, backward in reverse order. The GPU step is tested against this.
//!
//! [`train_step_in`] with f16 emulates an f16 plan's storage: the input, the convolution weights,
//! every activation and every activation gradient rounded to f16 where the GPU stores them (the
//! loss gradient after multiplying by the loss scale), the arithmetic in f64; the parameter
//! gradients are divided by the scale at the end.

use std::collections::HashMap;

use anyhow::{Context, Result};

use super::{add, clip_grad_norm, cross_entropy};
use crate::gpu::Precision;
use crate::model::Graph;
use crate::ops::layer::{RefBackward, RefForward, Saved, StepKey, stored};

/// Result of one reference step.
pub struct StepResult {
    pub loss: f64,
    pub correct: usize,
    pub logits: Vec<f64>,
    /// dL/dparam by state-dict name.
    pub grads: HashMap<String, Vec<f64>>,
    /// Updated running statistics by state-dict name (`features.1.running_mean`, …).
    pub buffers: HashMap<String, Vec<f64>>,
}

impl StepResult {
    /// `--clip-grad-norm`: clip every parameter gradient together to total 2-norm `max_norm`
    /// (`torch.nn.utils.clip_grad_norm_` after backward, before the optimizer); returns the
    /// norm before clipping. Summed in name order, so the result does not depend on the map's.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let mut named: Vec<(&String, &mut Vec<f64>)> = self.grads.iter_mut().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let mut slices: Vec<&mut [f64]> = named.into_iter().map(|(_, g)| g.as_mut_slice()).collect();
        clip_grad_norm::clip_grad_norm(&mut slices, max_norm)
    }
}

/// Logits of the eval-mode forward (batch norm on its running statistics) for batch `n`.
pub fn eval_forward(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
) -> Result<Vec<f64>> {
    let f = forward(graph, params, buffers, n, input, false, Precision::F32, [0, 0])?;
    f.acts.last().cloned().context("empty graph")
}

/// Every activation (input first), what the backward needs, the updated running statistics.
struct Forward {
    shapes: Vec<Vec<usize>>,
    acts: Vec<Vec<f64>>,
    saved: Vec<Saved>,
    buffers: HashMap<String, Vec<f64>>,
}

fn param<'a>(params: &'a HashMap<String, Vec<f64>>, name: &str) -> Result<&'a [f64]> {
    params.get(name).map(|v| v.as_slice()).with_context(|| format!("reference: no parameter {name}"))
}

/// The forward over the graph, in training mode (batch statistics, running statistics updated,
/// dropout drawing from `step_key`) or eval mode (running statistics, no dropout).
#[allow(clippy::too_many_arguments)]
fn forward(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    training: bool,
    precision: Precision,
    step_key: StepKey,
) -> Result<Forward> {
    let shapes = graph.shapes(n)?;
    let get = |name: &str| param(params, name);
    let mut acts: Vec<Vec<f64>> = vec![stored(precision, input.to_vec())];
    let mut saved = Vec::new();
    let mut new_buffers = HashMap::new();
    for (k, node) in graph.nodes.iter().enumerate() {
        let r = RefForward {
            name: &node.name,
            inputs: node.inputs.iter().map(|&i| acts[i].as_slice()).collect(),
            shapes: node.inputs.iter().map(|&i| shapes[i].as_slice()).collect(),
            training,
            precision,
            step_key,
            params: &get,
            buffers,
        };
        let f = node.layer.op().reference_forward(&r)?;
        debug_assert_eq!(f.out.len(), shapes[k + 1].iter().product::<usize>());
        for (suffix, v) in f.buffers {
            new_buffers.insert(format!("{}.{suffix}", node.name), v);
        }
        acts.push(stored(precision, f.out));
        saved.push(f.saved);
    }
    Ok(Forward { shapes, acts, saved, buffers: new_buffers })
}

/// Forward (training mode), cross-entropy against `labels`, and backward, for batch `n`.
pub fn train_step(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    labels: &[u32],
) -> Result<StepResult> {
    train_step_with(graph, params, buffers, n, input, labels, &StepOptions::default())
}

/// How a reference step runs: the defaults are an f32 step without label smoothing.
#[derive(Clone, Copy, Debug)]
pub struct StepOptions {
    /// The plan precision emulated (see the module docs).
    pub precision: Precision,
    /// The loss gradient is multiplied by this (an f16 plan's loss scale) and the parameter
    /// gradients divided by it.
    pub loss_scale: f64,
    /// `--label-smoothing` on the loss.
    pub label_smoothing: f64,
    /// What stochastic layers (dropout) draw from (`ops::layer::step_key`).
    pub step_key: StepKey,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions { precision: Precision::F32, loss_scale: 1.0, label_smoothing: 0.0, step_key: [0, 0] }
    }
}

/// [`train_step`] as a `precision` plan stores its tensors, with the loss gradient multiplied by
/// `loss_scale` (f16) and the parameter gradients divided by it.
#[allow(clippy::too_many_arguments)]
pub fn train_step_in(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    labels: &[u32],
    precision: Precision,
    loss_scale: f64,
) -> Result<StepResult> {
    let opts = StepOptions { precision, loss_scale, ..StepOptions::default() };
    train_step_with(graph, params, buffers, n, input, labels, &opts)
}

/// timm's `--grad-accum-steps N` step: the micro-batches `micro` (batch size, input, labels) one
/// after another, each in training mode from the running statistics the previous one left (as
/// PyTorch's batch norm updates them per forward), each loss divided by N = `micro.len()` before
/// backward, the gradients summed in order (`reference::grad_accum`, PyTorch's `.grad` +=).
/// Returns the summed gradients, the last running statistics, the micro-batches' mean loss, their
/// correct count and the last one's logits.
pub fn train_step_accumulated(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    micro: &[(usize, &[f64], &[u32])],
) -> Result<StepResult> {
    use super::grad_accum::{grad_accum_add, grad_accum_finish, grad_accum_store};
    anyhow::ensure!(!micro.is_empty(), "reference: no micro-batches");
    let count = micro.len() as f64;
    let mut buffers = buffers.clone();
    let (mut loss, mut correct, mut logits) = (0.0, 0, Vec::new());
    let mut accum: HashMap<String, Vec<f64>> = HashMap::new();
    let mut grads = HashMap::new();
    for (i, &(n, input, labels)) in micro.iter().enumerate() {
        let r = train_step(graph, params, &buffers, n, input, labels)?;
        buffers.extend(r.buffers);
        (loss, correct, logits) = (loss + r.loss / count, correct + r.correct, r.logits);
        // d(loss / N) = d(loss) / N
        grads = r.grads.into_iter().map(|(k, g)| (k, g.into_iter().map(|v| v / count).collect::<Vec<_>>())).collect();
        if micro.len() == 1 {
            break;
        }
        for (k, g) in &mut grads {
            let a = accum.entry(k.clone()).or_insert_with(|| vec![0.0; g.len()]);
            match i {
                0 => grad_accum_store(g, a),
                i if i + 1 < micro.len() => grad_accum_add(g, a),
                _ => grad_accum_finish(g, a),
            }
        }
    }
    Ok(StepResult { loss, correct, logits, grads, buffers })
}

/// [`train_step`] with label smoothing `label_smoothing` (`--label-smoothing`) on the loss.
pub fn train_step_smoothed(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    labels: &[u32],
    label_smoothing: f64,
) -> Result<StepResult> {
    let opts = StepOptions { label_smoothing, ..StepOptions::default() };
    train_step_with(graph, params, buffers, n, input, labels, &opts)
}

/// [`train_step`] against soft targets [n, classes] (Mixup's: timm's SoftTargetCrossEntropy).
pub fn train_step_soft(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    targets: &[f64],
) -> Result<StepResult> {
    train_step_loss(graph, params, buffers, n, input, Loss::Soft(targets), &StepOptions::default())
}

/// What a step's loss is against.
pub enum Loss<'a> {
    /// Class indices (label-smoothed as `StepOptions::label_smoothing` says).
    Labels(&'a [u32]),
    /// Soft targets [n, classes].
    Soft(&'a [f64]),
}

/// [`train_step`] as `opts` says.
pub fn train_step_with(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    labels: &[u32],
    opts: &StepOptions,
) -> Result<StepResult> {
    train_step_loss(graph, params, buffers, n, input, Loss::Labels(labels), opts)
}

/// [`train_step`] against `loss`, as `opts` says.
pub fn train_step_loss(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    loss: Loss,
    opts: &StepOptions,
) -> Result<StepResult> {
    let StepOptions { precision, loss_scale, label_smoothing, step_key } = *opts;
    let Forward { shapes, acts, saved, buffers: new_buffers } =
        forward(graph, params, buffers, n, input, true, precision, step_key)?;
    let get = |name: &str| param(params, name);
    let logits = acts.last().context("empty graph")?.clone();
    let classes = shapes.last().context("empty graph")?[1];
    let ce = match loss {
        Loss::Labels(labels) => {
            cross_entropy::cross_entropy_forward_backward_smoothed(&logits, labels, classes, label_smoothing)
        }
        Loss::Soft(targets) => cross_entropy::cross_entropy_soft_forward_backward(&logits, targets, classes),
    };

    // Gradients of the activations; an activation read by two layers sums both contributions.
    let mut grads = HashMap::new();
    let mut dacts: Vec<Option<Vec<f64>>> = vec![None; acts.len()];
    dacts[acts.len() - 1] = Some(stored(precision, ce.dlogits.iter().map(|g| g * loss_scale).collect()));
    for (k, node) in graph.nodes.iter().enumerate().rev() {
        let Some(dout) = dacts[k + 1].take() else { continue };
        let mut r = RefBackward {
            name: &node.name,
            inputs: node.inputs.iter().map(|&i| acts[i].as_slice()).collect(),
            shapes: node.inputs.iter().map(|&i| shapes[i].as_slice()).collect(),
            out: &acts[k + 1],
            dout: &dout,
            saved: &saved[k],
            precision,
            step_key,
            params: &get,
            grads: &mut grads,
        };
        let dinputs = node.layer.op().reference_backward(&mut r)?;
        for (&i, g) in node.inputs.iter().zip(dinputs) {
            let g = stored(precision, g);
            dacts[i] = Some(match dacts[i].take() {
                Some(prev) => stored(precision, add::add_forward(&prev, &g)),
                None => g,
            });
        }
    }
    for g in grads.values_mut() {
        g.iter_mut().for_each(|v| *v /= loss_scale);
    }
    Ok(StepResult { loss: ce.loss, correct: ce.correct, logits, grads, buffers: new_buffers })
}
