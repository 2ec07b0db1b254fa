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
use crate::http::GrpcStats;
use crate::scheduler::{Config, Handle};
use crate::service::{Jobs, Workers};

/// Largest worker message (64 MiB): above tonic's 4 MiB default for
/// data-parallel sums, which workers send in rounds of 32 MiB, and for a
/// rollout batch with the policy adapter's tensors.
pub const MAX_MESSAGE: usize = 64 << 20;

pub struct Options {
    pub data_dir: PathBuf,
    pub lease: Duration,
    /// Named client tokens (TOML `name = "token"`), besides the admin's.
    pub client_tokens: Option<PathBuf>,
    /// Roots job files may read models and data from (empty: anywhere).
    pub allow_read: Vec<PathBuf>,
    /// TLS: the server's certificate chain and key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Where to serve HTTP (`/metrics`), if anywhere.
    pub http: Option<SocketAddr>,
    /// Fail jobs whose placement the connected workers can never meet.
    pub fail_unplaceable: bool,
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound
/// address through `bound` (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    opts: Options,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    if opts.tls.is_none() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "--listen {addr}: beyond loopback the coordinator serves only TLS; give --tls-cert and --tls-key \
             (or listen on 127.0.0.1)"
        );
    }
    let _lock = lock_data_dir(&opts.data_dir)?;
    // Job dirs sent to workers are absolute, whatever the working directories.
    let mut opts = opts;
    opts.data_dir = std::fs::canonicalize(&opts.data_dir)
        .map_err(|e| anyhow::anyhow!("--data-dir {}: {e}", opts.data_dir.display()))?;
    let tokens = Arc::new(Tokens::load(&opts.data_dir, opts.client_tokens.as_deref())?);
    let sched = Handle::spawn(Config {
        data_dir: opts.data_dir,
        lease: opts.lease,
        allow_read: opts.allow_read,
        fail_unplaceable: opts.fail_unplaceable,
    })?;
    let listener = TcpListener::bind(addr).await?;
    let grpc = Arc::new(GrpcStats::default());
    if let Some(h) = opts.http {
        let l = crate::http::bind(h).await?;
        tracing::info!(addr = %l.local_addr()?, "serving /metrics");
        tokio::spawn(crate::http::serve(l, sched.clone(), tokens.clone(), grpc.clone()));
    }
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
    // A scheduler that died (a panic) stops the server: health must not say
    // SERVING for a coordinator that places nothing; a supervisor restarts it.
    let (died_tx, mut died_rx) = tokio::sync::oneshot::channel();
    let watch = sched.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = watch.stopped() => {
                let _ = died_tx.send(());
            }
        }
    };
    // Health stays open (probes send no headers); everything else needs a token.
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &opts.tls {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| anyhow::anyhow!("TLS {}: {e}", p.display()));
        let identity = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
        tracing::info!(cert = %cert.display(), "serving TLS");
    }
    builder
        .concurrency_limit_per_connection(256)
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection_v1, auth::clients(tokens.clone())))
        .add_service(InterceptedService::new(reflection_v1alpha, auth::clients(tokens.clone())))
        .add_service(JobServiceServer::with_interceptor(
            Jobs { sched: sched.clone(), grpc: grpc.clone() },
            auth::clients(tokens.clone()),
        ))
        .add_service(InterceptedService::new(
            WorkerServiceServer::new(Workers::new(sched, grpc))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            auth::workers(tokens),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    if died_rx.try_recv().is_ok() {
        anyhow::bail!("the scheduler stopped (see the log above); exiting");
    }
    Ok(())
}

/// Takes an exclusive lock on the data dir for this process's life: a
/// second coordinator on the same dir would dispatch the same jobs.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let path = dir.join("coordinator.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "{} is in use by another coordinator (lock {}); stop it or pick another --data-dir",
            dir.display(),
            path.display()
        );
    }
    Ok(f)
}
