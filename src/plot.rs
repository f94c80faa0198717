//! The run's PNG plot: loss and accuracy per epoch, train and test, drawn with plotters.
//! Text uses the bundled DejaVu Sans Mono (assets/fonts), so no system fonts are needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use crate::metrics::EpochMetrics;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono.ttf");

pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled font is known to be valid; a failure would only lose the plot's text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Write `history` as a two-panel PNG (loss | accuracy) to `path`, atomically.
pub fn plot_history(history: &[EpochMetrics], path: &Path) -> Result<()> {
    register_font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (1000, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let panels = root.split_evenly((1, 2));
        let epochs = history.len().max(1) as f64;
        let series =
            |m: &EpochMetrics, loss: bool| if loss { (m.train_loss, m.test_loss) } else { (m.train_acc, m.test_acc) };
        for (panel, loss) in panels.iter().zip([true, false]) {
            let top = history.iter().map(|m| series(m, loss)).fold(0.0f64, |a, (t, v)| a.max(t).max(v));
            let y_max = if loss { (top * 1.1).max(1e-3) } else { 1.0 };
            let mut chart = ChartBuilder::on(panel)
                .caption(if loss { "loss" } else { "accuracy" }, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(0.5f64..epochs + 0.5, 0.0f64..y_max)
                .map_err(|e| anyhow!("plot: {e}"))?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .x_labels(history.len().clamp(2, 12))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|e| anyhow!("plot: {e}"))?;
            for (k, (name, color)) in [("train", BLUE), ("test", RED)].into_iter().enumerate() {
                let pts: Vec<(f64, f64)> = history
                    .iter()
                    .map(|m| {
                        let (t, v) = series(m, loss);
                        (m.epoch as f64, if k == 0 { t } else { v })
                    })
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(|e| anyhow!("plot: {e}"))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
                chart
                    .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| anyhow!("plot: {e}"))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        root.present().map_err(|e| anyhow!("plot: writing {}: {e}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
