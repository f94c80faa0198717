//! ResNeXts (Xie et al. 2017) and SE-ResNeXts (Hu et al., Table 2) as timm's `ResNet` class builds
//! `resnext50_32x4d`, `resnext101_32x4d`, `seresnext50_32x4d` and `seresnext101_32x4d`: the
//! ImageNet ResNet-50/101/152 layout (7×7 stem, 3×3 max pool, stages of 3/4/6/3, 3/4/23/3 or
//! 3/8/36/3 bottlenecks at 64/128/256/512 planes, 1×1 projection shortcuts) whose bottlenecks are
//! wider and grouped: cardinality C, D channels per group in the first stage,
//!
//! ```text
//! width = floor(planes · D / 64) · C      (resnext50-32x4d: 128, 256, 512, 1024)
//! conv1 1×1 in→width, conv2 3×3 width→width groups=C (the stride, as timm), conv3 1×1 width→planes·4
//! ```
//!
//! and, in an SE-ResNeXt, timm's SE module on the branch after `bn3` (`se.fc1`/`se.fc2` with
//! biases, hidden width `make_divisible(planes·4 / 16, 8)`). Names are timm's state-dict names:
//! `conv1`, `bn1`, `layer1.0.conv2`, `layer1.0.se.fc1`, `layer2.0.downsample.0`, `fc`.
//!
//! `--width w` scales the planes, the stem and the cardinality (`int(C · w)` groups), so each
//! group keeps the full network's channels: `se-resnext50-32x4d --width 0.125` has 4 groups of 4
//! channels in its first stage, as timm's `ResNet(channels=(8, 16, 32, 64), cardinality=4,
//! base_width=32)`.

use anyhow::{Context, Result, bail, ensure};

use super::registry::{Conventions, Family, Shapes, timm};
use super::resnet::{IMAGENET_TABLE, RESNET_UNIT, check_drop_path, classifier, drop_path_rate, infer_se, push, unit};
use super::senet::scaled;
use super::{BatchNorm2d, BottleneckStride, Conv2d, Graph, Layer, MaxPool2d, ModelConfig, Node, SeOptions};

/// The ResNeXt depths: the ImageNet ResNets with bottlenecks.
const DEPTHS: [usize; 3] = [50, 101, 152];

/// `[se-]resnext50/101/152-CxDd`.
pub struct ResNeXt;

/// A parsed `[se-]resnext<depth>-<C>x<D>d` name (also timm's spelling `[se]resnext50_32x4d`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Name {
    pub depth: usize,
    pub cardinality: usize,
    pub base_width: usize,
    pub se: bool,
}

/// `se-resnext50-32x4d` → depth 50, C 32, D 4, SE.
pub fn parse_name(model: &str) -> Option<Name> {
    let (se, rest) = if let Some(r) = model.strip_prefix("se-resnext").or_else(|| model.strip_prefix("seresnext")) {
        (true, r)
    } else {
        (false, model.strip_prefix("resnext")?)
    };
    let (depth, cxd) = rest.split_once(['-', '_'])?;
    let (c, d) = cxd.strip_suffix('d')?.split_once('x')?;
    let name = Name { depth: depth.parse().ok()?, cardinality: c.parse().ok()?, base_width: d.parse().ok()?, se };
    (DEPTHS.contains(&name.depth) && name.cardinality >= 1 && name.base_width >= 1).then_some(name)
}

/// The groups of the first unit's 3×3 (`layer1.0.conv2.weight`: [out, in / groups, 3, 3]), 1 when
/// the state dict has no such tensor or it is ungrouped.
pub fn first_groups(sd: &Shapes) -> usize {
    match (sd.get("layer1.0.conv2.weight"), sd.get("layer1.0.conv1.weight")) {
        (Some(w), Some(c1)) if w.len() == 4 && c1.len() == 4 && w[1] > 0 && c1[0] > w[1] => c1[0] / w[1],
        _ => 1,
    }
}

/// Whether a 7×7-stem bottleneck state dict is a ResNeXt's: its first 3×3 is grouped, or (one
/// group) its bottleneck is wider than a ResNet's (`conv1` out ≠ `conv3` out / 4).
pub fn is_resnext(sd: &Shapes) -> bool {
    let wider = match (sd.get("layer1.0.conv1.weight"), sd.get("layer1.0.conv3.weight")) {
        (Some(c1), Some(c3)) if !c1.is_empty() && !c3.is_empty() => c1[0] * 4 != c3[0],
        _ => false,
    };
    first_groups(sd) > 1 || wider
}

impl Family for ResNeXt {
    fn names(&self) -> &'static str {
        "[se-]resnext50/101/152-CxDd (ResNeXts, cardinality C with D channels per group, as timm's: \
         resnext50-32x4d, resnext101-32x4d, se-resnext50-32x4d, se-resnext101-32x4d)"
    }

    fn accepts(&self, model: &str) -> bool {
        parse_name(model).is_some()
    }

    fn check_flags(&self, cfg: &ModelConfig) -> Result<()> {
        let name = parse_name(&cfg.model).with_context(|| format!("not a ResNeXt name: {:?}", cfg.model))?;
        check(cfg, name, "--")
    }

    fn build(&self, cfg: &ModelConfig) -> Result<Graph> {
        let name = parse_name(&cfg.model).with_context(|| format!("not a ResNeXt name: {:?}", cfg.model))?;
        resnext(cfg, name)
    }

    /// A 7×7 stem, `fc`, and a grouped or wide bottleneck in the first unit ([`is_resnext`]).
    fn claims(&self, sd: &Shapes) -> bool {
        sd.get("conv1.weight").is_some_and(|s| s.len() == 4 && s[2] == 7)
            && sd.contains_key("fc.weight")
            && sd.contains_key("layer1.0.conv3.weight")
            && is_resnext(sd)
    }

    fn infer(&self, sd: &Shapes, base: ModelConfig, what: &str) -> Result<ModelConfig> {
        infer(sd, base, what)
    }

    fn conventions(&self) -> Conventions {
        timm(8)
    }
}

/// Width, cardinality and SE options that can build, naming the flag (`flag` = "--") or the
/// setting (`flag` = "").
fn check(cfg: &ModelConfig, name: Name, flag: &str) -> Result<()> {
    ensure!(cfg.width > 0.0 && cfg.width.is_finite(), "{flag}width must be positive, got {}", cfg.width);
    check_drop_path(cfg, flag)?;
    ensure!(
        scaled(64, cfg.width) >= 1 && scaled(name.cardinality, cfg.width) >= 1,
        "{flag}width {} scales the {} groups of {} (and its 64-channel stem) to none; the smallest width is {}",
        cfg.width,
        name.cardinality,
        cfg.model,
        1.0 / name.cardinality.min(64) as f64
    );
    if name.se {
        let c = scaled(256, cfg.width);
        ensure!(
            cfg.reduction >= 1 && (cfg.se.divisor > 0 || cfg.reduction <= c),
            "{flag}reduction {} must be between 1 and the first stage's {c} channels (any r from 1 up with \
             {flag}se-divisor)",
            cfg.reduction
        );
    } else {
        ensure!(
            cfg.se == SeOptions { divisor: cfg.se.divisor, ..Default::default() },
            "{} has no SE blocks: the SE options ({flag}squeeze, {flag}excitation, {flag}se-placement, \
             {flag}se-stages) apply to se-{}",
            cfg.model,
            cfg.model
        );
    }
    Ok(())
}

pub fn resnext(cfg: &ModelConfig, name: Name) -> Result<Graph> {
    check(cfg, name, "")?;
    let Some(&(_, _, blocks)) = IMAGENET_TABLE.iter().find(|(d, b, _)| *d == name.depth && *b) else {
        bail!("ResNeXt depth must be one of {DEPTHS:?}, got {}", name.depth);
    };
    let planes = [64, 128, 256, 512].map(|c| scaled(c, cfg.width));
    let groups = scaled(name.cardinality, cfg.width);
    // Local constructors: the layers this family builds.
    let conv = |c_in, c_out, kernel, stride, groups| {
        Layer::Conv2d(Conv2d { c_in, c_out, kernel, stride, pad: kernel / 2, groups, bias: false })
    };
    let bn = |c| Layer::BatchNorm2d(BatchNorm2d { c });
    let mut nodes: Vec<Node> = Vec::new();
    let mut x = push(&mut nodes, "conv1".into(), conv(cfg.in_channels, scaled(64, cfg.width), 7, 2, 1), vec![0]);
    x = push(&mut nodes, "bn1".into(), bn(scaled(64, cfg.width)), vec![x]);
    x = push(&mut nodes, "relu".into(), Layer::Relu, vec![x]);
    x = push(
        &mut nodes,
        "maxpool".into(),
        Layer::MaxPool2d(MaxPool2d { kernel: 3, stride: 2, pad: 1, ceil: false }),
        vec![x],
    );
    let mut c_in = scaled(64, cfg.width);
    let (mut k, total) = (0, blocks.iter().sum());
    for (s, (&p, &n)) in planes.iter().zip(&blocks).enumerate() {
        // floor(planes · D / 64) · C at full width (planes = 64·2^s): 2^s · D channels per group.
        let width = (64 << s) * name.base_width / 64 * groups;
        let c_out = p * 4;
        for b in 0..n {
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            let (s1, s3) = match cfg.block.stride {
                BottleneckStride::Conv1x1 => (stride, 1),
                BottleneckStride::Conv3x3 => (1, stride),
            };
            let branch = vec![
                ("conv1", conv(c_in, width, 1, s1, 1)),
                ("bn1", bn(width)),
                ("relu1", Layer::Relu),
                ("conv2", conv(width, width, 3, s3, groups)),
                ("bn2", bn(width)),
                ("relu2", Layer::Relu),
                ("conv3", conv(width, c_out, 1, 1, 1)),
                ("bn3", bn(c_out)),
            ];
            let p = format!("layer{}.{b}", s + 1);
            let drop = drop_path_rate(cfg.block.drop_path, k, total);
            x = unit(&mut nodes, cfg, RESNET_UNIT, &p, x, branch, (c_in, c_out, stride), (s + 1, drop), name.se);
            c_in = c_out;
            k += 1;
        }
    }
    classifier(nodes, cfg, x, c_in)
}

/// A (SE-)ResNeXt's configuration from its state dict: the depth from the units per stage, the
/// width from the stem, the cardinality from the first grouped 3×3 (groups / width) and D from
/// its channels per group, the SE options as the SE-ResNets'. Bottlenecks stride in the 3×3, as
/// timm's (the shapes cannot tell).
fn infer(sd: &Shapes, mut cfg: ModelConfig, what: &str) -> Result<ModelConfig> {
    let shape = |name: &str| -> Result<&Vec<usize>> {
        sd.get(name).with_context(|| format!("{what}: no tensor {name}; cannot infer the ResNeXt"))
    };
    let stem = shape("conv1.weight")?;
    let fc = shape("fc.weight")?;
    let conv2 = shape("layer1.0.conv2.weight")?;
    ensure!(stem.len() == 4 && fc.len() == 2 && conv2.len() == 4, "{what}: unexpected ranks for a ResNeXt");
    let blocks: Vec<usize> =
        (1..=4).map(|s| (0..).take_while(|b| sd.contains_key(&format!("layer{s}.{b}.conv1.weight"))).count()).collect();
    let depth = IMAGENET_TABLE
        .iter()
        .find(|(_, b, n)| *b && n.as_slice() == blocks.as_slice())
        .map(|(d, _, _)| *d)
        .with_context(|| format!("{what}: ResNeXt units per stage {blocks:?} match no depth of {DEPTHS:?}"))?;
    let width = stem[0] as f64 / 64.0;
    let groups = first_groups(sd);
    let cardinality = (groups as f64 / width).round() as usize;
    ensure!(
        cardinality >= 1 && scaled(cardinality, width) == groups,
        "{what}: layer1.0.conv2.weight {conv2:?} has {groups} groups, which no cardinality gives at width {width} \
         (conv1.weight: {} stem channels of 64)",
        stem[0]
    );
    let se = infer_se(sd, &blocks, "se", &mut cfg, what)?;
    cfg.model = format!("{}resnext{depth}-{cardinality}x{}d", if se { "se-" } else { "" }, conv2[1]);
    cfg.width = width;
    cfg.in_channels = stem[1];
    cfg.num_classes = fc[0];
    cfg.block.stride = BottleneckStride::Conv3x3;
    Ok(cfg)
}
