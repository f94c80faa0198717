//! `nn.Linear` as a graph node: [n, in_features] → [n, out_features].

use anyhow::{Result, ensure};

use super::LinearConfig;
use super::reference as cpu;
use crate::ops::layer::{Attr, Init, LayerOp, OnnxNodes, ParamSpec, Record, RefBackward, RefForward, RefOutput, Shape};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

impl Linear {
    fn config(&self, n: usize) -> LinearConfig {
        LinearConfig { n, in_features: self.in_features, out_features: self.out_features, bias: self.bias }
    }
}

impl LayerOp for Linear {
    fn parameters(&self, name: &str) -> Vec<ParamSpec> {
        let init = Init::FanInUniform { fan_in: self.in_features };
        let mut p = vec![ParamSpec::of(name, "weight", vec![self.out_features, self.in_features], init)];
        if self.bias {
            p.push(ParamSpec::of(name, "bias", vec![self.out_features], init));
        }
        p
    }

    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        let (inp, i) = (inputs[0], self.in_features);
        ensure!(inp.len() == 2 && inp[1] == i, "{name}: Linear expects [n, {i}], got {inp:?}");
        Ok(vec![inp[0], self.out_features])
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (inp, dinp) = r.inp();
        let cfg = self.config(inp.shape[0]);
        let w = r.param("weight")?;
        let b = r.param_if(self.bias, "bias")?;
        let (bv, db, d) = (b.map(|b| b.value), b.map(|b| b.grad), r.dout);
        match r.fused.pool_before {
            Some((pool_inp, pool_dinp)) => {
                r.forward(super::linear_forward_pooled(r.gpu, &cfg, pool_inp, inp, w.value, bv, r.out)?);
                let bwd = super::linear_backward_spread(r.gpu, &cfg, inp, w.value, d, pool_dinp, w.grad, db)?;
                r.backward.extend(bwd);
            }
            None => {
                r.forward(super::linear_forward(r.gpu, &cfg, inp, w.value, bv, r.out)?);
                r.backward.extend(super::linear_backward(r.gpu, &cfg, inp, w.value, d, dinp, w.grad, db)?);
            }
        }
        Ok(())
    }

    fn absorbs_pixel_average(&self) -> bool {
        true
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        let (inp, s) = r.inp();
        let out = cpu::linear_forward(&self.config(s[0]), inp, r.param("weight")?, r.param_if(self.bias, "bias")?);
        Ok(RefOutput::plain(out))
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        let (inp, s) = r.inp();
        let (dx, dw, db) = cpu::linear_backward(&self.config(s[0]), inp, r.param("weight")?, r.dout);
        r.put("weight", dw);
        if self.bias {
            r.put("bias", db);
        }
        Ok(vec![dx])
    }

    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let mut inputs = vec![o.inputs[0].clone(), o.param("weight")];
        if self.bias {
            inputs.push(o.param("bias"));
        }
        let out = o.output.clone();
        o.push("Gemm", "", inputs, out, vec![("transB", Attr::Int(1))]);
    }

    fn describe(&self) -> String {
        format!("Linear {}→{}", self.in_features, self.out_features)
    }

    fn macs(&self, _inp: &[usize], _out: &[usize]) -> usize {
        self.in_features * self.out_features
    }
}
