//! An eval job writes every example it scored to predictions.jsonl; the
//! accuracies it reports are those of the file, and an independent scorer
//! (transformers + peft, scripts/crosscheck_predictions.py) reading the same
//! prompt ids agrees with them.

mod common;

use std::process::Command;

use common::fixtures;
use common::jobs::job;
use rlhf_worker::train::run::run_job;
use serde_json::Value;
use tch::Device;

#[test]
fn eval_writes_auditable_predictions_that_transformers_agrees_with() {
    check_predictions("f32", 1e-4);
}

/// In bf16 the adapter is merged as peft merges it (an f32 delta added in
/// place, one rounding) and each model starts from a freshly loaded base, so
/// transformers + peft in bf16 make the same predictions. The log-probs are
/// bit-equal on a CPU without AMX; with AMX, oneDNN blocks a bf16 GEMM by its
/// shape and the two sides batch differently, so they agree to bf16's
/// precision: CI's AMX machine saw 0.024 on a log-prob of 7.2 (rel 3.3e-3,
/// under one bf16 ulp of 2^-7 relative). The bound is two ulps.
#[test]
fn bf16_predictions_match_transformers_in_bf16() {
    check_predictions("bf16", 2.0 * 2f64.powi(-7));
}

fn check_predictions(dtype: &str, tol: f64) {
    let adapter = fixtures().join("tiny-llama-lora");
    let text = format!(
        r#"version = 1
kind = "eval"
seed = 1
[model]
path = "tiny-llama"
dtype = "{dtype}"
[eval]
modes = ["choice", "generate"]
[eval.adapters]
lora = [{:?}]
[[eval.tasks]]
task = "eprstmt"
path = "fewclue/eprstmt/dev.json"
[[eval.tasks]]
task = "bustm"
path = "fewclue/bustm/dev.json"
"#,
        adapter.display().to_string(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let outcomes = run_job(&job(&text), tmp.path(), Device::Cpu).unwrap();
    let file = tmp.path().join("predictions.jsonl");
    let lines: Vec<Value> =
        std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let accs = &outcomes[0].accuracies;
    let n: usize = accs.iter().filter(|a| a.mode == "choice").map(|a| a.n).sum();
    assert_eq!(lines.len(), n, "one line per model, task and example");
    for a in accs {
        let mine: Vec<&Value> =
            lines.iter().filter(|l| l["model"] == a.model.as_str() && l["task"] == a.task.as_str()).collect();
        assert_eq!(mine.len(), a.n, "{} {}", a.model, a.task);
        let key = if a.mode == "choice" { "choice" } else { "generate" };
        let right = mine.iter().filter(|l| l["example"][key] == l["example"]["gold"]).count();
        assert!(
            (right as f64 / a.n as f64 - a.accuracy).abs() < 1e-12,
            "{} {} {}: file and report disagree",
            a.model,
            a.task,
            a.mode
        );
        for l in &mine {
            let ex = &l["example"];
            assert!(
                ex["prompt"].as_str().is_some_and(|p| !p.is_empty())
                    && ex["prompt_ids"].as_array().is_some_and(|v| !v.is_empty()),
                "{ex}"
            );
            assert_eq!(
                ex["option_logprobs"].as_array().map(Vec::len),
                ex["option_ids"].as_array().map(Vec::len),
                "{ex}"
            );
            assert!(ex["generated"].is_string(), "{ex}");
        }
    }

    let python = std::env::var("RLHF_PY").unwrap_or_else(|_| "python3".into());
    let script = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR (run through cargo test)"),
    )
    .join("../scripts/crosscheck_predictions.py");
    for (name, adapters) in [("base", vec![]), ("lora", vec!["--adapter".to_string(), adapter.display().to_string()])] {
        let out = Command::new(&python)
            .arg(&script)
            .arg(&file)
            .arg(fixtures().join("tiny-llama"))
            .args(["--name", name, "--max-diff-points", "0", "--dtype", dtype])
            .args(&adapters)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        let summary: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(summary["ok"], true, "{stdout}");
        assert_eq!(summary["tasks"], 2, "{stdout}");
        for l in stdout.lines().filter(|l| l.contains("\"task\"")) {
            let t: Value = serde_json::from_str(l).unwrap();
            // Relative to the log-prob's size: f32 rounding grows with it.
            assert!(t["max_option_logprob_rel_diff"].as_f64().unwrap() < tol, "{dtype} {name}: {l}");
        }
    }
}
