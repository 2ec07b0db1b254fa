//! Generated code for the `rlhf.v1` gRPC package, behind a small re-export.

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("rlhf.v1");
}

pub use generated::*;

pub mod auth;
pub mod connect;

/// Encoded `FileDescriptorSet` for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rlhf_descriptor");

impl JobState {
    /// The lowercase name of a state, as the coordinator stores it and
    /// `--json` prints it.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Unspecified => "unknown",
        }
    }

    /// Whether a job in this state will never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

impl JobKind {
    /// The lowercase name a job file spells the kind with (the proto name
    /// without its `JOB_KIND_` prefix; "unspecified" for 0).
    pub fn name(self) -> String {
        self.as_str_name().trim_start_matches("JOB_KIND_").to_ascii_lowercase()
    }

    /// The kind a job file's lowercase name spells (`Unspecified` if none).
    pub fn from_name(name: &str) -> Self {
        Self::from_str_name(&format!("JOB_KIND_{}", name.to_ascii_uppercase())).unwrap_or(Self::Unspecified)
    }
}

impl Role {
    /// The lowercase name (the proto name without its `ROLE_` prefix).
    pub fn name(self) -> String {
        self.as_str_name().trim_start_matches("ROLE_").to_ascii_lowercase()
    }

    /// The role a lowercase name spells (`Unspecified` if none).
    pub fn from_name(name: &str) -> Self {
        Self::from_str_name(&format!("ROLE_{}", name.to_ascii_uppercase())).unwrap_or(Self::Unspecified)
    }
}
