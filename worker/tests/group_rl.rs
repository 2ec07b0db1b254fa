//! The `grpo` and `rloo` stages on CPU with tiny models: from an SFT
//! adapter (merged, the reference), groups of completions per prompt raise
//! a reward that prefers a known answer; GRPO with β = 0 runs no reference
//! pass; job files name a bad option's field; a pipeline runs them.

mod common;

use std::path::Path;

use common::jobs::{job, sft_adapter, LORA};
use rlhf_worker::train::run::run_job;
use serde_json::Value;
use tch::Device;

fn series(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap().get(key).and_then(Value::as_f64))
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// GRPO or RLOO (`kind`) from the SFT adapter `sft`, rewarding "A".
fn group_toml(kind: &str, sft: &Path, options: &str, iterations: usize) -> String {
    format!(
        r#"version = 1
kind = "{kind}"
seed = 3
[model]
path = "tiny-llama"
dtype = "f32"
max_length = 256
merge_adapters = [{:?}]
{LORA}
[data]
task = "eprstmt"
train = "fewclue/eprstmt/train.json"
[ppo]
iterations = {iterations}
rollout_batch = 16
minibatch = 8
ppo_epochs = 1
max_new_tokens = 2
temperature = 1.0
lr = 3e-3
reward = {{ kind = "match", text = "A" }}
[{kind}]
num_generations = 4
{options}
"#,
        sft.display().to_string()
    )
}

#[test]
fn grpo_and_rloo_raise_a_reward_from_groups_of_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = sft_adapter(&tmp.path().join("sft"));
    for (kind, options) in [
        ("grpo", "loss_type = \"dapo\"\nepsilon_high = 0.28"),
        ("grpo", "loss_type = \"grpo\"\nbeta = 0.04"),
        ("grpo", "loss_type = \"dr_grpo\"\nscale_rewards = \"none\""),
        ("rloo", "beta = 0.05"),
    ] {
        let out = tmp.path().join(format!("{kind}-{}", options.len()));
        let o = &run_job(&job(&group_toml(kind, &adapter, options, 20)), &out, Device::Cpu).unwrap()[0];
        assert_eq!(o.kind, kind);
        let reward = series(&out, "reward_mean");
        assert_eq!(reward.len(), 20);
        assert!(mean(&reward[15..]) > mean(&reward[..3]) + 0.2, "{kind} {options}: reward {reward:?}");
        let kl = series(&out, "kl");
        if options.contains("beta") {
            assert!(kl.iter().all(|k| k.is_finite() && k.abs() < 10.0), "{kind} {options}: kl {kl:?}");
        }
        assert!(out.join("adapter/adapter_config.json").exists());
        // No critic: nothing is trained or saved for one.
        assert!(series(&out, "value_loss").is_empty());
    }
}

#[test]
fn grpo_without_kl_runs_no_reference_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = sft_adapter(&tmp.path().join("sft"));
    let out = tmp.path().join("grpo");
    run_job(&job(&group_toml("grpo", &adapter, "", 3)), &out, Device::Cpu).unwrap();
    assert!(series(&out, "time_reference").iter().all(|&t| t < 1e-3), "{:?}", series(&out, "time_reference"));
    assert!(series(&out, "kl").is_empty(), "β = 0 logs no KL");
}

#[test]
fn bad_group_options_name_the_field() {
    let sft = Path::new("/none");
    for (kind, bad, field) in [
        ("grpo", "num_generations = 3", "grpo.num_generations"),
        ("grpo", "num_generations = 1", "grpo.num_generations"),
        ("grpo", "loss_type = \"ppo\"", "grpo.loss_type"),
        ("grpo", "scale_rewards = \"rank\"", "grpo.scale_rewards"),
        ("grpo", "beta = -1.0", "grpo.beta"),
        ("rloo", "epsilon = 1.5", "rloo.epsilon"),
    ] {
        let text = group_toml(kind, sft, "", 1).replace("num_generations = 4", bad);
        let e = rlhf_common::spec::JobSpec::from_toml(&text).unwrap_err().to_string();
        assert!(e.starts_with(field), "{bad}: {e}");
    }
    // A generation part splits no group.
    let text = group_toml("grpo", sft, "", 1).replace("minibatch = 8", "minibatch = 8\ngenerate_batch = 6");
    let e = rlhf_common::spec::JobSpec::from_toml(&text).unwrap_err().to_string();
    assert!(e.starts_with("ppo.generate_batch: must be a multiple of grpo.num_generations (4), got 6"), "{e}");
    let text = group_toml("grpo", sft, "", 1).replace("[grpo]", "[rloo]");
    let e = rlhf_common::spec::JobSpec::from_toml(&text).unwrap_err().to_string();
    assert!(e.starts_with("rloo: only a rloo job"), "{e}");
}
