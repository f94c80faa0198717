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
pub mod senet;

use anyhow::{Result, ensure};
use serde::{Deserialize, Serialize};

use crate::ops::conv2d::Conv2dConfig;
use crate::ops::pool::MaxPool2dConfig;
use crate::ops::se_block::{Excitation, SeVariant, Squeeze};

/// One layer, with PyTorch's meaning.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    Conv2d {
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        /// Channel groups, as `nn.Conv2d(groups=)`: divides c_in and c_out; 1 = an ordinary
        /// convolution, c_in = c_out = groups a depthwise one. The weight is [c_out, c_in/groups, k, k].
        groups: usize,
        bias: bool,
    },
    BatchNorm2d {
        c: usize,
    },
    Relu,
    MaxPool2d {
        kernel: usize,
        stride: usize,
        pad: usize,
    },
    /// The SE block: `fc1` C→hidden, ReLU, `fc2` hidden→C, sigmoid, scale. `hidden` is C // r
    /// for the paper's reduction r, or timm's rounding of it ([`ModelConfig::se_hidden`]).
    SeBlock {
        c: usize,
        hidden: usize,
        bias: bool,
        variant: SeVariant,
    },
    /// `AdaptiveAvgPool2d(1)` then flatten: [n, c, h, w] → [n, c].
    GlobalAvgPool,
    Linear {
        in_features: usize,
        out_features: usize,
        bias: bool,
    },
    /// The residual addition of two activations of the same shape.
    Add,
}

/// A layer in the graph: its state-dict prefix (`features.0`) and the activations it reads.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub layer: Layer,
    pub inputs: Vec<usize>,
}

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

/// Shape of an activation: [n, c, h, w] or, after the global pool, [n, c].
pub type Shape = Vec<usize>;

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
            let arity = if node.layer == Layer::Add { 2 } else { 1 };
            ensure!(node.inputs.len() == arity, "{}: {:?} reads {arity} activation(s)", node.name, node.layer);
            ensure!(node.inputs.iter().all(|&i| i <= k), "{}: reads an activation computed after it", node.name);
            let inp = &shapes[node.inputs[0]];
            if node.layer == Layer::Add {
                let other = &shapes[node.inputs[1]];
                ensure!(inp == other, "{}: cannot add {inp:?} and {other:?}", node.name);
            }
            let out = layer_output(&node.name, &node.layer, inp)?;
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
        let mut out = Vec::new();
        let mut p = |name: &str, suffix: &str, shape: Vec<usize>, init: Init| {
            out.push(ParamSpec { name: format!("{name}.{suffix}"), shape, init })
        };
        for node in &self.nodes {
            let name = &node.name;
            match node.layer {
                Layer::Conv2d { c_in, c_out, kernel, groups, bias, .. } => {
                    // PyTorch's fan-in is the weight's: (c_in/groups)*k*k.
                    let c_in_group = c_in / groups.max(1);
                    let fan_in = c_in_group * kernel * kernel;
                    p(name, "weight", vec![c_out, c_in_group, kernel, kernel], Init::FanInUniform { fan_in });
                    if bias {
                        p(name, "bias", vec![c_out], Init::FanInUniform { fan_in });
                    }
                }
                Layer::BatchNorm2d { c } => {
                    p(name, "weight", vec![c], Init::Ones);
                    p(name, "bias", vec![c], Init::Zeros);
                }
                Layer::SeBlock { c, hidden: cr, bias, .. } => {
                    p(name, "fc1.weight", vec![cr, c, 1, 1], Init::FanInUniform { fan_in: c });
                    if bias {
                        p(name, "fc1.bias", vec![cr], Init::FanInUniform { fan_in: c });
                    }
                    p(name, "fc2.weight", vec![c, cr, 1, 1], Init::FanInUniform { fan_in: cr });
                    if bias {
                        p(name, "fc2.bias", vec![c], Init::FanInUniform { fan_in: cr });
                    }
                }
                Layer::Linear { in_features, out_features, bias } => {
                    p(name, "weight", vec![out_features, in_features], Init::FanInUniform { fan_in: in_features });
                    if bias {
                        p(name, "bias", vec![out_features], Init::FanInUniform { fan_in: in_features });
                    }
                }
                Layer::Relu | Layer::MaxPool2d { .. } | Layer::GlobalAvgPool | Layer::Add => {}
            }
        }
        out
    }

    /// Batch-norm layers (their running statistics are state-dict buffers).
    pub fn batch_norms(&self) -> impl Iterator<Item = (&str, usize)> {
        self.nodes.iter().filter_map(|n| match n.layer {
            Layer::BatchNorm2d { c } => Some((n.name.as_str(), c)),
            _ => None,
        })
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.parameters().iter().map(|p| p.shape.iter().product::<usize>()).sum()
    }
}

/// The conv2d configuration of a Conv2d layer reading `inp`.
pub fn conv_config(layer: &Layer, inp: &[usize]) -> Option<Conv2dConfig> {
    match *layer {
        Layer::Conv2d { c_in, c_out, kernel, stride, pad, groups, bias } => {
            Some(Conv2dConfig::square(inp[0], c_in, (inp[2], inp[3]), c_out, kernel, stride, pad, bias).grouped(groups))
        }
        _ => None,
    }
}

/// The pooling configuration of a MaxPool2d layer reading `inp`.
pub fn pool_config(layer: &Layer, inp: &[usize]) -> Option<MaxPool2dConfig> {
    match *layer {
        Layer::MaxPool2d { kernel, stride, pad } => Some(MaxPool2dConfig {
            n: inp[0],
            c: inp[1],
            h: inp[2],
            w: inp[3],
            kernel: (kernel, kernel),
            stride: (stride, stride),
            pad: (pad, pad),
        }),
        _ => None,
    }
}

fn layer_output(name: &str, layer: &Layer, inp: &[usize]) -> Result<Shape> {
    let spatial = |what: &str| -> Result<()> {
        ensure!(inp.len() == 4, "{name} ({what}) needs an [n, c, h, w] input, got {inp:?}");
        Ok(())
    };
    Ok(match layer {
        Layer::Conv2d { c_in, .. } => {
            spatial("Conv2d")?;
            ensure!(inp[1] == *c_in, "{name}: Conv2d expects {c_in} input channels, got {}", inp[1]);
            let cfg = conv_config(layer, inp).expect("a Conv2d layer");
            cfg.validate().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            cfg.output_shape().to_vec()
        }
        Layer::BatchNorm2d { c } | Layer::SeBlock { c, .. } => {
            spatial("channel layer")?;
            ensure!(inp[1] == *c, "{name}: expects {c} channels, got {}", inp[1]);
            inp.to_vec()
        }
        Layer::Relu | Layer::Add => inp.to_vec(),
        Layer::MaxPool2d { .. } => {
            spatial("MaxPool2d")?;
            let cfg = pool_config(layer, inp).expect("a MaxPool2d layer");
            cfg.validate()
                .map_err(|e| anyhow::anyhow!("{name}: {e} (the input has shrunk to {}x{})", inp[2], inp[3]))?;
            cfg.output_shape().to_vec()
        }
        Layer::GlobalAvgPool => {
            spatial("AdaptiveAvgPool2d")?;
            vec![inp[0], inp[1]]
        }
        Layer::Linear { in_features, out_features, .. } => {
            ensure!(inp.len() == 2 && inp[1] == *in_features, "{name}: Linear expects [n, {in_features}], got {inp:?}");
            vec![inp[0], *out_features]
        }
    })
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
