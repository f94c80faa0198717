//! The model families: every model `--model` can name is built by exactly one [`Family`] in
//! [`FAMILIES`]. A family owns its names, its graph constructor, the checks of its flags and the
//! inference of its configuration from a bare state dict's names and shapes; the CLI (valid names,
//! `--help`, the error for an unknown one), `ModelConfig::graph`, `checkpoint::infer_config` and
//! `summary` ask this list and name no family themselves. Adding a family is one entry here
//! (docs/architecture-models.md walks through it).

use std::collections::BTreeMap;

use anyhow::{Result, anyhow};

use super::resnet::{CifarResNet, ImageNetResNet};
use super::resnext::ResNeXt;
use super::senet::BaseSenet;
use super::senet154::Senet154;
use super::{BottleneckStride, Graph, ModelConfig};

/// A state dict's tensor names and shapes: what shape inference reads.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// One model family.
pub trait Family: Sync {
    /// Its names as `--help` and the error for an unknown `--model` list them, with a few words
    /// on what it is ("senet (the base model)").
    fn names(&self) -> &'static str;

    /// Whether `model` is one of its names, a buildable one (the depth rules hold).
    fn accepts(&self, model: &str) -> bool;

    /// Check what the model flags set (width, reduction) before any data is read, naming the
    /// flag; `cfg.model` is accepted by this family. The graph constructor checks again.
    fn check_flags(&self, _cfg: &ModelConfig) -> Result<()> {
        Ok(())
    }

    /// The graph of `cfg`, whose `model` this family accepts.
    fn build(&self, cfg: &ModelConfig) -> Result<Graph>;

    /// Whether a state dict's names are this family's (the tensors every one of its models has).
    fn claims(&self, sd: &Shapes) -> bool;

    /// The configuration a state dict this family claims describes: `base` comes with what the
    /// shapes cannot tell (the input size) and defaults for the rest. `what` names the file in errors.
    fn infer(&self, sd: &Shapes, base: ModelConfig, what: &str) -> Result<ModelConfig>;

    /// The SENet paper's (parameters, GFLOPs) for this model at `hw`×`hw`, where it reports them.
    fn paper_figures(&self, _model: &str, _hw: usize) -> Option<(f64, f64)> {
        None
    }

    /// What its models are where the flags leave it open (`--se-divisor`, `--bottleneck-stride`
    /// not given; SE biases): the paper's layout by default, timm's for the families timm defines.
    fn conventions(&self) -> Conventions {
        Conventions::default()
    }
}

/// The layout choices a family makes for flags that are not given: SE biases (`--se-bias` adds
/// them where they are off), the SE width divisor and where bottlenecks stride.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Conventions {
    pub se_bias: bool,
    pub se_divisor: usize,
    pub stride: BottleneckStride,
}

/// timm's: SE biases, bottlenecks striding in the 3x3, SE widths `make_divisible(C / r, divisor)`
/// (timm's ResNet-based models: 8; its legacy SENets: 0, `C // r`).
pub fn timm(se_divisor: usize) -> Conventions {
    Conventions { se_bias: true, se_divisor, stride: BottleneckStride::Conv3x3 }
}

/// Every family, in the order `--help` lists them. A name or a state dict belongs to one family
/// at most (the CIFAR family leaves 50 and 152, 6n+2 too, to the ImageNet one; the ImageNet
/// ResNets leave grouped 3x3s to the ResNeXts).
pub static FAMILIES: &[&dyn Family] = &[&BaseSenet, &CifarResNet, &ImageNetResNet, &ResNeXt, &Senet154];

/// The family that builds `model`.
pub fn family(model: &str) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.accepts(model))
}

/// The family of `model`, or an error listing the valid names (`flag` says who gave the name:
/// "--model" or "model").
pub fn family_or_err(model: &str, flag: &str) -> Result<&'static dyn Family> {
    family(model).ok_or_else(|| anyhow!("{flag} {model:?}: expected one of {}", names()))
}

/// Every valid model name, as `--help` and errors give them.
pub fn names() -> String {
    FAMILIES.iter().map(|f| f.names()).collect::<Vec<_>>().join("; ")
}

/// `--model`'s help text.
pub fn help() -> String {
    format!("The network: {}. Checked before any data is read", names())
}

/// The family whose tensors a state dict holds.
pub fn claiming(sd: &Shapes) -> Option<&'static dyn Family> {
    FAMILIES.iter().copied().find(|f| f.claims(sd))
}
