//! The worker daemon (`rlhf-worker serve`): registers with the coordinator,
//! heartbeats, runs assigned jobs on their own threads (never on the async
//! runtime), streams their progress and results, and reconnects whenever
//! the coordinator goes away — reporting what it still runs, so a restarted
//! coordinator keeps those jobs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rlhf_common::spec::JobSpec;
use rlhf_proto::auth::Bearer;
use rlhf_proto::worker_service_client::WorkerServiceClient;
use rlhf_proto::*;
use tch::Device;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::train::metrics::Observer;
use crate::train::ppo::roles::RemoteRoles;
use crate::train::run::{run_job_with, RunOptions};

pub struct Options {
    pub coordinator: String,
    pub device: Device,
    pub device_name: String,
    pub name: String,
    pub heartbeat: Duration,
    /// Where the worker token is (else `RLHF_WORKER_TOKEN`).
    pub token_file: Option<PathBuf>,
    /// The CA an `https://` coordinator's certificate chains to.
    pub tls_ca: Option<PathBuf>,
}

/// The worker token, read afresh at every connect (the coordinator makes
/// the file on its first start, maybe after this worker started).
fn worker_token(opts: &Options) -> anyhow::Result<Bearer> {
    let token = match &opts.token_file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?,
        None => std::env::var("RLHF_WORKER_TOKEN").unwrap_or_default(),
    };
    if token.trim().is_empty() {
        return Ok(Bearer::none());
    }
    Bearer::new(&token).map_err(|e| anyhow::anyhow!("worker token: {e}"))
}

mod collective;
mod roles;
pub mod wire;

/// What the daemon's threads share.
#[derive(Default)]
struct State {
    /// Jobs running here, with their cancel flags.
    jobs: HashMap<String, Arc<AtomicBool>>,
    /// Jobs whose reward/critic roles are hosted here: calls go to the host thread.
    role_hosts: HashMap<String, (u32, std::sync::mpsc::Sender<RoleCall>)>,
    /// Jobs this worker generates rollouts for (as rollout worker `.0`).
    rollout_hosts: HashMap<String, (u32, std::sync::mpsc::Sender<RoleCall>)>,
    /// Trainer jobs here that wait for role replies.
    role_replies: HashMap<String, std::sync::mpsc::Sender<RoleReply>>,
    /// Data-parallel jobs here: their rank, world and result channel.
    ranks: HashMap<String, (RankJob, std::sync::mpsc::Sender<CollectiveResult>)>,
    /// Each rank's unanswered collective part, sent again after a reconnect.
    outstanding: HashMap<String, WorkerMessage>,
    /// Each trainer's unanswered role calls, sent again after a reconnect
    /// (a host answers a repeated call from its cache, never runs it twice).
    calls: HashMap<(String, u64), WorkerMessage>,
}

impl State {
    /// Drops everything kept for a job that ended here (or never started).
    fn forget(&mut self, job_id: &str) {
        self.jobs.remove(job_id);
        self.role_replies.remove(job_id);
        self.ranks.remove(job_id);
        self.outstanding.remove(job_id);
        self.calls.retain(|(job, _), _| job != job_id);
    }
}

type Running = Arc<Mutex<State>>;

/// What this worker runs, for Register and every Heartbeat.
fn worker_jobs(running: &Running) -> WorkerJobs {
    running
        .lock()
        .map(|m| WorkerJobs {
            running: m.jobs.keys().cloned().collect(),
            roles: m
                .role_hosts
                .keys()
                .map(|id| HostedRoles {
                    job_id: id.clone(),
                    roles: vec![Role::Reward as i32, Role::Critic as i32],
                    target: 0,
                })
                .chain(m.rollout_hosts.iter().map(|(id, (target, _))| HostedRoles {
                    job_id: id.clone(),
                    roles: vec![Role::Rollout as i32],
                    target: *target,
                }))
                .collect(),
            ranks: m.ranks.values().map(|(r, _)| r.clone()).collect(),
        })
        .unwrap_or_default()
}

/// The text of a caught panic.
pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("MemTotal:")).map(String::from))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

/// Lowers this thread's scheduling priority by 10 (nice), so training on it
/// (and the torch threads it starts, which inherit it) yields the cores to
/// the daemon's own threads: heartbeats and messages are never late behind
/// training that saturates every core.
pub(crate) fn yield_to_daemon() {
    // SAFETY: getpriority/setpriority on this thread's own id.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        if *libc::__errno_location() == 0 && libc::setpriority(libc::PRIO_PROCESS, tid, (nice + 10).min(19)) != 0 {
            warn!(error = %std::io::Error::last_os_error(), "cannot lower a job thread's priority");
        }
    }
}

/// Runs the daemon until the process is stopped.
pub fn serve(opts: Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(session_loop(opts))
}

async fn session_loop(opts: Options) -> anyhow::Result<()> {
    let worker_id = rlhf_common::WorkerId::new().to_string();
    // Proves on every reconnect that this is the process that holds `worker_id`.
    let session_key = rlhf_common::ids::random_hex(32)?;
    let running: Running = Arc::default();
    // Job threads report here; messages wait while the coordinator is away.
    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<WorkerMessage>();
    let mut pending: Option<WorkerMessage> = None;
    info!(worker = %worker_id, name = %opts.name, device = %opts.device_name, "worker starting");
    loop {
        let bearer = match worker_token(&opts) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "no worker token yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let channel = rlhf_proto::connect::connect(&opts.coordinator, opts.tls_ca.as_deref()).await;
        let mut client = match channel {
            // Data-parallel parts carry whole adapter gradients (see the coordinator's MAX_MESSAGE).
            Ok(ch) => WorkerServiceClient::with_interceptor(ch, bearer)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            Err(e) => {
                warn!(coordinator = %opts.coordinator, error = %e, "cannot reach coordinator; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let (tx, rx) = mpsc::channel::<WorkerMessage>(256);
        let register = Register {
            worker_id: worker_id.clone(),
            name: opts.name.clone(),
            device: opts.device_name.clone(),
            memory_bytes: memory_bytes(),
            jobs: Some(worker_jobs(&running)),
            session_key: session_key.clone(),
        };
        let _ = tx.send(WorkerMessage { msg: Some(worker_message::Msg::Register(register)) }).await;
        let unanswered: Vec<WorkerMessage> = running
            .lock()
            .map(|m| m.outstanding.values().chain(m.calls.values()).cloned().collect())
            .unwrap_or_default();
        for m in unanswered {
            let _ = tx.send(m).await;
        }
        let mut inbound = match client.session(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                warn!(error = %e, "coordinator refused the session; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        info!(coordinator = %opts.coordinator, "registered");
        let mut hb = tokio::time::interval(opts.heartbeat);
        loop {
            if let Some(m) = pending.take() {
                if tx.send(m.clone()).await.is_err() {
                    pending = Some(m);
                    break;
                }
            }
            tokio::select! {
                _ = hb.tick() => {
                    let m = WorkerMessage { msg: Some(worker_message::Msg::Heartbeat(Heartbeat { jobs: Some(worker_jobs(&running)) })) };
                    if tx.send(m).await.is_err() { break; }
                }
                ev = events_rx.recv() => {
                    let Some(m) = ev else { break };
                    if tx.send(m.clone()).await.is_err() { pending = Some(m); break; }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => handle(m, &opts, &running, &events_tx),
                    Ok(None) | Err(_) => break,
                },
            }
        }
        warn!("coordinator connection lost; reconnecting");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn handle(m: CoordinatorMessage, opts: &Options, running: &Running, events: &mpsc::UnboundedSender<WorkerMessage>) {
    match m.msg {
        Some(coordinator_message::Msg::Assign(a)) => start_job(a, opts.device, running, events),
        Some(coordinator_message::Msg::AssignRoles(a)) => roles::start_host(a, opts.device, running, events),
        Some(coordinator_message::Msg::Cancel(c)) => {
            let Ok(mut st) = running.lock() else { return };
            if let Some(flag) = st.jobs.get(&c.job_id) {
                info!(job_id = %c.job_id, "cancelling");
                flag.store(true, Ordering::Relaxed);
            }
            if st.role_hosts.remove(&c.job_id).is_some() | st.rollout_hosts.remove(&c.job_id).is_some() {
                info!(job_id = %c.job_id, "releasing hosted roles");
            }
        }
        Some(coordinator_message::Msg::RoleCall(call)) => {
            let rollout = call.role == Role::Rollout as i32;
            let host = running.lock().ok().and_then(|st| {
                let hosts = if rollout { &st.rollout_hosts } else { &st.role_hosts };
                hosts.get(&call.job_id).map(|(_, tx)| tx.clone())
            });
            match host {
                Some(tx) => {
                    let _ = tx.send(call);
                }
                None => {
                    let _ = events.send(WorkerMessage {
                        msg: Some(worker_message::Msg::RoleReply(RoleReply {
                            job_id: call.job_id.clone(),
                            call_id: call.call_id,
                            error: format!("no roles hosted here for job {}", call.job_id),
                            tensors: Vec::new(),
                            role: call.role,
                            target: call.target,
                            // A rollout worker that no longer has the job (it restarted):
                            // its share goes elsewhere.
                            lost: rollout,
                        })),
                    });
                }
            }
        }
        Some(coordinator_message::Msg::RoleReply(reply)) => {
            if let Some(tx) = running.lock().ok().and_then(|st| st.role_replies.get(&reply.job_id).cloned()) {
                let _ = tx.send(reply);
            }
        }
        Some(coordinator_message::Msg::CollectiveResult(r)) => {
            if let Some(tx) = running.lock().ok().and_then(|st| st.ranks.get(&r.job_id).map(|(_, tx)| tx.clone())) {
                let _ = tx.send(r);
            }
        }
        None => {}
    }
}

fn start_job(a: AssignTask, device: Device, running: &Running, events: &mpsc::UnboundedSender<WorkerMessage>) {
    let attempt = a.attempt;
    let cancel = Arc::new(AtomicBool::new(false));
    {
        let Ok(mut m) = running.lock() else { return };
        if m.jobs.contains_key(&a.job_id) {
            return; // already running it (a duplicate assignment after a reconnect)
        }
        m.jobs.insert(a.job_id.clone(), cancel.clone());
    }
    let remote = if a.remote_roles || a.rollout_workers > 0 {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut m) = running.lock() {
            m.role_replies.insert(a.job_id.clone(), tx);
        }
        Some(roles::ChannelRoles::new(&a, events.clone(), rx, cancel.clone(), running.clone()))
    } else {
        None
    };
    let (rank, world) = (a.rank as usize, a.world.max(1) as usize);
    let relay = (world > 1).then(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        if let Ok(mut m) = running.lock() {
            m.ranks.insert(
                a.job_id.clone(),
                (RankJob { job_id: a.job_id.clone(), rank: a.rank, world: world as u32 }, tx),
            );
        }
        collective::Relay::new(a.job_id.clone(), (rank, world), events.clone(), rx, cancel.clone(), running.clone())
    });
    let (running_t, events_t) = (running.clone(), events.clone());
    let job_id = a.job_id.clone();
    let thread_name = format!("job-{}", &a.job_id);
    let failed_id = a.job_id.clone();
    let spawned = std::thread::Builder::new().name(thread_name).spawn(move || {
        let (running, events) = (running_t, events_t);
        yield_to_daemon();
        info!(job_id = %job_id, out = %a.output_dir, "job starting");
        let progress_tx = events.clone();
        let progress_id = job_id.clone();
        let on_record = move |step: usize, total: usize, rec: &serde_json::Map<String, serde_json::Value>| {
            let stage = rec.get("stage").and_then(|s| s.as_str()).unwrap_or_default().to_string();
            let p = Progress {
                stage,
                step: step as u64,
                total: total as u64,
                metrics_json: serde_json::Value::Object(rec.clone()).to_string(),
            };
            let _ = progress_tx.send(WorkerMessage {
                msg: Some(worker_message::Msg::Progress(TaskProgress {
                    job_id: progress_id.clone(),
                    progress: Some(p),
                    attempt,
                })),
            });
        };
        let mut opts = RunOptions {
            roles: remote.map(|r| Box::new(r) as Box<dyn RemoteRoles>),
            // Only rank 0 reports progress: its records are the job's.
            observer: Observer {
                cancel: Some(cancel.clone()),
                on_record: (rank == 0).then(|| Box::new(on_record) as _),
            },
            collective: None,
        };
        // A panic inside torch (a shape the checks missed) fails the job, not the worker.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let spec = JobSpec::from_toml(&a.spec_toml).map_err(|e| anyhow::anyhow!("job spec: {e}"))?;
            if let Some(relay) = relay {
                opts.collective = Some(collective::connect(relay, spec.placement.collective, device)?);
            }
            run_job_with(&spec, &PathBuf::from(&a.output_dir), device, opts).map_err(anyhow::Error::from)
        }))
        .unwrap_or_else(|p| Err(anyhow::anyhow!("internal error: {}", panic_message(&p))));
        let cancelled = cancel.load(Ordering::Relaxed);
        let (ok, reason) = match &result {
            Ok(_) => (true, String::new()),
            Err(e) => (false, format!("{e:#}")),
        };
        let retry = result
            .as_ref()
            .err()
            .and_then(|e| e.downcast_ref::<crate::error::Error>())
            .is_some_and(crate::error::Error::is_retryable);
        if let Ok(mut m) = running.lock() {
            m.forget(&job_id);
        }
        info!(job_id = %job_id, ok, cancelled, reason = %reason, "job finished");
        let _ = events.send(WorkerMessage {
            msg: Some(worker_message::Msg::Result(TaskResult {
                job_id: job_id.clone(),
                ok,
                reason,
                cancelled: cancelled && !ok,
                attempt,
                retry: retry && !cancelled,
            })),
        });
    });
    if let Err(e) = spawned {
        warn!(job_id = %failed_id, error = %e, "cannot start job thread");
        if let Ok(mut m) = running.lock() {
            m.forget(&failed_id);
        }
        let _ = events.send(WorkerMessage {
            msg: Some(worker_message::Msg::Result(TaskResult {
                job_id: failed_id,
                ok: false,
                reason: format!("cannot start job thread: {e}"),
                cancelled: false,
                attempt,
                retry: true,
            })),
        });
    }
}
