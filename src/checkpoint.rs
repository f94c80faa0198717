//! Checkpoints as safetensors with PyTorch `state_dict` names and shapes: float32 parameters
//! and running statistics, int64 `num_batches_tracked` — loadable by
//! `safetensors.torch.load_file` + `load_state_dict`. Written atomically (temporary file in the
//! same folder, synced, renamed), so a crash mid-write leaves the previous file intact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use safetensors::tensor::{Dtype, TensorView};

pub use crate::files::write_atomic;
use crate::model::ModelConfig;
use crate::model::plan::Network;
use crate::model::senet::scaled;

/// One tensor of a state dict.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub shape: Vec<usize>,
    pub value: Value,
}

/// Name → tensor, in name order.
pub type StateDict = BTreeMap<String, Entry>;

/// Read the network's state dict back from the GPU.
pub fn state_dict(net: &Network) -> Result<StateDict> {
    let mut sd = StateDict::new();
    for p in &net.params {
        sd.insert(
            p.spec.name.clone(),
            Entry { shape: p.spec.shape.clone(), value: Value::F32(p.value.read(&net.gpu)?) },
        );
    }
    for b in &net.bn {
        let c = b.running_mean.numel();
        sd.insert(
            format!("{}.running_mean", b.name),
            Entry { shape: vec![c], value: Value::F32(b.running_mean.read(&net.gpu)?) },
        );
        sd.insert(
            format!("{}.running_var", b.name),
            Entry { shape: vec![c], value: Value::F32(b.running_var.read(&net.gpu)?) },
        );
        sd.insert(
            format!("{}.num_batches_tracked", b.name),
            Entry { shape: vec![], value: Value::I64(vec![b.num_batches_tracked]) },
        );
    }
    Ok(sd)
}

/// Serialise a state dict to safetensors bytes.
pub fn to_bytes(sd: &StateDict) -> Result<Vec<u8>> {
    to_bytes_with(sd, None)
}

/// Serialise with safetensors' string metadata.
fn to_bytes_with(sd: &StateDict, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = sd
        .iter()
        .map(|(name, e)| match &e.value {
            Value::F32(v) => (name.clone(), Dtype::F32, e.shape.clone(), bytemuck::cast_slice(v).to_vec()),
            Value::I64(v) => (name.clone(), Dtype::I64, e.shape.clone(), bytemuck::cast_slice(v).to_vec()),
        })
        .collect();
    let views = raw
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}

pub fn save(net: &Network, path: &Path) -> Result<()> {
    write_atomic(path, &to_bytes(&state_dict(net)?)?)
}

/// Parse safetensors bytes (f32 and i64 tensors; f64/f16/bf16 are refused with their name).
pub fn from_bytes(bytes: &[u8], what: &str) -> Result<StateDict> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .with_context(|| format!("{what}: not a readable safetensors file"))?;
    let mut sd = StateDict::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let value = match view.dtype() {
            Dtype::F32 => {
                Value::F32(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Dtype::I64 => {
                Value::I64(data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
            }
            other => bail!("{what}: tensor {name} is {other:?}; expected F32 (or I64 for num_batches_tracked)"),
        };
        sd.insert(name, Entry { shape: view.shape().to_vec(), value });
    }
    Ok(sd)
}

pub fn load(path: &Path) -> Result<StateDict> {
    let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    from_bytes(&bytes, &path.display().to_string())
}

/// Copy a state dict into the network. Every name must match with its shape; `what` names the
/// source in errors.
pub fn apply(net: &mut Network, sd: &StateDict, what: &str) -> Result<()> {
    let want = state_dict_shapes(net);
    let missing: Vec<&String> = want.keys().filter(|k| !sd.contains_key(*k)).collect();
    let extra: Vec<&String> = sd.keys().filter(|k| !want.contains_key(*k)).collect();
    ensure!(missing.is_empty(), "{what}: missing tensors {missing:?} for a model {:?}", describe(&net.config));
    ensure!(extra.is_empty(), "{what}: unexpected tensors {extra:?}; not part of {:?}", describe(&net.config));
    let wrong: Vec<String> = want
        .iter()
        .filter(|(name, shape)| &sd[*name].shape != *shape)
        .map(|(name, shape)| format!("tensor {name} has shape {:?}, expected {shape:?}", sd[name].shape))
        .collect();
    if !wrong.is_empty() {
        let fits = infer_config(sd, net.config.input_hw, what)
            .map(|c| format!("; the checkpoint fits a model {}", describe(&c)))
            .unwrap_or_default();
        bail!("{what}: does not fit the model {}: {}{fits}", describe(&net.config), wrong.join("; "));
    }
    let gpu = net.gpu.clone();
    for p in &net.params {
        match &sd[&p.spec.name].value {
            Value::F32(v) => p.value.write(&gpu, v)?,
            Value::I64(_) => bail!("{what}: tensor {} is I64; expected F32", p.spec.name),
        }
    }
    for b in &mut net.bn {
        for (t, key) in [(&b.running_mean, "running_mean"), (&b.running_var, "running_var")] {
            match &sd[&format!("{}.{key}", b.name)].value {
                Value::F32(v) => t.write(&gpu, v)?,
                Value::I64(_) => bail!("{what}: tensor {}.{key} is I64; expected F32", b.name),
            }
        }
        b.num_batches_tracked = match &sd[&format!("{}.num_batches_tracked", b.name)].value {
            Value::I64(v) => v.first().copied().unwrap_or(0),
            Value::F32(v) => v.first().copied().unwrap_or(0.0) as i64,
        };
    }
    Ok(())
}

fn state_dict_shapes(net: &Network) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    for p in &net.params {
        m.insert(p.spec.name.clone(), p.spec.shape.clone());
    }
    for b in &net.bn {
        let c = b.running_mean.numel();
        m.insert(format!("{}.running_mean", b.name), vec![c]);
        m.insert(format!("{}.running_var", b.name), vec![c]);
        m.insert(format!("{}.num_batches_tracked", b.name), vec![]);
    }
    m
}

fn describe(c: &ModelConfig) -> String {
    format!(
        "{} width {} reduction {} in_channels {} classes {}",
        c.model, c.width, c.reduction, c.in_channels, c.num_classes
    )
}

/// A model's configuration read off a state dict's names and shapes, for a bare state dict with
/// no config.json beside it. The base SENet: width from `features.0.weight`, reduction from the
/// SE block, classes from the classifier. A (SE-)ResNet: CIFAR (3x3 stem) or ImageNet (7x7 stem)
/// from `conv1.weight`, the depth from the blocks per stage and bottlenecks (`conv3`), the width
/// from the stem's channels, SE stages, reduction and biases from the `se` tensors (placement is
/// taken as standard: the others leave the same names). `input_hw` comes from the data.
pub fn infer_config(sd: &StateDict, input_hw: [usize; 2], what: &str) -> Result<ModelConfig> {
    let shape = |name: &str| -> Result<&Vec<usize>> {
        sd.get(name).map(|e| &e.shape).with_context(|| {
            format!(
                "{what}: no tensor {name}; cannot infer the model (expected a base SENet or a (SE-)ResNet state \
                 dict; with another, give the run's config.json beside it)"
            )
        })
    };
    let mut cfg = ModelConfig {
        model: "senet".into(),
        width: 1.0,
        reduction: 16,
        in_channels: 0,
        num_classes: 0,
        input_hw,
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
    };
    if sd.contains_key("conv1.weight") {
        let stem = shape("conv1.weight")?;
        let fc = shape("fc.weight")?;
        ensure!(stem.len() == 4 && fc.len() == 2, "{what}: unexpected ranks for a ResNet's conv1 / fc");
        let imagenet = stem[2] == 7;
        let stages = if imagenet { 4 } else { 3 };
        let blocks: Vec<usize> = (1..=stages)
            .map(|s| (0..).take_while(|b| sd.contains_key(&format!("layer{s}.{b}.conv1.weight"))).count())
            .collect();
        let bottleneck = sd.contains_key("layer1.0.conv3.weight");
        let depth = if imagenet {
            match (blocks.as_slice(), bottleneck) {
                ([2, 2, 2, 2], false) => 18,
                ([3, 4, 6, 3], false) => 34,
                ([3, 4, 6, 3], true) => 50,
                ([3, 4, 23, 3], true) => 101,
                ([3, 8, 36, 3], true) => 152,
                _ => bail!("{what}: ImageNet ResNet blocks per stage {blocks:?} match no depth of 18/34/50/101/152"),
            }
        } else {
            ensure!(
                blocks[0] >= 1 && blocks.iter().all(|&b| b == blocks[0]),
                "{what}: CIFAR ResNet blocks per stage {blocks:?} should be equal"
            );
            6 * blocks[0] + 2
        };
        let se_blocks: Vec<(usize, usize)> = (1..=stages)
            .flat_map(|s| (0..blocks[s - 1]).map(move |b| (s, b)))
            .filter(|(s, b)| sd.contains_key(&format!("layer{s}.{b}.se.fc1.weight")))
            .collect();
        cfg.model = format!("{}resnet{depth}", if se_blocks.is_empty() { "" } else { "se-" });
        cfg.width = stem[0] as f64 / if imagenet { 64.0 } else { 16.0 };
        cfg.in_channels = stem[1];
        cfg.num_classes = fc[0];
        if let Some(&(s, b)) = se_blocks.first() {
            let fc1 = shape(&format!("layer{s}.{b}.se.fc1.weight"))?;
            ensure!(fc1.len() == 4 && fc1[0] >= 1, "{what}: layer{s}.{b}.se.fc1.weight has shape {fc1:?}");
            cfg.reduction = fc1[1] / fc1[0];
            cfg.se_bias = sd.contains_key(&format!("layer{s}.{b}.se.fc1.bias"));
            let mut with_se: Vec<usize> = se_blocks.iter().map(|&(s, _)| s).collect();
            with_se.dedup();
            if with_se.len() < stages {
                cfg.se.stages = with_se;
            }
        }
        return Ok(cfg);
    }
    let conv0 = shape("features.0.weight")?;
    let fc1 = shape("features.16.fc1.weight")?;
    let cls = shape("classifier.0.weight")?;
    ensure!(conv0.len() == 4 && fc1.len() == 4 && cls.len() == 2, "{what}: unexpected ranks for a base SENet");
    let width = conv0[0] as f64 / 64.0;
    let c5 = scaled(1024, width);
    ensure!(fc1[1] == c5, "{what}: features.16.fc1.weight {fc1:?} does not fit width {width} (expected {c5} channels)");
    ensure!(fc1[0] >= 1, "{what}: features.16.fc1.weight has no hidden units");
    cfg.width = width;
    cfg.reduction = c5 / fc1[0];
    cfg.in_channels = conv0[1];
    cfg.num_classes = cls[0];
    cfg.se_bias = sd.contains_key("features.16.fc1.bias");
    Ok(cfg)
}

/// Name of optimizer state tensor `k` of parameter `name` in a resume file.
fn optim_name(k: usize, name: &str) -> String {
    format!("optimizer.state{k}.{name}")
}

/// Everything `--resume` needs in one atomically written file: the state dict, every optimizer
/// state tensor, the optimizer step, and the caller's `metadata` (strings).
pub fn save_resume(net: &Network, mut metadata: HashMap<String, String>, path: &Path) -> Result<()> {
    let mut sd = state_dict(net)?;
    for p in &net.params {
        for (k, t) in p.state.iter().enumerate() {
            sd.insert(
                optim_name(k, &p.spec.name),
                Entry { shape: p.spec.shape.clone(), value: Value::F32(t.read(&net.gpu)?) },
            );
        }
    }
    metadata.insert("optimizer_step".into(), net.step.to_string());
    if let Some(s) = &net.scaler {
        let st = s.read(&net.gpu)?;
        metadata.insert("loss_scale".into(), st.scale.to_string());
        metadata.insert("loss_scale_growth_tracker".into(), st.growth_tracker.to_string());
        metadata.insert("loss_scale_optimizer_steps".into(), st.steps.to_string());
        metadata.insert("loss_scale_skipped_steps".into(), st.skipped.to_string());
        metadata.insert("loss_scale_skipped_in_a_row".into(), st.skipped_in_a_row.to_string());
    }
    write_atomic(path, &to_bytes_with(&sd, Some(metadata))?)
}

/// Restore what [`save_resume`] wrote into `net`; returns the caller's metadata.
pub fn load_resume(path: &Path, net: &mut Network) -> Result<HashMap<String, String>> {
    let what = path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("--resume: reading {what}"))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{what}: not a readable safetensors file"))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut sd = from_bytes(&bytes, &what)?;
    let gpu = net.gpu.clone();
    for p in &net.params {
        for (k, t) in p.state.iter().enumerate() {
            let key = optim_name(k, &p.spec.name);
            match sd.remove(&key) {
                Some(Entry { shape, value: Value::F32(v) }) if shape == p.spec.shape => t.write(&gpu, &v)?,
                Some(e) => bail!("{what}: {key} has shape {:?}, expected {:?} as F32", e.shape, p.spec.shape),
                None => bail!("{what}: no optimizer state {key} (was the run made with another optimizer?)"),
            }
        }
    }
    apply(net, &sd, &what)?;
    net.step = metadata
        .get("optimizer_step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{what}: metadata field optimizer_step missing or not a number"))?;
    if let Some(s) = &net.scaler {
        fn field<T: std::str::FromStr>(metadata: &HashMap<String, String>, what: &str, k: &str) -> Result<T> {
            metadata.get(k).and_then(|v| v.parse::<T>().ok()).with_context(|| {
                format!("{what}: metadata field {k} missing or not a number (an f16 run saves its loss scaler)")
            })
        }
        let scale: f32 = field(&metadata, &what, "loss_scale")?;
        ensure!(scale.is_finite() && scale > 0.0, "{what}: metadata field loss_scale is {scale}, expected > 0");
        let st = crate::ops::grad_scaler::ScalerState {
            scale,
            growth_tracker: field(&metadata, &what, "loss_scale_growth_tracker")?,
            steps: field(&metadata, &what, "loss_scale_optimizer_steps")?,
            skipped: field(&metadata, &what, "loss_scale_skipped_steps")?,
            skipped_in_a_row: field(&metadata, &what, "loss_scale_skipped_in_a_row")?,
            found_inf: false,
        };
        s.write(&gpu, &st)?;
    }
    Ok(metadata)
}
