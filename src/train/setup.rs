//! Before the first step: the settings (`--resume`'s, checked against every rank's), the data,
//! the network and the run folder.

use std::sync::Arc;

use anyhow::{Context, Result, ensure};

use super::replicas;
use crate::args::TrainArgs;
use crate::data::Dataset;
use crate::data::loader::{self, Preprocess};
use crate::dist::{Collective, Dist};
use crate::gpu::{Gpu, Precision};
use crate::hparams as hp;
use crate::model::plan::Network;
use crate::model::registry::Family;
use crate::model::{BottleneckStride, ModelConfig};
use crate::run::{self, RunFolder, RunState};

/// `--init`: the model flags the command line leaves at their defaults (`given(field)` says which
/// it gives) take the checkpoint's model, as `eval` reads it — config.json beside the file, else
/// the shapes (a bare ImageNet bottleneck state dict as timm's, striding in the 3x3). Flags given
/// keep their values; [`crate::checkpoint::apply_init`] then says what does not fit. Returns the
/// line that says where the model came from.
pub fn model_from_init(args: &mut TrainArgs, given: impl Fn(&str) -> bool) -> Result<Option<String>> {
    let Some(init) = args.init.clone().filter(|_| args.resume.is_none()) else { return Ok(None) };
    let sd = crate::checkpoint::load(&init)?;
    let cfg = crate::eval::checkpoint_config(&init, &sd, [crate::hparams::IMAGE_SIZE; 2], None, None)
        .with_context(|| format!("--init {}: reading its model", init.display()))?;
    let net = &mut args.net;
    let mut taken = Vec::new();
    let mut take = |field: &str, set: &mut dyn FnMut()| {
        if !given(field) {
            set();
            taken.push(field.replace('_', "-"));
        }
    };
    take("model", &mut || net.model = cfg.model.clone());
    take("width", &mut || net.width = cfg.width);
    take("reduction", &mut || net.reduction = cfg.reduction);
    take("se_bias", &mut || net.se_bias = cfg.se_bias);
    take("squeeze", &mut || net.squeeze = cfg.se.squeeze);
    take("excitation", &mut || net.excitation = cfg.se.excitation);
    take("se_placement", &mut || net.se_placement = cfg.se.placement);
    take("se_stages", &mut || net.se_stages = cfg.se.stages.clone());
    take("se_divisor", &mut || net.se_divisor = Some(cfg.se.divisor));
    take("bottleneck_stride", &mut || net.bottleneck_stride = Some(cfg.block.stride));
    let bottlenecks = crate::model::resnet::parse_name(&net.model)
        .and_then(|(d, _)| crate::model::resnet::IMAGENET_TABLE.iter().find(|t| t.0 == d))
        .is_some_and(|t| t.1)
        || crate::model::resnext::parse_name(&net.model).is_some()
        || crate::model::senet154::Senet154.accepts(&net.model);
    // The flags as the model takes them (the family's conventions where a flag is not given).
    let resolved = net.config(1, [1, 1], 1, vec![]);
    let stride = match (bottlenecks, resolved.block.stride) {
        (false, _) => "",
        (true, BottleneckStride::Conv1x1) => ", bottlenecks striding in the 1x1",
        (true, BottleneckStride::Conv3x3) => ", bottlenecks striding in the 3x3",
    };
    Ok(Some(format!(
        "--init {}: model {} width {} reduction {}{}{}{stride} (from the checkpoint: {})",
        init.display(),
        net.model,
        net.width,
        net.reduction,
        if resolved.se.divisor > 0 {
            format!(" (SE widths multiples of {})", resolved.se.divisor)
        } else {
            String::new()
        },
        if resolved.se_bias { ", SE biases" } else { "" },
        if taken.is_empty() { "nothing, every model flag given".to_string() } else { taken.join(", ") }
    )))
}

/// The training, validation (`--val-split`) and test sets, and the model configuration they and
/// the flags make. Normalisation statistics come from the training images only.
pub(super) fn load_data(args: &TrainArgs) -> Result<(String, Dataset, Option<Dataset>, Dataset, ModelConfig)> {
    let splits = args.data.load(None)?;
    let mut train_set = splits.train;
    if let Some(n) = args.limit_train {
        ensure!(n >= 1, "--limit-train must be at least 1");
        train_set.truncate(n);
    }
    let val_set = match args.val_split {
        Some(v) => Some(train_set.hold_out(crate::args::val_count(v, train_set.len())?, args.seed)),
        None => None,
    };
    ensure!(
        splits.test.shape == train_set.shape,
        "test images {:?} differ from training images {:?}",
        splits.test.shape,
        train_set.shape
    );
    let [c, h, w] = train_set.shape;
    let mut config = args.net.config(c, [h, w], train_set.classes.len(), train_set.classes.clone());
    config.normalize = if !args.mean.is_empty() {
        ensure!(args.mean.len() == c, "--mean and --std give {} channels; the images have {c}", args.mean.len());
        Some(args.mean.iter().zip(&args.std).map(|(&m, &s)| (m as f32, s as f32)).collect())
    } else if train_set.files.is_some() {
        // Image folders: ImageNet's statistics (torchvision's and timm's default), unless
        // --no-normalize; a streamed folder's own statistics would cost a pass over every file.
        (!args.no_normalize)
            .then(|| hp::IMAGENET_MEAN.iter().zip(&hp::IMAGENET_STD).map(|(&m, &s)| (m as f32, s as f32)).collect())
    } else {
        args.normalize.then(|| loader::channel_stats(&train_set))
    };
    Ok((splits.name, train_set, val_set, splits.test, config))
}

/// The data pipeline's settings: the model's normalisation, `--augment` and, for image folders,
/// timm's `--aa` and `--reprob`.
pub(super) fn preprocess(args: &TrainArgs, config: &ModelConfig) -> Result<Preprocess> {
    let (aa, erase) = args.timm_augment(config.normalize.as_deref())?;
    Ok(Preprocess {
        normalize: config.normalize.clone(),
        augment: args.augment,
        aa,
        erase,
        load: args.data.load_options(),
    })
}

/// The data can be trained on as set: timm's augmentations only on image folders, the same
/// settings and data on every rank (`flags` as given, `args` as resolved), and at least one
/// training image per rank.
pub(super) fn check_training_data(
    flags: &TrainArgs,
    args: &TrainArgs,
    dataset: &str,
    train_set: &Dataset,
    test_set: &Dataset,
    pre: &Preprocess,
    dist: &Dist,
) -> Result<()> {
    ensure!(
        train_set.files.is_some() || (pre.aa.is_none() && pre.erase.is_none()),
        "--aa and --reprob augment image folders (--dataset folder); {dataset} is held in memory and augmented by \
         --augment's padded crop and flip only"
    );
    replicas::same_config_on_every_rank(dist, flags, args, dataset, train_set, test_set)?;
    if train_set.len() < dist.size {
        return Err(Collective(format!(
            "{} ranks but only {} training images: every rank needs at least one; use fewer ranks or more images",
            dist.size,
            train_set.len()
        ))
        .into());
    }
    Ok(())
}

/// The network `args` describe: drawn from `--seed`, or `--init`'s weights (rank 0 printing
/// what did not fit), with the loss (`soft_targets` for `--mixup`/`--cutmix`), `--sync-bn`,
/// clipping, gradient accumulation and the model EMA set.
pub(super) fn build_network(
    gpu: Arc<Gpu>,
    args: &TrainArgs,
    config: &ModelConfig,
    soft_targets: bool,
    dist: &Dist,
) -> Result<Network> {
    let mut net = Network::new_in(gpu, config.clone(), args.optimizer_config(), args.seed, args.precision)?;
    net.label_smoothing = args.label_smoothing as f32;
    net.soft_targets = soft_targets;
    // SyncBatchNorm only where there is more than one batch to merge; on one process --sync-bn
    // changes nothing (as PyTorch's SyncBatchNorm, which falls back to BatchNorm there).
    net.sync_bn = args.sync_bn && dist.size > 1;
    net.set_clip_grad_norm(args.clip_grad_norm)?;
    net.set_grad_accum_steps(args.grad_accum_steps)?;
    if let Some(init) = &args.init {
        let sd = crate::checkpoint::load(init)?;
        if let Some(note) = crate::checkpoint::apply_init(&mut net, &sd, &init.display().to_string())?
            && dist.is_root()
        {
            println!("note: {note}");
        }
    }
    // The EMA starts from the initial weights; --resume then restores the saved one.
    net.set_model_ema(args.model_ema_config())?;
    Ok(net)
}

/// A new run folder, or the `--resume`d one with `net` restored from it.
pub(super) fn open_run(
    args: &TrainArgs,
    config: &ModelConfig,
    dataset: &str,
    net: &mut Network,
) -> Result<(RunFolder, RunState)> {
    if args.resume.is_none() {
        return RunFolder::create(&args.out, config, args, dataset);
    }
    let (run, state) = RunFolder::resume(&args.out, net)?;
    println!(
        "resuming {} after epoch {}{} (optimizer step {})",
        args.out.display(),
        state.history.len(),
        state.partial.as_ref().map_or(String::new(), |(k, _)| format!(" and {k} steps of the next")),
        net.step
    );
    Ok((run, state))
}

/// `--resume`: rank 0 reads the run's settings and sends them (the folder need not be visible
/// to the other ranks). None without `--resume`.
pub(super) fn resumed_args(args: &TrainArgs, dist: &Dist) -> Result<Option<TrainArgs>> {
    let Some(dir) = &args.resume else { return Ok(None) };
    Ok(dist.from_root(|| run::resumed_args(args))?.map(|mut r| {
        // Not in the JSON (config.json never holds it): every rank's own flag.
        r.resume = Some(dir.clone());
        r
    }))
}

/// The flags one process takes and a data-parallel job does not yet. Collective: every rank has
/// the same flags (compared next) and stops here together.
pub(super) fn refuse_under_mpi(args: &TrainArgs, dist: &Dist) -> Result<()> {
    let not_yet = [
        (args.profile, "--profile"),
        (args.precision != Precision::F32, "--precision f16"),
        (args.val_split.is_some(), "--val-split"),
    ];
    match not_yet.iter().find(|(bad, _)| dist.size > 1 && *bad) {
        Some((_, what)) => Err(Collective(format!(
            "{what} is not supported under mpirun yet ({} ranks); run it as one process",
            dist.size
        ))
        .into()),
        None => Ok(()),
    }
}

/// Rank 0 opens (or resumes) the run folder; the others take its state, and every rank starts
/// from rank 0's weights and optimizer state (as DDP does), whatever its own init gave.
pub(super) fn open_run_on_every_rank(
    args: &TrainArgs,
    config: &ModelConfig,
    dataset: &str,
    net: &mut Network,
    dist: &Dist,
) -> Result<(Option<RunFolder>, RunState)> {
    let opened = if dist.is_root() { open_run(args, config, dataset, net).map(Some) } else { Ok(None) };
    let (mut run, root_state) = match dist.agree_with_root(opened)? {
        Some((run, state)) => (Some(run), Some(state)),
        None => (None, None),
    };
    let state = replicas::share_state(dist, root_state)?;
    if args.resume.is_some() && state.ranks != dist.size {
        return Err(Collective(format!(
            "--resume {}: the run was trained by {} rank(s) and this job has {}; resume it with the same count \
             (mpirun -np {}; one process for 1)",
            args.out.display(),
            state.ranks,
            dist.size,
            state.ranks
        ))
        .into());
    }
    if let Some(run) = run.as_mut() {
        run.ranks = dist.size;
    }
    replicas::broadcast_model(net, dist)?;
    Ok((run, state))
}
