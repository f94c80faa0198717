//! The GPU side: adapter and device, typed buffers, the pipeline registry and dispatches.

mod context;
mod kernels;
mod tensor;
pub mod tune;

pub use context::{AdapterSummary, Gpu, GpuOptions, GpuStats, NoAdapterError, list_adapters};
pub use kernels::{Bind, Dispatch, Pass, SHADERS};
pub use tensor::Tensor;
