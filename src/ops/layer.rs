//! The layer trait: everything the rest of the program asks of an op that can be a node of a
//! model graph. Each such op implements [`LayerOp`] once, in its own folder (`ops/<op>/layer.rs`):
//! its parameters, its output shape, the dispatches it records into a step plan, its f64
//! reference passes, its ONNX nodes and its row in `senet summary`. The step plan
//! (`model::plan`), the whole-model reference (`reference::model`), the ONNX export and the
//! summary walk the graph and ask each node's op; none of them names an op. `model::Layer` is the
//! registry: one variant per op, mapped to its implementation by `Layer::op`.

use std::any::Any;
use std::collections::HashMap;

use anyhow::{Context, Result, ensure};

use super::conv2d::{ConvKernel, ConvPass};
use super::pool::MaxPool2d;
use super::se_block::SeWeightGradIo;
use crate::gpu::{Dispatch, Gpu, Precision, Tensor};

/// Shape of an activation: [n, c, h, w] or, after the global pool, [n, c].
pub type Shape = Vec<usize>;

/// What a parameter is initialised to (PyTorch's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// U(-1/sqrt(fan_in), 1/sqrt(fan_in)): kaiming_uniform(a=sqrt(5)) for weights, and the bias rule.
    FanInUniform {
        fan_in: usize,
    },
    Ones,
    Zeros,
}

/// A trainable tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    /// The parameter `suffix` of the layer `layer` (`features.0` + `weight`).
    pub fn of(layer: &str, suffix: &str, shape: Vec<usize>, init: Init) -> ParamSpec {
        ParamSpec { name: format!("{layer}.{suffix}"), shape, init }
    }
}

/// What a layer's reference forward leaves for its backward (batch statistics, pooling indices).
pub type Saved = Option<Box<dyn Any>>;

/// One op as a node of a model graph.
pub trait LayerOp {
    /// How many activations it reads.
    fn arity(&self) -> usize {
        1
    }

    /// Its trainable tensors under the prefix `name`, in state-dict order.
    fn parameters(&self, _name: &str) -> Vec<ParamSpec> {
        Vec::new()
    }

    /// The channels of its running statistics (`running_mean`, `running_var` state-dict buffers),
    /// for a layer that keeps them.
    fn running_stats(&self) -> Option<usize> {
        None
    }

    /// Its output shape for the shapes of what it reads (checked to fit; errors name `name`).
    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape>;

    /// Whether the plan may run epilogue `e` inside this layer's kernels ([`Record::relu`],
    /// [`Record::residual`]) in place of the nodes that alone read its output. `fuse` is the
    /// plan's `--fuse`: off, only the epilogues fused before that option existed (the batch
    /// norm's ReLU) may be taken, so a `--fuse off` plan is the same list of dispatches as before.
    fn takes_epilogue(&self, _e: Epilogue, _fuse: bool) -> bool {
        false
    }

    /// What this op is as a step of another op's epilogue (a ReLU, an addition), if anything.
    fn epilogue_step(&self) -> Option<EpilogueStep> {
        None
    }

    /// Training: the parameter (`"bias"`) whose gradient is the per-channel sum of this op's
    /// output gradient, if it has one — a layer after it that sums its input gradient
    /// ([`LayerOp::sums_input_grad`]) may write it instead ([`Handoffs::bias_grad_elsewhere`]).
    fn channel_bias(&self) -> Option<&'static str> {
        None
    }

    /// Training, with its [`Epilogue::AddRelu`] fused: this op can leave its input gradient to
    /// the layer before it, writing per sample what that layer needs to compute it where it
    /// reads it ([`Handoffs::defer_input_grad`]; an SE block's s and dz, [n, 2, C]).
    fn defers_input_grad(&self) -> bool {
        false
    }

    /// Training: this op's backward can take its output gradient from the layer after it in the
    /// form [`LayerOp::defers_input_grad`] leaves it ([`Handoffs::grad_from_next`]).
    fn takes_deferred_grad(&self) -> bool {
        false
    }

    /// Training, with its [`Epilogue::AddRelu`] fused: this op can read the input of a batch norm
    /// before it and apply that batch norm as it loads each value ([`Handoffs::input_affine`]).
    fn applies_input_affine(&self) -> bool {
        false
    }

    /// Training: this op, its input `inp` (shape) the output of a batch norm with a fused ReLU
    /// that it alone reads, can read that batch norm's input instead and apply the batch norm and
    /// the ReLU as it loads each value in every pass that reads its input
    /// ([`Handoffs::input_affine`]), with the kernels it runs for that shape in `precision`.
    fn applies_input_bn_relu(&self, _gpu: &Gpu, _inp: &[usize], _precision: Precision) -> Result<bool> {
        Ok(false)
    }

    /// Training: this op's forward can save its statistics only and leave its per-channel affine
    /// map to the layer after it ([`LayerOp::applies_input_affine`], [`Handoffs::stats_only`]).
    fn leaves_affine_to_next(&self) -> bool {
        false
    }

    /// Training: this op's backward can also write the per-channel sum of its input gradient,
    /// the bias gradient of the layer before it ([`LayerOp::channel_bias`], [`Handoffs::input_bias_grad`]).
    fn sums_input_grad(&self) -> bool {
        false
    }

    /// Training: the elements per block when this op's forward can write its output's per-channel
    /// statistics, (mean, M2) per block of that many elements of each channel in order, as it
    /// stores the output (`inp`: its input's shape; [`Handoffs::output_stats`]); `None` when it
    /// cannot (its kernel for this shape has no such epilogue) or the adapter's options turn it
    /// off (`--fuse off`, `--bn-stats off`).
    fn output_stats_rows(&self, _gpu: &Gpu, _inp: &[usize], _precision: Precision) -> Result<Option<usize>> {
        Ok(None)
    }

    /// Training: this op's forward can take its batch statistics from the layer before it
    /// ([`LayerOp::output_stats_rows`], [`Handoffs::input_stats`]).
    fn takes_input_stats(&self) -> bool {
        false
    }

    /// Training, having left its input gradient to the layer before it
    /// ([`LayerOp::defers_input_grad`]): that layer can sum this op's weight gradients too
    /// ([`LayerOp::sums_next_weight_grad`]), reading tensors the plan owns for the two
    /// ([`Handoffs::weight_grad_by_prev`]): their shapes for input `inp`, and the parameters.
    fn leaves_weight_grad(&self, _inp: &[usize]) -> Option<LeftWeightGrad> {
        None
    }

    /// Training, taking a deferred gradient ([`LayerOp::takes_deferred_grad`]): this op's
    /// backward can also sum the weight gradients the layer after it leaves
    /// ([`Handoffs::next_weight_grad`]) on `gpu`.
    fn sums_next_weight_grad(&self, _gpu: &Gpu) -> bool {
        false
    }

    /// This op is a global average pool: out[n, c] is the mean of inp[n, c] over its pixels, and
    /// its backward spreads dout[n, c] / (H·W) back over them. The layer that alone reads its
    /// output may run both passes itself ([`LayerOp::absorbs_pixel_average`],
    /// [`Handoffs::pooled_by_next`]).
    fn averages_pixels(&self) -> bool {
        false
    }

    /// This op can average its input over the pixels of the pool before it as it loads them,
    /// and spread its input gradient back over them ([`LayerOp::averages_pixels`],
    /// [`Handoffs::pool_before`]).
    fn absorbs_pixel_average(&self) -> bool {
        false
    }

    /// Whether its backward can write its (only) input's gradient as its own plus another tensor
    /// of that shape ([`Handoffs::dinp_addend`]), the own one rounded to the plan's type before the
    /// sum and the sum after it, as an addition of the two stored gradients would. The plan asks
    /// it of the first reader of an activation two layers read (whose backward runs last): the
    /// other reader's gradient is then summed there instead of by an addition after it, and the
    /// first reader's own gradient is never stored. Only under `--fuse on`.
    fn accumulates_input_grad(&self) -> bool {
        false
    }

    /// Evaluation only: how this op's weight could absorb a per-output-channel affine map that
    /// alone reads its output (a batch norm from its running statistics, [`LayerOp::eval_affine`])
    /// — its weight scaled per output channel, a bias added, and the affine's ReLU as its
    /// epilogue ([`Record::folded`]). None: it cannot.
    fn fold_target(&self) -> Option<FoldTarget> {
        None
    }

    /// Evaluation only: this op as a per-channel affine map y = x·s + t that the layer before it
    /// may absorb ([`LayerOp::fold_target`]); then it records no evaluation dispatch
    /// ([`Record::eval_folded`]).
    fn eval_affine(&self) -> Option<EvalAffine> {
        None
    }

    /// Record its forward (training and evaluation) and backward dispatches.
    fn record(&self, r: &mut Record<'_>) -> Result<()>;

    /// The f64 forward.
    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput>;

    /// The f64 backward: the gradient of each input, in order; parameter gradients go to
    /// [`RefBackward::put`].
    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>>;

    /// Its ONNX nodes (eval mode).
    fn onnx(&self, o: &mut OnnxNodes<'_>);

    /// Its type column in `senet summary` ("Conv2d 3→64 3x3/1").
    fn describe(&self) -> String;

    /// Multiply-adds per image (convolutions, linear layers and the SE block's FCs and rescaling;
    /// the paper's convention counts the rest as 0). `inp` and `out` are batch-1 shapes.
    fn macs(&self, _inp: &[usize], _out: &[usize]) -> usize {
        0
    }

    /// An SE block (the summary reports their overhead apart).
    fn is_se(&self) -> bool {
        false
    }
}

/// An epilogue a layer's kernels may run on their own output y, in place of the nodes that
/// alone read it ([`LayerOp::takes_epilogue`]): they write the epilogue's output, and y and the
/// epilogue's intermediate values are never stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// relu(y): y's one reader is a ReLU.
    Relu,
    /// relu(y + r): y's one reader is an addition of y (its first operand, a residual unit's
    /// branch) and another activation r (its second, the shortcut), whose one reader, recorded
    /// right after it, is a ReLU. An SE block on the shortcut (the identity placement) is the
    /// second operand and is not fused.
    AddRelu,
    /// maxpool(relu(y)): y's one reader is a ReLU whose one reader is this max pool. The ReLU's
    /// output is stored only in evaluation, where the pool runs apart ([`Handoffs::pool`]).
    ReluMaxPool(MaxPool2d),
}

/// A weight that can absorb a per-output-channel affine map ([`LayerOp::fold_target`]): the
/// parameter `weight` of the layer, `channels` rows of `per_channel` values, and its own bias, if
/// any (folded as bias·s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoldTarget {
    pub channels: usize,
    pub per_channel: usize,
    pub weight: &'static str,
    pub bias: Option<&'static str>,
}

/// A per-channel affine map in evaluation ([`LayerOp::eval_affine`]), a batch norm's:
/// s = `scale` / sqrt(running_var + eps), t = `shift` − running_mean·s, from the layer's
/// parameters `scale` and `shift` and its running statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalAffine {
    pub channels: usize,
    pub eps: f64,
    pub scale: &'static str,
    pub shift: &'static str,
}

/// What a layer's evaluation forward reads and writes when the affine layer after it is folded
/// in ([`Record::folded`]): the folded weight (in the plan's activation type, what its GEMMs
/// read) and bias (f32), the affine's output (or its fused ReLU's), and whether to apply that ReLU.
#[derive(Clone, Copy)]
pub struct Folded<'a> {
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub out: &'a Tensor,
    pub relu: bool,
}

/// What the plan's fusion pass moves between a layer and its neighbours ([`Record::fused`]): a
/// pool fused after it, gradients and statistics one of them computes for the other.
#[derive(Clone, Copy, Default)]
pub struct Handoffs<'a> {
    /// An [`Epilogue::ReluMaxPool`] is fused into this layer (`relu` is set too): the pool, and
    /// the buffer the evaluation pass writes the ReLU's output into before pooling it apart.
    /// `out` and `dout` are the pool's.
    pub pool: Option<(MaxPool2d, &'a Tensor)>,
    /// Training: this layer's backward also writes the per-channel sum of its input gradient
    /// into this tensor, the bias gradient of the layer before it ([`LayerOp::sums_input_grad`]).
    pub input_bias_grad: Option<&'a Tensor>,
    /// Training: the layer after this one writes its bias gradient ([`LayerOp::channel_bias`]);
    /// its own backward leaves it alone.
    pub bias_grad_elsewhere: bool,
    /// Training: this layer leaves its input gradient to the layer before it and writes what
    /// that layer needs into this tensor ([`LayerOp::defers_input_grad`]).
    pub defer_input_grad: Option<&'a Tensor>,
    /// Training: this layer's output gradient comes from the layer after it, deferred
    /// ([`LayerOp::takes_deferred_grad`]): that layer's tensor; `dout` is then the gradient that
    /// layer reads (an SE block's shortcut gradient).
    pub grad_from_next: Option<&'a Tensor>,
    /// Training: the layer before this one (a batch norm) leaves its normalisation to it
    /// ([`LayerOp::applies_input_affine`]; with that batch norm's ReLU,
    /// [`LayerOp::applies_input_bn_relu`]): read that layer's input and its statistics and
    /// parameters instead of its output.
    pub input_affine: Option<AffineInput<'a>>,
    /// Training: this layer's forward also writes its output's block statistics into this
    /// plan-owned tensor, which the layer after it reads ([`LayerOp::output_stats_rows`]).
    pub output_stats: Option<&'a Tensor>,
    /// Training: the layer before this one wrote this layer's input's block statistics
    /// ([`LayerOp::takes_input_stats`]): the tensor and the elements per block.
    pub input_stats: Option<(&'a Tensor, usize)>,
    /// Training: the next layer applies this one's normalisation ([`LayerOp::leaves_affine_to_next`]):
    /// save the batch statistics into this plan-owned tensor, write no output.
    pub stats_only: Option<&'a Tensor>,
    /// The layer after this one runs this one's passes ([`LayerOp::averages_pixels`]): record
    /// nothing.
    pub pooled_by_next: bool,
    /// The global average pool before this layer, whose passes it runs
    /// ([`LayerOp::absorbs_pixel_average`]): the pool's input and the buffer that input's gradient
    /// goes to. The forward reads that input and writes this layer's input (the pool's output,
    /// which the backward reads), the backward writes that gradient.
    pub pool_before: Option<(&'a Tensor, &'a Tensor)>,
    /// Training: the layer before this one sums this one's weight gradients
    /// ([`LayerOp::leaves_weight_grad`]): the plan-owned tensors this layer's passes save for it
    /// (an SE block's forward values and per-sample gradients); record no weight-gradient pass.
    pub weight_grad_by_prev: Option<(&'a Tensor, &'a Tensor)>,
    /// Training: this layer's backward also sums the weight gradients of the layer after it
    /// ([`LayerOp::sums_next_weight_grad`]).
    pub next_weight_grad: Option<SeWeightGradIo<'a>>,
    /// The backward writes `dinputs[0]` = its own gradient + this tensor
    /// ([`LayerOp::accumulates_input_grad`]): the other reader's gradient of a forked activation.
    pub dinp_addend: Option<&'a Tensor>,
}

/// A batch norm's normalisation left to the layer after it ([`Handoffs::input_affine`]): the batch
/// norm's input, its saved batch statistics [2, C] (mean, invstd) and its scale and shift [C].
#[derive(Clone, Copy)]
pub struct AffineInput<'a> {
    pub inp: &'a Tensor,
    pub stats: &'a Tensor,
    pub scale: &'a Tensor,
    pub shift: &'a Tensor,
}

/// What an op leaving its weight gradients to the layer before it needs the plan to own
/// ([`LayerOp::leaves_weight_grad`]): the shapes of the two tensors its passes save for that
/// layer, and its parameters' suffixes (an SE block's fc1 and fc2 weights, then their biases
/// where it has them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeftWeightGrad {
    pub saved: Vec<usize>,
    pub dsaved: Vec<usize>,
    pub weights: [&'static str; 2],
    pub biases: Option<[&'static str; 2]>,
}

/// What a node is as a step of an epilogue ([`LayerOp::epilogue_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpilogueStep {
    Relu,
    Add,
    MaxPool(MaxPool2d),
}

/// The input shape has rank 4 ([n, c, h, w]), or an error naming the layer.
pub fn expect_spatial(name: &str, what: &str, inp: &[usize]) -> Result<()> {
    ensure!(inp.len() == 4, "{name} ({what}) needs an [n, c, h, w] input, got {inp:?}");
    Ok(())
}

/// A parameter's tensors as a plan binds them: views of the network's flat buffers.
#[derive(Clone, Copy)]
pub struct ParamTensors<'a> {
    pub value: &'a Tensor,
    pub grad: &'a Tensor,
    /// The f16 copy of `value` an f16 network's GEMMs read.
    pub half: Option<&'a Tensor>,
}

/// What a [`BnExchange`] holds, and so how the ranks' copies combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Forward: (count, mean, M2) per channel, merged (`ops::batch_norm::merge_rank_statistics`).
    Statistics,
    /// Backward: (count, sum dout, sum dout*(x - mean)) per channel, added
    /// (`ops::batch_norm::sum_rank_grad_sums`).
    GradSums,
}

impl ExchangeKind {
    pub fn what(self) -> &'static str {
        match self {
            ExchangeKind::Statistics => "batch statistics",
            ExchangeKind::GradSums => "gradient sums",
        }
    }
}

/// A point of a `--sync-bn` training step where every rank's per-channel numbers of one batch
/// norm are combined: the dispatches before `at` have written this rank's into `buffer` [3, C];
/// the ones from `at` on read every rank's combined from it.
pub struct BnExchange {
    /// The batch norm (PyTorch name).
    pub layer: String,
    pub kind: ExchangeKind,
    pub buffer: Tensor,
    /// Channels.
    pub c: usize,
    /// Index in the plan's training dispatches of the first one after the exchange.
    pub at: usize,
}

impl BnExchange {
    pub fn new(layer: &str, kind: ExchangeKind, buffer: Tensor, at: usize) -> BnExchange {
        let c = buffer.shape[1];
        BnExchange { layer: layer.to_string(), kind, buffer, c, at }
    }
}

/// An SE block's saved forward state: per sample [z (C) | h (hidden) | s (C)].
pub struct SeSaved {
    pub name: String,
    pub c: usize,
    pub hidden: usize,
    pub saved: Tensor,
}

impl SeSaved {
    /// The excitations s [n, C] of the last pass, read back.
    pub fn excitations(&self, gpu: &Gpu) -> Result<Vec<Vec<f32>>> {
        let v = self.saved.read::<f32>(gpu)?;
        let stride = 2 * self.c + self.hidden;
        Ok(v.chunks(stride).map(|row| row[self.c + self.hidden..].to_vec()).collect())
    }
}

/// A node being recorded into a step plan: the tensors the plan allocated for it, and the
/// dispatch lists it fills. Scratch tensors (batch statistics, pooling indices) the op allocates
/// itself; the dispatches' bind groups keep them alive.
pub struct Record<'a> {
    pub gpu: &'a Gpu,
    /// The layer's state-dict prefix.
    pub name: &'a str,
    pub precision: Precision,
    /// `--sync-bn` under several ranks: layers with batch statistics split their passes around
    /// [`BnExchange`]s.
    pub sync_bn: bool,
    /// The activations it reads, in order, and the gradient buffer each one's gradient goes to.
    pub inputs: Vec<&'a Tensor>,
    pub dinputs: Vec<&'a Tensor>,
    /// The first input is the network's input: nobody reads its gradient.
    pub reads_network_input: bool,
    /// Its output and output gradient: with a fused ReLU, the ReLU's.
    pub out: &'a Tensor,
    pub dout: &'a Tensor,
    /// A ReLU is fused into this layer ([`LayerOp::takes_epilogue`]): apply it to the output,
    /// mask the gradient with it; the ReLU node records nothing.
    pub relu: bool,
    /// An [`Epilogue::AddRelu`] is fused into this layer (`relu` is set too): the other addend r
    /// and the buffer r's gradient goes to. The output is relu(y + r); the addition records nothing.
    pub residual: Option<(&'a Tensor, &'a Tensor)>,
    /// Evaluation: the affine layer that alone reads this one's output is folded into it
    /// ([`LayerOp::fold_target`]): the evaluation forward reads these weights and writes `out`;
    /// training is recorded as without it.
    pub folded: Option<Folded<'a>>,
    /// Evaluation: this layer is folded into the one before it ([`LayerOp::eval_affine`]):
    /// record no evaluation dispatch (training as without it).
    pub eval_folded: bool,
    /// What the fusion pass hands between this layer and its neighbours (all off: none).
    pub fused: Handoffs<'a>,
    /// The plan's [2] u32 [`StepKey`] that stochastic layers draw from, rewritten every step.
    pub step_key: &'a Tensor,
    pub(crate) params: &'a dyn Fn(&str) -> Result<ParamTensors<'a>>,
    pub(crate) running: &'a dyn Fn(&str) -> Result<(&'a Tensor, &'a Tensor)>,
    /// The training step's forward dispatches.
    pub train: Vec<Dispatch>,
    /// The evaluation pass's.
    pub eval: Vec<Dispatch>,
    /// The backward's, in the order they run.
    pub backward: Vec<Dispatch>,
    /// Forward exchanges, `at` an index of `train`.
    pub exchanges: Vec<BnExchange>,
    /// The backward's exchange, `at` an index of `backward`.
    pub backward_exchange: Option<BnExchange>,
    /// The kernel each convolution pass runs, as the tuner chose.
    pub conv_kernels: Vec<(ConvPass, ConvKernel)>,
    /// An SE block's saved state, for `senet excitations`.
    pub se_saved: Option<SeSaved>,
}

impl<'a> Record<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        gpu: &'a Gpu,
        name: &'a str,
        precision: Precision,
        sync_bn: bool,
        inputs: Vec<&'a Tensor>,
        dinputs: Vec<&'a Tensor>,
        (out, dout): (&'a Tensor, &'a Tensor),
        step_key: &'a Tensor,
        params: &'a dyn Fn(&str) -> Result<ParamTensors<'a>>,
        running: &'a dyn Fn(&str) -> Result<(&'a Tensor, &'a Tensor)>,
    ) -> Record<'a> {
        Record {
            gpu,
            name,
            precision,
            sync_bn,
            inputs,
            dinputs,
            reads_network_input: false,
            out,
            dout,
            relu: false,
            residual: None,
            folded: None,
            eval_folded: false,
            fused: Handoffs::default(),
            step_key,
            params,
            running,
            train: Vec::new(),
            eval: Vec::new(),
            backward: Vec::new(),
            exchanges: Vec::new(),
            backward_exchange: None,
            conv_kernels: Vec::new(),
            se_saved: None,
        }
    }

    /// Its first input and the buffer that input's gradient goes to.
    pub fn inp(&self) -> (&'a Tensor, &'a Tensor) {
        (self.inputs[0], self.dinputs[0])
    }

    /// The parameter `suffix` of this layer (`weight`).
    pub fn param(&self, suffix: &str) -> Result<ParamTensors<'a>> {
        (self.params)(&format!("{}.{suffix}", self.name))
    }

    /// The parameter `suffix` if `present` (an optional bias).
    pub fn param_if(&self, present: bool, suffix: &str) -> Result<Option<ParamTensors<'a>>> {
        present.then(|| self.param(suffix)).transpose()
    }

    /// Its running statistics (mean, var).
    pub fn running(&self) -> Result<(&'a Tensor, &'a Tensor)> {
        (self.running)(self.name)
    }

    /// Dispatches that run alike in training and evaluation.
    pub fn forward(&mut self, d: Vec<Dispatch>) {
        self.train.extend(d.iter().cloned());
        self.eval.extend(d);
    }

    /// A scratch tensor named after the layer ("layer1.0.se saved").
    pub fn scratch(&self, what: &str, shape: &[usize]) -> Result<Tensor> {
        Tensor::zeros(self.gpu, &format!("{} {what}", self.name), shape)
    }
}

/// `v`, rounded as `precision` stores it (an f16 plan's activations and GEMM weights: RNE to
/// f16, overflow to ±inf); f32 keeps it as it is (the reference's arithmetic stays f64).
pub fn stored(precision: Precision, mut v: Vec<f64>) -> Vec<f64> {
    if precision == Precision::F16 {
        for x in &mut v {
            *x = f64::from(half::f16::from_f64(*x));
        }
    }
    v
}

/// The (seed, step) stochastic layers draw from: the plan's step key tensor ([`Record::step_key`])
/// holds the current step's, rewritten by the host before every step, so each step draws anew
/// and a resumed run draws what an uninterrupted one would.
pub type StepKey = [u32; 2];

/// The key of step `step` (1-based, as the optimizer counts) of a run seeded `seed`.
pub fn step_key(seed: u64, step: u64) -> StepKey {
    [(seed ^ (seed >> 32)) as u32, step as u32]
}

/// A node's reference forward: what it reads (borrowed for `'a`) and the model's tensors
/// (for `'p`).
pub struct RefForward<'a, 'p> {
    pub name: &'a str,
    pub inputs: Vec<&'a [f64]>,
    /// The shapes of `inputs`.
    pub shapes: Vec<&'a [usize]>,
    /// Training mode (batch statistics, running statistics updated) or evaluation.
    pub training: bool,
    /// The plan precision being emulated: GEMM weights are read as it stores them.
    pub precision: Precision,
    /// The [`StepKey`] stochastic layers draw from, as the plan's `Record::step_key` holds it.
    pub step_key: StepKey,
    pub(crate) params: &'a dyn Fn(&str) -> Result<&'p [f64]>,
    pub(crate) buffers: &'p HashMap<String, Vec<f64>>,
}

impl<'a, 'p> RefForward<'a, 'p> {
    pub fn inp(&self) -> (&'a [f64], &'a [usize]) {
        (self.inputs[0], self.shapes[0])
    }

    pub fn param(&self, suffix: &str) -> Result<&'p [f64]> {
        (self.params)(&format!("{}.{suffix}", self.name))
    }

    pub fn param_if(&self, present: bool, suffix: &str) -> Result<Option<&'p [f64]>> {
        present.then(|| self.param(suffix)).transpose()
    }

    /// The state-dict buffer `suffix` of this layer (`running_mean`).
    pub fn buffer(&self, suffix: &str) -> Result<&'p [f64]> {
        let key = format!("{}.{suffix}", self.name);
        self.buffers.get(&key).map(|v| v.as_slice()).with_context(|| format!("reference: no buffer {key}"))
    }
}

/// A node's reference forward result.
pub struct RefOutput {
    pub out: Vec<f64>,
    pub saved: Saved,
    /// Updated state-dict buffers (suffix, value): the running statistics in training mode.
    pub buffers: Vec<(&'static str, Vec<f64>)>,
}

impl RefOutput {
    pub fn plain(out: Vec<f64>) -> RefOutput {
        RefOutput { out, saved: None, buffers: Vec::new() }
    }
}

/// A node's reference backward.
pub struct RefBackward<'a, 'p> {
    pub name: &'a str,
    pub inputs: Vec<&'a [f64]>,
    pub shapes: Vec<&'a [usize]>,
    /// Its forward's output.
    pub out: &'a [f64],
    pub dout: &'a [f64],
    pub saved: &'a Saved,
    pub precision: Precision,
    pub step_key: StepKey,
    pub(crate) params: &'a dyn Fn(&str) -> Result<&'p [f64]>,
    pub(crate) grads: &'a mut HashMap<String, Vec<f64>>,
}

impl<'a, 'p> RefBackward<'a, 'p> {
    pub fn inp(&self) -> (&'a [f64], &'a [usize]) {
        (self.inputs[0], self.shapes[0])
    }

    pub fn param(&self, suffix: &str) -> Result<&'p [f64]> {
        (self.params)(&format!("{}.{suffix}", self.name))
    }

    pub fn param_if(&self, present: bool, suffix: &str) -> Result<Option<&'p [f64]>> {
        present.then(|| self.param(suffix)).transpose()
    }

    /// The gradient of the parameter `suffix`.
    pub fn put(&mut self, suffix: &str, g: Vec<f64>) {
        self.grads.insert(format!("{}.{suffix}", self.name), g);
    }

    /// What the forward saved, as the type the op saved.
    pub fn saved<T: 'static>(&self) -> Result<&'a T> {
        self.saved
            .as_ref()
            .and_then(|s| s.downcast_ref::<T>())
            .with_context(|| format!("reference: {} lost its saved forward state", self.name))
    }
}

/// An ONNX attribute value (the export turns these into `AttributeProto`s).
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// One ONNX node a layer exports.
#[derive(Clone, Debug)]
pub struct OnnxNode {
    pub op_type: &'static str,
    /// The node's name: the layer's, or `layer.suffix` for one of several.
    pub name: String,
    pub inputs: Vec<String>,
    pub output: String,
    pub attrs: Vec<(&'static str, Attr)>,
}

/// A layer's ONNX nodes being written: the names of the values it reads and writes (parameters
/// are initializers under their state-dict names).
pub struct OnnxNodes<'a> {
    pub name: &'a str,
    pub inputs: Vec<String>,
    pub output: String,
    pub nodes: Vec<OnnxNode>,
}

impl OnnxNodes<'_> {
    /// A parameter's or buffer's name (`layer.weight`).
    pub fn param(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name)
    }

    /// An intermediate value's name (`layer.squeeze`).
    pub fn value(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.name)
    }

    /// A node named after the layer (`suffix` empty) or `layer.suffix`.
    pub fn push(
        &mut self,
        op_type: &'static str,
        suffix: &str,
        inputs: Vec<String>,
        output: String,
        attrs: Vec<(&'static str, Attr)>,
    ) {
        let name = if suffix.is_empty() { self.name.to_string() } else { format!("{}.{suffix}", self.name) };
        self.nodes.push(OnnxNode { op_type, name, inputs, output, attrs });
    }

    /// The attributes of a square convolution or pooling window.
    pub fn window(kernel: usize, stride: usize, pad: usize) -> Vec<(&'static str, Attr)> {
        let (k, s, p) = (kernel as i64, stride as i64, pad as i64);
        vec![
            ("kernel_shape", Attr::Ints(vec![k, k])),
            ("strides", Attr::Ints(vec![s, s])),
            ("pads", Attr::Ints(vec![p, p, p, p])),
            ("dilations", Attr::Ints(vec![1, 1])),
        ]
    }
}
