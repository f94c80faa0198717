//! Adapter selection and the device: headless, any backend, the adapter's real limits.
//!
//! Selection order: [`GpuOptions::backend`] restricts the backends searched; `adapter_name` picks
//! the first adapter whose name contains that text; otherwise the high-performance adapter,
//! preferring a real GPU over a CPU driver such as lavapipe. GL is probed only when no
//! Vulkan/Metal/DX12 adapter exists (or when it is the only backend asked for): its EGL probing is
//! the slowest, and GL's compute support the weakest (no f16, no subgroups).

use std::fmt;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::paths::{PathOptions, Paths, Switch};

/// No adapter could be found. `main` turns this into exit code 2.
#[derive(Debug)]
pub struct NoAdapterError {
    pub detail: String,
}

impl fmt::Display for NoAdapterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no Vulkan/Metal/DX12 adapter found{}; on Linux without a GPU install mesa-vulkan-drivers \
             (the lavapipe CPU Vulkan driver)",
            if self.detail.is_empty() { String::new() } else { format!(" ({})", self.detail) }
        )
    }
}

impl std::error::Error for NoAdapterError {}

/// How to pick the adapter and which kernel paths to allow. The CLI fills it from its flags
/// (with their documented environment fallbacks); the library reads no environment variable.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Backends to search ("vulkan", "metal", "dx12", "gl", or a comma list). `None`: all, with GL
    /// probed only when no other backend has an adapter.
    pub backend: Option<String>,
    /// Substring of the adapter name. `None`: the best adapter (see [`Gpu::new`]).
    pub adapter_name: Option<String>,
    /// With no name: the k-th (modulo their count) of the adapters of the best kind found, so MPI
    /// ranks on one machine spread over its GPUs. `None`: the best adapter.
    pub adapter_index: Option<usize>,
    /// How much the kernel tuner may time. `None`: quick.
    pub tune: Option<super::tune::TuneMode>,
    /// The tuning cache file. `None`: choices are kept in memory only (the CLI passes the
    /// platform's cache file, `~/.cache/senet-wgpu/tune-v1.json` on Linux, unless told otherwise).
    pub tune_cache: Option<std::path::PathBuf>,
    /// Reductions on subgroups or workgroup-memory trees. `None`: auto.
    pub subgroups: Option<Subgroups>,
    /// f16 shaders (`--precision f16`): `Off` behaves as an adapter without them.
    pub f16: Switch,
    /// Cooperative-matrix GEMMs in f16 plans: `Auto` only on drivers whose matrices are real
    /// ([`super::paths::coop_allowed_driver`]), `On` wherever the adapter lists them.
    pub coop: Switch,
    /// The convolutions' register blocks pinned for every layer (`ops::conv2d::RegisterTiles` as
    /// [gemm_m, gemm_n, wgrad_ci, wgrad_n]; the tuner is bypassed), for measuring one shape.
    /// `None`: per adapter and layer, through the tuner.
    pub conv_tiles: Option<[usize; 4]>,
    /// Print every tuning candidate's time.
    pub tune_verbose: bool,
    /// The driver's compiled pipelines in a `wgpu::PipelineCache`: auto = where the adapter has
    /// one (Vulkan), off = never, on = an error where it has none.
    pub pipeline_cache: Switch,
    /// The folder of the pipeline cache file (named by `wgpu::util::pipeline_cache_key`). `None`:
    /// the cache lives for this process only (the CLI passes the tuning cache's folder).
    pub pipeline_cache_dir: Option<std::path::PathBuf>,
    /// Fused epilogues in step plans (`--fuse`): on, every epilogue an op offers (a residual
    /// addition with the ReLU after it, an SE gate with the addition and ReLU after it, a batch
    /// norm's ReLU and max pool, and the rest of `model::plan`'s fusion pass); off, only the batch
    /// norm's ReLU. Plans differ in dispatches, never in checkpoints.
    pub fuse: Fuse,
    /// The register GEMM's column weights loaded once per subgroup and broadcast
    /// (`conv2d_lanes.wgsl`): auto = on CPU adapters with subgroups of 8 to 64 lanes, off =
    /// never, on = wherever the subgroups allow (an error elsewhere).
    pub conv_lanes: Switch,
    /// 1x1 convolutions with stride 1, no padding and H*W a multiple of 4 run the register GEMM
    /// without its window arithmetic, loading four pixels at a time (`--conv-1x1`); off: through
    /// the general kernel like every other layer. The same values either way.
    pub conv_1x1: ConvForm,
    /// Convolutions 3 wide with padding 1, stride 1 and W a multiple of 4 run the register GEMM's
    /// forward and input gradient a kernel row at a time, loading four pixels and their two
    /// neighbours per row of taps, and such convolutions of any width their weight gradient a
    /// kernel row at a time, each input value loaded once for the row's three taps
    /// (`--conv-3x3`); off: through the general kernels. The forward and input gradient sum the
    /// same products in another order; the weight gradient's values are the same bit for bit.
    pub conv_3x3: ConvForm,
    /// With `--fuse on`, training plans let a register-family convolution whose output a batch
    /// norm alone reads write that batch norm's statistics as it stores the output, per block of
    /// output pixels, and the batch norm merge the blocks instead of reading its input for them
    /// (`--bn-stats`); off: the batch norm reads its input for them. The same statistics summed
    /// in another order.
    pub bn_stats: ConvForm,
    /// With `--fuse on`, in training: on (the default), a batch norm and its ReLU whose output a
    /// convolution on the workgroup tiles alone reads are applied by that convolution as its
    /// forward and weight gradient load their input, and the batch norm writes no output
    /// (`--bn-apply`); off: the batch norm writes its output and the convolution reads it. The
    /// same values (bit for bit where the driver rounds the multiply-add alike in both kernels).
    pub bn_apply: ConvForm,
    /// With `--fuse on`, a convolution's input and weight gradients in one dispatch where one
    /// kernel runs both (`conv2d_backward`, `--joint-backward`): auto and on = on every adapter
    /// (on lavapipe the joint kernel takes 1.00-1.07x the two dispatches' time per layer,
    /// benches/conv_backward.rs, and a base SENet step about 2 % longer: kept so that the plan
    /// lavapipe tests is a GPU's), off = never. The same values bit for bit either way.
    pub joint_backward: Switch,
    /// A mean-squeeze SE block as a reduction spread over channels, a pass per sample for its
    /// FCs and an elementwise pass, each way (`--se-split`), instead of one workgroup per sample:
    /// auto = on GPU adapters (a batch of 64 is too few workgroups for one), on = on any adapter,
    /// off = never. The same values either way (each from the same shader helper in the same order).
    pub se_split: Switch,
    /// A training batch norm's passes spread over slices of each channel, a workgroup per channel
    /// and slice, in two dispatches each way (`--bn-split`), instead of one workgroup per
    /// channel: on = on any adapter; auto and off = never, auto until the sliced kernels are
    /// measured on a GPU. The same sums in another order (ops::batch_norm::slices_for says where
    /// it applies).
    pub bn_split: Switch,
}

/// Whether the register GEMM takes its 1x1 form (`--conv-1x1 on|off`), or its 3-wide form
/// (`--conv-3x3 on|off`), where a layer allows it; whether a batch norm's statistics come from the
/// convolution before it (`--bn-stats on|off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvForm {
    #[default]
    On,
    Off,
}

/// Whether plans fuse the epilogues ops offer (`--fuse on|off`; see `model::plan`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Fuse {
    /// Every epilogue an op offers.
    #[default]
    On,
    /// Only the batch norm's ReLU (the plans of the builds before fused epilogues).
    Off,
}

impl GpuOptions {
    /// What these options ask of the kernel paths.
    pub fn paths(&self) -> PathOptions {
        PathOptions {
            f16: self.f16,
            subgroups: self.subgroups.unwrap_or_default(),
            coop: self.coop,
            pipeline_cache: self.pipeline_cache,
            conv_lanes: self.conv_lanes,
        }
    }
}

/// Whether reductions use subgroup operations (the same auto / on / off as every path).
pub type Subgroups = Switch;

/// One adapter as `senet devices` shows it: what it is, its limits, and the kernel paths it
/// would run under the options given (or the error a forced path meets there).
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub paths: std::result::Result<Paths, String>,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.info;
        let l = &self.limits;
        writeln!(f, "{} ({:?}, {:?})", i.name, i.backend, i.device_type)?;
        writeln!(f, "  driver: {} {}", i.driver, i.driver_info)?;
        writeln!(
            f,
            "  largest buffer: {} MiB  storage binding: {} MiB  storage buffers/stage: {}",
            l.max_buffer_size >> 20,
            l.max_storage_buffer_binding_size >> 20,
            l.max_storage_buffers_per_shader_stage,
        )?;
        writeln!(
            f,
            "  largest workgroup: {} invocations, size {}x{}x{}, {} KiB shared; {} workgroups/dim",
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroup_size_x,
            l.max_compute_workgroup_size_y,
            l.max_compute_workgroup_size_z,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_workgroups_per_dimension
        )?;
        match &self.paths {
            Ok(p) => write!(f, "{}", p.table().trim_end()),
            Err(e) => write!(f, "  error: {e}"),
        }
    }
}

/// Our own accounting of GPU objects: every buffer and bind group we create, and the bytes of
/// the tensors alive now and at most.
#[derive(Debug, Default)]
pub struct GpuStats {
    pub buffers_created: std::sync::atomic::AtomicU64,
    pub bind_groups_created: std::sync::atomic::AtomicU64,
    pub bytes_live: std::sync::atomic::AtomicU64,
    pub bytes_peak: std::sync::atomic::AtomicU64,
}

impl GpuStats {
    pub(crate) fn alloc(&self, bytes: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.buffers_created.fetch_add(1, Relaxed);
        let live = self.bytes_live.fetch_add(bytes, Relaxed) + bytes;
        self.bytes_peak.fetch_max(live, Relaxed);
    }

    pub(crate) fn free(&self, bytes: u64) {
        self.bytes_live.fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// (buffers created, bind groups created, live bytes, peak bytes).
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.buffers_created.load(Relaxed),
            self.bind_groups_created.load(Relaxed),
            self.bytes_live.load(Relaxed),
            self.bytes_peak.load(Relaxed),
        )
    }
}

/// The device every kernel runs on.
pub struct Gpu {
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// The limits the device was created with: the adapter's own, not wgpu's defaults.
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub stats: Arc<GpuStats>,
    /// Errors the device reported outside any call's result (validation, out of memory, device
    /// lost). [`Gpu::wait`] and [`Gpu::check`] turn the first into an error: never a panic.
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    pub(crate) kernels: super::kernels::KernelRegistry,
    /// Reductions use subgroup operations (shaders/reduce_subgroup.wgsl), else workgroup trees.
    pub subgroups: bool,
    /// The square f16 x f16 -> f32 cooperative-matrix tile (8 or 16) an f16 plan's GEMMs use, where
    /// the adapter lists one (wgpu's experimental cooperative matrices: tensor cores on NVIDIA).
    pub coop_tile: Option<u32>,
    /// [`GpuOptions::fuse`]: plans built on this device fuse every epilogue an op offers.
    pub fuse: bool,
    /// [`GpuOptions::conv_lanes`] resolved: the register GEMMs come from `conv2d_lanes.wgsl`.
    pub conv_lanes: bool,
    /// [`GpuOptions::conv_1x1`]: eligible 1x1 layers run the register GEMM's 1x1 form.
    pub conv_1x1: bool,
    /// [`GpuOptions::conv_3x3`]: eligible 3-wide layers run the register GEMM's 3-wide form and
    /// the weight gradient's 3-wide walk.
    pub conv_3x3: bool,
    /// [`GpuOptions::bn_stats`] (with `fuse`): a batch norm's statistics from the convolution
    /// before it.
    pub bn_stats: bool,
    /// [`GpuOptions::bn_apply`] (with `fuse`): a batch norm and its ReLU applied by the
    /// workgroup-tile convolution after it.
    pub bn_apply: bool,
    /// [`GpuOptions::joint_backward`] resolved for this adapter (with `fuse`).
    pub joint_backward: bool,
    /// [`GpuOptions::se_split`] resolved for this adapter.
    pub se_split: bool,
    /// [`GpuOptions::bn_split`] resolved for this adapter.
    pub bn_split: bool,
    /// Read-back staging buffers by size, kept for the next read of that size so that reading
    /// metrics every step or predictions every batch allocates nothing after the first time.
    /// A buffer is taken out while in use, so concurrent reads never share one.
    staging: std::sync::Mutex<std::collections::HashMap<u64, Vec<wgpu::Buffer>>>,
    /// The layer whose dispatches are being built: bind groups and parameter blocks are labelled
    /// "<layer> <entry point>" while it is set (see `label_scope`).
    scope: std::sync::Mutex<String>,
    /// Which kernel runs each conv shape: timed once per adapter and remembered on disk.
    pub tuner: super::tune::Tuner,
    /// [`GpuOptions::conv_tiles`].
    pub conv_tiles: Option<[usize; 4]>,
    /// Which kernel paths run here and why the others do not (`senet devices`).
    pub paths: Paths,
    /// The pipeline cache every compute pipeline is built with, where `paths.pipeline_cache` is on.
    pub(crate) pipeline_cache: Option<super::pipeline_cache::PipelineCacheStore>,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpu({} / {:?})", self.info.name, self.info.backend)
    }
}

fn backends_for(opts: &GpuOptions) -> Result<wgpu::Backends> {
    let spec = opts.backend.clone().filter(|s| !s.trim().is_empty());
    match spec {
        None => Ok(wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12 | wgpu::Backends::GL),
        Some(s) => {
            let b = wgpu::Backends::from_comma_list(&s);
            anyhow::ensure!(
                !b.is_empty(),
                "backend {s:?} is not one of vulkan, metal, dx12, gl (a comma list is allowed)"
            );
            Ok(b)
        }
    }
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    // wgpu's own debugging variables (WGPU_DEBUG, WGPU_VALIDATION) stay wgpu's to read.
    desc.flags = wgpu::InstanceFlags::from_build_config().with_env();
    wgpu::Instance::new(desc)
}

/// The adapters of `backends`: Vulkan, Metal and DX12 from one instance; GL from an instance of its
/// own, created only when those found none (or GL is all that was asked for), so a machine with
/// Vulkan never probes EGL.
fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let native = backends - wgpu::Backends::GL;
    let mut adapters = Vec::new();
    if !native.is_empty() {
        adapters = pollster::block_on(instance(native).enumerate_adapters(native));
    }
    if adapters.is_empty() && backends.contains(wgpu::Backends::GL) {
        adapters = pollster::block_on(instance(wgpu::Backends::GL).enumerate_adapters(wgpu::Backends::GL));
    }
    adapters
}

/// Every adapter wgpu can see on the requested backends (GL only as [`enumerate`] probes it), with
/// the paths each would run under `opts`.
pub fn list_adapters(opts: &GpuOptions) -> Result<Vec<AdapterSummary>> {
    Ok(enumerate(backends_for(opts)?)
        .into_iter()
        .map(|a| {
            let (info, features) = (a.get_info(), a.features());
            let paths = Paths::resolve(&info, features, &a.cooperative_matrix_properties(), &opts.paths())
                .map_err(|e| format!("{e:#}"));
            AdapterSummary { info, limits: a.limits(), features, paths }
        })
        .collect())
}

/// Rank adapters: discrete > integrated > virtual > other > CPU; non-GL backends before GL.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let gl = u8::from(info.backend == wgpu::Backend::Gl);
    (gl, ty)
}

impl Gpu {
    /// Pick an adapter and create the device with the adapter's own limits.
    pub fn new(opts: &GpuOptions) -> Result<Arc<Gpu>> {
        let backends = backends_for(opts)?;
        let mut adapters = enumerate(backends);
        if adapters.is_empty() {
            return Err(NoAdapterError { detail: format!("searched {backends:?}") }.into());
        }
        let wanted = opts.adapter_name.clone().filter(|s| !s.trim().is_empty());
        let adapter = if let Some(name) = wanted {
            let needle = name.to_lowercase();
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            let pos =
                adapters.iter().position(|a| a.get_info().name.to_lowercase().contains(&needle)).ok_or_else(|| {
                    NoAdapterError { detail: format!("no adapter name contains {name:?}; found {names:?}") }
                })?;
            adapters.swap_remove(pos)
        } else {
            adapters.sort_by_key(|a| rank(&a.get_info()));
            let best = rank(&adapters[0].get_info());
            let alike = adapters.iter().take_while(|a| rank(&a.get_info()) == best).count();
            adapters.swap_remove(opts.adapter_index.map_or(0, |k| k % alike))
        };
        Self::from_adapter(adapter, opts)
    }

    fn from_adapter(adapter: wgpu::Adapter, opts: &GpuOptions) -> Result<Arc<Gpu>> {
        let info = adapter.get_info();
        let tune_mode = opts.tune.unwrap_or_default();
        let device_key = format!(
            "{} | {:?} | {} {} | senet-wgpu {}",
            info.name,
            info.backend,
            info.driver,
            info.driver_info,
            env!("CARGO_PKG_VERSION")
        );
        let limits = adapter.limits();
        let paths = Paths::resolve(&info, adapter.features(), &adapter.cooperative_matrix_properties(), &opts.paths())?;
        let subgroups = paths.subgroups.is_ok();
        let coop_tile = paths.coop.as_ref().ok().copied();
        let conv_lanes = paths.conv_lanes.is_ok();
        // Optional features we can use; request only what the adapter has.
        let features = paths.features(adapter.features());
        // SAFETY: wgpu's experimental features are opted into only for cooperative matrices, and
        // only with a tile shape the adapter itself lists (wgpu does not check shaders against it).
        let experimental = if coop_tile.is_some() {
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("senet"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: experimental,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .with_context(|| format!("requesting a device from adapter {:?}", info.name))?;
        let pipeline_cache = paths.pipeline_cache.is_ok().then(|| {
            let file = opts.pipeline_cache_dir.as_deref().and_then(|d| super::pipeline_cache::cache_file(d, &info));
            super::pipeline_cache::PipelineCacheStore::open(&device, &info, file)
        });
        let errors: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let what = match &e {
                wgpu::Error::OutOfMemory { .. } => "the GPU ran out of memory".to_string(),
                other => format!("GPU error: {other}"),
            };
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(what);
        }));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, message| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("the GPU device was lost ({reason:?}): {message}"));
            }
        });
        Ok(Arc::new(Gpu {
            errors,
            kernels: super::kernels::KernelRegistry::default(),
            subgroups,
            coop_tile,
            fuse: opts.fuse == Fuse::On,
            conv_lanes,
            conv_1x1: opts.conv_1x1 == ConvForm::On,
            conv_3x3: opts.conv_3x3 == ConvForm::On,
            bn_stats: opts.bn_stats == ConvForm::On,
            bn_apply: opts.bn_apply == ConvForm::On,
            joint_backward: opts.joint_backward != Switch::Off,
            se_split: match opts.se_split {
                Switch::Auto => info.device_type != wgpu::DeviceType::Cpu,
                Switch::On => true,
                Switch::Off => false,
            },
            // Auto is off on every adapter until the sliced kernels are measured on a GPU
            // (scripts/gpu-bench.sh times `--bn-split on`).
            bn_split: opts.bn_split == Switch::On,
            staging: Default::default(),
            scope: Default::default(),
            tuner: super::tune::Tuner::new(tune_mode, opts.tune_cache.clone(), device_key)
                .with_verbose(opts.tune_verbose),
            conv_tiles: opts.conv_tiles,
            paths,
            pipeline_cache,
            stats: Arc::default(),
            adapter,
            device,
            queue,
            info,
            limits,
            features,
        }))
    }

    /// Label what is built until the guard drops with `layer`'s name (GPU captures and validation
    /// messages then say "features.4 conv2d_gemm", not just the entry point).
    pub fn label_scope(&self, layer: &str) -> LabelScope<'_> {
        *self.scope.lock().unwrap_or_else(|p| p.into_inner()) = layer.to_string();
        LabelScope { gpu: self }
    }

    /// `what`, prefixed with the layer being built, if any.
    pub(crate) fn scoped(&self, what: &str) -> String {
        let scope = self.scope.lock().unwrap_or_else(|p| p.into_inner());
        if scope.is_empty() { what.to_string() } else { format!("{scope} {what}") }
    }

    /// A MAP_READ staging buffer of `size` bytes: a kept one, else a new one (counted in `stats`).
    pub(crate) fn take_staging(&self, size: u64) -> wgpu::Buffer {
        let kept = self.staging.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&size).and_then(Vec::pop);
        kept.unwrap_or_else(|| {
            self.stats.alloc(size);
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("read-back"),
                size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
    }

    /// Keep an unmapped staging buffer for the next read of its size, if it is small (metrics,
    /// predictions); a large one (a checkpoint's parameters) is freed.
    pub(crate) fn return_staging(&self, buffer: wgpu::Buffer) {
        const KEEP_AT_MOST: u64 = 4 << 20;
        let size = buffer.size();
        if size > KEEP_AT_MOST {
            self.stats.free(size);
            return;
        }
        self.staging.lock().unwrap_or_else(|p| p.into_inner()).entry(size).or_default().push(buffer);
    }

    /// How the pipeline cache file was found when this device was created; `None` where the
    /// cache is off (see `paths.pipeline_cache`).
    pub fn pipeline_cache_load(&self) -> Option<super::pipeline_cache::PipelineCacheLoad> {
        self.pipeline_cache.as_ref().map(|c| c.load.clone())
    }

    /// The pipeline cache file, where the cache is on and kept on disk.
    pub fn pipeline_cache_path(&self) -> Option<&std::path::Path> {
        self.pipeline_cache.as_ref().and_then(|c| c.path.as_deref())
    }

    /// Write the pipeline cache file if pipelines were built since it was read or last written:
    /// `Ok(true)` when it was written. A failure is for the caller to report as a warning (see
    /// [`Gpu::save_pipeline_cache_or_warn`]); the cache still works for this process.
    pub fn save_pipeline_cache(&self) -> Result<bool> {
        match &self.pipeline_cache {
            Some(c) => c.save(),
            None => Ok(false),
        }
    }

    /// [`Gpu::save_pipeline_cache`], a failure printed as one warning.
    pub fn save_pipeline_cache_or_warn(&self) {
        if let Err(e) = self.save_pipeline_cache() {
            let path = self.pipeline_cache_path().map_or(String::new(), |p| format!(" {}", p.display()));
            eprintln!("warning: could not write the pipeline cache{path}: {e:#}");
        }
    }

    /// True when the adapter is a CPU implementation (lavapipe, WARP, SwiftShader).
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The most loop iterations one invocation of a shader runs on this driver, all its loops
    /// together, where the driver has such a cap: Mesa's llvmpipe (lavapipe on Vulkan, llvmpipe on
    /// GL) ends every loop of an invocation once 65,535 iterations have run between them
    /// (gallivm's `LP_MAX_TGSI_LOOP_ITERATIONS`), silently, so a longer loop returns a partial
    /// sum. Kernels whose loops grow with the batch split them below it (the convolution weight
    /// gradient's K: `ops::conv2d::min_weight_grad_splits`). Measured on Mesa 22.3's lavapipe;
    /// Mesa 26's summed the same loops in full, but the cap is kept for every llvmpipe (it costs
    /// a few more splits). `None` elsewhere.
    pub fn loop_cap(&self) -> Option<usize> {
        self.info.name.contains("llvmpipe").then_some(65_535)
    }

    /// One line: name, backend, type, and how reductions run.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {}; reductions: {}{})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.reductions(),
            self.coop_tile.map_or(String::new(), |t| format!("; cooperative matrices f16 {t}x{t}x{t}"))
        )
    }

    /// How reductions run: "subgroups (size 8)", or "workgroup trees".
    pub fn reductions(&self) -> String {
        if self.subgroups {
            let (lo, hi) = (self.info.subgroup_min_size, self.info.subgroup_max_size);
            if lo == hi { format!("subgroups (size {lo})") } else { format!("subgroups (size {lo}-{hi})") }
        } else {
            "workgroup trees".to_string()
        }
    }

    /// Block until all submitted work is done. Only for tests, read-backs and the end of a run.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| crate::exit::runtime(format!("waiting for the GPU: {e}")))?;
        self.check()
    }

    /// The first error the device reported since it was created, if any.
    pub fn check(&self) -> Result<()> {
        match self.errors.lock().unwrap_or_else(|p| p.into_inner()).first() {
            Some(e) => Err(crate::exit::runtime(e.clone())),
            None => Ok(()),
        }
    }
}

/// Clears the label scope when dropped.
pub struct LabelScope<'a> {
    gpu: &'a Gpu,
}

impl Drop for LabelScope<'_> {
    fn drop(&mut self) {
        self.gpu.scope.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}
