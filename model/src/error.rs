//! Errors of the model crate; each variant names the file, tensor or
//! argument at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("unsupported architecture {0:?} (supported: llama, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("{path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    #[error("tensor {name}: expected shape {expected:?}, found {found:?} in {path}")]
    Shape { path: PathBuf, name: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("missing tensor {name} (looked in {path})")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tokenizer {path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("chat template {path}: {msg}")]
    ChatTemplate { path: PathBuf, msg: String },
    #[error("token id {id} out of range (vocab size {vocab})")]
    TokenOutOfRange { id: i64, vocab: i64 },
    #[error("adapter {path}: {msg}")]
    Adapter { path: PathBuf, msg: String },
    #[error("adapter: {0}")]
    AdapterState(String),
    #[error("{path}: {msg}")]
    Data { path: PathBuf, msg: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("CUDA graph: {0}")]
    CudaGraph(String),
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
