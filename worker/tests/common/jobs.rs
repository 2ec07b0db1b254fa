//! Job files of the stage tests (tiny-llama, the eprstmt fixtures), in a
//! given model dtype.

use std::path::Path;

use rlhf_common::spec::JobSpec;

/// A job file's text, parsed, with its paths resolved against the fixtures.
pub fn job(text: &str) -> JobSpec {
    let mut j = JobSpec::from_toml(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    j.resolve_paths(&super::fixtures());
    j
}

pub const LORA: &str = "[peft]\nmethod = \"lora\"\nr = 8\nalpha = 16\ntarget_modules = [\"all-linear\"]\n";

/// Runs the f32 SFT job of 60 steps into `dir`; returns its adapter (the
/// starting point of the policy tests).
pub fn sft_adapter(dir: &Path) -> std::path::PathBuf {
    let out = rlhf_worker::train::run::run_job(&job(&sft_toml("f32", 60, 1, 0)), dir, tch::Device::Cpu);
    out.unwrap_or_else(|e| panic!("sft into {}: {e}", dir.display()));
    dir.join("adapter")
}

/// SFT with LoRA; a checkpoint every `every` steps (0: none).
pub fn sft_toml(dtype: &str, steps: usize, seed: u64, every: usize) -> String {
    format!(
        r#"version = 1
kind = "sft"
seed = {seed}
[model]
path = "tiny-llama"
dtype = "{dtype}"
max_length = 256
{LORA}
[data]
task = "eprstmt"
train = "fewclue/eprstmt/train.json"
eval = "fewclue/eprstmt/dev.json"
[train]
max_steps = {steps}
batch_size = 8
lr = 3e-3
warmup_steps = 5
eval_every = 20
[checkpoint]
every = {every}
"#
    )
}

/// A reward model on pairs built from the multiple-choice fixture.
pub fn reward_toml(dtype: &str) -> String {
    format!(
        r#"version = 1
kind = "reward"
seed = 2
[model]
path = "tiny-llama"
dtype = "{dtype}"
max_length = 256
{LORA}
[data]
task = "eprstmt"
from_multiple_choice = true
train = "fewclue/eprstmt/train.json"
eval = "fewclue/eprstmt/dev.json"
[train]
max_steps = 120
batch_size = 8
lr = 2e-3
warmup_steps = 5
eval_every = 40
"#
    )
}

/// PPO from the SFT adapter `sft` (merged), rewarding responses with "A".
pub fn ppo_toml(dtype: &str, sft: &Path, iterations: usize, seed: u64) -> String {
    format!(
        r#"version = 1
kind = "ppo"
seed = {seed}
[model]
path = "tiny-llama"
dtype = "{dtype}"
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
ppo_epochs = 2
max_new_tokens = 2
temperature = 1.0
lr = 3e-3
critic_lr = 3e-3
reward = {{ kind = "match", text = "A" }}
"#,
        sft.display().to_string()
    )
}
