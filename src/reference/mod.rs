//! The CPU oracle: every op, forward and backward, as plain loops in f64 — the definition of
//! correct. Written for clarity, not speed; comments point at the maths. Same names as
//! `ops/` and `shaders/`. The gradients here are themselves checked against central finite
//! differences (tests/gradcheck.rs).

// Index loops mirror the formulas' subscripts; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

pub mod add;
pub mod batch_norm;
pub mod cast;
pub mod clip_grad_norm;
pub mod conv2d;
pub mod cross_entropy;
pub mod grad_accum;
pub mod grad_scaler;
pub mod linear;
pub mod model;
pub mod model_ema;
pub mod optimizer;
pub mod pool;
pub mod relu;
pub mod se_block;
