//! `senet summary`: a model's layers with output shapes, parameters and multiply-adds, the
//! totals, and the SE blocks' overhead — beside the SENet paper's figures where it has them.
//!
//! Multiply-adds count convolutions and linear layers (k·k·c_in/groups per output), and for an SE block
//! its two FC layers (2·C·C/r) and the rescaling (C·H·W); batch norm, ReLU, pooling and additions
//! count 0 — the convention of the paper's GFLOPs (which are multiply-adds).

use anyhow::Result;
use serde::Serialize;

use crate::model::{Graph, Layer, ModelConfig, conv_config, registry};

#[derive(Clone, Debug, Serialize)]
pub struct LayerRow {
    pub name: String,
    pub layer: String,
    pub output: Vec<usize>,
    pub params: usize,
    pub macs: usize,
    pub se: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub model: String,
    pub input: [usize; 3],
    pub layers: Vec<LayerRow>,
    pub params: usize,
    pub macs: usize,
    pub se_params: usize,
    pub se_macs: usize,
}

fn layer_name(l: &Layer) -> String {
    match l {
        Layer::Conv2d { c_in, c_out, kernel, stride, groups: 1, .. } => {
            format!("Conv2d {c_in}→{c_out} {kernel}x{kernel}/{stride}")
        }
        Layer::Conv2d { c_in, c_out, kernel, stride, groups, .. } => {
            format!("Conv2d {c_in}→{c_out} {kernel}x{kernel}/{stride} g{groups}")
        }
        Layer::BatchNorm2d { c } => format!("BatchNorm2d {c}"),
        Layer::Relu => "ReLU".into(),
        Layer::MaxPool2d { kernel, stride, ceil: false, .. } => format!("MaxPool2d {kernel}x{kernel}/{stride}"),
        Layer::MaxPool2d { kernel, stride, ceil: true, .. } => format!("MaxPool2d {kernel}x{kernel}/{stride} ceil"),
        Layer::SeBlock { c, hidden, .. } => format!("SE {c}→{hidden}→{c}"),
        Layer::GlobalAvgPool => "AdaptiveAvgPool2d 1".into(),
        Layer::Linear { in_features, out_features, .. } => format!("Linear {in_features}→{out_features}"),
        Layer::Add => "Add".into(),
    }
}

/// Per-image figures of every layer of `graph`.
pub fn summarize(model: &str, graph: &Graph) -> Result<Summary> {
    let shapes = graph.shapes(1)?;
    let params = graph.parameters();
    let mut layers = Vec::new();
    for (k, node) in graph.nodes.iter().enumerate() {
        let inp = &shapes[node.inputs[0]];
        let out = &shapes[k + 1];
        let prefix = format!("{}.", node.name);
        let p: usize =
            params.iter().filter(|p| p.name.starts_with(&prefix)).map(|p| p.shape.iter().product::<usize>()).sum();
        let macs = match node.layer {
            Layer::Conv2d { .. } => conv_config(&node.layer, inp).map_or(0, |c| c.macs()),
            Layer::Linear { in_features, out_features, .. } => in_features * out_features,
            Layer::SeBlock { c, hidden, .. } => 2 * c * hidden + out[1..].iter().product::<usize>(),
            _ => 0,
        };
        layers.push(LayerRow {
            name: node.name.clone(),
            layer: layer_name(&node.layer),
            output: out[1..].to_vec(),
            params: p,
            macs,
            se: matches!(node.layer, Layer::SeBlock { .. }),
        });
    }
    let sum = |f: &dyn Fn(&LayerRow) -> usize| layers.iter().map(f).sum::<usize>();
    Ok(Summary {
        model: model.to_string(),
        input: graph.input,
        params: sum(&|l| l.params),
        macs: sum(&|l| l.macs),
        se_params: sum(&|l| if l.se { l.params } else { 0 }),
        se_macs: sum(&|l| if l.se { l.macs } else { 0 }),
        layers,
    })
}

pub fn summary(cfg: &ModelConfig) -> Result<Summary> {
    summarize(&cfg.model, &cfg.graph()?)
}

/// The SENet paper's figures for the models it reports, at `hw`×`hw`: (parameters, GFLOPs),
/// as the model's family has them.
pub fn paper_figures(model: &str, hw: usize) -> Option<(f64, f64)> {
    registry::family(model)?.paper_figures(model, hw)
}

pub fn format_summary(s: &Summary) -> String {
    let mut out = format!("{} on {}x{}x{}\n\n", s.model, s.input[0], s.input[1], s.input[2]);
    out += &format!("{:<28} {:<26} {:>16} {:>11} {:>14}\n", "layer", "type", "output", "params", "mult-adds");
    for l in &s.layers {
        out += &format!(
            "{:<28} {:<26} {:>16} {:>11} {:>14}\n",
            l.name,
            l.layer,
            format!("{:?}", l.output),
            l.params,
            l.macs
        );
    }
    out += &format!(
        "\ntotal: {} parameters ({:.2} M), {:.3} G multiply-adds per image\n",
        s.params,
        s.params as f64 / 1e6,
        s.macs as f64 / 1e9
    );
    if s.se_params > 0 {
        let base_p = s.params - s.se_params;
        let base_m = s.macs - s.se_macs;
        out += &format!(
            "SE blocks: +{} parameters (+{:.2} % over the model without them), +{} multiply-adds (+{:.3} %)\n",
            s.se_params,
            100.0 * s.se_params as f64 / base_p as f64,
            s.se_macs,
            100.0 * s.se_macs as f64 / base_m as f64
        );
    }
    if let Some((p, g)) = paper_figures(&s.model, s.input[1]) {
        out += &format!(
            "the paper: ~{:.1} M parameters, {g} GFLOPs (SE-ResNet-50: +0.26 % FLOPs, ~+10 % parameters)\n",
            p / 1e6
        );
    }
    out
}
