//! `nn.Dropout(p)` as a graph node: masked and scaled in training, the identity in evaluation
//! (a copy in the plan, no node in the ONNX export).

use anyhow::Result;

use super::DropoutConfig;
use super::reference as cpu;
use crate::ops::layer::{LayerOp, OnnxNodes, Record, RefBackward, RefForward, RefOutput, Shape};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    /// The probability of zeroing an element.
    pub p: f64,
}

impl LayerOp for Dropout {
    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        DropoutConfig::new(self.p, name).validate().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        Ok(inputs[0].to_vec())
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (inp, dinp) = r.inp();
        let cfg = DropoutConfig::new(self.p, r.name);
        r.train.extend(super::dropout_forward(r.gpu, &cfg, r.step_key, inp, r.out, true)?);
        r.eval.extend(super::dropout_forward(r.gpu, &cfg, r.step_key, inp, r.out, false)?);
        r.backward.extend(super::dropout_backward(r.gpu, &cfg, r.step_key, r.dout, dinp)?);
        Ok(())
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        let inp = r.inputs[0];
        let out = if r.training {
            cpu::dropout_forward(&DropoutConfig::new(self.p, r.name), r.step_key, inp)
        } else {
            inp.to_vec()
        };
        Ok(RefOutput::plain(out))
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        Ok(vec![cpu::dropout_backward(&DropoutConfig::new(self.p, r.name), r.step_key, r.dout)])
    }

    /// Evaluation is the identity: the layer's output is its input under another name.
    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let (x, out) = (o.inputs[0].clone(), o.output.clone());
        o.push("Identity", "", vec![x], out, vec![]);
    }

    fn describe(&self) -> String {
        format!("Dropout p={}", self.p)
    }
}
