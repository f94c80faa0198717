//! Checkpoints as safetensors with PyTorch `state_dict` names and shapes: float32 parameters
//! and running statistics, int64 `num_batches_tracked` — loadable by
//! `safetensors.torch.load_file` + `load_state_dict`. Written atomically (temporary file in the
//! same folder, synced, renamed), so a crash mid-write leaves the previous file intact.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use safetensors::tensor::{Dtype, TensorView};

pub use crate::files::write_atomic;
use crate::model::plan::Network;
use crate::model::registry::{self, Shapes};
use crate::model::{Graph, Layer, Linear, ModelConfig};

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

/// `--model-ema`: the EMA's state dict (the model's names and shapes), read back from the GPU;
/// None without an EMA.
pub fn ema_state_dict(net: &Network) -> Result<Option<StateDict>> {
    let Some(ema) = &net.ema else { return Ok(None) };
    let values = ema.values.read::<f32>(&net.gpu)?;
    let bn = ema.bn.read::<f32>(&net.gpu)?;
    let mut sd = StateDict::new();
    for p in &net.params {
        let v = values[p.start..p.start + p.value.numel()].to_vec();
        sd.insert(p.spec.name.clone(), Entry { shape: p.spec.shape.clone(), value: Value::F32(v) });
    }
    // The running statistics sit at the same places of the EMA's flat buffer as of the model's.
    let start = |t: &crate::gpu::Tensor| ((t.offset - net.bn_flat.offset) / 4) as usize;
    for (b, &count) in net.bn.iter().zip(&ema.num_batches_tracked) {
        for (t, key) in [(&b.running_mean, "running_mean"), (&b.running_var, "running_var")] {
            let (s, c) = (start(t), t.numel());
            sd.insert(format!("{}.{key}", b.name), Entry { shape: vec![c], value: Value::F32(bn[s..s + c].to_vec()) });
        }
        sd.insert(format!("{}.num_batches_tracked", b.name), Entry { shape: vec![], value: Value::I64(vec![count]) });
    }
    Ok(Some(sd))
}

/// Write `sd` into the network's EMA (as [`ema_state_dict`] reads it).
fn apply_ema(net: &mut Network, sd: &StateDict, what: &str) -> Result<()> {
    check_fits(&net.graph, &net.config, sd, what)?;
    let gpu = net.gpu.clone();
    let bn_base = net.bn_flat.offset;
    let Some(ema) = &mut net.ema else { return Ok(()) };
    let mut values = vec![0.0f32; ema.values.numel()];
    for p in &net.params {
        match &sd[&p.spec.name].value {
            Value::F32(v) => values[p.start..p.start + v.len()].copy_from_slice(v),
            Value::I64(_) => bail!("{what}: tensor {} is I64; expected F32", p.spec.name),
        }
    }
    let mut bn = vec![0.0f32; ema.bn.numel()];
    for (b, count) in net.bn.iter().zip(&mut ema.num_batches_tracked) {
        for (t, key) in [(&b.running_mean, "running_mean"), (&b.running_var, "running_var")] {
            let s = ((t.offset - bn_base) / 4) as usize;
            match &sd[&format!("{}.{key}", b.name)].value {
                Value::F32(v) => bn[s..s + v.len()].copy_from_slice(v),
                Value::I64(_) => bail!("{what}: tensor {}.{key} is I64; expected F32", b.name),
            }
        }
        *count = match &sd[&format!("{}.num_batches_tracked", b.name)].value {
            Value::I64(v) => v.first().copied().unwrap_or(0),
            Value::F32(v) => v.first().copied().unwrap_or(0.0) as i64,
        };
    }
    ema.values.write(&gpu, &values)?;
    if !bn.is_empty() {
        ema.bn.write(&gpu, &bn)?;
    }
    Ok(())
}

/// `--model-ema`: save the EMA's state dict to `path` (a plain state dict, as [`save`]); nothing
/// without an EMA.
pub fn save_ema(net: &Network, path: &Path) -> Result<()> {
    match ema_state_dict(net)? {
        Some(sd) => write_atomic(path, &to_bytes(&sd)?),
        None => Ok(()),
    }
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

/// An IEEE half-precision value (bits) as f32, exactly (every f16 is an f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: shift the mantissa up until its leading one is the implicit bit.
            // man = 1.f × 2^(10 - lead), so the value is 1.f × 2^(-14 - lead).
            let lead = man.leading_zeros() - 21; // shifts that bring the leading one to bit 10
            sign | ((127 - 14 - lead) << 23) | (((man << lead) & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// Parse safetensors bytes: f32 and i64 tensors, and f16, bf16 and f64 ones converted to f32
/// (said once per file, on stderr); any other type is refused with its name.
pub fn from_bytes(bytes: &[u8], what: &str) -> Result<StateDict> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .with_context(|| format!("{what}: not a readable safetensors file"))?;
    let mut sd = StateDict::new();
    let mut converted = std::collections::BTreeSet::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let u16s = || data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]));
        let value = match view.dtype() {
            Dtype::F32 => {
                Value::F32(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Dtype::F16 => {
                converted.insert("F16");
                Value::F32(u16s().map(f16_to_f32).collect())
            }
            Dtype::BF16 => {
                converted.insert("BF16");
                Value::F32(u16s().map(|b| f32::from_bits(u32::from(b) << 16)).collect())
            }
            Dtype::F64 => {
                converted.insert("F64");
                let f64s = data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
                Value::F32(f64s.map(|v| v as f32).collect())
            }
            Dtype::I64 => {
                Value::I64(data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
            }
            other => bail!(
                "{what}: tensor {name} is {other:?}; expected F32, F16, BF16 or F64 (or I64 for num_batches_tracked)"
            ),
        };
        sd.insert(name, Entry { shape: view.shape().to_vec(), value });
    }
    if !converted.is_empty() {
        let kinds: Vec<&str> = converted.into_iter().collect();
        eprintln!("note: {what}: {} tensors converted to f32", kinds.join(", "));
    }
    Ok(sd)
}

pub fn load(path: &Path) -> Result<StateDict> {
    let bytes = std::fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    from_bytes(&bytes, &path.display().to_string())
}

/// Copy a state dict into the network. Every name must match with its shape ([`check_fits`]);
/// `what` names the source in errors.
pub fn apply(net: &mut Network, sd: &StateDict, what: &str) -> Result<()> {
    check_fits(&net.graph, &net.config, sd, what)?;
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

/// The state-dict names and shapes of a model: its parameters, and each batch norm's running
/// statistics and counter.
fn state_dict_shapes(graph: &Graph) -> BTreeMap<String, Vec<usize>> {
    let mut m: BTreeMap<String, Vec<usize>> = graph.parameters().into_iter().map(|p| (p.name, p.shape)).collect();
    for (name, c) in graph.batch_norms() {
        m.insert(format!("{name}.running_mean"), vec![c]);
        m.insert(format!("{name}.running_var"), vec![c]);
        m.insert(format!("{name}.num_batches_tracked"), vec![]);
    }
    m
}

/// A state dict must hold exactly the tensors of the model `graph` (built from `config`) with
/// their shapes: what `apply` demands before copying, and what `senet export` demands without a
/// GPU. Errors name the missing, unexpected or misshapen tensors, and say which model the
/// checkpoint's shapes fit.
pub fn check_fits(graph: &Graph, config: &ModelConfig, sd: &StateDict, what: &str) -> Result<()> {
    let want = state_dict_shapes(graph);
    let missing: Vec<&String> = want.keys().filter(|k| !sd.contains_key(*k)).collect();
    let extra: Vec<&String> = sd.keys().filter(|k| !want.contains_key(*k)).collect();
    ensure!(missing.is_empty(), "{what}: missing tensors {missing:?} for a model {:?}", describe(config));
    ensure!(extra.is_empty(), "{what}: unexpected tensors {extra:?}; not part of {:?}", describe(config));
    let wrong: Vec<String> = want
        .iter()
        .filter(|(name, shape)| &sd[*name].shape != *shape)
        .map(|(name, shape)| format!("tensor {name} has shape {:?}, expected {shape:?}", sd[name].shape))
        .collect();
    if !wrong.is_empty() {
        // What the shapes say instead, when they say something else than the model (they cannot
        // tell placements, gates or strides apart).
        let fits = infer_config(sd, config.input_hw, what)
            .ok()
            .map(|c| describe(&c))
            .filter(|c| *c != describe(config))
            .map(|c| format!("; the checkpoint fits a model {c}"))
            .unwrap_or_default();
        bail!("{what}: does not fit the model {}: {}{fits}", describe(config), wrong.join("; "));
    }
    Ok(())
}

/// What a state dict's shapes tell of a model: family and depth, width, SE widths, channels in
/// and out.
fn describe(c: &ModelConfig) -> String {
    let divisor = match c.se.divisor {
        0 => String::new(),
        d => format!(" (SE widths rounded to multiples of {d})"),
    };
    format!(
        "{} width {} reduction {}{divisor} in_channels {} classes {}",
        c.model, c.width, c.reduction, c.in_channels, c.num_classes
    )
}

/// The classifier of a graph: its last linear layer's name and (in, out) features.
fn classifier(graph: &Graph) -> Option<(&str, usize, usize)> {
    graph.nodes.iter().rev().find_map(|n| match n.layer {
        Layer::Linear(Linear { in_features, out_features, .. }) => Some((n.name.as_str(), in_features, out_features)),
        _ => None,
    })
}

/// [`apply`] for fine-tuning (`train --init`): a checkpoint whose classifier has another class
/// count than the network (a 1000-class ImageNet model for a 10-class folder) loads everything
/// else and leaves the network's freshly initialised classifier, as timm's `reset_classifier`
/// does; returns the note saying so (None when the classifier fitted). Anything else that does not
/// fit is [`check_fits`]'s error.
pub fn apply_init(net: &mut Network, sd: &StateDict, what: &str) -> Result<Option<String>> {
    let Some((name, in_features, classes)) = classifier(&net.graph).map(|(n, i, o)| (n.to_string(), i, o)) else {
        return apply(net, sd, what).map(|()| None);
    };
    let (w, b) = (format!("{name}.weight"), format!("{name}.bias"));
    let theirs = sd.get(&w).map(|e| e.shape.clone());
    let Some([their_classes, their_in]) = theirs.as_deref().and_then(|s| <[usize; 2]>::try_from(s).ok()) else {
        return apply(net, sd, what).map(|()| None);
    };
    if their_classes == classes || their_in != in_features {
        return apply(net, sd, what).map(|()| None);
    }
    // Their classifier replaced by ours (as initialised), the rest checked and copied as usual.
    let ours = state_dict(net)?;
    let mut sd = sd.clone();
    for key in [&w, &b] {
        match ours.get(key) {
            Some(e) => sd.insert(key.clone(), e.clone()),
            None => sd.remove(key),
        };
    }
    apply(net, &sd, what)?;
    Ok(Some(format!(
        "{what}: its classifier {name} has {their_classes} classes, the data {classes}: {name} is \
         re-initialised, every other tensor loaded"
    )))
}

/// A model's configuration read off a state dict's names and shapes, for a bare state dict with
/// no config.json beside it: the family whose tensors it holds ([`registry::claiming`]) reads
/// it. `input_hw` comes from the data.
pub fn infer_config(sd: &StateDict, input_hw: [usize; 2], what: &str) -> Result<ModelConfig> {
    let shapes: Shapes = sd.iter().map(|(k, e)| (k.clone(), e.shape.clone())).collect();
    let family = registry::claiming(&shapes).with_context(|| {
        format!(
            "{what}: cannot infer the model: none of conv1.weight and fc.weight (a (SE-)ResNet or ResNeXt), \
             layer0.conv3.weight and last_linear.weight (SENet-154), features.0.weight (the base SENet); with \
             another state dict, give the run's config.json beside it"
        )
    })?;
    let base = ModelConfig {
        model: String::new(),
        width: 1.0,
        reduction: 16,
        in_channels: 0,
        num_classes: 0,
        input_hw,
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
        block: Default::default(),
    };
    family.infer(&shapes, base, what)
}

/// A resume file's EMA tensors: the EMA's state dict under this prefix.
const EMA_PREFIX: &str = "ema.";
/// A resume file's accumulated gradients (saved inside a `--grad-accum-steps` group).
const ACCUM_PREFIX: &str = "grad_accum.";

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
    if let Some(ema) = ema_state_dict(net)? {
        sd.extend(ema.into_iter().map(|(k, v)| (format!("{EMA_PREFIX}{k}"), v)));
    }
    // Saved inside a --grad-accum-steps group: the gradients of its micro-batches so far.
    if let Some(acc) = net.accum.as_ref().filter(|_| net.accum_pending) {
        let flat = acc.accum.read::<f32>(&net.gpu)?;
        for p in &net.params {
            let v = flat[p.start..p.start + p.value.numel()].to_vec();
            sd.insert(
                format!("{ACCUM_PREFIX}{}", p.spec.name),
                Entry { shape: p.spec.shape.clone(), value: Value::F32(v) },
            );
        }
    }
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
    let ema: StateDict = sd
        .extract_if(.., |k, _| k.starts_with(EMA_PREFIX))
        .map(|(k, v)| (k[EMA_PREFIX.len()..].to_string(), v))
        .collect();
    let accum: StateDict = sd
        .extract_if(.., |k, _| k.starts_with(ACCUM_PREFIX))
        .map(|(k, v)| (k[ACCUM_PREFIX.len()..].to_string(), v))
        .collect();
    apply(net, &sd, &what)?;
    if net.ema.is_some() {
        ensure!(!ema.is_empty(), "{what}: no model EMA (ema.* tensors), but the run has --model-ema");
        apply_ema(net, &ema, &format!("{what} (its model EMA)"))?;
    }
    net.accum_pending = false;
    if !accum.is_empty() {
        let Some(acc) = &net.accum else {
            bail!("{what}: holds accumulated gradients (grad_accum.*) but the run has no --grad-accum-steps")
        };
        let mut flat = vec![0.0f32; acc.accum.numel()];
        for p in &net.params {
            match accum.get(&p.spec.name) {
                Some(Entry { shape, value: Value::F32(v) }) if *shape == p.spec.shape => {
                    flat[p.start..p.start + v.len()].copy_from_slice(v)
                }
                _ => bail!("{what}: {ACCUM_PREFIX}{} missing or not F32 of shape {:?}", p.spec.name, p.spec.shape),
            }
        }
        acc.accum.write(&gpu, &flat)?;
        net.accum_pending = true;
    }
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
