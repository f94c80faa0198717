//! timm's `DropPath(p)` as a graph node (stochastic depth on a residual branch): each sample's
//! branch kept and scaled or zeroed in training, the identity in evaluation (a copy in the plan,
//! an `Identity` node in the ONNX export). No parameters, so no state-dict entries.

use anyhow::{Result, ensure};

use super::DropPathConfig;
use super::reference as cpu;
use crate::ops::layer::{LayerOp, OnnxNodes, Record, RefBackward, RefForward, RefOutput, Shape};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropPath {
    /// The probability of dropping a sample's path.
    pub p: f64,
}

impl LayerOp for DropPath {
    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        DropPathConfig::new(self.p, name).validate().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        ensure!(!inputs[0].is_empty(), "{name} (drop_path) needs an [n, ...] input, got {:?}", inputs[0]);
        Ok(inputs[0].to_vec())
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (inp, dinp) = r.inp();
        let cfg = DropPathConfig::new(self.p, r.name);
        r.train.extend(super::drop_path_forward(r.gpu, &cfg, r.step_key, inp, r.out, true)?);
        r.eval.extend(super::drop_path_forward(r.gpu, &cfg, r.step_key, inp, r.out, false)?);
        r.backward.extend(super::drop_path_backward(r.gpu, &cfg, r.step_key, r.dout, dinp)?);
        Ok(())
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        let (inp, shape) = r.inp();
        let out = if r.training {
            cpu::drop_path_forward(&DropPathConfig::new(self.p, r.name), r.step_key, shape[0], inp)
        } else {
            inp.to_vec()
        };
        Ok(RefOutput::plain(out))
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        let n = r.shapes[0][0];
        Ok(vec![cpu::drop_path_backward(&DropPathConfig::new(self.p, r.name), r.step_key, n, r.dout)])
    }

    /// Evaluation is the identity: the layer's output is its input under another name.
    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let (x, out) = (o.inputs[0].clone(), o.output.clone());
        o.push("Identity", "", vec![x], out, vec![]);
    }

    fn describe(&self) -> String {
        format!("DropPath p={}", self.p)
    }
}
