//! Starts the gRPC server: JobService, WorkerService, health and reflection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rlhf_proto::job_service_server::JobServiceServer;
use rlhf_proto::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

use crate::auth::{self, Tokens};
use crate::scheduler::{Config, Handle};
use crate::service::{Jobs, Workers};

/// Largest worker message: a data-parallel part carries a whole adapter's
/// gradients (tens of MB for LoRA on a 0.5B model), above tonic's 4 MiB default.
pub const MAX_MESSAGE: usize = 1 << 30;

pub struct Options {
    pub data_dir: PathBuf,
    pub lease: Duration,
    /// Named client tokens (TOML `name = "token"`), besides the admin's.
    pub client_tokens: Option<PathBuf>,
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound
/// address through `bound` (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    opts: Options,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let tokens = Arc::new(Tokens::load(&opts.data_dir, opts.client_tokens.as_deref())?);
    let sched = Handle::spawn(Config { data_dir: opts.data_dir, lease: opts.lease })?;
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "coordinator listening");
    if let Some(b) = bound {
        let _ = b.send(local);
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<Jobs>>().await;
    health.set_serving::<WorkerServiceServer<Workers>>().await;
    // Both reflection versions: grpcurl ≤ 1.8 speaks v1alpha, newer clients v1.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(rlhf_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // Small gRPC replies must not wait for delayed ACKs (Nagle).
    let incoming = TcpListenerStream::new(listener).map(|s| s.and_then(|s| s.set_nodelay(true).map(|_| s)));
    // Health stays open (probes send no headers); everything else needs a token.
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection_v1, auth::clients(tokens.clone())))
        .add_service(InterceptedService::new(reflection_v1alpha, auth::clients(tokens.clone())))
        .add_service(JobServiceServer::with_interceptor(Jobs { sched: sched.clone() }, auth::clients(tokens.clone())))
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(Workers::new(sched))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            auth::workers(tokens),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
