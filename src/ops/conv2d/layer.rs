//! `nn.Conv2d` as a graph node: square kernel, stride and padding, optional bias, channel groups.

use anyhow::{Result, anyhow, ensure};

use super::reference as cpu;
use super::{Conv2dConfig, ConvBuffers, ConvKernel, ConvPass};
use crate::gpu::{Dispatch, Gpu, Precision};
use crate::ops::batch_norm::BnAffine;
use crate::ops::layer::{
    Attr, FoldTarget, Init, LayerOp, OnnxNodes, ParamSpec, Record, RefBackward, RefForward, RefOutput, Shape,
    expect_spatial, stored,
};

/// A convolution layer, with PyTorch's meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    /// Channel groups, as `nn.Conv2d(groups=)`: divides c_in and c_out; 1 = an ordinary
    /// convolution, c_in = c_out = groups a depthwise one. The weight is [c_out, c_in/groups, k, k].
    pub groups: usize,
    pub bias: bool,
}

impl Conv2d {
    /// Its kernel configuration reading `inp` [n, c, h, w].
    pub fn config(&self, inp: &[usize]) -> Conv2dConfig {
        let Conv2d { c_in, c_out, kernel, stride, pad, groups, bias } = *self;
        Conv2dConfig::square(inp[0], c_in, (inp[2], inp[3]), c_out, kernel, stride, pad, bias).grouped(groups)
    }

    /// The forward dispatches `d` (run by `kernel`) into training and evaluation; with a batch
    /// norm folded in ([`Record::folded`]), evaluation runs the same kernel on the folded weight
    /// and bias, with the batch norm's ReLU as its epilogue, writing the batch norm's output.
    fn record_forward(
        &self,
        r: &mut Record<'_>,
        cfg: &Conv2dConfig,
        kernel: ConvKernel,
        d: Vec<Dispatch>,
    ) -> Result<()> {
        let Some(f) = r.folded else {
            if r.fused.output_stats.is_none() && r.fused.input_affine.is_none() {
                r.forward(d);
                return Ok(());
            }
            // The batch norm's statistics and the batch norm applied on load are the training
            // pass's alone.
            r.train.extend(d);
            let (w, b) = (r.param("weight")?, r.param_if(self.bias, "bias")?);
            let bufs = ConvBuffers::forward(r.inp().0, w.half.unwrap_or(w.value), b.map(|b| b.value), r.out);
            let (d, _) = super::conv2d_pass_chosen(r.gpu, cfg, ConvPass::Forward, kernel, &bufs)?;
            r.eval.extend(d);
            return Ok(());
        };
        r.train.extend(d);
        let folded = Conv2dConfig { bias: true, ..*cfg };
        let bufs = ConvBuffers { relu: f.relu, ..ConvBuffers::forward(r.inp().0, f.weight, Some(f.bias), f.out) };
        let (d, _) = super::conv2d_pass_chosen(r.gpu, &folded, ConvPass::Forward, kernel, &bufs)?;
        r.eval.extend(d);
        Ok(())
    }
}

impl LayerOp for Conv2d {
    fn parameters(&self, name: &str) -> Vec<ParamSpec> {
        // PyTorch's fan-in is the weight's: (c_in/groups)*k*k.
        let c_in_group = self.c_in / self.groups.max(1);
        let fan_in = c_in_group * self.kernel * self.kernel;
        let mut p = vec![ParamSpec::of(
            name,
            "weight",
            vec![self.c_out, c_in_group, self.kernel, self.kernel],
            Init::FanInUniform { fan_in },
        )];
        if self.bias {
            p.push(ParamSpec::of(name, "bias", vec![self.c_out], Init::FanInUniform { fan_in }));
        }
        p
    }

    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        let inp = inputs[0];
        expect_spatial(name, "Conv2d", inp)?;
        ensure!(inp[1] == self.c_in, "{name}: Conv2d expects {} input channels, got {}", self.c_in, inp[1]);
        let cfg = self.config(inp);
        cfg.validate().map_err(|e| anyhow!("{name}: {e}"))?;
        Ok(cfg.output_shape().to_vec())
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (stored, dinp) = r.inp();
        let cfg = self.config(&stored.shape);
        // Training may read the batch norm's input and apply it (`Handoffs::input_affine`);
        // evaluation reads the stored input (record_forward).
        let affine = r.fused.input_affine;
        let inp = affine.map_or(stored, |a| a.inp);
        let w = r.param("weight")?;
        let b = r.param_if(self.bias, "bias")?;
        // An f16 plan's GEMMs read the f16 copy of the weights.
        let bufs = ConvBuffers {
            inp: Some(inp),
            weight: Some(w.half.unwrap_or(w.value)),
            bias: b.map(|b| b.value),
            out: Some(r.out),
            dout: Some(r.dout),
            dinp: Some(dinp),
            dweight: Some(w.grad),
            relu: false,
            dinp_addend: r.fused.dinp_addend,
            out_stats: r.fused.output_stats.map(|t| (t, super::stats_lanes(r.gpu))),
            input_affine: affine.map(|a| BnAffine { stats: a.stats, gamma: a.scale, beta: a.shift }),
        };
        ensure!(
            r.fused.dinp_addend.is_none() || !r.reads_network_input,
            "{}: an input-gradient addend on a layer whose input gradient nobody reads",
            r.name
        );
        // Each pass runs the kernel the tuner chose for this shape (tuned in the plan's precision:
        // an f16 plan's built-in choice is cooperative matrices where the adapter lists them); the
        // network input needs no gradient.
        let passes: &[ConvPass] = if r.reads_network_input {
            &[ConvPass::Forward, ConvPass::BackwardWeight]
        } else {
            &[ConvPass::Forward, ConvPass::BackwardInput, ConvPass::BackwardWeight]
        };
        let mut chosen: Vec<ConvKernel> =
            passes.iter().map(|&pass| super::choose(r.gpu, &cfg, pass, r.precision)).collect::<Result<_>>()?;
        // `--fuse on`: both gradients in one dispatch where one kernel runs them (the register
        // blocks, or the workgroup tiles when both passes chose one shape) — by default on every
        // adapter (`--joint-backward`; on lavapipe the register joint kernel takes 1.00-1.07x the
        // two separate dispatches' time, `cargo bench --bench conv_backward`).
        // Two different tile shapes run as one where the tuner measured that faster
        // (`tune::choose_joint`); the joint kernel then runs both gradients.
        let joint = match chosen[..] {
            [_, input, weight] if r.gpu.fuse && r.gpu.joint_backward => {
                super::choose_joint(r.gpu, &cfg, r.precision, input, weight)?
            }
            _ => None,
        };
        if let Some(ConvKernel::Workgroup(t)) = joint {
            chosen[1..].fill(ConvKernel::Workgroup(t));
        }
        // The joint dispatch, recorded first: should the tiles' not launch here (a cache carried
        // from another adapter, a grid past this one's limits), the two gradients run apart, each
        // through `conv2d_pass_chosen` and its own fallback, said once.
        let joint = match joint {
            Some(kernel) => {
                let splits = super::splits_for(r.gpu, &cfg, kernel);
                match super::conv2d_backward_joint(r.gpu, &cfg, kernel, &bufs, splits) {
                    Ok(d) => Some(d),
                    Err(e) if matches!(kernel, ConvKernel::Workgroup(_)) => {
                        eprintln!(
                            "warning: {kernel} cannot run conv2d's joint backward {cfg:?} here ({e:#}); running the two gradients apart"
                        );
                        None
                    }
                    Err(e) => return Err(e),
                }
            }
            None => None,
        };
        for (&pass, &kernel) in passes.iter().zip(&chosen) {
            if joint.is_some() && pass != ConvPass::Forward {
                r.conv_kernels.push((pass, kernel));
                continue;
            }
            let (d, kernel) = super::conv2d_pass_chosen(r.gpu, &cfg, pass, kernel, &bufs)?;
            r.conv_kernels.push((pass, kernel));
            if pass == ConvPass::Forward {
                self.record_forward(r, &cfg, kernel, d)?;
            } else {
                r.backward.extend(d);
            }
        }
        r.backward.extend(joint.into_iter().flatten());
        if let Some(b) = b.filter(|_| !r.fused.bias_grad_elsewhere) {
            r.backward.extend(super::conv2d_backward_bias(r.gpu, &cfg, r.dout, b.grad)?);
        }
        Ok(())
    }

    /// The bias gradient is the sum of the output gradient per channel (conv2d_backward_bias).
    fn channel_bias(&self) -> Option<&'static str> {
        self.bias.then_some("bias")
    }

    /// The register and workgroup kernels' forward writes its output's statistics per block of
    /// its output pixels (`ConvBuffers::out_stats`), where [`Gpu::bn_stats`] and `--fuse on` allow
    /// it and the forward's kernel for this shape has the epilogue.
    fn output_stats_rows(&self, gpu: &Gpu, inp: &[usize], precision: Precision) -> Result<Option<usize>> {
        if !(gpu.fuse && gpu.bn_stats) {
            return Ok(None);
        }
        Ok(super::stats_rows(gpu, super::choose(gpu, &self.config(inp), ConvPass::Forward, precision)?))
    }

    /// The workgroup tiles apply a batch norm and its ReLU as they load the input (`affine_in` in
    /// conv2d_tiled.wgsl), where [`Gpu::bn_apply`] and `--fuse on` allow it and both passes that
    /// read the input — the forward and the weight gradient — run on them for this shape.
    fn applies_input_bn_relu(&self, gpu: &Gpu, inp: &[usize], precision: Precision) -> Result<bool> {
        if !(gpu.fuse && gpu.bn_apply) {
            return Ok(false);
        }
        let cfg = self.config(inp);
        for pass in [ConvPass::Forward, ConvPass::BackwardWeight] {
            if !matches!(super::choose(gpu, &cfg, pass, precision)?, ConvKernel::Workgroup(_)) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Every family's input gradient takes an addend (`ConvBuffers::dinp_addend`).
    fn accumulates_input_grad(&self) -> bool {
        true
    }

    /// Its weight rows per output channel; its bias, if any, folds with the rest.
    fn fold_target(&self) -> Option<FoldTarget> {
        let per_channel = self.c_in / self.groups.max(1) * self.kernel * self.kernel;
        Some(FoldTarget { channels: self.c_out, per_channel, weight: "weight", bias: self.bias.then_some("bias") })
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        let (inp, s) = r.inp();
        let w = stored(r.precision, r.param("weight")?.to_vec());
        Ok(RefOutput::plain(cpu::conv2d_forward(&self.config(s), inp, &w, r.param_if(self.bias, "bias")?)))
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        let (inp, s) = r.inp();
        let cfg = self.config(s);
        r.put("weight", cpu::conv2d_backward_weight(&cfg, inp, r.dout));
        if self.bias {
            r.put("bias", cpu::conv2d_backward_bias(&cfg, r.dout));
        }
        let w = stored(r.precision, r.param("weight")?.to_vec());
        Ok(vec![cpu::conv2d_backward_input(&cfg, r.dout, &w)])
    }

    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let mut inputs = vec![o.inputs[0].clone(), o.param("weight")];
        if self.bias {
            inputs.push(o.param("bias"));
        }
        let mut attrs = OnnxNodes::window(self.kernel, self.stride, self.pad);
        // ONNX's Conv reads the weight as [M, C/group, kH, kW], as PyTorch stores it.
        attrs.push(("group", Attr::Int(self.groups as i64)));
        let out = o.output.clone();
        o.push("Conv", "", inputs, out, attrs);
    }

    fn describe(&self) -> String {
        let Conv2d { c_in, c_out, kernel, stride, groups, .. } = *self;
        match groups {
            1 => format!("Conv2d {c_in}→{c_out} {kernel}x{kernel}/{stride}"),
            g => format!("Conv2d {c_in}→{c_out} {kernel}x{kernel}/{stride} g{g}"),
        }
    }

    fn macs(&self, inp: &[usize], _out: &[usize]) -> usize {
        self.config(inp).macs()
    }
}
