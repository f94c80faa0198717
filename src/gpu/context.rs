//! Adapter selection and the device: headless, any backend, the adapter's real limits.
//!
//! Selection order: `--backend` (or `WGPU_BACKEND`) restricts the backends searched;
//! `WGPU_ADAPTER_NAME` picks the first adapter whose name contains that text; otherwise the
//! high-performance adapter, preferring a real GPU over a CPU driver such as lavapipe, and
//! Vulkan/Metal/DX12 over GL (GL is searched last, as a last resort).

use std::fmt;
use std::sync::Arc;

use anyhow::{Context, Result};

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

/// How to pick the adapter.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Backends to search, as `WGPU_BACKEND` spells them ("vulkan", "metal", "dx12", "gl", or a
    /// comma list). `None` honours `WGPU_BACKEND`, else searches all.
    pub backend: Option<String>,
    /// Substring of the adapter name. `None` honours `WGPU_ADAPTER_NAME`.
    pub adapter_name: Option<String>,
    /// With no name: the k-th (modulo their count) of the adapters of the best kind found, so MPI
    /// ranks on one machine spread over its GPUs. `None`: the best adapter.
    pub adapter_index: Option<usize>,
    /// How much the kernel tuner may time. `None` honours `SENET_TUNE`, else quick.
    pub tune: Option<super::tune::TuneMode>,
    /// The tuning cache file. `None` honours `SENET_TUNE_CACHE`, else the platform's cache
    /// directory (`~/.cache/senet-wgpu/tune-v1.json` on Linux).
    pub tune_cache: Option<std::path::PathBuf>,
    /// Reductions on subgroups or workgroup-memory trees. `None` honours `SENET_SUBGROUPS`,
    /// else auto.
    pub subgroups: Option<Subgroups>,
}

/// Whether reductions use subgroup operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Subgroups {
    /// Where the adapter has them.
    #[default]
    Auto,
    /// Always: an error on an adapter without subgroups.
    On,
    /// Never: workgroup-memory trees.
    Off,
}

impl Subgroups {
    /// `SENET_SUBGROUPS`: on, off or auto (unset or empty: auto).
    fn from_env() -> Result<Subgroups> {
        match std::env::var("SENET_SUBGROUPS").unwrap_or_default().trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Subgroups::Auto),
            "on" => Ok(Subgroups::On),
            "off" => Ok(Subgroups::Off),
            other => anyhow::bail!("SENET_SUBGROUPS={other:?}: expected on, off or auto"),
        }
    }
}

/// One adapter as `senet devices` shows it.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
}

impl fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.info;
        let l = &self.limits;
        writeln!(f, "{} ({:?}, {:?})", i.name, i.backend, i.device_type)?;
        writeln!(f, "  driver: {} {}", i.driver, i.driver_info)?;
        writeln!(
            f,
            "  storage buffers/stage: {}  max storage binding: {} MiB  max buffer: {} MiB",
            l.max_storage_buffers_per_shader_stage,
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20
        )?;
        writeln!(
            f,
            "  workgroup: {} invocations, size {}x{}x{}, {} KiB shared; {} workgroups/dim",
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroup_size_x,
            l.max_compute_workgroup_size_y,
            l.max_compute_workgroup_size_z,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_workgroups_per_dimension
        )?;
        write!(
            f,
            "  timestamps: {}  timestamps inside passes: {}  shader-f16: {}  subgroups: {}",
            self.features.contains(wgpu::Features::TIMESTAMP_QUERY),
            self.features.contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES),
            self.features.contains(wgpu::Features::SHADER_F16),
            self.features.contains(wgpu::Features::SUBGROUP),
        )
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
    /// Read-back staging buffers by size, kept for the next read of that size so that reading
    /// metrics every step or predictions every batch allocates nothing after the first time.
    /// A buffer is taken out while in use, so concurrent reads never share one.
    staging: std::sync::Mutex<std::collections::HashMap<u64, Vec<wgpu::Buffer>>>,
    /// The layer whose dispatches are being built: bind groups and parameter blocks are labelled
    /// "<layer> <entry point>" while it is set (see `label_scope`).
    scope: std::sync::Mutex<String>,
    /// Which kernel runs each conv shape: timed once per adapter and remembered on disk.
    pub tuner: super::tune::Tuner,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpu({} / {:?})", self.info.name, self.info.backend)
    }
}

fn backends_for(opts: &GpuOptions) -> Result<wgpu::Backends> {
    let spec = opts.backend.clone().or_else(|| std::env::var("WGPU_BACKEND").ok()).filter(|s| !s.trim().is_empty());
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
    desc.flags = wgpu::InstanceFlags::from_build_config().with_env();
    wgpu::Instance::new(desc)
}

/// Every adapter wgpu can see on the requested backends.
pub fn list_adapters(opts: &GpuOptions) -> Result<Vec<AdapterSummary>> {
    let inst = instance(backends_for(opts)?);
    let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
    Ok(adapters
        .into_iter()
        .map(|a| AdapterSummary { info: a.get_info(), limits: a.limits(), features: a.features() })
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
        // GL only as a last resort, from an instance of its own: probing EGL is noisy and GL's
        // compute support is the weakest.
        let mut adapters = Vec::new();
        if !(backends - wgpu::Backends::GL).is_empty() {
            let inst = instance(backends - wgpu::Backends::GL);
            adapters = pollster::block_on(inst.enumerate_adapters(backends - wgpu::Backends::GL));
        }
        if adapters.is_empty() && backends.contains(wgpu::Backends::GL) {
            let inst = instance(wgpu::Backends::GL);
            adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::GL));
        }
        if adapters.is_empty() {
            return Err(NoAdapterError { detail: format!("searched {backends:?}") }.into());
        }
        let wanted = opts
            .adapter_name
            .clone()
            .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
            .filter(|s| !s.trim().is_empty());
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
        let tune_mode = opts.tune.unwrap_or_else(super::tune::TuneMode::from_env);
        let tune_cache = opts
            .tune_cache
            .clone()
            .or_else(|| std::env::var_os("SENET_TUNE_CACHE").filter(|v| !v.is_empty()).map(Into::into))
            .or_else(super::tune::default_cache_path);
        let device_key = format!(
            "{} | {:?} | {} {} | senet-wgpu {}",
            info.name,
            info.backend,
            info.driver,
            info.driver_info,
            env!("CARGO_PKG_VERSION")
        );
        let limits = adapter.limits();
        let has_subgroups = adapter.features().contains(wgpu::Features::SUBGROUP);
        let subgroups = match opts.subgroups.map_or_else(Subgroups::from_env, Ok)? {
            Subgroups::On => {
                anyhow::ensure!(
                    has_subgroups,
                    "subgroups were asked for (--subgroups on / SENET_SUBGROUPS=on) but adapter {:?} has \
                     none; use off or auto",
                    info.name
                );
                true
            }
            Subgroups::Off => false,
            Subgroups::Auto => has_subgroups,
        };
        // Optional features we can use; request only what the adapter has.
        let mut wanted = wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        // SENET_NO_F16=1: behave as an adapter without f16 shaders (how the refusal is tested).
        if std::env::var_os("SENET_NO_F16").is_none_or(|v| v.is_empty() || v == "0") {
            wanted |= wgpu::Features::SHADER_F16;
        }
        if subgroups {
            wanted |= wgpu::Features::SUBGROUP;
        }
        // Cooperative matrices: the largest square f16 -> f32 tile naga can write (8x8 or 16x16)
        // among those the adapter lists; SENET_COOP=off keeps them out.
        let coop_off = std::env::var("SENET_COOP").is_ok_and(|v| v == "off" || v == "0");
        let props = adapter.cooperative_matrix_properties();
        let coop_tile = [16u32, 8].into_iter().find(|&t| {
            props.iter().any(|p| {
                (p.m_size, p.n_size, p.k_size) == (t, t, t)
                    && p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
            })
        });
        // Only with f16 requested (SENET_NO_F16 unset) and the experimental feature offered.
        let coop_features = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX | wgpu::Features::SHADER_F16;
        let coop_tile = coop_tile.filter(|_| {
            !coop_off && wanted.contains(wgpu::Features::SHADER_F16) && adapter.features().contains(coop_features)
        });
        if coop_tile.is_some() {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let features = adapter.features() & wanted;
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
            staging: Default::default(),
            scope: Default::default(),
            tuner: super::tune::Tuner::new(tune_mode, tune_cache, device_key),
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

    /// True when the adapter is a CPU implementation (lavapipe, WARP, SwiftShader).
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
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
