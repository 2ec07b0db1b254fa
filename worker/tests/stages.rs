//! The training stages on CPU with tiny models, seeded: losses fall,
//! accuracies rise, PPO raises a reward, runs repeat exactly and resume.

mod common;

use std::path::Path;

use common::fixtures;
use common::jobs::{job, ppo_toml, reward_toml, sft_adapter, sft_toml};
use rlhf_worker::train::run::run_job;
use serde_json::Value;
use tch::Device;

fn metrics(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn series(m: &[Value], key: &str) -> Vec<f64> {
    m.iter().filter_map(|r| r.get(key).and_then(Value::as_f64)).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn eval_toml(adapter: Option<&Path>) -> String {
    let adapters =
        adapter.map(|a| format!("[eval.adapters]\nsft = [{:?}]\n", a.display().to_string())).unwrap_or_default();
    format!(
        r#"version = 1
kind = "eval"
seed = 1
[model]
path = "tiny-llama"
[eval]
modes = ["choice", "generate"]
[[eval.tasks]]
task = "eprstmt"
path = "fewclue/eprstmt/dev.json"
{adapters}"#
    )
}

#[test]
fn sft_loss_falls_and_beats_the_untrained_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sft");
    run_job(&job(&sft_toml("f32", 60, 1, 0)), &out, Device::Cpu).unwrap();
    let m = metrics(&out);
    let loss = series(&m, "loss");
    assert_eq!(loss.len(), 60);
    assert!(mean(&loss[55..]) < 0.25 * mean(&loss[..5]), "loss did not fall: {loss:?}");
    for f in [
        "job.toml",
        "metrics.jsonl",
        "outcome.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }

    let ev = tmp.path().join("eval");
    let outcomes = run_job(&job(&eval_toml(Some(&out.join("adapter")))), &ev, Device::Cpu).unwrap();
    let acc = |model: &str, mode: &str| {
        outcomes[0].accuracies.iter().find(|a| a.model == model && a.mode == mode).unwrap().accuracy
    };
    assert!(acc("base", "choice") <= 0.7, "untrained base is near chance");
    assert!(acc("sft", "choice") >= 0.9, "sft choice accuracy {}", acc("sft", "choice"));
    assert!(acc("sft", "generate") >= 0.9, "sft generate accuracy {}", acc("sft", "generate"));
    let report = std::fs::read_to_string(ev.join("report.md")).unwrap();
    assert!(report.contains("| sft |") && report.contains("choice mode"), "{report}");
}

#[test]
fn reward_model_ranks_held_out_pairs_well_above_chance() {
    let tmp = tempfile::tempdir().unwrap();
    let text = reward_toml("f32");
    let outcomes = run_job(&job(&text), tmp.path(), Device::Cpu).unwrap();
    let acc = outcomes[0].final_metrics["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.75, "held-out pairwise accuracy {acc}");
    let m = metrics(tmp.path());
    assert!(series(&m, "accuracy").len() == 3);
    assert!(tmp.path().join("reward_model/reward_head.safetensors").exists());
}

#[test]
fn ppo_raises_a_reward_that_prefers_a_known_answer_with_bounded_kl() {
    let tmp = tempfile::tempdir().unwrap();
    let sft = sft_adapter(&tmp.path().join("sft"));
    let out = tmp.path().join("ppo");
    run_job(&job(&ppo_toml("f32", &sft, 25, 3)), &out, Device::Cpu).unwrap();
    let m = metrics(&out);
    let reward = series(&m, "reward_mean");
    let kl = series(&m, "kl");
    assert_eq!(reward.len(), 25);
    // The SFT policy answers "A" only for negative reviews (about half).
    assert!(mean(&reward[..3]) < 0.75, "start {reward:?}");
    assert!(mean(&reward[20..]) > mean(&reward[..3]) + 0.2, "reward did not rise: {reward:?}");
    assert!(kl.iter().all(|k| k.is_finite() && *k < 10.0), "kl unbounded: {kl:?}");
    for key in
        ["reward_std", "entropy", "clip_frac", "value_loss", "policy_loss", "grad_norm", "response_len", "tokens_per_s"]
    {
        assert_eq!(series(&m, key).len(), 25, "{key} missing");
    }
}

#[test]
fn ppo_with_several_samples_per_prompt_raises_the_reward() {
    // 4 prompts × 4 completions per iteration (their prompt forward shared),
    // minibatches of whole groups.
    let tmp = tempfile::tempdir().unwrap();
    let sft = sft_adapter(&tmp.path().join("sft"));
    let out = tmp.path().join("ppo");
    let text = ppo_toml("f32", &sft, 20, 3).replace("minibatch = 8", "minibatch = 8\nsamples_per_prompt = 4");
    run_job(&job(&text), &out, Device::Cpu).unwrap();
    let reward = series(&metrics(&out), "reward_mean");
    assert_eq!(reward.len(), 20);
    assert!(mean(&reward[15..]) > mean(&reward[..3]) + 0.2, "reward did not rise: {reward:?}");
    // Scores centred on their prompt's mean (ppo.group_baseline): the
    // logged reward is the raw score, and it rises too.
    let out = tmp.path().join("ppo-centred");
    run_job(
        &job(&text.replace("samples_per_prompt = 4", "samples_per_prompt = 4\ngroup_baseline = true")),
        &out,
        Device::Cpu,
    )
    .unwrap();
    let reward = series(&metrics(&out), "reward_mean");
    assert!(mean(&reward[15..]) > mean(&reward[..3]) + 0.2, "reward did not rise with group_baseline: {reward:?}");
}

/// Drops wall-clock fields, which differ between runs.
fn deterministic(m: &[Value]) -> Vec<Value> {
    m.iter()
        .map(|r| {
            let mut r = r.clone();
            let o = r.as_object_mut().unwrap();
            o.retain(|k, _| k != "tokens_per_s" && !k.starts_with("time_"));
            r
        })
        .collect()
}

#[test]
fn same_seed_gives_identical_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, text: &str| {
        let out = tmp.path().join(name);
        run_job(&job(text), &out, Device::Cpu).unwrap();
        deterministic(&metrics(&out))
    };
    assert_eq!(run("sft-a", &sft_toml("f32", 15, 5, 0)), run("sft-b", &sft_toml("f32", 15, 5, 0)));
    let sft = tmp.path().join("sft-a/adapter");
    let a = run("ppo-a", &ppo_toml("f32", &sft, 3, 4));
    assert_eq!(a, run("ppo-b", &ppo_toml("f32", &sft, 3, 4)));
    assert_ne!(a, run("ppo-c", &ppo_toml("f32", &sft, 3, 5)), "another seed should differ");
}

/// The safetensors file `file` holds the same tensors, bit for bit, under
/// run directories `a` and `b`.
fn assert_same_tensors(a: &Path, b: &Path, file: &str) {
    let read = |d: &Path| {
        let mut t = tch::Tensor::read_safetensors(d.join(file)).unwrap();
        t.sort_by(|x, y| x.0.cmp(&y.0));
        t
    };
    let (ta, tb) = (read(a), read(b));
    assert!(!ta.is_empty(), "{file} holds no tensors");
    assert_eq!(ta.len(), tb.len(), "{file}");
    for ((ka, xa), (kb, xb)) in ta.iter().zip(&tb) {
        assert_eq!(ka, kb);
        assert!(xa.equal(xb), "{file} {ka} differs after resume");
    }
}

#[test]
fn an_interrupted_sft_resumes_from_its_checkpoint_to_the_same_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    run_job(&job(&sft_toml("f32", 30, 6, 0)), &whole, Device::Cpu).unwrap();
    let part = tmp.path().join("part");
    run_job(&job(&sft_toml("f32", 30, 6, 10)), &part, Device::Cpu).unwrap();
    // Pretend the process died right after the step-20 checkpoint.
    std::fs::remove_dir_all(part.join("adapter")).unwrap();
    std::fs::remove_dir_all(part.join("checkpoints/step-10")).ok();
    std::fs::remove_file(part.join("metrics.jsonl")).unwrap();
    run_job(&job(&sft_toml("f32", 30, 6, 10)), &part, Device::Cpu).unwrap();
    let steps: Vec<f64> = series(&metrics(&part), "step");
    assert_eq!(steps.first().copied(), Some(21.0), "resumed at the checkpoint");
    assert_same_tensors(&whole, &part, "adapter/adapter_model.safetensors");
}

#[test]
fn an_interrupted_reward_stage_resumes_from_its_checkpoint_to_the_same_reward_model() {
    let tmp = tempfile::tempdir().unwrap();
    let text = |every: usize| {
        reward_toml("f32").replace("max_steps = 120", "max_steps = 30") + &format!("[checkpoint]\nevery = {every}\n")
    };
    let whole = tmp.path().join("whole");
    run_job(&job(&text(0)), &whole, Device::Cpu).unwrap();
    let part = tmp.path().join("part");
    run_job(&job(&text(10)), &part, Device::Cpu).unwrap();
    // Pretend the process died right after the step-20 checkpoint.
    std::fs::remove_dir_all(part.join("reward_model")).unwrap();
    std::fs::remove_dir_all(part.join("checkpoints/step-10")).ok();
    std::fs::remove_file(part.join("metrics.jsonl")).unwrap();
    run_job(&job(&text(10)), &part, Device::Cpu).unwrap();
    assert_eq!(series(&metrics(&part), "step").first().copied(), Some(21.0), "resumed at the checkpoint");
    for file in ["adapter_model.safetensors", "reward_head.safetensors"] {
        assert_same_tensors(&whole, &part, &format!("reward_model/{file}"));
    }
}

#[test]
fn an_interrupted_ppo_resumes_from_its_checkpoint_to_the_same_policy_and_critic() {
    let tmp = tempfile::tempdir().unwrap();
    let sft = tmp.path().join("sft");
    run_job(&job(&sft_toml("f32", 20, 1, 0)), &sft, Device::Cpu).unwrap();
    let text = |every: usize| ppo_toml("f32", &sft.join("adapter"), 8, 3) + &format!("[checkpoint]\nevery = {every}\n");
    let whole = tmp.path().join("whole");
    run_job(&job(&text(0)), &whole, Device::Cpu).unwrap();
    let part = tmp.path().join("part");
    run_job(&job(&text(3)), &part, Device::Cpu).unwrap();
    // Pretend the process died right after the iteration-6 checkpoint.
    for d in ["adapter", "critic", "checkpoints/step-3"] {
        std::fs::remove_dir_all(part.join(d)).unwrap();
    }
    std::fs::remove_file(part.join("metrics.jsonl")).unwrap();
    run_job(&job(&text(3)), &part, Device::Cpu).unwrap();
    assert_eq!(series(&metrics(&part), "step").first().copied(), Some(7.0), "resumed at the checkpoint");
    for file in
        ["adapter/adapter_model.safetensors", "critic/adapter_model.safetensors", "critic/value_head.safetensors"]
    {
        assert_same_tensors(&whole, &part, file);
    }
}

#[test]
fn bad_inputs_name_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    // A corrupt line in a training file: file and line.
    let bad = tmp.path().join("bad.json");
    let good = std::fs::read_to_string(fixtures().join("fewclue/eprstmt/train.json")).unwrap();
    let mut lines: Vec<&str> = good.lines().take(4).collect();
    lines[2] = "{\"id\": 2, \"sentence\": \"broken";
    std::fs::write(&bad, lines.join("\n")).unwrap();
    let text =
        sft_toml("f32", 5, 1, 0).replace("\"fewclue/eprstmt/train.json\"", &format!("{:?}", bad.display().to_string()));
    let err = run_job(&job(&text), &tmp.path().join("o1"), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("bad.json:3"), "{err}");
    // A missing model: the path.
    let text = sft_toml("f32", 5, 1, 0).replace("path = \"tiny-llama\"", "path = \"/nonexistent/model\"");
    let err = run_job(&job(&text), &tmp.path().join("o2"), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/model"), "{err}");
    // A bad field in the job file: its path.
    let f = tmp.path().join("job.toml");
    std::fs::write(&f, sft_toml("f32", 5, 1, 0).replace("lr = 3e-3", "lr = -1.0")).unwrap();
    let err = rlhf_common::JobSpec::load(&f).unwrap_err().to_string();
    assert!(err.contains("train.lr: must be positive"), "{err}");
    std::fs::write(&f, sft_toml("f32", 5, 1, 0).replace("lr = 3e-3", "learning_rate = 3e-3")).unwrap();
    let err = rlhf_common::JobSpec::load(&f).unwrap_err().to_string();
    assert!(err.contains("unknown field `learning_rate`"), "{err}");
}

#[test]
fn a_torn_checkpoint_falls_back_to_the_one_before() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    run_job(&job(&sft_toml("f32", 30, 6, 0)), &whole, Device::Cpu).unwrap();
    let part = tmp.path().join("part");
    run_job(&job(&sft_toml("f32", 30, 6, 10)), &part, Device::Cpu).unwrap();
    // The process died while the step-20 checkpoint's adapter was being
    // written out: its file is torn (the rename had happened, the data had not
    // reached the disk).
    std::fs::remove_dir_all(part.join("adapter")).unwrap();
    std::fs::remove_file(part.join("metrics.jsonl")).unwrap();
    let torn = part.join("checkpoints/step-20/policy/adapter_model.safetensors");
    let bytes = std::fs::read(&torn).unwrap();
    std::fs::write(&torn, &bytes[..bytes.len() / 2]).unwrap();
    run_job(&job(&sft_toml("f32", 30, 6, 10)), &part, Device::Cpu).unwrap();
    let steps: Vec<f64> = series(&metrics(&part), "step");
    assert_eq!(steps.first().copied(), Some(11.0), "resumed at step 10, the last good checkpoint");
    assert_same_tensors(&whole, &part, "adapter/adapter_model.safetensors");
}
