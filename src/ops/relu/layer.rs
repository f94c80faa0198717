//! `nn.ReLU` as a graph node.

use anyhow::Result;

use super::reference as cpu;
use crate::ops::layer::{EpilogueStep, LayerOp, OnnxNodes, Record, RefBackward, RefForward, RefOutput, Shape};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relu;

impl LayerOp for Relu {
    fn output_shape(&self, _name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        Ok(inputs[0].to_vec())
    }

    fn epilogue_step(&self) -> Option<EpilogueStep> {
        Some(EpilogueStep::Relu)
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (inp, dinp) = r.inp();
        r.forward(super::relu_forward(r.gpu, inp, r.out)?);
        r.backward.extend(super::relu_backward(r.gpu, r.out, r.dout, dinp)?);
        Ok(())
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        Ok(RefOutput::plain(cpu::relu_forward(r.inputs[0])))
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        Ok(vec![cpu::relu_backward(r.out, r.dout)])
    }

    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let (x, out) = (o.inputs[0].clone(), o.output.clone());
        o.push("Relu", "", vec![x], out, vec![]);
    }

    fn describe(&self) -> String {
        "ReLU".into()
    }
}
