//! The `JobService` client of `rlhfctl`: connection, gRPC status → readable
//! errors, and job references (`JOB` may be an id, an id prefix or a name).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use rlhf_common::JobId;
use rlhf_proto::auth::{Bearer, JobClient};
use rlhf_proto::job_service_client::JobServiceClient;
use rlhf_proto::*;
use tonic::transport::Endpoint;
use tonic::{Code, Status};

pub struct Client {
    inner: JobClient,
    url: String,
}

/// Every cause of an error, `a: b: c`, for transport errors whose top-level
/// message alone ("transport error") says nothing.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

/// A gRPC status as one line for stderr.
pub fn status_message(url: &str, s: &Status) -> String {
    match s.code() {
        Code::Unavailable => format!(
            "cannot reach the coordinator at {url}: {} (is it running? `rlhfctl up` starts a local one)",
            if s.message().is_empty() { chain(s) } else { s.message().to_string() }
        ),
        Code::Unauthenticated => format!(
            "the coordinator at {url} refused the call: {} (or point RLHF_DATA_DIR at its data dir)",
            s.message()
        ),
        Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::PermissionDenied => s.message().to_string(),
        code => format!("{} ({code:?})", s.message()),
    }
}

impl Client {
    /// Connects, failing within seconds when nothing listens at `url`.
    /// A URL without a scheme (`10.0.0.5:50051`, as grpcurl takes it) means `http://`.
    pub async fn connect(url: &str) -> Result<Self> {
        let url = &normalize_url(url);
        let ca = crate::local::tls_ca();
        Endpoint::from_shared(url.to_string())
            .with_context(|| format!("invalid coordinator URL {url:?} (expected e.g. http://127.0.0.1:50051)"))?;
        let ep = rlhf_proto::connect::endpoint(url, ca.as_deref())
            .map_err(|e| anyhow!(e))?
            .connect_timeout(Duration::from_secs(5));
        let channel = ep.connect().await.map_err(|e| {
            anyhow!(
                "cannot reach the coordinator at {url}: {} (is it running? `rlhfctl up` starts a local one)",
                chain(&e)
            )
        })?;
        let bearer = match crate::local::client_token()? {
            Some(t) => Bearer::new(&t).map_err(|e| anyhow!("token: {e}"))?,
            None => Bearer::none(),
        };
        Ok(Self { inner: JobServiceClient::with_interceptor(channel, bearer), url: url.to_string() })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn error(&self, s: Status) -> anyhow::Error {
        anyhow!(status_message(&self.url, &s))
    }

    pub async fn submit(&mut self, spec_toml: String, request_id: String) -> Result<SubmitJobResponse> {
        let r = self.inner.submit_job(SubmitJobRequest { spec_toml, request_id }).await;
        r.map(|r| r.into_inner()).map_err(|s| self.error(s))
    }

    pub async fn get(&mut self, job_id: &str) -> Result<Job> {
        let r = self.inner.get_job(GetJobRequest { job_id: job_id.to_string() }).await;
        let r = r.map_err(|s| self.error(s))?.into_inner();
        r.job.ok_or_else(|| anyhow!("the coordinator answered GetJob without a job"))
    }

    pub async fn list(&mut self) -> Result<Vec<Job>> {
        let r = self.inner.list_jobs(ListJobsRequest {}).await;
        Ok(r.map_err(|s| self.error(s))?.into_inner().jobs)
    }

    pub async fn cancel(&mut self, job_id: &str) -> Result<Job> {
        let r = self.inner.cancel_job(CancelJobRequest { job_id: job_id.to_string() }).await;
        let r = r.map_err(|s| self.error(s))?.into_inner();
        r.job.ok_or_else(|| anyhow!("the coordinator answered CancelJob without a job"))
    }

    pub async fn workers(&mut self) -> Result<Vec<Worker>> {
        let r = self.inner.list_workers(ListWorkersRequest {}).await;
        Ok(r.map_err(|s| self.error(s))?.into_inner().workers)
    }

    /// Worker id → name, for tables; empty when the call fails (names are a nicety).
    pub async fn worker_names(&mut self) -> HashMap<String, String> {
        self.workers().await.unwrap_or_default().into_iter().map(|w| (w.worker_id, w.name)).collect()
    }

    /// A job's events, report and metrics records: the last `tail` of them,
    /// or all (fetched a page at a time).
    pub async fn logs(&mut self, job_id: &str, tail: Option<u64>) -> Result<GetJobLogsResponse> {
        let page =
            |offset: u64| GetJobLogsRequest { job_id: job_id.to_string(), metrics_offset: offset, metrics_limit: 0 };
        let r = self.inner.get_job_logs(page(0)).await;
        let mut all = r.map_err(|s| self.error(s))?.into_inner();
        let total = all.metrics_total;
        let from = tail.map_or(0, |t| total.saturating_sub(t));
        if from > 0 {
            all.metrics_json.clear();
        }
        let mut next = if from > 0 { from } else { all.metrics_json.len() as u64 };
        while next < total {
            let r = self.inner.get_job_logs(page(next)).await;
            let more = r.map_err(|s| self.error(s))?.into_inner().metrics_json;
            if more.is_empty() {
                break;
            }
            next += more.len() as u64;
            all.metrics_json.extend(more);
        }
        Ok(all)
    }

    pub async fn watch(&mut self, job_id: &str) -> Result<tonic::Streaming<WatchJobResponse>, Status> {
        Ok(self.inner.watch_job(WatchJobRequest { job_id: job_id.to_string() }).await?.into_inner())
    }

    /// The job id that `job_ref` names (see [`match_job`]).
    pub async fn resolve(&mut self, job_ref: &str) -> Result<String> {
        if let Ok(id) = JobId::from_str(job_ref) {
            return Ok(id.to_string());
        }
        let jobs = self.list().await?;
        match_job(&jobs, job_ref).map_err(|e| anyhow!(e))
    }
}

/// `host:port` → `http://host:port`; URLs with a scheme are kept.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// Resolves `JOB` on the command line against the job list: a full id is
/// taken as is (by the caller), then a unique id prefix, then a job name
/// (the newest job of that name).
pub fn match_job(jobs: &[Job], job_ref: &str) -> Result<String, String> {
    let r = job_ref.to_ascii_lowercase();
    if r.is_empty() {
        return Err("empty job reference".into());
    }
    let by_prefix: Vec<&Job> = jobs.iter().filter(|j| j.job_id.to_ascii_lowercase().starts_with(&r)).collect();
    match by_prefix.as_slice() {
        [one] => return Ok(one.job_id.clone()),
        [] => {}
        many => {
            let ids: Vec<&str> = many.iter().take(5).map(|j| j.job_id.as_str()).collect();
            return Err(format!("{job_ref:?} matches {} jobs ({}…); give more of the id", many.len(), ids.join(", ")));
        }
    }
    jobs.iter()
        .filter(|j| j.name == job_ref)
        .max_by_key(|j| (j.created_at_ms, j.job_id.clone()))
        .map(|j| j.job_id.clone())
        .ok_or_else(|| format!("no job {job_ref:?} (not an id, an id prefix or a job name; see `rlhfctl list`)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, name: &str, created: i64) -> Job {
        Job { job_id: id.into(), name: name.into(), created_at_ms: created, ..Default::default() }
    }

    #[test]
    fn job_references() {
        let jobs = [
            job("0193aaaa-0000-7000-8000-000000000001", "sft", 1),
            job("0193aaaa-0000-7000-8000-000000000002", "sft", 2),
            job("0193bbbb-0000-7000-8000-000000000003", "ppo", 3),
        ];
        assert_eq!(match_job(&jobs, "0193BBBB").unwrap(), jobs[2].job_id);
        assert!(match_job(&jobs, "0193aaaa").unwrap_err().contains("matches 2 jobs"));
        assert_eq!(match_job(&jobs, "sft").unwrap(), jobs[1].job_id, "the newest job of a name");
        assert!(match_job(&jobs, "nope").unwrap_err().contains("no job \"nope\""));
        assert!(match_job(&jobs, "").is_err());
    }

    #[test]
    fn urls_default_to_http() {
        assert_eq!(normalize_url("10.0.0.5:50051"), "http://10.0.0.5:50051");
        assert_eq!(normalize_url("https://c:1"), "https://c:1");
    }

    #[test]
    fn status_messages() {
        let url = "http://127.0.0.1:1";
        assert_eq!(
            status_message(url, &Status::invalid_argument("ppo.clip: must be in (0, 1)")),
            "ppo.clip: must be in (0, 1)"
        );
        assert!(status_message(url, &Status::unavailable("connection refused")).contains("rlhfctl up"));
        assert_eq!(status_message(url, &Status::internal("disk full")), "disk full (Internal)");
    }
}
