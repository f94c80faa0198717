//! Every shader variant through every naga back end wgpu uses, configured as wgpu 30 configures it,
//! without any GPU: SPIR-V (Vulkan), MSL (Metal), HLSL (DX12, the FXC and DXC shader models) and
//! GLSL (GL). A kernel that validates may still not translate — each back end has its own limits —
//! and nobody would know until a Mac or Windows user ran it.
//!
//! The variants are assembled exactly as the pipeline registry assembles them
//! (`gpu::shader_source`: the file, the reduction prelude, `alias act`; `gpu::coop_prelude` for the
//! cooperative-matrix kernels), validated with the capabilities the wgpu features behind the variant
//! give, then each entry point has its override constants resolved as wgpu's backends do
//! (`naga::back::pipeline_constants::process_overrides`, with the constant sets the ops pass) and
//! is written by the back end with wgpu's options (language version, bounds checks, bindings).
//!
//! The matrix is executable: a target that offers every feature a variant needs must translate it;
//! where a target does not offer one, the test names the pair and why, and checks that the plan
//! cannot select it there ([`senet_wgpu::gpu::paths::backend_carries`] for whole backends, through
//! `Paths::resolve` with every feature claimed; the wgpu gate for a version within a backend).
//! The conformance table in docs/backends.md is generated from this matrix
//! (`SENET_BLESS=1 cargo test --test backends` rewrites it).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};
use senet_wgpu::gpu::paths::{COOP_TILES, PathOptions, Switch, backend_carries};
use senet_wgpu::gpu::{COOP_SHADERS, LANE_SHADERS, Need, Paths, Precision, SHADERS, coop_prelude, shader_source};
use senet_wgpu::ops::conv2d::{RegisterTiles, WorkgroupTiles};

/// A back end as one wgpu backend configures it on one class of device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Lang {
    /// SPIR-V (major, minor): wgpu writes the newest the device's Vulkan version takes.
    Spv(u8, u8),
    /// MSL (major, minor): wgpu writes the newest the OS has.
    Msl(u8, u8),
    /// HLSL shader model (major, minor): 5.1 through FXC when no DXC is installed, 6.x through DXC.
    Hlsl(u8, u8),
    /// GLSL ES (version x100).
    GlslEs(u16),
    /// Desktop GLSL (version x100): wgpu's GL backend on a desktop context (Mesa through EGL).
    Glsl(u16),
}

/// One translation target: the language and what wgpu's backend can offer on devices that get it.
struct Target {
    lang: Lang,
    backend: wgpu::Backend,
    /// Who gets this target.
    devices: &'static str,
    /// Features wgpu never offers on this target although the backend carries them elsewhere,
    /// with wgpu's gate (a version inside one backend).
    gated: &'static [(Need, &'static str)],
}

const TARGETS: &[Target] = &[
    Target { lang: Lang::Spv(1, 3), backend: wgpu::Backend::Vulkan, devices: "Vulkan 1.1 and 1.2 devices", gated: &[] },
    Target {
        lang: Lang::Spv(1, 6),
        backend: wgpu::Backend::Vulkan,
        devices: "Vulkan 1.3+ devices (lavapipe, NVIDIA, RADV, Intel)",
        gated: &[],
    },
    Target {
        lang: Lang::Msl(2, 4),
        backend: wgpu::Backend::Metal,
        devices: "macOS 12 / iOS 15, the oldest wgpu 30 targets here",
        gated: &[],
    },
    Target { lang: Lang::Msl(4, 0), backend: wgpu::Backend::Metal, devices: "macOS 26 / iOS 26", gated: &[] },
    Target {
        lang: Lang::Hlsl(5, 1),
        backend: wgpu::Backend::Dx12,
        devices: "DX12 through FXC (no dxcompiler.dll found)",
        gated: &[
            (Need::F16, "wgpu offers SHADER_F16 on DX12 from shader model 6.2"),
            (Need::Subgroups, "wgpu offers SUBGROUP on DX12 from shader model 6.0 (wave intrinsics)"),
        ],
    },
    Target {
        lang: Lang::Hlsl(6, 0),
        backend: wgpu::Backend::Dx12,
        devices: "DX12 through DXC, shader model 6.0-6.1 devices",
        gated: &[(Need::F16, "wgpu offers SHADER_F16 on DX12 from shader model 6.2")],
    },
    Target {
        lang: Lang::Hlsl(6, 2),
        backend: wgpu::Backend::Dx12,
        devices: "DX12 through DXC, shader model 6.2+ devices",
        gated: &[],
    },
    Target {
        lang: Lang::GlslEs(310),
        backend: wgpu::Backend::Gl,
        devices: "GLES 3.1 contexts (Android, ANGLE)",
        gated: &[],
    },
    Target {
        lang: Lang::Glsl(450),
        backend: wgpu::Backend::Gl,
        devices: "desktop GL 4.5 contexts (Mesa llvmpipe through EGL)",
        gated: &[],
    },
];

impl Lang {
    fn name(self) -> String {
        match self {
            Lang::Spv(a, b) => format!("SPIR-V {a}.{b}"),
            Lang::Msl(a, b) => format!("MSL {a}.{b}"),
            Lang::Hlsl(a, b) => format!("HLSL SM {a}.{b}"),
            Lang::GlslEs(v) => format!("GLSL ES {}.{}", v / 100, v % 100 / 10),
            Lang::Glsl(v) => format!("GLSL {}.{}", v / 100, v % 100 / 10),
        }
    }
}

/// Why `target` cannot take `need`, if it cannot: the backend as a whole, else wgpu's gate there.
fn not_offered(target: &Target, need: Need) -> Option<String> {
    if let Err(why) = backend_carries(target.backend, need) {
        return Some(why.to_string());
    }
    target.gated.iter().find(|(n, _)| *n == need).map(|(_, why)| why.to_string())
}

/// One shader variant as the pipeline registry compiles it.
struct Variant {
    file: &'static str,
    precision: Precision,
    subgroups: bool,
    coop: Option<u32>,
    source: String,
}

impl Variant {
    fn needs(&self) -> Vec<Need> {
        let mut needs = Vec::new();
        if self.precision == Precision::F16 {
            needs.push(Need::F16);
        }
        if self.subgroups {
            needs.push(Need::Subgroups);
        }
        needs.extend(self.coop.map(Need::Coop));
        needs
    }

    fn name(&self) -> String {
        let coop = self.coop.map_or(String::new(), |t| format!(" coop {t}x{t}"));
        let red = if self.subgroups { "subgroups" } else { "workgroup" };
        format!("{} ({}, {red}{coop})", self.file, self.precision.name())
    }

    /// The naga capabilities the variant's wgpu features give (as wgpu-core maps them).
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::empty();
        for need in self.needs() {
            caps |= match need {
                Need::F16 => Capabilities::SHADER_FLOAT16,
                Need::Subgroups => Capabilities::SUBGROUP | Capabilities::SUBGROUP_BARRIER,
                Need::Coop(_) => Capabilities::COOPERATIVE_MATRIX,
            };
        }
        caps
    }
}

/// Every variant the registry can build: each file × {f32, f16} × {workgroup, subgroup
/// reductions}, each subgroup-broadcast file × {f32, f16} with subgroup reductions, and each cooperative-matrix file in f16 × both reductions × each tile size.
fn variants() -> Vec<Variant> {
    let mut out = Vec::new();
    for &(file, src) in SHADERS {
        for precision in [Precision::F32, Precision::F16] {
            for subgroups in [false, true] {
                out.push(Variant {
                    file,
                    precision,
                    subgroups,
                    coop: None,
                    source: shader_source(src, subgroups, precision),
                });
            }
        }
    }
    // Built only where subgroups are on.
    for &(file, src) in LANE_SHADERS {
        for precision in [Precision::F32, Precision::F16] {
            let source = shader_source(src, true, precision);
            out.push(Variant { file, precision, subgroups: true, coop: None, source });
        }
    }
    for &(file, src) in COOP_SHADERS {
        for t in COOP_TILES {
            for subgroups in [false, true] {
                let source = shader_source(src, subgroups, Precision::F16) + &coop_prelude(t);
                out.push(Variant { file, precision: Precision::F16, subgroups, coop: Some(t), source });
            }
        }
    }
    out
}

/// The override-constant sets the ops build pipelines with, per file (each entry point takes the
/// constants it declares; the rest keep their defaults): the register-block and tile shapes the
/// tuner may pick, every GEMM mode, the cooperative kernels' workgroup of one subgroup (8 on
/// lavapipe, 32 on NVIDIA and Apple, 64 on AMD wave64).
fn constant_sets(file: &str) -> Vec<Vec<(&'static str, f64)>> {
    let f = |v: usize| v as f64;
    match file {
        "conv2d" | "conv2d_lanes" => {
            let mut sets = Vec::new();
            let mut gemm: Vec<(usize, usize)> = RegisterTiles::ALL.iter().map(|t| (t.gemm_m, t.gemm_n)).collect();
            let mut wgrad: Vec<(usize, usize)> = RegisterTiles::ALL.iter().map(|t| (t.wgrad_ci, t.wgrad_n)).collect();
            gemm.dedup();
            gemm.sort();
            gemm.dedup();
            wgrad.sort();
            wgrad.dedup();
            for (i, &(m, n)) in gemm.iter().enumerate() {
                let (ci, co) = wgrad[i % wgrad.len()];
                for mode in [0.0, 1.0] {
                    sets.push(vec![
                        ("GEMM_M", f(m)),
                        ("GEMM_N", f(n)),
                        ("MODE", mode),
                        ("WGRAD_CI", f(ci)),
                        ("WGRAD_N", f(co)),
                    ]);
                }
            }
            sets
        }
        "conv2d_tiled" => WorkgroupTiles::ALL
            .iter()
            .flat_map(|t| {
                [0.0, 1.0, 2.0].into_iter().flat_map(move |mode| {
                    [1.0, 3.0].map(|k| {
                        vec![
                            ("BM", f(t.bm)),
                            ("BN", f(t.bn)),
                            ("BK", f(t.bk)),
                            ("KH", k),
                            ("KW", k),
                            ("MODE", mode),
                            ("TM", f(t.tm)),
                            ("TN", f(t.tn)),
                        ]
                    })
                })
            })
            .collect(),
        "conv2d_coop" => [8.0, 32.0, 64.0]
            .into_iter()
            .flat_map(|wg| [0.0, 1.0, 2.0].map(|mode| vec![("WG", wg), ("MODE", mode)]))
            .collect(),
        _ => vec![vec![]],
    }
}

/// The parsed, validated module of a variant (a failure here is tests/shaders.rs's to report too).
fn module(v: &Variant) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(&v.source)
        .unwrap_or_else(|e| panic!("{} does not parse:\n{}", v.name(), e.emit_to_string(&v.source)));
    let info = Validator::new(ValidationFlags::all(), v.capabilities())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{} does not validate:\n{}", v.name(), e.emit_to_string(&v.source)));
    (module, info)
}

/// What a binding holds, as the pipeline layout wgpu derives sorts it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Uniform,
    /// A storage buffer, read-only or not.
    Storage {
        read_only: bool,
    },
    /// A texture or storage texture (no kernel has one today; a planted one must translate too).
    Image,
}

/// The module's resource bindings, sorted by group and binding.
fn resources(module: &naga::Module) -> Vec<(naga::ResourceBinding, Kind)> {
    let mut out: Vec<_> = module
        .global_variables
        .iter()
        .filter_map(|(_, var)| {
            let b = var.binding?;
            let kind = match var.space {
                naga::AddressSpace::Uniform => Kind::Uniform,
                naga::AddressSpace::Storage { access } => {
                    Kind::Storage { read_only: !access.contains(naga::StorageAccess::STORE) }
                }
                naga::AddressSpace::Handle => Kind::Image,
                _ => return None,
            };
            Some((b, kind))
        })
        .collect();
    out.sort_by_key(|(b, _)| (b.group, b.binding));
    out
}

/// Translate one entry point of `module` (overrides already resolved) for `lang`, with `needs`
/// the wgpu features the device was created with. Returns the back end's error text.
fn translate(
    lang: Lang,
    needs: &[Need],
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
) -> Result<(), String> {
    let restrict = naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::Restrict,
        buffer: naga::proc::BoundsCheckPolicy::Restrict,
        image_load: naga::proc::BoundsCheckPolicy::Restrict,
        binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
    };
    let res = resources(module);
    match lang {
        Lang::Spv(major, minor) => {
            // wgpu-hal vulkan/adapter.rs: the capabilities always present, then one set per feature.
            use spv::Capability as C;
            let mut caps = vec![
                C::Shader,
                C::Matrix,
                C::Sampled1D,
                C::Image1D,
                C::ImageQuery,
                C::DerivativeControl,
                C::StorageImageExtendedFormats,
            ];
            for need in needs {
                match need {
                    Need::F16 => caps.push(C::Float16),
                    Need::Subgroups => caps.extend([
                        C::GroupNonUniform,
                        C::GroupNonUniformVote,
                        C::GroupNonUniformArithmetic,
                        C::GroupNonUniformBallot,
                        C::GroupNonUniformShuffle,
                        C::GroupNonUniformShuffleRelative,
                        C::GroupNonUniformQuad,
                    ]),
                    Need::Coop(_) => caps.extend([C::CooperativeMatrixKHR, C::VulkanMemoryModel]),
                }
            }
            // wgpu-hal vulkan/device.rs create_pipeline_layout: every binding of the layout mapped
            // to its descriptor set and binding.
            let binding_map = res
                .iter()
                .map(|&(b, _)| {
                    let info =
                        spv::BindingInfo { descriptor_set: b.group, binding: b.binding, binding_array_size: None };
                    (b, info)
                })
                .collect();
            let options = spv::Options {
                lang_version: (major, minor),
                binding_map,
                flags: spv::WriterFlags::LABEL_VARYINGS | spv::WriterFlags::FORCE_POINT_SIZE,
                capabilities: Some(caps.into_iter().collect()),
                bounds_check_policies: restrict,
                // The registry builds pipelines with zero_initialize_workgroup_memory: false.
                zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
                force_loop_bounding: true,
                use_storage_input_output_16: needs.contains(&Need::F16),
                fake_missing_bindings: false,
                ..Default::default()
            };
            let pipeline = spv::PipelineOptions { shader_stage: naga::ShaderStage::Compute, entry_point: entry.into() };
            spv::write_vec(module, info, &options, Some(&pipeline)).map(drop).map_err(|e| format!("{e}"))
        }
        Lang::Msl(major, minor) => {
            // wgpu-hal metal/device.rs load_shader: one buffer slot per binding of the layout, the
            // sizes buffer (runtime-array lengths) after them.
            let mut map = msl::BindingMap::default();
            let (mut buffers, mut textures) = (0u8, 0u8);
            for &(b, kind) in &res {
                let target = match kind {
                    Kind::Image => {
                        textures += 1;
                        msl::BindTarget { texture: Some(textures - 1), ..Default::default() }
                    }
                    Kind::Uniform | Kind::Storage { .. } => {
                        buffers += 1;
                        let mutable = kind == Kind::Storage { read_only: false };
                        msl::BindTarget { buffer: Some(buffers - 1), mutable, ..Default::default() }
                    }
                };
                map.insert(b, target);
            }
            let resources =
                msl::EntryPointResources { resources: map, immediates_buffer: None, sizes_buffer: Some(buffers) };
            let options = msl::Options {
                lang_version: (major, minor),
                per_entry_point_map: [(entry.to_string(), resources)].into_iter().collect(),
                fake_missing_bindings: false,
                bounds_check_policies: restrict,
                zero_initialize_workgroup_memory: false,
                force_loop_bounding: true,
                ..Default::default()
            };
            let pipeline = msl::PipelineOptions {
                entry_point: Some((naga::ShaderStage::Compute, entry.into())),
                ..Default::default()
            };
            msl::write_string(module, info, &options, &pipeline).map(drop).map_err(|e| format!("{e}"))
        }
        Lang::Hlsl(major, minor) => {
            let shader_model = match (major, minor) {
                (5, 1) => hlsl::ShaderModel::V5_1,
                (6, 0) => hlsl::ShaderModel::V6_0,
                (6, 2) => hlsl::ShaderModel::V6_2,
                other => panic!("no shader model {other:?} in this test"),
            };
            // wgpu-hal dx12/device.rs create_pipeline_layout: register space = bind group, the
            // special constants (num_workgroups) in a root constant of their own.
            let mut binding_map = hlsl::BindingMap::default();
            for &(b, _) in &res {
                binding_map
                    .insert(b, hlsl::BindTarget { space: b.group as u8, register: b.binding, ..Default::default() });
            }
            let options = hlsl::Options {
                shader_model,
                binding_map,
                fake_missing_bindings: false,
                special_constants_binding: Some(hlsl::BindTarget { space: 255, register: 0, ..Default::default() }),
                zero_initialize_workgroup_memory: false,
                restrict_indexing: true,
                force_loop_bounding: true,
                ..Default::default()
            };
            let pipeline = hlsl::PipelineOptions { entry_point: Some((naga::ShaderStage::Compute, entry.into())) };
            let mut out = String::new();
            hlsl::Writer::new(&mut out, &options, &pipeline)
                .write(module, info, None)
                .map(drop)
                .map_err(|e| format!("{e}"))
        }
        Lang::GlslEs(v) | Lang::Glsl(v) => {
            let version = match lang {
                Lang::GlslEs(_) => glsl::Version::Embedded { version: v, is_webgl: false },
                _ => glsl::Version::Desktop(v),
            };
            // wgpu-hal gles/device.rs create_pipeline_layout: a slot counter per resource kind.
            let mut binding_map = glsl::BindingMap::default();
            let (mut uniforms, mut storage, mut images) = (0u8, 0u8, 0u8);
            for &(b, kind) in &res {
                let counter = match kind {
                    Kind::Uniform => &mut uniforms,
                    Kind::Storage { .. } => &mut storage,
                    Kind::Image => &mut images,
                };
                binding_map.insert(b, *counter);
                *counter += 1;
            }
            let options = glsl::Options {
                version,
                writer_flags: glsl::WriterFlags::ADJUST_COORDINATE_SPACE | glsl::WriterFlags::FORCE_POINT_SIZE,
                binding_map,
                zero_initialize_workgroup_memory: false,
            };
            let pipeline = glsl::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: entry.into(),
                multiview: None,
            };
            let mut out = String::new();
            glsl::Writer::new(&mut out, module, info, &options, &pipeline, restrict)
                .and_then(|mut w| w.write())
                .map(drop)
                .map_err(|e| format!("{e}"))
        }
    }
}

/// Every entry point of a variant, under every constant set of its file, for one target: the
/// first error, naming the entry point and constants.
fn translate_variant(
    v: &Variant,
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    lang: Lang,
) -> Result<usize, String> {
    let mut count = 0;
    for ep in &module.entry_points {
        for set in constant_sets(v.file) {
            let declared = |name: &str| module.overrides.iter().any(|(_, o)| o.name.as_deref() == Some(name));
            let mut constants = naga::back::PipelineConstants::default();
            for (k, value) in set.iter().filter(|(k, _)| declared(k)) {
                constants.insert(k.to_string(), *value);
            }
            let (m, i) = naga::back::pipeline_constants::process_overrides(
                module,
                info,
                Some((naga::ShaderStage::Compute, &ep.name)),
                &constants,
            )
            .map_err(|e| format!("{}: overrides {set:?}: {e}", ep.name))?;
            translate(lang, &v.needs(), &m, &i, &ep.name).map_err(|e| format!("{} with {set:?}: {e}", ep.name))?;
            count += 1;
        }
    }
    Ok(count)
}

/// The outcome of one (variant, target) pair.
enum Outcome {
    /// Offered and translated: this many entry-point × constant-set translations.
    Translated(usize),
    /// Not offered there (`not_offered` says why), and what the back end does with it anyway.
    NotOffered { translates: Result<usize, String> },
}

fn run_matrix() -> Vec<(String, Vec<Need>, &'static Target, Outcome)> {
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for v in variants() {
        let (module, info) = module(&v);
        for target in TARGETS {
            let why: Vec<String> =
                v.needs().into_iter().filter_map(|n| not_offered(target, n).map(|w| format!("{n}: {w}"))).collect();
            let result = translate_variant(&v, &module, &info, target.lang);
            let outcome = if why.is_empty() {
                match result {
                    Ok(n) => Outcome::Translated(n),
                    Err(e) => {
                        failures.push(format!("{} for {}: {e}", v.name(), target.lang.name()));
                        continue;
                    }
                }
            } else {
                Outcome::NotOffered { translates: result }
            };
            out.push((v.name(), v.needs(), target, outcome));
        }
    }
    assert!(
        failures.is_empty(),
        "{} variant(s) that the target offers do not translate:\n{}",
        failures.len(),
        failures.join("\n")
    );
    out
}

/// An adapter of `backend` on a driver the cooperative-matrix allow-list takes, claiming every
/// feature and every tile: whatever it claims, the plan must not select a path the backend
/// cannot carry.
fn claiming_everything(backend: wgpu::Backend) -> (wgpu::AdapterInfo, Vec<wgpu::CooperativeMatrixProperties>) {
    let info = wgpu::AdapterInfo {
        name: if backend == wgpu::Backend::Metal { "Apple M3".into() } else { "NVIDIA GeForce RTX 4090".into() },
        vendor: if backend == wgpu::Backend::Metal { 0x106b } else { 0x10de },
        device: 0,
        device_type: wgpu::DeviceType::DiscreteGpu,
        device_pci_bus_id: String::new(),
        driver: "NVIDIA".into(),
        driver_info: String::new(),
        backend,
        subgroup_min_size: 32,
        subgroup_max_size: 32,
        transient_saves_memory: None,
        limit_bucket: None,
    };
    let props = COOP_TILES
        .iter()
        .map(|&t| wgpu::CooperativeMatrixProperties {
            m_size: t,
            n_size: t,
            k_size: t,
            ab_type: wgpu::CooperativeScalarType::F16,
            cr_type: wgpu::CooperativeScalarType::F32,
            saturating_accumulation: false,
        })
        .collect();
    (info, props)
}

/// The plan's choice for `need` on `backend` when the adapter claims everything: selected or not,
/// and forcing it on must be an error that names it when the backend cannot carry it.
fn plan_selects(backend: wgpu::Backend, need: Need) -> bool {
    let (info, props) = claiming_everything(backend);
    let auto = Paths::resolve(&info, wgpu::Features::all(), &props, &PathOptions::default()).expect("auto never errs");
    let selected = match need {
        Need::F16 => auto.f16.is_ok(),
        Need::Subgroups => auto.subgroups.is_ok(),
        Need::Coop(t) => auto.coop == Ok(t),
    };
    let forced = match need {
        Need::F16 => PathOptions { f16: Switch::On, ..Default::default() },
        Need::Subgroups => PathOptions { subgroups: Switch::On, ..Default::default() },
        // A forced tile the backend cannot carry falls to the other; forcing coop where no tile is
        // carried is the error.
        Need::Coop(_) => PathOptions { coop: Switch::On, ..Default::default() },
    };
    let carried = backend_carries(backend, need).is_ok();
    let any_tile = COOP_TILES.iter().any(|&t| backend_carries(backend, Need::Coop(t)).is_ok());
    let forced_result = Paths::resolve(&info, wgpu::Features::all(), &props, &forced);
    match need {
        Need::Coop(_) if any_tile => assert!(forced_result.is_ok(), "{backend:?}: --coop on with a tile carried"),
        _ if carried => assert!(forced_result.is_ok(), "{backend:?}: forcing {need} that is carried"),
        _ => {
            let e = format!("{:#}", forced_result.expect_err("forcing a path the backend cannot carry is an error"));
            assert!(e.contains("forced on"), "{backend:?} {need}: {e}");
        }
    }
    selected
}

#[test]
fn every_variant_translates_on_every_backend_that_offers_it() {
    let matrix = run_matrix();
    // Every pair not offered: the plan must not select it on that backend, whatever the adapter
    // claims (backend-wide), or wgpu must gate it by version there (stated in TARGETS).
    let mut stated = BTreeMap::new();
    for (_, needs, target, outcome) in &matrix {
        let Outcome::NotOffered { .. } = outcome else { continue };
        for &need in needs {
            if backend_carries(target.backend, need).is_err() {
                assert!(
                    !plan_selects(target.backend, need),
                    "{} cannot carry {need}, but the plan selects it on {:?}",
                    target.lang.name(),
                    target.backend
                );
            }
            if let Some(why) = not_offered(target, need) {
                stated.insert((target.lang, need), why);
            }
        }
    }
    // The pairs stated, so that the matrix reads in the test output (`--nocapture`).
    for ((lang, need), why) in &stated {
        println!("{:<14} {need:<30} not offered: {why}", lang.name());
    }
    let translated: usize = matrix.iter().map(|(_, _, _, o)| if let Outcome::Translated(n) = o { *n } else { 0 }).sum();
    println!("{translated} entry-point translations of offered variants");
    // The variants every target must take: f32 on workgroup reductions, the kernels any adapter runs.
    for (name, needs, target, outcome) in &matrix {
        if needs.is_empty() {
            assert!(matches!(outcome, Outcome::Translated(_)), "{name} on {}", target.lang.name());
        }
    }
}

/// Where a test of this repository runs a path, not only translates it: the kernel, step and CLI
/// tests run on lavapipe (Vulkan 1.3, SPIR-V 1.6) with f16 and subgroups, and tests/coop.rs runs the
/// 8x8 cooperative matrices under Mesa 26's lavapipe in CI; tests/gl.rs runs one training step on
/// wgpu's GL backend (Mesa's llvmpipe through EGL, a desktop GL 4.5 context) in CI.
const EXECUTED: &[(Lang, Option<Need>, &str)] = &[
    (Lang::Spv(1, 6), None, "lavapipe"),
    (Lang::Spv(1, 6), Some(Need::F16), "lavapipe"),
    (Lang::Spv(1, 6), Some(Need::Subgroups), "lavapipe"),
    (Lang::Spv(1, 6), Some(Need::Coop(8)), "Mesa 26 lavapipe"),
    (Lang::Glsl(450), None, "llvmpipe through EGL: tests/gl.rs, one training step"),
];

/// The conformance table (target × path), from the same matrix: each cell says whether that path's
/// variants are run by a test here, translated only, or not offered there and why (and whether the
/// back end would reject them anyway).
fn conformance_table(matrix: &[(String, Vec<Need>, &'static Target, Outcome)]) -> String {
    let columns: [(&str, Option<Need>); 5] = [
        ("f32, workgroup reductions", None),
        ("f16", Some(Need::F16)),
        ("subgroup reductions", Some(Need::Subgroups)),
        ("coop 8x8", Some(Need::Coop(8))),
        ("coop 16x16", Some(Need::Coop(16))),
    ];
    let mut t = String::new();
    let _ = writeln!(t, "| target | who gets it | {} |", columns.map(|c| c.0).join(" | "));
    let _ = writeln!(t, "| --- | --- |{}", " --- |".repeat(columns.len()));
    for target in TARGETS {
        let mut cells = Vec::new();
        for (_, need) in columns {
            let of_column = |n: &[Need]| match need {
                None => n.is_empty(),
                Some(need) => n.contains(&need),
            };
            let outcomes: Vec<&Outcome> = matrix
                .iter()
                .filter(|(_, n, tg, _)| std::ptr::eq(*tg, target) && of_column(n))
                .map(|(_, _, _, o)| o)
                .collect();
            let cell = match need.and_then(|n| not_offered(target, n)) {
                Some(why) => {
                    // Does the back end take the variant with only this path's needs?
                    let minimal = |n: &[Need]| match need {
                        Some(Need::Coop(t)) => n == [Need::F16, Need::Coop(t)],
                        Some(need) => n == [need],
                        None => n.is_empty(),
                    };
                    let rejected = matrix.iter().any(|(_, n, tg, o)| {
                        std::ptr::eq(*tg, target)
                            && minimal(n)
                            && matches!(o, Outcome::NotOffered { translates: Err(_), .. })
                    });
                    format!("not offered ({why}){}", if rejected { "; the back end rejects it too" } else { "" })
                }
                None => {
                    assert!(outcomes.iter().any(|o| matches!(o, Outcome::Translated(_))), "{:?} {need:?}", target.lang);
                    match EXECUTED.iter().find(|(l, n, _)| *l == target.lang && *n == need) {
                        Some((_, _, on)) => format!("run ({on})"),
                        None => "translated".to_string(),
                    }
                }
            };
            cells.push(cell);
        }
        let _ = writeln!(t, "| {} | {} | {} |", target.lang.name(), target.devices, cells.join(" | "));
    }
    t
}

#[test]
fn the_conformance_table_in_the_docs_is_the_tested_one() {
    let table = conformance_table(&run_matrix());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/backends.md");
    let (begin, end) = ("<!-- conformance table: generated by tests/backends.rs -->\n", "<!-- end of the table -->");
    let doc = std::fs::read_to_string(path).expect("docs/backends.md is readable");
    let (Some(a), Some(b)) = (doc.find(begin), doc.find(end)) else {
        panic!("docs/backends.md lacks the markers {begin:?} … {end:?}")
    };
    let current = &doc[a + begin.len()..b];
    if current != table {
        if std::env::var_os("SENET_BLESS").is_some() {
            let new = format!("{}{begin}{table}{}", &doc[..a], &doc[b..]);
            std::fs::write(path, new).expect("write docs/backends.md");
        } else {
            panic!("docs/backends.md's conformance table is not the tested one; SENET_BLESS=1 rewrites it:\n{table}");
        }
    }
}

#[test]
fn the_paths_never_select_what_a_backend_cannot_carry() {
    for backend in [wgpu::Backend::Vulkan, wgpu::Backend::Metal, wgpu::Backend::Dx12, wgpu::Backend::Gl] {
        for need in [Need::F16, Need::Subgroups, Need::Coop(8), Need::Coop(16)] {
            let carried = backend_carries(backend, need).is_ok();
            let selected = plan_selects(backend, need);
            // Coop picks the largest tile carried: 16 on Vulkan, so 8 is carried but not selected.
            let expected = carried && !(need == Need::Coop(8) && backend_carries(backend, Need::Coop(16)).is_ok());
            assert_eq!(selected, expected, "{backend:?} {need}: carried {carried}");
        }
    }
}

/// The cooperative-matrix allow-list: drivers whose matrices run on matrix hardware, by the names
/// and driver strings those drivers report. Off the list, `auto` keeps the register kernels with
/// the reason, and `on` still forces the matrices.
#[test]
fn cooperative_matrices_are_automatic_only_on_listed_drivers() {
    let adapter = |backend, vendor: u32, name: &str, driver: &str, driver_info: &str| {
        let (mut info, props) = claiming_everything(backend);
        (info.vendor, info.name, info.driver, info.driver_info) =
            (vendor, name.into(), driver.into(), driver_info.into());
        (info, props)
    };
    use wgpu::Backend::{Metal, Vulkan};
    let cases = [
        (adapter(Vulkan, 0x10de, "NVIDIA H100 80GB HBM3", "NVIDIA", "570.86"), true),
        (adapter(Vulkan, 0x10de, "NVIDIA GeForce RTX 4090 (NVK AD102)", "NVK", "Mesa 25.1.0"), false),
        (adapter(Vulkan, 0x1002, "AMD Radeon RX 7900 XTX (RADV NAVI31)", "radv", "Mesa 25.0.4"), true),
        (adapter(Vulkan, 0x1002, "AMD Radeon RX 6800 (RADV NAVI21)", "radv", "Mesa 25.0.4"), false),
        (adapter(Vulkan, 0x1002, "AMD Radeon RX 7900 XTX", "AMD proprietary driver", "24.10"), false),
        (
            adapter(
                Vulkan,
                0x8086,
                "Intel(R) Arc(tm) A770 Graphics (DG2)",
                "Intel open-source Mesa driver",
                "Mesa 25.0.4",
            ),
            true,
        ),
        (
            adapter(
                Vulkan,
                0x8086,
                "Intel(R) UHD Graphics 770 (ADL-S GT1)",
                "Intel open-source Mesa driver",
                "Mesa 25.0.4",
            ),
            false,
        ),
        (adapter(Metal, 0x106b, "Apple M1", "", ""), true),
        (
            adapter(
                Vulkan,
                0x10005,
                "llvmpipe (LLVM 19.1.7, 256 bits)",
                "llvmpipe",
                "Mesa 26.1.6-1~bpo13+1 (LLVM 19.1.7)",
            ),
            true,
        ),
        (adapter(Vulkan, 0x10005, "llvmpipe (LLVM 15.0.6, 256 bits)", "llvmpipe", "Mesa 25.2.0 (LLVM 15.0.6)"), false),
    ];
    for ((info, props), listed) in cases {
        let auto = Paths::resolve(&info, wgpu::Features::all(), &props, &PathOptions::default()).expect("auto");
        assert_eq!(auto.coop.is_ok(), listed, "{} ({}): {:?}", info.name, info.driver, auto.coop);
        if !listed {
            let why = auto.coop.expect_err("off the list");
            assert!(why.contains("not on the list") && why.contains("register kernels"), "{why}");
            let forced = PathOptions { coop: Switch::On, ..Default::default() };
            let on = Paths::resolve(&info, wgpu::Features::all(), &props, &forced).expect("--coop on forces it");
            assert!(on.coop.is_ok(), "{}: --coop on", info.name);
        }
    }
}

/// `--conv-lanes` (the shared conv loads of `conv2d_lanes.wgsl`): on `auto` exactly on CPU
/// adapters whose subgroups are on and 8 to 64 lanes wide; `on` forces it on a GPU with such
/// subgroups and is an error where the subgroups do not allow it; `off` is off everywhere.
#[test]
fn conv_lanes_are_auto_on_cpu_adapters_with_8_to_64_lanes() {
    let (gpu, props) = claiming_everything(wgpu::Backend::Vulkan);
    let adapter = |device_type, lo: u32, hi: u32| wgpu::AdapterInfo {
        device_type,
        subgroup_min_size: lo,
        subgroup_max_size: hi,
        ..gpu.clone()
    };
    let resolve =
        |info: &wgpu::AdapterInfo, opts: PathOptions| Paths::resolve(info, wgpu::Features::all(), &props, &opts);
    let cpu = wgpu::DeviceType::Cpu;
    for (info, auto) in [
        (adapter(cpu, 8, 8), true),
        (adapter(cpu, 16, 16), true),
        (adapter(cpu, 8, 64), true),
        (adapter(cpu, 4, 8), false),
        (adapter(cpu, 8, 128), false),
        (adapter(wgpu::DeviceType::DiscreteGpu, 32, 32), false),
        (adapter(wgpu::DeviceType::IntegratedGpu, 8, 32), false),
    ] {
        let what = format!("{:?} subgroups {}-{}", info.device_type, info.subgroup_min_size, info.subgroup_max_size);
        let paths = resolve(&info, PathOptions::default()).expect("auto never errs");
        assert_eq!(paths.conv_lanes.is_ok(), auto, "{what}: {:?}", paths.conv_lanes);
        let sizes_allow = (8..=64).contains(&info.subgroup_min_size) && info.subgroup_max_size <= 64;
        let on = resolve(&info, PathOptions { conv_lanes: Switch::On, ..Default::default() });
        match on {
            Ok(p) => assert!(sizes_allow && p.conv_lanes.is_ok(), "{what}: --conv-lanes on"),
            Err(e) => assert!(!sizes_allow && format!("{e:#}").contains("forced on"), "{what}: {e:#}"),
        }
        let off = resolve(&info, PathOptions { conv_lanes: Switch::Off, ..Default::default() }).expect("off");
        assert!(off.conv_lanes.is_err(), "{what}: --conv-lanes off");
        // Without subgroups there is nothing to broadcast through.
        let no_subgroups = resolve(&info, PathOptions { subgroups: Switch::Off, ..Default::default() }).expect("auto");
        assert!(no_subgroups.conv_lanes.is_err(), "{what}: --subgroups off");
    }
}
