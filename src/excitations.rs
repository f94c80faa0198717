//! `senet excitations`: what the SE blocks do, as in the paper's Fig. 6/7 — the mean excitation
//! of every channel of every SE block for each class over the test set, as CSV and one PNG per
//! block, and a per-block channel ranking (mean excitation over all images; low = a candidate for
//! pruning) with each channel's spread across classes (high = class-selective).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, ensure};
use plotters::prelude::*;
use serde::Serialize;

use crate::eval::{EvalArgs, evaluate_checkpoint};
use crate::files::write_atomic;
use crate::gpu::Gpu;

#[derive(Clone, Debug, clap::Args)]
pub struct ExcitationArgs {
    #[command(flatten)]
    pub eval: EvalArgs,
    /// Folder for excitations.csv, ranking.csv and the plots (default: beside the checkpoint).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One SE block's statistics.
#[derive(Clone, Debug, Serialize)]
pub struct BlockExcitations {
    pub block: String,
    /// mean[class][channel]
    pub mean: Vec<Vec<f64>>,
    /// Mean over every test image, per channel.
    pub overall: Vec<f64>,
    /// Standard deviation of the per-class means, per channel.
    pub class_std: Vec<f64>,
    /// Channels by `overall`, highest first.
    pub ranking: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExcitationReport {
    pub classes: Vec<String>,
    pub images_per_class: Vec<usize>,
    pub blocks: Vec<BlockExcitations>,
}

pub fn excitations(gpu: Arc<Gpu>, args: &EvalArgs) -> Result<ExcitationReport> {
    // sums[block][class][channel]
    let mut sums: Vec<Vec<Vec<f64>>> = Vec::new();
    let mut names: Vec<String> = Vec::new();
    let mut counts: Vec<usize> = Vec::new();
    let (config, _) = evaluate_checkpoint(gpu, args, |net, plan, labels| {
        let k = net.config.num_classes;
        if sums.is_empty() {
            sums = plan.se_saved.iter().map(|s| vec![vec![0.0; s.c]; k]).collect();
            names = plan.se_saved.iter().map(|s| s.name.clone()).collect();
            counts = vec![0; k];
        }
        for &t in labels {
            counts[t as usize] += 1;
        }
        for (b, se) in plan.se_saved.iter().enumerate() {
            for (row, &t) in se.excitations(&net.gpu)?.iter().zip(labels) {
                for (acc, &v) in sums[b][t as usize].iter_mut().zip(row) {
                    *acc += f64::from(v);
                }
            }
        }
        Ok(())
    })?;
    ensure!(!names.is_empty(), "{}: the model has no SE block", args.checkpoint.display());
    let total: usize = counts.iter().sum();
    let blocks = names
        .into_iter()
        .zip(sums)
        .map(|(block, per_class)| {
            let c = per_class.first().map_or(0, Vec::len);
            let overall: Vec<f64> =
                (0..c).map(|ch| per_class.iter().map(|r| r[ch]).sum::<f64>() / total.max(1) as f64).collect();
            let mean: Vec<Vec<f64>> =
                per_class.iter().zip(&counts).map(|(r, &n)| r.iter().map(|v| v / n.max(1) as f64).collect()).collect();
            let present: Vec<&Vec<f64>> = mean.iter().zip(&counts).filter(|(_, n)| **n > 0).map(|(m, _)| m).collect();
            let class_std = (0..c)
                .map(|ch| {
                    let m = present.iter().map(|r| r[ch]).sum::<f64>() / present.len().max(1) as f64;
                    (present.iter().map(|r| (r[ch] - m).powi(2)).sum::<f64>() / present.len().max(1) as f64).sqrt()
                })
                .collect();
            let mut ranking: Vec<usize> = (0..c).collect();
            ranking.sort_by(|&a, &b| overall[b].total_cmp(&overall[a]));
            BlockExcitations { block, mean, overall, class_std, ranking }
        })
        .collect();
    Ok(ExcitationReport { classes: config.classes, images_per_class: counts, blocks })
}

/// excitations.csv (block, class, channel, mean), ranking.csv (block, rank, channel, mean,
/// class_std) and excitations_<block>.png in `dir`.
pub fn write_outputs(r: &ExcitationReport, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut csv = String::from("block,class,channel,mean_excitation\n");
    let mut rank = String::from("block,rank,channel,mean_excitation,class_std\n");
    for b in &r.blocks {
        for (k, row) in b.mean.iter().enumerate() {
            for (ch, v) in row.iter().enumerate() {
                csv +=
                    &format!("{},{},{ch},{v}\n", b.block, r.classes.get(k).cloned().unwrap_or_else(|| k.to_string()));
            }
        }
        for (i, &ch) in b.ranking.iter().enumerate() {
            rank += &format!("{},{},{ch},{},{}\n", b.block, i + 1, b.overall[ch], b.class_std[ch]);
        }
    }
    let mut written = vec![dir.join("excitations.csv"), dir.join("ranking.csv")];
    write_atomic(&written[0], csv.as_bytes())?;
    write_atomic(&written[1], rank.as_bytes())?;
    for b in &r.blocks {
        let path = dir.join(format!("excitations_{}.png", b.block.replace('.', "_")));
        plot_block(b, &r.classes, &path)?;
        written.push(path);
    }
    Ok(written)
}

fn plot_block(b: &BlockExcitations, classes: &[String], path: &Path) -> Result<()> {
    crate::plot::register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot {}: {e}", path.display());
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let c = b.overall.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{}: mean excitation per channel and class", b.block), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..c.max(1) as f64, 0f64..1f64)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("channel")
        .y_desc("excitation")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| err(&e))?;
    for (k, row) in b.mean.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(row.iter().enumerate().map(|(ch, &v)| (ch as f64, v)), color.stroke_width(1)))
            .map_err(|e| err(&e))?
            .label(classes.get(k).cloned().unwrap_or_else(|| k.to_string()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
