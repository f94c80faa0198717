//! ONNX export: a checkpoint's eval-mode network as an ONNX model that onnxruntime, TensorRT,
//! OpenVINO or a browser runs without Python.
//!
//! The graph is built from the same [`Graph`] of layer nodes the GPU plan and the CPU reference
//! walk, one ONNX node (or a few) per layer:
//!
//! ```text
//! Conv2d        Conv(x, W[, B])             kernel_shape, strides, pads
//! BatchNorm2d   BatchNormalization(x, weight, bias, running_mean, running_var)   epsilon 1e-5
//! Relu          Relu
//! MaxPool2d     MaxPool                     kernel_shape, strides, pads, ceil_mode when set
//! SeBlock       GlobalAveragePool | GlobalMaxPool → Conv(fc1) → Relu → Conv(fc2)
//!               → Sigmoid | Tanh | Relu → Mul(x, gate)   (fc1/fc2 weights are [o, i, 1, 1])
//! GlobalAvgPool GlobalAveragePool → Flatten(axis 1)
//! Linear        Gemm(x, W[, B], transB = 1)
//! Add           Add
//! ```
//!
//! Input `input` is `[batch, C, height, width]` with `batch`, `height` and `width` symbolic (as
//! `torch.onnx.export` with `dynamic_axes` writes them): every model here ends in global pooling,
//! so it takes any size its strides and pools leave at least one pixel of. The size it was
//! trained at stays in the metadata (`model_config.input_hw`, and `input_size` as "HxW"). Output
//! `logits` is `[batch, classes]`; the input is what the network sees, i.e. pixels / 255 then
//! normalised per channel with the `normalize` of the model configuration (kept in the metadata).
//!
//! Batch norm is exported as `BatchNormalization`, not folded into the preceding convolution:
//! every initializer is then a state-dict tensor under its PyTorch name and shape, so the file
//! can be checked against (or loaded back into) the checkpoint name by name; the base SENet's
//! SE block sits between its last conv and that conv's BN (features.15 → 16 → 17), where folding
//! would not apply anyway; and onnxruntime, TensorRT and OpenVINO fold BN into the conv
//! themselves when they optimise the graph, so folding here would buy no speed.
//! `num_batches_tracked` is the only state-dict tensor left out: eval mode never reads it.
//!
//! The file is written through prost with the message types generated from onnx.proto
//! ([`proto`]), atomically (temporary file, fsync, rename), as checkpoints are.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto;

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use prost::Message;

use crate::checkpoint::{self, StateDict, Value};
use crate::eval;
use crate::hparams as hp;
use crate::model::{Graph, ModelConfig};
use crate::ops::layer::{Attr, OnnxNode, OnnxNodes};
use proto::tensor_shape_proto::{Dimension, dimension};
use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_proto::DataType, type_proto,
};

/// The opset written when `--opset` is not given (torch.onnx's default too).
pub const DEFAULT_OPSET: i64 = 17;
/// Opsets we can write: from 11 (Gemm's bias optional) to 22, which every op used here has in
/// the same form (onnxruntime 1.20+ reads them all).
pub const OPSETS: std::ops::RangeInclusive<i64> = 11..=22;

/// Metadata keys (`ModelProto.metadata_props`).
pub const META_VERSION: &str = "senet_wgpu_version";
pub const META_CONFIG: &str = "model_config";
pub const META_CLASSES: &str = "classes";
/// The input size the model was trained (or exported) for, "HxW": the graph itself takes any size.
pub const META_INPUT_SIZE: &str = "input_size";

/// `senet export`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExportArgs {
    /// A safetensors state dict (config from config.json beside it, else flags, else the shapes).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Where to write the ONNX model.
    #[arg(long)]
    pub out: PathBuf,
    /// ONNX opset version (11 to 22).
    #[arg(long, default_value_t = DEFAULT_OPSET)]
    pub opset: i64,
    /// Input size (`32` or `HxW`) recorded as the model's size and checked to fit [default: the
    /// run's config.json, else 32]; the batch and spatial dimensions of the graph are dynamic.
    #[arg(long, value_parser = crate::args::parse_image_size)]
    pub image_size: Option<[usize; 2]>,
    /// Model width when there is no config.json beside the checkpoint.
    #[arg(long)]
    pub width: Option<f64>,
    /// SE reduction when there is no config.json beside the checkpoint.
    #[arg(long)]
    pub reduction: Option<usize>,
}

/// What `senet export` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    pub bytes: usize,
    pub opset: i64,
    pub nodes: usize,
    pub initializers: usize,
    pub config: ModelConfig,
}

/// Read the checkpoint as `eval` does, build the ONNX model, write it atomically to `--out`.
pub fn export(args: &ExportArgs) -> Result<ExportReport> {
    check_opset(args.opset)?;
    let (config, sd) = load_checkpoint(args)?;
    let model = onnx_model(&config, &sd, args.opset, &args.checkpoint.display().to_string())?;
    let bytes = model.encode_to_vec();
    checkpoint::write_atomic(&args.out, &bytes)
        .with_context(|| format!("--out {}: cannot write the ONNX model", args.out.display()))?;
    let graph = model.graph.as_ref().map(|g| (g.node.len(), g.initializer.len())).unwrap_or_default();
    Ok(ExportReport {
        out: args.out.clone(),
        bytes: bytes.len(),
        opset: args.opset,
        nodes: graph.0,
        initializers: graph.1,
        config,
    })
}

/// Read the checkpoint and its configuration as `eval` and `predict` do, through their function
/// (config.json beside it, else the flags over what the tensor shapes say); `--image-size`, when
/// given, is the size the graph is exported for even where config.json says another.
fn load_checkpoint(args: &ExportArgs) -> Result<(ModelConfig, StateDict)> {
    let sd = checkpoint::load(&args.checkpoint)?;
    let hw = args.image_size.unwrap_or([hp::IMAGE_SIZE; 2]);
    let mut config = eval::checkpoint_config(&args.checkpoint, &sd, hw, args.width, args.reduction)?;
    if let Some(hw) = args.image_size {
        config.input_hw = hw;
    }
    Ok((config, sd))
}

fn check_opset(opset: i64) -> Result<()> {
    ensure!(OPSETS.contains(&opset), "--opset {opset} is not supported: choose {} to {}", OPSETS.start(), OPSETS.end());
    Ok(())
}

/// The ONNX IR version that goes with an opset (onnx's VERSION_TABLE): the oldest that has it,
/// so older runtimes read the file.
pub fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=10 => 5,
        11 => 6,
        12..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

/// The eval-mode network of `config` with the weights of `sd` as an ONNX model (`what` names the
/// checkpoint in errors). The state dict must be exactly the model's, as for `eval`.
pub fn onnx_model(config: &ModelConfig, sd: &StateDict, opset: i64, what: &str) -> Result<ModelProto> {
    check_opset(opset)?;
    let too_small =
        || format!("the model cannot take {}x{} images (--image-size)", config.input_hw[0], config.input_hw[1]);
    let graph = config.graph().with_context(too_small)?;
    onnx_graph_model(config, &graph, sd, opset, what)
}

/// [`onnx_model`] of an explicit `graph` (a layer list no model name builds); `config` supplies
/// the metadata and the input size.
pub fn onnx_graph_model(
    config: &ModelConfig,
    graph: &Graph,
    sd: &StateDict,
    opset: i64,
    what: &str,
) -> Result<ModelProto> {
    check_opset(opset)?;
    let too_small =
        || format!("the model cannot take {}x{} images (--image-size)", config.input_hw[0], config.input_hw[1]);
    let shapes = graph.shapes(1).with_context(too_small)?;
    checkpoint::check_fits(graph, config, sd, what)?;
    let mut g = GraphProto { name: Some(config.model.clone()), ..Default::default() };
    g.initializer = initializers(graph, sd, what)?;
    g.node = nodes(graph);
    let classes = shapes.last().map(|s| s[1]).context("the model has no layers")?;
    (g.input, g.output) = inputs_and_outputs(graph, classes);
    Ok(ModelProto {
        ir_version: Some(ir_version(opset)),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        producer_name: Some("senet-wgpu".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        doc_string: Some(format!("{} in eval mode, exported by senet-wgpu", config.model)),
        graph: Some(g),
        metadata_props: metadata(config, graph, classes)?,
        ..Default::default()
    })
}

/// Every parameter and running statistic, under its state-dict name.
fn initializers(graph: &Graph, sd: &StateDict, what: &str) -> Result<Vec<TensorProto>> {
    let mut out = Vec::new();
    for p in graph.parameters() {
        out.push(initializer(&p.name, sd, what)?);
    }
    for (name, _) in graph.batch_norms() {
        for stat in ["running_mean", "running_var"] {
            out.push(initializer(&format!("{name}.{stat}"), sd, what)?);
        }
    }
    Ok(out)
}

/// Each layer's ONNX nodes, in graph order, as its op writes them.
fn nodes(graph: &Graph) -> Vec<NodeProto> {
    // Activation k (0 = the input, k = output of node k-1) is named after the layer that makes it.
    let last = graph.nodes.len();
    let act = |k: usize| -> String {
        match k {
            0 => "input".into(),
            k if k == last => "logits".into(),
            k => graph.nodes[k - 1].name.clone(),
        }
    };
    let mut out = Vec::new();
    for (k, node) in graph.nodes.iter().enumerate() {
        let mut o = OnnxNodes {
            name: &node.name,
            inputs: node.inputs.iter().map(|&i| act(i)).collect(),
            output: act(k + 1),
            nodes: Vec::new(),
        };
        node.layer.op().onnx(&mut o);
        out.extend(o.nodes.into_iter().map(node_proto));
    }
    out
}

/// The graph's input (batch, height and width symbolic) and its `classes` logits.
fn inputs_and_outputs(graph: &Graph, classes: usize) -> (Vec<ValueInfoProto>, Vec<ValueInfoProto>) {
    let [c, h, w] = graph.input;
    let symbolic = |name: &str| Dimension { value: Some(dimension::Value::DimParam(name.into())), denotation: None };
    let fixed = |v: usize| Dimension { value: Some(dimension::Value::DimValue(v as i64)), denotation: None };
    let input = value_info(
        "input",
        vec![symbolic("batch"), fixed(c), symbolic("height"), symbolic("width")],
        &format!(
            "images [batch, C, height, width] (trained at {h}x{w}; any size the network's strides leave a pixel of): \
             pixels / 255, then (x - mean) / std per channel with model_config.normalize"
        ),
    );
    let output =
        value_info("logits", vec![symbolic("batch"), fixed(classes)], "unnormalised class scores [batch, classes]");
    (vec![input], vec![output])
}

/// `metadata_props`: our version, the model configuration, the class names (`class i` where the
/// configuration has none) and the input size it was trained at.
fn metadata(config: &ModelConfig, graph: &Graph, classes: usize) -> Result<Vec<StringStringEntryProto>> {
    let [_, h, w] = graph.input;
    let class_names: Vec<String> = if config.classes.is_empty() {
        (0..classes).map(|i| format!("class {i}")).collect()
    } else {
        config.classes.clone()
    };
    let meta = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    Ok(vec![
        meta(META_VERSION, env!("CARGO_PKG_VERSION").into()),
        meta(META_CONFIG, serde_json::to_string(config)?),
        meta(META_CLASSES, serde_json::to_string(&class_names)?),
        meta(META_INPUT_SIZE, format!("{h}x{w}")),
    ])
}

/// A float32 state-dict tensor as an initializer of the same name (little-endian raw data).
fn initializer(name: &str, sd: &StateDict, what: &str) -> Result<TensorProto> {
    let e = sd.get(name).with_context(|| format!("{what}: no tensor {name}"))?;
    let Value::F32(v) = &e.value else { bail!("{what}: tensor {name} is I64; expected F32") };
    let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    Ok(TensorProto {
        name: Some(name.into()),
        dims: e.shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(raw),
        ..Default::default()
    })
}

fn value_info(name: &str, dims: Vec<Dimension>, doc: &str) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            denotation: None,
        }),
        doc_string: Some(doc.into()),
        ..Default::default()
    }
}

/// A layer's ONNX node as the protobuf holds it.
fn node_proto(n: OnnxNode) -> NodeProto {
    let attribute = n
        .attrs
        .into_iter()
        .map(|(name, a)| match a {
            Attr::Int(i) => attr_int(name, i),
            Attr::Ints(v) => attr_ints(name, v),
            Attr::Float(f) => attr_float(name, f),
        })
        .collect();
    NodeProto {
        name: Some(n.name),
        op_type: Some(n.op_type.into()),
        input: n.inputs,
        output: vec![n.output],
        attribute,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto { name: Some(name.into()), r#type: Some(AttributeType::Ints as i32), ints, ..Default::default() }
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(i),
        ..Default::default()
    }
}

fn attr_float(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(f),
        ..Default::default()
    }
}
