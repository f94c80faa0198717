//! ImageNet ResNets (He et al. 2016, Table 1: 18/34 with basic blocks, 50/101/152 with
//! bottlenecks; a 7×7 stride-2 stem and a 3×3 stride-2 max pool; the stride of a bottleneck in its
//! first 1×1 convolution, as the original and the SENet paper's Caffe models have it, or in its
//! 3×3 as timm and torchvision: `BlockOptions::stride`) and their SE versions (SE block after the
//! last BN of the residual branch, before the addition; hidden widths `C // r`, or timm's
//! rounding to a multiple of 8: `SeOptions::divisor`).
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

use anyhow::{Context, Result, bail, ensure};

use super::registry::{Family, Shapes};
use super::senet::scaled;
use super::{
    BatchNorm2d, BottleneckStride, Conv2d, DropPath, Graph, Layer, Linear, MaxPool2d, ModelConfig, Node, SeBlock,
    SePlacement, se_hidden,
};

/// The ImageNet ResNets of He et al. 2016, Table 1: depth, bottleneck blocks, blocks per stage.
/// Building and shape inference both read this table.
pub const IMAGENET_TABLE: [(usize, bool, [usize; 4]); 5] = [
    (18, false, [2, 2, 2, 2]),
    (34, false, [3, 4, 6, 3]),
    (50, true, [3, 4, 6, 3]),
    (101, true, [3, 4, 23, 3]),
    (152, true, [3, 8, 36, 3]),
];

/// The ImageNet depths; every other depth is a CIFAR ResNet (6n+2).
pub const IMAGENET_DEPTHS: [usize; 5] = [18, 34, 50, 101, 152];

/// The CIFAR ResNet depth rule: 6n+2 with n >= 1.
pub fn is_cifar_depth(depth: usize) -> bool {
    depth >= 8 && (depth - 2).is_multiple_of(6)
}

/// `[se-]resnet18/34/50/101/152`: the ImageNet ResNets and SE-ResNets.
pub struct ImageNetResNet;

/// `[se-]resnetD`, D = 6n+2: the CIFAR ResNets and SE-ResNets.
pub struct CifarResNet;

impl Family for ImageNetResNet {
    fn names(&self) -> &'static str {
        "[se-]resnet18/34/50/101/152 (ImageNet ResNets, for larger images)"
    }

    fn accepts(&self, model: &str) -> bool {
        parse_name(model).is_some_and(|(d, _)| IMAGENET_DEPTHS.contains(&d))
    }

    fn build(&self, cfg: &ModelConfig) -> Result<Graph> {
        let (depth, se) = parse_name(&cfg.model).with_context(|| format!("not a ResNet name: {:?}", cfg.model))?;
        imagenet_resnet(cfg, depth, se)
    }

    /// A 7x7 stem, bottlenecks (if any) a ResNet's: not a ResNeXt's grouped or wider ones.
    fn claims(&self, sd: &Shapes) -> bool {
        sd.get("conv1.weight").is_some_and(|s| s.len() == 4 && s[2] == 7)
            && sd.contains_key("fc.weight")
            && !super::resnext::is_resnext(sd)
    }

    fn infer(&self, sd: &Shapes, base: ModelConfig, what: &str) -> Result<ModelConfig> {
        infer_resnet(sd, base, what, true)
    }

    /// ResNet-50: ~25.6 M and 3.86; SE-ResNet-50: ~2.5 M more parameters (~10 %) and 3.87
    /// GFLOPs (+0.26 %), §6.1 / Table 2.
    fn paper_figures(&self, model: &str, hw: usize) -> Option<(f64, f64)> {
        match (model, hw) {
            ("resnet50", 224) => Some((25.6e6, 3.86)),
            ("se-resnet50", 224) => Some((28.1e6, 3.87)),
            _ => None,
        }
    }
}

impl Family for CifarResNet {
    fn names(&self) -> &'static str {
        "[se-]resnet20/32/44/56/110 (CIFAR ResNets, any 6n+2 depth: 8, 14, 20, …)"
    }

    fn accepts(&self, model: &str) -> bool {
        parse_name(model).is_some_and(|(d, _)| is_cifar_depth(d) && !IMAGENET_DEPTHS.contains(&d))
    }

    fn build(&self, cfg: &ModelConfig) -> Result<Graph> {
        let (depth, se) = parse_name(&cfg.model).with_context(|| format!("not a ResNet name: {:?}", cfg.model))?;
        cifar_resnet(cfg, depth, se)
    }

    /// A stem other than 7x7 (3x3).
    fn claims(&self, sd: &Shapes) -> bool {
        sd.get("conv1.weight").is_some_and(|s| s.len() == 4 && s[2] != 7) && sd.contains_key("fc.weight")
    }

    fn infer(&self, sd: &Shapes, base: ModelConfig, what: &str) -> Result<ModelConfig> {
        infer_resnet(sd, base, what, false)
    }
}

/// A (SE-)ResNet's configuration from its state dict: the depth from the blocks per stage and
/// bottlenecks (`conv3`), the width from the stem's channels, SE stages, reduction and biases from
/// the `se` tensors (placement is taken as standard: the others leave the same names).
fn infer_resnet(sd: &Shapes, mut cfg: ModelConfig, what: &str, imagenet: bool) -> Result<ModelConfig> {
    let shape = |name: &str| -> Result<&Vec<usize>> {
        sd.get(name).with_context(|| format!("{what}: no tensor {name}; cannot infer the ResNet"))
    };
    let stem = shape("conv1.weight")?;
    let fc = shape("fc.weight")?;
    ensure!(stem.len() == 4 && fc.len() == 2, "{what}: unexpected ranks for a ResNet's conv1 / fc");
    let stages = if imagenet { 4 } else { 3 };
    let blocks: Vec<usize> = (1..=stages)
        .map(|s| (0..).take_while(|b| sd.contains_key(&format!("layer{s}.{b}.conv1.weight"))).count())
        .collect();
    let bottleneck = sd.contains_key("layer1.0.conv3.weight");
    let depth = if imagenet {
        IMAGENET_TABLE
            .iter()
            .find(|(_, b, n)| *b == bottleneck && n.as_slice() == blocks.as_slice())
            .map(|(d, _, _)| *d)
            .with_context(|| {
                format!("{what}: ImageNet ResNet blocks per stage {blocks:?} match no depth of {IMAGENET_DEPTHS:?}")
            })?
    } else {
        ensure!(
            blocks[0] >= 1 && blocks.iter().all(|&b| b == blocks[0]),
            "{what}: CIFAR ResNet blocks per stage {blocks:?} should be equal"
        );
        6 * blocks[0] + 2
    };
    let se = infer_se(sd, &blocks, "se", &mut cfg, what)?;
    cfg.model = format!("{}resnet{depth}", if se { "se-" } else { "" });
    cfg.width = stem[0] as f64 / if imagenet { 64.0 } else { 16.0 };
    cfg.in_channels = stem[1];
    cfg.num_classes = fc[0];
    // A bare ImageNet bottleneck state dict is taken as timm's and torchvision's (the stride in
    // the 3x3); the shapes cannot tell, and our own runs carry theirs in config.json.
    if imagenet && bottleneck {
        cfg.block.stride = BottleneckStride::Conv3x3;
    }
    Ok(cfg)
}

/// The SE options of a residual network's state dict with `blocks[s]` units in stage s + 1, its
/// SE blocks named `layer{s}.{b}.{se_name}`: the reduction and divisor that give every block's
/// hidden width, biases, and the stages that have them (placement is taken as standard: the
/// others leave the same names). Whether it has any SE block.
pub(super) fn infer_se(
    sd: &Shapes,
    blocks: &[usize],
    se_name: &str,
    cfg: &mut ModelConfig,
    what: &str,
) -> Result<bool> {
    let stages = blocks.len();
    let se_blocks: Vec<(usize, usize)> = (1..=stages)
        .flat_map(|s| (0..blocks[s - 1]).map(move |b| (s, b)))
        .filter(|(s, b)| sd.contains_key(&format!("layer{s}.{b}.{se_name}.fc1.weight")))
        .collect();
    let Some(&(s, b)) = se_blocks.first() else { return Ok(false) };
    // (name, channels, hidden) of every SE block.
    let mut widths = Vec::new();
    for &(s, b) in &se_blocks {
        let name = format!("layer{s}.{b}.{se_name}.fc1.weight");
        let fc1 = &sd[&name];
        ensure!(fc1.len() == 4 && fc1[0] >= 1, "{what}: {name} has shape {fc1:?}, expected [hidden, C, 1, 1]");
        widths.push((name, fc1[1], fc1[0]));
    }
    (cfg.reduction, cfg.se.divisor) = se_widths_rule(&widths, what)?;
    cfg.se_bias = sd.contains_key(&format!("layer{s}.{b}.{se_name}.fc1.bias"));
    let mut with_se: Vec<usize> = se_blocks.iter().map(|&(s, _)| s).collect();
    with_se.dedup();
    if with_se.len() < stages {
        cfg.se.stages = with_se;
    }
    Ok(true)
}

/// The (reduction, divisor) that gives every SE block of a state dict its hidden width
/// (`widths`: tensor name, channels, hidden): `C // r` with the first block's ratio, as our models
/// and the paper, else any block's ratio; else timm's multiple of 8 with timm's r = 16, else with
/// the ratio read where the rounding matters least (the widest block first). Narrow networks'
/// widths can fit several r (8 hidden units for every C up to 128 fit r = 8 and r = 16): the
/// first that fits is taken, and any that fits builds the same shapes.
pub fn se_widths_rule(widths: &[(String, usize, usize)], what: &str) -> Result<(usize, usize)> {
    let ratios: Vec<usize> = widths.iter().map(|(_, c, h)| (c / h).max(1)).collect();
    let fits = |r: usize, d: usize| widths.iter().all(|&(_, c, h)| se_hidden(c, r, d) == h);
    let floor = ratios.iter().copied().find(|&r| fits(r, 0)).map(|r| (r, 0));
    let timm = || std::iter::once(16).chain(ratios.iter().rev().copied()).find(|&r| fits(r, 8)).map(|r| (r, 8));
    floor.or_else(timm).with_context(|| {
        let list: Vec<String> = widths.iter().map(|(n, c, h)| format!("{n} {c}→{h}")).collect();
        format!(
            "{what}: the SE blocks' hidden widths fit no reduction r, as C // r or as timm's multiple of 8 \
             (make_divisible(C / r, 8)): {}",
            list.join(", ")
        )
    })
}

/// Depth and SE-ness of a `resnet<D>` / `se-resnet<D>` model name.
pub fn parse_name(model: &str) -> Option<(usize, bool)> {
    let (se, rest) = match model.strip_prefix("se-") {
        Some(r) => (true, r),
        None => (false, model),
    };
    let depth: usize = rest.strip_prefix("resnet")?.parse().ok()?;
    Some((depth, se))
}

pub(super) fn push(nodes: &mut Vec<Node>, name: String, layer: Layer, inputs: Vec<usize>) -> usize {
    nodes.push(Node { name, layer, inputs });
    nodes.len()
}

/// What a family's residual units name and build differently from the ResNets': the SE block's
/// name (`se`; `se_module` in timm's legacy SENets) and the projection shortcut's kernel (1, or
/// 3 with padding 1 in SENet-154's strided units).
#[derive(Clone, Copy, Debug)]
pub(super) struct UnitStyle {
    pub se_name: &'static str,
    pub shortcut_kernel: usize,
}

/// The ResNets' (and timm's ResNeXts'): `se`, 1×1 projections.
pub(super) const RESNET_UNIT: UnitStyle = UnitStyle { se_name: "se", shortcut_kernel: 1 };

/// timm's stochastic depth rule (`make_blocks`: `drop_path_rate * net_block_idx /
/// (net_num_blocks - 1)`, in that order, in f64): the drop probability of unit `k` (0-based,
/// counted over the whole network) of `total` for the network's rate `rate`. The first unit's is
/// 0, the last's `rate`; timm (and we) put no DropPath where it is 0.
pub fn drop_path_rate(rate: f64, k: usize, total: usize) -> f64 {
    // timm divides by zero for a one-unit network; every family here has at least three.
    rate * k as f64 / (total.max(2) - 1) as f64
}

/// `--drop-path` (`flag` "--") or config.json's `block.drop_path` (`flag` ""): in [0, 1).
pub(super) fn check_drop_path(cfg: &ModelConfig, flag: &str) -> Result<()> {
    let what = if flag.is_empty() { "block.drop_path" } else { "--drop-path" };
    let p = cfg.block.drop_path;
    ensure!((0.0..1.0).contains(&p), "{what} must be in [0, 1) (the last unit's drop probability), got {p}");
    Ok(())
}

/// A family without timm's stochastic depth (`why`) refuses a drop-path rate, naming the flag.
pub(super) fn refuse_drop_path(cfg: &ModelConfig, flag: &str, why: &str) -> Result<()> {
    let what = if flag.is_empty() { "block.drop_path" } else { "--drop-path" };
    ensure!(
        cfg.block.drop_path == 0.0,
        "{what} {} does not apply to {}: {why}; stochastic depth is for the residual families \
         ((se-)resnet*, (se-)resnext*)",
        cfg.block.drop_path,
        cfg.model
    );
    Ok(())
}

/// Append one residual unit `p` of stage `stage` (1-based) reading activation `x` (`c_in`
/// channels) to `nodes`: the residual `branch` (ending in `c_out` channels), a projection shortcut
/// (conv + BN, the conv's kernel as `style` says) when `stride` or the width changes, the
/// addition and the ReLU, and — if `se` and the stage is selected — an SE block placed as
/// `cfg.se.placement` says. With `drop_path` > 0 the branch's output (after a standard SE block)
/// goes through `DropPath(drop_path)` (`{p}.drop_path`) before the addition, as timm's blocks.
/// Returns the output.
#[allow(clippy::too_many_arguments)]
pub(super) fn unit(
    nodes: &mut Vec<Node>,
    cfg: &ModelConfig,
    style: UnitStyle,
    p: &str,
    x: usize,
    branch: Vec<(&str, Layer)>,
    (c_in, c_out, stride): (usize, usize, usize),
    (stage, drop_path): (usize, f64),
    se: bool,
) -> usize {
    let k = style.shortcut_kernel;
    let conv = Layer::Conv2d(Conv2d { c_in, c_out, kernel: k, stride, pad: k / 2, groups: 1, bias: false });
    let projection = (stride != 1 || c_in != c_out).then_some((conv, Layer::BatchNorm2d(BatchNorm2d { c: c_out })));
    let se = (se && cfg.se.in_stage(stage)).then_some(if cfg.se.placement == SePlacement::Pre { c_in } else { c_out });
    let at = |place: SePlacement| se.filter(|_| cfg.se.placement == place);
    let se_layer =
        |c| Layer::SeBlock(SeBlock { c, hidden: cfg.se_hidden(c), bias: cfg.se_bias, variant: cfg.se.variant() });
    let mut y = x;
    if let Some(c) = at(SePlacement::Pre) {
        y = push(nodes, format!("{p}.{}", style.se_name), se_layer(c), vec![y]);
    }
    for (name, layer) in branch {
        y = push(nodes, format!("{p}.{name}"), layer, vec![y]);
    }
    if let Some(c) = at(SePlacement::Standard) {
        y = push(nodes, format!("{p}.{}", style.se_name), se_layer(c), vec![y]);
    }
    if drop_path > 0.0 {
        y = push(nodes, format!("{p}.drop_path"), Layer::DropPath(DropPath { p: drop_path }), vec![y]);
    }
    let mut shortcut = match projection {
        Some((conv, bn)) => {
            let z = push(nodes, format!("{p}.downsample.0"), conv, vec![x]);
            push(nodes, format!("{p}.downsample.1"), bn, vec![z])
        }
        None => x,
    };
    if let Some(c) = at(SePlacement::Identity) {
        shortcut = push(nodes, format!("{p}.{}", style.se_name), se_layer(c), vec![shortcut]);
    }
    y = push(nodes, format!("{p}.add"), Layer::Add, vec![y, shortcut]);
    let mut out = push(nodes, format!("{p}.relu"), Layer::Relu, vec![y]);
    if let Some(c) = at(SePlacement::Post) {
        out = push(nodes, format!("{p}.{}", style.se_name), se_layer(c), vec![out]);
    }
    out
}

/// Global average pooling and the `fc` classifier on activation `x` of `c` channels; the graph.
pub(super) fn classifier(mut nodes: Vec<Node>, cfg: &ModelConfig, x: usize, c: usize) -> Result<Graph> {
    let x = push(&mut nodes, "avgpool".into(), Layer::GlobalAvgPool, vec![x]);
    push(
        &mut nodes,
        "fc".into(),
        Layer::Linear(Linear { in_features: c, out_features: cfg.num_classes, bias: true }),
        vec![x],
    );
    let graph = Graph { input: [cfg.in_channels, cfg.input_hw[0], cfg.input_hw[1]], nodes };
    graph.shapes(1)?;
    Ok(graph)
}

pub fn imagenet_resnet(cfg: &ModelConfig, depth: usize, se: bool) -> Result<Graph> {
    let Some(&(_, bottleneck, blocks)) = IMAGENET_TABLE.iter().find(|(d, _, _)| *d == depth) else {
        bail!("ImageNet ResNet depth must be one of {IMAGENET_DEPTHS:?}, got {depth}");
    };
    let expansion = if bottleneck { 4 } else { 1 };
    let widths = [64, 128, 256, 512].map(|c| scaled(c, cfg.width));
    ensure!(widths[0] >= 1, "width {} leaves the 64-channel stem with no channels", cfg.width);
    if se {
        ensure!(
            cfg.reduction >= 1 && (cfg.se.divisor > 0 || cfg.reduction <= widths[0] * expansion),
            "reduction {} must be between 1 and the first stage's {} channels (any r from 1 up with --se-divisor)",
            cfg.reduction,
            widths[0] * expansion
        );
    }
    check_drop_path(cfg, "")?;
    let mut nodes: Vec<Node> = Vec::new();
    let conv = |c_in, c_out, kernel, stride| {
        Layer::Conv2d(Conv2d { c_in, c_out, kernel, stride, pad: kernel / 2, groups: 1, bias: false })
    };
    let mut x = push(&mut nodes, "conv1".into(), conv(cfg.in_channels, widths[0], 7, 2), vec![0]);
    x = push(&mut nodes, "bn1".into(), Layer::BatchNorm2d(BatchNorm2d { c: widths[0] }), vec![x]);
    x = push(&mut nodes, "relu".into(), Layer::Relu, vec![x]);
    x = push(
        &mut nodes,
        "maxpool".into(),
        Layer::MaxPool2d(MaxPool2d { kernel: 3, stride: 2, pad: 1, ceil: false }),
        vec![x],
    );
    let mut c_in = widths[0];
    let (mut k, total) = (0, blocks.iter().sum());
    for (s, (&w, &n)) in widths.iter().zip(&blocks).enumerate() {
        let c_out = w * expansion;
        for b in 0..n {
            let p = format!("layer{}.{b}", s + 1);
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            // (name, layer) of the residual branch, in order.
            let branch = if bottleneck {
                let (s1, s3) = match cfg.block.stride {
                    BottleneckStride::Conv1x1 => (stride, 1),
                    BottleneckStride::Conv3x3 => (1, stride),
                };
                vec![
                    ("conv1", conv(c_in, w, 1, s1)),
                    ("bn1", Layer::BatchNorm2d(BatchNorm2d { c: w })),
                    ("relu1", Layer::Relu),
                    ("conv2", conv(w, w, 3, s3)),
                    ("bn2", Layer::BatchNorm2d(BatchNorm2d { c: w })),
                    ("relu2", Layer::Relu),
                    ("conv3", conv(w, c_out, 1, 1)),
                    ("bn3", Layer::BatchNorm2d(BatchNorm2d { c: c_out })),
                ]
            } else {
                vec![
                    ("conv1", conv(c_in, w, 3, stride)),
                    ("bn1", Layer::BatchNorm2d(BatchNorm2d { c: w })),
                    ("relu1", Layer::Relu),
                    ("conv2", conv(w, w, 3, 1)),
                    ("bn2", Layer::BatchNorm2d(BatchNorm2d { c: w })),
                ]
            };
            let drop = drop_path_rate(cfg.block.drop_path, k, total);
            x = unit(&mut nodes, cfg, RESNET_UNIT, &p, x, branch, (c_in, c_out, stride), (s + 1, drop), se);
            c_in = c_out;
            k += 1;
        }
    }
    classifier(nodes, cfg, x, c_in)
}

pub fn cifar_resnet(cfg: &ModelConfig, depth: usize, se: bool) -> Result<Graph> {
    if !is_cifar_depth(depth) {
        bail!("CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, …), got {depth}");
    }
    let blocks = (depth - 2) / 6;
    let widths = [16, 32, 64].map(|c| scaled(c, cfg.width));
    ensure!(widths[0] >= 1, "width {} leaves the 16-channel stem with no channels", cfg.width);
    if se {
        ensure!(
            cfg.reduction >= 1 && (cfg.se.divisor > 0 || cfg.reduction <= widths[0]),
            "reduction {} must be between 1 and the first stage's {} channels (any r from 1 up with --se-divisor)",
            cfg.reduction,
            widths[0]
        );
    }
    check_drop_path(cfg, "")?;
    let mut nodes: Vec<Node> = Vec::new();
    let conv = |c_in, c_out, kernel, stride| {
        Layer::Conv2d(Conv2d { c_in, c_out, kernel, stride, pad: kernel / 2, groups: 1, bias: false })
    };
    let mut x = push(&mut nodes, "conv1".into(), conv(cfg.in_channels, widths[0], 3, 1), vec![0]);
    x = push(&mut nodes, "bn1".into(), Layer::BatchNorm2d(BatchNorm2d { c: widths[0] }), vec![x]);
    x = push(&mut nodes, "relu".into(), Layer::Relu, vec![x]);
    let mut c_in = widths[0];
    let total = widths.len() * blocks;
    for (s, &c) in widths.iter().enumerate() {
        for b in 0..blocks {
            let p = format!("layer{}.{b}", s + 1);
            let stride = if s > 0 && b == 0 { 2 } else { 1 };
            let branch = vec![
                ("conv1", conv(c_in, c, 3, stride)),
                ("bn1", Layer::BatchNorm2d(BatchNorm2d { c })),
                ("relu1", Layer::Relu),
                ("conv2", conv(c, c, 3, 1)),
                ("bn2", Layer::BatchNorm2d(BatchNorm2d { c })),
            ];
            let drop = drop_path_rate(cfg.block.drop_path, s * blocks + b, total);
            x = unit(&mut nodes, cfg, RESNET_UNIT, &p, x, branch, (c_in, c, stride), (s + 1, drop), se);
            c_in = c;
        }
    }
    classifier(nodes, cfg, x, c_in)
}
