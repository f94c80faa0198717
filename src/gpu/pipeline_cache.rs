//! The driver's compiled pipelines, kept on disk so the second start of the same build on the same
//! adapter compiles nothing it compiled before (wgpu's `PipelineCache`: Vulkan only).
//!
//! The file sits beside the tuning cache, named by `wgpu::util::pipeline_cache_key` (vendor and
//! device), and holds a small envelope around wgpu's bytes: a magic, that key, the length and an
//! FNV-1a hash of the data. wgpu itself checks the adapter and driver in its own header, but not
//! the body, and hands the body to the driver: the hash keeps a torn or corrupt file from ever
//! reaching it. A file that is missing is an empty cache; one that is unreadable, corrupt or
//! foreign is ignored with one warning and rewritten; a write that fails is a warning, never an
//! error. Writes are atomic (`files::write_atomic`) and happen only when pipelines were built
//! since the last write (`Gpu::save_pipeline_cache`, called when a plan is built).
//!
//! Measured on lavapipe (docs/performance.md): Mesa's own shader cache already keeps the LLVM
//! code; this one keeps what the driver caches at `vkCreateComputePipelines`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};

const MAGIC: &[u8; 8] = b"SENETPC1";

/// How the cache was found when the device was created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PipelineCacheLoad {
    /// No file yet: every pipeline is compiled and then written.
    Empty,
    /// The file's data was handed to the driver (its size in bytes).
    Loaded(usize),
    /// The file was ignored (why) and will be rewritten.
    Ignored(String),
}

/// The cache object every pipeline is built with, and where it lives on disk.
pub(crate) struct PipelineCacheStore {
    pub(crate) cache: wgpu::PipelineCache,
    /// The file; `None` keeps the cache for this process only.
    pub(crate) path: Option<PathBuf>,
    key: String,
    pub(crate) load: PipelineCacheLoad,
    /// Pipelines were built since the cache was loaded or last written.
    pub(crate) dirty: AtomicBool,
}

/// 64-bit FNV-1a: enough to tell a torn or flipped file from the one we wrote.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The envelope around wgpu's data.
fn wrap(key: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + key.len() + 28);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a(data).to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// wgpu's data out of the envelope, or why the file cannot be used.
fn unwrap_data<'a>(key: &str, file: &'a [u8]) -> std::result::Result<&'a [u8], String> {
    let take = |at: usize, n: usize| file.get(at..at + n).ok_or_else(|| "the file is truncated".to_string());
    if take(0, 8)? != MAGIC {
        return Err("it is not a senet-wgpu pipeline cache".into());
    }
    let klen = u32::from_le_bytes(take(8, 4)?.try_into().map_err(|_| "bad length")?) as usize;
    let file_key = take(12, klen.min(file.len()))?;
    if file_key != key.as_bytes() {
        return Err(format!("it was written for another adapter ({:?})", String::from_utf8_lossy(file_key)));
    }
    let at = 12 + klen;
    let len = u64::from_le_bytes(take(at, 8)?.try_into().map_err(|_| "bad length")?) as usize;
    let hash = u64::from_le_bytes(take(at + 8, 8)?.try_into().map_err(|_| "bad hash")?);
    let data = &file[(at + 16).min(file.len())..];
    if data.len() != len {
        return Err(format!("it holds {} bytes of data where its header says {len}", data.len()));
    }
    if fnv1a(data) != hash {
        return Err("its data does not match its hash (corrupt)".into());
    }
    Ok(data)
}

/// The cache file for this adapter in `dir`, or `None` where wgpu keeps no cache for its backend.
pub fn cache_file(dir: &Path, info: &wgpu::AdapterInfo) -> Option<PathBuf> {
    wgpu::util::pipeline_cache_key(info).map(|k| dir.join(format!("{k}.bin")))
}

impl PipelineCacheStore {
    /// Create the device's cache, seeded from `path` when it holds a valid file for this adapter.
    pub(crate) fn open(device: &wgpu::Device, info: &wgpu::AdapterInfo, path: Option<PathBuf>) -> PipelineCacheStore {
        let key = wgpu::util::pipeline_cache_key(info).unwrap_or_default();
        let (data, load) = match path.as_deref().map(std::fs::read) {
            None => (None, PipelineCacheLoad::Empty),
            Some(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => (None, PipelineCacheLoad::Empty),
            Some(Err(e)) => (None, PipelineCacheLoad::Ignored(e.to_string())),
            Some(Ok(bytes)) => match unwrap_data(&key, &bytes) {
                Ok(d) => (Some(d.to_vec()), PipelineCacheLoad::Loaded(d.len())),
                Err(why) => (None, PipelineCacheLoad::Ignored(why)),
            },
        };
        if let (PipelineCacheLoad::Ignored(why), Some(p)) = (&load, &path) {
            eprintln!("warning: ignoring the pipeline cache {}: {why}; it will be rewritten", p.display());
        }
        // SAFETY: `data` is what `PipelineCache::get_data` returned on an adapter with the same
        // `pipeline_cache_key` (checked above), byte for byte (the envelope's hash); wgpu checks
        // its own header (driver version, validation key) and `fallback` starts empty if it fails.
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("senet pipelines"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        PipelineCacheStore { cache, path, key, load, dirty: AtomicBool::new(false) }
    }

    /// Write the cache if pipelines were built since it was read or written. Nothing to write
    /// (no file, nothing new, the driver returns no data) is `Ok(false)`.
    pub(crate) fn save(&self) -> Result<bool> {
        let Some(path) = &self.path else { return Ok(false) };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let Some(data) = self.cache.get_data() else { return Ok(false) };
        let result = (|| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            crate::files::write_atomic(path, &wrap(&self.key, &data))
        })();
        if result.is_err() {
            // Try again after the next pipelines are built.
            self.dirty.store(true, Ordering::Release);
        }
        result.map(|()| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_damage() {
        let data = b"some driver bytes".to_vec();
        let file = wrap("key_a", &data);
        assert_eq!(unwrap_data("key_a", &file).unwrap(), &data[..]);
        assert!(unwrap_data("key_b", &file).unwrap_err().contains("another adapter"));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(unwrap_data("key_a", &flipped).unwrap_err().contains("corrupt"));
        assert!(unwrap_data("key_a", &file[..file.len() - 3]).is_err());
        assert!(unwrap_data("key_a", &file[..10]).unwrap_err().contains("truncated"));
        assert!(unwrap_data("key_a", b"{\"version\": 1}").unwrap_err().contains("not a senet-wgpu"));
    }
}
