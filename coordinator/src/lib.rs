//! rlhf-coordinator: the job scheduler daemon. It owns all durable state
//! (SQLite + a data directory of job outputs), places jobs on registered
//! workers, holds their leases, and serves `rlhf.v1.JobService` to clients
//! and `rlhf.v1.WorkerService` to workers.

pub mod auth;
pub mod dashboard;
pub mod error;
pub mod http;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
