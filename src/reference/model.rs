//! A whole training step on the CPU: the reference ops composed over a model graph, forward in
//! training mode, loss, backward in reverse order. The GPU step is tested against this.
//!
//! [`train_step_in`] with f16 emulates an f16 plan's storage: the input, the convolution weights,
//! every activation and every activation gradient rounded to f16 where the GPU stores them (the
//! loss gradient after multiplying by the loss scale), the arithmetic in f64; the parameter
//! gradients are divided by the scale at the end.

use std::collections::HashMap;

use anyhow::{Context, Result};

use super::{add, batch_norm, clip_grad_norm, conv2d, cross_entropy, linear, pool, relu, se_block};
use crate::gpu::Precision;
use crate::model::{Graph, Layer, conv_config, pool_config};
use crate::ops::batch_norm::BatchNormConfig;
use crate::ops::linear::LinearConfig;
use crate::ops::se_block::SeBlockConfig;

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

/// What the backward pass needs from each layer's forward.
enum Saved {
    None,
    Bn { mean: Vec<f64>, invstd: Vec<f64> },
    Pool { argmax: Vec<u32> },
    Se(se_block::SeForward),
}

/// Logits of the eval-mode forward (batch norm on its running statistics) for batch `n`.
pub fn eval_forward(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
) -> Result<Vec<f64>> {
    let f = forward(graph, params, buffers, n, input, false, Precision::F32)?;
    f.acts.last().cloned().context("empty graph")
}

/// Round to the nearest f16 (RNE, overflow to ±inf), as an f16 plan stores a value.
fn to_f16(v: &mut [f64]) {
    for x in v {
        *x = f64::from(half::f16::from_f64(*x));
    }
}

/// `v`, rounded as `precision` stores it.
fn stored(precision: Precision, mut v: Vec<f64>) -> Vec<f64> {
    if precision == Precision::F16 {
        to_f16(&mut v);
    }
    v
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

/// The forward over the graph, in training mode (batch statistics, running statistics updated)
/// or eval mode (running statistics).
fn forward(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    training: bool,
    precision: Precision,
) -> Result<Forward> {
    let shapes = graph.shapes(n)?;
    let get = |name: &str| param(params, name);
    let mut acts: Vec<Vec<f64>> = vec![stored(precision, input.to_vec())];
    let mut saved = Vec::new();
    let mut new_buffers = HashMap::new();
    for (k, node) in graph.nodes.iter().enumerate() {
        let inp = &acts[node.inputs[0]];
        let s = &shapes[node.inputs[0]];
        let name = &node.name;
        let p = |suffix: &str| get(&format!("{name}.{suffix}"));
        let (out, sv) = match node.layer {
            Layer::Conv2d { bias, .. } => {
                let cfg = conv_config(&node.layer, s).context("conv")?;
                let b = if bias { Some(p("bias")?) } else { None };
                let w = stored(precision, p("weight")?.to_vec());
                (conv2d::conv2d_forward(&cfg, inp, &w, b), Saved::None)
            }
            Layer::BatchNorm2d { c } => {
                let cfg = BatchNormConfig::new(s[0], c, s[2], s[3]);
                let rm = buffers.get(&format!("{name}.running_mean")).context("running_mean")?;
                let rv = buffers.get(&format!("{name}.running_var")).context("running_var")?;
                if training {
                    let r = batch_norm::batch_norm_forward_train(&cfg, inp, p("weight")?, p("bias")?, rm, rv);
                    new_buffers.insert(format!("{name}.running_mean"), r.running_mean);
                    new_buffers.insert(format!("{name}.running_var"), r.running_var);
                    (r.out, Saved::Bn { mean: r.mean, invstd: r.invstd })
                } else {
                    (batch_norm::batch_norm_forward_eval(&cfg, inp, p("weight")?, p("bias")?, rm, rv), Saved::None)
                }
            }
            Layer::Relu => (relu::relu_forward(inp), Saved::None),
            Layer::MaxPool2d { .. } => {
                let cfg = pool_config(&node.layer, s).context("pool")?;
                let (out, argmax) = pool::max_pool2d_forward(&cfg, inp);
                (out, Saved::Pool { argmax })
            }
            Layer::SeBlock { c, hidden, bias, variant } => {
                let cfg = SeBlockConfig { n: s[0], c, h: s[2], w: s[3], hidden, bias, variant };
                let sp = se_params(&cfg, name, &get)?;
                let f = se_block::se_block_forward(&cfg, inp, &sp);
                (f.out.clone(), Saved::Se(f))
            }
            Layer::GlobalAvgPool => (pool::global_avg_pool_forward([s[0], s[1], s[2], s[3]], inp), Saved::None),
            Layer::Add => (add::add_forward(inp, &acts[node.inputs[1]]), Saved::None),
            Layer::Linear { in_features, out_features, bias } => {
                let cfg = LinearConfig { n, in_features, out_features, bias };
                let b = if bias { Some(p("bias")?) } else { None };
                (linear::linear_forward(&cfg, inp, p("weight")?, b), Saved::None)
            }
        };
        debug_assert_eq!(out.len(), shapes[k + 1].iter().product::<usize>());
        acts.push(stored(precision, out));
        saved.push(sv);
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
    train_step_in(graph, params, buffers, n, input, labels, Precision::F32, 1.0)
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
    train_step_full(graph, params, buffers, n, input, Loss::Labels(labels, 0.0), precision, loss_scale)
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
    train_step_full(graph, params, buffers, n, input, Loss::Labels(labels, label_smoothing), Precision::F32, 1.0)
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
    train_step_full(graph, params, buffers, n, input, Loss::Soft(targets), Precision::F32, 1.0)
}

/// What a step's loss is against.
enum Loss<'a> {
    /// Class indices, with label smoothing.
    Labels(&'a [u32], f64),
    /// Soft targets [n, classes].
    Soft(&'a [f64]),
}

#[allow(clippy::too_many_arguments)]
fn train_step_full(
    graph: &Graph,
    params: &HashMap<String, Vec<f64>>,
    buffers: &HashMap<String, Vec<f64>>,
    n: usize,
    input: &[f64],
    loss: Loss,
    precision: Precision,
    loss_scale: f64,
) -> Result<StepResult> {
    let Forward { shapes, acts, saved, buffers: new_buffers } =
        forward(graph, params, buffers, n, input, true, precision)?;
    let get = |name: &str| param(params, name);
    let logits = acts.last().context("empty graph")?.clone();
    let classes = shapes.last().context("empty graph")?[1];
    let ce = match loss {
        Loss::Labels(labels, e) => cross_entropy::cross_entropy_forward_backward_smoothed(&logits, labels, classes, e),
        Loss::Soft(targets) => cross_entropy::cross_entropy_soft_forward_backward(&logits, targets, classes),
    };

    // Gradients of the activations; an activation read by two layers sums both contributions.
    let mut grads = HashMap::new();
    let mut dacts: Vec<Option<Vec<f64>>> = vec![None; acts.len()];
    dacts[acts.len() - 1] = Some(stored(precision, ce.dlogits.iter().map(|g| g * loss_scale).collect()));
    for (k, node) in graph.nodes.iter().enumerate().rev() {
        let Some(dout) = dacts[k + 1].take() else { continue };
        let a = node.inputs[0];
        let (inp, out, s) = (&acts[a], &acts[k + 1], &shapes[a]);
        let name = &node.name;
        let p = |suffix: &str| get(&format!("{name}.{suffix}"));
        let mut put = |suffix: &str, g: Vec<f64>| {
            grads.insert(format!("{name}.{suffix}"), g);
        };
        let dinputs: Vec<Vec<f64>> = match (&node.layer, &saved[k]) {
            (Layer::Conv2d { bias, .. }, _) => {
                let cfg = conv_config(&node.layer, s).context("conv")?;
                put("weight", conv2d::conv2d_backward_weight(&cfg, inp, &dout));
                if *bias {
                    put("bias", conv2d::conv2d_backward_bias(&cfg, &dout));
                }
                vec![conv2d::conv2d_backward_input(&cfg, &dout, &stored(precision, p("weight")?.to_vec()))]
            }
            (Layer::BatchNorm2d { c }, Saved::Bn { mean, invstd }) => {
                let cfg = BatchNormConfig::new(s[0], *c, s[2], s[3]);
                let (dx, dg, db) = batch_norm::batch_norm_backward(&cfg, inp, p("weight")?, mean, invstd, &dout);
                put("weight", dg);
                put("bias", db);
                vec![dx]
            }
            (Layer::Relu, _) => vec![relu::relu_backward(out, &dout)],
            (Layer::MaxPool2d { .. }, Saved::Pool { argmax }) => {
                let cfg = pool_config(&node.layer, s).context("pool")?;
                vec![pool::max_pool2d_backward(&cfg, argmax, &dout)]
            }
            (Layer::SeBlock { c, hidden, bias, variant }, Saved::Se(f)) => {
                let cfg =
                    SeBlockConfig { n: s[0], c: *c, h: s[2], w: s[3], hidden: *hidden, bias: *bias, variant: *variant };
                let sp = se_params(&cfg, name, &get)?;
                let g = se_block::se_block_backward(&cfg, inp, &sp, f, &dout);
                put("fc1.weight", g.dw1);
                put("fc2.weight", g.dw2);
                if *bias {
                    put("fc1.bias", g.db1);
                    put("fc2.bias", g.db2);
                }
                vec![g.dinp]
            }
            (Layer::GlobalAvgPool, _) => vec![pool::global_avg_pool_backward([s[0], s[1], s[2], s[3]], &dout)],
            (Layer::Linear { in_features, out_features, bias }, _) => {
                let cfg = LinearConfig { n, in_features: *in_features, out_features: *out_features, bias: *bias };
                let (dx, dw, db) = linear::linear_backward(&cfg, inp, p("weight")?, &dout);
                put("weight", dw);
                if *bias {
                    put("bias", db);
                }
                vec![dx]
            }
            (Layer::Add, _) => {
                let (da, db) = add::add_backward(&dout);
                vec![da, db]
            }
            (layer, _) => anyhow::bail!("reference: {name} ({layer:?}) lost its saved forward state"),
        };
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

fn se_params<'a>(
    cfg: &SeBlockConfig,
    name: &str,
    get: &impl Fn(&str) -> Result<&'a [f64]>,
) -> Result<se_block::SeParams<'a>> {
    Ok(se_block::SeParams {
        w1: get(&format!("{name}.fc1.weight"))?,
        b1: if cfg.bias { Some(get(&format!("{name}.fc1.bias"))?) } else { None },
        w2: get(&format!("{name}.fc2.weight"))?,
        b2: if cfg.bias { Some(get(&format!("{name}.fc2.bias"))?) } else { None },
    })
}
