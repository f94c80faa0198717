//! The pipeline registry (every shader module compiled once, every pipeline built once per
//! entry point and override set) and `Dispatch`, one recorded kernel launch.
//!
//! Binding convention, in every shader: binding 0 is the op's uniform parameter block; storage
//! buffers follow with numbers unique within the file, so an entry point's auto-derived layout
//! holds exactly the bindings it uses and the host names them by number.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Context, Result, ensure};
use wgpu::util::DeviceExt;

use super::{Gpu, Tensor, tensor::Dtype};

/// Every WGSL file, embedded at build time: (op family, source).
pub const SHADERS: &[(&str, &str)] = &[
    (
        "conv2d",
        concat!(
            include_str!("../ops/conv2d/conv2d.wgsl"),
            include_str!("../ops/conv2d/conv2d_own.wgsl"),
            include_str!("../ops/conv2d/conv2d_params.wgsl")
        ),
    ),
    (
        "conv2d_tiled",
        concat!(
            include_str!("../ops/conv2d/conv2d_tiled.wgsl"),
            include_str!("../ops/conv2d/conv2d_gemm.wgsl"),
            include_str!("../ops/conv2d/conv2d_params.wgsl")
        ),
    ),
    (
        "batch_norm",
        concat!(
            include_str!("../ops/batch_norm/batch_norm.wgsl"),
            include_str!("../ops/pool/max_pool_window.wgsl"),
            include_str!("../ops/se_block/se_weight_grad.wgsl")
        ),
    ),
    ("bn_fold", include_str!("../ops/bn_fold/bn_fold.wgsl")),
    ("relu", include_str!("../ops/relu/relu.wgsl")),
    ("pool", concat!(include_str!("../ops/pool/pool.wgsl"), include_str!("../ops/pool/max_pool_window.wgsl"))),
    (
        "se_block",
        concat!(include_str!("../ops/se_block/se_block.wgsl"), include_str!("../ops/se_block/se_weight_grad.wgsl")),
    ),
    ("linear", include_str!("../ops/linear/linear.wgsl")),
    ("cross_entropy", include_str!("../ops/cross_entropy/cross_entropy.wgsl")),
    ("optimizer", include_str!("../ops/optimizer/optimizer.wgsl")),
    ("bench", include_str!("../../shaders/bench.wgsl")),
    ("add", include_str!("../ops/add/add.wgsl")),
    ("cast", include_str!("../ops/cast/cast.wgsl")),
    ("grad_scaler", include_str!("../ops/grad_scaler/grad_scaler.wgsl")),
    ("clip_grad_norm", include_str!("../ops/clip_grad_norm/clip_grad_norm.wgsl")),
    ("dropout", include_str!("../ops/dropout/dropout.wgsl")),
    ("grad_accum", include_str!("../ops/grad_accum/grad_accum.wgsl")),
    ("model_ema", include_str!("../ops/model_ema/model_ema.wgsl")),
];

/// Kernels on cooperative matrices, compiled only where the adapter lists a square f16 -> f32
/// configuration (`Gpu::coop_tile`), with [`coop_prelude`] appended.
pub const COOP_SHADERS: &[(&str, &str)] = &[(
    "conv2d_coop",
    concat!(
        include_str!("../ops/conv2d/conv2d_coop.wgsl"),
        include_str!("../ops/conv2d/conv2d_gemm.wgsl"),
        include_str!("../ops/conv2d/conv2d_params.wgsl")
    ),
)];

/// Kernels on subgroup broadcasts, compiled only where subgroups are on and 8 to 64 lanes wide
/// (`Gpu::conv_lanes`): `conv2d.wgsl` with `conv2d_lanes.wgsl` appended, the register GEMM loading
/// its column weights once per subgroup. The name is the appended file's.
pub const LANE_SHADERS: &[(&str, &str)] = &[(
    "conv2d_lanes",
    concat!(
        include_str!("../ops/conv2d/conv2d.wgsl"),
        include_str!("../ops/conv2d/conv2d_lanes.wgsl"),
        include_str!("../ops/conv2d/conv2d_params.wgsl")
    ),
)];

/// What `conv2d.wgsl` gets in the module every adapter builds in place of `conv2d_lanes.wgsl`:
/// `LANES` false and lane functions it never calls. Not compiled alone.
pub const CONV_OWN_PART: (&str, &str) = ("conv2d_own", include_str!("../ops/conv2d/conv2d_own.wgsl"));

/// What the two workgroup-GEMM convolution files share (bindings, GEMM dimensions per MODE, operand
/// loads, store), appended to each in [`SHADERS`] and [`COOP_SHADERS`] at build time — after the
/// file, so compiler messages keep the file's own line numbers. Not compiled alone.
pub const CONV_GEMM_PART: (&str, &str) = ("conv2d_gemm", include_str!("../ops/conv2d/conv2d_gemm.wgsl"));

/// The parameter block (`struct Params`, binding 0) every conv2d kernel reads, written once and
/// appended to `conv2d.wgsl`, `conv2d_tiled.wgsl` and `conv2d_coop.wgsl` (after the file, as
/// [`CONV_GEMM_PART`]); mirrors `ops::conv2d::Params`. Not compiled alone.
pub const CONV_PARAMS_PART: (&str, &str) = ("conv2d_params", include_str!("../ops/conv2d/conv2d_params.wgsl"));

/// Max pooling's window scan and gradient gather, appended to `pool` and to `batch_norm` (its fused
/// pool). Not compiled alone.
pub const POOL_WINDOW_PART: (&str, &str) = ("max_pool_window", include_str!("../ops/pool/max_pool_window.wgsl"));

/// An SE block's weight-gradient sums, appended to `se_block` (its own dispatch) and to
/// `batch_norm` (SE_WGRAD, in the backward of the batch norm before the block). Not compiled alone.
pub const SE_WEIGHT_GRAD_PART: (&str, &str) = ("se_weight_grad", include_str!("../ops/se_block/se_weight_grad.wgsl"));

/// What a cooperative-matrix kernel is written against: the tile CT and the coop types of that
/// size (coop_mat8x8 and coop_mat16x16 are distinct types in WGSL, so the size cannot be an
/// override). A and B hold `act` (f16), C accumulates f32.
pub fn coop_prelude(t: u32) -> String {
    format!(
        "const CT: u32 = {t}u;\nalias coop_a = coop_mat{t}x{t}<act, A>;\nalias coop_b = coop_mat{t}x{t}<act, B>;\n\
         alias coop_c = coop_mat{t}x{t}<f32, C>;\n"
    )
}

/// The reduction preludes, one of which is appended to every shader file (WGSL declarations may
/// come in any order, so appending keeps the file's own line numbers in error messages): the
/// subgroup one where the device has subgroups and they are not turned off, else the workgroup
/// one. Both give the same functions (`lane_of`, `sg_sum`, `block_sum2`, `block_welford`).
pub const PRELUDE_WORKGROUP: (&str, &str) = ("reduce_workgroup", include_str!("../../shaders/reduce_workgroup.wgsl"));
pub const PRELUDE_SUBGROUP: (&str, &str) = ("reduce_subgroup", include_str!("../../shaders/reduce_subgroup.wgsl"));

/// The element type of a plan's activations, activation gradients and GEMM operands: every
/// kernel is written once against the type `act` (loads widen with `f32(x)`, stores narrow with
/// `act(v)`, arithmetic and accumulation stay f32), which the host defines per compiled variant.
/// For f32 the conversions are identities: the f32 variant is a plain f32 kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// f16 activations and GEMM operands, f32 arithmetic, statistics and master weights.
    F16,
}

impl Precision {
    pub fn dtype(self) -> Dtype {
        match self {
            Precision::F32 => Dtype::F32,
            Precision::F16 => Dtype::F16,
        }
    }

    /// The precision of a kernel whose activations are `t`'s.
    pub fn of(t: &Tensor) -> Precision {
        if t.dtype == Dtype::F16 { Precision::F16 } else { Precision::F32 }
    }

    pub fn name(self) -> &'static str {
        self.dtype().name()
    }
}

/// `act_rounded(v)`: v as an `act` value stores it, in f32. The f32 variant: v itself.
const ACT_F32: &str = "alias act = f32;
fn act_rounded(v: f32) -> f32 {
    return v;
}
";

/// `act_rounded(v)` in the f16 variant: v rounded to the nearest f16 (ties to even, 65520 and
/// above to infinity, subnormals kept), in f32, by integer operations on v's bits. Written as
/// f32(f16(v)) the rounding may be folded away by the compiler: Mesa 26's lavapipe does (measured:
/// an f16 conv2d input gradient with an addend, 34 of 105 values an f16 ulp off the unfused sum;
/// Mesa 22's keeps it), and naga has no bitcast from f16 to read the bits of f16(v) instead. A
/// kernel that must give bit for bit what storing v as f16 and reading it back gives (conv2d's
/// input-gradient addend) rounds with this; it equals the device's own conversion wherever that
/// rounds to nearest even, as IEEE's default, lavapipe's and the GPUs' conversions do.
const ACT_F16: &str = "alias act = f16;
fn act_rounded(v: f32) -> f32 {
    let b = bitcast<u32>(v);
    let sign = b & 0x80000000u;
    let a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) {
        return v;
    }
    if (a >= 0x38800000u) {
        // |v| >= 2^-14, f16's normal range: 10 of the 23 mantissa bits, ties to even.
        let r = (a + 0xfffu + ((a >> 13u) & 1u)) & 0xffffe000u;
        if (r >= 0x47800000u) {
            return bitcast<f32>(sign | 0x7f800000u);
        }
        return bitcast<f32>(sign | r);
    }
    // Below 2^-14: a multiple of 2^-24 (an f16 subnormal), ties to even; below 2^-25, 0.
    let e = a >> 23u;
    if (e < 102u) {
        return bitcast<f32>(sign);
    }
    let m = (a & 0x7fffffu) | 0x800000u;
    let s = 126u - e;
    var q = m >> s;
    let rem = m & ((1u << s) - 1u);
    let half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u) == 1u)) {
        q += 1u;
    }
    return bitcast<f32>(bitcast<u32>(f32(q) * 5.9604644775390625e-8) | sign);
}
";

/// The source the device compiles for `shader`: the file, then the reduction prelude and the
/// definition of `act` (with `act_rounded`). f16 needs `enable f16;` before everything else, so
/// its variant's line numbers in compiler messages are one more than the file's.
pub fn shader_source(src: &str, subgroups: bool, precision: Precision) -> String {
    let prelude = if subgroups { PRELUDE_SUBGROUP.1 } else { PRELUDE_WORKGROUP.1 };
    match precision {
        Precision::F32 => format!("{src}\n{prelude}\n{ACT_F32}"),
        Precision::F16 => format!("enable f16;\n{src}\n{prelude}\n{ACT_F16}"),
    }
}

/// A compiled shader variant and the element width (bytes) of each storage binding it declares,
/// read off the source with naga: binding a tensor of another width is a plan-time error naming
/// both, not a silent reinterpretation of its bytes.
#[derive(Clone)]
struct Module {
    module: wgpu::ShaderModule,
    widths: HashMap<u32, (String, usize)>,
}

#[derive(Default)]
pub(crate) struct KernelRegistry {
    modules: Mutex<HashMap<(&'static str, Precision), Module>>,
    pipelines: Mutex<HashMap<String, wgpu::ComputePipeline>>,
}

/// Each group-0 storage array's element width, by binding number.
fn binding_widths(src: &str) -> Result<HashMap<u32, (String, usize)>> {
    let module = naga::front::wgsl::parse_str(src).map_err(|e| anyhow::anyhow!("{}", e.emit_to_string(src)))?;
    let mut out = HashMap::new();
    for (_, var) in module.global_variables.iter() {
        let (Some(binding), naga::AddressSpace::Storage { .. }) = (&var.binding, var.space) else { continue };
        let naga::TypeInner::Array { base, .. } = module.types[var.ty].inner else { continue };
        let width = match module.types[base].inner {
            naga::TypeInner::Scalar(s) => s.width,
            naga::TypeInner::Vector { scalar, .. } => scalar.width,
            _ => continue,
        };
        out.insert(binding.binding, (var.name.clone().unwrap_or_default(), usize::from(width)));
    }
    Ok(out)
}

/// Which part of a training step a dispatch belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum Pass {
    /// Outside a model's step (tests, benchmarks).
    #[default]
    None,
    Forward,
    Loss,
    Backward,
    Optimizer,
}

/// One kernel launch, ready to record: the plan is a list of these, built once and replayed.
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub label: &'static str,
    /// The layer it belongs to (PyTorch name), empty outside a model's plan.
    pub layer: String,
    pub pass: Pass,
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
    /// The work it does, for the benchmark's per-kernel table: floating-point operations and
    /// the bytes it must move at least (each input read once, each output written once).
    pub flops: f64,
    pub bytes: f64,
}

impl Dispatch {
    /// Name the dispatch for tables and captures when its entry point serves several passes.
    pub fn labelled(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }

    /// Declare the dispatch's work (see `flops`, `bytes`).
    pub fn with_cost(mut self, flops: f64, bytes: f64) -> Self {
        self.flops = flops;
        self.bytes = bytes;
        self
    }

    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }
}

/// A binding: storage tensor or uniform buffer at a binding number.
#[derive(Clone, Copy)]
pub enum Bind<'a> {
    Tensor(u32, &'a Tensor),
    Uniform(u32, &'a wgpu::Buffer),
}

impl Gpu {
    fn module(&self, shader: &'static str, precision: Precision) -> Result<Module> {
        let mut modules = self.kernels.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&(shader, precision)) {
            return Ok(m.clone());
        }
        if precision == Precision::F16 {
            ensure!(self.features.contains(wgpu::Features::SHADER_F16), "{}", self.no_f16_message());
        }
        let coop = COOP_SHADERS.iter().find(|(name, _)| *name == shader);
        let lanes = LANE_SHADERS.iter().find(|(name, _)| *name == shader);
        if lanes.is_some() {
            ensure!(self.conv_lanes, "{shader}.wgsl needs subgroups of 8 to 64 lanes (Gpu::conv_lanes)");
        }
        let src = SHADERS
            .iter()
            .chain(coop)
            .chain(lanes)
            .find(|(name, _)| *name == shader)
            .map(|(_, s)| *s)
            .ok_or_else(|| anyhow::anyhow!("no shader named {shader:?}"))?;
        let mut source = shader_source(src, self.subgroups, precision);
        if coop.is_some() {
            let t = self.coop_tile.with_context(|| format!("{shader}.wgsl needs cooperative matrices"))?;
            ensure!(precision == Precision::F16, "{shader}.wgsl takes f16 operands only");
            source += &coop_prelude(t);
        }
        let widths = binding_widths(&source).map_err(|e| anyhow::anyhow!("compiling {shader}.wgsl: {e}"))?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(shader),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            anyhow::bail!("compiling {shader}.wgsl ({}): {e}", precision.name());
        }
        let module = Module { module, widths };
        modules.insert((shader, precision), module.clone());
        Ok(module)
    }

    /// Why an f16 plan cannot run here, for the error that refuses it.
    pub fn no_f16_message(&self) -> String {
        let why = self.paths.f16.as_ref().err().map_or("wgpu Features::SHADER_F16 was not requested", String::as_str);
        format!("the adapter \"{}\" runs no f16 shaders ({why}); use --precision f32", self.info.name)
    }

    /// The pipeline for `shader::entry` with these override constants, built on first use.
    pub fn pipeline(
        &self,
        shader: &'static str,
        precision: Precision,
        entry: &'static str,
        constants: &[(&str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        let key = format!("{shader}::{entry}:{}{constants:?}", precision.name());
        if let Some(p) = self.kernels.pipelines.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(p.clone());
        }
        let module = self.module(shader, precision)?.module;
        // Internal errors too: a backend that compiles the shader itself (GL's GLSL compiler and
        // linker) reports its failures as internal, and they would otherwise surface only later,
        // as an invalid bind group layout.
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: self.pipeline_cache.as_ref().map(|c| &c.cache),
        });
        let validation = pollster::block_on(scope.pop());
        if let Some(e) = validation.or(pollster::block_on(internal.pop())) {
            anyhow::bail!("building the pipeline {shader}::{entry}: {e}");
        }
        self.kernels.pipelines.lock().unwrap_or_else(|e| e.into_inner()).insert(key, pipeline.clone());
        if let Some(c) = &self.pipeline_cache {
            c.dirty.store(true, std::sync::atomic::Ordering::Release);
        }
        Ok(pipeline)
    }

    /// Every pipeline built so far, as `shader::entry:precision[constants]`, sorted: what this
    /// device has compiled (the tuner's candidates included), for tests.
    pub fn built_pipelines(&self) -> Vec<String> {
        let mut keys: Vec<String> =
            self.kernels.pipelines.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        keys.sort();
        keys
    }

    /// A uniform buffer holding `params`, padded to 16 bytes as WGSL's uniform layout wants.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, params: &T) -> wgpu::Buffer {
        let mut bytes = bytemuck::bytes_of(params).to_vec();
        bytes.resize(bytes.len().div_ceil(16) * 16, 0);
        // Parameter blocks live as long as the dispatches that bind them: counted, never freed.
        self.stats.alloc(bytes.len() as u64);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(&self.scoped(label)),
            contents: &bytes,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        })
    }

    /// Build one dispatch of an f32 kernel: pipeline (cached), bind group, workgroup counts.
    pub fn dispatch(
        &self,
        shader: &'static str,
        entry: &'static str,
        constants: &[(&str, f64)],
        binds: &[Bind<'_>],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        self.dispatch_in(Precision::F32, shader, entry, constants, binds, workgroups)
    }

    /// Build one dispatch of the `precision` variant of a kernel (its `act` type). Every bound
    /// tensor must hold elements of the width its binding declares.
    pub fn dispatch_in(
        &self,
        precision: Precision,
        shader: &'static str,
        entry: &'static str,
        constants: &[(&str, f64)],
        binds: &[Bind<'_>],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let max = self.limits.max_compute_workgroups_per_dimension;
        ensure!(
            workgroups.iter().all(|&w| w <= max),
            "{entry}: {workgroups:?} workgroups exceed the adapter's {max} per dimension"
        );
        let widths = self.module(shader, precision)?.widths;
        for b in binds {
            if let Bind::Tensor(i, t) = b
                && let Some((name, width)) = widths.get(i)
            {
                ensure!(
                    *width == t.dtype.bytes(),
                    "binding the buffers of {shader}::{entry} ({}): binding {i} ({name}) holds {width}-byte \
                     elements, but \"{}\" holds {}",
                    precision.name(),
                    t.label,
                    t.dtype.name()
                );
            }
        }
        let pipeline = self.pipeline(shader, precision, entry, constants)?;
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry<'_>> = binds
            .iter()
            .map(|b| match b {
                Bind::Tensor(i, t) => wgpu::BindGroupEntry { binding: *i, resource: t.binding() },
                Bind::Uniform(i, u) => wgpu::BindGroupEntry { binding: *i, resource: u.as_entire_binding() },
            })
            .collect();
        self.stats.bind_groups_created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.scoped(entry)),
            layout: &layout,
            entries: &entries,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            anyhow::bail!("binding the buffers of {shader}::{entry}: {e}");
        }
        Ok(Dispatch {
            label: entry,
            layer: String::new(),
            pass: Pass::None,
            pipeline,
            bind_group,
            workgroups,
            flops: 0.0,
            bytes: 0.0,
        })
    }

    /// Record `dispatches` into one compute pass of one command buffer and submit it.
    pub fn run(&self, dispatches: &[&Dispatch]) -> wgpu::SubmissionIndex {
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("run") });
        {
            let mut pass =
                encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("run"), timestamp_writes: None });
            for d in dispatches {
                d.record(&mut pass);
            }
        }
        self.queue.submit([encoder.finish()])
    }

    /// Run each group of dispatches in a compute pass of its own and return each pass's GPU time
    /// in seconds: timestamp queries where the adapter has them, else the wall clock around a
    /// submit-and-wait per group (which then includes the submit overhead).
    pub fn time_passes(&self, groups: &[Vec<&Dispatch>]) -> anyhow::Result<Vec<f64>> {
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            let mut out = Vec::new();
            for g in groups {
                let t = std::time::Instant::now();
                self.run(g);
                self.wait()?;
                out.push(t.elapsed().as_secs_f64());
            }
            return Ok(out);
        }
        let n = (2 * groups.len()) as u32;
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: n,
        });
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 8 * n as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps read-back"),
            size: 8 * n as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("timed") });
        for (i, g) in groups.iter().enumerate() {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("timed"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            for d in g {
                d.record(&mut pass);
            }
        }
        encoder.resolve_query_set(&set, 0..n, &resolve, 0);
        encoder.copy_buffer_to_buffer(&resolve, 0, &readback, 0, 8 * n as u64);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()??;
        let ticks: Vec<u64> = bytemuck::cast_slice(&readback.get_mapped_range(..)?).to_vec();
        let period = f64::from(self.queue.get_timestamp_period()) * 1e-9;
        Ok(ticks.chunks(2).map(|t| t[1].saturating_sub(t[0]) as f64 * period).collect())
    }

    /// Workgroup counts covering `n` invocations of a 1-D kernel with `wg` per workgroup. Past
    /// the per-dimension limit the grid wraps into y; kernels index `gid.x + gid.y * nwg.x * WG`.
    pub fn grid_1d(&self, n: usize, wg: u32) -> [u32; 3] {
        let groups = n.div_ceil(wg as usize).max(1);
        let max = self.limits.max_compute_workgroups_per_dimension as usize;
        if groups <= max {
            [groups as u32, 1, 1]
        } else {
            let y = groups.div_ceil(max);
            [groups.div_ceil(y) as u32, y as u32, 1]
        }
    }
}
