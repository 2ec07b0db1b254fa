//! rlhf-common: what every rlhfd crate shares — typed ids, the job file
//! schema with its validation, and telemetry.

pub mod collective;
pub mod ids;
pub mod role;
pub mod spec;
pub mod telemetry;

pub use ids::{JobId, WorkerId};
pub use role::Role;
pub use spec::{JobFileError, JobKind, JobSpec, PeftMethod, SpecError};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
pub use telemetry::init_tracing;
