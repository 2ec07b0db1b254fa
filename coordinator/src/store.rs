//! Durable state in SQLite: jobs, their events and metrics, workers. Every
//! state transition is one transaction that also records its event, so a
//! coordinator killed at any instant restarts with every job.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::state::JobState;

#[derive(Clone, Debug)]
pub struct JobRow {
    pub id: String,
    pub request_id: Option<String>,
    pub name: String,
    pub kind: String,
    pub spec_toml: String,
    pub state: JobState,
    pub attempts: u32,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// The latest progress record (JSON), if any.
    pub progress: String,
    /// The client that submitted it.
    pub owner: String,
}

#[derive(Clone, Debug)]
pub struct EventRow {
    pub at_ms: i64,
    pub state: String,
    pub message: String,
}

pub struct Store {
    conn: Connection,
}

pub use rlhf_common::now_ms;

/// Metrics records the store keeps per job (metrics.jsonl has them all).
pub const METRICS_KEPT: i64 = 100_000;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
PRAGMA busy_timeout = 5000;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    spec_toml TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    worker TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    progress TEXT NOT NULL DEFAULT '',
    owner TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS metrics (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_job ON metrics(job_id);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    device TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let state: String = r.get("state")?;
    let reason: String = r.get("reason")?;
    let worker: String = r.get("worker")?;
    Ok(JobRow {
        id: r.get("id")?,
        request_id: r.get("request_id")?,
        name: r.get("name")?,
        kind: r.get("kind")?,
        spec_toml: r.get("spec_toml")?,
        state: JobState::from_columns(&state, reason.clone(), worker)
            .unwrap_or(JobState::Failed { reason: format!("unknown stored state {state:?}") }),
        attempts: r.get("attempts")?,
        created_ms: r.get("created_ms")?,
        updated_ms: r.get("updated_ms")?,
        progress: r.get("progress")?,
        owner: r.get("owner")?,
    })
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path).map_err(|e| Error::Store(format!("{}: {e}", path.display())))?;
        conn.execute_batch(SCHEMA)?;
        // Stores made before jobs had owners.
        let has_owner: bool =
            conn.query_row("SELECT COUNT(*) FROM pragma_table_info('jobs') WHERE name = 'owner'", [], |r| {
                r.get::<_, i64>(0)
            })? > 0;
        if !has_owner {
            conn.execute_batch("ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''")?;
        }
        Ok(Self { conn })
    }

    /// Jobs in one state (`queued`, `running`, …), oldest first.
    pub fn jobs_in(&self, state: &str) -> Result<Vec<JobRow>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM jobs WHERE state = ?1 ORDER BY created_ms, id")?;
        let rows = st.query_map(params![state], job_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Inserts a queued job; with a request id already used, returns that
    /// job instead (and `false`).
    pub fn insert_job(
        &mut self,
        id: &str,
        request_id: Option<&str>,
        name: &str,
        kind: &str,
        spec_toml: &str,
        owner: &str,
    ) -> Result<(JobRow, bool)> {
        let tx = self.conn.transaction()?;
        if let Some(rid) = request_id {
            let existing =
                tx.query_row("SELECT * FROM jobs WHERE request_id = ?1", params![rid], job_from_row).optional()?;
            if let Some(j) = existing {
                return Ok((j, false));
            }
        }
        let now = now_ms();
        tx.execute(
            "INSERT INTO jobs (id, request_id, name, kind, spec_toml, state, created_ms, updated_ms, owner) VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, ?6, ?7)",
            params![id, request_id, name, kind, spec_toml, now, owner],
        )?;
        tx.execute(
            "INSERT INTO events (job_id, at_ms, state, message) VALUES (?1, ?2, 'queued', 'submitted')",
            params![id, now],
        )?;
        tx.commit()?;
        Ok((self.job(id)?.ok_or_else(|| Error::Store("job vanished after insert".into()))?, true))
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRow>> {
        Ok(self.conn.query_row("SELECT * FROM jobs WHERE id = ?1", params![id], job_from_row).optional()?)
    }

    pub fn jobs(&self) -> Result<Vec<JobRow>> {
        let mut st = self.conn.prepare("SELECT * FROM jobs ORDER BY created_ms, id")?;
        let rows = st.query_map([], job_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// Moves a job to `next` in one transaction with its event. The same
    /// state again is a no-op (`Ok(false)`); an illegal move is
    /// `FailedPrecondition`.
    pub fn transition(&mut self, id: &str, next: &JobState, message: &str) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let cur = tx
            .query_row("SELECT * FROM jobs WHERE id = ?1", params![id], job_from_row)
            .optional()?
            .ok_or_else(|| Error::NotFound(format!("job {id}")))?;
        if cur.state == *next {
            return Ok(false);
        }
        if !cur.state.can_become(next) {
            return Err(Error::FailedPrecondition(format!(
                "job {id} is {}, it cannot become {}",
                cur.state.name(),
                next.name()
            )));
        }
        let now = now_ms();
        let attempts = cur.attempts
            + u32::from(matches!(next, JobState::Running { .. }) && !matches!(cur.state, JobState::Running { .. }));
        tx.execute(
            "UPDATE jobs SET state = ?2, reason = ?3, worker = ?4, attempts = ?5, updated_ms = ?6 WHERE id = ?1",
            params![id, next.name(), next.reason(), next.worker(), attempts, now],
        )?;
        tx.execute(
            "INSERT INTO events (job_id, at_ms, state, message) VALUES (?1, ?2, ?3, ?4)",
            params![id, now, next.name(), message],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Gives a queued job back to the worker that still runs its last
    /// attempt (its lease ran out, then it came back): running on `worker`
    /// again, with the same attempt count, so that attempt's messages count.
    pub fn resume(&mut self, id: &str, worker: &str, message: &str) -> Result<()> {
        let tx = self.conn.transaction()?;
        let now = now_ms();
        let n = tx.execute(
            "UPDATE jobs SET state = 'running', reason = '', worker = ?2, updated_ms = ?3 WHERE id = ?1 AND state = 'queued'",
            params![id, worker, now],
        )?;
        if n != 1 {
            return Err(Error::FailedPrecondition(format!("job {id} is not queued")));
        }
        tx.execute(
            "INSERT INTO events (job_id, at_ms, state, message) VALUES (?1, ?2, 'running', ?3)",
            params![id, now, message],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records an event that changes nothing (say, why a job still waits),
    /// under the job's current state.
    pub fn note(&mut self, id: &str, message: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO events (job_id, at_ms, state, message) SELECT id, ?2, state, ?3 FROM jobs WHERE id = ?1",
            params![id, now_ms(), message],
        )?;
        Ok(())
    }

    pub fn set_progress(&mut self, id: &str, progress_json: &str, metrics_json: Option<&str>) -> Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE jobs SET progress = ?2, updated_ms = ?3 WHERE id = ?1",
            params![id, progress_json, now_ms()],
        )?;
        if let Some(m) = metrics_json {
            tx.execute("INSERT INTO metrics (job_id, json) VALUES (?1, ?2)", params![id, m])?;
            // Retention: the newest METRICS_KEPT records of a job.
            let seq = tx.last_insert_rowid();
            if seq % 1000 == 0 {
                tx.execute(
                    "DELETE FROM metrics WHERE job_id = ?1 AND seq <= (SELECT seq FROM metrics WHERE job_id = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
                    params![id, METRICS_KEPT],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn events(&self, id: &str) -> Result<Vec<EventRow>> {
        let mut st = self.conn.prepare("SELECT at_ms, state, message FROM events WHERE job_id = ?1 ORDER BY seq")?;
        let rows = st
            .query_map(params![id], |r| Ok(EventRow { at_ms: r.get(0)?, state: r.get(1)?, message: r.get(2)? }))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    /// A page of a job's metrics records (oldest first) and how many it has.
    pub fn metrics(&self, id: &str, offset: u64, limit: u32) -> Result<(Vec<String>, u64)> {
        let mut st =
            self.conn.prepare_cached("SELECT json FROM metrics WHERE job_id = ?1 ORDER BY seq LIMIT ?2 OFFSET ?3")?;
        let rows = st
            .query_map(params![id, limit, offset as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        let total: i64 =
            self.conn.query_row("SELECT COUNT(*) FROM metrics WHERE job_id = ?1", params![id], |r| r.get(0))?;
        Ok((rows, total as u64))
    }

    pub fn upsert_worker(&mut self, id: &str, name: &str, device: &str, memory: u64) -> Result<()> {
        self.conn.execute(
            "INSERT INTO workers (id, name, device, memory_bytes, last_seen_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(id) DO UPDATE SET name = ?2, device = ?3, memory_bytes = ?4, last_seen_ms = ?5",
            params![id, name, device, memory as i64, now_ms()],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_survive_reopen_and_transitions_are_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        {
            let mut s = Store::open(&db).unwrap();
            let (j, created) = s.insert_job("j1", Some("req"), "n", "sft", "x", "alice").unwrap();
            assert!(created && j.state == JobState::Queued);
            let (again, created) = s.insert_job("j2", Some("req"), "n", "sft", "x", "alice").unwrap();
            assert!(!created && again.id == "j1", "one request id, one job");
            let run = JobState::Running { worker: "w1".into() };
            assert!(s.transition("j1", &run, "assigned").unwrap());
            assert!(!s.transition("j1", &run, "again").unwrap(), "same state is a no-op");
            assert!(s.transition("j1", &JobState::Succeeded, "done").unwrap());
            assert!(matches!(s.transition("j1", &JobState::Queued, "x"), Err(Error::FailedPrecondition(_))));
            s.set_progress("j1", "{}", Some("{\"step\":1}")).unwrap();
            s.set_progress("j1", "{}", Some("{\"step\":2}")).unwrap();
        }
        let s = Store::open(&db).unwrap();
        let j = s.job("j1").unwrap().unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.attempts, 1);
        assert_eq!(s.events("j1").unwrap().len(), 3);
        assert_eq!(s.metrics("j1", 0, 10).unwrap(), (vec!["{\"step\":1}".to_string(), "{\"step\":2}".into()], 2));
        assert_eq!(s.metrics("j1", 1, 10).unwrap(), (vec!["{\"step\":2}".to_string()], 2), "a page");
        assert_eq!(s.jobs().unwrap().len(), 1);
    }
}
