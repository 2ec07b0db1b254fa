//! The coordinator's HTTP side (`--http ADDR`): `/metrics` in Prometheus
//! text format (prometheus-client), behind the same client tokens as gRPC
//! (`Authorization: Bearer …`; Prometheus sends it with `authorization:
//! {credentials_file: …}`). Jobs by state, workers alive, the oldest queued
//! job's wait, steps per second and the latest reward and KL of each
//! running job, bytes relayed, and gRPC calls with their total seconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::auth::Tokens;
use crate::scheduler::{Handle, Stats};

/// gRPC calls per method: (count, total seconds).
#[derive(Default)]
pub struct GrpcStats(Mutex<BTreeMap<&'static str, (u64, f64)>>);

impl GrpcStats {
    /// Counts one call of `method` that started at `t0`.
    pub fn record(&self, method: &'static str, t0: Instant) {
        if let Ok(mut m) = self.0.lock() {
            let e = m.entry(method).or_default();
            e.0 += 1;
            e.1 += t0.elapsed().as_secs_f64();
        }
    }

    /// Counts the call when the returned guard drops (also on an early error).
    pub fn timer(self: &Arc<Self>, method: &'static str) -> CallTimer {
        CallTimer { stats: self.clone(), method, t0: Instant::now() }
    }

    fn snapshot(&self) -> BTreeMap<&'static str, (u64, f64)> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

pub struct CallTimer {
    stats: Arc<GrpcStats>,
    method: &'static str,
    t0: Instant,
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        self.stats.record(self.method, self.t0);
    }
}

#[derive(Clone)]
struct Ctx {
    sched: Handle,
    tokens: Arc<Tokens>,
    grpc: Arc<GrpcStats>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job_id: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The exposition text of one scrape.
fn render(stats: &Stats, grpc: &BTreeMap<&'static str, (u64, f64)>) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("rlhfd");
    let jobs = Family::<StateLabel, Gauge>::default();
    for (state, n) in &stats.jobs_by_state {
        jobs.get_or_create(&StateLabel { state: state.clone() }).set(*n as i64);
    }
    reg.register("jobs", "Jobs by state", jobs);
    let alive = Gauge::<i64>::default();
    alive.set(stats.workers_alive as i64);
    reg.register("workers_alive", "Workers connected with a live lease", alive);
    let known = Gauge::<i64>::default();
    known.set(stats.workers_total as i64);
    reg.register("workers", "Workers known to the scheduler", known);
    let wait = FloatGauge::default();
    wait.set(stats.oldest_queued_s);
    reg.register("queue_wait_seconds", "How long the oldest queued job has waited", wait);
    let rate = Family::<JobLabel, FloatGauge>::default();
    let reward = Family::<JobLabel, FloatGauge>::default();
    let kl = Family::<JobLabel, FloatGauge>::default();
    let step = Family::<JobLabel, Gauge>::default();
    for j in &stats.running {
        let l = JobLabel { job_id: j.id.clone(), name: j.name.clone() };
        rate.get_or_create(&l).set(j.steps_per_s);
        step.get_or_create(&l).set(j.step as i64);
        if let Some(r) = j.reward_mean {
            reward.get_or_create(&l).set(r);
        }
        if let Some(k) = j.kl {
            kl.get_or_create(&l).set(k);
        }
    }
    reg.register("job_steps_per_second", "Steps per second of each running job", rate);
    reg.register("job_step", "Latest step of each running job", step);
    reg.register("job_reward_mean", "Latest PPO reward_mean of each running job", reward);
    reg.register("job_kl", "Latest PPO KL of each running job", kl);
    let relayed = Counter::<u64>::default();
    relayed.inc_by(stats.relayed_bytes_total);
    reg.register("relayed_bytes", "Payload bytes relayed between workers (role calls, collectives)", relayed);
    let calls = Family::<MethodLabel, Counter>::default();
    let secs = Family::<MethodLabel, Counter<f64, AtomicU64>>::default();
    for (m, (n, s)) in grpc {
        let l = MethodLabel { method: m.to_string() };
        calls.get_or_create(&l).inc_by(*n);
        secs.get_or_create(&l).inc_by(*s);
    }
    reg.register("grpc_requests", "gRPC calls served, by method", calls);
    reg.register("grpc_request_seconds", "Seconds spent serving gRPC calls, by method", secs);
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

async fn metrics(State(ctx): State<Ctx>, headers: HeaderMap) -> axum::response::Response {
    if crate::dashboard::bearer(&headers).and_then(|t| ctx.tokens.client(t)).is_none() {
        return (StatusCode::UNAUTHORIZED, "a client token is required: Authorization: Bearer <token>\n")
            .into_response();
    }
    let Ok(stats) = ctx.sched.stats().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the scheduler is not answering\n").into_response();
    };
    match render(&stats, &ctx.grpc.snapshot()) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n").into_response(),
    }
}

/// Serves HTTP on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sched: Handle,
    tokens: Arc<Tokens>,
    grpc: Arc<GrpcStats>,
) -> std::io::Result<()> {
    let dash = crate::dashboard::Dash { sched: sched.clone(), tokens: tokens.clone() };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Ctx { sched, tokens, grpc })
        .merge(crate::dashboard::routes(dash));
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await
}

/// Binds `addr` (loopback, or anywhere behind the token).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("--http {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::RunningJob;

    #[test]
    fn the_exposition_names_every_series() {
        let stats = Stats {
            jobs_by_state: vec![("queued".into(), 1), ("succeeded".into(), 2)],
            workers_alive: 3,
            workers_total: 4,
            oldest_queued_s: 1.5,
            running: vec![RunningJob {
                id: "j1".into(),
                name: "ppo".into(),
                step: 7,
                reward_mean: Some(0.25),
                kl: Some(0.01),
                steps_per_s: 2.0,
            }],
            relayed_bytes_total: 99,
        };
        let grpc = BTreeMap::from([("GetJob", (5u64, 0.5f64))]);
        let text = render(&stats, &grpc).unwrap();
        for want in [
            "rlhfd_jobs{state=\"succeeded\"} 2",
            "rlhfd_workers_alive 3",
            "rlhfd_queue_wait_seconds 1.5",
            "rlhfd_job_reward_mean{job_id=\"j1\",name=\"ppo\"} 0.25",
            "rlhfd_job_steps_per_second{job_id=\"j1\",name=\"ppo\"} 2.0",
            "rlhfd_relayed_bytes_total 99",
            "rlhfd_grpc_requests_total{method=\"GetJob\"} 5",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
    }
}
