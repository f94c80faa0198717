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
}

pub const CSV_HEADER: &str = "epoch,train_loss,train_acc,test_loss,test_acc,seconds,train_images_per_s,val_loss,val_acc,test_top5_acc,val_top5_acc,lr,skipped_images";

/// An optional figure as a CSV field: empty when absent.
fn field(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| v.to_string())
}

impl EpochMetrics {
    /// The metrics.csv line, newline included.
    pub fn csv_line(&self) -> String {
        format!(
            "{},{},{},{},{},{:.3},{:.1},{},{},{},{},{},{}\n",
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
            self.skipped_images
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
        format!(
            "{:>5} {:>10.4} {:>9.4}{v} {:>10.4} {:>9.4} {:>8.1} {:>9.0}{skipped}",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_loss,
            self.test_acc,
            self.seconds,
            self.train_images_per_s
        )
    }

    /// The accuracy best.safetensors is chosen on: validation with a split, else test.
    pub fn selection_acc(&self) -> f64 {
        self.val_acc.unwrap_or(self.test_acc)
    }
}
