//! `nn.BatchNorm2d` as a graph node (PyTorch's eps and momentum), optionally with a ReLU fused in.

use anyhow::{Context, Result, ensure};

use super::reference as cpu;
use super::{BatchNormConfig, BnBackward, BnForward, BnFused, ROWS};
use crate::gpu::{Gpu, Tensor};
use crate::ops::layer::{
    Attr, BnExchange, Epilogue, EvalAffine, ExchangeKind, Init, LayerOp, OnnxNodes, ParamSpec, Record, RefBackward,
    RefForward, RefOutput, Shape, expect_spatial,
};
use crate::ops::pool::{PoolAffine, max_pool2d_forward, max_pool2d_forward_affine};

/// A batch-norm layer over `c` channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchNorm2d {
    pub c: usize,
}

/// What the reference backward needs from the training forward.
struct BatchStats {
    mean: Vec<f64>,
    invstd: Vec<f64>,
}

fn config(c: usize, s: &[usize]) -> BatchNormConfig {
    BatchNormConfig::new(s[0], c, s[2], s[3])
}

impl BatchNorm2d {
    /// The evaluation forward (unless the convolution before folds it in, `Record::eval_folded`),
    /// then, with a fused pool, the pool apart on the ReLU's output (`Handoffs::pool`).
    fn record_eval(
        &self,
        r: &mut Record<'_>,
        cfg: &BatchNormConfig,
        t: &BnForward<'_>,
        argmax: Option<&Tensor>,
    ) -> Result<()> {
        let relu_out = r.fused.pool.map(|(_, o)| o);
        if let (Some((pool, _)), Some(argmax), false) = (r.fused.pool, argmax, r.eval_folded) {
            // No convolution before it absorbs it: the pool applies it as it loads each value.
            let pool = pool.config(&t.inp.shape);
            let (running_mean, running_var) = (t.running_mean, t.running_var);
            let affine = PoolAffine { gamma: t.gamma, beta: t.beta, running_mean, running_var, eps: cfg.eps };
            r.eval.extend(max_pool2d_forward_affine(r.gpu, &pool, [t.inp, t.out, argmax], &affine)?);
            return Ok(());
        }
        if !r.eval_folded {
            let t = BnForward { out: relu_out.unwrap_or(t.out), ..*t };
            r.eval.extend(super::batch_norm_forward_eval(r.gpu, cfg, &t)?);
        }
        if let (Some((pool, relu_out)), Some(argmax)) = (r.fused.pool, argmax) {
            let pool = pool.config(&t.inp.shape);
            r.eval.extend(max_pool2d_forward(r.gpu, &pool, relu_out, t.out, argmax)?);
        }
        Ok(())
    }
}

impl LayerOp for BatchNorm2d {
    fn parameters(&self, name: &str) -> Vec<ParamSpec> {
        vec![
            ParamSpec::of(name, "weight", vec![self.c], Init::Ones),
            ParamSpec::of(name, "bias", vec![self.c], Init::Zeros),
        ]
    }

    fn running_stats(&self) -> Option<usize> {
        Some(self.c)
    }

    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        let inp = inputs[0];
        expect_spatial(name, "channel layer", inp)?;
        ensure!(inp[1] == self.c, "{name}: expects {} channels, got {}", self.c, inp[1]);
        Ok(inp.to_vec())
    }

    /// The ReLU's output stands in for the BN's, and with `--fuse on` a max pool's after that
    /// ReLU (see batch_norm.wgsl).
    fn takes_epilogue(&self, e: Epilogue, fuse: bool) -> bool {
        match e {
            Epilogue::Relu => true,
            Epilogue::ReluMaxPool(_) => fuse,
            Epilogue::AddRelu => false,
        }
    }

    /// The backward sums dinp per channel as it writes it (batch_norm.wgsl, BIAS).
    fn sums_input_grad(&self) -> bool {
        true
    }

    /// An SE block after it may leave its input gradient to it (batch_norm.wgsl, SE_IN).
    fn takes_deferred_grad(&self) -> bool {
        true
    }

    /// With the SE block's gradient (SE_IN), its backward can sum that block's weight gradients
    /// too (SE_WGRAD), where the adapter allows its storage buffers.
    fn sums_next_weight_grad(&self, gpu: &Gpu) -> bool {
        super::se_wgrad_fits(gpu)
    }

    /// Its training forward can merge the block statistics of the convolution before it
    /// (batch_norm.wgsl, PARTIALS).
    fn takes_input_stats(&self) -> bool {
        true
    }

    /// Its training forward can save the statistics only (batch_norm.wgsl, STATS_ONLY).
    fn leaves_affine_to_next(&self) -> bool {
        true
    }

    /// In evaluation, x·s + t per channel from the running statistics: a convolution before it
    /// may fold it in (`ops::bn_fold`).
    fn eval_affine(&self) -> Option<EvalAffine> {
        let eps = BatchNormConfig::new(1, self.c, 1, 1).eps;
        Some(EvalAffine { channels: self.c, eps, scale: "weight", shift: "bias" })
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (gpu, name, c) = (r.gpu, r.name, self.c);
        let (inp, dinp) = r.inp();
        let (out, dout) = (r.out, r.dout);
        let plain = config(c, &inp.shape);
        let mut cfg = if r.relu { plain.with_relu() } else { plain };
        // The epilogues of `--fuse on` (batch_norm.wgsl); --sync-bn's split kernels take none.
        let eval_cfg = cfg;
        if r.relu && gpu.fuse && !r.sync_bn {
            cfg = cfg.with_remask();
        }
        if let Some((pool, _)) = r.fused.pool {
            cfg = cfg.with_pool(pool.config(&inp.shape));
        }
        if r.fused.input_bias_grad.is_some() {
            cfg = cfg.with_conv_bias();
        }
        if r.fused.grad_from_next.is_some() {
            cfg = cfg.with_se_in();
        }
        if r.fused.stats_only.is_some() {
            cfg = cfg.with_stats_only();
        }
        // The training forward's statistics from the convolution before (PARTIALS); the backward
        // reads the saved statistics as before.
        let fwd_cfg = match r.fused.input_stats {
            Some((_, rows)) => cfg.with_partials(rows),
            None => cfg,
        };
        let relu_out = (cfg.relu && !cfg.recomputes_mask()).then_some(out);
        let (g, b) = (r.param("weight")?, r.param("bias")?);
        let (running_mean, running_var) = r.running()?;
        // Plan-owned when the next layer reads them (STATS_ONLY).
        let own = r.fused.stats_only.is_none().then(|| r.scratch("batch statistics", &[2, c])).transpose()?;
        let stats = r.fused.stats_only.or(own.as_ref()).context("batch statistics")?;
        let t = BnForward { inp, gamma: g.value, beta: b.value, running_mean, running_var, stats, out };
        let argmax = cfg.pool.map(|p| r.scratch("argmax", &p.output_shape())).transpose()?;
        self.record_eval(r, &eval_cfg, &t, argmax.as_ref())?;
        let gb = BnBackward { inp, gamma: g.value, stats, relu_out, dout, dinp, dgamma: g.grad, dbeta: b.grad };
        if r.sync_bn {
            // SyncBatchNorm: each pass in two halves around the ranks' exchange (the plan fuses
            // nothing into them; the split kernels check it).
            let (welford, sums) =
                (r.scratch("rank statistics", &[ROWS, c])?, r.scratch("rank gradient sums", &[ROWS, c])?);
            r.train.extend(super::batch_norm_forward_stats(gpu, &cfg, inp, &welford)?);
            let x = BnExchange::new(name, ExchangeKind::Statistics, welford, r.train.len());
            r.train.extend(super::batch_norm_forward_apply(gpu, &cfg, &t, &x.buffer)?);
            r.exchanges.push(x);
            r.backward.extend(super::batch_norm_backward_sums(gpu, &cfg, &gb, &sums)?);
            let x = BnExchange::new(name, ExchangeKind::GradSums, sums, r.backward.len());
            r.backward.extend(super::batch_norm_backward_input(gpu, &cfg, &gb, &x.buffer)?);
            r.backward_exchange = Some(x);
        } else {
            let fused = BnFused {
                argmax: argmax.as_ref(),
                conv_dbias: r.fused.input_bias_grad,
                beta: cfg.recomputes_mask().then_some(b.value),
                se_grad: r.fused.grad_from_next,
                partials: None,
                se_weight: r.fused.next_weight_grad,
            };
            r.train.extend(super::batch_norm_forward_train_fused(
                gpu,
                &fwd_cfg,
                &t,
                BnFused { argmax: fused.argmax, partials: r.fused.input_stats.map(|(t, _)| t), ..BnFused::default() },
            )?);
            // The SE block after it may leave its weight gradients to the backward (SE_WGRAD).
            let bwd_cfg = match r.fused.next_weight_grad {
                Some(w) => cfg.with_se_wgrad(w.dw1.shape[0], w.db1.is_some()),
                None => cfg,
            };
            r.backward.extend(super::batch_norm_backward_fused(gpu, &bwd_cfg, &gb, fused)?);
        }
        Ok(())
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        let (inp, s) = r.inp();
        let cfg = config(self.c, s);
        let (g, b) = (r.param("weight")?, r.param("bias")?);
        let (rm, rv) = (r.buffer("running_mean")?, r.buffer("running_var")?);
        if !r.training {
            return Ok(RefOutput::plain(cpu::batch_norm_forward_eval(&cfg, inp, g, b, rm, rv)));
        }
        let t = cpu::batch_norm_forward_train(&cfg, inp, g, b, rm, rv);
        Ok(RefOutput {
            out: t.out,
            saved: Some(Box::new(BatchStats { mean: t.mean, invstd: t.invstd })),
            buffers: vec![("running_mean", t.running_mean), ("running_var", t.running_var)],
        })
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        let (inp, s) = r.inp();
        let st: &BatchStats = r.saved()?;
        let (dx, dg, db) =
            cpu::batch_norm_backward(&config(self.c, s), inp, r.param("weight")?, &st.mean, &st.invstd, r.dout);
        r.put("weight", dg);
        r.put("bias", db);
        Ok(vec![dx])
    }

    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let eps = BatchNormConfig::new(1, 1, 1, 1).eps as f32;
        let mut inputs = vec![o.inputs[0].clone()];
        inputs.extend(["weight", "bias", "running_mean", "running_var"].map(|s| o.param(s)));
        let out = o.output.clone();
        o.push("BatchNormalization", "", inputs, out, vec![("epsilon", Attr::Float(eps))]);
    }

    fn describe(&self) -> String {
        format!("BatchNorm2d {}", self.c)
    }
}
