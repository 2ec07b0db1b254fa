//! rlhf-common: what every rlhfd crate shares — typed ids, the job file
//! schema with its validation, and telemetry.

pub mod collective;
pub mod ids;
pub mod spec;
pub mod telemetry;

pub use ids::{JobId, WorkerId};
pub use spec::{JobKind, JobSpec, PeftMethod, SpecError};
pub use telemetry::init_tracing;
