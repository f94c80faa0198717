//! Progress as the user sees it: indicatif bars with an ETA for training epochs and evaluation
//! passes (drawn on stderr when it is a terminal, hidden otherwise, where the loop prints plain
//! lines instead), and the whole run's ETA from measured rates ([`RunClock`]). A leaf: it uses
//! no other module.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps with `prefix`, its message and the ETA of the bar itself; hidden when
/// stderr is not a terminal (indicatif's default target).
pub fn bar(len: u64, prefix: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

/// Training steps timed before the run's ETA is shown: a rate from fewer swings with the first
/// steps' start-up (the loader's first batches, the driver's first submits).
pub const MIN_TIMED_STEPS: usize = 5;

/// An evaluation image's cost against a training image's until an evaluation pass has been
/// timed: the forward pass alone, where a training step runs it and a backward of about twice
/// its cost (the two convolution gradients per convolution).
pub const EVAL_COST_BEFORE_MEASURED: f64 = 1.0 / 3.0;

/// Measured rates of one process's run, for the whole run's ETA: training steps between progress
/// reads (each read waits for the GPU, so the intervals are exact), and evaluation passes. The
/// first interval of the process is left out: it holds the start-up.
#[derive(Clone, Debug, Default)]
pub struct RunClock {
    timed_steps: usize,
    step_secs: f64,
    eval_images: usize,
    eval_secs: f64,
    /// The last read: (when, step within the epoch).
    mark: Option<(Instant, usize)>,
    /// Whether the start-up interval is behind us.
    warm: bool,
}

impl RunClock {
    /// An epoch's steps start (after `step` steps already done, resuming inside it).
    pub fn start_epoch(&mut self, step: usize, now: Instant) {
        self.mark = Some((now, step));
    }

    /// The GPU has finished `step` steps of the epoch (a progress read).
    pub fn steps_done(&mut self, step: usize, now: Instant) {
        if let Some((t, s)) = self.mark
            && step > s
        {
            if self.warm {
                self.timed_steps += step - s;
                self.step_secs += now.duration_since(t).as_secs_f64();
            }
            self.warm = true;
        }
        self.mark = Some((now, step));
    }

    /// An evaluation pass over `images` took `secs`.
    pub fn eval_done(&mut self, images: usize, secs: f64) {
        self.eval_images += images;
        self.eval_secs += secs;
    }

    /// Seconds a training step takes, once [`MIN_TIMED_STEPS`] are timed.
    pub fn secs_per_step(&self) -> Option<f64> {
        (self.timed_steps >= MIN_TIMED_STEPS).then(|| self.step_secs / self.timed_steps as f64)
    }

    /// Seconds left for `steps` training steps of `batch` images and `eval_images` images to
    /// evaluate; None until [`MIN_TIMED_STEPS`] steps are timed. Before any evaluation pass has
    /// been timed, an evaluated image costs [`EVAL_COST_BEFORE_MEASURED`] of a trained one.
    pub fn remaining(&self, steps: usize, batch: usize, eval_images: usize) -> Option<f64> {
        let per_step = self.secs_per_step()?;
        let per_eval_image = if self.eval_images > 0 {
            self.eval_secs / self.eval_images as f64
        } else {
            per_step / batch.max(1) as f64 * EVAL_COST_BEFORE_MEASURED
        };
        Some(steps as f64 * per_step + eval_images as f64 * per_eval_image)
    }
}

/// `secs` as a short duration: `45s`, `12m05s`, `3h07m`.
pub fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}
