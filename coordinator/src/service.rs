//! gRPC handlers: decode → scheduler → encode, no logic.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use rlhf_proto::job_service_server::JobService;
use rlhf_proto::worker_service_server::WorkerService;
use rlhf_proto::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::http::GrpcStats;
use crate::scheduler::{Command, Handle};
use crate::state::JobState as State;
use crate::store::JobRow;

pub struct Jobs {
    pub sched: Handle,
    pub grpc: Arc<GrpcStats>,
}

pub struct Workers {
    pub sched: Handle,
    pub grpc: Arc<GrpcStats>,
    next_conn: AtomicU64,
    /// Open worker sessions.
    sessions: Arc<AtomicUsize>,
}

/// A worker must register this soon after opening its session.
const REGISTER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Worker sessions open at once (far above any cluster's workers).
const MAX_WORKER_SESSIONS: usize = 4096;

impl Workers {
    pub fn new(sched: Handle, grpc: Arc<GrpcStats>) -> Self {
        Self { sched, grpc, next_conn: AtomicU64::new(1), sessions: Arc::default() }
    }
}

fn job_proto(sched: &Handle, j: &JobRow) -> Job {
    let progress = serde_json::from_str::<serde_json::Value>(&j.progress).ok().map(|p| Progress {
        stage: p["stage"].as_str().unwrap_or_default().to_string(),
        step: p["step"].as_u64().unwrap_or(0),
        total: p["total"].as_u64().unwrap_or(0),
        metrics_json: p["metrics_json"].as_str().unwrap_or_default().to_string(),
    });
    Job {
        job_id: j.id.clone(),
        name: j.name.clone(),
        kind: rlhf_proto::JobKind::from_name(&j.kind) as i32,
        state: j.state.to_proto() as i32,
        reason: j.state.reason().to_string(),
        worker_id: j.state.worker().to_string(),
        attempts: j.attempts,
        created_at_ms: j.created_ms,
        updated_at_ms: j.updated_ms,
        progress,
        output_dir: sched.job_dir(&j.id).display().to_string(),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Jobs {
    async fn submit_job(&self, req: Request<SubmitJobRequest>) -> Result<Response<SubmitJobResponse>, Status> {
        let _t = self.grpc.timer("SubmitJob");
        let owner = auth::caller(&req)?.name;
        let r = req.into_inner();
        let rid = (!r.request_id.is_empty()).then_some(r.request_id);
        let (job, created) = self.sched.submit(r.spec_toml, rid, owner).await?;
        Ok(Response::new(SubmitJobResponse { job_id: job.id, created }))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<GetJobResponse>, Status> {
        let _t = self.grpc.timer("GetJob");
        let j = self.sched.get(req.into_inner().job_id).await?;
        Ok(Response::new(GetJobResponse { job: Some(job_proto(&self.sched, &j)) }))
    }

    async fn list_jobs(&self, _req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let _t = self.grpc.timer("ListJobs");
        let jobs = self.sched.list().await?.iter().map(|j| job_proto(&self.sched, j)).collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    type WatchJobStream = BoxStream<WatchJobResponse>;

    async fn watch_job(&self, req: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let _t = self.grpc.timer("WatchJob");
        let id = req.into_inner().job_id;
        let mut updates = self.sched.subscribe();
        let first = self.sched.get(id.clone()).await?;
        let sched = self.sched.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let done = first.state.is_terminal();
            if tx.send(Ok(WatchJobResponse { job: Some(job_proto(&sched, &first)) })).await.is_err() || done {
                return;
            }
            loop {
                match updates.recv().await {
                    Ok(j) if j.id == id => {
                        let done = j.state.is_terminal();
                        if tx.send(Ok(WatchJobResponse { job: Some(job_proto(&sched, &j)) })).await.is_err() || done {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: resend the current state.
                        if let Ok(j) = sched.get(id.clone()).await {
                            let done = j.state.is_terminal();
                            if tx.send(Ok(WatchJobResponse { job: Some(job_proto(&sched, &j)) })).await.is_err() || done
                            {
                                return;
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<CancelJobResponse>, Status> {
        let _t = self.grpc.timer("CancelJob");
        let by = auth::caller(&req)?;
        let j = self.sched.cancel(req.into_inner().job_id, by).await?;
        Ok(Response::new(CancelJobResponse { job: Some(job_proto(&self.sched, &j)) }))
    }

    async fn list_workers(&self, _req: Request<ListWorkersRequest>) -> Result<Response<ListWorkersResponse>, Status> {
        let _t = self.grpc.timer("ListWorkers");
        let workers = self
            .sched
            .workers()
            .await?
            .into_iter()
            .map(|w| Worker {
                worker_id: w.id,
                name: w.name,
                device: w.device,
                memory_bytes: w.memory_bytes,
                alive: w.alive,
                last_heartbeat_ms: w.last_seen_ms,
                running_jobs: w.running,
            })
            .collect();
        Ok(Response::new(ListWorkersResponse { workers }))
    }

    async fn get_job_logs(&self, req: Request<GetJobLogsRequest>) -> Result<Response<GetJobLogsResponse>, Status> {
        let _t = self.grpc.timer("GetJobLogs");
        let r = req.into_inner();
        let id = r.job_id;
        let limit = if r.metrics_limit == 0 { 10_000 } else { r.metrics_limit.min(10_000) };
        let (events, metrics, total) = self.sched.logs(id.clone(), r.metrics_offset, limit).await?;
        let events = events
            .into_iter()
            .map(|e| JobEvent {
                at_ms: e.at_ms,
                state: State::from_columns(&e.state, String::new(), String::new()).map_or(0, |s| s.to_proto() as i32),
                message: e.message,
            })
            .collect();
        let report = tokio::fs::read_to_string(self.sched.job_dir(&id).join("report.md")).await.unwrap_or_default();
        Ok(Response::new(GetJobLogsResponse {
            events,
            metrics_json: metrics,
            report_markdown: report,
            metrics_total: total,
        }))
    }
}

#[tonic::async_trait]
impl WorkerService for Workers {
    type SessionStream = BoxStream<CoordinatorMessage>;

    async fn session(&self, req: Request<Streaming<WorkerMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let _t = self.grpc.timer("Session");
        let mut inbound = req.into_inner();
        if self.sessions.load(Ordering::Relaxed) >= MAX_WORKER_SESSIONS {
            return Err(Status::resource_exhausted(format!("{MAX_WORKER_SESSIONS} worker sessions already open")));
        }
        let first = tokio::time::timeout(REGISTER_DEADLINE, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no register within 10 s of opening the session"))?
            .ok_or_else(|| Status::invalid_argument("empty worker stream"))??;
        let Some(worker_message::Msg::Register(reg)) = first.msg else {
            return Err(Status::invalid_argument("the first worker message must be register"));
        };
        if reg.worker_id.is_empty() {
            return Err(Status::invalid_argument("register.worker_id is empty"));
        }
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let worker = reg.worker_id.clone();
        let (tx, rx) = mpsc::channel(64);
        let (accepted, verdict) = tokio::sync::oneshot::channel();
        self.sched.send(Command::Connected { reg, tx, conn, accepted }).await;
        verdict
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?
            .map_err(Status::already_exists)?;
        let sched = self.sched.clone();
        let sessions = self.sessions.clone();
        sessions.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                if let Some(msg) = m.msg {
                    sched.send(Command::Message { worker: worker.clone(), conn, msg }).await;
                }
            }
            sched.send(Command::Disconnected { worker, conn }).await;
            sessions.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
