//! The residual addition of two activations of the same shape as a graph node.

use anyhow::{Result, ensure};

use super::reference as cpu;
use crate::ops::layer::{
    Epilogue, EpilogueStep, LayerOp, OnnxNodes, Record, RefBackward, RefForward, RefOutput, Shape,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Add;

impl LayerOp for Add {
    fn arity(&self) -> usize {
        2
    }

    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        let (a, b) = (inputs[0], inputs[1]);
        ensure!(a == b, "{name}: cannot add {a:?} and {b:?}");
        Ok(a.to_vec())
    }

    /// The ReLU after a residual addition (`--fuse on`): see add.wgsl.
    fn takes_epilogue(&self, e: Epilogue, fuse: bool) -> bool {
        fuse && e == Epilogue::Relu
    }

    fn epilogue_step(&self) -> Option<EpilogueStep> {
        Some(EpilogueStep::Add)
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (gpu, [a, b], [da, db]) = (r.gpu, [r.inputs[0], r.inputs[1]], [r.dinputs[0], r.dinputs[1]]);
        if r.relu {
            r.forward(super::add_forward_relu(gpu, a, b, r.out)?);
            r.backward.extend(super::add_backward_relu(gpu, r.out, r.dout, da, db)?);
        } else {
            r.forward(super::add_forward(gpu, a, b, r.out)?);
            r.backward.extend(super::add_backward(gpu, r.dout, da, db)?);
        }
        Ok(())
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        Ok(RefOutput::plain(cpu::add_forward(r.inputs[0], r.inputs[1])))
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        let (da, db) = cpu::add_backward(r.dout);
        Ok(vec![da, db])
    }

    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let (inputs, out) = (o.inputs.clone(), o.output.clone());
        o.push("Add", "", inputs, out, vec![]);
    }

    fn describe(&self) -> String {
        "Add".into()
    }
}
