//! Pure rendering for `rlhfctl`: state names, JSON objects, aligned tables,
//! times and sizes. Nothing here talks to the network or the clock; callers
//! pass `now_ms` in, so every function is unit-tested.

use std::collections::HashMap;
use std::fmt::Write;

use rlhf_proto::{Job, JobEvent, JobState, Progress, Worker};
use serde_json::{json, Map, Value};

/// A job's kind name; an unknown number (a newer coordinator) reads as "unspecified".
pub fn job_kind(job: &Job) -> String {
    rlhf_proto::JobKind::try_from(job.kind).unwrap_or(rlhf_proto::JobKind::Unspecified).name()
}

/// A job's state; an unknown number (a newer coordinator) reads as `Unspecified`.
pub fn job_state(job: &Job) -> JobState {
    JobState::try_from(job.state).unwrap_or(JobState::Unspecified)
}

/// The latest metrics record of a progress update, if it parses as an object.
pub fn progress_metrics(p: &Progress) -> Option<Map<String, Value>> {
    match serde_json::from_str::<Value>(&p.metrics_json) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// The metrics worth a glance, in a fixed order, with short labels: PPO jobs
/// show reward/KL/policy loss, SFT/reward jobs their loss and accuracy
/// (short enough for one terminal line).
pub fn headline_metrics(m: &Map<String, Value>) -> Vec<(&'static str, f64)> {
    const KEYS: [(&str, &str); 7] = [
        ("reward_mean", "reward"),
        ("kl", "kl"),
        ("loss", "loss"),
        ("policy_loss", "policy_loss"),
        ("rewards_margins", "margin"),
        ("accuracy", "acc"),
        ("eval_accuracy", "eval_acc"),
    ];
    KEYS.iter().filter_map(|(k, label)| m.get(*k).and_then(Value::as_f64).map(|v| (*label, v))).collect()
}

/// `reward 0.1234 kl 0.0100 loss 1.2000`.
pub fn metrics_summary(m: &Map<String, Value>) -> String {
    headline_metrics(m).iter().map(|(k, v)| format!("{k} {}", fmt_num(*v))).collect::<Vec<_>>().join(" ")
}

/// `sft 20/60 loss 1.2000`, or `""` when there is no progress yet.
pub fn progress_summary(p: Option<&Progress>) -> String {
    let Some(p) = p else { return String::new() };
    let mut parts = Vec::new();
    if !p.stage.is_empty() {
        parts.push(p.stage.clone());
    }
    if p.total > 0 || p.step > 0 {
        parts.push(format!("{}/{}", p.step, p.total));
    }
    if let Some(m) = progress_metrics(p) {
        let s = metrics_summary(&m);
        if !s.is_empty() {
            parts.push(s);
        }
    }
    parts.join(" ")
}

/// Four significant-ish digits without scientific notation for ordinary values.
pub fn fmt_num(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// The JSON object of one job (`status JOB --json`, one element of `list --json`).
pub fn job_json(job: &Job) -> Value {
    let progress = job.progress.as_ref().map(|p| {
        json!({
            "stage": p.stage,
            "step": p.step,
            "total": p.total,
            "metrics": progress_metrics(p).map(Value::Object).unwrap_or(Value::Null),
        })
    });
    json!({
        "id": job.job_id,
        "name": job.name,
        "kind": job_kind(job),
        "state": job_state(job).name(),
        "reason": job.reason,
        "worker": job.worker_id,
        "attempts": job.attempts,
        "progress": progress.unwrap_or(Value::Null),
        "created_at_ms": job.created_at_ms,
        "updated_at_ms": job.updated_at_ms,
        "output_dir": job.output_dir,
    })
}

pub fn worker_json(w: &Worker) -> Value {
    json!({
        "id": w.worker_id,
        "name": w.name,
        "device": w.device,
        "memory_bytes": w.memory_bytes,
        "alive": w.alive,
        "last_heartbeat_ms": w.last_heartbeat_ms,
        "running_jobs": w.running_jobs,
    })
}

pub fn event_json(e: &JobEvent) -> Value {
    json!({
        "at_ms": e.at_ms,
        "state": JobState::try_from(e.state).unwrap_or(JobState::Unspecified).name(),
        "message": e.message,
    })
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let n = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(n) {
            width[i] = width[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate().take(n) {
            if i + 1 < n {
                let pad = width[i] - cell.chars().count();
                let _ = write!(s, "{cell}{}  ", " ".repeat(pad));
            } else {
                s.push_str(cell);
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// The job table of `list` / `status`. `workers` maps worker ids to names.
pub fn jobs_table(jobs: &[Job], workers: &HashMap<String, String>, now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let state = job_state(j);
            let detail = match state {
                JobState::Failed | JobState::Cancelled => truncate(&j.reason, 60),
                JobState::Queued | JobState::Running | JobState::Succeeded | JobState::Unspecified => {
                    progress_summary(j.progress.as_ref())
                }
            };
            vec![
                j.job_id.clone(),
                j.name.clone(),
                job_kind(j),
                state.name().to_string(),
                worker_label(&j.worker_id, workers),
                fmt_age(now_ms - j.created_at_ms),
                detail,
            ]
        })
        .collect();
    table(&["ID", "NAME", "KIND", "STATE", "WORKER", "AGE", "PROGRESS"], &rows)
}

/// `status JOB`: one `key: value` line per field.
pub fn job_detail(j: &Job, workers: &HashMap<String, String>, now_ms: i64) -> String {
    let state = job_state(j);
    let mut rows: Vec<(&str, String)> = vec![
        ("id", j.job_id.clone()),
        ("name", j.name.clone()),
        ("kind", job_kind(j)),
        ("state", state.name().to_string()),
    ];
    if !j.reason.is_empty() {
        rows.push(("reason", j.reason.clone()));
    }
    if !j.worker_id.is_empty() {
        let name = worker_label(&j.worker_id, workers);
        let label = if name == j.worker_id { name } else { format!("{name} ({})", j.worker_id) };
        rows.push(("worker", label));
    }
    rows.push(("attempts", j.attempts.to_string()));
    let progress = progress_summary(j.progress.as_ref());
    if !progress.is_empty() {
        rows.push(("progress", progress));
    }
    rows.push(("created", format!("{} ({} ago)", fmt_utc(j.created_at_ms), fmt_age(now_ms - j.created_at_ms))));
    rows.push(("updated", format!("{} ({} ago)", fmt_utc(j.updated_at_ms), fmt_age(now_ms - j.updated_at_ms))));
    if !j.output_dir.is_empty() {
        rows.push(("output", j.output_dir.clone()));
    }
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    rows.iter().map(|(k, v)| format!("{:<w$} {v}\n", format!("{k}:"))).collect()
}

pub fn workers_table(workers: &[Worker], now_ms: i64) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.worker_id.clone(),
                w.name.clone(),
                w.device.clone(),
                fmt_bytes(w.memory_bytes),
                if w.alive { "yes" } else { "no" }.to_string(),
                if w.last_heartbeat_ms > 0 {
                    format!("{} ago", fmt_age(now_ms - w.last_heartbeat_ms))
                } else {
                    "-".into()
                },
                if w.running_jobs.is_empty() { "-".into() } else { w.running_jobs.join(",") },
            ]
        })
        .collect();
    table(&["ID", "NAME", "DEVICE", "MEMORY", "ALIVE", "HEARTBEAT", "JOBS"], &rows)
}

/// `2026-11-26 07:30:42.123  running    message`.
pub fn event_line(e: &JobEvent) -> String {
    let state = JobState::try_from(e.state).unwrap_or(JobState::Unspecified).name();
    format!("{}  {state:<9}  {}", fmt_utc_ms(e.at_ms), e.message).trim_end().to_string()
}

fn worker_label(id: &str, workers: &HashMap<String, String>) -> String {
    if id.is_empty() {
        return "-".into();
    }
    workers.get(id).filter(|n| !n.is_empty()).cloned().unwrap_or_else(|| id.to_string())
}

fn truncate(s: &str, max: usize) -> String {
    let s = s.lines().next().unwrap_or("");
    if s.chars().count() <= max {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(max.saturating_sub(1)).collect::<String>())
    }
}

/// A duration in milliseconds as `42s`, `5m`, `3h`, `2d` (negative clamps to 0s).
pub fn fmt_age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Bytes with binary units: `512 B`, `1.5 KiB`, `15.6 GiB`; 0 reads `-`.
pub fn fmt_bytes(b: u64) -> String {
    if b == 0 {
        return "-".into();
    }
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Unix milliseconds as a UTC time, `2026-11-26 07:30:42`.
pub fn fmt_utc(ms: i64) -> String {
    let (date, h, m, s, _) = civil(ms);
    format!("{date} {h:02}:{m:02}:{s:02}")
}

/// Unix milliseconds as a UTC time with milliseconds, `2026-11-26 07:30:42.123`.
pub fn fmt_utc_ms(ms: i64) -> String {
    let (date, h, m, s, milli) = civil(ms);
    format!("{date} {h:02}:{m:02}:{s:02}.{milli:03}")
}

/// Splits unix milliseconds into a `YYYY-MM-DD` date and the time of day
/// (Howard Hinnant's days-from-civil inverse).
fn civil(ms: i64) -> (String, i64, i64, i64, i64) {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (format!("{y:04}-{m:02}-{d:02}"), tod / 3600, tod % 3600 / 60, tod % 60, milli)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: JobState) -> Job {
        Job {
            job_id: "01936f4e-0000-7000-8000-000000000001".into(),
            name: "sft".into(),
            kind: rlhf_proto::JobKind::Sft as i32,
            state: state as i32,
            reason: String::new(),
            worker_id: "w1".into(),
            attempts: 1,
            created_at_ms: 1_000,
            updated_at_ms: 61_000,
            progress: Some(Progress {
                stage: "sft".into(),
                step: 20,
                total: 60,
                metrics_json: r#"{"step":20,"loss":1.23456,"kl":0.01,"stage":"sft"}"#.into(),
            }),
            output_dir: "/data/jobs/x".into(),
        }
    }

    #[test]
    fn state_names_are_the_documented_five() {
        let all = [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled];
        let names: Vec<_> = all.iter().map(|s| s.name()).collect();
        assert_eq!(names, ["queued", "running", "succeeded", "failed", "cancelled"]);
        assert_eq!(all.map(JobState::is_terminal), [false, false, true, true, true]);
        let mut j = job(JobState::Running);
        j.state = 99;
        assert_eq!(job_state(&j), JobState::Unspecified);
    }

    #[test]
    fn job_json_has_the_documented_fields() {
        let v = job_json(&job(JobState::Running));
        assert_eq!(v["state"], "running");
        assert_eq!(v["id"], "01936f4e-0000-7000-8000-000000000001");
        assert_eq!(v["kind"], "sft");
        for k in ["pretrain", "sft", "reward", "ppo", "eval", "pipeline", "dpo", "grpo", "rloo"] {
            assert_eq!(rlhf_proto::JobKind::from_name(k).name(), k, "the coordinator's kind names round-trip");
        }
        assert_eq!(rlhf_proto::JobKind::from_name("bogus"), rlhf_proto::JobKind::Unspecified);
        assert_eq!(v["worker"], "w1");
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["progress"]["step"], 20);
        assert_eq!(v["progress"]["metrics"]["loss"], 1.23456);
        let mut j = job(JobState::Queued);
        j.progress = None;
        assert!(job_json(&j)["progress"].is_null());
    }

    #[test]
    fn progress_summary_shows_stage_steps_and_metrics() {
        let j = job(JobState::Running);
        assert_eq!(progress_summary(j.progress.as_ref()), "sft 20/60 kl 0.0100 loss 1.2346");
        assert_eq!(progress_summary(None), "");
        let p = Progress { stage: "ppo".into(), step: 0, total: 0, metrics_json: "not json".into() };
        assert_eq!(progress_summary(Some(&p)), "ppo");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()], vec!["q".into(), "".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\nq\n");
        let mut workers = HashMap::new();
        workers.insert("w1".to_string(), "cpu-0".to_string());
        let t = jobs_table(&[job(JobState::Running)], &workers, 121_000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID "), "{t}");
        assert!(lines[1].contains("running") && lines[1].contains("cpu-0") && lines[1].contains("2m"), "{t}");
        let mut failed = job(JobState::Failed);
        failed.reason = "model.path: /nope does not exist".into();
        assert!(jobs_table(&[failed], &workers, 0).contains("/nope does not exist"));
    }

    #[test]
    fn job_detail_names_worker_and_reason() {
        let mut j = job(JobState::Failed);
        j.reason = "boom".into();
        let mut workers = HashMap::new();
        workers.insert("w1".to_string(), "cpu-0".to_string());
        let d = job_detail(&j, &workers, 61_000);
        assert!(d.contains("state:    failed\n"), "{d}");
        assert!(d.contains("reason:   boom\n"), "{d}");
        assert!(d.contains("worker:   cpu-0 (w1)\n"), "{d}");
        assert!(d.contains("created:  1970-01-01 00:00:01 (1m ago)"), "{d}");
    }

    #[test]
    fn workers_table_and_json() {
        let w = Worker {
            worker_id: "w1".into(),
            name: "gpu-0".into(),
            device: "cuda:0".into(),
            memory_bytes: 80 * 1024 * 1024 * 1024,
            alive: true,
            last_heartbeat_ms: 9_000,
            running_jobs: vec!["j1".into()],
        };
        let t = workers_table(std::slice::from_ref(&w), 10_000);
        assert!(
            t.lines().nth(1).is_some_and(|l| l.contains("80.0 GiB") && l.contains("1s ago") && l.ends_with("j1")),
            "{t}"
        );
        assert_eq!(worker_json(&w)["device"], "cuda:0");
    }

    #[test]
    fn times_and_sizes() {
        assert_eq!(fmt_utc(0), "1970-01-01 00:00:00");
        assert_eq!(fmt_utc_ms(1_795_685_442_123), "2026-11-26 09:30:42.123");
        assert_eq!(fmt_utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(fmt_age(59_999), "59s");
        assert_eq!(fmt_age(-5), "0s");
        assert_eq!(fmt_age(7_200_000), "2h");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_num(0.0), "0.0000");
        assert_eq!(fmt_num(1.5e-5), "1.500e-5");
    }

    #[test]
    fn event_lines() {
        let e = JobEvent { at_ms: 0, state: JobState::Queued as i32, message: "submitted".into() };
        assert_eq!(event_line(&e), "1970-01-01 00:00:00.000  queued     submitted");
        assert_eq!(event_json(&e)["state"], "queued");
    }
}
