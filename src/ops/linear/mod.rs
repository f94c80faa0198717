//! linear — host side of `linear.wgsl`; CPU oracle in `reference.rs` beside it.

mod layer;
pub mod reference;

pub use layer::Linear;

use anyhow::{Result, ensure};
use bytemuck::{Pod, Zeroable};

use super::{expect_shape, placeholder, to_u32};
use crate::gpu::{Bind, Dispatch, Gpu, Precision, Tensor};

/// `torch.nn.Linear(in_features, out_features, bias)` on `[n, in_features]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearConfig {
    pub n: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
}

impl LinearConfig {
    /// The parameter block, with a global average pool of `pool_hw` pixels taken in (linear.wgsl;
    /// 0: none).
    fn params_pooled(&self, pool_hw: usize) -> Result<Params> {
        ensure!(self.n > 0 && self.in_features > 0 && self.out_features > 0, "linear: empty dimension in {self:?}");
        Ok(Params {
            n: to_u32("batch", self.n)?,
            in_features: to_u32("in_features", self.in_features)?,
            out_features: to_u32("out_features", self.out_features)?,
            has_bias: u32::from(self.bias),
            pool_hw: to_u32("pooled pixels", pool_hw)?,
            _pad: [0; 3],
        })
    }

    /// The pixels of `pool_inp`, the input [n, in_features, h, w] of a global average pool
    /// before this layer.
    fn pool_hw(&self, pool_inp: &Tensor) -> Result<usize> {
        let s = &pool_inp.shape;
        ensure!(
            s.len() == 4 && s[..2] == [self.n, self.in_features] && s[2] * s[3] > 0,
            "linear: the pool's input (and its gradient) must be [{}, {}, h, w], got {s:?}",
            self.n,
            self.in_features
        );
        Ok(s[2] * s[3])
    }
}

/// Mirrors `Params` in linear.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    in_features: u32,
    out_features: u32,
    has_bias: u32,
    pool_hw: u32,
    _pad: [u32; 3],
}

/// Features the pooled forward holds in workgroup memory (linear.wgsl's POOL_ROW).
const POOL_ROW: usize = 4096;

const WG: u32 = 64;

fn bias_or_placeholder<'a>(
    gpu: &Gpu,
    cfg: &LinearConfig,
    bias: Option<&'a Tensor>,
    what: &str,
) -> Result<(Option<Tensor>, Option<&'a Tensor>)> {
    match (cfg.bias, bias) {
        (true, Some(b)) => {
            expect_shape(what, b, &[cfg.out_features])?;
            Ok((None, Some(b)))
        }
        (false, None) => Ok((Some(placeholder(gpu)?), None)),
        (want, _) => anyhow::bail!(
            "linear: configuration says bias={want} but {what} was{} given",
            if want { " not" } else { "" }
        ),
    }
}

/// The forward's shape checks and parameter block (with a pool of `pool_hw` pixels taken in, or
/// 0), and the placeholder bound where the layer has no bias.
fn forward_checks(
    gpu: &Gpu,
    cfg: &LinearConfig,
    (inp, weight, bias, out): (&Tensor, &Tensor, Option<&Tensor>, &Tensor),
    pool_hw: usize,
) -> Result<(wgpu::Buffer, Option<Tensor>)> {
    let params = gpu.uniform("linear params", &cfg.params_pooled(pool_hw)?);
    expect_shape("linear input", inp, &[cfg.n, cfg.in_features])?;
    expect_shape("linear weight", weight, &[cfg.out_features, cfg.in_features])?;
    expect_shape("linear output", out, &[cfg.n, cfg.out_features])?;
    let (unused, _) = bias_or_placeholder(gpu, cfg, bias, "linear bias")?;
    Ok((params, unused))
}

pub fn linear_forward(
    gpu: &Gpu,
    cfg: &LinearConfig,
    inp: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    let (params, unused) = forward_checks(gpu, cfg, (inp, weight, bias, out), 0)?;
    let bias = bias.or(unused.as_ref()).ok_or_else(|| anyhow::anyhow!("linear: no bias"))?;
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, bias),
        Bind::Tensor(4, out),
    ];
    let macs = (cfg.n * cfg.in_features * cfg.out_features) as f64;
    let d = gpu.dispatch_in(
        Precision::of(inp),
        "linear",
        "linear_forward",
        &[("WG", WG as f64)],
        &binds,
        gpu.grid_1d(cfg.n * cfg.out_features, WG),
    )?;
    let el = inp.dtype.bytes() as f64;
    Ok(vec![d.with_cost(2.0 * macs, el * (inp.numel() + out.numel()) as f64 + 4.0 * weight.numel() as f64)])
}

/// Loop iterations one invocation of linear_forward_pooled runs: it pools ceil(I / WG) features
/// over `hw` pixels, then sums ceil(O / WG) outputs over the I features.
fn pooled_iterations(cfg: &LinearConfig, hw: usize) -> usize {
    let wg = WG as usize;
    cfg.in_features.div_ceil(wg) * (hw + 1) + cfg.out_features.div_ceil(wg) * (cfg.in_features + 1)
}

/// A global average pool of `pool_inp` [n, in_features, h, w] into `pooled` [n, in_features],
/// then [`linear_forward`] on it, in one dispatch (linear.wgsl, linear_forward_pooled): the two
/// passes' bits. Beyond `POOL_ROW` features, the two passes; so too where one invocation's loops
/// would pass 90 % of the driver's loop cap ([`Gpu::loop_cap`]: on llvmpipe, 2,048 features at
/// 7 x 7 into more than 1,792 classes, where a workgroup per sample sums each of its outputs over
/// every feature; unguarded, past about 1,985 classes the sums came back partial).
pub fn linear_forward_pooled(
    gpu: &Gpu,
    cfg: &LinearConfig,
    pool_inp: &Tensor,
    pooled: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
) -> Result<Vec<Dispatch>> {
    let hw = cfg.pool_hw(pool_inp)?;
    let capped = gpu.loop_cap().is_some_and(|cap| pooled_iterations(cfg, hw) > cap / 10 * 9);
    if cfg.in_features > POOL_ROW || capped {
        let mut d = crate::ops::pool::global_avg_pool_forward(gpu, pool_inp, pooled)?;
        d.extend(linear_forward(gpu, cfg, pooled, weight, bias, out)?);
        return Ok(d);
    }
    let (params, unused) = forward_checks(gpu, cfg, (pooled, weight, bias, out), hw)?;
    let bias = bias.or(unused.as_ref()).ok_or_else(|| anyhow::anyhow!("linear: no bias"))?;
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(2, weight),
        Bind::Tensor(3, bias),
        Bind::Tensor(4, out),
        Bind::Tensor(9, pool_inp),
        Bind::Tensor(10, pooled),
    ];
    let macs = (cfg.n * cfg.in_features * cfg.out_features) as f64;
    let d = gpu.dispatch_in(
        Precision::of(pool_inp),
        "linear",
        "linear_forward_pooled",
        &[("WG", WG as f64)],
        &binds,
        gpu.grid_1d(cfg.n * WG as usize, WG),
    )?;
    // The pool's input read and its output written once (the two passes also read it back), the
    // weights, the output written; an add per pooled element.
    let el = pool_inp.dtype.bytes() as f64;
    let bytes = el * (pool_inp.numel() + pooled.numel() + out.numel()) as f64 + 4.0 * weight.numel() as f64;
    Ok(vec![d.with_cost(2.0 * macs + pool_inp.numel() as f64, bytes)])
}

/// dinp, then dweight and dbias (when the layer has a bias).
pub fn linear_backward(
    gpu: &Gpu,
    cfg: &LinearConfig,
    inp: &Tensor,
    weight: &Tensor,
    dout: &Tensor,
    dinp: &Tensor,
    dweight: &Tensor,
    dbias: Option<&Tensor>,
) -> Result<Vec<Dispatch>> {
    expect_shape("linear dinp", dinp, &[cfg.n, cfg.in_features])?;
    backward(gpu, cfg, (inp, weight, dout), dinp, 0, (dweight, dbias))
}

/// [`linear_backward`] after a global average pool (`inp` its output [n, in_features]) whose
/// backward it runs itself (linear.wgsl, SPREAD): `pool_dinp` [n, in_features, h, w] gets
/// the pool's input gradient, the bits of linear_backward_input then global_avg_pool_backward,
/// and the pooled gradient is never stored.
pub fn linear_backward_spread(
    gpu: &Gpu,
    cfg: &LinearConfig,
    inp: &Tensor,
    weight: &Tensor,
    dout: &Tensor,
    pool_dinp: &Tensor,
    dweight: &Tensor,
    dbias: Option<&Tensor>,
) -> Result<Vec<Dispatch>> {
    backward(gpu, cfg, (inp, weight, dout), pool_dinp, cfg.pool_hw(pool_dinp)?, (dweight, dbias))
}

/// The backward's two dispatches; `spread_hw` > 0 spreads the input gradient over that many
/// pixels per value (`dinp` then holds n·in_features·spread_hw values).
fn backward(
    gpu: &Gpu,
    cfg: &LinearConfig,
    (inp, weight, dout): (&Tensor, &Tensor, &Tensor),
    dinp: &Tensor,
    spread_hw: usize,
    (dweight, dbias): (&Tensor, Option<&Tensor>),
) -> Result<Vec<Dispatch>> {
    let params = gpu.uniform("linear params", &cfg.params_pooled(spread_hw)?);
    expect_shape("linear input", inp, &[cfg.n, cfg.in_features])?;
    expect_shape("linear weight", weight, &[cfg.out_features, cfg.in_features])?;
    expect_shape("linear dout", dout, &[cfg.n, cfg.out_features])?;
    expect_shape("linear dweight", dweight, &[cfg.out_features, cfg.in_features])?;
    let (unused, dbias) = bias_or_placeholder(gpu, cfg, dbias, "linear dbias")?;
    let dbias = dbias.or(unused.as_ref()).ok_or_else(|| anyhow::anyhow!("linear: no dbias"))?;
    let consts = [("WG", WG as f64)];
    let binds = [Bind::Uniform(0, &params), Bind::Tensor(2, weight), Bind::Tensor(5, dout), Bind::Tensor(6, dinp)];
    let macs = (cfg.n * cfg.in_features * cfg.out_features) as f64;
    let bytes = inp.dtype.bytes() as f64 * (inp.numel() + dout.numel()) as f64 + 4.0 * weight.numel() as f64;
    // dout and the weights read, dinp written: the pooled gradient, or the pool's input gradient
    // (the pool's pass counted in: a division per value written).
    let el = dinp.dtype.bytes() as f64;
    let in_bytes = el * (dinp.numel() + dout.numel()) as f64 + 4.0 * weight.numel() as f64;
    let in_flops = 2.0 * macs + if spread_hw > 0 { dinp.numel() as f64 } else { 0.0 };
    let input = gpu
        .dispatch_in(
            Precision::of(dout),
            "linear",
            "linear_backward_input",
            &[("WG", WG as f64), ("SPREAD", f64::from(u8::from(spread_hw > 0)))],
            &binds,
            gpu.grid_1d(cfg.n * cfg.in_features, WG),
        )?
        .with_cost(in_flops, in_bytes);
    let binds = [
        Bind::Uniform(0, &params),
        Bind::Tensor(1, inp),
        Bind::Tensor(5, dout),
        Bind::Tensor(7, dweight),
        Bind::Tensor(8, dbias),
    ];
    let total = cfg.out_features * cfg.in_features + cfg.out_features;
    let weight = gpu
        .dispatch_in(Precision::of(dout), "linear", "linear_backward_weight", &consts, &binds, gpu.grid_1d(total, WG))?
        .with_cost(2.0 * macs, bytes);
    Ok(vec![input, weight])
}
