//! Generated code for the `rlhf.v1` gRPC package, behind a small re-export.

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("rlhf.v1");
}

pub use generated::*;

/// Encoded `FileDescriptorSet` for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("rlhf_descriptor");
