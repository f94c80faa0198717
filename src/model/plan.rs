//! The network on the GPU and its step plans.
//!
//! [`Network`] owns what does not depend on the batch size: parameters, their gradients, the
//! optimizer state and updates, the batch-norm running statistics. Parameters, gradients and each
//! optimizer state live in one flat buffer apiece ([`FlatParams`]); a parameter is a named range of
//! them (a view the kernels bind as if it were its own buffer), so one dispatch updates every
//! parameter and one copy moves every gradient. [`StepPlan`] owns what does:
//! one activation and one gradient buffer per activation of the graph, the per-layer scratch
//! (batch statistics, pooling indices, SE intermediates), and the two dispatch lists — the
//! training step (forward, loss, backward in reverse order) and the evaluation pass. Everything
//! is allocated and every bind group built when the plan is made; a step only writes the batch,
//! rewrites the optimizer's step number and submits one command buffer.
//!
//! The fusion pass (`Network::fusions`) runs what follows a node in that node's kernels where its op
//! offers it (`LayerOp::takes_epilogue`): a batch norm's ReLU always; with the device's `--fuse on`
//! (`Gpu::fuse`) also a residual addition's ReLU and an SE block's addition and ReLU, and, in the
//! evaluation pass only, a batch norm into the convolution before it (`plan/fold.rs`: one
//! `bn_fold` dispatch first in every evaluation pass, no batch-norm dispatch after a convolution).
//!
//! Precision is the network's ([`Precision`]): an f16 network's plans hold every activation and
//! activation gradient in f16, cast the f32 input batch and the f32 master weights (into an f16
//! copy of the flat parameter buffer, which the convolutions read) once per step, scale the loss
//! gradient and unscale the parameter gradients with a [`GradScaler`]. Statistics, reductions,
//! parameter gradients and the optimizer stay f32. An f32 network runs every op in f32.
//!
//! Under `--sync-bn` with several MPI ranks ([`Network::sync_bn`]) a plan's training step is
//! still one dispatch list, with [`BnExchange`] points in it: at each batch norm the forward
//! stops after the per-channel statistics and the backward after the per-channel gradient sums,
//! the host combines every rank's (a few floats per channel) and writes them back, and the step
//! goes on ([`Network::gradient_pass_exchanging`]). Evaluation plans are never split.
//!
//! With [`Network::set_clip_grad_norm`] every step clips the gradients' total norm
//! ([`ClipGradNorm`]) after the backward pass (and the loss scaler) and before the optimizer.
//!
//! With [`Network::set_grad_accum_steps`] (timm's `--grad-accum-steps N`) a step is N micro-batches
//! ([`Network::train_micro_step`]): each runs forward, loss (its gradient divided by the group's
//! micro-batch count) and backward, and adds its gradients into a flat accumulator ([`GradAccum`]);
//! only the last runs the loss scaler, clipping, the optimizer and the EMA. Batch norm updates its
//! running statistics per micro-batch, as PyTorch's does per forward.
//!
//! With [`Network::set_model_ema`] (timm's `--model-ema`) every optimizer update is followed by
//! one dispatch that moves an exponential moving average of the parameters and the batch-norm
//! buffers towards the model ([`ModelEma`], see `model::ema`).

mod fold;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fold::EvalFolds;

use super::ema::ModelEma;
use super::{Graph, Init, ModelConfig, ParamSpec, Shape};
use crate::gpu::{Dispatch, Gpu, Pass, Precision, Tensor};
use crate::ops::add;
use crate::ops::cast;
use crate::ops::clip_grad_norm::ClipGradNorm;
use crate::ops::conv2d::{ConvKernel, ConvPass};
use crate::ops::cross_entropy::{self, LossWeight, result};
use crate::ops::grad_accum::{GradAccum, MicroBatch};
use crate::ops::grad_scaler::{GradScaler, GradScalerConfig};
use crate::ops::layer::{
    AffineInput, Epilogue, EpilogueStep, Folded, Handoffs, LeftWeightGrad, ParamTensors, Record, step_key,
};
pub use crate::ops::layer::{BnExchange, ExchangeKind, SeSaved};
use crate::ops::optimizer::{OptimizerConfig, OptimizerStep};
use crate::ops::se_block::SeWeightGradIo;

/// A trainable tensor with its gradient and optimizer state: views of the flat buffers.
pub struct Param {
    pub spec: ParamSpec,
    /// First element of this parameter in the flat buffers.
    pub start: usize,
    pub value: Tensor,
    pub grad: Tensor,
    pub state: Vec<Tensor>,
    /// The f16 copy of `value` that an f16 network's GEMMs read (refreshed every step).
    pub half: Option<Tensor>,
}

/// The flat buffers every [`Param`] is a range of: values, gradients and each optimizer state
/// (Adam's two moments, SGD's momentum), laid out alike. Each parameter starts at a multiple of
/// the adapter's storage-offset alignment; the gaps hold zeros, which every optimizer keeps at
/// zero (their gradient is never written).
pub struct FlatParams {
    pub values: Tensor,
    pub grads: Tensor,
    pub state: Vec<Tensor>,
    /// An f16 network's f16 copy of `values`, same layout.
    pub half: Option<Tensor>,
}

/// Where each parameter starts in the flat buffers, and their length: parameters in order,
/// each start rounded up to `align` elements.
pub fn flat_layout(specs: &[ParamSpec], align: usize) -> (Vec<usize>, usize) {
    let mut starts = Vec::with_capacity(specs.len());
    let mut end = 0usize;
    for spec in specs {
        let start = end.next_multiple_of(align.max(1));
        starts.push(start);
        end = start + spec.shape.iter().product::<usize>();
    }
    (starts, end)
}

/// A batch-norm layer's state-dict buffers.
pub struct BnBuffers {
    pub name: String,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub num_batches_tracked: i64,
}

pub struct Network {
    pub gpu: Arc<Gpu>,
    pub config: ModelConfig,
    pub graph: Graph,
    pub params: Vec<Param>,
    pub flat: FlatParams,
    pub bn: Vec<BnBuffers>,
    /// Every batch norm's running mean and variance are views of this one flat buffer (each
    /// start aligned, zeros between), so one dispatch can read them all (the model EMA's).
    pub bn_flat: Tensor,
    pub optimizer: OptimizerConfig,
    pub precision: Precision,
    /// f16: the casts of the master weights into `flat.half`, one per binding-sized chunk, run
    /// first in every training step and evaluation pass.
    casts: Vec<Dispatch>,
    /// f16: the loss scaler, run between the backward pass and the optimizer.
    pub scaler: Option<GradScaler>,
    /// `--clip-grad-norm`: the gradients' total norm clipped after the loss scaler, before the
    /// optimizer ([`Network::set_clip_grad_norm`]).
    pub clip: Option<ClipGradNorm>,
    /// The flat gradient buffer as views of at most one binding each (see `updates`).
    grad_chunks: Vec<Tensor>,
    /// The optimizer over the flat buffers: one dispatch, or one per binding-sized chunk where
    /// the parameters outgrow the adapter's largest binding (SE-ResNet-152 on lavapipe's 128 MiB).
    updates: Vec<OptimizerStep>,
    /// Optimizer steps taken (1-based step of the next update is `step + 1`).
    pub step: u64,
    /// `--grad-accum-steps N > 1`: the flat accumulator and its dispatches.
    pub accum: Option<GradAccum>,
    /// The accumulator holds the sum of a group's first micro-batches, whose last has not run:
    /// what a resume file must carry to continue inside the group.
    pub accum_pending: bool,
    /// `--model-ema`: the moving average of the parameters and batch-norm buffers.
    pub ema: Option<ModelEma>,
    /// Label smoothing of the training loss (`--label-smoothing`; 0 = none), read when a plan is
    /// built. Evaluation always measures plain cross-entropy.
    pub label_smoothing: f32,
    /// `--mixup`/`--cutmix`, read when a plan is built: the training loss is against soft targets
    /// the host writes per batch ([`StepPlan::write_targets`]; timm's SoftTargetCrossEntropy).
    pub soft_targets: bool,
    /// `--sync-bn` under several ranks, read when a plan is built: every training-mode batch norm
    /// runs as split kernels around [`BnExchange`]s (SyncBatchNorm). Off, one dispatch per pass.
    pub sync_bn: bool,
    /// The seed the parameters were drawn from; with the step number, what stochastic layers
    /// (dropout) draw their masks from.
    pub seed: u64,
    /// [2] u32: the `ops::layer::StepKey` of the step being run, written by
    /// [`Network::begin_step`].
    step_key: Tensor,
    by_name: HashMap<String, usize>,
}

/// PyTorch-default initial values for `spec`, drawn from `rng`.
pub fn init_values(spec: &ParamSpec, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n: usize = spec.shape.iter().product();
    match spec.init {
        Init::FanInUniform { fan_in } => {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
        }
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
    }
}

impl Network {
    /// Build the f32 network with PyTorch-default initialisation drawn from `seed`.
    pub fn new(gpu: Arc<Gpu>, config: ModelConfig, optimizer: OptimizerConfig, seed: u64) -> Result<Network> {
        Network::new_in(gpu, config, optimizer, seed, Precision::F32)
    }

    /// Build the network in `precision` (f16 needs the adapter's SHADER_F16: else an error naming it).
    pub fn new_in(
        gpu: Arc<Gpu>,
        config: ModelConfig,
        optimizer: OptimizerConfig,
        seed: u64,
        precision: Precision,
    ) -> Result<Network> {
        let graph = config.graph()?;
        Network::with_graph(gpu, config, graph, optimizer, seed, precision)
    }

    /// The network of an explicit `graph` — a layer list that no model name builds (a test's
    /// small grouped-convolution network, say); `config` supplies the run's metadata and must
    /// describe the same input. [`Network::new_in`] is this with `config.graph()`.
    pub fn with_graph(
        gpu: Arc<Gpu>,
        config: ModelConfig,
        graph: Graph,
        optimizer: OptimizerConfig,
        seed: u64,
        precision: Precision,
    ) -> Result<Network> {
        if precision == Precision::F16 {
            ensure!(gpu.features.contains(wgpu::Features::SHADER_F16), "{}", gpu.no_f16_message());
        }
        let specs = graph.parameters();
        // Every view starts at a multiple of the adapter's offset alignment, in the f16 copy too.
        let elem = precision.dtype().bytes();
        let align = (gpu.limits.min_storage_buffer_offset_alignment as usize / elem).max(1);
        let (starts, total) = flat_layout(&specs, align);
        let flat = Network::init_flat(&gpu, &specs, &starts, total, optimizer, seed, precision)?;
        let params = Network::param_views(&gpu, &flat, specs, starts)?;
        let (bn_flat, bn) = Network::running_stats(&gpu, &graph)?;
        let chunks = Network::binding_chunks(&gpu, total, align);
        let grad_chunks = chunks
            .iter()
            .map(|&c| Network::chunk_view(&gpu, &flat.grads, "gradients", c))
            .collect::<Result<Vec<_>>>()?;
        let scaler = match precision {
            Precision::F16 => {
                Some(GradScaler::new(&gpu, GradScalerConfig::default(), &grad_chunks.iter().collect::<Vec<_>>())?)
            }
            Precision::F32 => None,
        };
        let (updates, casts) = Network::chunk_updates(&gpu, &flat, &chunks, &grad_chunks, scaler.as_ref(), optimizer)?;
        let step_key = Tensor::zeros(&gpu, "step key", &[2])?;
        let by_name = params.iter().enumerate().map(|(i, p)| (p.spec.name.clone(), i)).collect();
        Ok(Network {
            gpu,
            config,
            graph,
            params,
            flat,
            bn,
            bn_flat,
            optimizer,
            precision,
            casts,
            scaler,
            clip: None,
            grad_chunks,
            updates,
            step: 0,
            accum: None,
            accum_pending: false,
            ema: None,
            label_smoothing: 0.0,
            soft_targets: false,
            sync_bn: false,
            seed,
            step_key,
            by_name,
        })
    }

    /// The flat buffers of `specs` laid out at `starts` (`total` elements): the values drawn in
    /// parameter order from `seed` (PyTorch-default initialisation, zeros in the alignment gaps),
    /// the gradients and each optimizer state zero, and an f16 network's half copy (zero until
    /// the first step casts into it).
    fn init_flat(
        gpu: &Gpu,
        specs: &[ParamSpec],
        starts: &[usize],
        total: usize,
        optimizer: OptimizerConfig,
        seed: u64,
        precision: Precision,
    ) -> Result<FlatParams> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut values = vec![0.0f32; total];
        for (spec, &start) in specs.iter().zip(starts) {
            let v = init_values(spec, &mut rng);
            values[start..start + v.len()].copy_from_slice(&v);
        }
        Ok(FlatParams {
            values: Tensor::flat(gpu, "parameters", &values)?,
            grads: Tensor::flat_zeros(gpu, "gradients", total)?,
            state: (0..optimizer.state_count())
                .map(|k| Tensor::flat_zeros(gpu, &format!("optimizer state {k}"), total))
                .collect::<Result<Vec<_>>>()?,
            half: match precision {
                Precision::F16 => Some(Tensor::flat_zeros_of(gpu, "parameters (f16)", total, precision.dtype())?),
                Precision::F32 => None,
            },
        })
    }

    /// One [`Param`] per spec: its value, gradient, optimizer states and f16 copy as views of
    /// `flat` from its start on, labelled with the parameter's name.
    fn param_views(gpu: &Gpu, flat: &FlatParams, specs: Vec<ParamSpec>, starts: Vec<usize>) -> Result<Vec<Param>> {
        let mut params = Vec::new();
        for (spec, start) in specs.into_iter().zip(starts) {
            let view = |t: &Tensor, what: &str| t.view(gpu, &format!("{} {what}", spec.name), start, &spec.shape);
            let value = view(&flat.values, "value")?;
            let grad = view(&flat.grads, "grad")?;
            let state =
                flat.state.iter().enumerate().map(|(k, t)| view(t, &format!("state {k}"))).collect::<Result<_>>()?;
            let half = flat.half.as_ref().map(|h| view(h, "value (f16)")).transpose()?;
            params.push(Param { spec, start, value, grad, state, half });
        }
        Ok(params)
    }

    /// Every batch norm of `graph`: its running mean (0) and variance (1), each at an aligned
    /// start of one flat buffer (zeros between), returned with the views of it.
    fn running_stats(gpu: &Gpu, graph: &Graph) -> Result<(Tensor, Vec<BnBuffers>)> {
        let f32_align = (gpu.limits.min_storage_buffer_offset_alignment as usize / 4).max(1);
        let bn_specs: Vec<(String, usize)> = graph.batch_norms().map(|(name, c)| (name.to_string(), c)).collect();
        let mut bn_init = Vec::new();
        let mut bn_starts = Vec::new();
        for (_, c) in &bn_specs {
            for v in [0.0f32, 1.0] {
                bn_init.resize(bn_init.len().next_multiple_of(f32_align), 0.0);
                bn_starts.push(bn_init.len());
                bn_init.extend(std::iter::repeat_n(v, *c));
            }
        }
        let bn_flat = Tensor::flat(gpu, "batch-norm buffers", &bn_init)?;
        let bn = bn_specs
            .iter()
            .zip(bn_starts.chunks(2))
            .map(|((name, c), starts)| {
                Ok(BnBuffers {
                    name: name.clone(),
                    running_mean: bn_flat.view(gpu, &format!("{name}.running_mean"), starts[0], &[*c])?,
                    running_var: bn_flat.view(gpu, &format!("{name}.running_var"), starts[1], &[*c])?,
                    num_batches_tracked: 0,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((bn_flat, bn))
    }

    /// The flat buffers' `total` elements cut into (start, length) chunks as large as one
    /// binding allows, each starting at a multiple of `align` (one chunk of 1 when there are no
    /// parameters).
    fn binding_chunks(gpu: &Gpu, total: usize, align: usize) -> Vec<(usize, usize)> {
        let max_binding = (gpu.limits.max_storage_buffer_binding_size / 4) as usize;
        let chunk = (max_binding / align * align).max(align);
        (0..total.max(1)).step_by(chunk).map(|start| (start, chunk.min(total.max(1) - start))).collect()
    }

    /// The view of flat buffer `t` over one of [`Network::binding_chunks`], labelled `what` and its start.
    fn chunk_view(gpu: &Gpu, t: &Tensor, what: &str, (start, len): (usize, usize)) -> Result<Tensor> {
        t.view(gpu, &format!("{what} {start}.."), start, &[len])
    }

    /// Per chunk of the flat buffers: the optimizer update of its values from `grad_chunks`
    /// (unscaled by the loss scaler's state when there is one) and, for an f16 network, the casts
    /// of its values into the half copy.
    fn chunk_updates(
        gpu: &Gpu,
        flat: &FlatParams,
        chunks: &[(usize, usize)],
        grad_chunks: &[Tensor],
        scaler: Option<&GradScaler>,
        optimizer: OptimizerConfig,
    ) -> Result<(Vec<OptimizerStep>, Vec<Dispatch>)> {
        let view = |t: &Tensor, what: &str, c: (usize, usize)| Network::chunk_view(gpu, t, what, c);
        let mut updates = Vec::new();
        let mut casts = Vec::new();
        for (&c, grad) in chunks.iter().zip(grad_chunks) {
            let value = view(&flat.values, "parameters", c)?;
            let state = flat.state.iter().map(|t| view(t, "optimizer state", c)).collect::<Result<Vec<_>>>()?;
            let state: Vec<&Tensor> = state.iter().collect();
            let scale_state = scaler.map(|s| &s.state);
            let mut update = OptimizerStep::new_scaled(gpu, optimizer, &value, grad, &state, 0, c.1, scale_state)?;
            (update.dispatch.layer, update.dispatch.pass) = ("all parameters".to_string(), Pass::Optimizer);
            updates.push(update);
            if let Some(half) = &flat.half {
                for mut d in cast::cast_forward(gpu, &value, &view(half, "parameters (f16)", c)?)? {
                    (d.layer, d.pass) = ("all parameters".to_string(), Pass::Forward);
                    casts.push(d);
                }
            }
        }
        Ok((updates, casts))
    }

    /// Clip the gradients' total 2-norm to `max_norm` every step from the next one on, as
    /// `torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)` between the backward pass
    /// (f16: the loss scaler's unscale) and the optimizer; `None` turns clipping off.
    pub fn set_clip_grad_norm(&mut self, max_norm: Option<f64>) -> Result<()> {
        self.clip = match max_norm {
            Some(m) => {
                let chunks: Vec<&Tensor> = self.grad_chunks.iter().collect();
                Some(ClipGradNorm::new(&self.gpu, m, &chunks, self.scaler.as_ref().map(|s| &s.state))?)
            }
            None => None,
        };
        Ok(())
    }

    /// timm's `--grad-accum-steps`: `steps` > 1 allocates the gradient accumulator that
    /// [`Network::train_micro_step`] fills (1 frees it).
    pub fn set_grad_accum_steps(&mut self, steps: usize) -> Result<()> {
        ensure!(steps >= 1, "gradient accumulation needs at least 1 micro-batch per step, got {steps}");
        self.accum = if steps > 1 {
            let chunks: Vec<&Tensor> = self.grad_chunks.iter().collect();
            Some(GradAccum::new(&self.gpu, &chunks, self.flat.grads.numel())?)
        } else {
            None
        };
        self.accum_pending = false;
        Ok(())
    }

    /// timm's `--model-ema`: keep an exponential moving average of the parameters and the
    /// batch-norm buffers, started from their current values and updated after every optimizer
    /// update with timm's `ModelEmaV3` decay (`decay`; `warmup`: timm's ramp). `None` turns it off.
    pub fn set_model_ema(&mut self, ema: Option<(f64, bool)>) -> Result<()> {
        self.ema = match ema {
            Some((decay, warmup)) => Some(ModelEma::new(self, decay, warmup)?),
            None => None,
        };
        Ok(())
    }

    /// The flat parameter buffer's binding-sized chunks (start, len), as the optimizer runs over them.
    pub fn chunks(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.grad_chunks
            .iter()
            .map(|g| {
                let c = (start, g.numel());
                start += g.numel();
                c
            })
            .collect()
    }

    pub fn param(&self, name: &str) -> Result<&Param> {
        self.by_name.get(name).map(|&i| &self.params[i]).with_context(|| format!("no parameter named {name}"))
    }

    fn bn_buffers(&self, name: &str) -> Result<&BnBuffers> {
        self.bn.iter().find(|b| b.name == name).with_context(|| format!("no batch norm named {name}"))
    }

    /// The largest tensor a plan for batch `n` binds: (bytes, what).
    fn largest_binding(&self, n: usize) -> Result<(u64, String)> {
        let shapes = self.graph.shapes(n)?;
        let mut best = (0u64, String::new());
        // The input batch is written as f32 (an f16 plan casts it); activations in the plan's type.
        let elem = |k: usize| if k == 0 { 4 } else { self.precision.dtype().bytes() as u64 };
        for (k, s) in shapes.iter().enumerate() {
            let bytes = elem(k) * s.iter().product::<usize>() as u64;
            if bytes > best.0 {
                let what = if k == 0 {
                    "the input batch".to_string()
                } else {
                    format!("the output of {}", self.graph.nodes[k - 1].name)
                };
                best = (bytes, what);
            }
        }
        Ok(best)
    }

    /// Check, before allocating, that every buffer of a batch-`n` plan fits the adapter's
    /// binding limit; if not, say which tensor and the largest batch that fits.
    pub fn check_fits(&self, n: usize) -> Result<()> {
        let limit = self.gpu.limits.max_storage_buffer_binding_size.min(self.gpu.limits.max_buffer_size);
        let (bytes, what) = self.largest_binding(n)?;
        if bytes <= limit {
            return Ok(());
        }
        // Activations grow linearly with the batch: the largest fitting batch is a division away,
        // checked against the same accounting.
        let per_sample = self.largest_binding(1)?.0.max(1);
        let mut fit = (limit / per_sample) as usize;
        while fit > 0 && self.largest_binding(fit)?.0 > limit {
            fit -= 1;
        }
        anyhow::bail!(
            "batch {n} needs {bytes} bytes for {what}, above this adapter's {limit}-byte limit per buffer ({}); \
             the largest batch that fits is {fit}",
            self.gpu.info.name
        )
    }

    /// Allocate and record everything for batch size `n`: the activation and gradient buffers,
    /// then each node's dispatches as its op records them (`LayerOp::record`), with the passes
    /// that belong to the graph rather than to an op — fused epilogues, the sum of a forked
    /// activation's gradients, the f16 input cast, the loss — and the backward in reverse order.
    pub fn plan(&self, n: usize) -> Result<StepPlan> {
        ensure!(n >= 1, "batch size must be at least 1");
        self.check_fits(n)?;
        let gpu = &*self.gpu;
        let shapes = self.graph.shapes(n)?;
        let logits_shape = shapes.last().context("empty graph")?.clone();
        ensure!(logits_shape.len() == 2, "the network must end in [n, classes], got {logits_shape:?}");
        let consumers = self.graph.consumers();
        let mut fusion = self.fusions(&consumers);
        self.bn_apply_fusions(&shapes, &consumers, &mut fusion)?;
        let kept = |i: usize| fusion.unused[i] && !fusion.act_kept[i];
        let b = PlanBuffers {
            acts: self.activations(&shapes, &(0..shapes.len()).map(kept).collect::<Vec<_>>(), "")?,
            grads: self.activations(&shapes, &fusion.unused, " grad")?,
            contrib: self.fork_gradients(&shapes, &consumers, &fusion.fork_in_reader)?,
            se_grads: self.deferred_grad_tensors(&shapes, &fusion)?,
            stats: self.stat_handoffs(&shapes, &consumers, &fusion)?,
            weight_grads: self.left_weight_grads(&shapes, &fusion)?,
            bn_applied: self.bn_applied_stats(&shapes, &fusion)?,
        };
        let mut rec = Recorded::default();
        let input_f32 = self.record_input_cast(&shapes[0], &b.acts[0], &mut rec)?;
        let folds = self.eval_folds(&consumers, &fusion, &mut rec.eval)?;
        for (k, node) in self.graph.nodes.iter().enumerate() {
            let (train0, eval0) = (rec.train.len(), rec.eval.len());
            // A node recorded here: this one, or the head of a fused group whose inputs are all
            // computed by now; a step of a fused group records nothing.
            let (name, (mut bwd, bwd_exchange)) = match fusion.groups[k] {
                Some(g) => {
                    let head = &self.graph.nodes[g.head];
                    // Bind groups and parameter blocks made for this layer carry its name.
                    let _scope = gpu.label_scope(&head.name);
                    let io = self.node_io(g, &b, &fusion, &folds, &consumers)?;
                    (&head.name, self.record_node(head, io, g.epilogue, &mut rec)?)
                }
                None => (&node.name, (Vec::new(), None)),
            };
            bwd.extend(self.fork_sums(k, &b, &fusion, &consumers)?);
            label(rec.train[train0..].iter_mut().chain(&mut rec.eval[eval0..]), name, Pass::Forward);
            label(bwd.iter_mut(), name, Pass::Backward);
            rec.backward.push((bwd, bwd_exchange));
        }
        let PlanBuffers { acts, grads, contrib, .. } = b;
        let loss = LossTensors::new(gpu, n, self.soft_targets.then_some(&logits_shape))?;
        let loss_weight = self.record_loss(&acts[acts.len() - 1], &grads[grads.len() - 1], &loss, &mut rec)?;
        let Recorded { mut train, eval, backward, mut exchanges, se_saved, conv_kernels } = rec;
        let mut fork_grads: Vec<_> = contrib.into_iter().collect();
        fork_grads.sort_by_key(|&((k, j), _)| (self.graph.nodes[k].inputs[j], k, j));
        let fork_grads = fork_grads.into_iter().map(|(_, t)| t).collect();
        for (bwd, x) in backward.into_iter().rev() {
            if let Some(mut x) = x {
                x.at += train.len();
                exchanges.push(x);
            }
            train.extend(bwd);
        }
        let LossTensors { labels, per_sample, train_result, eval_result, targets } = loss;
        // Every pipeline of the step is built now: keep them for the next start.
        gpu.save_pipeline_cache_or_warn();
        Ok(StepPlan {
            n,
            input_f32,
            acts,
            grads,
            labels,
            per_sample,
            train_result,
            eval_result,
            loss_weight,
            targets,
            se_saved,
            conv_kernels,
            fork_grads,
            train,
            eval,
            exchanges,
        })
    }

    /// The buffer node `k`'s input `j`'s gradient goes to: the activation's, or a forked
    /// activation's per-reader one.
    fn target<'a>(&self, b: &'a PlanBuffers, k: usize, j: usize) -> &'a Tensor {
        let i = self.graph.nodes[k].inputs[j];
        b.contrib.get(&(k, j)).unwrap_or(&b.grads[i])
    }

    /// The gradient a forked activation's first reader (node `k`) adds into its own: the second
    /// reader's ([`Fusions::fork_in_reader`]).
    fn addend<'a>(
        &self,
        k: usize,
        b: &'a PlanBuffers,
        fusion: &Fusions,
        consumers: &[Vec<usize>],
    ) -> Option<&'a Tensor> {
        let i = *self.graph.nodes[k].inputs.first()?;
        let &[r0, r1] = consumers[i].as_slice() else { return None };
        let j = self.graph.nodes[r1].inputs.iter().position(|&x| x == i)?;
        (r0 == k && fusion.fork_in_reader[i]).then(|| self.target(b, r1, j))
    }

    /// What the group `g` recorded at its head reads and writes, as the fusion and fold passes
    /// decided.
    fn node_io<'a>(
        &'a self,
        g: Group,
        b: &'a PlanBuffers,
        fusion: &Fusions,
        folds: &'a EvalFolds,
        consumers: &[Vec<usize>],
    ) -> Result<NodeIo<'a>> {
        let (head, acts, se) = (&self.graph.nodes[g.head], &b.acts, &b.se_grads);
        let deferred = fusion.deferred[g.head];
        let dout = deferred.map_or(&b.grads[g.out], |(add, j)| self.target(b, add, j));
        Ok(NodeIo {
            inputs: head.inputs.iter().map(|&i| &acts[i]).collect(),
            dinputs: (0..head.inputs.len()).map(|j| self.target(b, g.head, j)).collect(),
            outs: (&acts[g.out], dout),
            residual: g.residual.map(|(add, j)| (&acts[self.graph.nodes[add].inputs[j]], self.target(b, add, j))),
            folded: folds.folded(g.head, fusion, acts),
            eval_folded: folds.is_folded(g.head),
            fused: Handoffs {
                pool: match g.epilogue {
                    Some(Epilogue::ReluMaxPool(p)) => Some((p, &acts[g.head + 2])),
                    _ => None,
                },
                input_bias_grad: self.input_bias_grad(g.head, fusion)?,
                bias_grad_elsewhere: fusion.bias_by_next[g.head],
                defer_input_grad: g.head.checked_sub(1).and_then(|k| se.get(&k)).map(|(t, _)| t),
                grad_from_next: deferred.and_then(|_| se.get(&g.head)).map(|(t, _)| t),
                input_affine: match fusion.bn_by_conv[g.head] {
                    Some(bn) => {
                        let stats = b.bn_applied.get(&bn).context("an applied batch norm's statistics")?;
                        Some(self.bn_affine(bn, acts, stats)?)
                    }
                    None => self.affine_input(g.head, acts, se)?,
                },
                stats_only: se.get(&g.head).and_then(|(_, s)| s.as_ref()).or(b.bn_applied.get(&g.head)),
                output_stats: b.stats.values().find(|h| h.producer == g.head).map(|h| &h.blocks),
                input_stats: b.stats.get(&g.head).map(|h| (&h.blocks, h.rows)),
                dinp_addend: self.addend(g.head, b, fusion, consumers),
                weight_grad_by_prev: g
                    .head
                    .checked_sub(1)
                    .and_then(|k| b.weight_grads.get(&k))
                    .map(|w| (&w.saved, &w.dsaved)),
                next_weight_grad: self.next_weight_grad(g.head, b)?,
                pooled_by_next: fusion.pooled_by_next[g.head],
                pool_before: g
                    .head
                    .checked_sub(1)
                    .filter(|&k| fusion.pooled_by_next[k])
                    .map(|k| (&acts[self.graph.nodes[k].inputs[0]], self.target(b, k, 0))),
            },
        })
    }

    /// Node `k` is the first reader of a forked activation: after its backward (the last to run
    /// in reverse order), sum the two contributions — unless its backward did.
    fn fork_sums(
        &self,
        k: usize,
        b: &PlanBuffers,
        fusion: &Fusions,
        consumers: &[Vec<usize>],
    ) -> Result<Vec<Dispatch>> {
        let mut d = Vec::new();
        for &i in &self.graph.nodes[k].inputs {
            if consumers[i].len() == 2 && consumers[i][0] == k && i > 0 && !fusion.fork_in_reader[i] {
                let [r0, r1] = [consumers[i][0], consumers[i][1]];
                let slot = |r: usize| self.graph.nodes[r].inputs.iter().position(|&x| x == i).unwrap_or(0);
                d.extend(add::add_forward(
                    &self.gpu,
                    self.target(b, r0, slot(r0)),
                    self.target(b, r1, slot(r1)),
                    &b.grads[i],
                )?);
            }
        }
        Ok(d)
    }

    /// The fusion pass: which nodes run an epilogue in their kernels ([`LayerOp::takes_epilogue`];
    /// `--fuse off` asks for the batch norm's ReLU only) and where each node is recorded. A head
    /// whose output's one reader is a ReLU takes [`Epilogue::Relu`] and is recorded in place; one
    /// whose output's one reader is an addition (as its first operand) followed by a ReLU takes
    /// [`Epilogue::AddRelu`] and is recorded where the addition was (its other operand may be
    /// computed after the head, as a projection shortcut is). The steps record nothing, and the
    /// head's output, the addition's and their gradients are never touched, so they get a
    /// 1-element placeholder.
    fn fusions(&self, consumers: &[Vec<usize>]) -> Fusions {
        let nodes = &self.graph.nodes;
        let fuse = self.gpu.fuse;
        let step = |k: usize, s: EpilogueStep| nodes.get(k).and_then(|n| n.layer.op().epilogue_step()) == Some(s);
        // The one reader of node k's output, if it has one.
        let reader = |k: usize| match consumers[k + 1].as_slice() {
            [r] => Some(*r),
            _ => None,
        };
        let relu_after = |k: usize| reader(k) == Some(k + 1) && step(k + 1, EpilogueStep::Relu);
        // The max pool that alone reads node k's output, right after it.
        let pool_after = |k: usize| match nodes.get(k + 1).and_then(|n| n.layer.op().epilogue_step()) {
            Some(EpilogueStep::MaxPool(p)) if reader(k) == Some(k + 1) => Some(p),
            _ => None,
        };
        let mut f = Fusions {
            groups: (0..nodes.len())
                .map(|k| Some(Group { head: k, epilogue: None, out: k + 1, residual: None }))
                .collect(),
            unused: vec![false; nodes.len() + 1],
            act_kept: vec![false; nodes.len() + 1],
            deferred: vec![None; nodes.len()],
            affine_in_next: vec![false; nodes.len()],
            bn_by_conv: vec![None; nodes.len()],
            bias_by_next: vec![false; nodes.len()],
            fork_in_reader: vec![false; nodes.len() + 1],
            pooled_by_next: vec![false; nodes.len()],
        };
        for (k, node) in nodes.iter().enumerate() {
            if f.groups[k].is_none_or(|g| g.head != k) {
                continue;
            }
            let op = node.layer.op();
            // The head's output is the addition's first operand (a residual unit's branch), the
            // other its second (the shortcut).
            let first = |a: usize| nodes[a].inputs[0] == k + 1 && nodes[a].inputs.get(1).is_some_and(|&i| i != k + 1);
            let add = reader(k).filter(|&a| step(a, EpilogueStep::Add) && relu_after(a) && first(a));
            if let Some(a) = add
                && op.takes_epilogue(Epilogue::AddRelu, fuse)
            {
                let group = Group { head: k, epilogue: Some(Epilogue::AddRelu), out: a + 2, residual: Some((a, 1)) };
                (f.groups[k], f.groups[a], f.groups[a + 1]) = (None, Some(group), None);
                (f.unused[k + 1], f.unused[a + 1]) = (true, true);
            } else if let Some(p) = relu_after(k).then(|| pool_after(k + 1)).flatten()
                && !self.sync_bn
                && op.takes_epilogue(Epilogue::ReluMaxPool(p), fuse)
            {
                let group = Group { head: k, epilogue: Some(Epilogue::ReluMaxPool(p)), out: k + 3, residual: None };
                (f.groups[k], f.groups[k + 1], f.groups[k + 2]) = (Some(group), None, None);
                (f.unused[k + 1], f.unused[k + 2], f.act_kept[k + 2]) = (true, true, true);
            } else if relu_after(k) && op.takes_epilogue(Epilogue::Relu, fuse) {
                f.groups[k] = Some(Group { head: k, epilogue: Some(Epilogue::Relu), out: k + 2, residual: None });
                f.groups[k + 1] = None;
                f.unused[k + 1] = true;
            }
        }
        self.bias_fusions(consumers, &mut f);
        self.pool_fusions(consumers, &mut f);
        self.deferred_grads(consumers, &mut f);
        self.fork_fusions(consumers, &mut f);
        f
    }

    /// `--fuse on`, training: a forked activation (not the network's input, whose gradient
    /// nobody reads) whose first reader — its backward runs last — is recorded in place, reads
    /// nothing else and can add the other reader's gradient into its own
    /// ([`LayerOp::accumulates_input_grad`]): no addition after it.
    fn fork_fusions(&self, consumers: &[Vec<usize>], f: &mut Fusions) {
        let nodes = &self.graph.nodes;
        for (i, readers) in consumers.iter().enumerate() {
            let &[r0, _] = readers.as_slice() else { continue };
            let in_place = f.groups[r0].is_some_and(|g| g.head == r0);
            let only_input = nodes[r0].inputs == [i];
            f.fork_in_reader[i] =
                self.gpu.fuse && i > 0 && in_place && only_input && nodes[r0].layer.op().accumulates_input_grad();
        }
    }

    /// `--fuse on`, training: a node heading a fused residual tail ([`Epilogue::AddRelu`]) that
    /// can leave its input gradient to the node before ([`LayerOp::defers_input_grad`]), when
    /// that node alone feeds it, heads its own group without an epilogue and takes it
    /// ([`LayerOp::takes_deferred_grad`]): that gradient is never stored.
    fn deferred_grads(&self, consumers: &[Vec<usize>], f: &mut Fusions) {
        if !self.gpu.fuse || self.sync_bn {
            return;
        }
        let nodes = &self.graph.nodes;
        let tails: Vec<Group> =
            f.groups.iter().flatten().filter(|g| g.epilogue == Some(Epilogue::AddRelu)).copied().collect();
        for g in tails {
            let (k, Some(residual)) = (g.head, g.residual) else { continue };
            let Some(b) = k.checked_sub(1) else { continue };
            let plain = f.groups[b].is_some_and(|h| h.head == b && h.epilogue.is_none());
            if nodes[k].layer.op().defers_input_grad()
                && nodes[k].inputs == [k]
                && consumers[k] == [k]
                && plain
                && nodes[b].layer.op().takes_deferred_grad()
            {
                f.deferred[b] = Some(residual);
                (f.unused[k], f.act_kept[k]) = (true, true);
                f.affine_in_next[b] =
                    nodes[k].layer.op().applies_input_affine() && nodes[b].layer.op().leaves_affine_to_next();
            }
        }
    }

    /// `--fuse on`, training: a node whose bias gradient is its output gradient's per-channel sum
    /// ([`LayerOp::channel_bias`]), read alone by the next node, which heads its own group and can
    /// sum its input gradient ([`LayerOp::sums_input_grad`]), leaves that gradient to it: a pass
    /// over the output gradient fewer. --sync-bn's split batch norms take none.
    fn bias_fusions(&self, consumers: &[Vec<usize>], f: &mut Fusions) {
        if !self.gpu.fuse || self.sync_bn {
            return;
        }
        let nodes = &self.graph.nodes;
        for k in 0..nodes.len().saturating_sub(1) {
            let heads = |j: usize| f.groups[j].is_some_and(|g| g.head == j);
            f.bias_by_next[k] = nodes[k].layer.op().channel_bias().is_some()
                && consumers[k + 1] == [k + 1]
                && heads(k)
                && heads(k + 1)
                && nodes[k + 1].layer.op().sums_input_grad();
        }
    }

    /// `--fuse on`: a global average pool ([`LayerOp::averages_pixels`]) read alone by the next
    /// node, which heads its own group, reads nothing else and can take the pool's passes
    /// ([`LayerOp::absorbs_pixel_average`]): that node runs them, the pool records nothing, and
    /// its output gradient is never stored (its output still is, for the next node's backward).
    fn pool_fusions(&self, consumers: &[Vec<usize>], f: &mut Fusions) {
        if !self.gpu.fuse {
            return;
        }
        let nodes = &self.graph.nodes;
        for k in 0..nodes.len().saturating_sub(1) {
            let plain = |j: usize| f.groups[j].is_some_and(|g| g.head == j && g.epilogue.is_none());
            if nodes[k].layer.op().averages_pixels()
                && consumers[k + 1] == [k + 1]
                && nodes[k + 1].inputs == [k + 1]
                && plain(k)
                && plain(k + 1)
                && nodes[k + 1].layer.op().absorbs_pixel_average()
            {
                f.pooled_by_next[k] = true;
                (f.unused[k + 1], f.act_kept[k + 1]) = (true, true);
            }
        }
    }

    /// Per node whose output gradient is deferred ([`Fusions::deferred`]): the tensor the next
    /// node writes for it, [n, 2, C] f32 (an SE block's s and dz per sample).
    /// and, where it also applies this node's affine map ([`Fusions::affine_in_next`]), this
    /// node's batch statistics [2, C] that both read.
    fn deferred_grad_tensors(
        &self,
        shapes: &[Shape],
        fusion: &Fusions,
    ) -> Result<HashMap<usize, (Tensor, Option<Tensor>)>> {
        let mut t = HashMap::new();
        for (b, d) in fusion.deferred.iter().enumerate() {
            if d.is_some() {
                let (n, c) = (shapes[b + 1][0], shapes[b + 1][1]);
                let label = format!("{} deferred grad", self.graph.nodes[b + 1].name);
                let stats = fusion.affine_in_next[b]
                    .then(|| {
                        Tensor::zeros(&self.gpu, &format!("{} batch statistics", self.graph.nodes[b].name), &[2, c])
                    })
                    .transpose()?;
                t.insert(b, (Tensor::zeros(&self.gpu, &label, &[n, 2, c])?, stats));
            }
        }
        Ok(t)
    }

    /// Training, by node taking a deferred gradient ([`Fusions::deferred`]): where the node after
    /// it can leave its weight gradients to it too ([`LayerOp::leaves_weight_grad`]) and it can
    /// sum them ([`LayerOp::sums_next_weight_grad`]), the two tensors the node after saves for
    /// that, owned by the plan so both bind them. One dispatch fewer per such pair.
    fn left_weight_grads(&self, shapes: &[Shape], fusion: &Fusions) -> Result<HashMap<usize, LeftWeightGradBuffers>> {
        let mut t = HashMap::new();
        let nodes = &self.graph.nodes;
        for (b, d) in fusion.deferred.iter().enumerate() {
            if d.is_none() || !nodes[b].layer.op().sums_next_weight_grad(&self.gpu) {
                continue;
            }
            let next = &nodes[b + 1];
            let Some(spec) = next.layer.op().leaves_weight_grad(&shapes[b + 1]) else { continue };
            let saved = Tensor::zeros(&self.gpu, &format!("{} saved", next.name), &spec.saved)?;
            let dsaved = Tensor::zeros(&self.gpu, &format!("{} saved grads", next.name), &spec.dsaved)?;
            t.insert(b, LeftWeightGradBuffers { saved, dsaved, spec });
        }
        Ok(t)
    }

    /// What node `b`'s backward binds to sum the weight gradients of the node after it
    /// ([`Network::left_weight_grads`]).
    fn next_weight_grad<'a>(&'a self, b: usize, bufs: &'a PlanBuffers) -> Result<Option<SeWeightGradIo<'a>>> {
        let Some(w) = bufs.weight_grads.get(&b) else { return Ok(None) };
        let name = &self.graph.nodes[b + 1].name;
        let grad = |suffix: &str| self.param(&format!("{name}.{suffix}")).map(|p| &p.grad);
        let [w1, w2] = w.spec.weights;
        let biases = w.spec.biases.map(|[b1, b2]| Ok::<_, anyhow::Error>((grad(b1)?, grad(b2)?))).transpose()?;
        Ok(Some(SeWeightGradIo {
            saved: &w.saved,
            dsaved: &w.dsaved,
            dw1: grad(w1)?,
            db1: biases.map(|b| b.0),
            dw2: grad(w2)?,
            db2: biases.map(|b| b.1),
        }))
    }

    /// Training, by batch-norm node: the batch norms whose statistics the node before them writes
    /// as it stores its output ([`LayerOp::output_stats_rows`], [`LayerOp::takes_input_stats`]) —
    /// where they alone read that output, both are recorded as their own nodes (neither a step
    /// of a fused group nor a fused head's output), and not under `--sync-bn` — with the block
    /// statistics tensor both bind, [blocks, C, 2] f32.
    fn stat_handoffs(
        &self,
        shapes: &[Shape],
        consumers: &[Vec<usize>],
        fusion: &Fusions,
    ) -> Result<HashMap<usize, StatHandoff>> {
        let mut t = HashMap::new();
        if self.sync_bn {
            return Ok(t);
        }
        let nodes = &self.graph.nodes;
        let own = |k: usize| fusion.groups[k].is_some_and(|g| g.head == k && g.out == k + 1 && g.epilogue.is_none());
        for (k, node) in nodes.iter().enumerate() {
            let head = fusion.groups[k].is_some_and(|g| g.head == k);
            let Some(&i) = node.inputs.first() else { continue };
            if !head || !node.layer.op().takes_input_stats() || i == 0 || consumers[i] != [k] || !own(i - 1) {
                continue;
            }
            let producer = &nodes[i - 1];
            let inp = &shapes[producer.inputs[0]];
            let Some(rows) = producer.layer.op().output_stats_rows(&self.gpu, inp, self.precision)? else { continue };
            let s = &shapes[i];
            let blocks = (s[0] * s[2] * s[3]).div_ceil(rows);
            let label = format!("{} block statistics", producer.name);
            t.insert(
                k,
                StatHandoff { producer: i - 1, blocks: Tensor::zeros(&self.gpu, &label, &[blocks, s[1], 2])?, rows },
            );
        }
        Ok(t)
    }

    /// What node `k` reads in place of its input when it applies the node before it
    /// ([`Fusions::affine_in_next`]): that node's input, statistics and scale and shift.
    fn affine_input<'a>(
        &'a self,
        k: usize,
        acts: &'a [Tensor],
        se_grads: &'a HashMap<usize, (Tensor, Option<Tensor>)>,
    ) -> Result<Option<AffineInput<'a>>> {
        let Some((b, Some(stats))) = k.checked_sub(1).and_then(|b| se_grads.get(&b).map(|(_, s)| (b, s.as_ref())))
        else {
            return Ok(None);
        };
        self.bn_affine(b, acts, stats).map(Some)
    }

    /// Batch-norm node `b`'s input, its batch statistics `stats` (saved by its statistics-only
    /// forward), scale and shift: what the node applying it reads.
    fn bn_affine<'a>(&'a self, b: usize, acts: &'a [Tensor], stats: &'a Tensor) -> Result<AffineInput<'a>> {
        let bn = &self.graph.nodes[b];
        let a = bn.layer.op().eval_affine().context("a node leaving its affine map offers none")?;
        let param = |p: &str| self.param(&format!("{}.{p}", bn.name)).map(|p| &p.value);
        Ok(AffineInput { inp: &acts[bn.inputs[0]], stats, scale: param(a.scale)?, shift: param(a.shift)? })
    }

    /// `--fuse on`, training: a batch norm with a fused ReLU ([`Epilogue::Relu`]) whose output one
    /// node alone reads, which heads its own group, reads nothing else and can apply both as it
    /// loads ([`LayerOp::applies_input_bn_relu`]: a convolution on the workgroup tiles): the batch
    /// norm saves its statistics only ([`LayerOp::leaves_affine_to_next`]) and that node reads its
    /// input. The output stays allocated, for evaluation. Not under `--sync-bn`, whose split
    /// kernels take no epilogue.
    fn bn_apply_fusions(&self, shapes: &[Shape], consumers: &[Vec<usize>], f: &mut Fusions) -> Result<()> {
        if !self.gpu.fuse || self.sync_bn {
            return Ok(());
        }
        let nodes = &self.graph.nodes;
        for b in 0..nodes.len() {
            let Some(g) = f.groups[b].filter(|g| g.head == b && g.epilogue == Some(Epilogue::Relu)) else { continue };
            let &[c] = consumers[g.out].as_slice() else { continue };
            let own = f.groups[c].is_some_and(|h| h.head == c && h.out == c + 1);
            if own
                && nodes[c].inputs == [g.out]
                && nodes[b].layer.op().leaves_affine_to_next()
                && nodes[c].layer.op().applies_input_bn_relu(&self.gpu, &shapes[g.out], self.precision)?
            {
                f.bn_by_conv[c] = Some(b);
            }
        }
        Ok(())
    }

    /// By batch-norm node applied by the node after it ([`Fusions::bn_by_conv`]): its batch
    /// statistics [2, C], which both read.
    fn bn_applied_stats(&self, shapes: &[Shape], f: &Fusions) -> Result<HashMap<usize, Tensor>> {
        let mut t = HashMap::new();
        for &b in f.bn_by_conv.iter().flatten() {
            let label = format!("{} batch statistics", self.graph.nodes[b].name);
            t.insert(b, Tensor::zeros(&self.gpu, &label, &[2, shapes[b + 1][1]])?);
        }
        Ok(t)
    }

    /// The bias gradient node `k`'s backward writes for the node before it ([`Fusions::bias_by_next`]).
    fn input_bias_grad(&self, k: usize, fusion: &Fusions) -> Result<Option<&Tensor>> {
        let Some(prev) = k.checked_sub(1).filter(|&j| fusion.bias_by_next[j]) else {
            return Ok(None);
        };
        let node = &self.graph.nodes[prev];
        let bias = node.layer.op().channel_bias().context("a fused bias gradient's node has no bias")?;
        Ok(Some(&self.param(&format!("{}.{bias}", node.name))?.grad))
    }

    /// What activation `i` is called in buffer labels: "input", "features.4 output".
    fn act_name(&self, i: usize) -> String {
        if i == 0 { "input".to_string() } else { format!("{} output", self.graph.nodes[i - 1].name) }
    }

    /// One buffer per activation (`suffix` "") or activation gradient (" grad"), in the plan's
    /// precision, labelled by what it holds ("layer2.0.se output grad"), as GPU captures and
    /// validation messages show them.
    fn activations(&self, shapes: &[Shape], unused: &[bool], suffix: &str) -> Result<Vec<Tensor>> {
        let dtype = self.precision.dtype();
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let label = format!("{}{suffix}", self.act_name(i));
                Tensor::zeros_of(&self.gpu, &label, if unused[i] { &[1][..] } else { s }, dtype)
            })
            .collect()
    }

    /// An activation read by two layers (the fork before a residual block) gets one gradient
    /// buffer per reader, keyed (reader node, input slot); the plan sums them after the first
    /// reader's backward — or, where `in_reader` says the first reader sums them itself
    /// ([`LayerOp::accumulates_input_grad`]), only the second reader gets one, and the first
    /// writes the activation's gradient.
    fn fork_gradients(
        &self,
        shapes: &[Shape],
        consumers: &[Vec<usize>],
        in_reader: &[bool],
    ) -> Result<HashMap<(usize, usize), Tensor>> {
        let mut contrib = HashMap::new();
        for (a, readers) in consumers.iter().enumerate() {
            ensure!(readers.len() <= 2, "activation {a} is read by {} layers; at most 2 are supported", readers.len());
            if readers.len() < 2 {
                continue;
            }
            let own = if in_reader[a] { &readers[1..] } else { &readers[..] };
            for &k in own {
                for (j, _) in self.graph.nodes[k].inputs.iter().enumerate().filter(|(_, i)| **i == a) {
                    let label = format!("{} grad from {}", self.act_name(a), self.graph.nodes[k].name);
                    contrib.insert((k, j), Tensor::zeros_of(&self.gpu, &label, &shapes[a], self.precision.dtype())?);
                }
            }
        }
        Ok(contrib)
    }

    /// The host writes f32 images; an f16 plan casts them into its input first. Returns the f32
    /// input tensor of an f16 plan.
    fn record_input_cast(&self, shape: &[usize], input: &Tensor, rec: &mut Recorded) -> Result<Option<Tensor>> {
        if self.precision == Precision::F32 {
            return Ok(None);
        }
        let gpu = &*self.gpu;
        let t = Tensor::zeros(gpu, "input (f32)", shape)?;
        let _scope = gpu.label_scope("input");
        let mut d = cast::cast_forward(gpu, &t, input)?;
        label(d.iter_mut(), "input", Pass::Forward);
        rec.train.extend(d.iter().cloned());
        rec.eval.extend(d);
        Ok(Some(t))
    }

    /// Record one node as its op does; returns its backward dispatches and backward exchange,
    /// which run later, in reverse order.
    fn record_node(
        &self,
        node: &super::Node,
        io: NodeIo<'_>,
        epilogue: Option<Epilogue>,
        rec: &mut Recorded,
    ) -> Result<(Vec<Dispatch>, Option<BnExchange>)> {
        let params = |name: &str| -> Result<ParamTensors<'_>> {
            let p = self.param(name)?;
            Ok(ParamTensors { value: &p.value, grad: &p.grad, half: p.half.as_ref() })
        };
        let running = |name: &str| -> Result<(&Tensor, &Tensor)> {
            let b = self.bn_buffers(name)?;
            Ok((&b.running_mean, &b.running_var))
        };
        let (gpu, name) = (&*self.gpu, &node.name);
        let mut r = Record::new(
            gpu,
            name,
            self.precision,
            self.sync_bn,
            io.inputs,
            io.dinputs,
            io.outs,
            &self.step_key,
            &params,
            &running,
        );
        r.reads_network_input = node.inputs[0] == 0;
        r.relu = epilogue.is_some();
        r.residual = io.residual;
        r.folded = io.folded;
        r.eval_folded = io.eval_folded;
        r.fused = io.fused;
        node.layer.op().record(&mut r)?;
        let train0 = rec.train.len();
        rec.train.extend(r.train);
        rec.eval.extend(r.eval);
        for mut x in r.exchanges {
            x.at += train0;
            rec.exchanges.push(x);
        }
        rec.conv_kernels.extend(r.conv_kernels.into_iter().map(|(pass, kernel)| (name.clone(), pass, kernel)));
        rec.se_saved.extend(r.se_saved);
        Ok((r.backward, r.backward_exchange))
    }

    /// The loss: cross-entropy forward and its gradient into `dlogits` — against the labels
    /// (label-smoothed in training) or, in a soft-target plan, against `t.targets` — scaled by an
    /// f16 plan's loss scale and by the micro-batch weight, with the batch's sums into the metrics.
    /// Evaluation measures plain cross-entropy against the labels.
    fn record_loss(
        &self,
        logits: &Tensor,
        dlogits: &Tensor,
        t: &LossTensors,
        rec: &mut Recorded,
    ) -> Result<LossWeight> {
        let gpu = &*self.gpu;
        let (train0, eval0) = (rec.train.len(), rec.eval.len());
        let _scope = gpu.label_scope("loss");
        let scale = self.scaler.as_ref().map(|s| &s.state);
        let (loss, weight) = match &t.targets {
            Some(targets) => cross_entropy::cross_entropy_soft_weighted(
                gpu,
                logits,
                targets,
                dlogits,
                &t.per_sample,
                &t.train_result,
                scale,
            )?,
            None => cross_entropy::cross_entropy_weighted(
                gpu,
                logits,
                &t.labels,
                dlogits,
                &t.per_sample,
                &t.train_result,
                self.label_smoothing,
                scale,
            )?,
        };
        rec.train.extend(loss);
        rec.eval.extend(cross_entropy::cross_entropy_forward_backward(
            gpu,
            logits,
            &t.labels,
            dlogits,
            &t.per_sample,
            &t.eval_result,
            scale,
        )?);
        label(rec.train[train0..].iter_mut().chain(&mut rec.eval[eval0..]), "loss", Pass::Loss);
        Ok(weight)
    }

    /// One training step on the batch already written into `plan`: forward, loss, backward and
    /// every optimizer update in one command buffer. Returns without waiting for the GPU.
    pub fn train_step(&mut self, plan: &StepPlan) -> wgpu::SubmissionIndex {
        self.train_micro_step(plan, 0, 1)
    }

    /// Micro-batch `index` (0-based) of a group of `count` (`--grad-accum-steps`; the last group
    /// of an epoch may be shorter) on the batch already written into `plan`: forward, the loss
    /// with its gradient divided by `count`, backward, the gradients added into the accumulator;
    /// the last of the group also runs the loss scaler, clipping, the optimizer and the EMA.
    /// `count` 1 is [`Network::train_step`]. Returns without waiting for the GPU.
    pub fn train_micro_step(&mut self, plan: &StepPlan, index: usize, count: usize) -> wgpu::SubmissionIndex {
        assert!(plan.exchanges.is_empty(), "a --sync-bn plan steps through gradient_pass_exchanging");
        let m = self.begin_micro_batch(plan, index, count);
        self.gpu.run(&self.micro_dispatches(plan, m))
    }

    /// Before micro-batch `index` of `count` is submitted: its loss weight (1/count), the
    /// batch-norm batch counts, and on the group's last the optimizer's step number and the
    /// EMA's decay ([`Network::begin_step`]). Returns where the micro-batch stands.
    pub fn begin_micro_batch(&mut self, plan: &StepPlan, index: usize, count: usize) -> MicroBatch {
        let m = MicroBatch::of(index, count);
        assert!(
            m == MicroBatch::Whole || self.accum.is_some(),
            "micro-batch {index} of {count}: call set_grad_accum_steps first"
        );
        plan.loss_weight.set(&self.gpu, 1.0 / count.max(1) as f32);
        if m.updates() {
            self.begin_step();
        } else {
            for b in &mut self.bn {
                b.num_batches_tracked += 1;
            }
        }
        self.accum_pending = !m.updates();
        m
    }

    /// The gradient accumulation's dispatches after micro-batch `m`'s backward pass (none for a
    /// whole step). Returns without waiting.
    pub fn accumulate(&self, m: MicroBatch) -> wgpu::SubmissionIndex {
        self.gpu.run(&self.accum_dispatches(m).iter().collect::<Vec<_>>())
    }

    fn accum_dispatches(&self, m: MicroBatch) -> &[Dispatch] {
        self.accum.as_ref().map_or(&[], |a| a.dispatches(m))
    }

    /// The forward, loss and backward of a training step, without the optimizer update: for data
    /// parallelism, where the gradients are averaged across ranks before [`Network::apply_update`].
    /// Call [`Network::begin_step`] first. Returns without waiting.
    pub fn gradient_pass(&self, plan: &StepPlan) -> wgpu::SubmissionIndex {
        assert!(plan.exchanges.is_empty(), "a --sync-bn plan steps through gradient_pass_exchanging");
        self.gpu.run(&self.casts.iter().chain(&plan.train).collect::<Vec<_>>())
    }

    /// [`Network::gradient_pass`] of a plan with [`BnExchange`]s (`--sync-bn`): one submit per
    /// stretch between exchanges, and `exchange` called at each — after the stretch before it was
    /// submitted; reading the buffer waits for it — to replace the buffer's contents with every
    /// rank's combined. Without exchanges, one submit, as `gradient_pass`. Returns without waiting
    /// for the last stretch.
    pub fn gradient_pass_exchanging(
        &self,
        plan: &StepPlan,
        mut exchange: impl FnMut(&BnExchange) -> Result<()>,
    ) -> Result<wgpu::SubmissionIndex> {
        let mut start = 0;
        let mut casts = Some(&self.casts);
        for x in &plan.exchanges {
            self.gpu.run(&casts.take().into_iter().flatten().chain(&plan.train[start..x.at]).collect::<Vec<_>>());
            exchange(x).with_context(|| format!("--sync-bn: the exchange of {} ({})", x.layer, x.kind.what()))?;
            start = x.at;
        }
        Ok(self.gpu.run(&casts.into_iter().flatten().chain(&plan.train[start..]).collect::<Vec<_>>()))
    }

    /// The loss scaler's check (f16) and every optimizer update from the gradients now in the
    /// flat buffer: with [`Network::gradient_pass`], the dispatches of [`Network::train_dispatches`].
    /// Returns without waiting.
    /// The loss scaler's check (f16), gradient clipping (`--clip-grad-norm`) and every optimizer
    /// update from the gradients now in the flat buffer (under MPI: the averaged ones, so clipping
    /// follows the all-reduce, as in DDP): with [`Network::gradient_pass`], the dispatches of
    /// [`Network::train_dispatches`]. Returns without waiting.
    pub fn apply_update(&self) -> wgpu::SubmissionIndex {
        self.gpu.run(&self.update_dispatches().collect::<Vec<_>>())
    }

    /// After the backward pass: (f16: the loss scaler), (clipping), every optimizer update,
    /// (the model EMA).
    fn update_dispatches(&self) -> impl Iterator<Item = &Dispatch> {
        let scaler = self.scaler.iter().flat_map(|s| &s.dispatches);
        let clip = self.clip.iter().flat_map(|c| &c.dispatches);
        let ema = self.ema.iter().flat_map(|e| e.dispatches());
        scaler.chain(clip).chain(self.updates.iter().map(|u| &u.dispatch)).chain(ema)
    }

    /// The learning rate of the following steps (schedules change it between steps; the next
    /// [`Network::begin_step`] writes it with the step number).
    pub fn set_lr(&mut self, lr: f64) {
        for u in &mut self.updates {
            u.config = u.config.with_lr(lr);
        }
    }

    /// Advance the step counters (optimizer step number, batch-norm batch counts) for the next
    /// submit of [`Network::train_dispatches`].
    pub fn begin_step(&mut self) {
        self.step += 1;
        // Two words queued before the step's submit; no graph without dropout reads them.
        let key = step_key(self.seed, self.step);
        self.gpu.queue.write_buffer(&self.step_key.buffer, self.step_key.offset, bytemuck::cast_slice(&key));
        for u in &self.updates {
            u.set_step(&self.gpu, self.step);
        }
        for b in &mut self.bn {
            b.num_batches_tracked += 1;
        }
        if let Some(e) = &mut self.ema {
            e.begin_update(&self.gpu, self.step, self.bn.iter().map(|b| b.num_batches_tracked).collect());
        }
    }

    /// The optimizer's dispatches per step: 1 unless the parameters outgrow one binding.
    pub fn optimizer_dispatches(&self) -> usize {
        self.updates.len()
    }

    /// A training step's dispatches in order: (f16: the weights' cast), the plan's forward, loss
    /// and backward, (f16: the loss scaler), (gradient clipping), then every optimizer update.
    pub fn train_dispatches<'a>(&'a self, plan: &'a StepPlan) -> Vec<&'a Dispatch> {
        self.micro_dispatches(plan, MicroBatch::Whole)
    }

    /// Micro-batch `m`'s dispatches in order: (f16: the weights' cast), the plan's forward, loss
    /// and backward, the gradient accumulation, and on a group's last micro-batch (or a whole
    /// step) the update dispatches of [`Network::train_dispatches`].
    pub fn micro_dispatches<'a>(&'a self, plan: &'a StepPlan, m: MicroBatch) -> Vec<&'a Dispatch> {
        let update = m.updates().then(|| self.update_dispatches()).into_iter().flatten();
        self.casts.iter().chain(&plan.train).chain(self.accum_dispatches(m)).chain(update).collect()
    }

    /// The evaluation pass's dispatches in order.
    pub fn eval_dispatches<'a>(&'a self, plan: &'a StepPlan) -> Vec<&'a Dispatch> {
        self.casts.iter().chain(&plan.eval).collect()
    }

    /// Evaluate the batch already written into `plan` (batch norm in eval mode); the loss and
    /// correct count add to `plan.eval_result`. Returns without waiting.
    pub fn eval_batch(&self, plan: &StepPlan) -> wgpu::SubmissionIndex {
        self.gpu.run(&self.eval_dispatches(plan))
    }
}

/// Everything for one batch size, allocated once and replayed.
pub struct StepPlan {
    pub n: usize,
    /// f16 plans: the f32 batch the host writes, cast into `acts[0]` first.
    pub input_f32: Option<Tensor>,
    /// Activation 0 is the input batch [n, c, h, w]; the last is the logits.
    pub acts: Vec<Tensor>,
    pub grads: Vec<Tensor>,
    /// u32 class indices [n].
    pub labels: Tensor,
    /// Per sample (loss, correct, predicted class) of the last batch.
    pub per_sample: Tensor,
    /// Running sums (see `ops::cross_entropy::result`) of training and of evaluation.
    pub train_result: Tensor,
    pub eval_result: Tensor,
    /// The training loss gradient's multiplier (1/N of a micro-batch of `--grad-accum-steps N`).
    pub loss_weight: LossWeight,
    /// A soft-target plan's ([`Network::soft_targets`]) targets [n, classes], written per batch.
    pub targets: Option<Tensor>,
    /// Every SE block's per-sample intermediates of the last pass (squeeze, hidden, excitation).
    pub se_saved: Vec<SeSaved>,
    /// The kernel each conv layer's passes run (layer name, pass, kernel), as the tuner chose.
    pub conv_kernels: Vec<(String, ConvPass, ConvKernel)>,
    /// The per-reader gradients of activations two layers read ("layer1.0.relu output grad from
    /// layer1.0.add"), by activation and reader: the summed gradient goes to `grads`. A first
    /// reader that sums the other's into its own ([`LayerOp::accumulates_input_grad`]) has none.
    pub fork_grads: Vec<Tensor>,
    train: Vec<Dispatch>,
    eval: Vec<Dispatch>,
    /// `--sync-bn`: where the training step stops for the ranks to combine a batch norm's
    /// per-channel numbers, in step order (empty otherwise).
    pub exchanges: Vec<BnExchange>,
}

/// A plan's dispatch lists while its nodes are recorded.
#[derive(Default)]
struct Recorded {
    train: Vec<Dispatch>,
    eval: Vec<Dispatch>,
    /// Each node's backward dispatches and backward exchange, in node order.
    backward: Vec<(Vec<Dispatch>, Option<BnExchange>)>,
    exchanges: Vec<BnExchange>,
    se_saved: Vec<SeSaved>,
    conv_kernels: Vec<(String, ConvPass, ConvKernel)>,
}

/// A node the plan records at some position: the head of a fused group (or a node on its own,
/// `epilogue` none), the activation its kernels write, and an [`Epilogue::AddRelu`]'s addition
/// (node, slot of the other operand).
#[derive(Clone, Copy, Debug)]
struct Group {
    head: usize,
    epilogue: Option<Epilogue>,
    out: usize,
    residual: Option<(usize, usize)>,
}

/// The fusion pass's decisions (`Network::fusions`).
struct Fusions {
    /// Per node position: what is recorded there (none: a step of a fused group, or a head
    /// recorded later).
    groups: Vec<Option<Group>>,
    /// Per activation: never stored (a fused head's or addition's output); its gradient never.
    unused: Vec<bool>,
    /// Per activation marked `unused`: the activation is stored all the same, only its gradient
    /// is not (the ReLU's output before a fused max pool, which evaluation pools apart; a batch
    /// norm's output whose gradient an SE block leaves to it).
    act_kept: Vec<bool>,
    /// Per node: its output gradient comes from the next node, deferred
    /// ([`LayerOp::takes_deferred_grad`]), and is read from the gradient of the addition
    /// operand (node, slot) the next node's fused group writes.
    deferred: Vec<Option<(usize, usize)>>,
    /// Per node with a deferred gradient: in training the next node also applies this one's
    /// per-channel affine map as it loads this one's input ([`LayerOp::applies_input_affine`]),
    /// and this one saves its statistics only.
    affine_in_next: Vec<bool>,
    /// Per node: the batch norm (with a fused ReLU) it applies as it loads its input in training
    /// ([`LayerOp::applies_input_bn_relu`]); that batch norm saves its statistics only.
    bn_by_conv: Vec<Option<usize>>,
    /// Per node: its bias gradient is written by the next node's backward
    /// ([`LayerOp::channel_bias`], [`LayerOp::sums_input_grad`]).
    bias_by_next: Vec<bool>,
    /// Per activation read by two layers: its two gradients are summed in its first reader's
    /// backward ([`LayerOp::accumulates_input_grad`]), not by an addition after it.
    fork_in_reader: Vec<bool>,
    /// Per node: a global average pool whose passes the next node runs
    /// ([`LayerOp::averages_pixels`], [`LayerOp::absorbs_pixel_average`]).
    pooled_by_next: Vec<bool>,
}

/// The tensors a plan allocates before recording (`Network::plan`): activations, their gradients,
/// a forked activation's per-reader gradients and the deferred gradients (with the statistics a
/// node leaving its affine map shares; `Network::deferred_grad_tensors`).
struct PlanBuffers {
    acts: Vec<Tensor>,
    grads: Vec<Tensor>,
    contrib: HashMap<(usize, usize), Tensor>,
    se_grads: HashMap<usize, (Tensor, Option<Tensor>)>,
    /// [`Network::stat_handoffs`].
    stats: HashMap<usize, StatHandoff>,
    /// [`Network::left_weight_grads`].
    weight_grads: HashMap<usize, LeftWeightGradBuffers>,
    /// [`Network::bn_applied_stats`].
    bn_applied: HashMap<usize, Tensor>,
}

/// A node's weight gradients summed by the node before it ([`Network::left_weight_grads`]): the
/// plan-owned tensors the node's passes save for it, and what they are.
struct LeftWeightGradBuffers {
    saved: Tensor,
    dsaved: Tensor,
    spec: LeftWeightGrad,
}

/// A batch norm's statistics written by the node before it ([`Network::stat_handoffs`]).
struct StatHandoff {
    producer: usize,
    blocks: Tensor,
    rows: usize,
}

/// The tensors a recorded node reads and writes.
struct NodeIo<'a> {
    inputs: Vec<&'a Tensor>,
    dinputs: Vec<&'a Tensor>,
    outs: (&'a Tensor, &'a Tensor),
    residual: Option<(&'a Tensor, &'a Tensor)>,
    /// Evaluation: the affine node folded into this one, or this one folded into the node before.
    folded: Option<Folded<'a>>,
    eval_folded: bool,
    /// What the fusion pass hands between it and its neighbours.
    fused: Handoffs<'a>,
}

/// The loss's buffers: the labels (and a soft-target plan's targets) the host writes,
/// per-sample results, the metric sums.
struct LossTensors {
    labels: Tensor,
    per_sample: Tensor,
    train_result: Tensor,
    eval_result: Tensor,
    targets: Option<Tensor>,
}

impl LossTensors {
    /// `soft`: the logits' shape, for soft targets of the same shape.
    fn new(gpu: &Gpu, n: usize, soft: Option<&Shape>) -> Result<LossTensors> {
        Ok(LossTensors {
            labels: Tensor::zeros(gpu, "labels", &[n])?,
            per_sample: Tensor::zeros(gpu, "per-sample loss", &[n, cross_entropy::per_sample::LEN])?,
            train_result: Tensor::zeros(gpu, "train metrics", &[result::LEN])?,
            eval_result: Tensor::zeros(gpu, "eval metrics", &[result::LEN])?,
            targets: soft.map(|s| Tensor::zeros(gpu, "soft targets", s)).transpose()?,
        })
    }
}

/// Name dispatches after the layer (or "loss", "input") and the pass they belong to.
fn label<'a>(dispatches: impl Iterator<Item = &'a mut Dispatch>, layer: &str, pass: Pass) {
    for d in dispatches {
        (d.layer, d.pass) = (layer.to_string(), pass);
    }
}

impl StepPlan {
    /// The f32 input batch the host writes [n, c, h, w].
    pub fn input(&self) -> &Tensor {
        self.input_f32.as_ref().unwrap_or(&self.acts[0])
    }

    pub fn logits(&self) -> &Tensor {
        &self.acts[self.acts.len() - 1]
    }

    /// Queue a soft-target plan's targets [n, classes] (Mixup's) for the next submit.
    pub fn write_targets(&self, gpu: &Gpu, targets: &[f32]) -> Result<()> {
        self.targets.as_ref().context("this plan trains on labels, not soft targets")?.write(gpu, targets)
    }

    /// Queue the batch (images as f32 NCHW, labels) for the next submit.
    pub fn write_batch(&self, gpu: &Gpu, images: &[f32], labels: &[u32]) -> Result<()> {
        self.input().write(gpu, images)?;
        self.labels.write(gpu, labels)
    }
}

/// Zero a metrics buffer (queued before the next submit).
pub fn clear_metrics(gpu: &Gpu, t: &Tensor) {
    gpu.queue.write_buffer(&t.buffer, t.offset, bytemuck::cast_slice(&[0.0f32; result::LEN]));
}
