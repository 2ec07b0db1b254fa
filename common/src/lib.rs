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

/// Unsets every `RLHF_*` environment variable that is set but empty, so that
/// `RLHF_TLS_CA=` in an env file means "none" to the flag that reads it
/// (clap takes an empty value for a missing argument). The binaries call it
/// first thing in `main`, before any other thread exists.
pub fn unset_empty_rlhf_env() {
    let empty: Vec<std::ffi::OsString> = std::env::vars_os()
        .filter(|(k, v)| v.is_empty() && k.to_string_lossy().starts_with("RLHF_"))
        .map(|(k, _)| k)
        .collect();
    for k in empty {
        std::env::remove_var(k);
    }
}
