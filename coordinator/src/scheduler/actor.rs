//! The scheduler's state and its reactions to commands.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rlhf_common::spec::{is_any_worker, JobSpec};
use rlhf_common::JobId;
use rlhf_proto::{
    coordinator_message, worker_message, AssignRoles, AssignTask, CancelTask, CoordinatorMessage, Register, Role,
    RoleCall, RoleReply, WorkerJobs,
};
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn};

use super::groups::{Groups, Reply};
use super::{Command, Config, RunningJob, Stats, WorkerTx};
use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::state::JobState;
use crate::store::{JobRow, Store};

/// Longest wait before a requeued job is placed again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Largest job file accepted.
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// A PPO job, or a pipeline with a PPO stage.
fn has_ppo(spec: &JobSpec) -> bool {
    spec.kind.is_rl() || spec.stages.iter().any(|s| s.kind.is_rl())
}

/// The workers a job is placed on.
struct Picked {
    trainer: String,
    /// The reward/critic host, when not the trainer.
    host: Option<String>,
    rollout: Vec<String>,
}

/// What `ListWorkers` shows.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub id: String,
    pub name: String,
    pub device: String,
    pub memory_bytes: u64,
    pub alive: bool,
    pub last_seen_ms: i64,
    pub running: Vec<String>,
}

struct Slot {
    name: String,
    device: String,
    memory: u64,
    last_seen: Instant,
    last_seen_ms: i64,
    tx: Option<WorkerTx>,
    conn: u64,
    running: BTreeSet<String>,
    /// PPO jobs whose reward/critic or rollout roles this worker hosts.
    hosting: BTreeSet<String>,
    /// The worker process's secret (see `Register.session_key`).
    session_key: String,
}

impl Slot {
    fn idle(&self) -> bool {
        self.tx.is_some() && self.running.is_empty() && self.hosting.is_empty()
    }
}

pub(super) struct Scheduler {
    store: Store,
    cfg: Config,
    updates: broadcast::Sender<JobRow>,
    workers: BTreeMap<String, Slot>,
    started: Instant,
    /// job → the worker hosting its reward/critic roles.
    roles: BTreeMap<String, String>,
    /// job → its rollout workers by target (None: lost).
    rollouts: BTreeMap<String, Vec<Option<String>>>,
    /// job → why it still waits for workers, as last posted.
    waiting: BTreeMap<String, String>,
    /// Requeued jobs → when they may be placed again.
    backoff: BTreeMap<String, Instant>,
    /// job → role-call and collective payload bytes relayed.
    relayed: BTreeMap<String, u64>,
    /// Data-parallel jobs: the worker of each rank, the round in flight.
    groups: Groups,
    /// This actor's own inbox (for work it hands off and takes back).
    me: mpsc::Sender<Command>,
    /// Payload bytes relayed since start (role calls and collectives).
    relayed_total: u64,
    /// Running job → (last step, when, steps per second) from its progress.
    rates: BTreeMap<String, (u64, Instant, f64)>,
    /// Queued and running jobs → their parsed spec (a spec never changes;
    /// placing a long queue on every message must not parse it again).
    specs: HashMap<String, Arc<JobSpec>>,
    /// Jobs requeued because their worker's lease ran out → (that worker,
    /// the attempt it ran). Should the worker come back still running that
    /// attempt, the job is given back to it instead of run twice.
    lost_attempts: HashMap<String, (String, u32)>,
}

impl Scheduler {
    pub(super) fn new(
        store: Store,
        cfg: Config,
        updates: broadcast::Sender<JobRow>,
        me: mpsc::Sender<Command>,
    ) -> Self {
        Self {
            store,
            cfg,
            updates,
            workers: BTreeMap::new(),
            started: Instant::now(),
            roles: BTreeMap::new(),
            rollouts: BTreeMap::new(),
            waiting: BTreeMap::new(),
            backoff: BTreeMap::new(),
            lost_attempts: HashMap::new(),
            relayed: BTreeMap::new(),
            groups: Groups::default(),
            me,
            relayed_total: 0,
            rates: BTreeMap::new(),
            specs: HashMap::new(),
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            self.handle(cmd);
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { spec_toml, request_id, owner, reply } => {
                let r = self.submit(&spec_toml, request_id.as_deref(), &owner);
                let _ = reply.send(r);
                self.dispatch();
            }
            Command::Get { id, reply } => {
                let _ = reply.send(self.store.job(&id).and_then(|j| j.ok_or(Error::NotFound(format!("job {id}")))));
            }
            Command::List { reply } => {
                let _ = reply.send(self.store.jobs());
            }
            Command::Cancel { id, by, reply } => {
                let _ = reply.send(self.cancel(&id, &by));
                self.dispatch();
            }
            Command::Workers { reply } => {
                let _ = reply.send(self.worker_infos());
            }
            Command::Logs { id, page: (offset, limit), reply } => {
                let r =
                    self.store.job(&id).and_then(|j| j.ok_or(Error::NotFound(format!("job {id}")))).and_then(|_| {
                        let (metrics, total) = self.store.metrics(&id, offset, limit)?;
                        Ok((self.store.events(&id)?, metrics, total))
                    });
                let _ = reply.send(r);
            }
            Command::Connected { reg, tx, conn, accepted } => {
                let r = self.connected(reg, tx, conn);
                let _ = accepted.send(r);
                self.dispatch();
            }
            Command::Message { worker, conn, msg } => {
                self.message(&worker, conn, msg);
                self.dispatch();
            }
            Command::Disconnected { worker, conn } => {
                if let Some(slot) = self.workers.get_mut(&worker) {
                    if slot.conn == conn {
                        slot.tx = None;
                        info!(worker = %worker, "worker stream closed; its lease runs out unless it reconnects");
                        self.drop_rollout_worker(&worker);
                    }
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::Summed { result } => {
                let to = self.groups.finish(&result);
                self.send_result(to, result);
            }
            Command::Tick => {
                self.expire_leases();
                self.enforce_deadlines();
                self.dispatch();
            }
        }
    }

    fn publish(&self, id: &str) {
        if let Ok(Some(j)) = self.store.job(id) {
            let _ = self.updates.send(j);
        }
    }

    /// Moves a job; a requeue past its `placement.max_attempts` fails it
    /// with the last cause instead, and a requeue waits a backoff (1 s,
    /// 2 s, 4 s … up to 30 s) before the job is placed again.
    fn move_job(&mut self, id: &str, next: JobState, message: &str) -> bool {
        let (next, message) = match (&next, self.store.job(id)) {
            (JobState::Queued, Ok(Some(job))) if job.attempts > 0 => {
                let max = self.spec_of(&job).map_or(1, |s| s.placement.max_attempts);
                if job.attempts >= max {
                    let reason =
                        format!("gave up after {} attempts (placement.max_attempts); last: {message}", job.attempts);
                    (JobState::Failed { reason: reason.clone() }, reason)
                } else {
                    let wait = Duration::from_secs(1 << (job.attempts - 1).min(5)).min(MAX_BACKOFF);
                    self.backoff.insert(id.to_string(), Instant::now() + wait);
                    (next, format!("{message}; attempt {} of {max} after {}s", job.attempts + 1, wait.as_secs()))
                }
            }
            _ => (next, message.to_string()),
        };
        let message = message.as_str();
        if next.is_terminal() {
            self.backoff.remove(id);
            self.specs.remove(id);
        }
        match self.store.transition(id, &next, message) {
            Ok(true) => {
                info!(job_id = %id, state = next.name(), message, "job state");
                self.publish(id);
                // A job that stops running frees every worker that helped it
                // (role hosts, rollout workers, other ranks), whatever stopped it.
                if !matches!(next, JobState::Running { .. }) {
                    self.release_roles(id);
                }
                true
            }
            Ok(false) => true,
            Err(e) => {
                warn!(job_id = %id, error = %e, "transition refused");
                false
            }
        }
    }

    /// `job`'s parsed spec, from the cache (None: it does not parse, which
    /// a stored spec only does after a format change).
    fn spec_of(&mut self, job: &JobRow) -> Option<Arc<JobSpec>> {
        if let Some(s) = self.specs.get(&job.id) {
            return Some(s.clone());
        }
        let spec = Arc::new(JobSpec::from_toml(&job.spec_toml).ok()?);
        self.specs.insert(job.id.clone(), spec.clone());
        Some(spec)
    }

    fn submit(&mut self, spec_toml: &str, request_id: Option<&str>, owner: &str) -> Result<(JobRow, bool)> {
        if spec_toml.len() > MAX_SPEC_BYTES {
            return Err(Error::InvalidArgument(format!(
                "spec_toml: {} bytes, more than the {MAX_SPEC_BYTES} a job file may have",
                spec_toml.len()
            )));
        }
        let spec = JobSpec::accept_submitted(spec_toml, &self.cfg.allow_read)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let id = JobId::new().to_string();
        let name = spec.name.clone().unwrap_or_else(|| spec.kind.name().to_string());
        let (row, created) = self.store.insert_job(
            &id,
            request_id.filter(|r| !r.is_empty()),
            &name,
            spec.kind.name(),
            spec_toml,
            owner,
        )?;
        if created {
            info!(job_id = %row.id, kind = %row.kind, "job submitted");
            self.specs.insert(row.id.clone(), Arc::new(spec));
            self.publish(&row.id);
        }
        Ok((row, created))
    }

    fn cancel(&mut self, id: &str, by: &Identity) -> Result<JobRow> {
        let job = self.store.job(id)?.ok_or_else(|| Error::NotFound(format!("job {id}")))?;
        if !by.may_act_on(&job.owner) {
            return Err(Error::PermissionDenied(format!(
                "job {id} was submitted by {:?}; only that client or the admin may cancel it",
                job.owner
            )));
        }
        match &job.state {
            JobState::Cancelled { .. } => {}
            JobState::Succeeded | JobState::Failed { .. } => {
                return Err(Error::FailedPrecondition(format!("job {id} already {}", job.state.name())));
            }
            JobState::Queued => {
                self.move_job(id, JobState::Cancelled { reason: "cancelled by user".into() }, "cancelled while queued");
            }
            JobState::Running { worker } => {
                let worker = worker.clone();
                self.send_to(&worker, coordinator_message::Msg::Cancel(CancelTask { job_id: id.to_string() }));
                self.move_job(
                    id,
                    JobState::Cancelled { reason: "cancelled by user".into() },
                    &format!("cancel sent to worker {worker}"),
                );
                self.release_roles(id);
            }
        }
        self.store.job(id)?.ok_or_else(|| Error::NotFound(format!("job {id}")))
    }

    fn send_to(&mut self, worker: &str, msg: coordinator_message::Msg) -> bool {
        let Some(tx) = self.workers.get(worker).and_then(|s| s.tx.clone()) else { return false };
        tx.try_send(Ok(CoordinatorMessage { msg: Some(msg) })).is_ok()
    }

    /// A worker session opened. A session claiming the id of a connected
    /// worker must present that worker's session key (its own reconnect);
    /// anything else is another process stealing its identity.
    fn connected(&mut self, reg: Register, tx: WorkerTx, conn: u64) -> std::result::Result<(), String> {
        let id = reg.worker_id.clone();
        if reg.session_key.len() < 16 {
            return Err("register.session_key: at least 16 characters".into());
        }
        if let Some(old) = self.workers.get(&id) {
            if old.session_key != reg.session_key {
                warn!(worker = %id, name = %reg.name, "refused a session claiming a connected worker's id");
                return Err(format!("worker id {id} belongs to another connected worker"));
            }
        }
        if let Err(e) = self.store.upsert_worker(&id, &reg.name, &reg.device, reg.memory_bytes) {
            warn!(worker = %id, error = %e, "cannot record worker");
        }
        info!(worker = %id, name = %reg.name, device = %reg.device, running = reg.jobs.as_ref().map_or(0, |j| j.running.len()), "worker registered");
        let slot = Slot {
            name: reg.name,
            device: reg.device,
            memory: reg.memory_bytes,
            last_seen: Instant::now(),
            last_seen_ms: crate::store::now_ms(),
            tx: Some(tx),
            conn,
            running: BTreeSet::new(),
            hosting: BTreeSet::new(),
            session_key: reg.session_key,
        };
        self.workers.insert(id.clone(), slot);
        self.reconcile(&id, &reg.jobs.unwrap_or_default());
        Ok(())
    }

    /// Makes the store and a worker agree on what it runs: jobs it no longer
    /// runs go back to the queue; jobs it runs that ended here are cancelled.
    fn reconcile(&mut self, worker: &str, jobs: &WorkerJobs) {
        let (reported, hosted, ranks) = (&jobs.running, &jobs.roles, &jobs.ranks);
        // Data-parallel ranks here: learn those of running jobs back (after a restart).
        // A rank counts only for a running job whose spec has that world: a
        // peer's claim of a huge world must not size anything.
        for r in ranks {
            let Ok(Some(job)) = self.store.job(&r.job_id) else { continue };
            let world = self.spec_of(&job).map_or(0, |s| s.placement.data_parallel);
            if !matches!(job.state, JobState::Running { .. }) {
                continue;
            }
            if r.world as usize != world || r.rank >= r.world {
                warn!(job_id = %r.job_id, worker = %worker, rank = r.rank, world = r.world, spec_world = world, "ignoring a rank report that does not fit the job");
                continue;
            }
            self.groups.learn(&r.job_id, worker, r.rank as usize, world);
        }
        // Roles hosted here: keep those of running jobs, release the rest.
        let mut hosting = BTreeSet::new();
        for h in hosted {
            let id = &h.job_id;
            let live = matches!(self.store.job(id), Ok(Some(JobRow { state: JobState::Running { .. }, .. })));
            let rollout = h.roles.contains(&(Role::Rollout as i32));
            let (placed, known) = if rollout {
                (self.rollout_worker(id, h.target), self.rollouts.contains_key(id))
            } else {
                (self.roles.get(id).cloned(), self.roles.contains_key(id))
            };
            match placed {
                Some(w) if w == worker && live => {
                    hosting.insert(id.clone());
                }
                None if live && !known => {
                    // After a coordinator restart: learn the placement back.
                    if rollout {
                        let targets = self.rollouts.entry(id.clone()).or_default();
                        let k = h.target as usize;
                        if targets.len() <= k {
                            targets.resize(k + 1, None);
                        }
                        targets[k] = Some(worker.to_string());
                    } else {
                        self.roles.insert(id.clone(), worker.to_string());
                    }
                    hosting.insert(id.clone());
                }
                _ => {
                    self.send_to(worker, coordinator_message::Msg::Cancel(CancelTask { job_id: id.clone() }));
                }
            }
        }
        // Role assignments in flight stay counted.
        if let Some(slot) = self.workers.get(worker) {
            for id in &slot.hosting {
                let rollout_here = self.rollouts.get(id).is_some_and(|t| t.iter().flatten().any(|w| w == worker));
                if rollout_here || self.roles.get(id).is_some_and(|w| w == worker) {
                    hosting.insert(id.clone());
                }
            }
        }
        if let Some(slot) = self.workers.get_mut(worker) {
            slot.hosting = hosting;
        }
        let reported: BTreeSet<String> = reported.iter().cloned().collect();
        let mut jobs = self.store.jobs_in("running").unwrap_or_default();
        for id in &reported {
            if !jobs.iter().any(|j| &j.id == id) {
                if let Ok(Some(j)) = self.store.job(id) {
                    jobs.push(j);
                }
            }
        }
        for j in &jobs {
            let here = matches!(&j.state, JobState::Running { worker: w } if w == worker);
            if here && !reported.contains(&j.id) {
                let recently_assigned = crate::store::now_ms() - j.updated_ms < 2 * self.cfg.lease.as_millis() as i64
                    && self.workers.get(worker).is_some_and(|s| s.running.contains(&j.id));
                if !recently_assigned {
                    self.move_job(&j.id, JobState::Queued, &format!("worker {worker} no longer runs it; requeued"));
                }
            }
        }
        let mut running = BTreeSet::new();
        for id in &reported {
            let row = jobs.iter().find(|j| &j.id == id);
            if let Some(j) = row.filter(|j| j.state == JobState::Queued) {
                if self.lost_attempts.get(id) == Some(&(worker.to_string(), j.attempts)) {
                    self.lost_attempts.remove(id);
                    self.backoff.remove(id);
                    let why = format!("worker {worker} came back still running attempt {}; it goes on", j.attempts);
                    match self.store.resume(id, worker, &why) {
                        Ok(()) => {
                            info!(job_id = %id, worker = %worker, "lost attempt resumed");
                            self.publish(id);
                            running.insert(id.clone());
                            continue;
                        }
                        Err(e) => warn!(job_id = %id, error = %e, "cannot give a job back to its worker"),
                    }
                }
            }
            match row.map(|j| &j.state) {
                Some(JobState::Running { worker: w }) if w == worker => {
                    running.insert(id.clone());
                }
                Some(JobState::Running { .. }) if self.groups.rank_of(id, worker).is_some() => {
                    running.insert(id.clone());
                }
                _ => {
                    self.send_to(worker, coordinator_message::Msg::Cancel(CancelTask { job_id: id.clone() }));
                    running.insert(id.clone()); // busy until it stops
                }
            }
        }
        // Assignments in flight (sent, not yet reported) stay counted.
        if let Some(slot) = self.workers.get_mut(worker) {
            for j in &jobs {
                if matches!(&j.state, JobState::Running { worker: w } if w == worker) && slot.running.contains(&j.id) {
                    running.insert(j.id.clone());
                }
            }
            slot.running = running;
        }
    }

    fn message(&mut self, worker: &str, conn: u64, msg: worker_message::Msg) {
        let Some(slot) = self.workers.get_mut(worker) else { return };
        if slot.conn != conn {
            return;
        }
        slot.last_seen = Instant::now();
        slot.last_seen_ms = crate::store::now_ms();
        match msg {
            worker_message::Msg::Register(_) => {}
            worker_message::Msg::Heartbeat(hb) => self.reconcile(worker, &hb.jobs.unwrap_or_default()),
            worker_message::Msg::RoleCall(call) => {
                // Only the job's trainer calls its roles.
                if !self.runs(worker, &call.job_id) {
                    warn!(job_id = %call.job_id, worker = %worker, "refused a role call from a worker that is not the job's trainer");
                    return;
                }
                self.relay_call(worker, call)
            }
            worker_message::Msg::RoleReply(reply) => {
                // Only the worker hosting that role of the job answers for it.
                let host = if reply.role == Role::Rollout as i32 {
                    self.rollout_worker(&reply.job_id, reply.target)
                } else {
                    self.roles.get(&reply.job_id).cloned()
                };
                if host.as_deref() != Some(worker) {
                    warn!(job_id = %reply.job_id, worker = %worker, "refused a role reply from a worker that does not host the role");
                    return;
                }
                let bytes = reply.tensors.iter().map(|t| (t.f32.len() * 4 + t.i64.len() * 8) as u64).sum::<u64>();
                *self.relayed.entry(reply.job_id.clone()).or_default() += bytes;
                self.relayed_total += bytes;
                if let Ok(Some(JobRow { state: JobState::Running { worker: trainer }, .. })) =
                    self.store.job(&reply.job_id)
                {
                    self.send_to(&trainer, coordinator_message::Msg::RoleReply(reply));
                }
            }
            worker_message::Msg::Collective(part) => {
                let bytes =
                    part.tensors.iter().map(|t| t.f32.len() as u64 * 4).sum::<u64>() + part.payload.len() as u64;
                *self.relayed.entry(part.job_id.clone()).or_default() += bytes;
                self.relayed_total += bytes;
                match self.groups.contribute(worker, part) {
                    Reply::Wait => {}
                    Reply::Send(to, result) => self.send_result(to, result),
                    Reply::Sum(parts) => {
                        // Megabytes of gradients: summed on a blocking thread,
                        // the result comes back as Command::Summed.
                        let me = self.me.clone();
                        tokio::task::spawn_blocking(move || {
                            let result = super::groups::sum_round(&parts[0].job_id, parts[0].round, &parts);
                            let _ = me.blocking_send(Command::Summed { result });
                        });
                    }
                }
            }
            worker_message::Msg::Progress(p) => {
                let Some(progress) = p.progress else { return };
                // Only the job's trainer (or its rank 0) of the current attempt reports progress.
                let current = self.store.job(&p.job_id).ok().flatten().map(|j| j.attempts);
                let stale = p.attempt != 0 && current.is_some_and(|a| a != p.attempt);
                if !self.runs(worker, &p.job_id) || stale {
                    warn!(job_id = %p.job_id, worker = %worker, attempt = p.attempt, "refused progress from a worker that does not run the job's current attempt");
                    return;
                }
                let json = serde_json::json!({ "stage": progress.stage, "step": progress.step, "total": progress.total, "metrics_json": progress.metrics_json }).to_string();
                let metrics = (!progress.metrics_json.is_empty()).then_some(progress.metrics_json.as_str());
                let now = Instant::now();
                let rate = match self.rates.get(&p.job_id) {
                    Some((step, at, rate)) if progress.step > *step => {
                        (progress.step - step) as f64 / now.duration_since(*at).as_secs_f64().max(1e-3)
                    }
                    Some((_, _, rate)) => *rate,
                    None => 0.0,
                };
                self.rates.insert(p.job_id.clone(), (progress.step, now, rate));
                if let Err(e) = self.store.set_progress(&p.job_id, &json, metrics) {
                    warn!(job_id = %p.job_id, error = %e, "cannot record progress");
                }
                self.publish(&p.job_id);
            }
            worker_message::Msg::Result(r) => {
                let Ok(Some(job)) = self.store.job(&r.job_id) else { return };
                if r.attempt != 0 && r.attempt != job.attempts {
                    // An earlier attempt's run ended (say, a rank cancelled
                    // after a requeue) after the job was assigned again,
                    // maybe to this very worker: it says nothing of this one.
                    info!(job_id = %r.job_id, worker = %worker, attempt = r.attempt, current = job.attempts, "ignoring a result of an earlier attempt");
                    return;
                }
                if let Some(slot) = self.workers.get_mut(worker) {
                    slot.running.remove(&r.job_id);
                }
                if !matches!(&job.state, JobState::Running { worker: w } if w == worker) {
                    // Another rank of a data-parallel job: its failure fails the job.
                    if let (Some(rank), false) = (self.groups.rank_of(&r.job_id, worker), r.ok || r.cancelled) {
                        let reason = format!("rank {rank} (worker {worker}): {}", r.reason);
                        self.move_job(&r.job_id, JobState::Failed { reason: reason.clone() }, &reason);
                        self.release_roles(&r.job_id);
                    }
                    return; // cancelled or reassigned meanwhile
                }
                let next = if r.ok {
                    JobState::Succeeded
                } else if r.cancelled {
                    JobState::Cancelled { reason: r.reason.clone() }
                } else if r.retry {
                    // The cluster failed the job (a role host lost, a call
                    // timed out): run it again, from its checkpoint.
                    self.relayed.remove(&r.job_id);
                    let why = format!("failed for a reason outside the job ({}); requeued", r.reason);
                    self.move_job(&r.job_id, JobState::Queued, &why);
                    return;
                } else {
                    JobState::Failed { reason: r.reason.clone() }
                };
                let relayed = self.relayed.remove(&r.job_id).unwrap_or(0);
                let note = if relayed > 0 {
                    format!("reported by worker {worker}; {relayed} payload bytes relayed")
                } else {
                    format!("reported by worker {worker}")
                };
                self.move_job(&r.job_id, next, &note);
                self.release_roles(&r.job_id);
            }
        }
    }

    /// Sends a trainer's role call to the worker hosting the role: the
    /// reward/critic host, or rollout worker `target`. One that cannot be
    /// delivered is answered at once (a gone rollout worker as `lost`).
    fn relay_call(&mut self, trainer: &str, call: RoleCall) {
        let bytes = call.tensors.iter().map(|t| (t.f32.len() * 4 + t.i64.len() * 8) as u64).sum::<u64>();
        *self.relayed.entry(call.job_id.clone()).or_default() += bytes;
        self.relayed_total += bytes;
        let rollout = call.role == Role::Rollout as i32;
        let host = if rollout {
            self.rollout_worker(&call.job_id, call.target)
        } else {
            self.roles.get(&call.job_id).cloned()
        };
        let (job_id, call_id, role, target) = (call.job_id.clone(), call.call_id, call.role, call.target);
        let delivered = host.is_some_and(|h| self.send_to(&h, coordinator_message::Msg::RoleCall(call)));
        if !delivered {
            let error =
                if rollout { format!("rollout worker {target} is gone") } else { "the roles' worker is gone".into() };
            let reply = RoleReply { job_id, call_id, error, tensors: Vec::new(), role, target, lost: rollout };
            self.send_to(trainer, coordinator_message::Msg::RoleReply(reply));
        }
    }

    /// Whether `worker` runs `job` now: as its trainer, or as rank 0 of a
    /// data-parallel job.
    fn runs(&self, worker: &str, job: &str) -> bool {
        match self.store.job(job) {
            Ok(Some(JobRow { state: JobState::Running { worker: w }, .. })) => {
                w == worker || self.groups.rank_of(job, worker) == Some(0)
            }
            _ => false,
        }
    }

    /// The worker that is rollout worker `target` of `job`, if it still is.
    fn rollout_worker(&self, job: &str, target: u32) -> Option<String> {
        self.rollouts.get(job).and_then(|t| t.get(target as usize).cloned().flatten())
    }

    /// A rollout worker went away: each job it generated for goes on
    /// without it (its trainer hears at once and sends the worker's share
    /// elsewhere).
    fn drop_rollout_worker(&mut self, worker: &str) {
        let mut lost = Vec::new();
        for (job, targets) in self.rollouts.iter_mut() {
            for (k, w) in targets.iter_mut().enumerate() {
                if w.as_deref() == Some(worker) {
                    *w = None;
                    lost.push((job.clone(), k as u32));
                }
            }
        }
        for (job, target) in lost {
            if let Some(slot) = self.workers.get_mut(worker) {
                slot.hosting.remove(&job);
            }
            let message = format!("rollout worker {target} ({worker}) lost; its share goes to the others");
            warn!(job_id = %job, %message);
            if let Err(e) = self.store.note(&job, &message) {
                warn!(job_id = %job, error = %e, "cannot record event");
            }
            if let Ok(Some(JobRow { state: JobState::Running { worker: trainer }, .. })) = self.store.job(&job) {
                let notice = RoleReply {
                    job_id: job.clone(),
                    call_id: 0,
                    error: message,
                    tensors: Vec::new(),
                    role: Role::Rollout as i32,
                    target,
                    lost: true,
                };
                self.send_to(&trainer, coordinator_message::Msg::RoleReply(notice));
            }
        }
    }

    /// What `/metrics` shows.
    fn stats(&mut self) -> Stats {
        let now_ms = crate::store::now_ms();
        let jobs = self.store.jobs().unwrap_or_default();
        let mut by_state: BTreeMap<String, u64> =
            ["queued", "running", "succeeded", "failed", "cancelled"].iter().map(|s| (s.to_string(), 0)).collect();
        for j in &jobs {
            *by_state.entry(j.state.name().to_string()).or_default() += 1;
        }
        let oldest_queued_s = jobs
            .iter()
            .filter(|j| matches!(j.state, JobState::Queued))
            .map(|j| (now_ms - j.created_ms) as f64 / 1000.0)
            .fold(0.0, f64::max);
        let running_ids: BTreeSet<&str> =
            jobs.iter().filter(|j| matches!(j.state, JobState::Running { .. })).map(|j| j.id.as_str()).collect();
        self.rates.retain(|id, _| running_ids.contains(id.as_str()));
        let running = jobs
            .iter()
            .filter(|j| matches!(j.state, JobState::Running { .. }))
            .map(|j| {
                let p: serde_json::Value = serde_json::from_str(&j.progress).unwrap_or_default();
                let m: serde_json::Value =
                    serde_json::from_str(p["metrics_json"].as_str().unwrap_or("{}")).unwrap_or_default();
                RunningJob {
                    id: j.id.clone(),
                    name: j.name.clone(),
                    step: p["step"].as_u64().unwrap_or(0),
                    reward_mean: m["reward_mean"].as_f64(),
                    kl: m["kl"].as_f64(),
                    steps_per_s: self.rates.get(&j.id).map_or(0.0, |r| r.2),
                }
            })
            .collect();
        let lease = self.cfg.lease;
        let now = Instant::now();
        Stats {
            jobs_by_state: by_state.into_iter().collect(),
            workers_alive: self
                .workers
                .values()
                .filter(|s| s.tx.is_some() && now.duration_since(s.last_seen) <= lease)
                .count() as u64,
            workers_total: self.workers.len() as u64,
            oldest_queued_s,
            running,
            relayed_bytes_total: self.relayed_total,
        }
    }

    fn send_result(&mut self, to: Vec<String>, result: rlhf_proto::CollectiveResult) {
        for w in to {
            self.send_to(&w, coordinator_message::Msg::CollectiveResult(result.clone()));
        }
    }

    /// Fails queued and running jobs past their `placement.deadline_s`.
    fn enforce_deadlines(&mut self) {
        let now = crate::store::now_ms();
        let mut late = Vec::new();
        for state in ["queued", "running"] {
            for j in self.store.jobs_in(state).unwrap_or_default() {
                let Some(spec) = self.spec_of(&j) else { continue };
                if let Some(d) = spec.placement.deadline_s {
                    if now - j.created_ms > (d as i64).saturating_mul(1000) {
                        late.push((j, d));
                    }
                }
            }
        }
        for (j, d) in late {
            if let JobState::Running { worker } = &j.state {
                let worker = worker.clone();
                self.send_to(&worker, coordinator_message::Msg::Cancel(CancelTask { job_id: j.id.clone() }));
            }
            let reason = format!("not finished within placement.deadline_s = {d} s of its submission");
            self.move_job(&j.id, JobState::Failed { reason: reason.clone() }, &reason);
        }
    }

    fn expire_leases(&mut self) {
        let now = Instant::now();
        let lost: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_seen) > self.cfg.lease)
            .map(|(id, _)| id.clone())
            .collect();
        for id in lost {
            let secs = self.cfg.lease.as_secs_f64();
            warn!(worker = %id, lease_s = secs, "worker lost: no heartbeat within its lease");
            self.drop_rollout_worker(&id);
            self.workers.remove(&id);
            // Jobs that ran on this worker alone may be given back to it.
            let alone: Vec<(String, u32)> = self
                .store
                .jobs_in("running")
                .unwrap_or_default()
                .into_iter()
                .filter(|j| matches!(&j.state, JobState::Running { worker: w } if *w == id))
                .filter(|j| !self.roles.contains_key(&j.id) && !self.rollouts.contains_key(&j.id))
                .filter(|j| self.groups.rank_of(&j.id, &id).is_none())
                .map(|j| (j.id, j.attempts))
                .collect();
            self.requeue_worker_jobs(&id, &format!("worker {id} lost (no heartbeat for {secs:.1}s); requeued"));
            for (job, attempts) in alone {
                // Placed again no sooner than one lease from now: time for
                // the worker to come back and claim it.
                if let Some(until) = self.backoff.get_mut(&job) {
                    *until = (*until).max(now + self.cfg.lease);
                }
                self.lost_attempts.insert(job, (id.clone(), attempts));
            }
        }
        // After a coordinator restart: running jobs whose worker never came back.
        if now.duration_since(self.started) > self.cfg.lease {
            let orphans: Vec<(String, String)> = self
                .store
                .jobs_in("running")
                .unwrap_or_default()
                .into_iter()
                .filter_map(|j| match j.state {
                    JobState::Running { worker } if !self.workers.contains_key(&worker) => Some((j.id, worker)),
                    _ => None,
                })
                .collect();
            for (job, worker) in orphans {
                self.move_job(&job, JobState::Queued, &format!("worker {worker} not connected; requeued"));
            }
        }
    }

    fn requeue_worker_jobs(&mut self, worker: &str, message: &str) {
        for j in self.store.jobs_in("running").unwrap_or_default() {
            if matches!(&j.state, JobState::Running { worker: w } if w == worker) {
                self.move_job(&j.id, JobState::Queued, message);
                self.release_roles(&j.id);
            }
        }
        // Data-parallel jobs it ran a rank of: stop the other ranks, start over.
        for job in self.groups.jobs_of(worker) {
            if let Ok(Some(JobRow { state: JobState::Running { .. }, .. })) = self.store.job(&job) {
                self.move_job(&job, JobState::Queued, &format!("{message} (it ran a data-parallel rank)"));
            }
            self.release_roles(&job);
        }
        // Jobs whose roles it hosted: stop their trainers and start over.
        let hosted: Vec<String> = self.roles.iter().filter(|(_, w)| *w == worker).map(|(j, _)| j.clone()).collect();
        for job in hosted {
            self.roles.remove(&job);
            if let Ok(Some(JobRow { state: JobState::Running { worker: trainer }, .. })) = self.store.job(&job) {
                self.send_to(&trainer, coordinator_message::Msg::Cancel(CancelTask { job_id: job.clone() }));
                if let Some(slot) = self.workers.get_mut(&trainer) {
                    slot.running.remove(&job);
                }
                self.move_job(&job, JobState::Queued, &format!("{message} (it hosted the reward/critic roles)"));
            }
        }
    }

    /// Frees the workers helping a job: its roles' host and its other
    /// data-parallel ranks (each is told to stop; a rank stays busy until
    /// it reports that it stopped).
    fn release_roles(&mut self, job: &str) {
        for w in self.groups.remove(job) {
            self.send_to(&w, coordinator_message::Msg::Cancel(CancelTask { job_id: job.to_string() }));
        }
        for w in self.rollouts.remove(job).unwrap_or_default().into_iter().flatten() {
            self.send_to(&w, coordinator_message::Msg::Cancel(CancelTask { job_id: job.to_string() }));
            if let Some(slot) = self.workers.get_mut(&w) {
                slot.hosting.remove(job);
            }
        }
        self.waiting.remove(job);
        if let Some(host) = self.roles.remove(job) {
            self.send_to(&host, coordinator_message::Msg::Cancel(CancelTask { job_id: job.to_string() }));
            if let Some(slot) = self.workers.get_mut(&host) {
                slot.hosting.remove(job);
            }
        }
    }

    /// Places queued jobs, oldest first, on idle live workers. A PPO job
    /// whose `[placement]` puts reward/critic on another worker gets two:
    /// the trainer (rollout, reference, policy update) and the role host.
    fn dispatch(&mut self) {
        if !self.workers.values().any(Slot::idle) {
            return;
        }
        let queued: Vec<JobRow> = self.store.jobs_in("queued").unwrap_or_default();
        let now = Instant::now();
        self.backoff.retain(|_, until| *until > now);
        for job in queued {
            if self.backoff.contains_key(&job.id) {
                continue;
            }
            let Some(spec) = self.spec_of(&job) else { continue };
            if spec.placement.data_parallel > 1 {
                self.dispatch_ranks(&job, &spec);
                continue;
            }
            let Some(picked) = self.pick_workers(&job.id, &spec) else { continue };
            self.waiting.remove(&job.id);
            let Picked { trainer, host, rollout } = picked;
            let out = self.cfg.data_dir.join("jobs").join(&job.id).display().to_string();
            if let Some(h) = &host {
                let msg = coordinator_message::Msg::AssignRoles(AssignRoles {
                    job_id: job.id.clone(),
                    spec_toml: job.spec_toml.clone(),
                    output_dir: out.clone(),
                    roles: vec![Role::Reward as i32, Role::Critic as i32],
                    target: 0,
                });
                if !self.send_to(h, msg) {
                    continue;
                }
                self.roles.insert(job.id.clone(), h.clone());
                if let Some(slot) = self.workers.get_mut(h) {
                    slot.hosting.insert(job.id.clone());
                }
            }
            let mut targets = Vec::new();
            for (k, w) in rollout.iter().enumerate() {
                let msg = coordinator_message::Msg::AssignRoles(AssignRoles {
                    job_id: job.id.clone(),
                    spec_toml: job.spec_toml.clone(),
                    output_dir: out.clone(),
                    roles: vec![Role::Rollout as i32],
                    target: k as u32,
                });
                let sent = self.send_to(w, msg);
                targets.push(sent.then(|| w.clone()));
                if let (true, Some(slot)) = (sent, self.workers.get_mut(w)) {
                    slot.hosting.insert(job.id.clone());
                }
            }
            if !rollout.is_empty() {
                self.rollouts.insert(job.id.clone(), targets);
            }
            let msg = coordinator_message::Msg::Assign(AssignTask {
                job_id: job.id.clone(),
                spec_toml: job.spec_toml.clone(),
                output_dir: out,
                remote_roles: host.is_some(),
                rank: 0,
                world: 1,
                attempt: job.attempts + 1,
                rollout_workers: rollout.len() as u32,
            });
            let name = |id: &str| self.workers.get(id).map(|s| s.name.clone()).unwrap_or_default();
            let mut how = format!("assigned to worker {} ({trainer})", name(&trainer));
            if let Some(h) = &host {
                how += &format!("; reward and critic on worker {} ({h})", name(h));
            }
            if !rollout.is_empty() {
                let names: Vec<String> = rollout.iter().map(|w| format!("{} ({w})", name(w))).collect();
                how += &format!("; rollout on workers {}", names.join(", "));
            }
            // Running is committed before the worker hears of it: a crash in
            // between leaves a running job that reconcile requeues, never a
            // worker running a job the store calls queued.
            if !self.move_job(&job.id, JobState::Running { worker: trainer.clone() }, &how) {
                self.release_roles(&job.id);
                continue;
            }
            if self.send_to(&trainer, msg) {
                if let Some(slot) = self.workers.get_mut(&trainer) {
                    slot.running.insert(job.id.clone());
                }
            } else {
                self.move_job(&job.id, JobState::Queued, &format!("worker {trainer} could not be reached; requeued"));
                self.release_roles(&job.id);
            }
        }
    }

    /// The workers a job's `[placement]` asks for, all idle and distinct:
    /// named ones by name, the others ("" or "*", or an unnamed trainer)
    /// from any idle worker. None if they are not there yet; the job's
    /// events then say which workers it waits for and which are connected.
    fn pick_workers(&mut self, job: &str, spec: &JobSpec) -> Option<Picked> {
        let p = &spec.placement;
        let named = |n: &Option<String>| n.clone().filter(|n| !is_any_worker(n));
        let ppo = has_ppo(spec);
        // (role, wanted worker name or any)
        let mut wants: Vec<(String, Option<String>)> = vec![("trainer".into(), named(&p.trainer))];
        let role_host = p.critic.clone().or_else(|| p.reward.clone());
        let separate_host =
            ppo && role_host.as_ref().is_some_and(|r| is_any_worker(r) || Some(r) != p.trainer.as_ref());
        if separate_host {
            wants.push(("reward/critic".into(), named(&role_host)));
        }
        if ppo {
            wants.extend(p.rollout.iter().enumerate().map(|(k, n)| (format!("rollout[{k}]"), named(&Some(n.clone())))));
        }
        let mut taken: Vec<String> = Vec::new();
        let mut missing = Vec::new();
        // Named workers first, so an "any" role does not take a named one.
        let mut order: Vec<usize> = (0..wants.len()).collect();
        order.sort_by_key(|&i| wants[i].1.is_none());
        let mut got: Vec<Option<String>> = vec![None; wants.len()];
        for i in order {
            let (role, name) = &wants[i];
            let found = self
                .workers
                .iter()
                .filter(|(id, s)| s.idle() && !taken.contains(id))
                .find(|(_, s)| name.as_ref().is_none_or(|n| &s.name == n))
                .map(|(id, _)| id.clone());
            match found {
                Some(id) => {
                    taken.push(id.clone());
                    got[i] = Some(id);
                }
                None => missing.push(match name {
                    Some(n) => format!("{role} on {n:?}"),
                    None => format!("{role} on any idle worker"),
                }),
            }
        }
        if !missing.is_empty() {
            // Under a batch system the cluster is what the allocation holds:
            // a worker that is not connected will not come, nor more workers.
            let connected = |n: &str| self.workers.values().any(|s| s.tx.is_some() && s.name == n);
            let absent: Vec<String> = wants
                .iter()
                .filter_map(|(role, n)| n.as_ref().filter(|n| !connected(n)).map(|n| format!("{role} on {n:?}")))
                .collect();
            let too_few = wants.len() > self.workers.values().filter(|s| s.tx.is_some()).count();
            if self.cfg.fail_unplaceable && (!absent.is_empty() || too_few) {
                let names: Vec<String> =
                    self.workers.values().filter(|s| s.tx.is_some()).map(|s| s.name.clone()).collect();
                let reason = format!(
                    "placement cannot be met by this cluster (--fail-unplaceable): it needs {} workers ({}); connected: {}",
                    wants.len(),
                    if absent.is_empty() { "too few workers".to_string() } else { format!("absent: {}", absent.join(", ")) },
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                );
                self.move_job(job, JobState::Failed { reason: reason.clone() }, &reason);
                return None;
            }
            self.explain_wait(job, &missing);
            return None;
        }
        let mut got = got.into_iter().flatten();
        let trainer = got.next()?;
        let host = if separate_host { got.next() } else { None };
        Some(Picked { trainer, host, rollout: got.collect() })
    }

    /// Posts (once per change) which workers a queued job waits for.
    fn explain_wait(&mut self, job: &str, missing: &[String]) {
        let connected: Vec<String> = self
            .workers
            .values()
            .filter(|s| s.tx.is_some())
            .map(|s| {
                let busy: Vec<String> = s
                    .running
                    .iter()
                    .map(|j| format!("runs {j}"))
                    .chain(s.hosting.iter().map(|j| format!("hosts roles of {j}")))
                    .collect();
                if busy.is_empty() {
                    format!("{} (idle)", s.name)
                } else {
                    format!("{} (busy: {})", s.name, busy.join(", "))
                }
            })
            .collect();
        let message = format!(
            "waiting for workers: {}; connected: {}",
            missing.join(", "),
            if connected.is_empty() { "none".to_string() } else { connected.join(", ") }
        );
        if self.waiting.get(job) == Some(&message) {
            return;
        }
        info!(job_id = %job, %message);
        if let Err(e) = self.store.note(job, &message) {
            warn!(job_id = %job, error = %e, "cannot record event");
        }
        self.publish(job);
        self.waiting.insert(job.to_string(), message);
    }

    /// Starts a data-parallel job once `data_parallel` workers are idle:
    /// rank 0 (the `placement.trainer` worker when named) writes the job's
    /// files and reports for it; every rank sums through [`Groups`].
    fn dispatch_ranks(&mut self, job: &JobRow, spec: &JobSpec) {
        let n = spec.placement.data_parallel;
        let mut idle: Vec<String> = self.workers.iter().filter(|(_, s)| s.idle()).map(|(id, _)| id.clone()).collect();
        if let Some(name) = &spec.placement.trainer {
            let Some(i) = idle.iter().position(|id| &self.workers[id].name == name) else { return };
            let first = idle.remove(i);
            idle.insert(0, first);
        }
        if idle.len() < n {
            return; // waits for enough idle workers
        }
        idle.truncate(n);
        let out = self.cfg.data_dir.join("jobs").join(&job.id).display().to_string();
        let ranks: Vec<String> = idle
            .iter()
            .enumerate()
            .map(|(r, id)| format!("rank {r} on worker {} ({id})", self.workers[id].name))
            .collect();
        // Running is committed before any rank hears of it.
        let how = format!("data parallel: {}", ranks.join(", "));
        if !self.move_job(&job.id, JobState::Running { worker: idle[0].clone() }, &how) {
            return;
        }
        for (rank, w) in idle.iter().enumerate() {
            let msg = coordinator_message::Msg::Assign(AssignTask {
                job_id: job.id.clone(),
                spec_toml: job.spec_toml.clone(),
                output_dir: out.clone(),
                remote_roles: false,
                rollout_workers: 0,
                rank: rank as u32,
                world: n as u32,
                attempt: job.attempts + 1,
            });
            if !self.send_to(w, msg) {
                for sent in &idle[..rank] {
                    self.send_to(sent, coordinator_message::Msg::Cancel(CancelTask { job_id: job.id.clone() }));
                }
                self.move_job(
                    &job.id,
                    JobState::Queued,
                    &format!("rank {rank}'s worker {w} could not be reached; requeued"),
                );
                return;
            }
            if let Some(slot) = self.workers.get_mut(w) {
                slot.running.insert(job.id.clone());
            }
        }
        self.groups.create(&job.id, &idle);
    }

    fn worker_infos(&self) -> Vec<WorkerInfo> {
        let now = Instant::now();
        self.workers
            .iter()
            .map(|(id, s)| WorkerInfo {
                id: id.clone(),
                name: s.name.clone(),
                device: s.device.clone(),
                memory_bytes: s.memory,
                alive: s.tx.is_some() && now.duration_since(s.last_seen) <= self.cfg.lease,
                last_seen_ms: s.last_seen_ms,
                running: s.running.iter().chain(&s.hosting).cloned().collect(),
            })
            .collect()
    }
}
