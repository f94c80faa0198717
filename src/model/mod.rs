//! Models as graphs of layer nodes. Parameter names are PyTorch `state_dict` names, so
//! checkpoints interoperate with the equivalent `nn.Module`.
//!
//! A node reads activations by index: 0 is the network input, k is the output of node k-1. The
//! base SENet is a chain; the representation leaves room for residual additions (SE-ResNet).

pub mod data_parallel;
pub mod ema;
pub mod plan;
pub mod registry;
pub mod resnet;
pub mod resnext;
pub mod senet;
pub mod senet154;

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

pub use crate::ops::add::Add;
pub use crate::ops::batch_norm::BatchNorm2d;
pub use crate::ops::conv2d::Conv2d;
use crate::ops::conv2d::Conv2dConfig;
pub use crate::ops::drop_path::DropPath;
pub use crate::ops::dropout::Dropout;
pub use crate::ops::layer::{Init, LayerOp, ParamSpec, Shape};
pub use crate::ops::linear::Linear;
use crate::ops::pool::MaxPool2dConfig;
pub use crate::ops::pool::{GlobalAvgPool, MaxPool2d};
pub use crate::ops::relu::Relu;
pub use crate::ops::se_block::SeBlock;
use crate::ops::se_block::{Excitation, SeVariant, Squeeze};

/// One layer, with PyTorch's meaning: the registry of the ops a graph can hold. Each variant
/// carries its op's layer type, whose [`LayerOp`] implementation (in `ops/<op>/layer.rs`) is
/// everything the plan, the reference, the ONNX export and the summary ask of it.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    Conv2d(Conv2d),
    BatchNorm2d(BatchNorm2d),
    Relu,
    MaxPool2d(MaxPool2d),
    SeBlock(SeBlock),
    /// `AdaptiveAvgPool2d(1)` then flatten: [n, c, h, w] → [n, c].
    GlobalAvgPool,
    Linear(Linear),
    /// The residual addition of two activations of the same shape.
    Add,
    Dropout(Dropout),
    /// timm's `DropPath(p)`: stochastic depth on a residual branch.
    DropPath(DropPath),
}

impl Layer {
    /// Its op.
    pub fn op(&self) -> &dyn LayerOp {
        match self {
            Layer::Conv2d(l) => l,
            Layer::BatchNorm2d(l) => l,
            Layer::Relu => &Relu,
            Layer::MaxPool2d(l) => l,
            Layer::SeBlock(l) => l,
            Layer::GlobalAvgPool => &GlobalAvgPool,
            Layer::Linear(l) => l,
            Layer::Add => &Add,
            Layer::Dropout(l) => l,
            Layer::DropPath(l) => l,
        }
    }
}

/// A layer in the graph: its state-dict prefix (`features.0`) and the activations it reads.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub layer: Layer,
    pub inputs: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct Graph {
    /// [c, h, w] of one input image.
    pub input: [usize; 3],
    pub nodes: Vec<Node>,
}

impl Graph {
    /// Output shape of every activation for batch `n` (index 0 the input), checking that each
    /// layer fits what it reads.
    pub fn shapes(&self, n: usize) -> Result<Vec<Shape>> {
        let [c, h, w] = self.input;
        let mut shapes: Vec<Shape> = vec![vec![n, c, h, w]];
        for (k, node) in self.nodes.iter().enumerate() {
            let op = node.layer.op();
            let arity = op.arity();
            ensure!(node.inputs.len() == arity, "{}: {:?} reads {arity} activation(s)", node.name, node.layer);
            ensure!(node.inputs.iter().all(|&i| i <= k), "{}: reads an activation computed after it", node.name);
            let inputs: Vec<&[usize]> = node.inputs.iter().map(|&i| shapes[i].as_slice()).collect();
            let out = op.output_shape(&node.name, &inputs)?;
            shapes.push(out);
        }
        Ok(shapes)
    }

    /// For every activation (0 = input, k = output of node k-1), the nodes that read it.
    pub fn consumers(&self) -> Vec<Vec<usize>> {
        let mut c = vec![Vec::new(); self.nodes.len() + 1];
        for (k, node) in self.nodes.iter().enumerate() {
            for &i in &node.inputs {
                c[i].push(k);
            }
        }
        c
    }

    /// Trainable parameters in state-dict order.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        self.nodes.iter().flat_map(|n| n.layer.op().parameters(&n.name)).collect()
    }

    /// Layers with running statistics (state-dict buffers) and their channels.
    pub fn batch_norms(&self) -> impl Iterator<Item = (&str, usize)> {
        self.nodes.iter().filter_map(|n| n.layer.op().running_stats().map(|c| (n.name.as_str(), c)))
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|p| p.shape.iter().product::<usize>()).sum()
    }
}

/// The conv2d configuration of a Conv2d layer reading `inp`.
pub fn conv_config(layer: &Layer, inp: &[usize]) -> Option<Conv2dConfig> {
    match layer {
        Layer::Conv2d(l) => Some(l.config(inp)),
        _ => None,
    }
}

/// The pooling configuration of a MaxPool2d layer reading `inp`.
pub fn pool_config(layer: &Layer, inp: &[usize]) -> Option<MaxPool2dConfig> {
    match layer {
        Layer::MaxPool2d(l) => Some(l.config(inp)),
        _ => None,
    }
}

/// What a run trains: enough to rebuild the graph, saved as `config.json` beside checkpoints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// "senet": the base SENet of the seed document.
    pub model: String,
    pub width: f64,
    pub reduction: usize,
    pub in_channels: usize,
    pub num_classes: usize,
    pub input_hw: [usize; 2],
    /// Class names, index order (for eval and predict).
    #[serde(default)]
    pub classes: Vec<String>,
    /// Per-channel (mean, std) the inputs were normalised with after /255; None = none.
    #[serde(default)]
    pub normalize: Option<Vec<(f32, f32)>>,
    /// Biases in the SE blocks' two FC layers (the base SENet and the paper's ablations: none).
    #[serde(default)]
    pub se_bias: bool,
    /// The paper's ablations (defaults: its SE block) and the rounding of SE widths.
    #[serde(default)]
    pub se: SeOptions,
    /// How the residual families build their blocks (defaults: the original ResNet's).
    #[serde(default, skip_serializing_if = "BlockOptions::is_default")]
    pub block: BlockOptions,
}

/// Where an ImageNet bottleneck block puts the stride of its first unit: the same tensor names
/// and shapes either way, a different function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum BottleneckStride {
    /// In the first 1×1 convolution: the original ResNet (He et al. 2016) and the SENet paper's
    /// Caffe models.
    #[default]
    #[value(name = "1x1")]
    #[serde(rename = "1x1")]
    Conv1x1,
    /// In the 3×3 convolution ("ResNet v1.5"): timm and torchvision.
    #[value(name = "3x3")]
    #[serde(rename = "3x3")]
    Conv3x3,
}

/// Options of the residual families' blocks. A field added here (a ResNeXt's cardinality) keeps
/// `Default` as the value older config.json files mean.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlockOptions {
    /// Where a bottleneck block strides (basic blocks stride in their first 3×3 either way).
    #[serde(default)]
    pub stride: BottleneckStride,
    /// Stochastic depth, timm's `drop_path_rate` (`--drop-path`): unit k of K (counted over the
    /// whole network) drops its residual branch per sample in training with probability
    /// `drop_path · k / (K - 1)` ([`resnet::drop_path_rate`]), through a `DropPath` node
    /// `layer{s}.{b}.drop_path` before the addition; 0 = none (and no nodes, no field in
    /// config.json).
    #[serde(default, skip_serializing_if = "is_zero_f64")]
    pub drop_path: f64,
}

fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

impl BlockOptions {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// timm's `make_divisible(v, divisor, round_limit=0.)`: `v` to the nearest multiple of
/// `divisor` (halves up), at least `divisor`.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    (((v + divisor as f64 / 2.0) as usize) / divisor * divisor).max(divisor)
}

/// [`ModelConfig::se_hidden`] for reduction `r` and `divisor`.
pub fn se_hidden(c: usize, r: usize, divisor: usize) -> usize {
    match divisor {
        0 => c / r.max(1),
        d => make_divisible(c as f64 * (1.0 / r.max(1) as f64), d),
    }
}

/// Where an SE-ResNet puts its SE blocks (the paper's Fig. 5 integration strategies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SePlacement {
    /// On the residual branch, before the addition.
    #[default]
    Standard,
    /// Before the residual unit: on its input, which both paths then read.
    Pre,
    /// After the unit: on its output, after the addition and ReLU.
    Post,
    /// On the identity (shortcut) path, in parallel with the residual branch.
    Identity,
}

/// The SE ablation switches.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SeOptions {
    #[serde(default)]
    pub squeeze: Squeeze,
    #[serde(default)]
    pub excitation: Excitation,
    #[serde(default)]
    pub placement: SePlacement,
    /// The stages (1-based) whose blocks get SE; empty = all.
    #[serde(default)]
    pub stages: Vec<usize>,
    /// SE hidden widths: 0 = C // r (PyTorch's integer division, the paper); N = C / r rounded
    /// to a multiple of N as timm's SE module does (`make_divisible(C / r, N)`; timm: 8).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub divisor: usize,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl SeOptions {
    pub fn variant(&self) -> SeVariant {
        SeVariant { squeeze: self.squeeze, excitation: self.excitation }
    }

    /// Does stage `s` (1-based) get SE blocks?
    pub fn in_stage(&self, s: usize) -> bool {
        self.stages.is_empty() || self.stages.contains(&s)
    }
}

impl ModelConfig {
    /// The hidden width of an SE block on `c` channels: `c // r`, or timm's rounding of `c / r`
    /// when `se.divisor` is set (computed as timm does, `c * (1 / r)` in f64).
    pub fn se_hidden(&self, c: usize) -> usize {
        se_hidden(c, self.reduction, self.se.divisor)
    }

    /// The graph, built by the model's family ([`registry::FAMILIES`]).
    pub fn graph(&self) -> Result<Graph> {
        registry::family_or_err(&self.model, "unknown model")?.build(self)
    }
}
