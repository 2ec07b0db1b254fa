//! The scheduler is an actor: one task owns the store and the worker
//! registry; everything else talks to it through [`Handle`] with
//! `oneshot` replies. It queues jobs, places them on idle workers, holds
//! worker leases (heartbeats), requeues the jobs of lost workers, and
//! reconciles what workers say they run with what the store says.

mod actor;
#[cfg(test)]
mod fuzz;
mod groups;

use std::path::PathBuf;
use std::time::Duration;

use rlhf_proto::{worker_message, CoordinatorMessage, Register};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::store::{EventRow, JobRow, Store};

pub use actor::WorkerInfo;

/// A snapshot for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub jobs_by_state: Vec<(String, u64)>,
    pub workers_alive: u64,
    pub workers_total: u64,
    /// How long the oldest queued job has waited (0: none queued).
    pub oldest_queued_s: f64,
    pub running: Vec<RunningJob>,
    pub relayed_bytes_total: u64,
}

#[derive(Clone, Debug, Default)]
pub struct RunningJob {
    pub id: String,
    pub name: String,
    pub step: u64,
    pub reward_mean: Option<f64>,
    pub kl: Option<f64>,
    pub steps_per_s: f64,
}

/// A job's events, a page of its metrics records, and how many it has.
pub type Logs = (Vec<EventRow>, Vec<String>, u64);

/// Outbound channel of one worker connection.
pub type WorkerTx = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

pub(crate) enum Command {
    Submit {
        spec_toml: String,
        request_id: Option<String>,
        owner: String,
        reply: oneshot::Sender<Result<(JobRow, bool)>>,
    },
    Get {
        id: String,
        reply: oneshot::Sender<Result<JobRow>>,
    },
    List {
        reply: oneshot::Sender<Result<Vec<JobRow>>>,
    },
    Cancel {
        id: String,
        by: Identity,
        reply: oneshot::Sender<Result<JobRow>>,
    },
    Workers {
        reply: oneshot::Sender<Vec<WorkerInfo>>,
    },
    Logs {
        id: String,
        /// The page of metrics records: offset, limit.
        page: (u64, u32),
        reply: oneshot::Sender<Result<Logs>>,
    },
    Connected {
        reg: Register,
        tx: WorkerTx,
        conn: u64,
        /// Err: the session is refused, with why.
        accepted: oneshot::Sender<std::result::Result<(), String>>,
    },
    Message {
        worker: String,
        conn: u64,
        msg: worker_message::Msg,
    },
    Disconnected {
        worker: String,
        conn: u64,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
    /// A data-parallel sum computed off the actor's task.
    Summed {
        result: rlhf_proto::CollectiveResult,
    },
    Tick,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// A worker with no heartbeat for this long is lost.
    pub lease: Duration,
    /// Roots that job files may read from (empty: anywhere).
    pub allow_read: Vec<PathBuf>,
    /// Fail a job whose placement the connected workers can never meet
    /// (a batch allocation's cluster does not grow) instead of queueing it.
    pub fail_unplaceable: bool,
}

/// The way into the scheduler actor.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    updates: broadcast::Sender<JobRow>,
    pub data_dir: PathBuf,
}

impl Handle {
    /// Starts the actor (and its lease ticker) on the current runtime.
    pub fn spawn(cfg: Config) -> Result<Self> {
        std::fs::create_dir_all(cfg.data_dir.join("jobs"))
            .map_err(|e| Error::Store(format!("{}: {e}", cfg.data_dir.display())))?;
        let store = Store::open(&cfg.data_dir.join("state.db"))?;
        let (tx, rx) = mpsc::channel(1024);
        let (updates, _) = broadcast::channel(1024);
        let data_dir = cfg.data_dir.clone();
        let tick_every = (cfg.lease / 4).max(Duration::from_millis(50));
        tokio::spawn(actor::Scheduler::new(store, cfg, updates.clone(), tx.clone()).run(rx));
        let ticker = tx.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(tick_every);
            loop {
                iv.tick().await;
                if ticker.send(Command::Tick).await.is_err() {
                    break;
                }
            }
        });
        Ok(Self { tx, updates, data_dir })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Error::Unavailable)?;
        rx.await.map_err(|_| Error::Unavailable)
    }

    pub async fn submit(&self, spec_toml: String, request_id: Option<String>, owner: String) -> Result<(JobRow, bool)> {
        self.ask(|reply| Command::Submit { spec_toml, request_id, owner, reply }).await?
    }

    pub async fn get(&self, id: String) -> Result<JobRow> {
        self.ask(|reply| Command::Get { id, reply }).await?
    }

    pub async fn list(&self) -> Result<Vec<JobRow>> {
        self.ask(|reply| Command::List { reply }).await?
    }

    pub async fn cancel(&self, id: String, by: Identity) -> Result<JobRow> {
        self.ask(|reply| Command::Cancel { id, by, reply }).await?
    }

    pub async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.ask(|reply| Command::Workers { reply }).await
    }

    /// Events, a page of metrics records, and how many records there are.
    pub async fn logs(&self, id: String, offset: u64, limit: u32) -> Result<Logs> {
        self.ask(|reply| Command::Logs { id, page: (offset, limit), reply }).await?
    }

    pub async fn stats(&self) -> Result<Stats> {
        self.ask(|reply| Command::Stats { reply }).await
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobRow> {
        self.updates.subscribe()
    }

    /// Resolves when the scheduler actor has stopped (it panicked).
    pub async fn stopped(&self) {
        self.tx.closed().await
    }

    pub(crate) async fn send(&self, cmd: Command) {
        let _ = self.tx.send(cmd).await;
    }

    /// The directory a job writes to.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("jobs").join(id)
    }
}

#[cfg(test)]
mod tests {
    use rlhf_proto::{coordinator_message, Heartbeat, TaskResult, WorkerJobs};

    use super::*;
    use crate::state::JobState;

    const SPEC: &str = "version = 1\nkind = \"sft\"\n[model]\npath = \"/m\"\n[peft]\nmethod = \"lora\"\n[data]\ntask = \"eprstmt\"\ntrain = \"/t.json\"\n";

    /// A scheduler on `dir` with lease `lease`, and worker "w1" (cpu-0)
    /// connected: the handle and what the worker is sent.
    async fn with_worker(
        dir: &std::path::Path,
        lease: Duration,
    ) -> (Handle, mpsc::Receiver<std::result::Result<CoordinatorMessage, tonic::Status>>) {
        let cfg = Config { data_dir: dir.to_path_buf(), lease, allow_read: Vec::new(), fail_unplaceable: false };
        let h = Handle::spawn(cfg).unwrap();
        let (tx, rx) = mpsc::channel(64);
        let reg = Register {
            worker_id: "w1".into(),
            name: "cpu-0".into(),
            device: "cpu".into(),
            session_key: "0123456789abcdef".into(),
            ..Default::default()
        };
        let (accepted, verdict) = oneshot::channel();
        h.send(Command::Connected { reg, tx, conn: 1, accepted }).await;
        verdict.await.unwrap().unwrap();
        (h, rx)
    }

    /// The next assignment sent to the worker: (job id, attempt).
    async fn assigned(
        rx: &mut mpsc::Receiver<std::result::Result<CoordinatorMessage, tonic::Status>>,
    ) -> (String, u32) {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("an assignment")
                .expect("open")
                .expect("ok");
            if let Some(coordinator_message::Msg::Assign(a)) = m.msg {
                return (a.job_id, a.attempt);
            }
        }
    }

    /// A long queue that no worker can take (each job wants an absent
    /// trainer) while a worker is idle: every message makes the actor try
    /// to place the queue again. Each spec is parsed once, not on every
    /// message, so a message costs less than parsing the queue once did.
    #[tokio::test]
    async fn a_long_unplaceable_queue_keeps_each_message_cheap() {
        let tmp = tempfile::tempdir().unwrap();
        let (h, _rx) = with_worker(tmp.path(), Duration::from_secs(60)).await;
        let spec = format!("{SPEC}[placement]\ntrainer = \"gpu-9\"\n");
        let queue = 300;
        for _ in 0..queue {
            h.submit(spec.clone(), None, "admin".into()).await.unwrap();
        }
        let beat = || Command::Message {
            worker: "w1".into(),
            conn: 1,
            msg: worker_message::Msg::Heartbeat(Heartbeat { jobs: Some(WorkerJobs::default()) }),
        };
        let n = 100;
        let t = std::time::Instant::now();
        for _ in 0..n {
            h.send(beat()).await;
        }
        h.list().await.unwrap(); // behind every heartbeat in the actor's inbox
        let per_message = t.elapsed() / n;
        // As long a span as the messages took, so that both see the same
        // contention from other tests.
        let t = std::time::Instant::now();
        for _ in 0..n {
            for _ in 0..queue {
                rlhf_common::JobSpec::from_toml(&spec).unwrap();
            }
        }
        let parse_queue = t.elapsed() / n;
        eprintln!("{queue} queued: {per_message:?} per heartbeat; parsing the queue once: {parse_queue:?}");
        assert!(per_message < parse_queue, "{per_message:?} per message, {parse_queue:?} to parse the queue");
        let queued = h.list().await.unwrap().iter().filter(|j| matches!(j.state, JobState::Queued)).count();
        assert_eq!(queued, queue);
    }

    /// A job requeued and assigned again to the same worker: the result of
    /// its first attempt (a cancelled run that reports late) must not end
    /// the second one; the second attempt's result does.
    #[tokio::test]
    async fn a_late_result_of_an_earlier_attempt_does_not_end_the_current_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (h, mut rx) = with_worker(tmp.path(), Duration::from_millis(200)).await;
        let (job, _) = h.submit(SPEC.into(), None, "admin".into()).await.unwrap();
        assert_eq!(assigned(&mut rx).await, (job.id.clone(), 1));
        let beat = |jobs: Vec<String>| Command::Message {
            worker: "w1".into(),
            conn: 1,
            msg: worker_message::Msg::Heartbeat(Heartbeat {
                jobs: Some(WorkerJobs { running: jobs, ..Default::default() }),
            }),
        };
        // Alive past the "recently assigned" grace, then no longer running
        // the job: it is requeued and assigned again, to the same worker.
        for _ in 0..10 {
            h.send(beat(vec![job.id.clone()])).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // (The first beat requeues it; the slot counts the stale assignment
        // until the next beat frees the worker for the new one.)
        // Heartbeats go on through the requeue's backoff.
        let again = loop {
            h.send(beat(Vec::new())).await;
            if let Ok(a) = tokio::time::timeout(Duration::from_millis(50), assigned(&mut rx)).await {
                break a;
            }
        };
        assert_eq!(again, (job.id.clone(), 2));
        let result = |attempt: u32, ok: bool| Command::Message {
            worker: "w1".into(),
            conn: 1,
            msg: worker_message::Msg::Result(TaskResult {
                job_id: job.id.clone(),
                ok,
                cancelled: !ok,
                reason: "r".into(),
                attempt,
                retry: false,
            }),
        };
        h.send(result(1, false)).await;
        let j = h.get(job.id.clone()).await.unwrap();
        assert!(matches!(j.state, JobState::Running { .. }) && j.attempts == 2, "{j:?}");
        h.send(result(2, true)).await;
        let j = h.get(job.id.clone()).await.unwrap();
        assert!(matches!(j.state, JobState::Succeeded), "{j:?}");
    }

    /// A worker whose heartbeats stop past its lease while it still trains
    /// (every core busy) comes back, reporting the job it runs: the job is
    /// given back to it, still attempt 1, and is never assigned a second
    /// time; that attempt's result ends it.
    #[tokio::test]
    async fn a_worker_back_from_a_lost_lease_keeps_its_attempt() {
        let tmp = tempfile::tempdir().unwrap();
        let lease = Duration::from_millis(300);
        let (h, mut rx) = with_worker(tmp.path(), lease).await;
        let (job, _) = h.submit(SPEC.into(), None, "admin".into()).await.unwrap();
        assert_eq!(assigned(&mut rx).await, (job.id.clone(), 1));
        // Silent past the lease: the ticker finds it lost and requeues the job.
        let requeued = loop {
            tokio::time::sleep(lease / 2).await;
            let j = h.get(job.id.clone()).await.unwrap();
            if matches!(j.state, JobState::Queued) {
                break j;
            }
        };
        assert_eq!(requeued.attempts, 1);
        // It reconnects (same id and session key), still running attempt 1.
        let (tx, mut rx2) = mpsc::channel(64);
        let reg = Register {
            worker_id: "w1".into(),
            name: "cpu-0".into(),
            device: "cpu".into(),
            session_key: "0123456789abcdef".into(),
            jobs: Some(WorkerJobs { running: vec![job.id.clone()], ..Default::default() }),
            ..Default::default()
        };
        let (accepted, verdict) = oneshot::channel();
        h.send(Command::Connected { reg, tx, conn: 2, accepted }).await;
        verdict.await.unwrap().unwrap();
        let j = h.get(job.id.clone()).await.unwrap();
        assert!(matches!(&j.state, JobState::Running { worker } if worker == "w1") && j.attempts == 1, "{j:?}");
        // Beyond the backoff, it is neither cancelled nor assigned again.
        for _ in 0..6 {
            let beat = Command::Message {
                worker: "w1".into(),
                conn: 2,
                msg: worker_message::Msg::Heartbeat(Heartbeat {
                    jobs: Some(WorkerJobs { running: vec![job.id.clone()], ..Default::default() }),
                }),
            };
            h.send(beat).await;
            tokio::time::sleep(lease / 2).await;
        }
        while let Ok(m) = rx2.try_recv() {
            let m = m.unwrap().msg;
            assert!(
                !matches!(m, Some(coordinator_message::Msg::Assign(_)) | Some(coordinator_message::Msg::Cancel(_))),
                "{m:?}"
            );
        }
        let done = Command::Message {
            worker: "w1".into(),
            conn: 2,
            msg: worker_message::Msg::Result(TaskResult {
                job_id: job.id.clone(),
                ok: true,
                cancelled: false,
                reason: String::new(),
                attempt: 1,
                retry: false,
            }),
        };
        h.send(done).await;
        let j = h.get(job.id.clone()).await.unwrap();
        assert!(matches!(j.state, JobState::Succeeded) && j.attempts == 1, "{j:?}");
    }
}
