//! ImageNet ResNets (He et al. 2016, Table 1: 18/34 with basic blocks, 50/101/152 with
//! bottlenecks; a 7×7 stride-2 stem and a 3×3 stride-2 max pool; the stride of a bottleneck in its
//! first 1×1 convolution, as the original and the SENet paper's Caffe models have it) and their SE
//! versions (SE block after the last BN of the residual branch, before the addition).
//!
//! CIFAR ResNets (He et al. 2016, §4.2) and SE-ResNets (Hu et al., Fig. 3): a 3×3 stem of 16
//! channels, three stages of n basic blocks at 16, 32 and 64 channels (6n+2 layers), the second
//! and third stages starting with a stride-2 block whose shortcut is a projection (1×1 conv +
//! BN), global average pooling and a linear classifier. In an SE-ResNet each block's residual
//! branch is recalibrated by an SE block before the addition.
//!
//! Names follow torchvision / timm state dicts: `conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.bn1`,
//! `layer1.0.conv2`, `layer1.0.bn2`, `layer1.0.se.fc1`, `layer2.0.downsample.0` (conv),
//! `layer2.0.downsample.1` (BN), `fc`.

use anyhow::{Result, bail, ensure};

use super::senet::scaled;
use super::{Graph, Layer, ModelConfig, Node, SePlacement};

/// Depth and SE-ness of a `resnet<D>` / `se-resnet<D>` model name.
pub fn parse_name(model: &str) -> Option<(usize, bool)> {
    let (se, rest) = match model.strip_prefix("se-") {
        Some(r) => (true, r),
        None => (false, model),
    };
    let depth: usize = rest.strip_prefix("resnet")?.parse().ok()?;
    Some((depth, se))
}

fn push(nodes: &mut Vec<Node>, name: String, layer: Layer, inputs: Vec<usize>) -> usize {
    nodes.push(Node { name, layer, inputs });
    nodes.len()
}

/// Append one residual unit `p` of stage `stage` (1-based) reading activation `x` (`c_in`
/// channels) to `nodes`: the residual `branch` (ending in `c_out` channels), a projection shortcut
/// (1×1 conv + BN) when `stride` or the width changes, the addition and the ReLU, and — if `se`
/// and the stage is selected — an SE block placed as `cfg.se.placement` says. Returns the output.
fn unit(
    nodes: &mut Vec<Node>,
    cfg: &ModelConfig,
    p: &str,
    x: usize,
    branch: Vec<(&str, Layer)>,
    (c_in, c_out, stride): (usize, usize, usize),
    stage: usize,
    se: bool,
) -> usize {
    let conv = Layer::Conv2d { c_in, c_out, kernel: 1, stride, pad: 0, groups: 1, bias: false };
    let projection = (stride != 1 || c_in != c_out).then_some((conv, Layer::BatchNorm2d { c: c_out }));
    let se = (se && cfg.se.in_stage(stage)).then_some(if cfg.se.placement == SePlacement::Pre { c_in } else { c_out });
    let at = |place: SePlacement| se.filter(|_| cfg.se.placement == place);
    let se_layer = |c| Layer::SeBlock { c, reduction: cfg.reduction, bias: cfg.se_bias, variant: cfg.se.variant() };
    let mut y = x;
    if let Some(c) = at(SePlacement::Pre) {
        y = push(nodes, format!("{p}.se"), se_layer(c), vec![y]);
    }
    for (name, layer) in branch {
        y = push(nodes, format!("{p}.{name}"), layer, vec![y]);
    }
    if let Some(c) = at(SePlacement::Standard) {
        y = push(nodes, format!("{p}.se"), se_layer(c), vec![y]);
    }
    let mut shortcut = match projection {
        Some((conv, bn)) => {
            let z = push(nodes, format!("{p}.downsample.0"), conv, vec![x]);
            push(nodes, format!("{p}.downsample.1"), bn, vec![z])
        }
        None => x,
    };
    if let Some(c) = at(SePlacement::Identity) {
        shortcut = push(nodes, format!("{p}.se"), se_layer(c), vec![shortcut]);
    }
    y = push(nodes, format!("{p}.add"), Layer::Add, vec![y, shortcut]);
    let mut out = push(nodes, format!("{p}.relu"), Layer::Relu, vec![y]);
    if let Some(c) = at(SePlacement::Post) {
        out = push(nodes, format!("{p}.se"), se_layer(c), vec![out]);
    }
    out
}

/// Global average pooling and the `fc` classifier on activation `x` of `c` channels; the graph.
fn classifier(mut nodes: Vec<Node>, cfg: &ModelConfig, x: usize, c: usize) -> Result<Graph> {
    let x = push(&mut nodes, "avgpool".into(), Layer::GlobalAvgPool, vec![x]);
    push(&mut nodes, "fc".into(), Layer::Linear { in_features: c, out_features: cfg.num_classes, bias: true }, vec![x]);
    let graph = Graph { input: [cfg.in_channels, cfg.input_hw[0], cfg.input_hw[1]], nodes };
    graph.shapes(1)?;
    Ok(graph)
}

/// The ImageNet depths; every other depth is a CIFAR ResNet (6n+2).
pub const IMAGENET_DEPTHS: [usize; 5] = [18, 34, 50, 101, 152];

/// The graph for a `resnet<D>` / `se-resnet<D>` name.
pub fn build(cfg: &ModelConfig, depth: usize, se: bool) -> Result<Graph> {
    if IMAGENET_DEPTHS.contains(&depth) { imagenet_resnet(cfg, depth, se) } else { cifar_resnet(cfg, depth, se) }
}

pub fn imagenet_resnet(cfg: &ModelConfig, depth: usize, se: bool) -> Result<Graph> {
    let (bottleneck, blocks): (bool, [usize; 4]) = match depth {
        18 => (false, [2, 2, 2, 2]),
        34 => (false, [3, 4, 6, 3]),
        50 => (true, [3, 4, 6, 3]),
        101 => (true, [3, 4, 23, 3]),
        152 => (true, [3, 8, 36, 3]),
        _ => bail!("ImageNet ResNet depth must be one of {IMAGENET_DEPTHS:?}, got {depth}"),
    };
    let expansion = if bottleneck { 4 } else { 1 };
    let widths = [64, 128, 256, 512].map(|c| scaled(c, cfg.width));
    ensure!(widths[0] >= 1, "width {} leaves the 64-channel stem with no channels", cfg.width);
    if se {
        ensure!(
            cfg.reduction >= 1 && cfg.reduction <= widths[0] * expansion,
            "reduction {} must be between 1 and the first stage's {} channels",
            cfg.reduction,
            widths[0] * expansion
        );
    }
    let mut nodes: Vec<Node> = Vec::new();
    let conv = |c_in, c_out, kernel, stride| Layer::Conv2d {
        c_in,
        c_out,
        kernel,
        stride,
        pad: kernel / 2,
        groups: 1,
        bias: false,
    };
    let mut x = push(&mut nodes, "conv1".into(), conv(cfg.in_channels, widths[0], 7, 2), vec![0]);
    x = push(&mut nodes, "bn1".into(), Layer::BatchNorm2d { c: widths[0] }, vec![x]);
    x = push(&mut nodes, "relu".into(), Layer::Relu, vec![x]);
    x = push(&mut nodes, "maxpool".into(), Layer::MaxPool2d { kernel: 3, stride: 2, pad: 1 }, vec![x]);
    let mut c_in = widths[0];
    for (s, (&w, &n)) in widths.iter().zip(&blocks).enumerate() {
        let c_out = w * expansion;
        for b in 0..n {
            let p = format!("layer{}.{b}", s + 1);
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            // (name, layer) of the residual branch, in order.
            let branch = if bottleneck {
                vec![
                    ("conv1", conv(c_in, w, 1, stride)),
                    ("bn1", Layer::BatchNorm2d { c: w }),
                    ("relu1", Layer::Relu),
                    ("conv2", conv(w, w, 3, 1)),
                    ("bn2", Layer::BatchNorm2d { c: w }),
                    ("relu2", Layer::Relu),
                    ("conv3", conv(w, c_out, 1, 1)),
                    ("bn3", Layer::BatchNorm2d { c: c_out }),
                ]
            } else {
                vec![
                    ("conv1", conv(c_in, w, 3, stride)),
                    ("bn1", Layer::BatchNorm2d { c: w }),
                    ("relu1", Layer::Relu),
                    ("conv2", conv(w, w, 3, 1)),
                    ("bn2", Layer::BatchNorm2d { c: w }),
                ]
            };
            x = unit(&mut nodes, cfg, &p, x, branch, (c_in, c_out, stride), s + 1, se);
            c_in = c_out;
        }
    }
    classifier(nodes, cfg, x, c_in)
}

pub fn cifar_resnet(cfg: &ModelConfig, depth: usize, se: bool) -> Result<Graph> {
    if depth < 8 || !(depth - 2).is_multiple_of(6) {
        bail!("CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, …), got {depth}");
    }
    let blocks = (depth - 2) / 6;
    let widths = [16, 32, 64].map(|c| scaled(c, cfg.width));
    ensure!(widths[0] >= 1, "width {} leaves the 16-channel stem with no channels", cfg.width);
    if se {
        ensure!(
            cfg.reduction >= 1 && cfg.reduction <= widths[0],
            "reduction {} must be between 1 and the first stage's {} channels",
            cfg.reduction,
            widths[0]
        );
    }
    let mut nodes: Vec<Node> = Vec::new();
    let conv = |c_in, c_out, kernel, stride| Layer::Conv2d {
        c_in,
        c_out,
        kernel,
        stride,
        pad: kernel / 2,
        groups: 1,
        bias: false,
    };
    let mut x = push(&mut nodes, "conv1".into(), conv(cfg.in_channels, widths[0], 3, 1), vec![0]);
    x = push(&mut nodes, "bn1".into(), Layer::BatchNorm2d { c: widths[0] }, vec![x]);
    x = push(&mut nodes, "relu".into(), Layer::Relu, vec![x]);
    let mut c_in = widths[0];
    for (s, &c) in widths.iter().enumerate() {
        for b in 0..blocks {
            let p = format!("layer{}.{b}", s + 1);
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            let branch = vec![
                ("conv1", conv(c_in, c, 3, stride)),
                ("bn1", Layer::BatchNorm2d { c }),
                ("relu1", Layer::Relu),
                ("conv2", conv(c, c, 3, 1)),
                ("bn2", Layer::BatchNorm2d { c }),
            ];
            x = unit(&mut nodes, cfg, &p, x, branch, (c_in, c, stride), s + 1, se);
            c_in = c;
        }
    }
    classifier(nodes, cfg, x, c_in)
}
