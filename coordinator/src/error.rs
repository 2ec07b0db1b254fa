//! One closed error enum for the coordinator, mapped to `tonic::Code` in
//! exactly one place.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("store: {0}")]
    Store(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("coordinator is shutting down")]
    Unavailable,
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Store(_) => tonic::Code::Internal,
            Error::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Error::Unavailable => tonic::Code::Unavailable,
        };
        tonic::Status::new(code, e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
