//! Several data sources in one stage and a pipeline that chooses between
//! stages, as the paper's experiment needs (scripts/paper.sh): SFT on two
//! FewCLUE tasks at once, the better of two SFT runs (by held-out accuracy)
//! under later stages, a reward model trained further from an earlier one,
//! and PPO prompts from two tasks, each with its own template.

mod common;

use common::jobs::job;
use rlhf_common::spec::DataSpec;
use rlhf_worker::train::run::run_job;
use rlhf_worker::train::setup::{task_sets, Split};
use tch::Device;

const SOURCES: &str = r#"sources = [
  { task = "eprstmt", train = "fewclue/eprstmt/train.json", eval = "fewclue/eprstmt/dev.json" },
  { task = "bustm", train = "fewclue/bustm/dev.json", eval = "fewclue/bustm/dev.json" },
]"#;

fn pipeline() -> String {
    format!(
        r#"version = 1
kind = "pipeline"
seed = 3
[model]
path = "tiny-llama"
max_length = 256
[peft]
method = "lora"
r = 8
alpha = 16
target_modules = ["all-linear"]
[data]
{SOURCES}

[[stage]]
name = "sft-weak"
kind = "sft"
train = {{ max_steps = 2, batch_size = 8, lr = 1e-5 }}

[[stage]]
name = "sft-good"
kind = "sft"
train = {{ max_steps = 60, batch_size = 8, lr = 3e-3, warmup_steps = 5 }}

[[stage]]
name = "rm-first"
kind = "reward"
data = {{ from_multiple_choice = true, {SOURCES} }}
train = {{ max_steps = 10, batch_size = 8, lr = 2e-3 }}

# Starts from rm-first and barely moves (lr 1e-9): it must score as rm-first ended.
[[stage]]
name = "rm-more"
kind = "reward"
init_from = "rm-first"
data = {{ from_multiple_choice = true, {SOURCES} }}
train = {{ max_steps = 1, batch_size = 8, lr = 1e-9 }}

[[stage]]
name = "ppo"
kind = "ppo"
ppo = {{ iterations = 2, rollout_batch = 16, minibatch = 8, max_new_tokens = 1, temperature = 1.0, lr = 1e-3, critic_lr = 1e-3, reward = {{ kind = "label" }} }}

[[stage]]
name = "eval"
kind = "eval"
eval = {{ modes = ["choice"], tasks = [{{ task = "eprstmt", path = "fewclue/eprstmt/dev.json" }}] }}
"#
    )
}

#[test]
fn sources_load_per_task_with_their_own_templates() {
    let j = job(&format!("version = 1\nkind = \"sft\"\n[model]\npath = \"tiny-llama\"\n[peft]\nmethod = \"lora\"\n[data]\nmax_eval_examples = 4\n{SOURCES}\n"));
    let data: DataSpec = j.data.unwrap();
    let train = task_sets(&data, Split::Train).unwrap();
    let held_out = task_sets(&data, Split::Eval).unwrap();
    assert_eq!(train.iter().map(|s| s.examples.len()).collect::<Vec<_>>(), [64, 8]);
    assert_eq!(
        held_out.iter().map(|s| s.examples.len()).collect::<Vec<_>>(),
        [4, 4],
        "max_eval_examples is per source"
    );
    assert_ne!(train[0].template.template, train[1].template.template);
    assert!(train[1].template.render(&train[1].examples[0]).unwrap().contains("句子一"));
}

#[test]
fn a_pipeline_builds_on_the_best_sft_and_a_reward_model_trained_further() {
    let tmp = tempfile::tempdir().unwrap();
    let outcomes = run_job(&job(&pipeline()), tmp.path(), Device::Cpu).unwrap();
    let by = |name: &str| outcomes.iter().find(|o| o.stage == name).unwrap();
    let dev = |name: &str| by(name).final_metrics["eval_accuracy"].as_f64().unwrap();
    // Held-out accuracy is the mean over both tasks' dev files.
    assert!(dev("sft-good") >= dev("sft-weak") + 0.2, "good {} vs weak {}", dev("sft-good"), dev("sft-weak"));
    assert!(outcomes.iter().all(|o| o.wall_seconds > 0.0));

    // rm-more starts where rm-first ended: rm-first shifted its head so its
    // training demonstrations score 0 on average, so rm-more (the same pairs,
    // an unchanged model) finds them at 0 already, and ranks the held-out
    // pairs exactly as rm-first does; a fresh reward model would do neither.
    let fm = |name: &str, k: &str| by(name).final_metrics[k].as_f64().unwrap();
    assert!(fm("rm-first", "reward_offset").abs() > 1e-3, "rm-first offset {}", fm("rm-first", "reward_offset"));
    assert!(fm("rm-more", "reward_offset").abs() < 1e-3, "rm-more offset {}", fm("rm-more", "reward_offset"));
    assert_eq!(fm("rm-more", "accuracy"), fm("rm-first", "accuracy"));
    assert_eq!(fm("rm-more", "bare_answer_accuracy"), fm("rm-first", "bare_answer_accuracy"));

    // PPO's label reward read each prompt's answer with its own task's template.
    let ppo = &by("ppo").final_metrics;
    let r = ppo["reward_mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&r), "label reward mean {r}");

    // The eval scored every SFT stage by name, and PPO on the better SFT.
    let models: Vec<&str> = by("eval").accuracies.iter().map(|a| a.model.as_str()).collect();
    assert_eq!(models, ["base", "ppo", "sft-good", "sft-weak"]);
    let acc = |m: &str| by("eval").accuracies.iter().find(|a| a.model == m).unwrap().accuracy;
    assert!(acc("ppo") >= acc("sft-good") - 0.15, "ppo {} should start from sft-good {}", acc("ppo"), acc("sft-good"));
    assert!(acc("ppo") > acc("sft-weak") + 0.15, "ppo {} vs sft-weak {}", acc("ppo"), acc("sft-weak"));
    let report = std::fs::read_to_string(tmp.path().join("report.md")).unwrap();
    assert!(report.contains("## Stage wall times"), "{report}");
}
