//! Stages on files in TRL's formats through the model's chat template:
//! SFT on conversational prompt-completion rows learns (loss falls,
//! held-out next-token accuracy on the completions far above chance); a malformed row
//! stops the job before any step with `file:line` and the column.

mod common;

use std::path::Path;

use common::jobs::{job, LORA};
use rlhf_worker::train::run::run_job;
use serde_json::Value;
use tch::Device;

fn sft_toml(train: &str, eval: &str, steps: usize) -> String {
    format!(
        r#"version = 1
kind = "sft"
seed = 3
[model]
path = "tiny-qwen2-chat"
dtype = "f32"
max_length = 128
{LORA}
[data]
train = "{train}"
eval = "{eval}"
[train]
max_steps = {steps}
batch_size = 8
lr = 1e-2
warmup_steps = 5
eval_every = 20
"#
    )
}

fn metrics(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn series(m: &[Value], key: &str) -> Vec<f64> {
    m.iter().filter_map(|r| r.get(key).and_then(Value::as_f64)).collect()
}

#[test]
fn sft_on_conversational_prompt_completion_rows_learns_the_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let text = sft_toml("data/arith_sft.jsonl", "data/arith_sft_eval.jsonl", 60);
    run_job(&job(&text), tmp.path(), Device::Cpu).unwrap();
    let m = metrics(tmp.path());
    let loss = series(&m, "loss");
    assert_eq!(loss.len(), 60);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(mean(&loss[55..]) < 0.65 * mean(&loss[..5]), "loss did not fall: {loss:?}");
    // Held-out next-token accuracy on the completions (the sum, <|im_end|>,
    // "\n"): a random model's is ~1/282; the trained one has at least the
    // turn's end right.
    let acc = series(&m, "eval_accuracy");
    assert_eq!(acc.len(), 3, "{acc:?}");
    assert!(acc.iter().all(|&a| a > 0.6), "held-out token accuracy: {acc:?}");
}

#[test]
fn a_malformed_row_stops_the_job_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    let good = std::fs::read_to_string(common::fixtures().join("data/arith_sft.jsonl")).unwrap();
    let mut lines: Vec<&str> = good.lines().take(20).collect();
    lines[13] = r#"{"prompt": [{"role": "user", "content": "1+1=?"}], "completion": [{"role": "assistant"}]}"#;
    std::fs::write(&data, lines.join("\n")).unwrap();
    let text = sft_toml(data.to_str().unwrap(), data.to_str().unwrap(), 5);
    let out = tmp.path().join("run");
    let e = run_job(&job(&text), &out, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:14") && e.contains("\"completion\"") && e.contains("content"), "{e}");
    assert!(!out.join("metrics.jsonl").exists() || metrics(&out).is_empty(), "a step ran");
}

#[test]
fn a_reward_model_learns_conversational_preferences_with_an_implicit_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        r#"version = 1
kind = "reward"
seed = 2
[model]
path = "tiny-qwen2-chat"
dtype = "f32"
max_length = 256
{LORA}
[data]
train = "data/prefs_chat.jsonl"
[train]
max_steps = 40
batch_size = 8
lr = 2e-3
warmup_steps = 5
eval_every = 20
"#
    );
    let outcomes = run_job(&job(&text), tmp.path(), Device::Cpu).unwrap();
    // Every 10th pair is held out (8 of 80): the answered sum must win.
    let acc = outcomes[0].final_metrics["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.99, "held-out pairwise accuracy {acc}");
    // The pairs were rendered through the chat template: what the reward
    // model read ends each response with the turn's <|im_end|>.
    let pairs = tmp.path().join("pairs");
    rlhf_worker::train::stages::reward::write_pairs(&job(&text), &pairs).unwrap();
    let first = std::fs::read_to_string(pairs.join("train.jsonl")).unwrap();
    let row: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert!(row["prompt"].as_str().unwrap().ends_with("<|im_start|>assistant\n"), "{row}");
    assert!(row["chosen"].as_str().unwrap().starts_with("The answer is"), "{row}");
    assert!(row["chosen"].as_str().unwrap().ends_with("<|im_end|>\n"), "{row}");
}
