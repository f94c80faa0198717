//! Which kernel paths an adapter runs, and why a path is off: f16 variants, subgroup reductions,
//! cooperative-matrix GEMMs, timestamp queries. One decision, used by the device
//! ([`super::Gpu::new`]) and printed by `senet devices`.
//!
//! A path runs only where three things hold: the backend's shading language can carry it (naga's
//! back end for that backend writes it, and wgpu's backend can offer the feature at all —
//! [`backend_carries`], whose table tests/backends.rs checks against the translations), the adapter
//! offers the wgpu feature, and the options allow it. Cooperative matrices take a fourth: the driver
//! is on [`coop_allowed_driver`]'s list of drivers whose matrices run on matrix hardware (some
//! drivers list the extension and emulate it, slower than the register kernels).

use std::fmt;

use anyhow::Result;

/// Auto, on or off, for a path the options can force or refuse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Where the adapter has it (and, for cooperative matrices, the driver is on the allow-list).
    #[default]
    Auto,
    /// Always: an error naming the missing feature on an adapter without it.
    On,
    /// Never.
    Off,
}

/// A path that selects kernel variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Need {
    /// f16 activations (`--precision f16`): wgpu `SHADER_F16`.
    F16,
    /// Subgroup reductions: wgpu `SUBGROUP`.
    Subgroups,
    /// Cooperative-matrix GEMMs on square `T`x`T`x`T` f16 -> f32 tiles:
    /// wgpu `EXPERIMENTAL_COOPERATIVE_MATRIX` with that configuration listed.
    Coop(u32),
}

impl Need {
    /// The wgpu feature that selects the path.
    pub fn feature(self) -> wgpu::Features {
        match self {
            Need::F16 => wgpu::Features::SHADER_F16,
            Need::Subgroups => wgpu::Features::SUBGROUP,
            Need::Coop(_) => wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX,
        }
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Need::F16 => write!(f, "f16"),
            Need::Subgroups => write!(f, "subgroups"),
            Need::Coop(t) => write!(f, "cooperative matrices {t}x{t}x{t}"),
        }
    }
}

/// The square tile sizes the cooperative-matrix kernels are written for (WGSL's coop_mat8x8 and
/// coop_mat16x16), largest first.
pub const COOP_TILES: [u32; 2] = [16, 8];

/// Whether `backend` can carry `need` at all, whatever the adapter says: `Err` with the reason
/// where naga's back end for it cannot write the construct or wgpu's backend never offers the
/// feature. The plan falls back there even if an adapter listed the feature.
pub fn backend_carries(backend: wgpu::Backend, need: Need) -> Result<(), &'static str> {
    use wgpu::Backend as B;
    match (backend, need) {
        (B::Vulkan, _) => Ok(()),
        (B::Metal, Need::F16 | Need::Subgroups | Need::Coop(8)) => Ok(()),
        (B::Metal, Need::Coop(_)) => Err("Metal's simdgroup matrices are 8x8 only"),
        (B::Dx12, Need::F16 | Need::Subgroups) => Ok(()),
        (B::Dx12, Need::Coop(_)) => Err("naga's HLSL back end writes no cooperative matrices (DX12 lists none)"),
        (B::Gl, Need::F16) => Err("naga's GLSL back end writes no f16 (wgpu's GL backend never offers SHADER_F16)"),
        (B::Gl, Need::Subgroups) => Err("wgpu's GL backend offers no subgroups"),
        (B::Gl, Need::Coop(_)) => Err("GL has no cooperative matrices"),
        (_, Need::F16 | Need::Subgroups) => Ok(()),
        (_, Need::Coop(_)) => Err("cooperative matrices run on Vulkan and Metal only"),
    }
}

/// The Mesa version in a driver string ("Mesa 26.0.1", "4.5 (Core Profile) Mesa 22.3.6"): its major.
fn mesa_major(driver_info: &str) -> Option<u32> {
    let rest = &driver_info[driver_info.find("Mesa ")? + 5..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Whether cooperative matrices on this adapter run on matrix hardware (or, for lavapipe 26, are
/// the emulation the tests run on): NVIDIA's proprietary driver (tensor cores), Mesa RADV on
/// RDNA3 and later (WMMA), Intel Arc (XMX), Apple GPUs through Metal (simdgroup matrices), and
/// lavapipe from Mesa 26. `Err` says why not. Others list the extension without the hardware
/// (RADV before RDNA3 emulates it; llama.cpp keeps a vendor list for the same reason).
pub fn coop_allowed_driver(info: &wgpu::AdapterInfo) -> Result<(), String> {
    const NVIDIA: u32 = 0x10de;
    const INTEL: u32 = 0x8086;
    let name = info.name.to_ascii_uppercase();
    let driver = info.driver.to_ascii_lowercase();
    let ok = match info.backend {
        wgpu::Backend::Metal => name.starts_with("APPLE"),
        wgpu::Backend::Vulkan => {
            if info.vendor == NVIDIA {
                // The proprietary driver calls itself "NVIDIA"; NVK and nouveau are Mesa.
                driver == "nvidia"
            } else if driver == "radv" || name.contains("RADV") {
                ["NAVI3", "NAVI4", "GFX11", "GFX12", "PHOENIX", "STRIX", "KRACKAN", "HAWK"]
                    .iter()
                    .any(|g| name.contains(g))
            } else if info.vendor == INTEL {
                ["ARC", "DG2", "BMG", "BATTLEMAGE", "ALCHEMIST"].iter().any(|g| name.contains(g))
            } else if driver == "llvmpipe" {
                mesa_major(&info.driver_info).is_some_and(|v| v >= 26)
            } else {
                false
            }
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} ({}) is not on the list of drivers whose cooperative matrices run on matrix hardware \
             (NVIDIA proprietary, RADV on RDNA3+, Intel Arc, Apple through Metal, lavapipe 26)",
            info.name, info.driver
        ))
    }
}

/// What an adapter offers the paths: its backend and driver, its wgpu features and its
/// cooperative-matrix configurations. Each path's decision is one method, `Ok(Err(why))` for a
/// path that is off and `Err` for one forced on where it cannot run.
struct Offers<'a> {
    info: &'a wgpu::AdapterInfo,
    features: wgpu::Features,
    coop_props: &'a [wgpu::CooperativeMatrixProperties],
}

impl Offers<'_> {
    /// The backend carries `need` and the adapter offers its feature.
    fn carried(&self, need: Need) -> Path<()> {
        backend_carries(self.info.backend, need).map_err(str::to_string)?;
        if self.features.contains(need.feature()) {
            Ok(())
        } else {
            Err(format!("the adapter does not offer wgpu Features::{:?}", need.feature()))
        }
    }

    /// The error of a path forced on by `flag` where it cannot run, for `why`.
    fn forced(&self, what: &str, flag: &str, why: &str) -> anyhow::Error {
        anyhow::anyhow!("{what} were forced on ({flag}) but adapter {:?} cannot run them: {why}", self.info.name)
    }

    fn f16(&self, switch: Switch) -> Result<Path<()>> {
        Ok(match switch {
            Switch::Off => Err("turned off (--f16 off)".to_string()),
            Switch::Auto => self.carried(Need::F16),
            Switch::On => Ok(self.carried(Need::F16).map_err(|why| self.forced("f16 shaders", "--f16 on", &why))?),
        })
    }

    /// Subgroup reductions, with the adapter's (min, max) subgroup sizes.
    fn subgroups(&self, switch: Switch) -> Result<Path<(u32, u32)>> {
        let sizes = (self.info.subgroup_min_size, self.info.subgroup_max_size);
        Ok(match switch {
            Switch::Off => Err("turned off (--subgroups off); workgroup-memory trees".to_string()),
            Switch::Auto => self.carried(Need::Subgroups).map(|()| sizes),
            Switch::On => Ok(self
                .carried(Need::Subgroups)
                .map(|()| sizes)
                .map_err(|why| self.forced("subgroups", "--subgroups on / SENET_SUBGROUPS=on", &why))?),
        })
    }

    /// Whether the adapter lists the square `t`x`t`x`t` f16 x f16 -> f32 cooperative matrix.
    fn coop_listed(&self, t: u32) -> bool {
        self.coop_props.iter().any(|p| {
            (p.m_size, p.n_size, p.k_size) == (t, t, t)
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
    }

    /// The largest square f16 -> f32 tile both the adapter lists and the backend carries, whatever
    /// the driver (f16 shaders must be on: `f16_on`).
    fn coop_possible(&self, f16_on: bool) -> Path<u32> {
        if !f16_on {
            return Err("needs f16 shaders, which are off".into());
        }
        let backend = self.info.backend;
        let tiles: Vec<u32> =
            COOP_TILES.into_iter().filter(|&t| backend_carries(backend, Need::Coop(t)).is_ok()).collect();
        if tiles.is_empty() {
            return Err(backend_carries(backend, Need::Coop(COOP_TILES[0])).err().unwrap_or_default().into());
        }
        let Some(t) = tiles.iter().copied().find(|&t| self.coop_listed(t)) else {
            let sizes: Vec<String> = tiles.iter().map(|t| format!("{t}x{t}x{t}")).collect();
            return Err(format!("the adapter lists no f16 x f16 -> f32 cooperative matrix of {}", sizes.join(" or ")));
        };
        self.carried(Need::Coop(t))?;
        Ok(t)
    }

    /// Cooperative matrices: on `auto` only where the driver is on [`coop_allowed_driver`]'s list.
    fn coop(&self, switch: Switch, f16_on: bool) -> Result<Path<u32>> {
        Ok(match switch {
            Switch::Off => Err("turned off (--coop off); register kernels".to_string()),
            Switch::Auto => self.coop_possible(f16_on).and_then(|t| {
                coop_allowed_driver(self.info).map_err(|why| format!("{why}; register kernels"))?;
                Ok(t)
            }),
            Switch::On => {
                Ok(self.coop_possible(f16_on).map_err(|why| self.forced("cooperative matrices", "--coop on", &why))?)
            }
        })
    }

    /// The register GEMM's column weights shared through subgroup broadcasts (`conv2d_lanes.wgsl`):
    /// needs subgroup reductions on (`subgroups`, with the adapter's sizes) of 8 to 64 lanes,
    /// whole subgroups in a 64-invocation workgroup. On `auto` only on CPU adapters: there a
    /// uniform load runs lane by lane (Mesa 22.3's gallivm), and sharing it made the forward and
    /// the input gradient 1.1-1.6x faster on lavapipe; a GPU's caches broadcast a uniform load
    /// themselves, so there the broadcasts would only add instructions (unmeasured).
    fn conv_lanes(&self, switch: Switch, subgroups: &Path<(u32, u32)>) -> Result<Path<()>> {
        let possible = || -> Path<()> {
            let &(lo, hi) = subgroups.as_ref().map_err(|why| format!("needs subgroups, which are off ({why})"))?;
            if lo < 8 || hi > 64 {
                return Err(format!("subgroups of {lo}-{hi} lanes; the broadcasts need 8 to 64"));
            }
            Ok(())
        };
        Ok(match switch {
            Switch::Off => Err("turned off (--conv-lanes off); every lane loads its own weights".to_string()),
            Switch::Auto => possible().and_then(|()| {
                if self.info.device_type == wgpu::DeviceType::Cpu {
                    Ok(())
                } else {
                    Err("not a CPU adapter: its caches broadcast a uniform load (--conv-lanes on to try)".into())
                }
            }),
            Switch::On => {
                Ok(possible().map_err(|why| self.forced("shared conv weight loads", "--conv-lanes on", &why))?)
            }
        })
    }

    fn timestamps(&self) -> Path<()> {
        if self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            Ok(())
        } else {
            Err("the adapter does not offer wgpu Features::TIMESTAMP_QUERY; kernels are timed by the wall clock".into())
        }
    }

    fn pipeline_cache_possible(&self) -> Path<()> {
        if wgpu::util::pipeline_cache_key(self.info).is_none() {
            return Err(format!("wgpu keeps no pipeline cache on {:?} (Vulkan only)", self.info.backend));
        }
        if self.features.contains(wgpu::Features::PIPELINE_CACHE) {
            Ok(())
        } else {
            Err("the adapter does not offer wgpu Features::PIPELINE_CACHE".into())
        }
    }

    fn pipeline_cache(&self, switch: Switch) -> Result<Path<()>> {
        Ok(match switch {
            Switch::Off => Err("turned off (--pipeline-cache off)".to_string()),
            Switch::Auto => self.pipeline_cache_possible(),
            Switch::On => Ok(self.pipeline_cache_possible().map_err(|why| {
                self.forced("pipeline caches", "--pipeline-cache on / SENET_PIPELINE_CACHE=on", &why)
            })?),
        })
    }
}

/// What the options ask of the paths (filled by the CLI from its flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathOptions {
    pub f16: Switch,
    pub subgroups: Switch,
    pub coop: Switch,
    /// The driver's compiled pipelines kept on disk (`--pipeline-cache`).
    pub pipeline_cache: Switch,
    /// The register GEMM's column weights shared through subgroup broadcasts (`--conv-lanes`).
    pub conv_lanes: Switch,
}

/// One path: on (with what it runs on) or off (and why).
pub type Path<T> = std::result::Result<T, String>;

/// The paths one adapter runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Paths {
    /// f16 variants may be built (`--precision f16`).
    pub f16: Path<()>,
    /// Reductions on subgroups of these (min, max) sizes, else workgroup-memory trees.
    pub subgroups: Path<(u32, u32)>,
    /// The square f16 x f16 -> f32 tile of an f16 plan's GEMMs, else the register kernels.
    pub coop: Path<u32>,
    /// Timestamp queries (kernel timing in `bench`, the tuner, `--profile`), else the wall clock.
    pub timestamps: Path<()>,
    /// Compiled pipelines kept in a `wgpu::PipelineCache` (and on disk when a directory is given).
    pub pipeline_cache: Path<()>,
    /// The register GEMM loads each column weight once per subgroup (`conv2d_lanes.wgsl`).
    pub conv_lanes: Path<()>,
}

impl Paths {
    /// Decide every path for an adapter with `features` and cooperative-matrix configurations
    /// `coop_props`. A path forced on (`Switch::On`) where it cannot run is an error naming the
    /// wgpu feature (or the configuration) that is missing.
    pub fn resolve(
        info: &wgpu::AdapterInfo,
        features: wgpu::Features,
        coop_props: &[wgpu::CooperativeMatrixProperties],
        opts: &PathOptions,
    ) -> Result<Paths> {
        let adapter = Offers { info, features, coop_props };
        let f16 = adapter.f16(opts.f16)?;
        let subgroups = adapter.subgroups(opts.subgroups)?;
        let coop = adapter.coop(opts.coop, f16.is_ok())?;
        let timestamps = adapter.timestamps();
        let pipeline_cache = adapter.pipeline_cache(opts.pipeline_cache)?;
        let conv_lanes = adapter.conv_lanes(opts.conv_lanes, &subgroups)?;
        Ok(Paths { f16, subgroups, coop, timestamps, pipeline_cache, conv_lanes })
    }

    /// The features to request from the adapter for these paths.
    pub fn features(&self, adapter: wgpu::Features) -> wgpu::Features {
        let mut wanted = wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        if self.f16.is_ok() {
            wanted |= wgpu::Features::SHADER_F16;
        }
        if self.subgroups.is_ok() {
            wanted |= wgpu::Features::SUBGROUP;
        }
        if self.coop.is_ok() {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        if self.pipeline_cache.is_ok() {
            wanted |= wgpu::Features::PIPELINE_CACHE;
        }
        adapter & wanted
    }

    /// The table `senet devices` prints for one adapter, indented two spaces.
    pub fn table(&self) -> String {
        let row = |what: &str, path: std::result::Result<String, &String>| match path {
            Ok(on) => format!("  {what:<22} on{}\n", if on.is_empty() { String::new() } else { format!(", {on}") }),
            Err(why) => format!("  {what:<22} off: {why}\n"),
        };
        let mut out = String::new();
        out += &row("f16 (--precision f16)", self.f16.as_ref().map(|()| String::new()));
        out += &row(
            "subgroup reductions",
            self.subgroups.as_ref().map(
                |&(lo, hi)| {
                    if lo == hi { format!("size {lo}") } else { format!("size {lo}-{hi}") }
                },
            ),
        );
        out += &row("cooperative matrices", self.coop.as_ref().map(|t| format!("f16 {t}x{t}x{t} tiles in f16 plans")));
        out += &row(
            "shared conv weights",
            self.conv_lanes.as_ref().map(|()| "one load per subgroup, broadcast to its lanes".to_string()),
        );
        out += &row("timestamp queries", self.timestamps.as_ref().map(|()| String::new()));
        out += &row(
            "pipeline cache",
            self.pipeline_cache.as_ref().map(|()| "compiled pipelines kept on disk".to_string()),
        );
        out
    }
}
