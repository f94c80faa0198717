//! The choice of kernel per layer and pass: the built-in choice, the candidates the tuner times,
//! its cache key and the cache's spelling of a kernel, and [`choose`].

use anyhow::{Context, Result};

use super::{Conv2dConfig, ConvBuffers, ConvKernel, ConvPass, RegisterTiles, WorkgroupTiles, conv2d_pass};
use crate::gpu::tune::{TuneEntry, TuneMode};
use crate::gpu::{Dispatch, Gpu, Precision, Tensor};

impl ConvKernel {
    /// The tuning cache's spelling. The `Workgroup` family keeps the name it was first cached
    /// under, `tiled` (after its file, `conv2d_tiled.wgsl`), so caches written before and after
    /// the rename read alike.
    pub(super) fn encode(&self) -> String {
        match self {
            ConvKernel::Register(t) => format!("register:{},{},{},{}", t.gemm_m, t.gemm_n, t.wgrad_ci, t.wgrad_n),
            ConvKernel::Workgroup(t) => format!("tiled:{},{},{},{},{}", t.bm, t.bn, t.bk, t.tm, t.tn),
            ConvKernel::Coop(t) => format!("coop:{t}"),
        }
    }

    /// A cached choice back, only if it names a kernel this build has: a cache written by
    /// another version, or edited, never selects a shape that was not built and tested.
    pub(super) fn decode(s: &str) -> Option<ConvKernel> {
        let (family, dims) = s.split_once(':')?;
        let v: Vec<usize> = dims.split(',').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let k = match (family, &v[..]) {
            ("register", &[gemm_m, gemm_n, wgrad_ci, wgrad_n]) => {
                ConvKernel::Register(RegisterTiles { gemm_m, gemm_n, wgrad_ci, wgrad_n })
            }
            ("tiled", &[bm, bn, bk, tm, tn]) => ConvKernel::Workgroup(WorkgroupTiles { bm, bn, bk, tm, tn }),
            ("coop", &[t]) => ConvKernel::Coop(u32::try_from(t).ok()?),
            _ => return None,
        };
        let known = match k {
            ConvKernel::Register(t) => RegisterTiles::ALL.contains(&t),
            ConvKernel::Workgroup(t) => WorkgroupTiles::ALL.contains(&t),
            ConvKernel::Coop(t) => t == 8 || t == 16,
        };
        known.then_some(k)
    }
}

/// The dispatches of `pass` with the chosen `kernel`, or — should it not launch here (a cache
/// carried from another adapter, a grid past this one's limits) — with the built-in register
/// blocks, said once. Returns the kernel that runs.
pub fn conv2d_pass_chosen(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    pass: ConvPass,
    kernel: ConvKernel,
    b: &ConvBuffers<'_>,
) -> Result<(Vec<Dispatch>, ConvKernel)> {
    let builtin = ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg));
    match conv2d_pass(gpu, cfg, pass, kernel, b) {
        Ok(d) => Ok((d, kernel)),
        Err(e) if kernel != builtin => {
            eprintln!("warning: {kernel} cannot run conv2d {pass:?} {cfg:?} here ({e:#}); using {builtin}");
            Ok((conv2d_pass(gpu, cfg, pass, builtin, b)?, builtin))
        }
        Err(e) => Err(e),
    }
}

/// The kernel a plan of `precision` runs untimed: an f16 plan's GEMMs on cooperative matrices
/// where the adapter lists them (tensor cores take f16 operands, the FMA kernels leave them idle),
/// else the register blocks for this adapter and layer.
pub fn builtin(gpu: &Gpu, cfg: &Conv2dConfig, precision: Precision) -> ConvKernel {
    match (precision, gpu.coop_tile) {
        (Precision::F16, Some(t)) => ConvKernel::Coop(t),
        _ => ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg)),
    }
}

/// The kernels worth timing for a pass of a `precision` plan: the built-in choice first, then the
/// others `mode` allows, each once (register shapes that differ only in fields another pass uses
/// count as one). With cooperative matrices built in, the register blocks are the first challenger.
/// Grouped layers get the same candidates: every family runs one GEMM per group (the register
/// blocks number (group, block) along the grid's y, the workgroup and coop GEMMs along z), so none
/// has to be withheld; a depthwise layer leaves most of each block's columns idle in all of them.
pub(super) fn candidates(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    pass: ConvPass,
    mode: TuneMode,
    precision: Precision,
) -> Vec<ConvKernel> {
    let mut out = vec![builtin(gpu, cfg, precision)];
    let mut push = |k: ConvKernel| {
        let same = |a: &ConvKernel| match (a, &k) {
            (ConvKernel::Register(a), ConvKernel::Register(b)) => match pass {
                ConvPass::BackwardWeight => (a.wgrad_ci, a.wgrad_n) == (b.wgrad_ci, b.wgrad_n),
                _ => (a.gemm_m, a.gemm_n) == (b.gemm_m, b.gemm_n),
            },
            (a, b) => a == b,
        };
        if !out.iter().any(same) {
            out.push(k);
        }
    };
    match mode {
        TuneMode::Off => {}
        // On a CPU adapter the workgroup tiles lose by far (lavapipe: 4-21x slower than the
        // register blocks on every senet layer with conv2d_tiled.wgsl v6, 8-25x with v1; its
        // header): quick keeps the built-in choice there without timing (full tuning of senet
        // w0.25 b32 took 491 s with v1). On an H200 the v6 tiles won nearly every layer.
        TuneMode::Quick if gpu.is_cpu() => {}
        TuneMode::Quick => {
            push(ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg)));
            WorkgroupTiles::ALL[..4].iter().for_each(|&t| push(ConvKernel::Workgroup(t)));
        }
        TuneMode::Full => {
            push(ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg)));
            for gemm_m in [8, 16] {
                for gemm_n in [8, 16] {
                    push(ConvKernel::Register(RegisterTiles { gemm_m, gemm_n, wgrad_ci: gemm_n / 2, wgrad_n: gemm_n }));
                }
            }
            WorkgroupTiles::ALL.iter().for_each(|&t| push(ConvKernel::Workgroup(t)));
        }
    }
    out
}

/// The tuning cache's key for a pass of a layer shape in a `precision` plan. An f32 plan's key is
/// the shape alone, as before precisions existed (every entry of an older cache was timed in f32,
/// so it stays valid under the same key and the file keeps its version); an f16 plan's adds
/// " f16", and " coop8" or " coop16" where cooperative matrices are candidates (an adapter with
/// `SENET_COOP=off` is the same device key but another set of candidates). A grouped layer's key
/// names its groups (" g32"); an ordinary layer's keeps the key it had before groups existed.
pub fn tune_key(gpu: &Gpu, cfg: &Conv2dConfig, pass: ConvPass, precision: Precision) -> String {
    key_for(gpu, cfg, &format!("{pass:?}"), precision)
}

/// The key of a layer's joint backward ([`choose_joint`]): the passes' keys with "BackwardJoint",
/// and the two passes' own choices it was timed against (" of tiled:…+tiled:…"), so a later
/// tuning that changes either times the pair again rather than reading a choice made for another.
fn joint_key(gpu: &Gpu, cfg: &Conv2dConfig, precision: Precision, pair: (ConvKernel, ConvKernel)) -> String {
    format!("{} of {}+{}", key_for(gpu, cfg, "BackwardJoint", precision), pair.0.encode(), pair.1.encode())
}

/// [`tune_key`] with the pass spelled `pass`.
fn key_for(gpu: &Gpu, cfg: &Conv2dConfig, pass: &str, precision: Precision) -> String {
    let c = cfg;
    let variant = match (precision, gpu.coop_tile) {
        (Precision::F32, _) => String::new(),
        (Precision::F16, None) => " f16".to_string(),
        (Precision::F16, Some(t)) => format!(" f16 coop{t}"),
    };
    let groups = if c.groups == 1 { String::new() } else { format!(" g{}", c.groups) };
    format!(
        "conv2d {pass} n{} c{}->{} {}x{} k{}x{} s{}x{} p{}x{} d{}x{}{groups} bias{}{variant}",
        c.n,
        c.c_in,
        c.c_out,
        c.h,
        c.w,
        c.kh,
        c.kw,
        c.stride.0,
        c.stride.1,
        c.pad.0,
        c.pad.1,
        c.dilation.0,
        c.dilation.1,
        u8::from(c.bias)
    )
}

/// The kernel for `pass` of a layer shaped `cfg` in a `precision` plan: the tuning cache's
/// answer, else the fastest candidate timed now in that precision (and remembered), else — with
/// nothing to time — the built-in choice. `--conv-tiles` (pinning the register blocks, for
/// measuring) bypasses the tuner.
pub fn choose(gpu: &Gpu, cfg: &Conv2dConfig, pass: ConvPass, precision: Precision) -> Result<ConvKernel> {
    let mode = gpu.tuner.mode;
    let cands = candidates(gpu, cfg, pass, mode, precision);
    if RegisterTiles::pinned(gpu).is_some() {
        // The pin is the register blocks' (RegisterTiles::for_layer reads it), whatever the
        // built-in choice of this precision would be.
        return Ok(ConvKernel::Register(RegisterTiles::for_layer(gpu, cfg)));
    }
    if mode == TuneMode::Off {
        return Ok(cands[0]);
    }
    let key = tune_key(gpu, cfg, pass, precision);
    if let Some(k) = cached_choice(gpu, &key, "kernel", ConvKernel::decode) {
        return Ok(k);
    }
    if cands.len() == 1 {
        return Ok(cands[0]);
    }
    let start = std::time::Instant::now();
    let scratch = Scratch::new(gpu, cfg, precision)?;
    let bufs = scratch.buffers();
    // A candidate the adapter cannot build or run (workgroup limits, grid size) is left out.
    let runnable: Vec<ConvKernel> =
        cands.iter().copied().filter(|&k| conv2d_pass(gpu, cfg, pass, k, &bufs).is_ok()).collect();
    let times = time_candidates(gpu, &runnable, |&k| conv2d_pass(gpu, cfg, pass, k, &bufs));
    let mut best: Option<(ConvKernel, f64)> = None;
    for (&k, secs) in runnable.iter().zip(times) {
        if !secs.is_finite() {
            continue;
        }
        if gpu.tuner.verbose {
            eprintln!("tune {key}: {k} {:.3} ms", secs * 1e3);
        }
        // Another kernel must beat the built-in by 5 % to replace it: a win inside the timing
        // noise would trade a measured, long-tested choice for nothing.
        let margin = if best.is_some_and(|(b, _)| b == cands[0]) { 0.95 } else { 1.0 };
        if best.is_none_or(|(_, b)| secs < b * margin) {
            best = Some((k, secs));
        }
    }
    let (kernel, secs) = best.with_context(|| format!("no conv2d kernel could run {key}"))?;
    gpu.tuner.store(&key, TuneEntry { choice: kernel.encode(), ms: secs * 1e3, mode }, start.elapsed().as_secs_f64());
    Ok(kernel)
}

/// The tuning cache's choice under `key`, decoded by `decode`, where this run may use it; else
/// `None` and the entry forgotten, to be timed again: a full run times again what a quick one
/// chose, and a choice `decode` does not know (a cache written by another version, or edited,
/// never selects a kernel that was not built and tested) is said once, as an unknown `what`.
fn cached_choice<T>(gpu: &Gpu, key: &str, what: &str, decode: impl Fn(&str) -> Option<T>) -> Option<T> {
    let entry = gpu.tuner.cached(key)?;
    match decode(&entry.choice) {
        Some(k) if !(gpu.tuner.mode == TuneMode::Full && entry.mode != TuneMode::Full) => return Some(k),
        Some(_) => {}
        None => {
            eprintln!("warning: the tuning cache names an unknown {what} {:?} for {key}; timing again", entry.choice)
        }
    }
    gpu.tuner.forget(key);
    None
}

/// Scratch buffers of a layer's shapes in a plan's types (activations and GEMM operands of its
/// precision, the bias and the weight gradient f32), zero-filled (the kernels' speed does not
/// depend on the values), freed when the choice is made.
struct Scratch {
    inp: Tensor,
    out: Tensor,
    dinp: Tensor,
    weight: Tensor,
    dweight: Tensor,
    bias: Option<Tensor>,
}

impl Scratch {
    fn new(gpu: &Gpu, cfg: &Conv2dConfig, precision: Precision) -> Result<Scratch> {
        let t = |label: &str, shape: &[usize]| Tensor::zeros_of(gpu, label, shape, precision.dtype());
        Ok(Scratch {
            inp: t("tuning input", &cfg.input_shape())?,
            out: t("tuning output", &cfg.output_shape())?,
            dinp: t("tuning input gradient", &cfg.input_shape())?,
            weight: t("tuning weight", &cfg.weight_shape())?,
            dweight: Tensor::zeros(gpu, "tuning weight gradient", &cfg.weight_shape())?,
            bias: if cfg.bias { Some(Tensor::zeros(gpu, "tuning bias", &[cfg.c_out])?) } else { None },
        })
    }

    /// Every pass's buffers (the output gradient is the output's buffer: no pass reads one and
    /// writes the other).
    fn buffers(&self) -> ConvBuffers<'_> {
        ConvBuffers {
            inp: Some(&self.inp),
            weight: Some(&self.weight),
            bias: self.bias.as_ref(),
            out: Some(&self.out),
            dout: Some(&self.out),
            dinp: Some(&self.dinp),
            dweight: Some(&self.dweight),
            relu: false,
            dinp_addend: None,
            out_stats: None,
            input_affine: None,
        }
    }
}

/// Each candidate's time in seconds (infinite where it failed to record or run), `record` giving
/// its dispatches. Every candidate's pipelines are compiled before (the caller records each
/// once to keep the runnable ones), then each is timed in two sweeps over all of them, its best
/// kept. Timed right after its own compilation, a candidate could run at whatever clock the GPU
/// had dropped to while idle: on an H200 the same kernel for the same layer timed 0.39 ms in one
/// run and 0.91 ms in another, as the first candidate. In the second sweep every candidate follows
/// another's runs. Each timing: four runs in one submission, the first warming caches, the best of
/// the other three. Each timing records its candidate again (its pipelines come from the
/// registry): holding every candidate's dispatches at once would hold every one's weight-gradient
/// partials too.
fn time_candidates<T>(gpu: &Gpu, cands: &[T], record: impl Fn(&T) -> Result<Vec<Dispatch>>) -> Vec<f64> {
    let mut times = vec![f64::INFINITY; cands.len()];
    for _sweep in 0..2 {
        for (i, k) in cands.iter().enumerate() {
            let Ok(dispatches) = record(k) else { continue };
            let group: Vec<&Dispatch> = dispatches.iter().collect();
            let Ok(t) = gpu.time_passes(&[group.clone(), group.clone(), group.clone(), group]) else { continue };
            times[i] = t[1..].iter().copied().fold(times[i], f64::min);
        }
    }
    times
}

/// A joint-backward cache entry's choice: "apart", or the workgroup tile shape of the one
/// dispatch; `None` for anything else (a shape this build does not have, another family).
fn decode_joint(s: &str) -> Option<Option<ConvKernel>> {
    match s {
        "apart" => Some(None),
        _ => ConvKernel::decode(s).filter(|k| matches!(k, ConvKernel::Workgroup(_))).map(Some),
    }
}

/// Whether, and with which kernel, a layer whose input gradient chose `input` and weight gradient
/// `weight` runs its two gradients as one dispatch (`--joint-backward` on; `None` = apart). The
/// register blocks' pair, or one tile shape for both, always do ([`super::joint_kernel`]). Two
/// different workgroup tile shapes — one H200's quick tuning gave 20 of 30 layer shapes that (base
/// SENet, SE-ResNet-20 and SE-ResNet-50; docs/runs/workgroup-v6-h200/tune.json) — ask the tuner: it times the two
/// passes apart against one dispatch on either shape (on every shape built, with full tuning) and
/// remembers the fastest under the layer's "BackwardJoint" key for that pair, "apart" where the passes apart
/// won, so a joint dispatch replaces them only where it is measured faster (a tie stays apart). Other
/// pairs run apart; so do untimed plans (`--tune off`, and quick tuning on CPU adapters).
pub fn choose_joint(
    gpu: &Gpu,
    cfg: &Conv2dConfig,
    precision: Precision,
    input: ConvKernel,
    weight: ConvKernel,
) -> Result<Option<ConvKernel>> {
    if let Some(k) = super::joint_kernel(input, weight) {
        return Ok(Some(k));
    }
    let (ConvKernel::Workgroup(a), ConvKernel::Workgroup(b)) = (input, weight) else { return Ok(None) };
    let mode = gpu.tuner.mode;
    if mode == TuneMode::Off {
        return Ok(None);
    }
    let key = joint_key(gpu, cfg, precision, (input, weight));
    if let Some(k) = cached_choice(gpu, &key, "joint backward", decode_joint) {
        return Ok(k);
    }
    if mode == TuneMode::Quick && gpu.is_cpu() {
        return Ok(None);
    }
    let start = std::time::Instant::now();
    let scratch = Scratch::new(gpu, cfg, precision)?;
    let bufs = scratch.buffers();
    let shapes = if mode == TuneMode::Full { WorkgroupTiles::ALL.to_vec() } else { vec![a, b] };
    // None: the two passes apart, as chosen.
    let record = |k: &Option<ConvKernel>| match *k {
        None => {
            let mut d = conv2d_pass(gpu, cfg, ConvPass::BackwardInput, input, &bufs)?;
            d.extend(conv2d_pass(gpu, cfg, ConvPass::BackwardWeight, weight, &bufs)?);
            Ok(d)
        }
        Some(k) => super::conv2d_backward_joint(gpu, cfg, k, &bufs, super::splits_for(gpu, cfg, k)),
    };
    let cands: Vec<Option<ConvKernel>> = std::iter::once(None)
        .chain(shapes.into_iter().map(|t| Some(ConvKernel::Workgroup(t))))
        .filter(|k| record(k).is_ok())
        .collect();
    let times = time_candidates(gpu, &cands, record);
    let mut best: Option<(Option<ConvKernel>, f64)> = None;
    for (&k, secs) in cands.iter().zip(times) {
        if gpu.tuner.verbose && secs.is_finite() {
            let name = k.map_or("apart".to_string(), |k| format!("joint {k}"));
            eprintln!("tune {key}: {name} {:.3} ms", secs * 1e3);
        }
        if secs.is_finite() && best.is_none_or(|(_, b)| secs < b) {
            best = Some((k, secs));
        }
    }
    let (kernel, secs) = best.with_context(|| format!("no conv2d backward could run {key}"))?;
    let choice = kernel.map_or("apart".to_string(), |k| k.encode());
    gpu.tuner.store(&key, TuneEntry { choice, ms: secs * 1e3, mode }, start.elapsed().as_secs_f64());
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cache files written before the families were renamed (Tiles / SmemTiles / ConvKernel::Tiled)
    /// name the same kernels: every spelling those versions wrote decodes to the kernel it meant,
    /// and encoding it again gives the same string back.
    #[test]
    fn cached_choices_of_older_versions_decode_to_the_same_kernels() {
        let cases = [
            (
                "register:16,16,8,16",
                ConvKernel::Register(RegisterTiles { gemm_m: 16, gemm_n: 16, wgrad_ci: 8, wgrad_n: 16 }),
            ),
            ("register:4,8,4,8", ConvKernel::Register(RegisterTiles { gemm_m: 4, gemm_n: 8, wgrad_ci: 4, wgrad_n: 8 })),
            ("tiled:64,64,16,4,4", ConvKernel::Workgroup(WorkgroupTiles { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4 })),
            ("tiled:32,128,16,4,4", ConvKernel::Workgroup(WorkgroupTiles { bm: 32, bn: 128, bk: 16, tm: 4, tn: 4 })),
            ("tiled:128,128,8,8,8", ConvKernel::Workgroup(WorkgroupTiles { bm: 128, bn: 128, bk: 8, tm: 8, tn: 8 })),
            ("coop:8", ConvKernel::Coop(8)),
            ("coop:16", ConvKernel::Coop(16)),
        ];
        for (s, k) in cases {
            assert_eq!(ConvKernel::decode(s), Some(k), "{s}");
            assert_eq!(k.encode(), s, "{k}");
        }
        // Every built shape goes round; shapes that were never built, or are no longer (the tiles
        // with micro-tiles 2 wide, which conv2d_tiled.wgsl v6 replaced), do not decode: a cache
        // naming one times that layer again.
        for t in RegisterTiles::ALL {
            assert_eq!(ConvKernel::decode(&ConvKernel::Register(t).encode()), Some(ConvKernel::Register(t)));
        }
        for t in WorkgroupTiles::ALL {
            assert_eq!(ConvKernel::decode(&ConvKernel::Workgroup(t).encode()), Some(ConvKernel::Workgroup(t)));
        }
        for bad in [
            "tiled:64,64,8,4,4",
            "tiled:64,32,32,4,2",
            "tiled:32,128,16,2,8",
            "register:32,16,8,16",
            "coop:4",
            "tiled:",
            "smem:64",
        ] {
            assert_eq!(ConvKernel::decode(bad), None, "{bad}");
        }
    }
}
