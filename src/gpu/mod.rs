//! The GPU side: adapter and device, typed buffers, the pipeline registry and dispatches.

mod context;
mod kernels;
pub mod paths;
pub mod pipeline_cache;
mod tensor;
pub mod tune;

pub use context::{
    AdapterSummary, ConvForm, Fuse, Gpu, GpuOptions, GpuStats, NoAdapterError, Subgroups, list_adapters,
};
pub use kernels::{
    Bind, CONV_GEMM_PART, CONV_OWN_PART, CONV_PARAMS_PART, COOP_SHADERS, Dispatch, LANE_SHADERS, POOL_WINDOW_PART,
    PRELUDE_SUBGROUP, PRELUDE_WORKGROUP, Pass, Precision, SE_WEIGHT_GRAD_PART, SHADERS, coop_prelude, shader_source,
};
pub use paths::{Need, Paths, Switch};
pub use tensor::{Dtype, Element, Tensor};
