//! senet-wgpu: Squeeze-and-Excitation networks trained with WGSL compute shaders through wgpu.
//!
//! - [`gpu`]: adapter selection, typed buffers, the pipeline registry, dispatches.
//! - [`ops`]: host side of every kernel (shape checks, workgroup math, bind groups).
//! - [`reference`]: the CPU oracle every kernel is tested against.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod excitations;
pub mod gpu;
pub mod model;
pub mod onnx;
pub mod ops;
pub mod plot;
pub mod reference;
pub mod summary;
pub mod train;
