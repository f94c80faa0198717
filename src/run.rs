//! The run folder `train --out` writes and `--resume` reads:
//!
//! - `config.json`: `{"model": ModelConfig, "train": TrainArgs, "dataset": name}`, written once;
//! - `metrics.csv` (one line per finished epoch) and `metrics.png` (its plot);
//! - `best.safetensors` (best validation accuracy with `--val-split`, else best test accuracy; with
//!   `--model-ema` the EMA's, and then the EMA's weights, unless `--best-on model`),
//!   `last.safetensors`, and with `--model-ema` `ema.safetensors`;
//! - `resume.safetensors`: the model, optimizer state and step with the metrics history, the best
//!   accuracy and, after a Ctrl-C inside an epoch, how far that epoch got — written by one
//!   function, [`RunFolder::save`], at the end of every epoch and on Ctrl-C.
//!
//! `--resume` reads the run's settings back ([`resumed_args`]); [`Interrupted`] is the error a
//! signal ends training with once the folder holds what `--resume` needs.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::args::TrainArgs;
use crate::checkpoint;
use crate::exit::Interrupted;
use crate::metrics::{CSV_HEADER, EpochMetrics};
use crate::model::ModelConfig;
use crate::model::plan::Network;

/// The model, optimizer state, step, metrics history of the last finished epoch.
pub const RESUME_FILE: &str = "resume.safetensors";

/// `--model-ema`: the EMA's weights as of the last save (a plain state dict, as last.safetensors).
pub const EMA_FILE: &str = "ema.safetensors";

/// (loss sum, correct, count) of the training steps of an epoch so far, as the GPU keeps them.
pub type EpochSums = (f32, f32, f32);

/// Each rank's [`EpochSums`] when an epoch was interrupted (one entry in a single process): every
/// rank restores its own, so a resumed data-parallel epoch sums exactly as an uninterrupted one.
pub type RankSums = Vec<EpochSums>;

/// Where a run stands.
#[derive(Clone, Debug, Default)]
pub struct RunState {
    /// The finished epochs.
    pub history: Vec<EpochMetrics>,
    /// The best accuracy so far that best.safetensors is chosen on ([`EpochMetrics::selection_acc`]:
    /// validation, else test; -∞ before the first epoch).
    pub best_acc: f64,
    /// (steps done, each rank's metric sums) of an epoch interrupted part-way.
    pub partial: Option<(usize, RankSums)>,
    /// How many data-parallel ranks trained the run (1: one process); `--resume` needs as many.
    pub ranks: usize,
}

/// An open run folder: where it is and its metrics.csv, open for appending.
pub struct RunFolder {
    pub dir: PathBuf,
    csv: File,
    /// The data-parallel rank count, recorded in resume.safetensors (1 in one process).
    pub ranks: usize,
}

/// The settings of the run in `dir` (its config.json), for `--resume`.
fn saved_args(dir: &Path) -> Result<TrainArgs> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("--resume: reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let train = v.get("train").cloned().with_context(|| format!("{}: no field \"train\"", path.display()))?;
    serde_json::from_value(train)
        .with_context(|| format!("{}: field \"train\" is not a training configuration", path.display()))
}

/// `--resume RUN_DIR`: the run's own settings and folder, with `--epochs` if given.
pub fn resumed_args(args: &TrainArgs) -> Result<Option<TrainArgs>> {
    let Some(dir) = &args.resume else { return Ok(None) };
    let mut saved = saved_args(dir)?;
    saved.out = dir.clone();
    saved.epochs = args.epochs.or(saved.epochs);
    saved.resume = Some(dir.clone());
    // How the loader works, not what it makes: this command line's. --skip-bad-images may be
    // added to continue past an unreadable file that stopped the run.
    saved.data.workers = args.data.workers;
    saved.data.cache_mb = args.data.cache_mb;
    saved.data.fail_loader_at = args.data.fail_loader_at;
    saved.data.skip_bad_images |= args.data.skip_bad_images;
    Ok(Some(saved))
}

/// `--resume RUN_DIR` with flags given on the command line (`given`: their clap ids, the field
/// names) that differ from the run's own settings: an error naming each with both values.
/// `--epochs` (may raise the total), `--skip-bad-images` (may be added) and `--resume` itself are
/// exempt.
pub fn resume_conflicts(args: &TrainArgs, given: &[&str]) -> Result<()> {
    let Some(dir) = &args.resume else { return Ok(()) };
    let flat = |a: &TrainArgs| -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut v = match serde_json::to_value(a)? {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        if let Some(serde_json::Value::Object(data)) = v.remove("data") {
            v.extend(data);
        }
        Ok(v)
    };
    let (ours, theirs) = (flat(args)?, flat(&saved_args(dir)?)?);
    let show = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "none".into(),
        other => other.to_string(),
    };
    let mut diffs = Vec::new();
    for id in given.iter().filter(|id| !matches!(**id, "epochs" | "resume" | "skip_bad_images")) {
        let theirs = theirs.get(*id).unwrap_or(&serde_json::Value::Null);
        if let Some(ours) = ours.get(*id).filter(|v| *v != theirs) {
            diffs.push(format!("--{} {} (the run has {})", id.replace('_', "-"), show(ours), show(theirs)));
        }
    }
    anyhow::ensure!(
        diffs.is_empty(),
        "--resume {} continues the run with its own settings; these flags differ from them: {}. Drop them, or start \
         a new run with --init {}",
        dir.display(),
        diffs.join(", "),
        dir.join("last.safetensors").display()
    );
    Ok(())
}

/// The error that ends a run a signal stopped after saving its resume checkpoint in `out`.
pub fn interrupted(out: &Path, epoch: usize, step: usize, quiet: bool) -> Interrupted {
    Interrupted { out: out.to_path_buf(), saved: out.join(RESUME_FILE), epoch, step, quiet }
}

impl RunFolder {
    /// A new run in `dir`: the folder, config.json and metrics.csv with its header.
    pub fn create(dir: &Path, config: &ModelConfig, args: &TrainArgs, dataset: &str) -> Result<(Self, RunState)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating run folder {}", dir.display()))?;
        let run_config = serde_json::json!({ "model": config, "train": args, "dataset": dataset });
        crate::files::write_atomic(&dir.join("config.json"), serde_json::to_string_pretty(&run_config)?.as_bytes())?;
        let csv_path = dir.join("metrics.csv");
        let mut csv = File::create(&csv_path).with_context(|| format!("creating {}", csv_path.display()))?;
        writeln!(csv, "{CSV_HEADER}").with_context(|| format!("writing {}", csv_path.display()))?;
        let state = RunState { best_acc: f64::NEG_INFINITY, ranks: 1, ..RunState::default() };
        Ok((RunFolder { dir: dir.to_path_buf(), csv, ranks: 1 }, state))
    }

    /// The run in `dir` as it was last saved: `net` gets its weights, optimizer state and step;
    /// metrics.csv keeps the finished epochs' lines only (a crash may have left a later one).
    pub fn resume(dir: &Path, net: &mut Network) -> Result<(Self, RunState)> {
        let path = dir.join(RESUME_FILE);
        let meta = checkpoint::load_resume(&path, net)?;
        let field = |k: &str| meta.get(k).with_context(|| format!("{}: metadata field {k} missing", path.display()));
        let history: Vec<EpochMetrics> = serde_json::from_str(field("history")?)
            .with_context(|| format!("{}: metadata field history", path.display()))?;
        let partial = match meta.get("epoch_steps") {
            Some(steps) => {
                let steps: usize =
                    steps.parse().with_context(|| format!("{}: metadata field epoch_steps", path.display()))?;
                let sums: RankSums = match meta.get("epoch_sums_per_rank") {
                    Some(per_rank) => serde_json::from_str(per_rank)
                        .with_context(|| format!("{}: metadata field epoch_sums_per_rank", path.display()))?,
                    None => vec![
                        serde_json::from_str(field("epoch_sums")?)
                            .with_context(|| format!("{}: metadata field epoch_sums", path.display()))?,
                    ],
                };
                Some((steps, sums))
            }
            None => None,
        };
        let best_acc =
            field("best_acc")?.parse().with_context(|| format!("{}: metadata field best_acc", path.display()))?;
        // Runs saved before data parallelism have no field: one process.
        let ranks = match meta.get("ranks") {
            Some(r) => r.parse().with_context(|| format!("{}: metadata field ranks", path.display()))?,
            None => 1,
        };
        let csv_path = dir.join("metrics.csv");
        let text: String =
            std::iter::once(format!("{CSV_HEADER}\n")).chain(history.iter().map(|m| m.csv_line())).collect();
        crate::files::write_atomic(&csv_path, text.as_bytes())?;
        let csv = std::fs::OpenOptions::new()
            .append(true)
            .open(&csv_path)
            .with_context(|| format!("opening {}", csv_path.display()))?;
        Ok((RunFolder { dir: dir.to_path_buf(), csv, ranks }, RunState { history, best_acc, partial, ranks }))
    }

    /// Everything `--resume` needs: last.safetensors, then resume.safetensors (one atomic write)
    /// with the history and best accuracy, and with `partial` — the steps done and metric sums of
    /// the current epoch, per rank — when saving inside one (Ctrl-C). Both save paths come
    /// through here.
    pub fn save(&self, net: &Network, state: &RunState, partial: Option<(usize, &[EpochSums])>) -> Result<()> {
        checkpoint::save(net, &self.dir.join("last.safetensors"))?;
        checkpoint::save_ema(net, &self.dir.join(EMA_FILE))?;
        let mut meta = HashMap::from([
            ("history".to_string(), serde_json::to_string(&state.history)?),
            ("best_acc".to_string(), state.best_acc.to_string()),
            ("ranks".to_string(), self.ranks.to_string()),
        ]);
        if let Some((steps, per_rank)) = partial {
            meta.insert("epoch_steps".to_string(), steps.to_string());
            if let [sums] = per_rank {
                meta.insert("epoch_sums".to_string(), serde_json::to_string(sums)?);
            } else {
                meta.insert("epoch_sums_per_rank".to_string(), serde_json::to_string(per_rank)?);
            }
        }
        checkpoint::save_resume(net, meta, &self.dir.join(RESUME_FILE))
    }

    /// A finished epoch: its metrics.csv line, best.safetensors when it is the best so far, the
    /// save [`RunFolder::save`] does, and metrics.png.
    pub fn finish_epoch(&mut self, net: &Network, state: &mut RunState, m: EpochMetrics) -> Result<()> {
        let csv_err = || format!("writing {}", self.dir.join("metrics.csv").display());
        self.csv.write_all(m.csv_line().as_bytes()).with_context(csv_err)?;
        self.csv.flush().with_context(csv_err)?;
        if m.selection_acc() > state.best_acc {
            state.best_acc = m.selection_acc();
            let best = self.dir.join("best.safetensors");
            if m.best_on_ema && net.ema.is_some() {
                checkpoint::save_ema(net, &best)?;
            } else {
                checkpoint::save(net, &best)?;
            }
        }
        state.history.push(m);
        self.save(net, state, None)?;
        // A plot that cannot be drawn costs the picture, never the run.
        if let Err(e) = crate::plot::plot_history(&state.history, &self.dir.join("metrics.png")) {
            eprintln!("warning: could not draw metrics.png: {e:#}");
        }
        Ok(())
    }
}
