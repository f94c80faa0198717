//! The SE block as a graph node: squeeze, `fc1` C→hidden, ReLU, `fc2` hidden→C, gate, scale.

use anyhow::{Result, ensure};

use super::reference::{self as cpu, SeForward, SeParams};
use super::{AddReluGrads, BnAffine, Excitation, SeBlockConfig, SeGrads, SeVariant, SeWeights, Squeeze};
use crate::ops::layer::{
    Epilogue, Init, LayerOp, LeftWeightGrad, OnnxNodes, ParamSpec, Record, RefBackward, RefForward, RefOutput, SeSaved,
    Shape, expect_spatial,
};

/// An SE block on `c` channels. `hidden` is C // r for the paper's reduction r, or timm's
/// rounding of it (`model::ModelConfig::se_hidden`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeBlock {
    pub c: usize,
    pub hidden: usize,
    pub bias: bool,
    pub variant: SeVariant,
}

impl SeBlock {
    fn config(&self, s: &[usize]) -> SeBlockConfig {
        let SeBlock { c, hidden, bias, variant } = *self;
        SeBlockConfig { n: s[0], c, h: s[2], w: s[3], hidden, bias, variant }
    }

    /// The reference's view of its parameters (`get` takes a suffix).
    fn params<'a>(&self, get: impl Fn(&str) -> Result<&'a [f64]>) -> Result<SeParams<'a>> {
        Ok(SeParams {
            w1: get("fc1.weight")?,
            b1: if self.bias { Some(get("fc1.bias")?) } else { None },
            w2: get("fc2.weight")?,
            b2: if self.bias { Some(get("fc2.bias")?) } else { None },
        })
    }
}

impl LayerOp for SeBlock {
    fn parameters(&self, name: &str) -> Vec<ParamSpec> {
        let (c, cr) = (self.c, self.hidden);
        let mut p = vec![ParamSpec::of(name, "fc1.weight", vec![cr, c, 1, 1], Init::FanInUniform { fan_in: c })];
        if self.bias {
            p.push(ParamSpec::of(name, "fc1.bias", vec![cr], Init::FanInUniform { fan_in: c }));
        }
        p.push(ParamSpec::of(name, "fc2.weight", vec![c, cr, 1, 1], Init::FanInUniform { fan_in: cr }));
        if self.bias {
            p.push(ParamSpec::of(name, "fc2.bias", vec![c], Init::FanInUniform { fan_in: cr }));
        }
        p
    }

    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        let inp = inputs[0];
        expect_spatial(name, "channel layer", inp)?;
        ensure!(inp[1] == self.c, "{name}: expects {} channels, got {}", self.c, inp[1]);
        Ok(inp.to_vec())
    }

    /// An addition of its output and a shortcut with the ReLU after it (`--fuse on`): see
    /// se_block.wgsl's `_add_relu` kernels.
    fn takes_epilogue(&self, e: Epilogue, fuse: bool) -> bool {
        fuse && e == Epilogue::AddRelu
    }

    /// With a mean squeeze, the fused backward can leave dx = g·s + dz to the layer before
    /// (se_block.wgsl, DEFER).
    fn defers_input_grad(&self) -> bool {
        self.variant.squeeze == Squeeze::Avg
    }

    /// With a mean squeeze, the fused kernels can read a batch norm's input and apply it on load
    /// (se_block.wgsl, AFFINE_IN).
    fn applies_input_affine(&self) -> bool {
        self.variant.squeeze == Squeeze::Avg
    }

    /// With a mean squeeze: the batch norm before the block can sum its weight gradients from
    /// the saved values (se_weight_grad.wgsl, batch_norm.wgsl's SE_WGRAD).
    fn leaves_weight_grad(&self, inp: &[usize]) -> Option<LeftWeightGrad> {
        let cfg = self.config(inp);
        (self.variant.squeeze == Squeeze::Avg).then(|| LeftWeightGrad {
            saved: cfg.saved_shape().to_vec(),
            dsaved: cfg.dsaved_shape().to_vec(),
            weights: ["fc1.weight", "fc2.weight"],
            biases: self.bias.then_some(["fc1.bias", "fc2.bias"]),
        })
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (inp, dinp) = r.inp();
        let cfg = self.config(&inp.shape);
        let (w1, w2) = (r.param("fc1.weight")?, r.param("fc2.weight")?);
        let (b1, b2) = (r.param_if(self.bias, "fc1.bias")?, r.param_if(self.bias, "fc2.bias")?);
        let weights = SeWeights { w1: w1.value, b1: b1.map(|b| b.value), w2: w2.value, b2: b2.map(|b| b.value) };
        // Where the batch norm before sums the weight gradients, the two live in the plan.
        let (saved, dsaved) = match r.fused.weight_grad_by_prev {
            Some((s, d)) => (s.view(r.gpu, &s.label, 0, &s.shape)?, d.view(r.gpu, &d.label, 0, &d.shape)?),
            None => (r.scratch("saved", &cfg.saved_shape())?, r.scratch("saved grads", &cfg.dsaved_shape())?),
        };
        let g = SeGrads { dinp, dw1: w1.grad, db1: b1.map(|b| b.grad), dw2: w2.grad, db2: b2.map(|b| b.grad) };
        match r.residual {
            // The residual addition and the ReLU after it fused in (`Epilogue::AddRelu`).
            Some((res, dres)) => {
                let fwd = super::se_block_forward_add_relu(r.gpu, &cfg, inp, res, &weights, r.out, &saved)?;
                // Training may read the batch norm's input and apply it on load (AFFINE_IN);
                // evaluation reads the batch norm's (or the folded convolution's) output.
                let affine =
                    r.fused.input_affine.map(|a| (a.inp, BnAffine { stats: a.stats, gamma: a.scale, beta: a.shift }));
                match affine {
                    Some((y, a)) => {
                        r.eval.extend(fwd);
                        let f =
                            super::se_block_forward_add_relu_affine(r.gpu, &cfg, y, res, &weights, r.out, &saved, &a);
                        r.train.extend(f?);
                    }
                    None => r.forward(fwd),
                }
                let x = affine.map_or(inp, |(y, _)| y);
                let e = AddReluGrads {
                    out: r.out,
                    dres,
                    se_grad: r.fused.defer_input_grad,
                    input_affine: affine.map(|(_, a)| a),
                    weight_grad_elsewhere: r.fused.weight_grad_by_prev.is_some(),
                };
                let bwd = super::se_block_backward_add_relu(r.gpu, &cfg, x, &weights, &saved, r.dout, e, &dsaved, &g);
                r.backward.extend(bwd?);
            }
            None => {
                r.forward(super::se_block_forward(r.gpu, &cfg, inp, &weights, r.out, &saved)?);
                r.backward.extend(super::se_block_backward(r.gpu, &cfg, inp, &weights, &saved, r.dout, &dsaved, &g)?);
            }
        }
        r.se_saved = Some(SeSaved { name: r.name.to_string(), c: self.c, hidden: cfg.hidden(), saved });
        Ok(())
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        let (inp, s) = r.inp();
        let f = cpu::se_block_forward(&self.config(s), inp, &self.params(|p| r.param(p))?);
        Ok(RefOutput { out: f.out.clone(), saved: Some(Box::new(f)), buffers: Vec::new() })
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        let (inp, s) = r.inp();
        let f: &SeForward = r.saved()?;
        let g = cpu::se_block_backward(&self.config(s), inp, &self.params(|p| r.param(p))?, f, r.dout);
        r.put("fc1.weight", g.dw1);
        r.put("fc2.weight", g.dw2);
        if self.bias {
            r.put("fc1.bias", g.db1);
            r.put("fc2.bias", g.db2);
        }
        Ok(vec![g.dinp])
    }

    /// x [n, c, h, w] → z [n, c, 1, 1] → fc1 (1x1 conv) → ReLU → fc2 → gate → x * gate.
    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let squeeze = match self.variant.squeeze {
            Squeeze::Avg => "GlobalAveragePool",
            Squeeze::Max => "GlobalMaxPool",
        };
        let (x, out) = (o.inputs[0].clone(), o.output.clone());
        o.push(squeeze, "squeeze", vec![x.clone()], o.value("squeeze"), vec![]);
        for (fc, inp) in [("fc1", o.value("squeeze")), ("fc2", o.value("fc1_relu"))] {
            let mut inputs = vec![inp, o.param(&format!("{fc}.weight"))];
            if self.bias {
                inputs.push(o.param(&format!("{fc}.bias")));
            }
            o.push("Conv", fc, inputs, o.value(fc), OnnxNodes::window(1, 1, 0));
            if fc == "fc1" {
                o.push("Relu", "fc1_relu", vec![o.value("fc1")], o.value("fc1_relu"), vec![]);
            }
        }
        let gate = match self.variant.excitation {
            Excitation::Sigmoid => "Sigmoid",
            Excitation::Tanh => "Tanh",
            Excitation::Relu => "Relu",
        };
        o.push(gate, "gate", vec![o.value("fc2")], o.value("gate"), vec![]);
        o.push("Mul", "scale", vec![x, o.value("gate")], out, vec![]);
    }

    fn describe(&self) -> String {
        format!("SE {}→{}→{}", self.c, self.hidden, self.c)
    }

    fn macs(&self, _inp: &[usize], out: &[usize]) -> usize {
        2 * self.c * self.hidden + out[1..].iter().product::<usize>()
    }

    fn is_se(&self) -> bool {
        true
    }
}
