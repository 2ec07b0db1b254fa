//! Roles hosted for another worker's PPO trainer, and the trainer's handle on
//! them. A host is a thread serving one job's role calls: the reward/critic
//! host ([`RoleHost`]) or a rollout worker ([`RolloutHost`]). The trainer's
//! side, [`ChannelRoles`], sends calls through the coordinator and matches
//! the replies; a rollout worker the coordinator reports lost voids its
//! calls.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rlhf_common::spec::{JobSpec, PpoSpec};
use rlhf_proto::*;
use tch::{Device, Tensor};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use super::wire;
use super::Running;
use crate::error::{Error, Result};
use crate::train::ppo::roles::{wire as ops, RemoteRoles, RoleHost, RoleOp};
use crate::train::ppo::rollout_host::{wire as rollout_wire, RolloutHost, RolloutOp};

/// What a host thread serves.
trait Host: Sized {
    /// Builds it from the resolved job (the trainer's `init` call).
    fn build(spec_toml: &str, device: Device) -> Result<Self, String>;
    fn serve(&mut self, call: &RoleCall) -> Result<Vec<TensorData>, String>;
}

impl Host for (RoleHost, PpoSpec) {
    fn build(spec_toml: &str, device: Device) -> Result<Self, String> {
        let spec = JobSpec::from_toml(spec_toml).map_err(|e| format!("role host job: {e}"))?;
        let ppo = spec.ppo.clone().ok_or_else(|| "role host job: ppo: required".to_string())?;
        let host = RoleHost::new(&spec, &ppo, device).map_err(|e| format!("role host: {e}"))?;
        Ok((host, ppo))
    }

    fn serve(&mut self, call: &RoleCall) -> Result<Vec<TensorData>, String> {
        let tensors = wire::from_wire_all(&call.tensors).map_err(|e| e.to_string())?;
        let op = ops::decode(call.op, call.path.clone(), tensors).map_err(|e| e.to_string())?;
        let out = self.0.serve(op, &self.1).map_err(|e| format!("{e}"))?;
        wire::to_wire_all(&out).map_err(|e| e.to_string())
    }
}

impl Host for RolloutHost {
    fn build(spec_toml: &str, device: Device) -> Result<Self, String> {
        let spec = JobSpec::from_toml(spec_toml).map_err(|e| format!("rollout job: {e}"))?;
        RolloutHost::new(&spec, device).map_err(|e| format!("rollout host: {e}"))
    }

    fn serve(&mut self, call: &RoleCall) -> Result<Vec<TensorData>, String> {
        if call.op != ops::WireOp::Generate as i32 {
            return Err(format!("a rollout worker serves init and generate, not op {}", call.op));
        }
        let tensors = wire::from_wire_all(&call.tensors).map_err(|e| e.to_string())?;
        let req = rollout_wire::decode(tensors).map_err(|e| e.to_string())?;
        let gen = self.generate(&req).map_err(|e| e.to_string())?;
        wire::to_wire_all(&rollout_wire::encode_reply(&gen)).map_err(|e| e.to_string())
    }
}

/// Starts the thread that hosts the roles `a` assigns (reward + critic, or
/// rollout worker `a.target`).
pub(super) fn start_host(a: AssignRoles, device: Device, running: &Running, events: &UnboundedSender<WorkerMessage>) {
    let rollout = a.roles.contains(&(Role::Rollout as i32));
    let (tx, rx) = std::sync::mpsc::channel::<RoleCall>();
    {
        let Ok(mut st) = running.lock() else { return };
        let hosts = if rollout { &mut st.rollout_hosts } else { &mut st.role_hosts };
        if hosts.contains_key(&a.job_id) {
            return;
        }
        hosts.insert(a.job_id.clone(), (a.target, tx));
    }
    let (running, events) = (running.clone(), events.clone());
    let what = if rollout { format!("rollout worker {}", a.target) } else { "reward and critic roles".to_string() };
    let spawned = std::thread::Builder::new().name(format!("roles-{}", a.job_id)).spawn(move || {
        super::yield_to_daemon();
        info!(job_id = %a.job_id, "hosting {what}");
        if rollout {
            serve_calls::<RolloutHost>(rx, device, &events, Path::new(&a.output_dir));
        } else {
            serve_calls::<(RoleHost, PpoSpec)>(rx, device, &events, Path::new(&a.output_dir));
        }
        if let Ok(mut st) = running.lock() {
            let hosts = if rollout { &mut st.rollout_hosts } else { &mut st.role_hosts };
            hosts.remove(&a.job_id);
        }
        info!(job_id = %a.job_id, "{what} released");
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start role host thread");
    }
}

/// Replies a host keeps for calls a trainer may send again.
const REPLAYABLE: usize = 16;

/// Serves calls until the sender is dropped (the roles are released). A
/// call seen before (a trainer resends its unanswered calls after a
/// reconnect) gets its first reply again; it never runs twice (a critic
/// step twice would train twice).
/// Ops whose `path` is a directory the host writes or reads: it must lie
/// inside the job's output dir.
fn check_dir(call: &RoleCall, job_dir: &Path) -> Result<(), String> {
    let dir_ops = [ops::WireOp::SaveCritic as i32, ops::WireOp::Checkpoint as i32, ops::WireOp::Restore as i32];
    if !dir_ops.contains(&call.op) {
        return Ok(());
    }
    let p = Path::new(&call.path);
    let inside = p.starts_with(job_dir) && !p.components().any(|c| c == std::path::Component::ParentDir);
    if inside {
        Ok(())
    } else {
        Err(format!("role call path {:?} is outside the job's directory {}", call.path, job_dir.display()))
    }
}

fn serve_calls<H: Host>(
    rx: Receiver<RoleCall>,
    device: Device,
    events: &UnboundedSender<WorkerMessage>,
    job_dir: &Path,
) {
    let mut host: Option<H> = None;
    let mut served: std::collections::VecDeque<RoleReply> = std::collections::VecDeque::new();
    let caught = |p: Box<dyn std::any::Any + Send>| format!("internal error: {}", super::panic_message(&p));
    for call in rx {
        if let Some(r) = served.iter().find(|r| r.call_id == call.call_id) {
            let _ = events.send(WorkerMessage { msg: Some(worker_message::Msg::RoleReply(r.clone())) });
            continue;
        }
        let result = if let Err(e) = check_dir(&call, job_dir) {
            warn!(job_id = %call.job_id, "{e}");
            Err(e)
        } else if call.op == ops::WireOp::Init as i32 {
            std::panic::catch_unwind(|| H::build(&call.path, device)).unwrap_or_else(|p| Err(caught(p))).map(|h| {
                host = Some(h);
                Vec::new()
            })
        } else {
            match &mut host {
                Some(h) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.serve(&call)))
                    .unwrap_or_else(|p| Err(caught(p))),
                None => Err("role host not initialised (no init call yet)".to_string()),
            }
        };
        let (error, tensors) = match result {
            Ok(t) => (String::new(), t),
            Err(e) => (e, Vec::new()),
        };
        let reply = RoleReply {
            job_id: call.job_id.clone(),
            call_id: call.call_id,
            error,
            tensors,
            role: call.role,
            target: call.target,
            lost: false,
        };
        served.push_back(reply.clone());
        if served.len() > REPLAYABLE {
            served.pop_front();
        }
        let _ = events.send(WorkerMessage { msg: Some(worker_message::Msg::RoleReply(reply)) });
    }
}

/// The trainer's handle on roles hosted elsewhere.
pub(super) struct ChannelRoles {
    job_id: String,
    /// Reward and critic are hosted elsewhere.
    remote_roles: bool,
    rollout_workers: usize,
    events: UnboundedSender<WorkerMessage>,
    replies: Receiver<RoleReply>,
    cancel: Arc<AtomicBool>,
    next: u64,
    bytes: u64,
    /// Rollout calls in flight → their target.
    pending: HashMap<u64, u32>,
    /// Replies that came while waiting for another call.
    early: HashMap<u64, RoleReply>,
    /// Rollout workers reported lost.
    lost: BTreeSet<u32>,
    /// Where unanswered calls are kept for a resend after a reconnect.
    running: Running,
    /// Calls in flight → when they were sent.
    sent_at: HashMap<u64, Instant>,
}

/// How long a trainer waits for one role call (`RLHF_ROLE_CALL_TIMEOUT_S`,
/// default 900 s: a rollout share of a large batch on a slow device takes
/// minutes). Past it the job fails as retryable and is requeued.
fn call_deadline() -> Duration {
    let secs = std::env::var("RLHF_ROLE_CALL_TIMEOUT_S").ok().and_then(|s| s.parse().ok()).unwrap_or(900u64);
    Duration::from_secs(secs)
}

impl ChannelRoles {
    pub(super) fn new(
        a: &AssignTask,
        events: UnboundedSender<WorkerMessage>,
        replies: Receiver<RoleReply>,
        cancel: Arc<AtomicBool>,
        running: Running,
    ) -> Self {
        Self {
            job_id: a.job_id.clone(),
            remote_roles: a.remote_roles,
            rollout_workers: a.rollout_workers as usize,
            events,
            replies,
            cancel,
            next: 0,
            bytes: 0,
            pending: HashMap::new(),
            early: HashMap::new(),
            lost: BTreeSet::new(),
            running,
            sent_at: HashMap::new(),
        }
    }

    /// The call is answered (or abandoned): no resend, no deadline.
    fn settled(&mut self, call: u64) {
        self.sent_at.remove(&call);
        if let Ok(mut st) = self.running.lock() {
            st.calls.remove(&(self.job_id.clone(), call));
        }
    }

    fn send(
        &mut self,
        role: Role,
        target: u32,
        kind: ops::WireOp,
        path: String,
        ts: &[(String, Tensor)],
    ) -> Result<u64> {
        let tensors = wire::to_wire_all(ts)?;
        self.bytes += wire::bytes(&tensors);
        self.next += 1;
        let call = RoleCall {
            job_id: self.job_id.clone(),
            call_id: self.next,
            op: kind as i32,
            path,
            tensors,
            role: role as i32,
            target,
        };
        let msg = WorkerMessage { msg: Some(worker_message::Msg::RoleCall(call)) };
        if let Ok(mut st) = self.running.lock() {
            st.calls.insert((self.job_id.clone(), self.next), msg.clone());
        }
        self.sent_at.insert(self.next, Instant::now());
        self.events.send(msg).map_err(|_| Error::RoleHost("worker is shutting down".into()))?;
        Ok(self.next)
    }

    /// Waits for the reply to `call`.
    fn wait(&mut self, call: u64) -> Result<Vec<(String, Tensor)>> {
        let r = self.wait_inner(call);
        self.settled(call);
        r
    }

    fn wait_inner(&mut self, call: u64) -> Result<Vec<(String, Tensor)>> {
        let deadline = call_deadline();
        loop {
            if self.sent_at.get(&call).is_some_and(|t| t.elapsed() > deadline) {
                return Err(Error::RoleHost(format!(
                    "no reply to role call {call} within {}s (RLHF_ROLE_CALL_TIMEOUT_S)",
                    deadline.as_secs()
                )));
            }
            if let Some(&target) = self.pending.get(&call) {
                if self.lost.contains(&target) {
                    self.pending.remove(&call);
                    return Err(Error::RolloutLost { target: target as usize, msg: "lost".into() });
                }
            }
            if let Some(r) = self.early.remove(&call) {
                self.pending.remove(&call);
                if r.lost {
                    self.lost.insert(r.target);
                    return Err(Error::RolloutLost { target: r.target as usize, msg: r.error });
                }
                if !r.error.is_empty() {
                    let who = if r.role == Role::Rollout as i32 {
                        format!("rollout worker {}", r.target)
                    } else {
                        "role host".into()
                    };
                    return Err(Error::RoleHost(format!("{who}: {}", r.error)));
                }
                self.bytes += wire::bytes(&r.tensors);
                return wire::from_wire_all(&r.tensors);
            }
            match self.replies.recv_timeout(Duration::from_millis(200)) {
                Ok(r) if r.call_id == 0 && r.lost => {
                    warn!(job_id = %self.job_id, target = r.target, error = %r.error, "rollout worker lost");
                    self.lost.insert(r.target);
                }
                Ok(r) if r.call_id == call || self.pending.contains_key(&r.call_id) => {
                    self.early.insert(r.call_id, r);
                }
                Ok(_) => continue, // a reply to an abandoned call
                Err(RecvTimeoutError::Timeout) => {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(Error::RoleHost("role replies closed".into())),
            }
        }
    }
}

impl RemoteRoles for ChannelRoles {
    fn hosts_reward_critic(&self) -> bool {
        self.remote_roles
    }

    fn call(&mut self, op: RoleOp) -> Result<Vec<(String, Tensor)>> {
        let (kind, path, ts) = ops::encode(&op);
        let call = self.send(Role::Reward, 0, kind, path, &ts)?;
        self.wait(call)
    }

    fn rollout_workers(&self) -> usize {
        self.rollout_workers
    }

    fn send_rollout(&mut self, target: usize, op: &RolloutOp) -> Result<u64> {
        let target = target as u32;
        if self.lost.contains(&target) {
            return Err(Error::RolloutLost { target: target as usize, msg: "lost".into() });
        }
        let call = match op {
            RolloutOp::Init { spec_toml } => {
                self.send(Role::Rollout, target, ops::WireOp::Init, spec_toml.clone(), &[])?
            }
            RolloutOp::Generate(req) => {
                self.send(Role::Rollout, target, ops::WireOp::Generate, String::new(), &rollout_wire::encode(req))?
            }
        };
        self.pending.insert(call, target);
        Ok(call)
    }

    fn wait_rollout(&mut self, call: u64) -> Result<Vec<(String, Tensor)>> {
        self.wait(call)
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_calls_may_only_name_dirs_inside_the_job() {
        let call = |op: ops::WireOp, path: &str| RoleCall { op: op as i32, path: path.into(), ..Default::default() };
        let job = Path::new("/data/jobs/j1");
        assert!(check_dir(&call(ops::WireOp::Checkpoint, "/data/jobs/j1/checkpoints/.tmp-step-3"), job).is_ok());
        assert!(check_dir(&call(ops::WireOp::SaveCritic, "/data/jobs/j1/stages/ppo/critic"), job).is_ok());
        for bad in ["/etc", "/data/jobs/j2/critic", "/data/jobs/j1/../j2", "relative"] {
            for op in [ops::WireOp::Checkpoint, ops::WireOp::Restore, ops::WireOp::SaveCritic] {
                assert!(check_dir(&call(op, bad), job).unwrap_err().contains("outside the job's directory"), "{bad}");
            }
        }
        // Init carries TOML, not a directory.
        assert!(check_dir(&call(ops::WireOp::Init, "version = 1"), job).is_ok());
    }
}
