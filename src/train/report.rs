//! What the loop tells the user: the banner, the progress bar and its running line, the table's
//! closing lines, `--profile`'s tables, and where a diverged run went wrong.

use std::time::Instant;

use anyhow::{Result, ensure};
use indicatif::ProgressBar;

use super::Trainer;
use crate::eval::read_sums;
use crate::gpu::Gpu;
use crate::metrics::EpochMetrics;
use crate::model::plan::{Network, StepPlan};
use crate::progress::format_duration;
use crate::run::RunState;

/// f16: consecutive skipped steps after which the run stops (each halves the loss scale, so 50 is
/// a factor 2^50 — no gradient overflow needs that; a forward pass that overflows f16 never recovers).
const MAX_SKIPPED_IN_A_ROW: u32 = 50;

/// The loss went NaN or infinite: name the step and the first layer whose output (or the first
/// parameter) is not finite. Nothing is saved, so the last good checkpoint stays as it was.
pub(super) fn divergence(net: &Network, plan: &StepPlan, epoch: usize, step: usize) -> anyhow::Error {
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

pub(super) fn print_tuning(gpu: &Gpu) {
    let tuned = gpu.tuner.summary();
    if tuned.timed + tuned.cached > 0 {
        let cache = gpu.tuner.path.as_ref().map_or("memory only".to_string(), |p| p.display().to_string());
        println!(
            "conv kernels ({:?} tuning): {} shapes timed in {:.1} s, {} from the cache ({cache})",
            gpu.tuner.mode, tuned.timed, tuned.seconds, tuned.cached
        );
    }
}

impl Trainer<'_> {
    /// Print a line on rank 0 (the only rank that talks, but for errors).
    pub(super) fn say(&self, line: String) {
        if self.dist.is_root() {
            println!("{line}");
        }
    }

    /// What is about to be trained, on what, and how the best checkpoint is chosen.
    pub(super) fn print_banner(&self, net: &Network, dataset: &str) {
        let args = self.args;
        self.say(format!(
            "{} width {} (r={}) on {dataset}: {} params | {} train / {} test images {:?} | {} | batch {} | {:?}",
            args.net.model,
            args.net.width,
            args.net.reduction,
            net.graph.parameter_count(),
            self.train_set.len(),
            self.test_set.len(),
            self.train_set.shape,
            self.gpu.describe(),
            args.batch_size,
            args.optimizer
        ));
        self.banner_data();
        self.banner_parallel(net);
        self.banner_recipes(net);
        self.banner_best();
        self.say(EpochMetrics::table_header(self.val_set.is_some()));
    }

    /// The banner's image-folder line: the transforms and the loader.
    fn banner_data(&self) {
        if let Some(files) = &self.train_set.files {
            let timm: String =
                [self.pre.aa.as_ref().map(|a| a.describe()), self.pre.erase.as_ref().map(|e| e.describe())]
                    .into_iter()
                    .flatten()
                    .map(|d| format!(" + {d}"))
                    .collect();
            self.say(format!(
                "{}; {} loader workers; {}",
                files.describe(self.pre.augment, &timm),
                self.pre.load.workers.max(1),
                match &self.pre.normalize {
                    Some(n) => format!("normalised with mean/std {n:?}"),
                    None => "not normalised".into(),
                }
            ));
        }
    }

    /// The banner's data-parallel line (under mpirun) or the --sync-bn note.
    fn banner_parallel(&self, net: &Network) {
        let (args, dist) = (self.args, self.dist);
        if dist.size > 1 {
            let floats = net.flat.grads.numel();
            let shard_len = self.train_set.len().div_ceil(dist.size);
            self.say(format!(
                "data parallel over {} MPI ranks: batch {} per rank ({} in all); each epoch's shuffle is the same on \
                 every rank, padded from {} to {} images, {} per rank (DistributedSampler); gradients averaged by one \
                 host-staged all-reduce of {floats} floats ({:.1} MB) per step; {}; test set split by batches over \
                 the ranks",
                dist.size,
                args.batch_size,
                args.batch_size * dist.size,
                self.train_set.len(),
                shard_len * dist.size,
                shard_len,
                floats as f64 * 4e-6,
                if net.sync_bn {
                    "batch norm with the statistics of all ranks' batches together (--sync-bn, as SyncBatchNorm: \
                     each batch norm's per-channel statistics and gradient sums exchanged between the ranks, \
                     2 host-staged exchanges per batch norm per step)"
                } else {
                    "batch norm with per-rank statistics, rank 0's running statistics"
                }
            ));
        } else if args.sync_bn {
            self.say(
                "--sync-bn on one process: batch norm as without it (one batch, nothing to merge; as PyTorch's \
                 SyncBatchNorm outside a group of several processes)"
                    .into(),
            );
        }
    }

    /// The banner's training-recipe lines: gradient accumulation, Mixup/CutMix, the EMA.
    fn banner_recipes(&self, net: &Network) {
        let (args, dist) = (self.args, self.dist);
        if args.grad_accum_steps > 1 {
            self.say(format!(
                "gradients accumulated over {} batches per optimizer step (--grad-accum-steps): effective batch {}, \
                 {} optimizer steps per epoch (the learning-rate schedule counts these); each batch's loss divided \
                 by its group's batch count, batch norm per batch",
                args.grad_accum_steps,
                args.grad_accum_steps * args.batch_size * dist.size,
                self.updates_per_epoch
            ));
        }
        if let Some((m, _)) = &self.mixup {
            let off = if m.off_epoch > 0 { format!(", off after epoch {}", m.off_epoch) } else { String::new() };
            self.say(format!(
                "Mixup/CutMix (timm's, {} mode{off}): mixup alpha {}, cutmix alpha {}, prob {}, switch prob {}, \
                 smoothing {}; soft-target loss; train_acc counts each mixed target's dominant class (timm reports \
                 no training accuracy)",
                m.mode.name(),
                m.mixup_alpha,
                m.cutmix_alpha,
                m.prob,
                m.switch_prob,
                m.smoothing
            ));
        }
        if let Some(ema) = &net.ema {
            self.say(format!(
                "model EMA (timm's ModelEmaV3): decay {}{}, updated after every optimizer step, evaluated each epoch \
                 (EMA columns), saved as ema.safetensors",
                ema.decay,
                if ema.warmup { " with timm's warmup" } else { "" }
            ));
        }
    }

    /// The banner's line on how best.safetensors is chosen.
    fn banner_best(&self) {
        let args = self.args;
        let whose = if args.best_on() == crate::args::BestOn::Ema { "the EMA's " } else { "" };
        self.say(match &self.val_set {
            Some(v) => format!(
                "best.safetensors is chosen on {whose}validation accuracy ({} images held out of training, seed {}); \
                 test beside it",
                v.len(),
                args.seed
            ),
            None => format!(
                "best.safetensors is chosen on {whose}test accuracy (no --val-split), so that figure is optimistic"
            ),
        });
    }

    /// The closing lines: the best epoch and where the run folder is.
    pub(super) fn print_best(&self, state: &RunState) {
        if let Some(b) = state.history.iter().find(|m| m.selection_acc() == state.best_acc) {
            if b.best_on_ema && b.ema_test_acc.is_some() {
                self.say(format!(
                    "best EMA {} accuracy {:.4} at epoch {} (best.safetensors holds the EMA)",
                    if b.ema_val_acc.is_some() { "validation" } else { "test" },
                    b.selection_acc(),
                    b.epoch
                ));
                self.say(format!("checkpoints and metrics in {}", self.args.out.display()));
                return;
            }
            self.say(match b.val_acc {
                Some(v) => {
                    format!("best validation accuracy {v:.4} at epoch {} (test accuracy {:.4})", b.epoch, b.test_acc)
                }
                None => format!("best test accuracy {:.4} at epoch {}", b.test_acc, b.epoch),
            });
        }
        self.say(format!("checkpoints and metrics in {}", self.args.out.display()));
    }

    /// The whole run's time left after `step` steps of `epoch`: the training steps of this and
    /// the later epochs and every evaluation pass still to come, at the rates measured so far
    /// (None until a few steps are timed).
    pub(super) fn run_secs_left(&self, epoch: usize, step: usize) -> Option<f64> {
        let epochs = self.args.epochs();
        let steps = self.steps_per_epoch.saturating_sub(step) + (epochs - epoch) * self.steps_per_epoch;
        let evals = (epochs - epoch + 1) * self.eval_images_per_epoch();
        self.clock.borrow().remaining(steps, self.args.batch_size, evals)
    }

    /// The images this rank evaluates after each epoch: the validation set, its share of the
    /// test set.
    pub(super) fn eval_images_per_epoch(&self) -> usize {
        self.val_set.as_ref().map_or(0, |v| v.len()) + self.test_set.len().div_ceil(self.dist.size)
    }

    /// The running loss and accuracy after `step` steps (a read of the metrics buffers), and on a
    /// CPU adapter, once, how long an epoch will take.
    pub(super) fn log_progress(
        &self,
        net: &Network,
        plan: &StepPlan,
        epoch: usize,
        step: usize,
        t0: Instant,
        pb: &ProgressBar,
    ) -> Result<()> {
        let (l, c, n) = read_sums(net, &self.plans.borrow(), false)?;
        if !l.is_finite() {
            return Err(divergence(net, plan, epoch, step));
        }
        let now = Instant::now();
        let secs = now.duration_since(t0).as_secs_f64();
        // Timed by this process: the steps and images since the epoch started or was resumed.
        let (resumed_steps, resumed_images) = self.resumed.get();
        let timed_steps = step.saturating_sub(resumed_steps).max(1) as f64;
        let rate = (n - resumed_images) / secs;
        self.clock.borrow_mut().steps_done(step, now);
        let mut msg = if self.dist.size > 1 {
            // Rank 0's running loss; images/s of all ranks (each trains as many).
            let reduce = self.reduce_secs.get();
            let mut m = format!(
                "loss {:.4} acc {:.4} (rank 0) lr {:.3e} {:.0} img/s | all-reduce {:.1} ms/step, {:.0} %",
                l / n,
                c / n,
                self.lr_at(epoch, step),
                rate * self.dist.size as f64,
                1e3 * reduce / timed_steps,
                100.0 * reduce / secs
            );
            if net.sync_bn {
                let sync = self.sync_bn_secs.get();
                m += &format!(" | sync-bn {:.1} ms/step, {:.0} %", 1e3 * sync / timed_steps, 100.0 * sync / secs);
            }
            m
        } else {
            format!("loss {:.4} acc {:.4} lr {:.3e} {:.0} img/s", l / n, c / n, self.lr_at(epoch, step), rate)
        };
        // timm's data_time: how much of each step the loop waited for its batch.
        let data = self.data_secs.get();
        msg += &format!(" | data {:.1} ms/step, {:.0} %", 1e3 * data / timed_steps, 100.0 * data / secs);
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
        if let Some(c) = &net.clip {
            // The last step's total norm, before clipping (what clip_grad_norm_ returns).
            let st = c.read(&self.gpu)?;
            msg += &format!(" | grad norm {:.4}{}", st.total_norm, if st.coef < 1.0 { " (clipped)" } else { "" });
        }
        if let Some(left) = self.run_secs_left(epoch, step) {
            msg += &format!(" | run ETA {}", format_duration(left));
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
pub(super) fn profile_step(
    net: &mut Network,
    plan: &StepPlan,
    epoch: usize,
    step: usize,
    pb: &ProgressBar,
) -> Result<()> {
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
