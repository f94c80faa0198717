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
}

pub const CSV_HEADER: &str = "epoch,train_loss,train_acc,test_loss,test_acc,seconds,train_images_per_s";

impl EpochMetrics {
    /// The metrics.csv line, newline included.
    pub fn csv_line(&self) -> String {
        format!(
            "{},{},{},{},{},{:.3},{:.1}\n",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_loss,
            self.test_acc,
            self.seconds,
            self.train_images_per_s
        )
    }

    /// The header of the table `train` prints, one row per epoch.
    pub fn table_header() -> String {
        format!(
            "{:>5} {:>10} {:>9} {:>10} {:>9} {:>8} {:>9}",
            "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds", "img/s"
        )
    }

    pub fn table_row(&self) -> String {
        format!(
            "{:>5} {:>10.4} {:>9.4} {:>10.4} {:>9.4} {:>8.1} {:>9.0}",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_loss,
            self.test_acc,
            self.seconds,
            self.train_images_per_s
        )
    }
}
