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
use crate::eval::{evaluate, plans_for, read_sums};
use crate::gpu::Gpu;
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
        state.partial.map_or(String::new(), |(k, _)| format!(" and {k} steps of the next")),
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
    let resumed = run::resumed_args(args)?;
    let args = resumed.as_ref().unwrap_or(args);
    args.validate()?;
    let (dataset, train_set, val_set, test_set, config) = load_data(args)?;
    let pre = Preprocess { normalize: config.normalize.clone(), augment: args.augment };

    let mut net = Network::new_in(gpu.clone(), config.clone(), args.optimizer_config(), args.seed, args.precision)?;
    net.label_smoothing = args.label_smoothing as f32;
    if let Some(init) = &args.init {
        let sd = checkpoint::load(init)?;
        checkpoint::apply(&mut net, &sd, &init.display().to_string())?;
    }
    let lens: Vec<usize> =
        [train_set.len(), test_set.len()].into_iter().chain(val_set.as_ref().map(Dataset::len)).collect();
    let plans = plans_for(&net, args.batch_size, &lens)?;
    print_tuning(&gpu);
    let (mut run, mut state) = open_run(args, &config, &dataset, &mut net)?;

    println!(
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
    );
    match &val_set {
        Some(v) => println!(
            "best.safetensors is chosen on validation accuracy ({} images held out of training, seed {}); test beside it",
            v.len(),
            args.seed
        ),
        None => println!("best.safetensors is chosen on test accuracy (no --val-split), so that figure is optimistic"),
    }
    println!("{}", EpochMetrics::table_header(val_set.is_some()));

    let steps_per_epoch = train_set.len().div_ceil(args.batch_size);
    let t = Trainer {
        args,
        gpu,
        train_set: Arc::new(train_set),
        pre,
        plans,
        steps_per_epoch,
        total_steps: steps_per_epoch * args.epochs(),
        first_epoch: state.history.len() + 1,
    };
    let test_set = Arc::new(test_set);
    let val_set = val_set.map(Arc::new);
    crate::exit::install_stop_handler();
    for epoch in t.first_epoch..=args.epochs() {
        let t0 = Instant::now();
        let partial = state.partial.take();
        let ((l, c, n), train_secs) = t.train_epoch(&mut net, &run, &state, epoch, partial, t0)?;
        let val = match &val_set {
            Some(v) => Some(evaluate(&net, &t.plans, v, args.batch_size, &t.pre)?),
            None => None,
        };
        let (test_loss, test_acc, test_top5_acc) = evaluate(&net, &t.plans, &test_set, args.batch_size, &t.pre)?;
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
        println!("{}", m.table_row());
        run.finish_epoch(&net, &mut state, m)?;
        if crate::exit::stop_requested() && epoch < args.epochs() {
            return Err(Interrupted { out: args.out.clone(), epoch: epoch + 1, step: 0 }.into());
        }
    }
    if let Some(b) = state.history.iter().find(|m| m.selection_acc() == state.best_acc) {
        match b.val_acc {
            Some(v) => {
                println!("best validation accuracy {v:.4} at epoch {} (test accuracy {:.4})", b.epoch, b.test_acc)
            }
            None => println!("best test accuracy {:.4} at epoch {}", b.test_acc, b.epoch),
        }
    }
    println!("checkpoints and metrics in {}", args.out.display());
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
}

impl Trainer<'_> {
    /// The training steps of `epoch`, from where `partial` left it: (loss sum, correct, count)
    /// and the seconds since `t0`. Ctrl-C saves the run after the step and ends it ([`Interrupted`]).
    fn train_epoch(
        &self,
        net: &mut Network,
        run: &RunFolder,
        state: &RunState,
        epoch: usize,
        partial: Option<(usize, EpochSums)>,
        t0: Instant,
    ) -> Result<((f64, f64, f64), f64)> {
        let (args, gpu) = (self.args, &self.gpu);
        for p in self.plans.values() {
            clear_metrics(gpu, &p.train_result);
        }
        let skip = self.restore_partial(partial);
        let pb = bar(self.steps_per_epoch as u64, format!("epoch {epoch}/{}", args.epochs()));
        pb.set_position(skip as u64);
        let mut in_flight: Option<wgpu::SubmissionIndex> = None;
        let batches =
            loader::epoch_batches(self.train_set.clone(), args.batch_size, self.pre.clone(), true, args.seed, epoch);
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
                run.save(net, state, Some((step + 1, (l as f32, c as f32, n as f32))))?;
                return Err(Interrupted { out: args.out.clone(), epoch, step: step + 1 }.into());
            }
        }
        gpu.wait()?;
        let sums = read_sums(net, &self.plans, false)?;
        let train_secs = t0.elapsed().as_secs_f64();
        pb.finish_and_clear();
        if !sums.0.is_finite() {
            let tail = self.train_set.len() - (self.steps_per_epoch - 1) * args.batch_size;
            let last = self.plans.get(&tail).context("no plan for the last batch")?;
            return Err(divergence(net, last, epoch, self.steps_per_epoch));
        }
        Ok((sums, train_secs))
    }

    /// The learning rate of step `step` (1-based) of `epoch`.
    fn lr_at(&self, epoch: usize, step: usize) -> f64 {
        let a = self.args;
        let global = (epoch - 1) * self.steps_per_epoch + step - 1;
        lr_at(a.lr, a.schedule, a.warmup_epochs, global, self.steps_per_epoch, self.total_steps)
    }

    /// Resuming inside an epoch: its metric sums so far go back into the buffer of the
    /// full-batch plan, the one every step before the last uses. Returns the steps done.
    fn restore_partial(&self, partial: Option<(usize, EpochSums)>) -> usize {
        partial.map_or(0, |(steps, sums)| {
            if let Some(p) = self.plans.get(&self.args.batch_size.min(self.train_set.len())) {
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
        let rate = n / t0.elapsed().as_secs_f64();
        let mut msg =
            format!("loss {:.4} acc {:.4} lr {:.3e} {:.0} img/s", l / n, c / n, self.lr_at(epoch, step), rate);
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
        if pb.is_hidden() {
            println!("epoch {epoch} step {step}/{} {msg}", self.steps_per_epoch);
        }
        pb.set_message(msg);
        if epoch == self.first_epoch && step == self.args.log_every && self.gpu.is_cpu() {
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
