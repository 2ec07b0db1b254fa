//! Remote reward/critic roles: the host side (a thread serving role calls
//! for one PPO job) and the trainer side ([`ChannelRoles`], whose calls
//! travel through the coordinator).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use rlhf_common::spec::{JobSpec, PpoSpec};
use rlhf_proto::*;
use tch::{Device, Tensor};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

use super::wire;
use super::Running;
use crate::error::{Error, Result};
use crate::train::ppo::roles::RemoteRoles;
use crate::train::ppo::roles::{wire as ops, RoleHost, RoleOp};

/// Starts a thread that hosts a job's reward and critic roles.
pub(super) fn start_host(a: AssignRoles, device: Device, running: &Running, events: &UnboundedSender<WorkerMessage>) {
    let (tx, rx) = std::sync::mpsc::channel::<RoleCall>();
    {
        let Ok(mut st) = running.lock() else { return };
        if st.role_hosts.contains_key(&a.job_id) {
            return;
        }
        st.role_hosts.insert(a.job_id.clone(), tx);
    }
    let running = running.clone();
    let events = events.clone();
    let spawned = std::thread::Builder::new().name(format!("roles-{}", a.job_id)).spawn(move || {
        info!(job_id = %a.job_id, "hosting reward and critic roles");
        // Built by the trainer's first call (`init`), with the resolved job.
        let mut setup: Option<(RoleHost, PpoSpec)> = None;
        for call in rx {
            let result = if call.op == ops::WireOp::Init as i32 {
                std::panic::catch_unwind(|| build(&call.path, device))
                    .unwrap_or_else(|p| Err(format!("internal error: {}", super::panic_message(&p))))
                    .map(|s| {
                        setup = Some(s);
                        Vec::new()
                    })
            } else {
                match &mut setup {
                    Some((host, ppo)) => {
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_one(host, ppo, &call)))
                            .unwrap_or_else(|p| Err(format!("internal error: {}", super::panic_message(&p))))
                    }
                    None => Err("role host not initialised (no init call yet)".to_string()),
                }
            };
            let (error, tensors) = match result {
                Ok(t) => (String::new(), t),
                Err(e) => (e, Vec::new()),
            };
            let reply = RoleReply { job_id: call.job_id.clone(), call_id: call.call_id, error, tensors };
            let _ = events.send(WorkerMessage { msg: Some(worker_message::Msg::RoleReply(reply)) });
        }
        if let Ok(mut st) = running.lock() {
            st.role_hosts.remove(&a.job_id);
        }
        info!(job_id = %a.job_id, "roles released");
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start role host thread");
    }
}

fn build(spec_toml: &str, device: Device) -> Result<(RoleHost, PpoSpec), String> {
    let spec = JobSpec::from_toml(spec_toml).map_err(|e| format!("role host job: {e}"))?;
    let ppo = spec.ppo.clone().ok_or_else(|| "role host job: ppo: required".to_string())?;
    let host = RoleHost::new(&spec, &ppo, device).map_err(|e| format!("role host: {e}"))?;
    Ok((host, ppo))
}

fn serve_one(host: &mut RoleHost, ppo: &PpoSpec, call: &RoleCall) -> Result<Vec<TensorData>, String> {
    let tensors = wire::from_wire_all(&call.tensors).map_err(|e| e.to_string())?;
    let op = ops::decode(call.op, call.path.clone(), tensors).map_err(|e| e.to_string())?;
    let out = host.serve(op, ppo).map_err(|e| format!("{e}"))?;
    wire::to_wire_all(&out).map_err(|e| e.to_string())
}

/// The trainer's handle on roles hosted elsewhere.
pub(super) struct ChannelRoles {
    job_id: String,
    events: UnboundedSender<WorkerMessage>,
    replies: Receiver<RoleReply>,
    cancel: Arc<AtomicBool>,
    next: u64,
    bytes: u64,
}

impl ChannelRoles {
    pub(super) fn new(
        job_id: String,
        events: UnboundedSender<WorkerMessage>,
        replies: Receiver<RoleReply>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Self { job_id, events, replies, cancel, next: 0, bytes: 0 }
    }
}

impl RemoteRoles for ChannelRoles {
    fn call(&mut self, op: RoleOp) -> Result<Vec<(String, Tensor)>> {
        let (kind, path, ts) = ops::encode(&op);
        let tensors = wire::to_wire_all(&ts)?;
        self.bytes += wire::bytes(&tensors);
        self.next += 1;
        let call = RoleCall { job_id: self.job_id.clone(), call_id: self.next, op: kind as i32, path, tensors };
        self.events
            .send(WorkerMessage { msg: Some(worker_message::Msg::RoleCall(call)) })
            .map_err(|_| Error::RoleHost("worker is shutting down".into()))?;
        loop {
            match self.replies.recv_timeout(Duration::from_millis(200)) {
                Ok(r) if r.call_id == self.next => {
                    if !r.error.is_empty() {
                        return Err(Error::RoleHost(format!("role host: {}", r.error)));
                    }
                    self.bytes += wire::bytes(&r.tensors);
                    return wire::from_wire_all(&r.tensors);
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

    fn bytes(&self) -> u64 {
        self.bytes
    }
}
