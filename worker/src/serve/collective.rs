//! A data-parallel rank's collectives through the coordinator: each call
//! sends this rank's part and waits for the summed (or gathered) result.
//! The last unanswered part stays in the daemon's state and is sent again
//! after a reconnect, so a restarted coordinator completes the round; the
//! part before it is kept too, for a coordinator that restarted after only
//! some ranks got that round's result (it asks for the part again).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use rlhf_common::spec::CollectiveSpec;
use rlhf_proto::{worker_message, Collective as Part, CollectiveOp, CollectiveResult, TensorData, WorkerMessage};
use tch::Device;
use tokio::sync::mpsc::UnboundedSender;

use super::Running;
use crate::error::{Error, Result};
use crate::parallel::{nccl, Collective};

/// Values per coordinator-relayed sum round: 8 Mi f32 = 32 MiB, half the
/// coordinator's message bound.
pub const SUM_CHUNK: usize = 8 << 20;

pub(super) struct Relay {
    job_id: String,
    rank: usize,
    world: usize,
    round: u64,
    /// This rank's part of the round before `round`.
    previous: Option<WorkerMessage>,
    events: UnboundedSender<WorkerMessage>,
    results: Receiver<CollectiveResult>,
    cancel: Arc<AtomicBool>,
    running: Running,
}

impl Relay {
    pub(super) fn new(
        job_id: String,
        (rank, world): (usize, usize),
        events: UnboundedSender<WorkerMessage>,
        results: Receiver<CollectiveResult>,
        cancel: Arc<AtomicBool>,
        running: Running,
    ) -> Self {
        Self { job_id, rank, world, round: 0, previous: None, events, results, cancel, running }
    }

    fn exchange(&mut self, op: CollectiveOp, tensors: Vec<TensorData>, payload: Vec<u8>) -> Result<CollectiveResult> {
        let part = Part {
            job_id: self.job_id.clone(),
            round: self.round,
            rank: self.rank as u32,
            world: self.world as u32,
            op: op as i32,
            tensors,
            payload,
        };
        let msg = WorkerMessage { msg: Some(worker_message::Msg::Collective(part)) };
        if let Ok(mut st) = self.running.lock() {
            st.outstanding.insert(self.job_id.clone(), msg.clone());
        }
        self.events.send(msg.clone()).map_err(|_| Error::Collective("worker is shutting down".into()))?;
        let r = loop {
            match self.results.recv_timeout(Duration::from_millis(200)) {
                Ok(r) if r.resend_part => {
                    if let Some(p) = self.previous.as_ref().filter(|_| r.round + 1 == self.round) {
                        let _ = self.events.send(p.clone());
                    }
                }
                Ok(r) if r.round == self.round => break r,
                Ok(_) => continue, // a repeated result of an earlier round
                Err(RecvTimeoutError::Timeout) => {
                    if self.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Collective("collective results closed".into()))
                }
            }
        };
        if let Ok(mut st) = self.running.lock() {
            st.outstanding.remove(&self.job_id);
        }
        self.round += 1;
        self.previous = Some(msg);
        if !r.error.is_empty() {
            return Err(Error::Collective(r.error));
        }
        Ok(r)
    }
}

impl Collective for Relay {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    /// In rounds of at most [`SUM_CHUNK`] values, so that no message nears
    /// the coordinator's size bound (a full fine-tune's gradients are GBs).
    fn sum_f32(&mut self, v: Vec<f32>) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(v.len());
        for chunk in v.chunks(SUM_CHUNK).map(<[f32]>::to_vec).chain(v.is_empty().then(Vec::new)) {
            let n = chunk.len();
            let t = TensorData { name: "sum".into(), shape: vec![n as i64], f32: chunk, i64: Vec::new() };
            let mut r = self.exchange(CollectiveOp::Sum, vec![t], Vec::new())?;
            let part =
                r.tensors.pop().map(|t| t.f32).ok_or_else(|| Error::Collective("the sum came back empty".into()))?;
            if part.len() != n {
                return Err(Error::Collective(format!("a sum chunk came back with {} of {n} values", part.len())));
            }
            out.extend(part);
        }
        Ok(out)
    }
    fn gather(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let r = self.exchange(CollectiveOp::Gather, Vec::new(), bytes)?;
        if r.payloads.len() != self.world {
            return Err(Error::Collective(format!("gathered {} parts for {} ranks", r.payloads.len(), self.world)));
        }
        Ok(r.payloads)
    }
}

/// The collective a rank uses: the relay, or NCCL over it. The ranks first
/// tell each other their device; `auto` picks NCCL only when every rank is
/// on a GPU of its own with NCCL loadable (two ranks on one GPU cannot share
/// an NCCL communicator).
pub(super) fn connect(relay: Relay, how: CollectiveSpec, device: Device) -> Result<Box<dyn Collective>> {
    let mut relay = relay;
    if how == CollectiveSpec::Coordinator {
        return Ok(Box::new(relay));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let me = format!("{}{}:{device:?}", u8::from(device.is_cuda() && nccl::available()), host.trim());
    let all: Vec<String> =
        relay.gather(me.into_bytes())?.into_iter().map(|b| String::from_utf8_lossy(&b).into_owned()).collect();
    let shared = all.iter().enumerate().find(|(i, d)| all[..*i].contains(d)).map(|(_, d)| d[1..].to_string());
    let ready = all.iter().all(|d| d.starts_with('1'));
    match (how, ready, shared) {
        (CollectiveSpec::Nccl, false, _) => {
            Err(Error::Collective("placement.collective = \"nccl\" needs every rank on a GPU with NCCL loadable; use \"coordinator\" or \"auto\"".into()))
        }
        (CollectiveSpec::Nccl, true, Some(d)) => {
            Err(Error::Collective(format!("placement.collective = \"nccl\": two ranks share {d}; NCCL needs a GPU per rank (use \"coordinator\" or \"auto\")")))
        }
        (_, true, None) => Ok(Box::new(nccl::NcclRank::init(Box::new(relay), device)?)),
        _ => Ok(Box::new(relay)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn sum_result(round: u64, v: f32) -> CollectiveResult {
        let t = TensorData { name: "sum".into(), shape: vec![1], f32: vec![v], i64: Vec::new() };
        CollectiveResult { job_id: "j".into(), round, tensors: vec![t], ..Default::default() }
    }

    /// A restarted coordinator asks for the part of the round before the
    /// current one: the relay sends it again and goes on waiting for the
    /// current round's result (ignoring the earlier round's repeat).
    #[test]
    fn a_request_for_the_previous_part_sends_it_again() {
        let (events, mut sent) = tokio::sync::mpsc::unbounded_channel();
        let (results, rx) = std::sync::mpsc::channel();
        let running = Arc::new(Mutex::new(super::super::State::default()));
        let mut relay = Relay::new("j".into(), (1, 2), events, rx, Arc::new(AtomicBool::new(false)), running);
        results.send(sum_result(0, 3.0)).unwrap();
        assert_eq!(relay.sum_f32(vec![2.0]).unwrap(), vec![3.0]);
        let ask = CollectiveResult { job_id: "j".into(), round: 0, resend_part: true, ..Default::default() };
        results.send(ask).unwrap();
        results.send(sum_result(0, 3.0)).unwrap();
        results.send(sum_result(1, 30.0)).unwrap();
        assert_eq!(relay.sum_f32(vec![20.0]).unwrap(), vec![30.0]);
        let parts: Vec<(u64, f32)> = std::iter::from_fn(|| sent.try_recv().ok())
            .map(|m| match m.msg {
                Some(worker_message::Msg::Collective(p)) => (p.round, p.tensors[0].f32[0]),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(parts, vec![(0, 2.0), (1, 20.0), (0, 2.0)]);
    }
}
