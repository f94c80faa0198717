//! `senet summary` against published figures: torchvision's exact parameter counts and the SENet
//! paper's parameters and GFLOPs (multiply-adds) for (SE-)ResNet-50 at 224×224, within 1 %.

use senet_wgpu::model::ModelConfig;
use senet_wgpu::summary::{paper_figures, summary};

fn imagenet(model: &str) -> ModelConfig {
    ModelConfig {
        model: model.into(),
        width: 1.0,
        reduction: 16,
        in_channels: 3,
        num_classes: 1000,
        input_hw: [224, 224],
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
        block: Default::default(),
    }
}

fn within(what: &str, got: f64, want: f64, rel: f64) {
    assert!((got - want).abs() <= rel * want, "{what}: {got} is not within {}% of {want}", rel * 100.0);
}

#[test]
fn resnet_parameter_counts_are_torchvisions() {
    assert_eq!(summary(&imagenet("resnet50")).unwrap().params, 25_557_032);
    assert_eq!(summary(&imagenet("resnet18")).unwrap().params, 11_689_512);
    // torchvision: resnet18 1.81 GFLOPs (multiply-adds).
    within("resnet18 mult-adds", summary(&imagenet("resnet18")).unwrap().macs as f64, 1.81e9, 0.01);
}

#[test]
fn se_resnet50_matches_the_paper() {
    for model in ["resnet50", "se-resnet50"] {
        let s = summary(&imagenet(model)).unwrap();
        let (params, gflops) = paper_figures(model, 224).unwrap();
        within(&format!("{model} parameters"), s.params as f64, params, 0.01);
        within(&format!("{model} GFLOPs"), s.macs as f64 / 1e9, gflops, 0.01);
    }
    let se = summary(&imagenet("se-resnet50")).unwrap();
    // SE: 2·C²/16 per block, C = 256·3, 512·4, 1024·6, 2048·3 blocks → 2,514,944 (~10 %).
    assert_eq!(se.se_params, 2_514_944);
    let overhead = se.se_macs as f64 / (se.macs - se.se_macs) as f64;
    assert!(overhead > 0.001 && overhead < 0.003, "SE mult-add overhead {overhead} (paper: 0.26 %)");
}

#[test]
fn the_summary_lists_every_layer() {
    let s = summary(&ModelConfig { input_hw: [32, 32], num_classes: 10, ..imagenet("se-resnet20") }).unwrap();
    let g = ModelConfig { input_hw: [32, 32], num_classes: 10, ..imagenet("se-resnet20") }.graph().unwrap();
    assert_eq!(s.layers.len(), g.nodes.len());
    assert_eq!(s.params, g.parameter_count());
    assert_eq!(s.layers.last().unwrap().output, vec![10]);
}

/// timm's SE-ResNets, built as timm builds them (SE widths make_divisible(C / 16, 8), SE biases,
/// bottlenecks striding in the 3x3): parameter counts exactly as `sum(p.numel() for p in
/// timm.create_model(name).parameters())` printed by timm 1.0.31.
#[test]
fn timm_se_resnet_parameter_counts_are_timms() {
    let timm = [
        ("se-resnet18", 11_779_624),
        ("se-resnet34", 21_960_416),
        ("se-resnet50", 28_088_024),
        ("se-resnet101", 49_326_872),
        ("se-resnet152", 66_821_848),
    ];
    for (model, params) in timm {
        let mut cfg = imagenet(model);
        cfg.se_bias = true;
        cfg.se.divisor = 8;
        cfg.block.stride = senet_wgpu::model::BottleneckStride::Conv3x3;
        assert_eq!(summary(&cfg).unwrap().params, params, "{model}");
    }
}

/// Grouped convolutions count as PyTorch's `nn.Conv2d(groups=)`: weight [out, in/groups, k, k]
/// and k·k·in/groups multiply-adds per output. ResNeXt-50's first grouped 3×3 (128 → 128, 32
/// groups, 56×56): 128·4·9 = 4,608 weights, ×56·56 outputs per channel = 14,450,688 multiply-adds;
/// a depthwise 3×3 on 32 channels at 8×8 with a bias: 32·9 + 32 = 320 and 32·64·9 = 18,432.
#[test]
fn grouped_convolutions_count_their_parameters_and_multiply_adds() {
    use senet_wgpu::model::{Conv2d, Graph, Layer, Node};
    use senet_wgpu::summary::summarize;
    let conv = |c, hw, groups, bias| Graph {
        input: [c, hw, hw],
        nodes: vec![Node {
            name: "conv".into(),
            layer: Layer::Conv2d(Conv2d { c_in: c, c_out: c, kernel: 3, stride: 1, pad: 1, groups, bias }),
            inputs: vec![0],
        }],
    };
    let s = summarize("resnext", &conv(128, 56, 32, false)).unwrap();
    assert_eq!((s.params, s.macs), (4_608, 14_450_688));
    assert_eq!(s.layers[0].layer, "Conv2d 128→128 3x3/1 g32");
    let s = summarize("depthwise", &conv(32, 8, 32, true)).unwrap();
    assert_eq!((s.params, s.macs), (320, 18_432));
}

/// `senet summary --model <m> --image-size 224 --num-classes 1000` through the command line, so the
/// families' defaults (timm's SE biases and widths) are the ones a user gets: (parameters,
/// multiply-adds per image).
fn cli_summary(model: &str) -> (usize, f64) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_senet"))
        .args(["summary", "--model", model, "--image-size", "224", "--num-classes", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "summary {model}: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    let total = stdout.lines().find(|l| l.starts_with("total: ")).unwrap_or_else(|| panic!("{stdout}"));
    let words: Vec<&str> = total.split_whitespace().collect();
    (words[1].parse().unwrap(), words[5].parse::<f64>().unwrap() * 1e9)
}

/// The ResNeXts and SENet-154 as timm builds them: parameter counts exactly as
/// `sum(p.numel() for p in timm.create_model(name).parameters())` printed by timm 1.0.31 for
/// resnext50_32x4d, resnext101_32x4d, seresnext50_32x4d, seresnext101_32x4d and
/// legacy_senet154; multiply-adds within 1 % of the SENet paper's Table 2 GFLOPs for the
/// (SE-)ResNeXts (4.24 / 4.25 and 7.99 / 8.00; measured here 4.230, 4.239, 7.970, 7.984).
/// SENet-154 measures 20.70 G.
#[test]
fn resnext_and_senet154_parameter_counts_are_timms() {
    let cases = [
        ("resnext50-32x4d", 25_028_904, 4.24),
        ("resnext101-32x4d", 44_177_704, 7.99),
        ("se-resnext50-32x4d", 27_559_896, 4.25),
        ("se-resnext101-32x4d", 48_955_416, 8.00),
        ("senet154", 115_088_984, 20.70),
    ];
    for (model, params, gflops) in cases {
        let (p, macs) = cli_summary(model);
        assert_eq!(p, params, "{model}");
        within(&format!("{model} GFLOPs"), macs / 1e9, gflops, 0.01);
    }
    // timm's spellings name the same models.
    assert_eq!(cli_summary("seresnext50_32x4d").0, 27_559_896);
    assert_eq!(cli_summary("legacy_senet154").0, 115_088_984);
}
