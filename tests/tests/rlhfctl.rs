//! rlhfctl as a user drives it: up, submit --wait, status --json, report
//! (markdown and PNG curves), a bad file refused locally, down.

use std::process::Command;

use rlhf_tests::*;

/// rlhfctl with the cluster's data dir in RLHF_DATA_DIR (where it finds the
/// admin token), as `rlhfctl up` tells a user to set.
fn ctl(url: &str, data: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(bin("rlhfctl"))
        .args(args)
        .env("RLHF_COORDINATOR", url)
        .env("RLHF_DATA_DIR", data)
        .env_remove("RLHF_TOKEN")
        .output()
        .expect("run rlhfctl")
}

/// Stops the cluster in `data`, then fails with `result`'s error and the
/// cluster's logs, if it is one.
fn down_then_check(url: &str, data: &std::path::Path, result: Result<(), String>) {
    let down = ctl(url, data, &["down", "--data-dir", data.to_str().unwrap()]);
    assert!(down.status.success(), "down: {}", String::from_utf8_lossy(&down.stderr));
    if let Err(e) = result {
        let logs = std::fs::read_dir(data.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        panic!("{e}\n{logs}");
    }
}

#[test]
fn rlhfctl_runs_a_local_cluster_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cluster");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let d = data.to_str().unwrap();
    let up = ctl(&url, &data, &["up", "--cpu-workers", "1", "--data-dir", d, "--listen", &format!("127.0.0.1:{port}")]);
    assert!(up.status.success(), "up: {}", String::from_utf8_lossy(&up.stderr));
    let run = || -> Result<(), String> {
        let job_file = dir.path().join("sft.toml");
        std::fs::write(&job_file, sft_job(10, 0)).unwrap();
        let sub = ctl(&url, &data, &["submit", job_file.to_str().unwrap(), "--wait"]);
        let stdout = String::from_utf8_lossy(&sub.stdout).to_string();
        if !sub.status.success() {
            return Err(format!("submit: {}", String::from_utf8_lossy(&sub.stderr)));
        }
        let id = stdout.lines().last().unwrap_or_default().trim().to_string();
        let st = ctl(&url, &data, &["status", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).map_err(|e| format!("status json: {e}"))?;
        if v["state"] != "succeeded" {
            return Err(format!("state {v}"));
        }
        // Logs come in pages; --tail keeps the last records.
        let all = ctl(&url, &data, &["logs", &id, "--json"]);
        let tail = ctl(&url, &data, &["logs", &id, "--json", "--tail", "2"]);
        let count = |o: &std::process::Output| {
            serde_json::from_slice::<serde_json::Value>(&o.stdout).map(|v| v["metrics"].as_array().map_or(0, Vec::len))
        };
        match (count(&all), count(&tail)) {
            (Ok(n), Ok(2)) if n > 2 => {}
            other => return Err(format!("logs pages: {other:?}")),
        }
        let out = dir.path().join("report");
        let rep = ctl(&url, &data, &["report", &id, "--out", out.to_str().unwrap()]);
        if !rep.status.success() || !out.join("loss.png").exists() {
            return Err(format!("report: {}", String::from_utf8_lossy(&rep.stderr)));
        }
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, sft_job(10, 0).replace("lr = 3e-3", "lr = -3e-3")).unwrap();
        let b = ctl(&url, &data, &["submit", bad.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&b.stderr).to_string();
        if b.status.code() != Some(1) || !err.contains("train.lr") {
            return Err(format!("bad file: {err}"));
        }
        Ok(())
    };
    down_then_check(&url, &data, run());
}

/// A user's own task on the cluster: files in TRL's formats (JSON lines and
/// Parquet, conversational, through the model's chat template) train SFT,
/// a reward model and PPO (the reward model plus an `exact` reward) as one
/// pipeline submitted with rlhfctl.
#[test]
fn a_pipeline_on_trl_format_files_runs_on_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cluster");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let d = data.to_str().unwrap();
    let up = ctl(&url, &data, &["up", "--cpu-workers", "1", "--data-dir", d, "--listen", &format!("127.0.0.1:{port}")]);
    assert!(up.status.success(), "up: {}", String::from_utf8_lossy(&up.stderr));
    let f = fixtures();
    let p = |s: &str| f.join(s).display().to_string();
    let job = format!(
        r#"version = 1
kind = "pipeline"
name = "own-task"
seed = 5
[model]
path = "{model}"
max_length = 256
[peft]
method = "lora"
r = 8
target_modules = ["all-linear"]
[[stage]]
name = "sft"
kind = "sft"
data = {{ train = "{sft}", eval = "{sft_eval}" }}
train = {{ max_steps = 10, batch_size = 8, lr = 1e-2 }}
[[stage]]
name = "reward"
kind = "reward"
data = {{ train = "{prefs}" }}
train = {{ max_steps = 10, batch_size = 8, lr = 2e-3 }}
[[stage]]
name = "ppo"
kind = "ppo"
data = {{ train = "{sft}" }}
ppo = {{ iterations = 3, rollout_batch = 8, minibatch = 4, max_new_tokens = 4, rewards = [{{ kind = "model" }}, {{ kind = "exact", weight = 0.5 }}] }}
"#,
        model = p("tiny-qwen2-chat"),
        sft = p("data/arith_sft.jsonl"),
        sft_eval = p("data/arith_sft_eval.parquet"),
        prefs = p("data/prefs_chat.jsonl"),
    );
    let run = || -> Result<(), String> {
        let job_file = dir.path().join("own-task.toml");
        std::fs::write(&job_file, &job).unwrap();
        let sub = ctl(&url, &data, &["submit", job_file.to_str().unwrap(), "--wait"]);
        if !sub.status.success() {
            return Err(format!("submit: {}", String::from_utf8_lossy(&sub.stderr)));
        }
        let id = String::from_utf8_lossy(&sub.stdout).lines().last().unwrap_or_default().trim().to_string();
        let st = ctl(&url, &data, &["status", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&st.stdout).map_err(|e| format!("status json: {e}"))?;
        if v["state"] != "succeeded" {
            return Err(format!("state {v}"));
        }
        let logs = ctl(&url, &data, &["logs", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&logs.stdout).map_err(|e| format!("logs json: {e}"))?;
        let recs = v["metrics"].as_array().cloned().unwrap_or_default();
        let has = |key: &str| recs.iter().any(|r| r.get(key).is_some());
        for key in ["eval_accuracy", "accuracy", "reward_model", "reward_exact", "kl"] {
            if !has(key) {
                return Err(format!("no {key} in the job's metrics: {v}"));
            }
        }
        Ok(())
    };
    down_then_check(&url, &data, run());
}
