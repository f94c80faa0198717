//! Training, top to bottom: settings (defaults in [`crate::hparams`], flags in [`crate::args`]),
//! data, network, the loop, the test-set pass after each epoch ([`crate::eval`]) and the run
//! folder ([`crate::run`]). The kernels live in `ops/`, the step plans in `model::plan`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use indicatif::{ProgressBar, ProgressStyle};

use crate::args::TrainArgs;
use crate::checkpoint;
use crate::data::Dataset;
use crate::data::loader::{self, Preprocess};
use crate::dist::{self, Collective, Dist};
use crate::eval::{evaluate, evaluate_sharded, plans_for, read_sums};
use crate::gpu::{Gpu, Precision};
use crate::hparams::lr_at;
use crate::metrics::EpochMetrics;
use crate::model::ModelConfig;
use crate::model::plan::{Network, StepPlan, clear_metrics};
use crate::ops::cross_entropy::result;
use crate::run::{self, EpochSums, Interrupted, RunFolder, RunState};

// ---------------------------------------------------------------------------------------------
// Stopping: a signal saves and ends the run (`crate::exit`); a non-finite loss ends it without saving.

/// f16: consecutive skipped steps after which the run stops (each halves the loss scale, so 50 is
/// a factor 2^50 — no gradient overflow needs that; a forward pass that overflows f16 never recovers).
const MAX_SKIPPED_IN_A_ROW: u32 = 50;

/// The loss went NaN or infinite: name the step and the first layer whose output (or the first
/// parameter) is not finite. Nothing is saved, so the last good checkpoint stays as it was.
fn divergence(net: &Network, plan: &StepPlan, epoch: usize, step: usize) -> anyhow::Error {
    let finite = |t: &crate::gpu::Tensor| t.read_f32(&net.gpu).map(|v| v.iter().all(|x| x.is_finite())).unwrap_or(true);
    let param = net.params.iter().find(|p| !finite(&p.value)).map(|p| format!("parameter {}", p.spec.name));
    let layer = net
        .graph
        .nodes
        .iter()
        .enumerate()
        .find(|(k, _)| !finite(&plan.acts[k + 1]))
        .map(|(_, n)| format!("the output of {} ({:?})", n.name, n.layer));
    let place = layer.or(param).unwrap_or_else(|| "the loss".into());
    anyhow::anyhow!(
        "training diverged at epoch {epoch} step {step} (optimizer step {}): the loss is not finite; first non-finite \
         value in {place}. Checkpoints were not overwritten; try a lower --lr",
        net.step
    )
}

// ---------------------------------------------------------------------------------------------
// Settings, data, network

/// The training, validation (`--val-split`) and test sets, and the model configuration they and
/// the flags make. Normalisation statistics come from the training images only.
fn load_data(args: &TrainArgs) -> Result<(String, Dataset, Option<Dataset>, Dataset, ModelConfig)> {
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
    config.normalize = if args.mean.is_empty() {
        args.normalize.then(|| loader::channel_stats(&train_set))
    } else {
        ensure!(args.mean.len() == c, "--mean and --std give {} channels; the images have {c}", args.mean.len());
        Some(args.mean.iter().zip(&args.std).map(|(&m, &s)| (m as f32, s as f32)).collect())
    };
    Ok((splits.name, train_set, val_set, splits.test, config))
}

/// A new run folder, or the `--resume`d one with `net` restored from it.
fn open_run(args: &TrainArgs, config: &ModelConfig, dataset: &str, net: &mut Network) -> Result<(RunFolder, RunState)> {
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

fn print_tuning(gpu: &Gpu) {
    let tuned = gpu.tuner.summary();
    if tuned.timed + tuned.cached > 0 {
        let cache = gpu.tuner.path.as_ref().map_or("memory only".to_string(), |p| p.display().to_string());
        println!(
            "conv kernels ({:?} tuning): {} shapes timed in {:.1} s, {} from the cache ({cache})",
            gpu.tuner.mode, tuned.timed, tuned.seconds, tuned.cached
        );
    }
}

fn bar(len: u64, prefix: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

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
    // `--resume`: rank 0 reads the run's settings and sends them (the folder need not be visible
    // to the other ranks).
    let resumed = match &args.resume {
        Some(dir) => dist.from_root(|| run::resumed_args(args))?.map(|mut r| {
            // Not in the JSON (config.json never holds it): every rank's own flag.
            r.resume = Some(dir.clone());
            r
        }),
        None => None,
    };
    let flags = args;
    let args = resumed.as_ref().unwrap_or(args);
    args.validate()?;
    // Collective: every rank has the same flags (compared below) and stops here together.
    let not_yet = [
        (args.profile, "--profile"),
        (args.precision != Precision::F32, "--precision f16"),
        (args.val_split.is_some(), "--val-split"),
    ];
    for (bad, what) in not_yet {
        if dist.size > 1 && bad {
            return Err(Collective(format!(
                "{what} is not supported under mpirun yet ({} ranks); run it as one process",
                dist.size
            ))
            .into());
        }
    }
    let (dataset, train_set, val_set, test_set, config) = load_data(args)?;
    same_config_on_every_rank(dist, flags, args, &dataset, &train_set, &test_set)?;
    if train_set.len() < dist.size {
        return Err(Collective(format!(
            "{} ranks but only {} training images: every rank needs at least one; use fewer ranks or more images",
            dist.size,
            train_set.len()
        ))
        .into());
    }
    let pre = Preprocess { normalize: config.normalize.clone(), augment: args.augment };

    let mut net = Network::new_in(gpu.clone(), config.clone(), args.optimizer_config(), args.seed, args.precision)?;
    net.label_smoothing = args.label_smoothing as f32;
    if let Some(init) = &args.init {
        let sd = checkpoint::load(init)?;
        checkpoint::apply(&mut net, &sd, &init.display().to_string())?;
    }
    let shard_len = train_set.len().div_ceil(dist.size);
    let lens: Vec<usize> = [shard_len, test_set.len()].into_iter().chain(val_set.as_ref().map(Dataset::len)).collect();
    let plans = plans_for(&net, args.batch_size, &lens)?;
    if dist.is_root() {
        print_tuning(&gpu);
    }
    if dist.size > 1 {
        eprintln!("{} (pid {}): {}", dist.who(), std::process::id(), gpu.describe());
    }
    // Rank 0 opens (or resumes) the run folder; the others take its state, and every rank starts
    // from rank 0's weights and optimizer state (as DDP does), whatever its own init gave.
    let opened = if dist.is_root() { open_run(args, &config, &dataset, &mut net).map(Some) } else { Ok(None) };
    let (mut run, root_state) = match dist.agree_with_root(opened)? {
        Some((run, state)) => (Some(run), Some(state)),
        None => (None, None),
    };
    let mut state = share_state(dist, root_state)?;
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
    broadcast_model(&mut net, dist)?;

    let say = |line: String| {
        if dist.is_root() {
            println!("{line}");
        }
    };
    say(format!(
        "{} width {} (r={}) on {dataset}: {} params | {} train / {} test images {:?} | {} | batch {} | {:?}",
        args.net.model,
        args.net.width,
        args.net.reduction,
        net.graph.parameter_count(),
        train_set.len(),
        test_set.len(),
        train_set.shape,
        gpu.describe(),
        args.batch_size,
        args.optimizer
    ));
    if dist.size > 1 {
        let floats = net.flat.grads.numel();
        say(format!(
            "data parallel over {} MPI ranks: batch {} per rank ({} in all); each epoch's shuffle is the same on \
             every rank, padded from {} to {} images, {} per rank (DistributedSampler); gradients averaged by one \
             host-staged all-reduce of {floats} floats ({:.1} MB) per step; batch norm with per-rank statistics, \
             rank 0's running statistics; test set split by batches over the ranks",
            dist.size,
            args.batch_size,
            args.batch_size * dist.size,
            train_set.len(),
            shard_len * dist.size,
            shard_len,
            floats as f64 * 4e-6
        ));
    }
    say(match &val_set {
        Some(v) => format!(
            "best.safetensors is chosen on validation accuracy ({} images held out of training, seed {}); test beside it",
            v.len(),
            args.seed
        ),
        None => {
            "best.safetensors is chosen on test accuracy (no --val-split), so that figure is optimistic".to_string()
        }
    });
    say(EpochMetrics::table_header(val_set.is_some()));

    let steps_per_epoch = shard_len.div_ceil(args.batch_size);
    let t = Trainer {
        args,
        gpu,
        train_set: Arc::new(train_set),
        pre,
        plans,
        steps_per_epoch,
        total_steps: steps_per_epoch * args.epochs(),
        first_epoch: state.history.len() + 1,
        dist,
        reduce_secs: std::cell::Cell::new(0.0),
    };
    let test_set = Arc::new(test_set);
    let val_set = val_set.map(Arc::new);
    for epoch in t.first_epoch..=args.epochs() {
        let t0 = Instant::now();
        let partial = state.partial.take();
        let ((l, c, n), train_secs) = t.train_epoch(&mut net, run.as_ref(), &state, epoch, partial, t0)?;
        // --val-split is refused under mpirun (above): one process evaluates it whole.
        let val = match &val_set {
            Some(v) => Some(evaluate(&net, &t.plans, v, args.batch_size, &t.pre)?),
            None => None,
        };
        let (test_loss, test_acc, test_top5_acc) = if dist.size > 1 {
            let sum = same_weights_on_every_rank(&net, dist, epoch)?;
            say(format!("epoch {epoch}: weights identical on all {} ranks (checksum {sum:016x})", dist.size));
            // The model's running statistics are rank 0's, as DDP's broadcast_buffers makes them.
            broadcast_bn_buffers(&net, dist)?;
            evaluate_sharded(&net, &t.plans, &test_set, args.batch_size, &t.pre, dist)?
        } else {
            evaluate(&net, &t.plans, &test_set, args.batch_size, &t.pre)?
        };
        let m = EpochMetrics {
            epoch,
            train_loss: l / n,
            train_acc: c / n,
            test_loss,
            test_acc,
            seconds: t0.elapsed().as_secs_f64(),
            train_images_per_s: n / train_secs,
            val_loss: val.map(|v| v.0),
            val_acc: val.map(|v| v.1),
            test_top5_acc,
            val_top5_acc: val.map(|v| v.2),
            lr: t.lr_at(epoch, t.steps_per_epoch),
        };
        say(m.table_row());
        match run.as_mut() {
            Some(run) => run.finish_epoch(&net, &mut state, m)?,
            None => {
                state.best_acc = state.best_acc.max(m.selection_acc());
                state.history.push(m);
            }
        }
        // Under mpirun the ranks agree: a signal that reached any of them stops all.
        if dist.any(crate::exit::stop_requested())? && epoch < args.epochs() {
            return Err(Interrupted { out: args.out.clone(), epoch: epoch + 1, step: 0, quiet: !dist.is_root() }.into());
        }
    }
    if let Some(b) = state.history.iter().find(|m| m.selection_acc() == state.best_acc) {
        say(match b.val_acc {
            Some(v) => {
                format!("best validation accuracy {v:.4} at epoch {} (test accuracy {:.4})", b.epoch, b.test_acc)
            }
            None => format!("best test accuracy {:.4} at epoch {}", b.test_acc, b.epoch),
        });
    }
    say(format!("checkpoints and metrics in {}", args.out.display()));
    if dist.size > 1 {
        let sum = dist::checksum(&net.flat.values.read::<f32>(&net.gpu)?);
        eprintln!("{}: final weights checksum {sum:016x}", dist.who());
    }
    Ok(TrainSummary { history: state.history, best_acc: state.best_acc, out: args.out.clone() })
}

/// What every epoch reads and none changes: the settings, the training data and the plans.
struct Trainer<'a> {
    args: &'a TrainArgs,
    gpu: Arc<Gpu>,
    train_set: Arc<Dataset>,
    pre: Preprocess,
    /// One plan per batch size an epoch uses (full and the last partial, training and test).
    plans: HashMap<usize, StepPlan>,
    steps_per_epoch: usize,
    total_steps: usize,
    /// The first epoch this process trains (after the resumed run's finished ones).
    first_epoch: usize,
    /// This rank, and how many train together.
    dist: &'a Dist,
    /// Seconds spent in the gradient all-reduce this epoch (the progress line shows its share).
    reduce_secs: std::cell::Cell<f64>,
}

impl Trainer<'_> {
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
        for p in self.plans.values() {
            clear_metrics(gpu, &p.train_result);
        }
        self.reduce_secs.set(0.0);
        let skip = self.restore_partial(partial);
        let pb = if self.dist.is_root() {
            bar(self.steps_per_epoch as u64, format!("epoch {epoch}/{}", args.epochs()))
        } else {
            ProgressBar::hidden()
        };
        pb.set_position(skip as u64);
        let mut in_flight: Option<wgpu::SubmissionIndex> = None;
        // This rank's share of the epoch's order; rank 0's augmentation stream is one process's.
        let (rank, size) = (self.dist.rank, self.dist.size);
        let order = dist::shard(&loader::epoch_order(self.train_set.len(), true, args.seed, epoch), rank, size);
        let aug_seed = args
            .seed
            .wrapping_add(0x5EED)
            .wrapping_add(epoch as u64)
            .wrapping_add((rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let batches = loader::batches_of(self.train_set.clone(), order, args.batch_size, self.pre.clone(), aug_seed);
        // Skipped batches are still made, so the augmentation's random stream is where it was.
        for (step, b) in batches.enumerate().skip(skip) {
            let b = b?;
            let plan = self.plans.get(&b.labels.len()).context("no plan for this batch size")?;
            plan.write_batch(gpu, &b.images, &b.labels)?;
            net.set_lr(self.lr_at(epoch, step + 1));
            if args.profile && step == skip && epoch == args.epochs().min(self.first_epoch + 1) {
                profile_step(net, plan, epoch, step, &pb)?;
                in_flight = None;
                pb.inc(1);
                continue;
            }
            if size > 1 {
                // The signal flag travels with the gradients: every rank stops after the same step.
                let stop = self.data_parallel_step(net, plan, crate::exit::stop_requested())?;
                pb.inc(1);
                if ((step + 1) % args.log_every == 0 || stop) && self.dist.is_root() {
                    self.log_progress(net, plan, epoch, step + 1, t0, &pb)?;
                }
                if stop && step + 1 < self.steps_per_epoch {
                    crate::exit::request_stop();
                    pb.finish_and_clear();
                    // Each rank's sums so far, kept apart so a resumed epoch adds up as this one would.
                    let (l, c, n) = read_sums(net, &self.plans, false)?;
                    let all = self.dist.all_gather_f32(&[l as f32, c as f32, n as f32])?;
                    let per_rank: Vec<EpochSums> = all.chunks(3).map(|v| (v[0], v[1], v[2])).collect();
                    let saved = match run {
                        Some(run) => run.save(net, state, Some((step + 1, &per_rank))),
                        None => Ok(()),
                    };
                    self.dist.agree_with_root(saved)?;
                    return Err(Interrupted {
                        out: args.out.clone(),
                        epoch,
                        step: step + 1,
                        quiet: !self.dist.is_root(),
                    }
                    .into());
                }
                continue;
            }
            let idx = net.train_step(plan);
            // At most two steps in flight: wait for the previous one, not this one, so the next
            // batch is prepared and queued while the GPU works.
            if let Some(prev) = in_flight.replace(idx) {
                gpu.device
                    .poll(wgpu::PollType::Wait { submission_index: Some(prev), timeout: None })
                    .map_err(|e| crate::exit::runtime(format!("waiting for the GPU: {e}")))?;
            }
            pb.inc(1);
            let stop = crate::exit::stop_requested();
            if (step + 1) % args.log_every == 0 || stop {
                self.log_progress(net, plan, epoch, step + 1, t0, &pb)?;
            }
            if stop && step + 1 < self.steps_per_epoch {
                // Ctrl-C: the step is done; keep everything needed to continue exactly here.
                gpu.wait()?;
                pb.finish_and_clear();
                let (l, c, n) = read_sums(net, &self.plans, false)?;
                if let Some(run) = run {
                    run.save(net, state, Some((step + 1, &[(l as f32, c as f32, n as f32)])))?;
                }
                return Err(Interrupted { out: args.out.clone(), epoch, step: step + 1, quiet: false }.into());
            }
        }
        gpu.wait()?;
        let (l, c, n) = read_sums(net, &self.plans, false)?;
        let mut sums = [l, c, n];
        self.dist.all_reduce_sum_f64(&mut sums)?;
        let sums = (sums[0], sums[1], sums[2]);
        let train_secs = t0.elapsed().as_secs_f64();
        pb.finish_and_clear();
        if !sums.0.is_finite() {
            let shard_len = self.train_set.len().div_ceil(size);
            let tail = shard_len - (self.steps_per_epoch - 1) * args.batch_size;
            let last = self.plans.get(&tail).context("no plan for the last batch")?;
            let e = divergence(net, last, epoch, self.steps_per_epoch);
            // Every rank sees the same summed loss: they end together.
            return Err(if size > 1 { Collective(format!("{e:#}")).into() } else { e });
        }
        Ok((sums, train_secs))
    }

    /// The learning rate of step `step` (1-based) of `epoch`.
    fn lr_at(&self, epoch: usize, step: usize) -> f64 {
        let a = self.args;
        let global = (epoch - 1) * self.steps_per_epoch + step - 1;
        lr_at(a.lr, a.schedule, a.warmup_epochs, global, self.steps_per_epoch, self.total_steps)
    }

    /// One data-parallel step ([`dist::data_parallel_step`]), its all-reduce time counted.
    fn data_parallel_step(&self, net: &mut Network, plan: &StepPlan, stop: bool) -> Result<bool> {
        let (stop_any, secs) = dist::data_parallel_step(net, plan, self.dist, stop)?;
        self.reduce_secs.set(self.reduce_secs.get() + secs);
        Ok(stop_any)
    }

    /// Resuming inside an epoch: its metric sums so far go back into the buffer of the
    /// full-batch plan, the one every step before the last uses. Returns the steps done.
    /// Each rank restores its own sums (saved per rank).
    fn restore_partial(&self, partial: Option<(usize, run::RankSums)>) -> usize {
        partial.map_or(0, |(steps, per_rank)| {
            let sums = per_rank.get(self.dist.rank).copied().unwrap_or((0.0, 0.0, 0.0));
            let shard_len = self.train_set.len().div_ceil(self.dist.size);
            if let Some(p) = self.plans.get(&self.args.batch_size.min(shard_len)) {
                let mut v = [0.0f32; result::LEN];
                (v[result::SUM_LOSS], v[result::SUM_CORRECT], v[result::SUM_COUNT]) = sums;
                self.gpu.queue.write_buffer(&p.train_result.buffer, p.train_result.offset, bytemuck::cast_slice(&v));
            }
            steps
        })
    }

    /// The running loss and accuracy after `step` steps (a read of the metrics buffers), and on a
    /// CPU adapter, once, how long an epoch will take.
    fn log_progress(
        &self,
        net: &Network,
        plan: &StepPlan,
        epoch: usize,
        step: usize,
        t0: Instant,
        pb: &ProgressBar,
    ) -> Result<()> {
        let (l, c, n) = read_sums(net, &self.plans, false)?;
        if !l.is_finite() {
            return Err(divergence(net, plan, epoch, step));
        }
        let secs = t0.elapsed().as_secs_f64();
        let rate = n / secs;
        let mut msg = if self.dist.size > 1 {
            // Rank 0's running loss; images/s of all ranks (each trains as many).
            let reduce = self.reduce_secs.get();
            format!(
                "loss {:.4} acc {:.4} (rank 0) lr {:.3e} {:.0} img/s | all-reduce {:.1} ms/step, {:.0} %",
                l / n,
                c / n,
                self.lr_at(epoch, step),
                rate * self.dist.size as f64,
                1e3 * reduce / step as f64,
                100.0 * reduce / secs
            )
        } else {
            format!("loss {:.4} acc {:.4} lr {:.3e} {:.0} img/s", l / n, c / n, self.lr_at(epoch, step), rate)
        };
        if let Some(s) = &net.scaler {
            let st = s.read(&self.gpu)?;
            msg += &format!(" | loss scale {} ({} skipped)", st.scale, st.skipped);
            // A loss scale too high costs torch AMP a few skipped steps at the start; a forward pass
            // that overflows f16 skips every step, forever, while the scale falls to nothing.
            ensure!(
                st.skipped_in_a_row < MAX_SKIPPED_IN_A_ROW,
                "epoch {epoch} step {step}: the last {} steps overflowed f16 and were skipped (loss scale now {:e}); \
                 the model's activations or loss do not fit f16 — train with --precision f32",
                st.skipped_in_a_row,
                st.scale
            );
        }
        if pb.is_hidden() && self.dist.is_root() {
            println!("epoch {epoch} step {step}/{} {msg}", self.steps_per_epoch);
        }
        pb.set_message(msg);
        if epoch == self.first_epoch && step == self.args.log_every && self.gpu.is_cpu() && self.dist.is_root() {
            pb.suspend(|| {
                eprintln!(
                    "note: {} is a CPU adapter; expect about {:.0} s per epoch",
                    self.gpu.info.name,
                    self.train_set.len() as f64 / rate
                )
            });
        }
        Ok(())
    }
}

/// `--profile`: this step runs timed, one pass per dispatch (same results), and prints the
/// per-kernel and per-conv-layer tables as `senet bench` does.
fn profile_step(net: &mut Network, plan: &StepPlan, epoch: usize, step: usize, pb: &ProgressBar) -> Result<()> {
    let ceilings = crate::bench::ceilings(&net.gpu)?;
    let profile = crate::bench::profiled_step(net, plan, ceilings)?;
    pb.suspend(|| {
        println!(
            "per-kernel profile of epoch {epoch}, step {}:\n{}\n{}",
            step + 1,
            crate::bench::format_kernels(&profile.kernels),
            crate::bench::format_conv_layers(&profile.conv_layers)
        )
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Data parallelism: the checks and copies between ranks (the collectives are in `dist`)

/// Rank 0 sends its flags, settings (after `--resume` read them) and data sizes; a rank whose own
/// differ names the first field and ends the job (ranks with different flags would train
/// different models, or deadlock).
fn same_config_on_every_rank(
    dist: &Dist,
    flags: &TrainArgs,
    args: &TrainArgs,
    dataset: &str,
    train_set: &crate::data::Dataset,
    test_set: &crate::data::Dataset,
) -> Result<()> {
    if dist.size <= 1 {
        return Ok(());
    }
    let mine = serde_json::json!({
        "flags": flags,
        "train": args,
        "dataset": dataset,
        "training images": train_set.len(),
        "test images": test_set.len(),
    });
    let bytes = dist.broadcast_bytes(serde_json::to_vec(&mine)?)?;
    let root: serde_json::Value = serde_json::from_slice(&bytes).context("rank 0's settings are not JSON")?;
    // Agreed by every rank before any goes on, so rank 0 writes nothing when another differs.
    let diff = first_difference(&root, &mine, "");
    if dist.any(diff.is_some())? {
        if let Some(d) = &diff {
            eprintln!(
                "error on {}: the settings differ from rank 0's: {d}; every rank must be started with the same \
                 flags and data",
                dist.who()
            );
        }
        return Err(Collective(
            "the ranks were started with different settings or data (each differing rank names its first \
             difference above)"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// The first field where `a` (rank 0's) and `b` (ours) differ: "train.lr is 0.1 here, 0.05 on rank 0".
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    if let (Value::Object(x), Value::Object(y)) = (a, b) {
        let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
        for k in keys {
            let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
            let (va, vb) = (x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null));
            if let Some(d) = first_difference(va, vb, &p) {
                return Some(d);
            }
        }
        return None;
    }
    (a != b).then(|| format!("{path} is {b} here, {a} on rank 0"))
}

/// Rank 0's parameters, optimizer state, optimizer step and batch-norm running statistics on
/// every rank: the same start everywhere (a fresh run's init, `--init` or `--resume`).
fn broadcast_model(net: &mut Network, dist: &Dist) -> Result<()> {
    if dist.size <= 1 {
        return Ok(());
    }
    for t in std::iter::once(&net.flat.values).chain(&net.flat.state) {
        let mut v = t.read::<f32>(&net.gpu)?;
        dist.broadcast_f32(&mut v)?;
        t.write(&net.gpu, &v)?;
    }
    broadcast_bn_buffers(net, dist)?;
    let step = net.step;
    net.step = dist.from_root(|| Ok(step))?;
    Ok(())
}

/// Rank 0's [`RunState`] (a new run's, or the `--resume`d one's) on every rank.
fn share_state(dist: &Dist, root: Option<RunState>) -> Result<RunState> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Shared {
        history: Vec<EpochMetrics>,
        /// None before the first epoch (-∞, which JSON cannot hold).
        best_acc: Option<f64>,
        partial: Option<(usize, run::RankSums)>,
        ranks: usize,
    }
    let shared = dist.from_root(|| {
        let s = root.context("rank 0 has no run state")?;
        Ok(Shared {
            history: s.history,
            best_acc: s.best_acc.is_finite().then_some(s.best_acc),
            partial: s.partial,
            ranks: s.ranks,
        })
    })?;
    Ok(RunState {
        history: shared.history,
        best_acc: shared.best_acc.unwrap_or(f64::NEG_INFINITY),
        partial: shared.partial,
        ranks: shared.ranks,
    })
}

/// Rank 0's batch-norm running statistics on every rank (before evaluating and saving).
fn broadcast_bn_buffers(net: &Network, dist: &Dist) -> Result<()> {
    for b in &net.bn {
        for t in [&b.running_mean, &b.running_var] {
            let mut v = t.read::<f32>(&net.gpu)?;
            dist.broadcast_f32(&mut v)?;
            t.write(&net.gpu, &v)?;
        }
    }
    Ok(())
}

/// Compare a checksum of every rank's parameters: they must be bit for bit the same after each
/// epoch (same start, same averaged gradients, same update). Returns the checksum.
fn same_weights_on_every_rank(net: &Network, dist: &Dist, epoch: usize) -> Result<u64> {
    let sum = dist::checksum(&net.flat.values.read::<f32>(&net.gpu)?);
    let all = dist.all_gather_u64(sum)?;
    if all.iter().any(|&s| s != all[0]) {
        let list: Vec<String> = all.iter().enumerate().map(|(r, s)| format!("rank {r}: {s:016x}")).collect();
        return Err(Collective(format!(
            "the ranks' weights differ after epoch {epoch} (checksums {}); data-parallel training must keep them \
             identical — a rank missed an all-reduce or computes differently (different adapters or drivers?)",
            list.join(", ")
        ))
        .into());
    }
    Ok(sum)
}
