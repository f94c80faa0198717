//! Training, top to bottom: settings (defaults in [`crate::hparams`], flags in [`crate::args`]),
//! data, network, the loop, the test-set pass after each epoch ([`crate::eval`]) and the run
//! folder ([`crate::run`]). What happens before the first step is in `train/setup.rs`, what the
//! loop prints in `train/report.rs`, the checks that keep MPI ranks one model in
//! `train/replicas.rs`. The kernels live in `ops/`, the step plans in `model::plan` (one
//! data-parallel step in `model::data_parallel`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;

use crate::args::TrainArgs;
use crate::data::Dataset;
use crate::data::folder::BadImage;
use crate::data::loader::{self, Preprocess};
use crate::dist::{self, Collective, Dist};
use crate::eval::{evaluate, evaluate_sharded, plans_for, read_sums};
use crate::gpu::Gpu;
use crate::hparams::lr_at;
use crate::metrics::EpochMetrics;
use crate::model::data_parallel;
use crate::model::plan::{Network, StepPlan, clear_metrics};
use crate::ops::cross_entropy::result;
use crate::progress::{RunClock, bar};
use crate::run::{self, EpochSums, RunFolder, RunState};

mod replicas;
mod report;
mod setup;

use report::{divergence, print_tuning, profile_step};
pub use setup::model_from_init;
use setup::{
    build_network, check_training_data, load_data, open_run_on_every_rank, preprocess, refuse_under_mpi, resumed_args,
};

// ---------------------------------------------------------------------------------------------
// The loop

/// What `train` returns.
pub struct TrainSummary {
    pub history: Vec<EpochMetrics>,
    pub best_acc: f64,
    pub out: PathBuf,
}

pub fn train(gpu: Arc<Gpu>, args: &TrainArgs) -> Result<TrainSummary> {
    train_dist(gpu, args, &Dist::single())
}

/// [`train`] as one rank of a data-parallel job (`mpirun -np N senet train …`; see [`crate::dist`]):
/// this rank's share of every epoch, gradients averaged across ranks each step, rank 0 alone
/// printing and writing the run folder. With [`Dist::single`] it is the one-process loop.
pub fn train_dist(gpu: Arc<Gpu>, args: &TrainArgs, dist: &Dist) -> Result<TrainSummary> {
    // First: a signal from here on is a request to stop after a step and save (under mpirun,
    // once every rank has it: see the adapter line each rank prints).
    crate::exit::install_stop_handler();
    let resumed = resumed_args(args, dist)?;
    let flags = args;
    let args = resumed.as_ref().unwrap_or(args);
    args.validate()?;
    refuse_under_mpi(args, dist)?;
    let (dataset, train_set, val_set, test_set, config) = load_data(args)?;
    let pre = preprocess(args, &config)?;
    check_training_data(flags, args, &dataset, &train_set, &test_set, &pre, dist)?;
    // --mixup/--cutmix: the training loss is against the soft targets the loop writes.
    let mixup = args.mixup_config(config.num_classes);
    let mut net = build_network(gpu.clone(), args, &config, mixup.active(), dist)?;
    let shard_len = train_set.len().div_ceil(dist.size);
    let lens: Vec<usize> = [shard_len, test_set.len()].into_iter().chain(val_set.as_ref().map(Dataset::len)).collect();
    let plans = plans_for(&net, args.batch_size, &lens)?;
    if dist.is_root() {
        print_tuning(&gpu);
    }
    if dist.size > 1 {
        eprintln!("{} (pid {}): {}", dist.who(), std::process::id(), gpu.describe());
    }
    let (mut run, mut state) = open_run_on_every_rank(args, &config, &dataset, &mut net, dist)?;
    let steps_per_epoch = shard_len.div_ceil(args.batch_size);
    // timm's updates_per_epoch: the last group of an epoch may have fewer batches.
    let updates_per_epoch = steps_per_epoch.div_ceil(args.grad_accum_steps);
    let t = Trainer {
        args,
        gpu,
        pre,
        plans: RefCell::new(plans),
        mixup: mixup.active().then_some((mixup, [config.in_channels, config.input_hw[0], config.input_hw[1]])),
        steps_per_epoch,
        updates_per_epoch,
        total_updates: updates_per_epoch * args.epochs(),
        first_epoch: state.history.len() + 1,
        dist,
        reduce_secs: std::cell::Cell::new(0.0),
        data_secs: std::cell::Cell::new(0.0),
        skipped: std::cell::Cell::new(0),
        sync_bn_secs: std::cell::Cell::new(0.0),
        resumed: std::cell::Cell::new((0, 0.0)),
        clock: std::cell::RefCell::new(RunClock::default()),
        train_set: Arc::new(train_set),
        val_set: val_set.map(Arc::new),
        test_set: Arc::new(test_set),
    };
    t.print_banner(&net, &dataset);
    for epoch in t.first_epoch..=args.epochs() {
        t.epoch(&mut net, run.as_mut(), &mut state, epoch)?;
    }
    t.print_best(&state);
    if dist.size > 1 {
        let sum = dist::checksum(&net.flat.values.read::<f32>(&net.gpu)?);
        eprintln!("{}: final weights checksum {sum:016x}", dist.who());
    }
    Ok(TrainSummary { history: state.history, best_acc: state.best_acc, out: args.out.clone() })
}

/// What every epoch reads — the settings, the data and the plans, which no epoch changes — and the
/// per-epoch timings the progress line and the run's ETA accumulate (the `Cell` fields, written
/// each step).
struct Trainer<'a> {
    args: &'a TrainArgs,
    gpu: Arc<Gpu>,
    pre: Preprocess,
    /// One plan per batch size an epoch uses (full and the last partial, training and test; a
    /// batch short of images `--skip-bad-images` left out gets one when it comes).
    plans: RefCell<HashMap<usize, StepPlan>>,
    /// `--mixup`/`--cutmix`: the configuration and the image shape [c, h, w].
    mixup: Option<(crate::data::mixup::MixupConfig, [usize; 3])>,
    /// Batches per epoch (the progress bar's steps).
    steps_per_epoch: usize,
    /// Optimizer updates per epoch: batches / `--grad-accum-steps`, rounded up, and in the run
    /// (the learning-rate schedule's step count).
    updates_per_epoch: usize,
    total_updates: usize,
    /// The first epoch this process trains (after the resumed run's finished ones).
    first_epoch: usize,
    /// This rank, and how many train together.
    dist: &'a Dist,
    /// Seconds spent in the gradient all-reduce this epoch (the progress line shows its share).
    reduce_secs: std::cell::Cell<f64>,
    /// Seconds the training loop waited for the data loader this epoch (timm's data_time).
    data_secs: std::cell::Cell<f64>,
    /// Image-folder files left out this epoch (`--skip-bad-images`), training and evaluation.
    skipped: std::cell::Cell<usize>,
    /// Seconds spent in `--sync-bn`'s batch-norm exchanges this epoch (shown beside it).
    sync_bn_secs: std::cell::Cell<f64>,
    /// (steps, images) of this epoch restored from a resumed run's sums, not timed by this process:
    /// the progress line's rates and per-step times leave them out.
    resumed: std::cell::Cell<(usize, f64)>,
    /// Measured step and evaluation times, for the whole run's ETA.
    clock: std::cell::RefCell<RunClock>,
    train_set: Arc<Dataset>,
    val_set: Option<Arc<Dataset>>,
    test_set: Arc<Dataset>,
}

/// One epoch's evaluations, each (loss, accuracy, top-5 accuracy): the validation split's
/// (`--val-split`), the test set's, and with `--model-ema` the EMA's (validation, test).
#[allow(clippy::type_complexity)]
struct EpochEvals {
    val: Option<(f64, f64, f64)>,
    test: (f64, f64, f64),
    ema: Option<(Option<(f64, f64, f64)>, (f64, f64, f64))>,
}

impl Trainer<'_> {
    /// One epoch: its training steps, the validation and test passes, the table row and the run
    /// folder's update. A signal that reached any rank ends the run after it.
    fn epoch(&self, net: &mut Network, run: Option<&mut RunFolder>, state: &mut RunState, epoch: usize) -> Result<()> {
        let (args, dist) = (self.args, self.dist);
        let t0 = Instant::now();
        let partial = state.partial.take();
        self.skipped.set(0);
        let ((l, c, n), train_secs) = self.train_epoch(net, run.as_deref(), state, epoch, partial, t0)?;
        let t_eval = Instant::now();
        let EpochEvals { val, test: (test_loss, test_acc, test_top5_acc), ema } =
            self.evaluate_epoch(net, run.as_deref(), state, epoch)?;
        self.clock.borrow_mut().eval_done(self.eval_images_per_epoch(), t_eval.elapsed().as_secs_f64());
        let m = EpochMetrics {
            epoch,
            train_loss: l / n,
            train_acc: c / n,
            test_loss,
            test_acc,
            seconds: t0.elapsed().as_secs_f64(),
            // Images this process timed: a resumed epoch's restored ones (each rank as many) left out.
            train_images_per_s: (n - self.resumed.get().1 * dist.size as f64) / train_secs,
            val_loss: val.map(|v| v.0),
            val_acc: val.map(|v| v.1),
            test_top5_acc,
            val_top5_acc: val.map(|v| v.2),
            lr: self.lr_at(epoch, self.steps_per_epoch),
            skipped_images: self.skipped.get(),
            ema_test_loss: ema.map(|e| e.1.0),
            ema_test_acc: ema.map(|e| e.1.1),
            ema_test_top5_acc: ema.map(|e| e.1.2),
            ema_val_loss: ema.and_then(|e| e.0).map(|v| v.0),
            ema_val_acc: ema.and_then(|e| e.0).map(|v| v.1),
            best_on_ema: args.best_on() == crate::args::BestOn::Ema,
        };
        self.say(m.table_row());
        match run {
            Some(run) => run.finish_epoch(net, state, m)?,
            None => {
                state.best_acc = state.best_acc.max(m.selection_acc());
                state.history.push(m);
            }
        }
        // Under mpirun the ranks agree: a signal that reached any of them stops all.
        if dist.any(crate::exit::stop_requested())? && epoch < args.epochs() {
            return Err(run::interrupted(&args.out, epoch + 1, 0, !dist.is_root()).into());
        }
        Ok(())
    }

    /// The evaluations after `epoch`'s training steps: validation split, test set (under mpirun
    /// sharded, after checking every rank holds the same weights and taking rank 0's batch-norm
    /// buffers) and the EMA's. An unreadable image stops the run as one in training does: saved
    /// with the epoch's training steps done, so --resume goes straight to the evaluation.
    fn evaluate_epoch(
        &self,
        net: &Network,
        run: Option<&RunFolder>,
        state: &RunState,
        epoch: usize,
    ) -> Result<EpochEvals> {
        let (args, dist) = (self.args, self.dist);
        let label = |set: &str| format!("epoch {epoch}/{} {set}", args.epochs());
        let bad_stop = |e: anyhow::Error| self.on_bad_image(e, net, run, state, epoch, self.steps_per_epoch);
        // --val-split is refused under mpirun (train_dist): one process evaluates it whole.
        let val = match &self.val_set {
            Some(v) => {
                let r = evaluate(net, &self.plans.borrow(), v, args.batch_size, &self.pre, &label("validation"))
                    .map_err(bad_stop)?;
                self.skipped.set(self.skipped.get() + r.3);
                Some((r.0, r.1, r.2))
            }
            None => None,
        };
        let (test_loss, test_acc, test_top5_acc, test_skipped) = if dist.size > 1 {
            let sum = replicas::same_weights_on_every_rank(net, dist, epoch)?;
            self.say(format!("epoch {epoch}: weights identical on all {} ranks (checksum {sum:016x})", dist.size));
            // The model's running statistics are rank 0's, as DDP's broadcast_buffers makes them.
            replicas::broadcast_bn_buffers(net, dist)?;
            evaluate_sharded(
                net,
                &self.plans.borrow(),
                &self.test_set,
                args.batch_size,
                &self.pre,
                dist,
                &label("test"),
            )?
        } else {
            evaluate(net, &self.plans.borrow(), &self.test_set, args.batch_size, &self.pre, &label("test"))
                .map_err(bad_stop)?
        };
        self.skipped.set(self.skipped.get() + test_skipped);
        let ema = self.evaluate_ema(net, epoch).map_err(bad_stop)?;
        Ok(EpochEvals { val, test: (test_loss, test_acc, test_top5_acc), ema })
    }

    /// `--model-ema`: the EMA's (validation, test) (loss, accuracy, top-5) after `epoch`, the
    /// EMA swapped into the network for the passes and back again, also when a pass fails (so a
    /// save after the error holds the model). Under mpirun the EMA's batch-norm buffers are rank
    /// 0's, as the model's (timm's distribute_bn on the EMA).
    #[allow(clippy::type_complexity)]
    fn evaluate_ema(&self, net: &Network, epoch: usize) -> Result<Option<(Option<(f64, f64, f64)>, (f64, f64, f64))>> {
        if net.ema.is_none() {
            return Ok(None);
        }
        let (args, dist) = (self.args, self.dist);
        let label = |set: &str| format!("epoch {epoch}/{} {set} (EMA)", args.epochs());
        net.swap_ema();
        let r = (|| {
            let plans = self.plans.borrow();
            let val = match &self.val_set {
                Some(v) => {
                    let r = evaluate(net, &plans, v, args.batch_size, &self.pre, &label("validation"))?;
                    self.skipped.set(self.skipped.get() + r.3);
                    Some((r.0, r.1, r.2))
                }
                None => None,
            };
            let test = if dist.size > 1 {
                replicas::broadcast_bn_buffers(net, dist)?;
                evaluate_sharded(net, &plans, &self.test_set, args.batch_size, &self.pre, dist, &label("test"))?
            } else {
                evaluate(net, &plans, &self.test_set, args.batch_size, &self.pre, &label("test"))?
            };
            self.skipped.set(self.skipped.get() + test.3);
            Ok(Some((val, (test.0, test.1, test.2))))
        })();
        net.swap_ema();
        r
    }

    /// The training steps of `epoch`, from where `partial` left it: (loss sum, correct, count)
    /// and the seconds since `t0`. Ctrl-C saves the run after the step and ends it ([`Interrupted`]).
    fn train_epoch(
        &self,
        net: &mut Network,
        run: Option<&RunFolder>,
        state: &RunState,
        epoch: usize,
        partial: Option<(usize, run::RankSums)>,
        t0: Instant,
    ) -> Result<((f64, f64, f64), f64)> {
        let (args, gpu) = (self.args, &self.gpu);
        let (skip, pb) = self.start_epoch(epoch, partial);
        let mut in_flight: Option<wgpu::SubmissionIndex> = None;
        for (step, b) in (skip..).zip(self.timed_batches(epoch, skip)) {
            let mut b = match b {
                Ok(b) => b,
                Err(e) => {
                    pb.finish_and_clear();
                    // The steps before this batch are done: saved, so --resume starts at it.
                    return Err(self.on_bad_image(e, net, run, state, epoch, step));
                }
            };
            self.mix(&mut b, epoch, step);
            self.note_skipped(&b.skipped, &pb);
            if b.labels.is_empty() {
                pb.inc(1); // every image of the batch was left out
                continue;
            }
            self.plan_for(net, b.labels.len())?;
            let plans = self.plans.borrow();
            let plan = plans.get(&b.labels.len()).context("no plan for this batch size")?;
            plan.write_batch(gpu, &b.images, &b.labels)?;
            if let Some(t) = &b.targets {
                plan.write_targets(gpu, t)?;
            }
            net.set_lr(self.lr_at(epoch, step + 1));
            let (index, count) = self.micro_batch(step);
            if args.profile && step == skip && epoch == args.epochs().min(self.first_epoch + 1) {
                profile_step(net, plan, epoch, step, &pb)?;
                // The profiled step runs a pass per dispatch: not a step time for the run's ETA.
                self.clock.borrow_mut().start_epoch(step + 1, Instant::now());
                in_flight = None;
                pb.inc(1);
                continue;
            }
            let stop = self.submit_step(net, plan, index, count, &mut in_flight)?;
            pb.inc(1);
            if ((step + 1) % args.log_every == 0 || stop) && self.dist.is_root() {
                self.log_progress(net, plan, epoch, step + 1, t0, &pb)?;
            }
            if stop && step + 1 < self.steps_per_epoch {
                pb.finish_and_clear();
                return Err(self.save_and_stop(net, run, state, epoch, step + 1));
            }
        }
        gpu.wait()?;
        pb.finish_and_clear();
        self.epoch_sums(net, epoch).map(|sums| (sums, t0.elapsed().as_secs_f64()))
    }

    /// Ready the epoch's training: metric sums and timings zeroed (a resumed epoch's sums put
    /// back) and the progress bar (rank 0's; hidden on the others) and clock started. Returns
    /// the steps already done and the bar.
    fn start_epoch(&self, epoch: usize, partial: Option<(usize, run::RankSums)>) -> (usize, ProgressBar) {
        for p in self.plans.borrow().values() {
            clear_metrics(&self.gpu, &p.train_result);
        }
        self.reduce_secs.set(0.0);
        self.data_secs.set(0.0);
        self.sync_bn_secs.set(0.0);
        let skip = self.restore_partial(partial);
        let pb = if self.dist.is_root() {
            bar(self.steps_per_epoch as u64, format!("epoch {epoch}/{}", self.args.epochs()))
        } else {
            ProgressBar::hidden()
        };
        pb.set_position(skip as u64);
        self.clock.borrow_mut().start_epoch(skip, Instant::now());
        (skip, pb)
    }

    /// [`Trainer::batches`], the time spent waiting for each counted as the loader's share of
    /// the step (timm's data_time).
    fn timed_batches(&self, epoch: usize, skip: usize) -> impl Iterator<Item = Result<loader::Batch>> + '_ {
        let mut batches = self.batches(epoch, skip);
        std::iter::from_fn(move || {
            let t = Instant::now();
            let b = batches.next();
            self.data_secs.set(self.data_secs.get() + t.elapsed().as_secs_f64());
            b
        })
    }

    /// Submit micro-batch `index` of a `count`-batch group with the batch `plan` holds, and say
    /// whether the run stops after it. Under mpirun a data-parallel step, whose gradient exchange
    /// carries the signal flag so every rank stops after the same step. On one process at most two
    /// steps are in flight: it waits for the previous one (`in_flight`), not this one, so the next
    /// batch is prepared and queued while the GPU works; a signal stops the run only where an
    /// optimizer step ends.
    fn submit_step(
        &self,
        net: &mut Network,
        plan: &StepPlan,
        index: usize,
        count: usize,
        in_flight: &mut Option<wgpu::SubmissionIndex>,
    ) -> Result<bool> {
        if self.dist.size > 1 {
            return self.data_parallel_step(net, plan, crate::exit::stop_requested(), index, count);
        }
        let idx = net.train_micro_step(plan, index, count);
        if let Some(prev) = in_flight.replace(idx) {
            self.gpu
                .device
                .poll(wgpu::PollType::Wait { submission_index: Some(prev), timeout: None })
                .map_err(|e| crate::exit::runtime(format!("waiting for the GPU: {e}")))?;
        }
        Ok(crate::exit::stop_requested() && index + 1 == count)
    }

    /// This rank's batches of `epoch` from batch `skip` on: its share of the epoch's order; rank
    /// 0's augmentation stream is one process's. In-memory datasets still make the skipped
    /// batches (their augmentation is one stream per epoch, which must be where it was); an image
    /// folder's draws are per sample, so its loader starts at batch `skip`.
    fn batches(&self, epoch: usize, skip: usize) -> Box<dyn Iterator<Item = Result<loader::Batch>>> {
        let (args, rank, size) = (self.args, self.dist.rank, self.dist.size);
        let order = dist::shard(&loader::epoch_order(self.train_set.len(), true, args.seed, epoch), rank, size);
        if self.train_set.files.is_some() {
            let chunks = order.chunks(args.batch_size).skip(skip).map(<[usize]>::to_vec).collect();
            return Box::new(loader::stream(self.train_set.clone(), chunks, self.pre.clone(), args.seed, epoch));
        }
        let aug_seed = args
            .seed
            .wrapping_add(0x5EED)
            .wrapping_add(epoch as u64)
            .wrapping_add((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Box::new(
            loader::batches_of(self.train_set.clone(), order, args.batch_size, self.pre.clone(), aug_seed).skip(skip),
        )
    }

    /// `--mixup`/`--cutmix`: mix batch `step` of `epoch` in place, per batch, pair or image as
    /// `--mixup-mode` says (nothing from `--mixup-off-epoch` on), and give it its soft targets (the
    /// draws a function of seed, epoch and step; see `data::mixup`).
    fn mix(&self, b: &mut loader::Batch, epoch: usize, step: usize) {
        let Some((cfg, [c, h, w])) = self.mixup else { return };
        let n = b.labels.len();
        let mixes = cfg.draw_samples(self.args.seed, epoch, step, n, [h, w]);
        let targets =
            crate::data::mixup::mix_samples(&mixes, &mut b.images, &b.labels, [n, c, h, w], cfg.classes, cfg.smoothing);
        b.targets = Some(targets);
    }

    /// Make sure a plan for batches of `n` exists (a batch `--skip-bad-images` made short).
    fn plan_for(&self, net: &Network, n: usize) -> Result<()> {
        if !self.plans.borrow().contains_key(&n) {
            let p = net.plan(n)?;
            self.plans.borrow_mut().insert(n, p);
        }
        Ok(())
    }

    /// Name the files `--skip-bad-images` left out of a batch, and count them.
    fn note_skipped(&self, skipped: &[BadImage], pb: &ProgressBar) {
        for bad in skipped {
            pb.suspend(|| eprintln!("skipped (--skip-bad-images): {bad}"));
        }
        self.skipped.set(self.skipped.get() + skipped.len());
    }

    /// `e`, unless it is an image that failed to decode on a single process: then the run saved
    /// after `steps` steps of `epoch` and the error that says how to continue
    /// ([`Trainer::stop_on_bad_image`]).
    fn on_bad_image(
        &self,
        e: anyhow::Error,
        net: &Network,
        run: Option<&RunFolder>,
        state: &RunState,
        epoch: usize,
        steps: usize,
    ) -> anyhow::Error {
        match e.downcast_ref::<BadImage>() {
            Some(bad) if self.dist.size == 1 => self.stop_on_bad_image(net, run, state, epoch, steps, bad),
            _ => e,
        }
    }

    /// An image failed to decode in `epoch` after `steps` steps (without `--skip-bad-images`):
    /// save the run as a signal would (resume.safetensors, to continue at this batch) and return
    /// the error that names the file and ends the run with exit code 1.
    fn stop_on_bad_image(
        &self,
        net: &Network,
        run: Option<&RunFolder>,
        state: &RunState,
        epoch: usize,
        steps: usize,
        bad: &BadImage,
    ) -> anyhow::Error {
        if let Err(e) = self.save_partial(net, run, state, steps) {
            return e.context(format!("{bad}; saving the run to continue after it failed"));
        }
        crate::exit::runtime(format!(
            "{bad}. Stopped in epoch {epoch} after step {steps}; saved {}. Replace or remove the file and continue \
             with: senet train --resume {} (add --skip-bad-images to leave unreadable files out)",
            self.args.out.join(run::RESUME_FILE).display(),
            self.args.out.display()
        ))
    }

    /// A signal stopped the run after `steps` steps of `epoch`, short of its end: save everything
    /// needed to continue exactly here (each rank's metric sums kept apart, so a resumed epoch adds
    /// up as this one would) and return the [`Interrupted`] that ends the run.
    fn save_and_stop(
        &self,
        net: &Network,
        run: Option<&RunFolder>,
        state: &RunState,
        epoch: usize,
        steps: usize,
    ) -> anyhow::Error {
        match self.save_partial(net, run, state, steps) {
            Ok(()) => run::interrupted(&self.args.out, epoch, steps, !self.dist.is_root()).into(),
            Err(e) => e,
        }
    }

    /// Save the run `steps` steps into the current epoch (each rank's metric sums kept apart).
    fn save_partial(&self, net: &Network, run: Option<&RunFolder>, state: &RunState, steps: usize) -> Result<()> {
        (|| {
            self.gpu.wait()?;
            let (l, c, n) = read_sums(net, &self.plans.borrow(), false)?;
            let per_rank: Vec<EpochSums> = if self.dist.size > 1 {
                crate::exit::request_stop();
                let all = self.dist.all_gather_f32(&[l as f32, c as f32, n as f32])?;
                all.chunks(3).map(|v| (v[0], v[1], v[2])).collect()
            } else {
                vec![(l as f32, c as f32, n as f32)]
            };
            let saved = match run {
                Some(run) => run.save(net, state, Some((steps, &per_rank))),
                None => Ok(()),
            };
            self.dist.agree_with_root(saved)
        })()
    }

    /// The epoch's (loss sum, correct, count) over every rank; a non-finite loss names where the
    /// run diverged. Every rank sees the same sums, so they end together.
    fn epoch_sums(&self, net: &Network, epoch: usize) -> Result<(f64, f64, f64)> {
        let (l, c, n) = read_sums(net, &self.plans.borrow(), false)?;
        let mut sums = [l, c, n];
        self.dist.all_reduce_sum_f64(&mut sums)?;
        if !sums[0].is_finite() {
            let shard_len = self.train_set.len().div_ceil(self.dist.size);
            let tail = shard_len - (self.steps_per_epoch - 1) * self.args.batch_size;
            let plans = self.plans.borrow();
            let last = plans.get(&tail).context("no plan for the last batch")?;
            let e = divergence(net, last, epoch, self.steps_per_epoch);
            return Err(if self.dist.size > 1 { Collective(format!("{e:#}")).into() } else { e });
        }
        Ok((sums[0], sums[1], sums[2]))
    }

    /// The learning rate of the optimizer update that batch `step` (1-based) of `epoch` belongs
    /// to: the schedule counts updates, `--grad-accum-steps` batches each (timm's step_update).
    fn lr_at(&self, epoch: usize, step: usize) -> f64 {
        let a = self.args;
        let global = (epoch - 1) * self.updates_per_epoch + (step.max(1) - 1) / a.grad_accum_steps;
        lr_at(a.lr, a.schedule, a.warmup_epochs, global, self.updates_per_epoch, self.total_updates)
    }

    /// Where batch `step` (0-based) of an epoch stands in its `--grad-accum-steps` group:
    /// (index in the group, the group's batches), as timm's train.py groups an epoch — groups of
    /// N from the first batch, the last one shorter when N does not divide the epoch.
    fn micro_batch(&self, step: usize) -> (usize, usize) {
        crate::ops::grad_accum::group_of(step, self.args.grad_accum_steps, self.steps_per_epoch)
    }

    /// One data-parallel micro-batch ([`data_parallel::data_parallel_micro_step`]), its exchange
    /// times counted.
    fn data_parallel_step(
        &self,
        net: &mut Network,
        plan: &StepPlan,
        stop: bool,
        index: usize,
        count: usize,
    ) -> Result<bool> {
        let r = data_parallel::data_parallel_micro_step(net, plan, self.dist, stop, index, count)?;
        self.reduce_secs.set(self.reduce_secs.get() + r.allreduce_secs);
        self.sync_bn_secs.set(self.sync_bn_secs.get() + r.sync_bn_secs);
        Ok(r.stop)
    }

    /// Resuming inside an epoch: its metric sums so far go back into the buffer of the
    /// full-batch plan, the one every step before the last uses. Returns the steps done.
    /// Each rank restores its own sums (saved per rank).
    fn restore_partial(&self, partial: Option<(usize, run::RankSums)>) -> usize {
        self.resumed.set((0, 0.0));
        partial.map_or(0, |(steps, per_rank)| {
            let sums = per_rank.get(self.dist.rank).copied().unwrap_or((0.0, 0.0, 0.0));
            self.resumed.set((steps, f64::from(sums.2)));
            let shard_len = self.train_set.len().div_ceil(self.dist.size);
            if let Some(p) = self.plans.borrow().get(&self.args.batch_size.min(shard_len)) {
                let mut v = [0.0f32; result::LEN];
                (v[result::SUM_LOSS], v[result::SUM_CORRECT], v[result::SUM_COUNT]) = sums;
                self.gpu.queue.write_buffer(&p.train_result.buffer, p.train_result.offset, bytemuck::cast_slice(&v));
            }
            steps
        })
    }
}
