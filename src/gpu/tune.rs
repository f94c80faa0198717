//! The tuner's memory: which kernel won for each (adapter, shape), kept in a JSON file in the
//! platform's cache directory so the second start on a machine times nothing.
//!
//! The tuner stores opaque choices (strings the op that timed them encodes and decodes — see
//! `ops::conv2d::ConvKernel`), keyed by the adapter, its driver and this crate's version, then by
//! the op's own key (conv2d: the shape and pass, and for an f16 plan its precision and
//! cooperative-matrix tile — `ops::conv2d::tune_key`; f32 keys are the shape and pass alone, so
//! caches written before f16 plans existed stay valid under the same format version). A file that cannot be read or parsed is ignored with one warning and
//! rewritten; an entry the op cannot decode is timed again. Writes are atomic (temporary file,
//! fsync, rename) after merging what is on disk, so processes sharing a machine (MPI ranks)
//! cannot leave a torn file behind; two writing at the same moment may each lose the other's
//! newest entries (no lock), which only costs a re-timing on the next start. The format version
//! is in the file name, so builds with another format keep their own file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// How much the tuner may time when a plan is built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TuneMode {
    /// No timing: the built-in choice per adapter kind (register blocks everywhere).
    Off,
    /// Time the built-in choice against a few workgroup-memory tile shapes per conv shape on
    /// GPUs; on CPU adapters (lavapipe) keep the built-in choice untimed.
    #[default]
    Quick,
    /// Time every kernel shape built, on any adapter.
    Full,
}

/// One remembered choice.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneEntry {
    pub choice: String,
    /// The winner's time in milliseconds when it was measured.
    pub ms: f64,
    /// The mode that timed it: a full run times again what quick chose.
    pub mode: TuneMode,
}

#[derive(Default, Serialize, Deserialize)]
struct CacheFile {
    version: u32,
    /// Device key → shape key → choice.
    devices: BTreeMap<String, BTreeMap<String, TuneEntry>>,
}

const VERSION: u32 = 1;

/// What the tuner did so far, for the log line and `senet bench`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TuneSummary {
    /// Shapes timed now.
    pub timed: usize,
    /// Shapes answered from the cache file.
    pub cached: usize,
    /// Seconds spent timing.
    pub seconds: f64,
}

#[derive(Default)]
struct State {
    loaded: bool,
    entries: BTreeMap<String, TuneEntry>,
    summary: TuneSummary,
    /// Shapes already counted in `summary` (timed, or answered from the cache): a plan may ask
    /// for one shape's choice twice (a convolution's forward, once for the batch norm after it).
    counted: std::collections::BTreeSet<String>,
}

pub struct Tuner {
    pub mode: TuneMode,
    /// The cache file; None keeps choices in memory only.
    pub path: Option<PathBuf>,
    /// Print every candidate's time as it is measured.
    pub verbose: bool,
    device: String,
    state: Mutex<State>,
}

/// The tuning cache file below the platform's cache directory `base` (the CLI finds it:
/// `$XDG_CACHE_HOME` or `~/.cache`, `~/Library/Caches`, `%LOCALAPPDATA%`).
pub fn cache_path_in(base: &std::path::Path) -> PathBuf {
    base.join("senet-wgpu").join("tune-v1.json")
}

impl Tuner {
    /// A tuner for the device described by `device` (adapter, driver, crate version).
    pub fn new(mode: TuneMode, path: Option<PathBuf>, device: String) -> Tuner {
        Tuner { mode, path, verbose: false, device, state: Mutex::default() }
    }

    /// This tuner, printing every candidate's time (`--tune-verbose`).
    pub fn with_verbose(self, verbose: bool) -> Tuner {
        Tuner { verbose, ..self }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !s.loaded {
            s.loaded = true;
            if let Some(path) = &self.path {
                match read(path) {
                    Ok(mut file) => s.entries = file.devices.remove(&self.device).unwrap_or_default(),
                    Err(e) => {
                        eprintln!("warning: ignoring the tuning cache {}: {e}; it will be rewritten", path.display())
                    }
                }
            }
        }
        s
    }

    /// The remembered choice for `key`, if any (a cache hit, counted once per shape and only for
    /// shapes not timed in this process).
    pub fn cached(&self, key: &str) -> Option<TuneEntry> {
        let mut s = self.state();
        let hit = s.entries.get(key).cloned();
        if hit.is_some() && s.counted.insert(key.to_string()) {
            s.summary.cached += 1;
        }
        hit
    }

    /// A choice that did not decode: forget it, so it is timed and rewritten.
    pub fn forget(&self, key: &str) {
        let mut s = self.state();
        if s.counted.remove(key) {
            s.summary.cached = s.summary.cached.saturating_sub(1);
        }
        s.entries.remove(key);
    }

    /// Remember `entry` for `key`, timed in `seconds`, and write the cache file.
    pub fn store(&self, key: &str, entry: TuneEntry, seconds: f64) {
        let mut s = self.state();
        s.summary.timed += 1;
        s.summary.seconds += seconds;
        s.counted.insert(key.to_string());
        s.entries.insert(key.to_string(), entry.clone());
        drop(s);
        if let Some(path) = &self.path {
            // Merge with what is on disk now (another process may have added shapes); a file that
            // does not read was reported when it was loaded and is replaced.
            let mut file = read(path).unwrap_or_default();
            file.version = VERSION;
            file.devices.entry(self.device.clone()).or_default().insert(key.to_string(), entry);
            if let Err(e) = write(path, &file) {
                eprintln!("warning: could not write the tuning cache {}: {e:#}", path.display());
            }
        }
    }

    pub fn summary(&self) -> TuneSummary {
        self.state().summary.clone()
    }
}

/// The cache file; a missing one is empty. Unreadable, truncated, foreign or of another version:
/// why, for the warning.
fn read(path: &Path) -> Result<CacheFile, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CacheFile::default()),
        Err(e) => return Err(e.to_string()),
    };
    match serde_json::from_slice::<CacheFile>(&bytes) {
        Ok(f) if f.version == VERSION => Ok(f),
        Ok(f) => Err(format!("version {} (this build writes {VERSION})", f.version)),
        Err(e) => Err(e.to_string()),
    }
}

fn write(path: &Path, file: &CacheFile) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::files::write_atomic(path, &serde_json::to_vec_pretty(file)?)
}
