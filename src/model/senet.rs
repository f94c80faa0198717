//! The base SENet of the seed document (`../shared/peers/torch/senet.py`): five 3×3 conv + BN +
//! ReLU stages with max pooling, one SE block after the last conv, global average pool, linear.
//!
//! ```text
//! features = Sequential(
//!   0 Conv2d(in,64,3,p=1)   1 BatchNorm2d  2 ReLU  3 MaxPool2d(2,2)
//!   4 Conv2d(64,128,3,p=1)  5 BatchNorm2d  6 ReLU  7 MaxPool2d(2,2)
//!   8 Conv2d(128,256,3,p=1) 9 BatchNorm2d 10 ReLU
//!  11 Conv2d(256,512,3,p=1) 12 BatchNorm2d 13 ReLU 14 MaxPool2d(2,2)
//!  15 Conv2d(512,1024,3,p=1) 16 SEBlock(1024, r) 17 BatchNorm2d 18 ReLU 19 MaxPool2d(2,2))
//! avg_pool = AdaptiveAvgPool2d(1); classifier = Sequential(0 Linear(1024, classes))
//! ```
//! `width` scales every channel count as `int(c * width)`; the SE block keeps its reduction.

use anyhow::{Context, Result, ensure};

use super::registry::{Family, Shapes};
use super::resnet::refuse_drop_path;
use super::{BatchNorm2d, Conv2d, Graph, Layer, Linear, MaxPool2d, ModelConfig, Node, SeBlock};

/// `senet`: the base SENet.
pub struct BaseSenet;

impl Family for BaseSenet {
    fn names(&self) -> &'static str {
        "senet (the base model)"
    }

    fn accepts(&self, model: &str) -> bool {
        model == "senet"
    }

    fn check_flags(&self, cfg: &ModelConfig) -> Result<()> {
        refuse_drop_path(cfg, "--", "the base SENet is a chain with no residual branch to drop")?;
        let (first, last) = (scaled(64, cfg.width), scaled(1024, cfg.width));
        ensure!(
            first >= 1,
            "--width {} rounds the first layer's 64 channels down to 0; the smallest width is {}",
            cfg.width,
            1.0 / 64.0
        );
        ensure!(
            cfg.reduction >= 1 && cfg.reduction <= last,
            "--reduction {} must be between 1 and the SE block's {last} channels at width {}",
            cfg.reduction,
            cfg.width
        );
        Ok(())
    }

    fn build(&self, cfg: &ModelConfig) -> Result<Graph> {
        base_senet(cfg)
    }

    fn claims(&self, sd: &Shapes) -> bool {
        sd.contains_key("features.0.weight")
    }

    /// The width from `features.0.weight`, reduction and biases from the SE block, classes from
    /// the classifier.
    fn infer(&self, sd: &Shapes, mut cfg: ModelConfig, what: &str) -> Result<ModelConfig> {
        let shape = |name: &str| -> Result<&Vec<usize>> {
            sd.get(name).with_context(|| format!("{what}: no tensor {name}; cannot infer the base SENet"))
        };
        let conv0 = shape("features.0.weight")?;
        let fc1 = shape("features.16.fc1.weight")?;
        let cls = shape("classifier.0.weight")?;
        ensure!(conv0.len() == 4 && fc1.len() == 4 && cls.len() == 2, "{what}: unexpected ranks for a base SENet");
        let width = conv0[0] as f64 / 64.0;
        let c5 = scaled(1024, width);
        ensure!(
            fc1[1] == c5,
            "{what}: features.16.fc1.weight {fc1:?} does not fit width {width} (expected {c5} channels)"
        );
        ensure!(fc1[0] >= 1, "{what}: features.16.fc1.weight has no hidden units");
        cfg.model = "senet".into();
        cfg.width = width;
        cfg.reduction = c5 / fc1[0];
        cfg.in_channels = conv0[1];
        cfg.num_classes = cls[0];
        cfg.se_bias = sd.contains_key("features.16.fc1.bias");
        Ok(cfg)
    }
}

/// Channel count at `width`, as the PyTorch module's `int(c * width)`.
pub fn scaled(c: usize, width: f64) -> usize {
    (c as f64 * width) as usize
}

pub fn base_senet(cfg: &ModelConfig) -> Result<Graph> {
    ensure!(cfg.width > 0.0 && cfg.width.is_finite(), "width must be positive, got {}", cfg.width);
    refuse_drop_path(cfg, "", "the base SENet is a chain with no residual branch to drop")?;
    let [c1, c2, c3, c4, c5] = [64, 128, 256, 512, 1024].map(|c| scaled(c, cfg.width));
    ensure!(
        c1 >= 1,
        "width {} rounds the first layer's 64 channels down to 0; the smallest width is {}",
        cfg.width,
        1.0 / 64.0
    );
    ensure!(
        cfg.reduction >= 1 && cfg.reduction <= c5,
        "reduction {} must be between 1 and the SE block's channel count {c5} (at width {})",
        cfg.reduction,
        cfg.width
    );
    ensure!(cfg.in_channels >= 1 && cfg.num_classes >= 1, "the model needs at least one input channel and one class");
    let mut nodes = Vec::new();
    let mut push = |name: String, layer: Layer| {
        let k = nodes.len();
        nodes.push(Node { name, layer, inputs: vec![k] });
    };
    let conv = |c_in, c_out| Layer::Conv2d(Conv2d { c_in, c_out, kernel: 3, stride: 1, pad: 1, groups: 1, bias: true });
    let pool = || Layer::MaxPool2d(MaxPool2d { kernel: 2, stride: 2, pad: 0, ceil: false });
    let stages: [(usize, usize, bool); 4] =
        [(cfg.in_channels, c1, true), (c1, c2, true), (c2, c3, false), (c3, c4, true)];
    let mut idx = 0;
    for (c_in, c_out, pooled) in stages {
        push(format!("features.{idx}"), conv(c_in, c_out));
        push(format!("features.{}", idx + 1), Layer::BatchNorm2d(BatchNorm2d { c: c_out }));
        push(format!("features.{}", idx + 2), Layer::Relu);
        idx += 3;
        if pooled {
            push(format!("features.{idx}"), pool());
            idx += 1;
        }
    }
    push("features.15".into(), conv(c4, c5));
    push(
        "features.16".into(),
        Layer::SeBlock(SeBlock { c: c5, hidden: cfg.se_hidden(c5), bias: cfg.se_bias, variant: cfg.se.variant() }),
    );
    push("features.17".into(), Layer::BatchNorm2d(BatchNorm2d { c: c5 }));
    push("features.18".into(), Layer::Relu);
    push("features.19".into(), pool());
    push("avg_pool".into(), Layer::GlobalAvgPool);
    push("classifier.0".into(), Layer::Linear(Linear { in_features: c5, out_features: cfg.num_classes, bias: true }));
    let graph = Graph { input: [cfg.in_channels, cfg.input_hw[0], cfg.input_hw[1]], nodes };
    graph.shapes(1)?;
    Ok(graph)
}
