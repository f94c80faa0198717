//! Keeping the replicas one model: the checks and copies between ranks that data-parallel
//! training makes outside the step (the collectives themselves are in [`crate::dist`]). Each is the
//! identity for one process.

use anyhow::{Context, Result};

use crate::args::TrainArgs;
use crate::data::Dataset;
use crate::dist::{Collective, Dist, checksum};
use crate::metrics::EpochMetrics;
use crate::model::plan::Network;
use crate::run::{RankSums, RunState};

/// Rank 0 sends its flags, settings (after `--resume` read them) and data sizes; a rank whose own
/// differ names the first field and ends the job (ranks with different flags would train
/// different models, or deadlock).
pub fn same_config_on_every_rank(
    dist: &Dist,
    flags: &TrainArgs,
    args: &TrainArgs,
    dataset: &str,
    train_set: &Dataset,
    test_set: &Dataset,
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
    // Agreed by every rank before any goes on, so rank 0 writes nothing when another differs. Rank
    // 0 says every rank's first difference: a line a differing rank printed itself could be lost
    // when mpirun ends the job on rank 0's exit (seen once under load).
    let diff = first_difference(&root, &mine, "").unwrap_or_default();
    let diffs = dist.all_gather_bytes(diff.into_bytes())?;
    let lines: Vec<String> = diffs
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.is_empty())
        .map(|(r, d)| format!("rank {r}: {}", String::from_utf8_lossy(d)))
        .collect();
    if !lines.is_empty() {
        return Err(Collective(format!(
            "the ranks were started with different settings or data; every rank must be started with the same \
             flags and data. First difference from rank 0's: {}",
            lines.join("; ")
        ))
        .into());
    }
    Ok(())
}

/// The first field where `a` (rank 0's) and `b` (ours) differ: "train.lr is 0.1 there, 0.05 on rank 0".
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
    (a != b).then(|| format!("{path} is {b} there, {a} on rank 0"))
}

/// Rank 0's parameters, optimizer state, optimizer step and batch-norm running statistics on
/// every rank: the same start everywhere (a fresh run's init, `--init` or `--resume`).
pub fn broadcast_model(net: &mut Network, dist: &Dist) -> Result<()> {
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
pub fn share_state(dist: &Dist, root: Option<RunState>) -> Result<RunState> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Shared {
        history: Vec<EpochMetrics>,
        /// None before the first epoch (-∞, which JSON cannot hold).
        best_acc: Option<f64>,
        partial: Option<(usize, RankSums)>,
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
pub fn broadcast_bn_buffers(net: &Network, dist: &Dist) -> Result<()> {
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
pub fn same_weights_on_every_rank(net: &Network, dist: &Dist, epoch: usize) -> Result<u64> {
    let sum = checksum(&net.flat.values.read::<f32>(&net.gpu)?);
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
