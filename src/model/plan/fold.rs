//! The evaluation pass's fold pass: a batch norm that alone reads a convolution's output (and
//! that heads its own fusion group, with or without its ReLU, or with its ReLU and a max pool —
//! then the convolution writes the ReLU's output and the pool runs apart) is folded into the
//! convolution in evaluation. The nodes are asked, never named: the first offers a [`FoldTarget`]
//! (`LayerOp::fold_target`), the second an [`EvalAffine`] (`LayerOp::eval_affine`). One
//! `bn_fold` dispatch per binding-sized stretch of the flat parameter buffer (one for every model
//! here on lavapipe's 128 MiB but the largest) runs first in every evaluation pass — the weights
//! change every training step, so the folded copies are recomputed each time, at the cost of one
//! read of the folded weights and one write of their copies — and writes plan-owned folded
//! weights (in the plan's activation type, what the GEMMs read) and biases (f32). Training plans
//! are untouched; `--fuse off` folds nothing.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};

use super::{BnBuffers, Fusions, Network, Param, label};
use crate::gpu::{Dispatch, Dtype, Pass, Tensor};
use crate::ops::bn_fold::{self, FoldBuffers, FoldEntry};
use crate::ops::layer::{Epilogue, EvalAffine, FoldTarget, Folded};

/// The fold pass's decisions and the folded tensors.
pub(super) struct EvalFolds {
    /// Per node: the affine node folded into it in evaluation, if any.
    into: Vec<Option<usize>>,
    /// Per folding node: its folded weight and bias.
    tensors: HashMap<usize, (Tensor, Tensor)>,
}

/// One (folding node, affine node) pair with the parameters and statistics it reads.
struct Pair<'a> {
    node: usize,
    target: FoldTarget,
    affine: EvalAffine,
    weight: &'a Param,
    bias: Option<&'a Param>,
    gamma: &'a Param,
    beta: &'a Param,
    stats: &'a BnBuffers,
}

impl Pair<'_> {
    /// The range of the flat parameter buffer its parameters span.
    fn span(&self) -> (usize, usize) {
        let all = [Some(self.weight), self.bias, Some(self.gamma), Some(self.beta)];
        let ranges = all.into_iter().flatten().map(|p| (p.start, p.start + p.spec.shape.iter().product::<usize>()));
        ranges.fold((usize::MAX, 0), |(lo, hi), (s, e)| (lo.min(s), hi.max(e)))
    }
}

impl EvalFolds {
    /// What node `head`'s evaluation forward reads and writes, if an affine node folds into it:
    /// the folded tensors and the affine group's output (and its ReLU).
    pub(super) fn folded<'a>(&'a self, head: usize, fusion: &Fusions, acts: &'a [Tensor]) -> Option<Folded<'a>> {
        let group = fusion.groups[self.into[head]?]?;
        let (weight, bias) = self.tensors.get(&head)?;
        // With a max pool fused after the ReLU, the fold writes the ReLU's output, which the
        // evaluation pass pools apart.
        let (out, relu) = match group.epilogue {
            Some(Epilogue::ReluMaxPool(_)) => (group.head + 2, true),
            e => (group.out, e == Some(Epilogue::Relu)),
        };
        Some(Folded { weight, bias, out: &acts[out], relu })
    }

    /// Node `k` is folded into the node before it in evaluation.
    pub(super) fn is_folded(&self, k: usize) -> bool {
        self.into.contains(&Some(k))
    }
}

impl Network {
    /// The fold pass (see the module comment): which nodes fold the affine node after them, and
    /// the dispatches, first in `eval`, that compute the folded tensors.
    pub(super) fn eval_folds(
        &self,
        consumers: &[Vec<usize>],
        fusion: &Fusions,
        eval: &mut Vec<Dispatch>,
    ) -> Result<EvalFolds> {
        let into = self.fold_pairs(consumers, fusion);
        let pairs =
            into.iter().enumerate().filter_map(|(k, a)| a.map(|a| self.pair(k, a))).collect::<Result<Vec<_>>>()?;
        let mut tensors = HashMap::new();
        let max = self.gpu.limits.max_storage_buffer_binding_size as usize / 4;
        let mut rest = &pairs[..];
        let first = eval.len();
        while !rest.is_empty() {
            // As many pairs as one binding of the parameter buffer spans.
            let (lo, mut n) = (rest[0].span().0, 1);
            while n < rest.len() && rest[..=n].iter().map(|p| p.span().1).max().unwrap_or(0) - lo <= max {
                n += 1;
            }
            self.record_fold(&rest[..n], eval, &mut tensors)?;
            rest = &rest[n..];
        }
        label(eval[first..].iter_mut(), "batch norms folded", Pass::Forward);
        Ok(EvalFolds { into, tensors })
    }

    /// Per node, the affine node that alone reads its output and folds into it (`--fuse on`).
    fn fold_pairs(&self, consumers: &[Vec<usize>], fusion: &Fusions) -> Vec<Option<usize>> {
        let nodes = &self.graph.nodes;
        let mut into = vec![None; nodes.len()];
        if !self.gpu.fuse {
            return into;
        }
        for k in 0..nodes.len().saturating_sub(1) {
            let (Some(t), Some(a)) = (nodes[k].layer.op().fold_target(), nodes[k + 1].layer.op().eval_affine()) else {
                continue;
            };
            let alone = consumers[k + 1] == [k + 1];
            let head = fusion.groups[k].is_some_and(|g| g.head == k && g.epilogue.is_none());
            let affine = fusion.groups[k + 1].is_some_and(|g| {
                g.head == k + 1 && g.epilogue.is_none_or(|e| matches!(e, Epilogue::Relu | Epilogue::ReluMaxPool(_)))
            });
            if alone && head && affine && t.channels == a.channels {
                into[k] = Some(k + 1);
            }
        }
        into
    }

    /// Node `k` and the affine node `a` after it, with their tensors.
    fn pair(&self, k: usize, a: usize) -> Result<Pair<'_>> {
        let (conv, bn) = (&self.graph.nodes[k], &self.graph.nodes[a]);
        let target = conv.layer.op().fold_target().context("fold: the folding node offers no weight")?;
        let affine = bn.layer.op().eval_affine().context("fold: the folded node is no affine map")?;
        let param = |layer: &str, suffix: &str| self.param(&format!("{layer}.{suffix}"));
        let weight = param(&conv.name, target.weight)?;
        let n = weight.spec.shape.iter().product::<usize>();
        ensure!(
            n == target.channels * target.per_channel,
            "fold: {}.{} has {n} values, not {} channels of {}",
            conv.name,
            target.weight,
            target.channels,
            target.per_channel
        );
        Ok(Pair {
            node: k,
            target,
            affine,
            weight,
            bias: target.bias.map(|b| param(&conv.name, b)).transpose()?,
            gamma: param(&bn.name, affine.scale)?,
            beta: param(&bn.name, affine.shift)?,
            stats: self.bn_buffers(&bn.name)?,
        })
    }

    /// One `bn_fold` dispatch over `pairs` (their parameters within one binding), into new
    /// folded-weight and folded-bias buffers; each pair's views go into `tensors`.
    fn record_fold(
        &self,
        pairs: &[Pair<'_>],
        eval: &mut Vec<Dispatch>,
        tensors: &mut HashMap<usize, (Tensor, Tensor)>,
    ) -> Result<()> {
        let gpu = &*self.gpu;
        let _scope = gpu.label_scope("bn_fold");
        let lo = pairs.iter().map(|p| p.span().0).min().unwrap_or(0);
        let hi = pairs.iter().map(|p| p.span().1).max().unwrap_or(lo);
        let params = self.flat.values.view(gpu, &format!("parameters {lo}.."), lo, &[hi - lo])?;
        let dtype = self.precision.dtype();
        let align = |bytes: usize| (gpu.limits.min_storage_buffer_offset_alignment as usize / bytes).max(1);
        let stat = |t: &Tensor| (t.offset / 4) as usize;
        let (mut wlen, mut blen) = (0usize, 0usize);
        let mut entries = Vec::with_capacity(pairs.len());
        for p in pairs {
            let (c, k) = (p.target.channels, p.target.per_channel);
            let (out_weight, out_bias) = (wlen.next_multiple_of(align(dtype.bytes())), blen.next_multiple_of(align(4)));
            (wlen, blen) = (out_weight + c * k, out_bias + c);
            entries.push(FoldEntry {
                c,
                k,
                weight: p.weight.start - lo,
                bias: p.bias.map(|b| b.start - lo),
                gamma: p.gamma.start - lo,
                beta: p.beta.start - lo,
                mean: stat(&p.stats.running_mean),
                var: stat(&p.stats.running_var),
                out_weight,
                out_bias,
                eps: p.affine.eps,
            });
        }
        let weights = Tensor::flat_zeros_of(gpu, "folded weights", wlen, dtype)?;
        let biases = Tensor::flat_zeros_of(gpu, "folded biases", blen, Dtype::F32)?;
        let b = FoldBuffers { params: &params, stats: &self.bn_flat, weights: &weights, biases: &biases };
        eval.extend(bn_fold::bn_fold_forward(gpu, &entries, &b)?);
        for (p, e) in pairs.iter().zip(&entries) {
            let name = &self.graph.nodes[p.node].name;
            let w = weights.view(gpu, &format!("{name} folded weight"), e.out_weight, &p.weight.spec.shape)?;
            let b = biases.view(gpu, &format!("{name} folded bias"), e.out_bias, &[e.c])?;
            tensors.insert(p.node, (w, b));
        }
        Ok(())
    }
}
