//! `rlhf-coordinator --listen ADDR --data-dir DIR`: the job scheduler daemon.
//! Settings come from flags, `RLHF_*` environment variables, or a TOML file
//! (`--config`), in that order of precedence.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rlhf_coordinator::server::{serve, Options};

#[derive(Parser)]
#[command(name = "rlhf-coordinator", version, about = "rlhfd coordinator: schedules jobs on workers over gRPC")]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "RLHF_LISTEN")]
    listen: Option<SocketAddr>,
    /// Durable state (state.db) and job outputs (jobs/<id>/).
    #[arg(long, env = "RLHF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A worker with no heartbeat for this long is lost and its jobs requeued.
    #[arg(long, env = "RLHF_LEASE_MS")]
    lease_ms: Option<u64>,
    /// Named client tokens: a TOML file of `name = "token"` lines (the admin
    /// token is <data-dir>/admin.token, made on first start).
    #[arg(long, env = "RLHF_CLIENT_TOKENS")]
    client_tokens: Option<PathBuf>,
    /// Fail a job at once when the connected workers can never meet its
    /// placement (for a batch allocation, whose workers are all there).
    #[arg(long, env = "RLHF_FAIL_UNPLACEABLE")]
    fail_unplaceable: bool,
    /// Serve HTTP here: the dashboard and `/metrics` (Prometheus text).
    #[arg(long, env = "RLHF_HTTP")]
    http: Option<SocketAddr>,
    /// TLS certificate chain (PEM); needed to listen beyond loopback.
    #[arg(long, env = "RLHF_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "RLHF_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A directory job files may read models and data from (repeat for
    /// more; default: anywhere the workers can read).
    #[arg(long = "allow-read", value_name = "DIR")]
    allow_read: Vec<PathBuf>,
    /// Optional TOML file with listen / data_dir / lease_ms / client_tokens.
    #[arg(long, env = "RLHF_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    lease_ms: Option<u64>,
    client_tokens: Option<PathBuf>,
    #[serde(default)]
    allow_read: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    rlhf_common::unset_empty_rlhf_env();
    rlhf_common::init_tracing();
    let cli = Cli::parse();
    let file: FileConfig = match &cli.config {
        Some(p) => config::Config::builder()
            .add_source(config::File::from(p.as_path()))
            .build()
            .and_then(|c| c.try_deserialize())
            .with_context(|| format!("config file {}", p.display()))?,
        None => {
            FileConfig { listen: None, data_dir: None, lease_ms: None, client_tokens: None, allow_read: Vec::new() }
        }
    };
    let listen = cli.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051)));
    let data_dir = cli.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("rlhfd-data"));
    let lease = Duration::from_millis(cli.lease_ms.or(file.lease_ms).unwrap_or(5000));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            tracing::info!("shutting down");
        };
        let client_tokens = cli.client_tokens.or(file.client_tokens);
        let allow_read = if cli.allow_read.is_empty() { file.allow_read } else { cli.allow_read };
        let tls = cli.tls_cert.zip(cli.tls_key);
        let (http, fail_unplaceable) = (cli.http, cli.fail_unplaceable);
        let opts = Options { data_dir, lease, client_tokens, allow_read, tls, http, fail_unplaceable };
        serve(listen, opts, None, shutdown).await
    })
}
