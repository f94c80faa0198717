//! The CPU oracle: every op, forward and backward, as plain loops in f64 — the definition of
//! correct. Written for clarity, not speed; comments point at the maths. Each op's oracle lives in
//! its folder beside the host code (`ops/<op>/reference.rs`) and is re-exported here under the
//! op's name; [`model`] composes them into a whole training step. The gradients are themselves
//! checked against central finite differences (tests/gradcheck.rs).

pub use crate::ops::add::reference as add;
pub use crate::ops::batch_norm::reference as batch_norm;
pub use crate::ops::bn_fold::reference as bn_fold;
pub use crate::ops::cast::reference as cast;
pub use crate::ops::clip_grad_norm::reference as clip_grad_norm;
pub use crate::ops::conv2d::reference as conv2d;
pub use crate::ops::cross_entropy::reference as cross_entropy;
pub use crate::ops::grad_accum::reference as grad_accum;
pub use crate::ops::grad_scaler::reference as grad_scaler;
pub use crate::ops::linear::reference as linear;
pub use crate::ops::model_ema::reference as model_ema;
pub use crate::ops::optimizer::reference as optimizer;
pub use crate::ops::pool::reference as pool;
pub use crate::ops::relu::reference as relu;
pub use crate::ops::se_block::reference as se_block;
pub mod model;
