//! One data-parallel training step: this rank's forward and backward (stopping at each batch
//! norm of a `--sync-bn` plan for the ranks to combine it), the gradients averaged over the
//! ranks, then the same update on every rank — PyTorch DistributedDataParallel's step, over the
//! collectives of [`crate::dist::Dist`].

use std::time::Instant;

use anyhow::{Context, Result};

use super::plan::{BnExchange, ExchangeKind, Network, StepPlan};
use crate::dist::Dist;
use crate::ops::batch_norm;

/// What a data-parallel step reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepReport {
    /// A signal reached some rank: every rank stops after this step.
    pub stop: bool,
    /// Seconds of the host-staged gradient all-reduce: read-back, MPI (with any wait for a slower
    /// rank), write.
    pub allreduce_secs: f64,
    /// `--sync-bn`: seconds of the batch norms' exchanges, counted likewise (each after the GPU
    /// finished the dispatches before it).
    pub sync_bn_secs: f64,
}

/// One data-parallel step on the batch in `plan`: forward and backward (a `--sync-bn` plan
/// stopping at each of its [`BnExchange`]s for [`exchange_bn`]), the gradients averaged over the
/// ranks (read back, MPI all-reduce sum, / N, written back), then (`Network::apply_update`)
/// `--clip-grad-norm`'s clipping of the averaged gradients (DDP's order: clip after the
/// all-reduce) and the optimizer, the same update on every rank. Waits for the GPU (the
/// read-back). `stop` (a signal reached this rank) rides along as one more value of the all-reduce.
pub fn data_parallel_step(net: &mut Network, plan: &StepPlan, dist: &Dist, stop: bool) -> Result<StepReport> {
    data_parallel_micro_step(net, plan, dist, stop, 0, 1)
}

/// Micro-batch `index` of a group of `count` (`--grad-accum-steps`) as
/// [`data_parallel_step`]: every micro-batch runs its forward and backward and adds its gradients
/// into the accumulator; only the group's last all-reduces them (once per optimizer step, as DDP
/// under `no_sync()` for the others, which is what timm's train.py does) and updates. A
/// micro-batch before the last neither waits for the GPU nor exchanges anything but `--sync-bn`'s
/// statistics, and reports `stop` false: ranks stop only where a step ends.
pub fn data_parallel_micro_step(
    net: &mut Network,
    plan: &StepPlan,
    dist: &Dist,
    stop: bool,
    index: usize,
    count: usize,
) -> Result<StepReport> {
    let m = net.begin_micro_batch(plan, index, count);
    let mut sync_bn_secs = 0.0;
    net.gradient_pass_exchanging(plan, |x| {
        net.gpu.wait()?;
        let t = Instant::now();
        exchange_bn(net, x, dist)?;
        sync_bn_secs += t.elapsed().as_secs_f64();
        Ok(())
    })?;
    net.accumulate(m);
    if !m.updates() {
        return Ok(StepReport { stop: false, allreduce_secs: 0.0, sync_bn_secs });
    }
    net.gpu.wait()?;
    let t = Instant::now();
    let mut grads = net.flat.grads.read::<f32>(&net.gpu).context("reading the gradients back")?;
    grads.push(f32::from(u8::from(stop)));
    dist.all_reduce_sum_f32(&mut grads).context("the gradient all-reduce")?;
    let stop_any = grads.pop().is_some_and(|s| s > 0.0);
    let n = dist.size as f32;
    for g in &mut grads {
        *g /= n;
    }
    net.flat.grads.write(&net.gpu, &grads)?;
    let secs = t.elapsed().as_secs_f64();
    net.apply_update();
    Ok(StepReport { stop: stop_any, allreduce_secs: secs, sync_bn_secs })
}

/// `--sync-bn`: combine one batch norm's per-channel numbers over the ranks, in place — read this
/// rank's back, all-gather every rank's, merge them (statistics: Chan's merge of (count, mean,
/// M2)) or add them (gradient sums) in rank order, so every rank computes the same bits, and
/// write the result back for the rest of the step. With one rank, the buffer is left as it is.
pub fn exchange_bn(net: &Network, x: &BnExchange, dist: &Dist) -> Result<()> {
    if dist.size <= 1 {
        return Ok(());
    }
    let mine = x.buffer.read::<f32>(&net.gpu).context("reading the batch-norm numbers back")?;
    let all = dist.all_gather_f32(&mine)?;
    let combined = match x.kind {
        ExchangeKind::Statistics => batch_norm::merge_rank_statistics(&all, x.c)?,
        ExchangeKind::GradSums => batch_norm::sum_rank_grad_sums(&all, x.c)?,
    };
    x.buffer.write(&net.gpu, &combined)
}
