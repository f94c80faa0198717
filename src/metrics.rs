//! One epoch's figures and the two ways they are written: a line of `metrics.csv` and a row of
//! the fixed-width table `train` prints. Below `plot` and `run`, which both read them.

/// One line of metrics.csv.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub seconds: f64,
    pub train_images_per_s: f64,
    /// On the `--val-split` images; None without a split. Columns after the older ones, so
    /// readers of the first seven keep working.
    #[serde(default)]
    pub val_loss: Option<f64>,
    #[serde(default)]
    pub val_acc: Option<f64>,
    /// Top-5 accuracy on the test and validation images.
    #[serde(default)]
    pub test_top5_acc: f64,
    #[serde(default)]
    pub val_top5_acc: Option<f64>,
    /// The learning rate of the epoch's last step.
    #[serde(default)]
    pub lr: f64,
    /// Image-folder files left out because they failed to decode (`--skip-bad-images`), in the
    /// epoch's training and evaluation passes.
    #[serde(default)]
    pub skipped_images: usize,
    /// `--model-ema`: the EMA's figures on the test and validation images (None without an EMA).
    #[serde(default)]
    pub ema_test_loss: Option<f64>,
    #[serde(default)]
    pub ema_test_acc: Option<f64>,
    #[serde(default)]
    pub ema_test_top5_acc: Option<f64>,
    #[serde(default)]
    pub ema_val_loss: Option<f64>,
    #[serde(default)]
    pub ema_val_acc: Option<f64>,
    /// best.safetensors is chosen on (and holds) the EMA (`--best-on ema`, the default with
    /// `--model-ema`). Not a CSV column.
    #[serde(default)]
    pub best_on_ema: bool,
}

pub const CSV_HEADER: &str = "epoch,train_loss,train_acc,test_loss,test_acc,seconds,train_images_per_s,val_loss,val_acc,test_top5_acc,val_top5_acc,lr,skipped_images,ema_test_loss,ema_test_acc,ema_test_top5_acc,ema_val_loss,ema_val_acc";

/// An optional figure as a CSV field: empty when absent.
fn field(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

impl EpochMetrics {
    /// The metrics.csv line, newline included.
    pub fn csv_line(&self) -> String {
        format!(
            "{},{},{},{},{},{:.3},{:.1},{},{},{},{},{},{},{},{},{},{},{}\n",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_loss,
            self.test_acc,
            self.seconds,
            self.train_images_per_s,
            field(self.val_loss),
            field(self.val_acc),
            self.test_top5_acc,
            field(self.val_top5_acc),
            self.lr,
            self.skipped_images,
            field(self.ema_test_loss),
            field(self.ema_test_acc),
            field(self.ema_test_top5_acc),
            field(self.ema_val_loss),
            field(self.ema_val_acc)
        )
    }

    /// The header of the table `train` prints, one row per epoch; validation columns with a split.
    pub fn table_header(val: bool) -> String {
        let v = if val { format!(" {:>9} {:>8}", "val_loss", "val_acc") } else { String::new() };
        format!(
            "{:>5} {:>10} {:>9}{v} {:>10} {:>9} {:>8} {:>9}",
            "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img/s"
        )
    }

    pub fn table_row(&self) -> String {
        let v = match (self.val_loss, self.val_acc) {
            (Some(l), Some(a)) => format!(" {l:>9.4} {a:>8.4}"),
            _ => String::new(),
        };
        let skipped = if self.skipped_images > 0 {
            format!("  ({} unreadable images skipped)", self.skipped_images)
        } else {
            String::new()
        };
        let ema = match (self.ema_test_loss, self.ema_test_acc) {
            (Some(l), Some(a)) => format!("  EMA: test_loss {l:.4} test_acc {a:.4}"),
            _ => String::new(),
        };
        format!(
            "{:>5} {:>10.4} {:>9.4}{v} {:>10.4} {:>9.4} {:>8.1} {:>9.0}{ema}{skipped}",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_loss,
            self.test_acc,
            self.seconds,
            self.train_images_per_s
        )
    }

    /// The accuracy best.safetensors is chosen on: validation with a split, else test; the EMA's
    /// when it is chosen on the EMA ([`EpochMetrics::best_on_ema`]).
    pub fn selection_acc(&self) -> f64 {
        match (self.best_on_ema, self.ema_val_acc.or(self.ema_test_acc)) {
            (true, Some(ema)) => ema,
            _ => self.val_acc.unwrap_or(self.test_acc),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EpochMetrics;

    /// `--resume` rebuilds metrics.csv from the history saved as JSON in resume.safetensors: every
    /// figure must come back bit for bit, or an earlier epoch's line changes in its last digit.
    /// serde_json parses floats exactly only with its `float_roundtrip` feature; without it about
    /// one 17-digit value in a few hundred comes back one ulp off.
    #[test]
    fn history_json_round_trips_every_figure() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        for epoch in 0..2_000 {
            let m = EpochMetrics {
                epoch,
                train_loss: 3.0 * next(),
                train_acc: next(),
                test_loss: 2.0 * next(),
                test_acc: next(),
                seconds: 100.0 * next(),
                train_images_per_s: 1e3 * next(),
                val_loss: Some(next()),
                val_acc: Some(next()),
                test_top5_acc: next(),
                val_top5_acc: None,
                lr: 0.1 * next(),
                skipped_images: 0,
                ema_test_loss: Some(next()),
                ema_test_acc: Some(next()),
                ema_test_top5_acc: Some(next()),
                ema_val_loss: None,
                ema_val_acc: None,
                best_on_ema: false,
            };
            let json = serde_json::to_string(&m).expect("serialising metrics");
            let back: EpochMetrics = serde_json::from_str(&json).expect("parsing metrics");
            assert_eq!(back, m, "{json}");
            assert_eq!(back.csv_line(), m.csv_line());
        }
    }
}
