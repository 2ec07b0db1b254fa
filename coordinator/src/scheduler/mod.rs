//! The scheduler is an actor: one task owns the store and the worker
//! registry; everything else talks to it through [`Handle`] with
//! `oneshot` replies. It queues jobs, places them on idle workers, holds
//! worker leases (heartbeats), requeues the jobs of lost workers, and
//! reconciles what workers say they run with what the store says.

mod actor;
mod groups;

use std::path::PathBuf;
use std::time::Duration;

use rlhf_proto::{worker_message, CoordinatorMessage, Register};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::store::{EventRow, JobRow, Store};

pub use actor::WorkerInfo;

/// Outbound channel of one worker connection.
pub type WorkerTx = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

pub(crate) enum Command {
    Submit { spec_toml: String, request_id: Option<String>, reply: oneshot::Sender<Result<(JobRow, bool)>> },
    Get { id: String, reply: oneshot::Sender<Result<JobRow>> },
    List { reply: oneshot::Sender<Result<Vec<JobRow>>> },
    Cancel { id: String, reply: oneshot::Sender<Result<JobRow>> },
    Workers { reply: oneshot::Sender<Vec<WorkerInfo>> },
    Logs { id: String, reply: oneshot::Sender<Result<(Vec<EventRow>, Vec<String>)>> },
    Connected { reg: Register, tx: WorkerTx, conn: u64 },
    Message { worker: String, conn: u64, msg: worker_message::Msg },
    Disconnected { worker: String, conn: u64 },
    Tick,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// A worker with no heartbeat for this long is lost.
    pub lease: Duration,
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
        std::fs::create_dir_all(cfg.data_dir.join("jobs")).map_err(|e| Error::Store(format!("{}: {e}", cfg.data_dir.display())))?;
        let store = Store::open(&cfg.data_dir.join("state.db"))?;
        let (tx, rx) = mpsc::channel(1024);
        let (updates, _) = broadcast::channel(1024);
        let data_dir = cfg.data_dir.clone();
        let tick_every = (cfg.lease / 4).max(Duration::from_millis(50));
        tokio::spawn(actor::Scheduler::new(store, cfg, updates.clone()).run(rx));
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

    pub async fn submit(&self, spec_toml: String, request_id: Option<String>) -> Result<(JobRow, bool)> {
        self.ask(|reply| Command::Submit { spec_toml, request_id, reply }).await?
    }

    pub async fn get(&self, id: String) -> Result<JobRow> {
        self.ask(|reply| Command::Get { id, reply }).await?
    }

    pub async fn list(&self) -> Result<Vec<JobRow>> {
        self.ask(|reply| Command::List { reply }).await?
    }

    pub async fn cancel(&self, id: String) -> Result<JobRow> {
        self.ask(|reply| Command::Cancel { id, reply }).await?
    }

    pub async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        self.ask(|reply| Command::Workers { reply }).await
    }

    pub async fn logs(&self, id: String) -> Result<(Vec<EventRow>, Vec<String>)> {
        self.ask(|reply| Command::Logs { id, reply }).await?
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobRow> {
        self.updates.subscribe()
    }

    pub(crate) async fn send(&self, cmd: Command) {
        let _ = self.tx.send(cmd).await;
    }

    /// The directory a job writes to.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("jobs").join(id)
    }
}
