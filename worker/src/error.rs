//! Errors of the worker library; each variant names the step that failed.
//! Model and adapter errors come from rlhf-model unchanged.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {msg}")]
    DataLine { path: PathBuf, line: usize, msg: String },
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("data parallel: {0}")]
    Collective(String),
    #[error("cancelled")]
    Cancelled,
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("role host: {0}")]
    RoleHost(String),
    /// A rollout worker went away; its calls are void (the trainer
    /// regenerates their share elsewhere).
    #[error("rollout worker {target}: {msg}")]
    RolloutLost { target: usize, msg: String },
    #[error(transparent)]
    Model(#[from] rlhf_model::Error),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the failure is the cluster's rather than the job's, so that
    /// running the job again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::RoleHost(_) | Error::RolloutLost { .. } | Error::Collective(_))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
