//! The pipeline cache file: written after a plan is built, read back by the next device on the
//! same adapter, a corrupt file ignored and replaced, an unwritable folder a warning (the device
//! and its plans work), and `--pipeline-cache off` building no cache at all. No timing: what the
//! cache saves is measured by scripts/pipeline-cache-bench.sh (docs/performance.md).

mod common;

use std::path::Path;
use std::sync::Arc;

use senet_wgpu::gpu::pipeline_cache::PipelineCacheLoad;
use senet_wgpu::gpu::tune::TuneMode;
use senet_wgpu::gpu::{Gpu, GpuOptions, Switch};
use senet_wgpu::model::ModelConfig;
use senet_wgpu::model::plan::Network;
use senet_wgpu::ops::optimizer::OptimizerConfig;

fn device(dir: &Path, switch: Switch) -> Arc<Gpu> {
    let opts = GpuOptions {
        tune: Some(TuneMode::Off),
        pipeline_cache: switch,
        pipeline_cache_dir: Some(dir.to_path_buf()),
        ..Default::default()
    };
    Gpu::new(&opts).expect("GPU test cannot run")
}

/// Build a small base SENet's plan: every pipeline of a step, then the cache is written.
fn build_plan(gpu: &Arc<Gpu>) {
    let cfg = ModelConfig {
        model: "senet".into(),
        width: 1.0 / 16.0,
        reduction: 4,
        in_channels: 3,
        num_classes: 5,
        input_hw: [16, 16],
        classes: vec![],
        normalize: None,
        se_bias: false,
        se: Default::default(),
        block: Default::default(),
    };
    let net = Network::new(gpu.clone(), cfg, OptimizerConfig::adam(1e-3), 0).expect("network");
    net.plan(2).expect("plan");
}

/// These tests need the adapter to have a pipeline cache (Vulkan: lavapipe has one).
fn cache_file(gpu: &Gpu) -> std::path::PathBuf {
    assert!(gpu.paths.pipeline_cache.is_ok(), "{:?}", gpu.paths.pipeline_cache);
    gpu.pipeline_cache_path().expect("a cache file with a folder given").to_path_buf()
}

#[test]
fn the_cache_file_is_written_then_loaded_by_the_next_device() {
    let dir = tempfile::tempdir().unwrap();
    let first = device(dir.path(), Switch::Auto);
    assert_eq!(first.pipeline_cache_load(), Some(PipelineCacheLoad::Empty));
    let file = cache_file(&first);
    assert!(file.starts_with(dir.path()) && file.file_name().unwrap().to_string_lossy().contains("vulkan"));
    build_plan(&first);
    let written = std::fs::read(&file).expect("the plan wrote the cache file");
    // Nothing new built: nothing written again.
    assert!(!first.save_pipeline_cache().unwrap());

    let second = device(dir.path(), Switch::Auto);
    match second.pipeline_cache_load() {
        Some(PipelineCacheLoad::Loaded(n)) => assert!(n > 0 && n < written.len()),
        other => panic!("the second device did not load the cache: {other:?}"),
    }
    build_plan(&second);
}

#[test]
fn a_corrupt_cache_file_is_ignored_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let first = device(dir.path(), Switch::Auto);
    let file = cache_file(&first);
    build_plan(&first);
    let good = std::fs::read(&file).unwrap();
    // One flipped byte in the driver's data, then a file that is not a cache at all.
    let mut flipped = good.clone();
    *flipped.last_mut().unwrap() ^= 0x40;
    for bad in [flipped, b"{\"version\": 1}".to_vec()] {
        std::fs::write(&file, &bad).unwrap();
        let gpu = device(dir.path(), Switch::Auto);
        match gpu.pipeline_cache_load() {
            Some(PipelineCacheLoad::Ignored(why)) => assert!(!why.is_empty()),
            other => panic!("a damaged cache file was not ignored: {other:?}"),
        }
        build_plan(&gpu);
        let rewritten = std::fs::read(&file).unwrap();
        assert_ne!(rewritten, bad, "the damaged file was not replaced");
        assert!(matches!(device(dir.path(), Switch::Auto).pipeline_cache_load(), Some(PipelineCacheLoad::Loaded(_))));
    }
}

#[test]
fn an_unwritable_cache_folder_is_a_warning_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the folder should be: creating the folder and writing below it both fail,
    // whoever runs the test (root ignores permission bits, not this).
    let blocked = dir.path().join("not-a-folder");
    std::fs::write(&blocked, b"x").unwrap();
    let gpu = device(&blocked.join("cache"), Switch::Auto);
    build_plan(&gpu);
    assert!(gpu.save_pipeline_cache().is_err(), "the write should have failed (and be retried)");
    assert!(std::fs::read(&blocked).unwrap() == b"x");
}

#[test]
fn pipeline_cache_off_builds_none() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = device(dir.path(), Switch::Off);
    assert!(gpu.paths.pipeline_cache.as_ref().unwrap_err().contains("--pipeline-cache off"));
    assert_eq!(gpu.pipeline_cache_load(), None);
    build_plan(&gpu);
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "off wrote a file");
}
