//! `rlhfctl`, the client CLI: command-line definitions and one function per
//! command. `src/main.rs` only parses and reports errors.
//!
//! Conventions: every read command takes `--json`; errors go to stderr as
//! one `error: …` line with exit status 1; `submit` prints the job id as its
//! last stdout line; `watch` and `submit --wait` exit 0 only when the job
//! succeeded. `JOB` is a job id, a unique id prefix, or a job name (the
//! newest job of that name).

pub mod client;
pub mod cluster;
pub mod dry_run;
pub mod local;
pub mod placement;
pub mod plot;
pub mod render;
pub mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use rlhf_common::{now_ms, JobSpec};
use rlhf_proto::JobState;
use serde_json::{json, Value};

use client::Client;
use render::job_state;

pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

#[derive(Debug, Parser)]
#[command(
    name = "rlhfctl",
    version,
    about = "Drive an rlhfd cluster: submit and follow RLHF jobs",
    propagate_version = true
)]
pub struct Cli {
    /// The coordinator's gRPC address.
    #[arg(long, global = true, env = "RLHF_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Client token (default: RLHF_TOKEN_FILE, else the local cluster's
    /// <data-dir>/admin.token).
    #[arg(long, global = true, env = "RLHF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) an https:// coordinator's certificate chains to.
    #[arg(long, global = true, env = "RLHF_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Args)]
pub struct DataDirArg {
    /// The local cluster's directory: cluster.json, logs/, and the
    /// coordinator's state.db and jobs/. Default: $XDG_DATA_HOME/rlhfd or
    /// ~/.local/share/rlhfd.
    #[arg(long, env = "RLHF_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataDirArg {
    fn resolve(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(cluster::default_data_dir)
    }
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Start a local cluster in the background: a coordinator plus one
    /// worker per GPU (`nvidia-smi -L`, `CUDA_VISIBLE_DEVICES`), or N CPU workers.
    Up {
        /// Start N CPU workers (cpu-0 … cpu-N-1) instead of one per GPU.
        #[arg(long, value_name = "N")]
        cpu_workers: Option<usize>,
        #[command(flatten)]
        data_dir: DataDirArg,
        /// Where the coordinator listens. Default: the address of --coordinator.
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
        /// Seconds to wait for the coordinator and every worker.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Stop the local cluster: SIGTERM, then SIGKILL after --grace seconds.
    Down {
        #[command(flatten)]
        data_dir: DataDirArg,
        #[arg(long, default_value_t = 10)]
        grace: u64,
    },
    /// Validate a job file locally and submit it; prints the job id.
    Submit {
        file: PathBuf,
        /// Follow the job until it ends; exit non-zero unless it succeeded.
        #[arg(long)]
        wait: bool,
        /// Idempotency key: submitting twice with one id yields one job.
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
        /// f32, bf16 or f16: overrides the job's model.dtype.
        #[arg(long)]
        dtype: Option<String>,
        /// Fit the job's [placement] to the workers connected now (names
        /// that are absent become any worker; roles beyond the workers fold
        /// onto the trainer); prints what changed. For batch allocations.
        #[arg(long)]
        fit_placement: bool,
        /// Check the job as the coordinator will (validation, paths,
        /// names; placement against --workers) and print its stages;
        /// contact no coordinator, start nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: the workers that will be connected (e.g.
        /// cpu-0,cpu-1); the placement must be met by them.
        #[arg(long, value_delimiter = ',', requires = "dry_run")]
        workers: Option<Vec<String>>,
        /// With --dry-run: the coordinator's --allow-read roots.
        #[arg(long = "allow-read", value_name = "DIR", requires = "dry_run")]
        allow_read: Vec<PathBuf>,
        /// With --dry-run: print the plan as JSON.
        #[arg(long, requires = "dry_run")]
        json: bool,
    },
    /// The job table, or one job in detail.
    Status {
        job: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Follow a job until it ends; exit non-zero unless it succeeded.
    Watch { job: String },
    /// The job table.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job.
    Cancel {
        job: String,
        #[arg(long)]
        json: bool,
    },
    /// Registered workers.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// A job's state changes, then its metrics records (one JSON object per line).
    Logs {
        job: String,
        #[arg(long)]
        json: bool,
        /// Only the last N metrics records (fetched in pages either way).
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
    },
    /// Print a job's report and draw reward, KL and loss curves as PNG files.
    Report {
        job: String,
        /// Output directory. Default: ./report-<job id>.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

/// Exit status of a follow-the-job command.
fn exit_for(state: JobState) -> ExitCode {
    match state {
        JobState::Succeeded => ExitCode::SUCCESS,
        JobState::Failed | JobState::Cancelled | JobState::Queued | JobState::Running | JobState::Unspecified => {
            ExitCode::from(1)
        }
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let url = cli.coordinator;
    if let Some(t) = cli.token.filter(|t| !t.is_empty()) {
        let _ = local::TOKEN.set(t);
    }
    if let Some(ca) = cli.tls_ca {
        let _ = local::TLS_CA.set(ca);
    }
    match cli.command {
        Cmd::Up { cpu_workers, data_dir, listen, timeout } => {
            let listen = listen
                .or_else(|| cluster::listen_from_url(&url))
                .ok_or_else(|| anyhow!("cannot listen on the address of {url}; give --listen ADDR"))?;
            up(cluster::UpOptions {
                data_dir: data_dir.resolve(),
                listen,
                cpu_workers,
                timeout: Duration::from_secs(timeout),
            })
            .await
        }
        Cmd::Down { data_dir, grace } => down(&data_dir.resolve(), Duration::from_secs(grace)),
        Cmd::Submit { file, dtype, dry_run: true, workers, allow_read, json, .. } => {
            let mut spec = JobSpec::load(&file)?;
            if let Some(d) = dtype {
                spec.override_dtype(&d).map_err(|e| anyhow!("--dtype: {e}"))?;
            }
            let spec = dry_run::check(&spec, &allow_read, workers.as_deref())
                .map_err(|e| anyhow!("{}: {e:#}", file.display()))?;
            let steps = dry_run::plan(&spec);
            if json {
                print_json(&dry_run::json(&spec, &steps));
            } else {
                print!("{}", dry_run::render(&spec, &steps));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Submit { file, wait, request_id, dtype, fit_placement, .. } => {
            let how = SubmitOpts { wait, request_id: request_id.unwrap_or_default(), dtype, fit_placement };
            submit(&url, &file, how).await
        }
        Cmd::Status { job: Some(job), json } => status_one(&url, &job, json).await,
        Cmd::Status { job: None, json } | Cmd::List { json } => list(&url, json).await,
        Cmd::Watch { job } => {
            let mut c = Client::connect(&url).await?;
            let id = c.resolve(&job).await?;
            let job = watch::watch(&mut c, &id, watch::Sink::Stdout).await?;
            Ok(exit_for(job_state(&job)))
        }
        Cmd::Cancel { job, json } => {
            let mut c = Client::connect(&url).await?;
            let id = c.resolve(&job).await?;
            let j = c.cancel(&id).await?;
            if json {
                print_json(&render::job_json(&j));
            } else {
                println!("job {} {}", j.job_id, job_state(&j).name());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Workers { json } => {
            let mut c = Client::connect(&url).await?;
            let workers = c.workers().await?;
            if json {
                print_json(&Value::Array(workers.iter().map(render::worker_json).collect()));
            } else if workers.is_empty() {
                eprintln!("no workers registered at {url}");
            } else {
                print!("{}", render::workers_table(&workers, now_ms()));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Logs { job, json, tail } => logs(&url, &job, json, tail).await,
        Cmd::Report { job, out, json } => report(&url, &job, out, json).await,
    }
}

async fn up(opts: cluster::UpOptions) -> Result<ExitCode> {
    let n = opts.cpu_workers;
    let c = cluster::up(opts).await?;
    let workers: Vec<String> =
        c.processes.iter().filter(|p| !p.device.is_empty()).map(|p| format!("{} ({})", p.name, p.device)).collect();
    let rows: Vec<Vec<String>> = c
        .processes
        .iter()
        .map(|p| vec![p.name.clone(), p.pid.to_string(), p.device.clone(), p.log.display().to_string()])
        .collect();
    print!("{}", render::table(&["PROCESS", "PID", "DEVICE", "LOG"], &rows));
    println!("coordinator at {} with {} workers: {}", c.coordinator_url, workers.len(), workers.join(", "));
    if n.is_none() && workers.iter().all(|w| w.ends_with("(cpu)")) {
        eprintln!("no GPU found (nvidia-smi -L); started one CPU worker. Use --cpu-workers N for more.");
    }
    let flag = if c.coordinator_url == DEFAULT_COORDINATOR {
        String::new()
    } else {
        format!(" (set RLHF_COORDINATOR={})", c.coordinator_url)
    };
    println!("data dir {}; stop with `rlhfctl down --data-dir {}`{flag}", c.data_dir.display(), c.data_dir.display());
    if c.data_dir != cluster::default_data_dir()
        && std::env::var_os("RLHF_DATA_DIR").is_none_or(|d| c.data_dir != Path::new(&d))
    {
        println!(
            "clients need its token: export RLHF_DATA_DIR={} (or RLHF_TOKEN=$(cat {}/admin.token))",
            c.data_dir.display(),
            c.data_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn down(data_dir: &Path, grace: Duration) -> Result<ExitCode> {
    match cluster::down(data_dir, grace)? {
        None => eprintln!("no local cluster in {} (no {}); nothing to stop", data_dir.display(), cluster::CLUSTER_FILE),
        Some(stopped) => {
            for (p, how) in stopped {
                let how = match how {
                    cluster::Stopped::NotRunning => "was not running",
                    cluster::Stopped::Terminated => "stopped",
                    cluster::Stopped::Killed => "killed after the grace period",
                };
                println!("{} (pid {}) {how}", p.name, p.pid);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct SubmitOpts {
    wait: bool,
    request_id: String,
    dtype: Option<String>,
    fit_placement: bool,
}

async fn submit(url: &str, file: &Path, opts: SubmitOpts) -> Result<ExitCode> {
    let SubmitOpts { wait, request_id, dtype, fit_placement } = opts;
    let mut spec = JobSpec::load(file)?;
    if let Some(d) = dtype {
        spec.override_dtype(&d).map_err(|e| anyhow!("--dtype: {e}"))?;
    }
    let mut c = Client::connect(url).await?;
    let alive: Vec<String> = match c.workers().await {
        Ok(workers) => workers.into_iter().filter(|w| w.alive).map(|w| w.name).collect(),
        Err(e) if fit_placement => return Err(e.context("--fit-placement: listing the workers")),
        Err(_) => Vec::new(),
    };
    if fit_placement {
        for note in placement::fit_placement(&mut spec.placement, &alive) {
            eprintln!("fitted: {note}");
        }
    }
    let text = spec.to_toml();
    if text.is_empty() {
        bail!("{}: the job could not be written back as TOML", file.display());
    }
    let r = c.submit(text, request_id.clone()).await?;
    let name = spec.name.clone().unwrap_or_else(|| spec.kind.name().to_string());
    if r.created {
        eprintln!("submitted {} job {name:?}", spec.kind.name());
    } else {
        eprintln!("request id {request_id:?} already submitted: job {}", r.job_id);
    }
    println!("{}", r.job_id);
    for w in placement::placement_warnings(&spec, &alive) {
        eprintln!("warning: {w}");
    }
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let job = watch::watch(&mut c, &r.job_id, watch::Sink::Stderr).await?;
    Ok(exit_for(job_state(&job)))
}

async fn list(url: &str, json: bool) -> Result<ExitCode> {
    let mut c = Client::connect(url).await?;
    let jobs = c.list().await?;
    if json {
        print_json(&Value::Array(jobs.iter().map(render::job_json).collect()));
    } else if jobs.is_empty() {
        eprintln!("no jobs; submit one with `rlhfctl submit FILE.toml`");
    } else {
        let names = c.worker_names().await;
        print!("{}", render::jobs_table(&jobs, &names, now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

async fn status_one(url: &str, job: &str, json: bool) -> Result<ExitCode> {
    let mut c = Client::connect(url).await?;
    let id = c.resolve(job).await?;
    let j = c.get(&id).await?;
    if json {
        print_json(&render::job_json(&j));
    } else {
        let names = c.worker_names().await;
        print!("{}", render::job_detail(&j, &names, now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

async fn logs(url: &str, job: &str, json: bool, tail: Option<u64>) -> Result<ExitCode> {
    let mut c = Client::connect(url).await?;
    let id = c.resolve(job).await?;
    let l = c.logs(&id, tail).await?;
    if json {
        let metrics: Vec<Value> =
            l.metrics_json.iter().map(|m| serde_json::from_str(m).unwrap_or(Value::String(m.clone()))).collect();
        print_json(&json!({
            "id": id,
            "events": l.events.iter().map(render::event_json).collect::<Vec<_>>(),
            "metrics": metrics,
            "report_markdown": l.report_markdown,
        }));
    } else {
        for e in &l.events {
            println!("{}", render::event_line(e));
        }
        for m in &l.metrics_json {
            println!("{m}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn report(url: &str, job: &str, out: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let mut c = Client::connect(url).await?;
    let id = c.resolve(job).await?;
    let l = c.logs(&id, None).await?;
    let dir = out.unwrap_or_else(|| PathBuf::from(format!("report-{id}")));
    let (plots, skipped) = plot::write_plots(&l.metrics_json, &dir)?;
    let report_path = (!l.report_markdown.is_empty()).then(|| dir.join("report.md"));
    if let Some(p) = &report_path {
        std::fs::write(p, &l.report_markdown).with_context(|| format!("failed to write {}", p.display()))?;
    }
    if json {
        print_json(&json!({
            "id": id,
            "report_markdown": l.report_markdown,
            "report_path": report_path,
            "plots": plots,
            "skipped": skipped,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    match &report_path {
        Some(_) => {
            print!("{}", l.report_markdown);
            if !l.report_markdown.ends_with('\n') {
                println!();
            }
            println!();
        }
        None => eprintln!("job {id} has no report.md yet (eval and pipeline jobs write one when they finish)"),
    }
    for s in &skipped {
        eprintln!("no metrics for {s}; not drawn");
    }
    for p in report_path.iter().chain(&plots) {
        println!("{}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_commands() {
        let cli = Cli::try_parse_from(["rlhfctl", "--coordinator", "http://h:1", "status", "abc", "--json"]).unwrap();
        assert_eq!(cli.coordinator, "http://h:1");
        assert!(matches!(cli.command, Cmd::Status { job: Some(ref j), json: true } if j == "abc"));
        let cli = Cli::try_parse_from(["rlhfctl", "up", "--cpu-workers", "2"]).unwrap();
        assert!(matches!(cli.command, Cmd::Up { cpu_workers: Some(2), .. }));
        let cli = Cli::try_parse_from(["rlhfctl", "submit", "x.toml", "--wait", "--request-id", "r1"]).unwrap();
        assert!(matches!(cli.command, Cmd::Submit { wait: true, request_id: Some(ref r), .. } if r == "r1"));
    }

    #[test]
    fn only_success_exits_zero() {
        assert_eq!(exit_for(JobState::Succeeded), ExitCode::SUCCESS);
        assert_eq!(exit_for(JobState::Failed), ExitCode::from(1));
        assert_eq!(exit_for(JobState::Cancelled), ExitCode::from(1));
    }
}
