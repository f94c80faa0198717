//! SENet-154 (Hu et al., §6.1 and Table 8's winning ILSVRC 2017 entry) as timm's
//! `legacy_senet154` defines it (timm/models/senet.py: `SENet(SEBottleneck, [3, 8, 36, 3],
//! groups=64, reduction=16, downsample_kernel_size=3, downsample_padding=1, inplanes=128,
//! input_3x3=True)`):
//!
//! ```text
//! layer0: conv1 3×3/2 in→64, bn1, relu1, conv2 3×3 64→64, bn2, relu2, conv3 3×3 64→128, bn3, relu3
//! pool0:  MaxPool2d(3, stride=2, ceil_mode=True)            (Caffe's pooling: no padding, rounds up)
//! layer1..4: 3, 8, 36, 3 SEBottlenecks at planes 64, 128, 256, 512 (stride 2 from layer2):
//!   conv1 1×1 in→2·planes, bn1, conv2 3×3 2·planes→4·planes groups=64 (the stride), bn2,
//!   conv3 1×1 4·planes→4·planes, bn3, se_module (fc1/fc2 with biases, hidden 4·planes // 16),
//!   + shortcut: downsample.0 conv (1×1 in layer1; 3×3 padding 1 with the stride in layer2..4)
//!   and downsample.1 BN where the shape changes; ReLU after the addition
//! global average pool, Dropout(0.2) in training, last_linear 2048→classes
//! ```
//!
//! `--width w` scales every channel count and the 64 groups alike (`int(64 · w)` groups), so each
//! group keeps its channels: `senet154 --width 0.0625` has 4 groups, 2 channels in and 4 out
//! each in layer1, as the full network's 64.

use anyhow::{Context, Result, ensure};

use super::registry::{Conventions, Family, Shapes, timm};
use super::resnet::{UnitStyle, infer_se, push, refuse_drop_path, unit};
use super::senet::scaled;
use super::{BatchNorm2d, BottleneckStride, Conv2d, Dropout, Graph, Layer, Linear, MaxPool2d, ModelConfig, Node};

/// SENet-154's units per stage.
const BLOCKS: [usize; 4] = [3, 8, 36, 3];

/// Its names: ours and timm's.
const NAMES: [&str; 3] = ["senet154", "legacy-senet154", "legacy_senet154"];

/// timm's legacy SENet units: `se_module`, 3×3 projections (layer1's is 1×1: `build` says so).
const STYLE: UnitStyle = UnitStyle { se_name: "se_module", shortcut_kernel: 3 };

/// `senet154`.
pub struct Senet154;

impl Family for Senet154 {
    fn names(&self) -> &'static str {
        "senet154 (SENet-154, as timm's legacy_senet154; also legacy-senet154)"
    }

    fn accepts(&self, model: &str) -> bool {
        NAMES.contains(&model)
    }

    fn check_flags(&self, cfg: &ModelConfig) -> Result<()> {
        check(cfg, "--")
    }

    fn build(&self, cfg: &ModelConfig) -> Result<Graph> {
        senet154(cfg)
    }

    /// The three-convolution stem and `last_linear`.
    fn claims(&self, sd: &Shapes) -> bool {
        sd.contains_key("layer0.conv3.weight") && sd.contains_key("last_linear.weight")
    }

    fn infer(&self, sd: &Shapes, base: ModelConfig, what: &str) -> Result<ModelConfig> {
        infer(sd, base, what)
    }

    /// timm's legacy SE module: biases, hidden width `C // r`.
    fn conventions(&self) -> Conventions {
        timm(0)
    }
}

/// A width whose groups divide every grouped convolution, and a reduction that fits.
fn check(cfg: &ModelConfig, flag: &str) -> Result<()> {
    ensure!(cfg.width > 0.0 && cfg.width.is_finite(), "{flag}width must be positive, got {}", cfg.width);
    refuse_drop_path(cfg, flag, "timm's legacy SENet-154 has no drop_path_rate")?;
    let groups = scaled(64, cfg.width);
    // Every grouped 3×3 reads 2·planes channels (and writes twice that).
    ensure!(
        groups >= 1 && (0..4).all(|s| (2 * scaled(64 << s, cfg.width)).is_multiple_of(groups)),
        "{flag}width {} gives senet154 {groups} groups (int(64 · width)), which do not divide its grouped \
         convolutions' channels; 64 · width must be a whole number of at least 1 (1, 0.5, 0.25, …, 1/64)",
        cfg.width
    );
    let c = scaled(256, cfg.width);
    ensure!(
        cfg.reduction >= 1 && (cfg.se.divisor > 0 || cfg.reduction <= c),
        "{flag}reduction {} must be between 1 and layer1's {c} channels (any r from 1 up with {flag}se-divisor)",
        cfg.reduction
    );
    Ok(())
}

pub fn senet154(cfg: &ModelConfig) -> Result<Graph> {
    check(cfg, "")?;
    let w = |c| scaled(c, cfg.width);
    let groups = w(64);
    // Local constructors: the layers this family builds.
    let conv = |c_in, c_out, kernel, stride, groups| {
        Layer::Conv2d(Conv2d { c_in, c_out, kernel, stride, pad: kernel / 2, groups, bias: false })
    };
    let bn = |c| Layer::BatchNorm2d(BatchNorm2d { c });
    let mut nodes: Vec<Node> = Vec::new();
    let stem = [("conv1", cfg.in_channels, w(64), 2), ("conv2", w(64), w(64), 1), ("conv3", w(64), w(128), 1)];
    let mut x = 0;
    for (k, (name, c_in, c_out, stride)) in stem.into_iter().enumerate() {
        x = push(&mut nodes, format!("layer0.{name}"), conv(c_in, c_out, 3, stride, 1), vec![x]);
        x = push(&mut nodes, format!("layer0.bn{}", k + 1), bn(c_out), vec![x]);
        x = push(&mut nodes, format!("layer0.relu{}", k + 1), Layer::Relu, vec![x]);
    }
    x = push(
        &mut nodes,
        "pool0".into(),
        Layer::MaxPool2d(MaxPool2d { kernel: 3, stride: 2, pad: 0, ceil: true }),
        vec![x],
    );
    let mut c_in = w(128);
    for (s, &n) in BLOCKS.iter().enumerate() {
        let planes = w(64 << s);
        let c_out = planes * 4;
        // layer1's projection (128 → 256 channels, no stride) is a 1×1, the others 3×3.
        let style = if s == 0 { UnitStyle { shortcut_kernel: 1, ..STYLE } } else { STYLE };
        for b in 0..n {
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            let (s1, s3) = match cfg.block.stride {
                BottleneckStride::Conv1x1 => (stride, 1),
                BottleneckStride::Conv3x3 => (1, stride),
            };
            let branch = vec![
                ("conv1", conv(c_in, planes * 2, 1, s1, 1)),
                ("bn1", bn(planes * 2)),
                ("relu1", Layer::Relu),
                ("conv2", conv(planes * 2, c_out, 3, s3, groups)),
                ("bn2", bn(c_out)),
                ("relu2", Layer::Relu),
                ("conv3", conv(c_out, c_out, 1, 1, 1)),
                ("bn3", bn(c_out)),
            ];
            let p = format!("layer{}.{b}", s + 1);
            x = unit(&mut nodes, cfg, style, &p, x, branch, (c_in, c_out, stride), (s + 1, 0.0), true);
            c_in = c_out;
        }
    }
    x = push(&mut nodes, "avg_pool".into(), Layer::GlobalAvgPool, vec![x]);
    // timm's `self.dropout = nn.Dropout(drop_rate=0.2)`: masks in training, the identity in eval.
    x = push(&mut nodes, "dropout".into(), Layer::Dropout(Dropout { p: 0.2 }), vec![x]);
    let linear = Layer::Linear(Linear { in_features: c_in, out_features: cfg.num_classes, bias: true });
    push(&mut nodes, "last_linear".into(), linear, vec![x]);
    let graph = Graph { input: [cfg.in_channels, cfg.input_hw[0], cfg.input_hw[1]], nodes };
    graph.shapes(1)?;
    Ok(graph)
}

/// SENet-154's configuration from its state dict: the width from the stem, checked against the
/// units per stage and the groups of the first grouped 3×3; the SE options from the
/// `se_module` tensors. Bottlenecks stride in the 3×3, as timm's.
fn infer(sd: &Shapes, mut cfg: ModelConfig, what: &str) -> Result<ModelConfig> {
    let shape = |name: &str| -> Result<&Vec<usize>> {
        sd.get(name).with_context(|| format!("{what}: no tensor {name}; cannot infer SENet-154"))
    };
    let stem = shape("layer0.conv1.weight")?;
    let fc = shape("last_linear.weight")?;
    let conv1 = shape("layer1.0.conv1.weight")?;
    let conv2 = shape("layer1.0.conv2.weight")?;
    ensure!(
        stem.len() == 4 && fc.len() == 2 && conv1.len() == 4 && conv2.len() == 4 && conv2[1] > 0,
        "{what}: unexpected ranks for SENet-154's layer0.conv1, layer1.0.conv1/conv2, last_linear"
    );
    let blocks: Vec<usize> =
        (1..=4).map(|s| (0..).take_while(|b| sd.contains_key(&format!("layer{s}.{b}.conv1.weight"))).count()).collect();
    ensure!(
        blocks == BLOCKS,
        "{what}: units per stage {blocks:?} (layer1..4.N.conv1.weight); SENet-154 has {BLOCKS:?} (timm's \
         legacy_seresnet/seresnext models are not supported)"
    );
    let width = stem[0] as f64 / 64.0;
    let groups = conv1[0] / conv2[1];
    ensure!(
        groups == scaled(64, width),
        "{what}: layer1.0.conv2.weight {conv2:?} has {groups} groups; SENet-154 at width {width} \
         (layer0.conv1.weight: {} channels of 64) has {}",
        stem[0],
        scaled(64, width)
    );
    infer_se(sd, &blocks, "se_module", &mut cfg, what)?;
    cfg.model = "senet154".into();
    cfg.width = width;
    cfg.in_channels = stem[1];
    cfg.num_classes = fc[0];
    cfg.block.stride = BottleneckStride::Conv3x3;
    Ok(cfg)
}
