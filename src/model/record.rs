//! Recording a [`StepPlan`]: the walk over the graph that allocates one activation and one
//! gradient buffer per activation, records every layer's forward (training and evaluation) and
//! backward dispatches, sums the two gradients of a forked activation, and ends with the loss.
//!
//! The order is the step's: the forward in layer order (training and evaluation lists side by
//! side), the loss, then every layer's backward in reverse order. Two plan-wide rewrites happen
//! here rather than in the layers: a batch norm whose only reader is a ReLU runs with the ReLU
//! fused in ([`fused_bn_relu`]), and an f16 plan casts the f32 input batch first.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};

use super::plan::{BnExchange, ExchangeKind, Network, SeSaved, StepPlan};
use super::{Layer, Node, conv_config, pool_config};
use crate::gpu::{Dispatch, Gpu, Pass, Precision, Tensor};
use crate::ops::batch_norm::{self, BatchNormConfig, BnBackward};
use crate::ops::cast;
use crate::ops::conv2d::{ConvBuffers, ConvKernel, ConvPass};
use crate::ops::cross_entropy::{self, result};
use crate::ops::se_block::{self, SeBlockConfig, SeGrads, SeWeights};
use crate::ops::{add, conv2d, linear, pool, relu};

/// For every node, whether it is a batch norm whose only reader is the ReLU right after it: it
/// then runs with the ReLU fused in (see batch_norm.wgsl) and writes the ReLU's output, the ReLU
/// records nothing, and the BN's own output and its gradient are never touched.
fn fused_bn_relu(nodes: &[Node], consumers: &[Vec<usize>]) -> Vec<bool> {
    (0..nodes.len())
        .map(|k| {
            matches!(nodes[k].layer, Layer::BatchNorm2d { .. })
                && consumers[k + 1] == [k + 1]
                && matches!(nodes.get(k + 1).map(|r| &r.layer), Some(Layer::Relu))
        })
        .collect()
}

/// One layer's share of the step: the backward dispatches (run in reverse layer order) and, under
/// `--sync-bn`, the point inside them where the ranks exchange.
#[derive(Default)]
struct Backward {
    dispatches: Vec<Dispatch>,
    exchange: Option<BnExchange>,
}

/// The buffers one node reads and writes.
struct Io<'a> {
    inp: &'a Tensor,
    out: &'a Tensor,
    dinp: &'a Tensor,
    dout: &'a Tensor,
}

/// A plan being recorded: the buffers allocated up front and the dispatch lists built layer by
/// layer.
pub(super) struct Recorder<'a> {
    net: &'a Network,
    gpu: &'a Gpu,
    n: usize,
    consumers: Vec<Vec<usize>>,
    fused: Vec<bool>,
    input_f32: Option<Tensor>,
    acts: Vec<Tensor>,
    grads: Vec<Tensor>,
    /// The loss's buffers: u32 labels [n], per-sample (loss, correct, prediction), the running
    /// metric sums of training and of evaluation.
    labels: Tensor,
    per_sample: Tensor,
    train_result: Tensor,
    eval_result: Tensor,
    /// The gradient buffer of input `j` of node `k` where its activation has two readers (the fork
    /// before a residual block): one per reader, summed after the first reader's backward.
    contrib: HashMap<(usize, usize), Tensor>,
    train: Vec<Dispatch>,
    eval: Vec<Dispatch>,
    /// `--sync-bn`: the forward's exchanges, at indices of `train`.
    exchanges: Vec<BnExchange>,
    se_saved: Vec<SeSaved>,
    conv_kernels: Vec<(String, ConvPass, ConvKernel)>,
}

impl<'a> Recorder<'a> {
    /// Allocate the activations, their gradients (labelled by what they hold, as GPU captures and
    /// validation messages show them: "input", "features.4 output", "layer2.0.se output grad")
    /// and the per-reader gradients of forked activations.
    pub(super) fn new(net: &'a Network, n: usize) -> Result<Recorder<'a>> {
        let gpu = &*net.gpu;
        let graph = &net.graph;
        let shapes = graph.shapes(n)?;
        let consumers = graph.consumers();
        let fused = fused_bn_relu(&graph.nodes, &consumers);
        let act_name =
            |i: usize| if i == 0 { "input".to_string() } else { format!("{} output", graph.nodes[i - 1].name) };
        let dtype = net.precision.dtype();
        let buffers = |suffix: &str| {
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    // A fused BN's own output is never touched: a 1-element placeholder.
                    let unused = i > 0 && fused[i - 1];
                    Tensor::zeros_of(gpu, &format!("{}{suffix}", act_name(i)), if unused { &[1][..] } else { s }, dtype)
                })
                .collect::<Result<Vec<_>>>()
        };
        let (acts, grads) = (buffers("")?, buffers(" grad")?);
        let input_f32 = match net.precision {
            Precision::F16 => Some(Tensor::zeros(gpu, "input (f32)", &shapes[0])?),
            Precision::F32 => None,
        };
        let labels = Tensor::zeros(gpu, "labels", &[n])?;
        let per_sample = Tensor::zeros(gpu, "per-sample loss", &[n, cross_entropy::per_sample::LEN])?;
        let train_result = Tensor::zeros(gpu, "train metrics", &[result::LEN])?;
        let eval_result = Tensor::zeros(gpu, "eval metrics", &[result::LEN])?;
        let mut contrib = HashMap::new();
        for (a, readers) in consumers.iter().enumerate() {
            ensure!(readers.len() <= 2, "activation {a} is read by {} layers; at most 2 are supported", readers.len());
            if readers.len() == 2 {
                for &k in readers {
                    for (j, _) in graph.nodes[k].inputs.iter().enumerate().filter(|(_, i)| **i == a) {
                        let label = format!("{} grad from {}", act_name(a), graph.nodes[k].name);
                        contrib.insert((k, j), Tensor::zeros_of(gpu, &label, &shapes[a], dtype)?);
                    }
                }
            }
        }
        Ok(Recorder {
            net,
            gpu,
            n,
            consumers,
            fused,
            input_f32,
            acts,
            grads,
            labels,
            per_sample,
            train_result,
            eval_result,
            contrib,
            train: Vec::new(),
            eval: Vec::new(),
            exchanges: Vec::new(),
            se_saved: Vec::new(),
            conv_kernels: Vec::new(),
        })
    }

    /// Record the whole step and hand over the plan.
    pub(super) fn record(mut self) -> Result<StepPlan> {
        let logits_shape = self.acts.last().context("empty graph")?.shape.clone();
        ensure!(logits_shape.len() == 2, "the network must end in [n, classes], got {logits_shape:?}");
        self.cast_input()?;
        let mut backward = Vec::with_capacity(self.net.graph.nodes.len());
        for k in 0..self.net.graph.nodes.len() {
            backward.push(self.record_node(k)?);
        }
        self.record_loss()?;
        for b in backward.into_iter().rev() {
            if let Some(mut x) = b.exchange {
                x.at += self.train.len();
                self.exchanges.push(x);
            }
            self.train.extend(b.dispatches);
        }
        Ok(StepPlan {
            n: self.n,
            input_f32: self.input_f32,
            acts: self.acts,
            grads: self.grads,
            labels: self.labels,
            per_sample: self.per_sample,
            train_result: self.train_result,
            eval_result: self.eval_result,
            se_saved: self.se_saved,
            conv_kernels: self.conv_kernels,
            train: self.train,
            eval: self.eval,
            exchanges: self.exchanges,
        })
    }

    /// The host writes f32 images; an f16 plan casts them into its input first.
    fn cast_input(&mut self) -> Result<()> {
        let Some(t) = &self.input_f32 else { return Ok(()) };
        let _scope = self.gpu.label_scope("input");
        for mut d in cast::cast_forward(self.gpu, t, &self.acts[0])? {
            (d.layer, d.pass) = ("input".to_string(), Pass::Forward);
            self.train.push(d.clone());
            self.eval.push(d);
        }
        Ok(())
    }

    /// The gradient buffer input `j` of node `k` writes.
    fn target(&self, k: usize, j: usize) -> &Tensor {
        let a = self.net.graph.nodes[k].inputs[j];
        self.contrib.get(&(k, j)).unwrap_or(&self.grads[a])
    }

    /// Node `k`'s forward dispatches (appended to the training and evaluation lists, labelled with
    /// its name) and its backward ones, returned for the reverse pass.
    fn record_node(&mut self, k: usize) -> Result<Backward> {
        let net = self.net;
        let node = &net.graph.nodes[k];
        let (train0, eval0) = (self.train.len(), self.eval.len());
        // Bind groups and parameter blocks made for this layer carry its name.
        let _scope = self.gpu.label_scope(&node.name);
        let mut bwd = match node.layer {
            Layer::Conv2d { bias, .. } => self.conv2d(k, bias)?,
            Layer::BatchNorm2d { c } => self.batch_norm(k, c)?,
            // Fused into the BN before it.
            Layer::Relu if k > 0 && self.fused[k - 1] => Backward::default(),
            Layer::Relu => self.relu(k)?,
            Layer::MaxPool2d { .. } => self.max_pool(k)?,
            Layer::SeBlock { c, reduction, bias, variant } => {
                let s = &self.acts[node.inputs[0]].shape;
                let cfg = SeBlockConfig { n: s[0], c, h: s[2], w: s[3], reduction, bias, variant };
                self.se_block(k, cfg)?
            }
            Layer::GlobalAvgPool => self.global_avg_pool(k)?,
            Layer::Linear { in_features, out_features, bias } => {
                self.linear(k, linear::LinearConfig { n: self.n, in_features, out_features, bias })?
            }
            Layer::Add => self.add(k)?,
        };
        bwd.dispatches.extend(self.fork_sums(k)?);
        for d in self.train[train0..].iter_mut().chain(&mut self.eval[eval0..]) {
            (d.layer, d.pass) = (node.name.clone(), Pass::Forward);
        }
        for d in &mut bwd.dispatches {
            (d.layer, d.pass) = (node.name.clone(), Pass::Backward);
        }
        Ok(bwd)
    }

    /// Node `k`'s buffers: its first input, its output and their gradients.
    fn io(&self, k: usize) -> Io<'_> {
        let a = self.net.graph.nodes[k].inputs[0];
        Io { inp: &self.acts[a], out: &self.acts[k + 1], dinp: self.target(k, 0), dout: &self.grads[k + 1] }
    }

    /// A forward that training and evaluation run alike.
    fn forward_both(&mut self, fwd: Vec<Dispatch>) {
        self.train.extend(fwd.iter().cloned());
        self.eval.extend(fwd);
    }

    /// Where node `k` is the first reader of a forked activation, the sum of the two readers'
    /// gradient contributions, after its backward (the last of the two to run in reverse order).
    fn fork_sums(&self, k: usize) -> Result<Vec<Dispatch>> {
        let nodes = &self.net.graph.nodes;
        let mut out = Vec::new();
        for &i in &nodes[k].inputs {
            if self.consumers[i].len() == 2 && self.consumers[i][0] == k && i > 0 {
                let [r0, r1] = [self.consumers[i][0], self.consumers[i][1]];
                let slot = |r: usize| nodes[r].inputs.iter().position(|&x| x == i).unwrap_or(0);
                out.extend(add::add_forward(
                    self.gpu,
                    self.target(r0, slot(r0)),
                    self.target(r1, slot(r1)),
                    &self.grads[i],
                )?);
            }
        }
        Ok(out)
    }

    fn conv2d(&mut self, k: usize, bias: bool) -> Result<Backward> {
        let (net, gpu) = (self.net, self.gpu);
        let node = &net.graph.nodes[k];
        let name = &node.name;
        let io = self.io(k);
        let cfg = conv_config(&node.layer, &io.inp.shape).context("conv config")?;
        let w = net.param(&format!("{name}.weight"))?;
        let b = if bias { Some(net.param(&format!("{name}.bias"))?) } else { None };
        // An f16 plan's GEMMs read the f16 copy of the weights.
        let bufs = ConvBuffers {
            inp: io.inp,
            weight: w.half.as_ref().unwrap_or(&w.value),
            bias: b.map(|b| &b.value),
            out: io.out,
            dout: io.dout,
            dinp: io.dinp,
            dweight: &w.grad,
        };
        // Each pass runs the kernel the tuner chose for this shape; the network input needs no
        // gradient.
        let passes: &[ConvPass] = if node.inputs[0] != 0 {
            &[ConvPass::Forward, ConvPass::BackwardInput, ConvPass::BackwardWeight]
        } else {
            &[ConvPass::Forward, ConvPass::BackwardWeight]
        };
        let (mut fwd, mut bwd, mut kernels) = (Vec::new(), Vec::new(), Vec::new());
        for &pass in passes {
            // Tuned in the plan's precision: an f16 plan's built-in choice is cooperative matrices
            // where the adapter lists them (conv2d::builtin).
            let chosen = conv2d::choose(gpu, &cfg, pass, net.precision)?;
            let (d, kernel) = conv2d::conv2d_pass_chosen(gpu, &cfg, pass, chosen, &bufs)?;
            kernels.push((name.clone(), pass, kernel));
            if pass == ConvPass::Forward { fwd.extend(d) } else { bwd.extend(d) }
        }
        if let Some(b) = b {
            bwd.extend(conv2d::conv2d_backward_bias(gpu, &cfg, io.dout, &b.grad)?);
        }
        self.conv_kernels.extend(kernels);
        self.forward_both(fwd);
        Ok(Backward { dispatches: bwd, exchange: None })
    }

    fn batch_norm(&mut self, k: usize, c: usize) -> Result<Backward> {
        let (net, gpu) = (self.net, self.gpu);
        let name = &net.graph.nodes[k].name;
        let io = self.io(k);
        let s = &io.inp.shape;
        let mut cfg = BatchNormConfig::new(s[0], c, s[2], s[3]);
        // Fused: the ReLU's output and its gradient stand in for the BN's.
        let (out, dout, relu_out) = if self.fused[k] {
            cfg = cfg.with_relu();
            (&self.acts[k + 2], &self.grads[k + 2], Some(&self.acts[k + 2]))
        } else {
            (io.out, io.dout, None)
        };
        let (g, b, rs) =
            (net.param(&format!("{name}.weight"))?, net.param(&format!("{name}.bias"))?, net.bn_buffers(name)?);
        let stats = Tensor::zeros(gpu, &format!("{name} batch statistics"), &[2, c])?;
        let t = batch_norm::BnForward {
            inp: io.inp,
            gamma: &g.value,
            beta: &b.value,
            running_mean: &rs.running_mean,
            running_var: &rs.running_var,
            stats: &stats,
            out,
        };
        let eval = batch_norm::batch_norm_forward_eval(gpu, &cfg, &t)?;
        let gb = BnBackward {
            inp: io.inp,
            gamma: &g.value,
            stats: &stats,
            relu_out,
            dout,
            dinp: io.dinp,
            dgamma: &g.grad,
            dbeta: &b.grad,
        };
        let (mut train, mut bwd, mut exchange) = (Vec::new(), Vec::new(), None);
        let mut fwd_exchange = None;
        if net.sync_bn {
            // SyncBatchNorm: each pass in two halves around the ranks' exchange.
            let buffer = |what: &str| Tensor::zeros(gpu, &format!("{name} {what}"), &[batch_norm::ROWS, c]);
            let (welford, sums) = (buffer("rank statistics")?, buffer("rank gradient sums")?);
            train.extend(batch_norm::batch_norm_forward_stats(gpu, &cfg, io.inp, &welford)?);
            let x = BnExchange::new(name, ExchangeKind::Statistics, welford, self.train.len() + train.len());
            train.extend(batch_norm::batch_norm_forward_apply(gpu, &cfg, &t, &x.buffer)?);
            fwd_exchange = Some(x);
            bwd.extend(batch_norm::batch_norm_backward_sums(gpu, &cfg, &gb, &sums)?);
            let x = BnExchange::new(name, ExchangeKind::GradSums, sums, bwd.len());
            bwd.extend(batch_norm::batch_norm_backward_input(gpu, &cfg, &gb, &x.buffer)?);
            exchange = Some(x);
        } else {
            train.extend(batch_norm::batch_norm_forward_train(gpu, &cfg, &t)?);
            bwd.extend(batch_norm::batch_norm_backward(
                gpu, &cfg, io.inp, &g.value, &stats, relu_out, dout, io.dinp, &g.grad, &b.grad,
            )?);
        }
        // Evaluation normalises with the running statistics.
        self.eval.extend(eval);
        self.train.extend(train);
        self.exchanges.extend(fwd_exchange);
        Ok(Backward { dispatches: bwd, exchange })
    }

    fn relu(&mut self, k: usize) -> Result<Backward> {
        let io = self.io(k);
        let fwd = relu::relu_forward(self.gpu, io.inp, io.out)?;
        let bwd = relu::relu_backward(self.gpu, io.out, io.dout, io.dinp)?;
        self.forward_both(fwd);
        Ok(Backward { dispatches: bwd, exchange: None })
    }

    fn max_pool(&mut self, k: usize) -> Result<Backward> {
        let node = &self.net.graph.nodes[k];
        let io = self.io(k);
        let cfg = pool_config(&node.layer, &io.inp.shape).context("pool config")?;
        let argmax = Tensor::zeros(self.gpu, &format!("{} argmax", node.name), &cfg.output_shape())?;
        let fwd = pool::max_pool2d_forward(self.gpu, &cfg, io.inp, io.out, &argmax)?;
        let bwd = pool::max_pool2d_backward(self.gpu, &cfg, &argmax, io.dout, io.dinp)?;
        self.forward_both(fwd);
        Ok(Backward { dispatches: bwd, exchange: None })
    }

    fn se_block(&mut self, k: usize, cfg: SeBlockConfig) -> Result<Backward> {
        let (net, gpu) = (self.net, self.gpu);
        let name = &net.graph.nodes[k].name;
        let io = self.io(k);
        let p = |suffix: &str| net.param(&format!("{name}.{suffix}"));
        let (w1, w2) = (p("fc1.weight")?, p("fc2.weight")?);
        let (b1, b2) = if cfg.bias { (Some(p("fc1.bias")?), Some(p("fc2.bias")?)) } else { (None, None) };
        let weights = SeWeights { w1: &w1.value, b1: b1.map(|b| &b.value), w2: &w2.value, b2: b2.map(|b| &b.value) };
        let saved = Tensor::zeros(gpu, &format!("{name} saved"), &cfg.saved_shape())?;
        let dsaved = Tensor::zeros(gpu, &format!("{name} saved grads"), &cfg.dsaved_shape())?;
        let fwd = se_block::se_block_forward(gpu, &cfg, io.inp, &weights, io.out, &saved)?;
        let g =
            SeGrads { dinp: io.dinp, dw1: &w1.grad, db1: b1.map(|b| &b.grad), dw2: &w2.grad, db2: b2.map(|b| &b.grad) };
        let bwd = se_block::se_block_backward(gpu, &cfg, io.inp, &weights, &saved, io.dout, &dsaved, &g)?;
        self.forward_both(fwd);
        self.se_saved.push(SeSaved { name: name.clone(), c: cfg.c, hidden: cfg.hidden(), saved });
        Ok(Backward { dispatches: bwd, exchange: None })
    }

    fn global_avg_pool(&mut self, k: usize) -> Result<Backward> {
        let io = self.io(k);
        let fwd = pool::global_avg_pool_forward(self.gpu, io.inp, io.out)?;
        let bwd = pool::global_avg_pool_backward(self.gpu, io.dout, io.dinp)?;
        self.forward_both(fwd);
        Ok(Backward { dispatches: bwd, exchange: None })
    }

    fn linear(&mut self, k: usize, cfg: linear::LinearConfig) -> Result<Backward> {
        let (net, gpu) = (self.net, self.gpu);
        let name = &net.graph.nodes[k].name;
        let io = self.io(k);
        let w = net.param(&format!("{name}.weight"))?;
        let b = if cfg.bias { Some(net.param(&format!("{name}.bias"))?) } else { None };
        let fwd = linear::linear_forward(gpu, &cfg, io.inp, &w.value, b.map(|b| &b.value), io.out)?;
        let bwd = linear::linear_backward(gpu, &cfg, io.inp, &w.value, io.dout, io.dinp, &w.grad, b.map(|b| &b.grad))?;
        self.forward_both(fwd);
        Ok(Backward { dispatches: bwd, exchange: None })
    }

    fn add(&mut self, k: usize) -> Result<Backward> {
        let node = &self.net.graph.nodes[k];
        let io = self.io(k);
        let fwd = add::add_forward(self.gpu, io.inp, &self.acts[node.inputs[1]], io.out)?;
        let bwd = add::add_backward(self.gpu, io.dout, io.dinp, self.target(k, 1))?;
        self.forward_both(fwd);
        Ok(Backward { dispatches: bwd, exchange: None })
    }

    /// The loss and its gradient: label-smoothed for training, plain cross-entropy for evaluation,
    /// both scaled by an f16 plan's loss scale.
    fn record_loss(&mut self) -> Result<()> {
        let (gpu, net) = (self.gpu, self.net);
        let (labels, per_sample) = (&self.labels, &self.per_sample);
        let (train_result, eval_result) = (&self.train_result, &self.eval_result);
        let (logits, dlogits) = (&self.acts[self.acts.len() - 1], &self.grads[self.grads.len() - 1]);
        let (train0, eval0) = (self.train.len(), self.eval.len());
        let _scope = gpu.label_scope("loss");
        let scale = net.scaler.as_ref().map(|s| &s.state);
        let train = cross_entropy::cross_entropy_forward_backward_smoothed(
            gpu,
            logits,
            labels,
            dlogits,
            per_sample,
            train_result,
            net.label_smoothing,
            scale,
        )?;
        let eval = cross_entropy::cross_entropy_forward_backward(
            gpu,
            logits,
            labels,
            dlogits,
            per_sample,
            eval_result,
            scale,
        )?;
        self.train.extend(train);
        self.eval.extend(eval);
        for d in self.train[train0..].iter_mut().chain(&mut self.eval[eval0..]) {
            (d.layer, d.pass) = ("loss".to_string(), Pass::Loss);
        }
        Ok(())
    }
}
