//! `nn.MaxPool2d` and `AdaptiveAvgPool2d(1)` + flatten as graph nodes.

use anyhow::{Result, anyhow};

use super::MaxPool2dConfig;
use super::reference as cpu;
use crate::ops::layer::{
    Attr, EpilogueStep, LayerOp, OnnxNodes, Record, RefBackward, RefForward, RefOutput, Shape, expect_spatial,
};

/// Max pooling over a square window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    /// PyTorch's `ceil_mode` (SENet-154's stem pool).
    pub ceil: bool,
}

impl MaxPool2d {
    /// Its kernel configuration reading `inp` [n, c, h, w].
    pub fn config(&self, inp: &[usize]) -> MaxPool2dConfig {
        MaxPool2dConfig {
            n: inp[0],
            c: inp[1],
            h: inp[2],
            w: inp[3],
            kernel: (self.kernel, self.kernel),
            stride: (self.stride, self.stride),
            pad: (self.pad, self.pad),
            ceil: self.ceil,
        }
    }
}

/// What the reference backward needs: the index of each window's maximum.
struct Argmax(Vec<u32>);

impl LayerOp for MaxPool2d {
    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        let inp = inputs[0];
        expect_spatial(name, "MaxPool2d", inp)?;
        let cfg = self.config(inp);
        cfg.validate().map_err(|e| anyhow!("{name}: {e} (the input has shrunk to {}x{})", inp[2], inp[3]))?;
        Ok(cfg.output_shape().to_vec())
    }

    /// A batch norm's ReLU before it may take it as its epilogue (`Epilogue::ReluMaxPool`).
    fn epilogue_step(&self) -> Option<EpilogueStep> {
        Some(EpilogueStep::MaxPool(*self))
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (inp, dinp) = r.inp();
        let cfg = self.config(&inp.shape);
        let argmax = r.scratch("argmax", &cfg.output_shape())?;
        r.forward(super::max_pool2d_forward(r.gpu, &cfg, inp, r.out, &argmax)?);
        r.backward.extend(super::max_pool2d_backward(r.gpu, &cfg, &argmax, r.dout, dinp)?);
        Ok(())
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        let (inp, s) = r.inp();
        let (out, argmax) = cpu::max_pool2d_forward(&self.config(s), inp);
        Ok(RefOutput { out, saved: Some(Box::new(Argmax(argmax))), buffers: Vec::new() })
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        let (_, s) = r.inp();
        let Argmax(argmax) = r.saved()?;
        Ok(vec![cpu::max_pool2d_backward(&self.config(s), argmax, r.dout)])
    }

    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let mut attrs = OnnxNodes::window(self.kernel, self.stride, self.pad);
        attrs.retain(|(name, _)| *name != "dilations");
        if self.ceil {
            attrs.push(("ceil_mode", Attr::Int(1)));
        }
        let (x, out) = (o.inputs[0].clone(), o.output.clone());
        o.push("MaxPool", "", vec![x], out, attrs);
    }

    fn describe(&self) -> String {
        let ceil = if self.ceil { " ceil" } else { "" };
        format!("MaxPool2d {}x{}/{}{ceil}", self.kernel, self.kernel, self.stride)
    }
}

/// `AdaptiveAvgPool2d(1)` then flatten: [n, c, h, w] → [n, c].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalAvgPool;

fn nchw(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

impl LayerOp for GlobalAvgPool {
    fn output_shape(&self, name: &str, inputs: &[&[usize]]) -> Result<Shape> {
        let inp = inputs[0];
        expect_spatial(name, "AdaptiveAvgPool2d", inp)?;
        Ok(vec![inp[0], inp[1]])
    }

    fn record(&self, r: &mut Record<'_>) -> Result<()> {
        let (inp, dinp) = r.inp();
        if !r.fused.pooled_by_next {
            r.forward(super::global_avg_pool_forward(r.gpu, inp, r.out)?);
            r.backward.extend(super::global_avg_pool_backward(r.gpu, r.dout, dinp)?);
        }
        Ok(())
    }

    fn averages_pixels(&self) -> bool {
        true
    }

    fn reference_forward(&self, r: &RefForward<'_, '_>) -> Result<RefOutput> {
        let (inp, s) = r.inp();
        Ok(RefOutput::plain(cpu::global_avg_pool_forward(nchw(s), inp)))
    }

    fn reference_backward(&self, r: &mut RefBackward<'_, '_>) -> Result<Vec<Vec<f64>>> {
        let (_, s) = r.inp();
        Ok(vec![cpu::global_avg_pool_backward(nchw(s), r.dout)])
    }

    fn onnx(&self, o: &mut OnnxNodes<'_>) {
        let (x, out, pooled) = (o.inputs[0].clone(), o.output.clone(), o.value("pool"));
        o.push("GlobalAveragePool", "pool", vec![x], pooled.clone(), vec![]);
        o.push("Flatten", "", vec![pooled], out, vec![("axis", Attr::Int(1))]);
    }

    fn describe(&self) -> String {
        "AdaptiveAvgPool2d 1".into()
    }
}
