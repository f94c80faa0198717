//! bn_fold — host side of `bn_fold.wgsl`; CPU oracle in `reference.rs` beside it.
//!
//! An evaluation pass folds each batch norm that alone reads a convolution's output into that
//! convolution: the plan's fold pass (`model::plan`, asking `LayerOp::fold_target` and
//! `LayerOp::eval_affine`) lists the pairs, this op computes every pair's folded weights and bias
//! in one dispatch at the start of the pass, and the convolution's evaluation forward reads them
//! (with the batch norm's ReLU as its epilogue), so the pass runs no batch-norm dispatch.

pub mod reference;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::to_u32;
use crate::gpu::{Bind, Dispatch, Dtype, Gpu, Precision, Tensor};

const WG: u32 = 256;

/// A bias offset meaning "this convolution has no bias" (`NONE` in the shader).
const NONE: u32 = u32::MAX;

/// One (convolution, batch norm) pair: its sizes and where its tensors lie, as element offsets
/// into the bound buffers ([`FoldBuffers`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FoldEntry {
    /// Output channels.
    pub c: usize,
    /// Weight elements per output channel ((c_in/groups)·kh·kw).
    pub k: usize,
    /// In `params`: the convolution's weight [c, k] and bias [c], the batch norm's gamma and beta.
    pub weight: usize,
    pub bias: Option<usize>,
    pub gamma: usize,
    pub beta: usize,
    /// In `stats`: the running mean and variance.
    pub mean: usize,
    pub var: usize,
    /// In `weights` and `biases`: where the folded weight [c, k] and bias [c] go.
    pub out_weight: usize,
    pub out_bias: usize,
    pub eps: f64,
}

/// The buffers one fold dispatch binds: `params` and `stats` f32 (views of the flat parameter
/// and running-statistics buffers), `weights` in the plan's activation type (what its GEMMs
/// read), `biases` f32.
pub struct FoldBuffers<'a> {
    pub params: &'a Tensor,
    pub stats: &'a Tensor,
    pub weights: &'a Tensor,
    pub biases: &'a Tensor,
}

/// Mirrors `Entry` in `bn_fold.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct GpuEntry {
    first: u32,
    c: u32,
    k: u32,
    weight: u32,
    bias: u32,
    gamma: u32,
    beta: u32,
    mean: u32,
    var: u32,
    out_weight: u32,
    out_bias: u32,
    eps: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    entries: u32,
    total: u32,
    _pad: [u32; 2],
}

/// Every range of `e` lies inside its buffer, or an error naming the pair and the range.
fn check_entry(i: usize, e: &FoldEntry, b: &FoldBuffers<'_>) -> Result<()> {
    ensure!(e.c > 0 && e.k > 0, "bn_fold: pair {i} has {} channels of {} weights", e.c, e.k);
    let fits = |what: &str, t: &Tensor, start: usize, len: usize| {
        ensure!(
            start + len <= t.numel(),
            "bn_fold: pair {i}'s {what} [{start}, {}) lies outside {} ({} values)",
            start + len,
            t.label,
            t.numel()
        );
        Ok(())
    };
    fits("weight", b.params, e.weight, e.c * e.k)?;
    if let Some(bias) = e.bias {
        fits("bias", b.params, bias, e.c)?;
    }
    fits("gamma", b.params, e.gamma, e.c)?;
    fits("beta", b.params, e.beta, e.c)?;
    fits("running mean", b.stats, e.mean, e.c)?;
    fits("running variance", b.stats, e.var, e.c)?;
    fits("folded weight", b.weights, e.out_weight, e.c * e.k)?;
    fits("folded bias", b.biases, e.out_bias, e.c)
}

/// The table the shader searches: each pair's first element in the concatenation of every
/// pair's weights, and its offsets.
fn table(entries: &[FoldEntry]) -> Result<(Vec<GpuEntry>, usize)> {
    let mut first = 0usize;
    let mut rows = Vec::with_capacity(entries.len());
    for e in entries {
        rows.push(GpuEntry {
            first: to_u32("folded weights", first)?,
            c: to_u32("channels", e.c)?,
            k: to_u32("weights per channel", e.k)?,
            weight: to_u32("weight offset", e.weight)?,
            bias: e.bias.map_or(Ok(NONE), |b| to_u32("bias offset", b))?,
            gamma: to_u32("gamma offset", e.gamma)?,
            beta: to_u32("beta offset", e.beta)?,
            mean: to_u32("running mean offset", e.mean)?,
            var: to_u32("running variance offset", e.var)?,
            out_weight: to_u32("folded weight offset", e.out_weight)?,
            out_bias: to_u32("folded bias offset", e.out_bias)?,
            eps: e.eps as f32,
        });
        first += e.c * e.k;
    }
    to_u32("folded weights", first)?;
    Ok((rows, first))
}

/// One dispatch folding every pair of `entries` (see `bn_fold.wgsl`).
pub fn bn_fold_forward(gpu: &Gpu, entries: &[FoldEntry], b: &FoldBuffers<'_>) -> Result<Vec<Dispatch>> {
    ensure!(!entries.is_empty(), "bn_fold: no (convolution, batch norm) pair to fold");
    for (what, t) in [("parameters", b.params), ("statistics", b.stats), ("folded biases", b.biases)] {
        ensure!(t.dtype == Dtype::F32, "bn_fold: the {what} ({}) must be f32, got {}", t.label, t.dtype.name());
    }
    for (i, e) in entries.iter().enumerate() {
        check_entry(i, e, b)?;
    }
    let (rows, total) = table(entries)?;
    let table = Tensor::from_slice(gpu, "bn_fold table", &[rows.len() * 12], bytemuck::cast_slice::<_, u32>(&rows))?;
    let params =
        gpu.uniform("bn_fold params", &Params { entries: rows.len() as u32, total: total as u32, _pad: [0; 2] });
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, &table),
        Bind::Tensor(2, b.params),
        Bind::Tensor(3, b.stats),
        Bind::Tensor(4, b.weights),
        Bind::Tensor(5, b.biases),
    ];
    let grid = gpu.grid_1d(total, WG);
    let d =
        gpu.dispatch_in(Precision::of(b.weights), "bn_fold", "bn_fold_forward", &[("WG", WG as f64)], &binds, grid)?;
    // Each weight read once and its folded copy written once; per channel five f32 reads
    // (gamma, beta, mean, var, bias) and one write.
    let channels: usize = entries.iter().map(|e| e.c).sum();
    let bytes = (4 + b.weights.dtype.bytes()) * total + 4 * 6 * channels;
    Ok(vec![d.with_cost(total as f64, bytes as f64)])
}
