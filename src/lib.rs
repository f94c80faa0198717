//! senet-wgpu: Squeeze-and-Excitation networks trained with WGSL compute shaders through wgpu.
//!
//! - [`gpu`]: adapter selection, typed buffers, the pipeline registry, dispatches.
//! - [`ops`]: host side of every kernel (shape checks, workgroup math, bind groups).
//! - [`reference`]: the CPU oracle every kernel is tested against.
//! - [`hparams`]: every default in one table; [`args`]: the flags that read it.
//! - [`train`]: the loop, over [`eval`] (the test-set pass, `eval`, `predict`), [`run`] (the
//!   run folder), [`metrics`], [`plot`] and [`progress`] (bars, the run's ETA). `tests/layering.rs` keeps the modules free of cycles.

pub mod args;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod eval;
pub mod excitations;
pub mod exit;
pub mod files;
pub mod gpu;
pub mod hparams;
pub mod metrics;
pub mod model;
pub mod onnx;
pub mod ops;
pub mod plot;
pub mod progress;
pub mod reference;
pub mod run;
pub mod summary;
pub mod train;
