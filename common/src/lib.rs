//! rlhf-common: what every rlhfd crate shares — typed ids and telemetry.
//! The job schema joins it with the training-stages work.

pub mod ids;
pub mod telemetry;

pub use ids::{JobId, WorkerId};
pub use telemetry::init_tracing;
