//! Job files: TOML, `version = 1`, one `kind`, and sections per concern.
//!
//! Parsing uses `deny_unknown_fields` everywhere; [`JobSpec::validate`]
//! checks values and names the field path of the first problem
//! (`ppo.clip: must be in (0, 1)`), so `rlhfctl submit` can fail locally and
//! the coordinator can check again.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod data;
mod dpo;
mod group;
mod reward;
pub use data::{DataSpec, Source, FORMATS};
pub use dpo::{DpoSpec, DPO_LOSSES};
pub use group::{GroupSpec, GRPO_LOSSES, SCALE_REWARDS};
pub use reward::{RewardSource, WeightedReward};

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    Pretrain,
    Sft,
    Reward,
    Ppo,
    Eval,
    Pipeline,
    Dpo,
    Grpo,
    Rloo,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Pretrain => "pretrain",
            JobKind::Sft => "sft",
            JobKind::Reward => "reward",
            JobKind::Ppo => "ppo",
            JobKind::Eval => "eval",
            JobKind::Pipeline => "pipeline",
            JobKind::Dpo => "dpo",
            JobKind::Grpo => "grpo",
            JobKind::Rloo => "rloo",
        }
    }

    /// The kinds that sample from the policy and learn from rewards (PPO,
    /// GRPO, RLOO): `[ppo]`'s rollout, rollout workers, reward functions.
    pub fn is_rl(self) -> bool {
        matches!(self, JobKind::Ppo | JobKind::Grpo | JobKind::Rloo)
    }
}

/// The parameter-efficient method of an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeftMethod {
    Lora,
    Ssf,
    #[serde(rename = "repadapter")]
    RepAdapter,
    Full,
}

impl PeftMethod {
    pub const ALL: [PeftMethod; 4] = [PeftMethod::Lora, PeftMethod::Ssf, PeftMethod::RepAdapter, PeftMethod::Full];

    /// The `peft_type` of `adapter_config.json`.
    pub fn peft_type(self) -> &'static str {
        match self {
            PeftMethod::Lora => "LORA",
            PeftMethod::Ssf => "SSF",
            PeftMethod::RepAdapter => "REPADAPTER",
            PeftMethod::Full => "FULL",
        }
    }

    pub fn from_peft_type(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.peft_type() == s)
    }

    /// The lowercase name used in job files and reports.
    pub fn name(self) -> &'static str {
        match self {
            PeftMethod::Lora => "lora",
            PeftMethod::Ssf => "ssf",
            PeftMethod::RepAdapter => "repadapter",
            PeftMethod::Full => "full",
        }
    }
}

/// A validation failure: the field path and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {msg}")]
pub struct SpecError {
    pub field: String,
    pub msg: String,
}

/// Why a job file could not be loaded: unreadable, or invalid (with the
/// field at fault).
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    // The cause is part of the message and not also a `source`, so a chain
    // printer (anyhow's `{:#}`) says it once.
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{}: {error}", path.display())]
    Invalid { path: PathBuf, error: SpecError },
}

/// `a/b/../c` as `a/c` (lexically: `..` drops the component before it).
fn normalize(p: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Job and stage names become directory names: `[A-Za-z0-9_.-]{1,64}`,
/// not `.` or `..`.
pub fn check_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if name.is_empty() || name.len() > 64 || !ok_chars || name == "." || name == ".." {
        return err(field, format!("{name:?}: a name is 1 to 64 of A-Z a-z 0-9 _ . - (it names a directory)"));
    }
    Ok(())
}

fn err<T>(field: impl Into<String>, msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError { field: field.into(), msg: msg.into() })
}

/// The whole job file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub version: u32,
    pub kind: JobKind,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSpec,
    #[serde(default)]
    pub peft: Option<PeftSpec>,
    #[serde(default)]
    pub data: Option<DataSpec>,
    #[serde(default)]
    pub train: Option<TrainSpec>,
    #[serde(default)]
    pub ppo: Option<PpoSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpo: Option<GroupSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rloo: Option<GroupSpec>,
    #[serde(default)]
    pub eval: Option<EvalSpec>,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub placement: PlacementSpec,
    /// Pipeline only: the stages, run in order.
    #[serde(default, rename = "stage")]
    pub stages: Vec<StageSpec>,
}

/// The base model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A Hugging Face model directory. A pipeline whose first stage is
    /// `pretrain` writes it instead of reading it.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Sequences (prompt + response) are truncated to this many tokens.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// `pretrain`: make a fresh model first.
    #[serde(default)]
    pub init: Option<InitSpec>,
    /// Adapters merged into the base before the job runs, in order — e.g.
    /// the SFT adapter under a reward or PPO job, so the reference policy
    /// is the SFT model.
    #[serde(default)]
    pub merge_adapters: Vec<PathBuf>,
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_max_length() -> usize {
    2048
}

/// A freshly made model (`rlhf-worker init-model`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    #[serde(default = "default_preset")]
    pub preset: String,
    /// Text the tokenizer is trained on.
    pub corpus: PathBuf,
}

fn default_preset() -> String {
    "tiny".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeftSpec {
    pub method: PeftMethod,
    #[serde(default = "default_r")]
    pub r: i64,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub target_modules: Vec<String>,
    #[serde(default = "default_groups")]
    pub groups: i64,
}

fn default_r() -> i64 {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_groups() -> i64 {
    2
}

impl PeftSpec {
    pub fn new(method: PeftMethod) -> Self {
        Self { method, r: default_r(), alpha: default_alpha(), target_modules: Vec::new(), groups: default_groups() }
    }
}

/// Optimisation of sft / reward / pretrain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default = "one")]
    pub epochs: usize,
    /// Train for exactly this many optimiser steps (epochs are then ignored).
    #[serde(default)]
    pub max_steps: Option<usize>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Evaluate on held-out data every N steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Activation checkpointing in sft/pretrain steps (as `ppo.gradient_checkpointing`).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Reward: start from this reward model directory (adapter + head)
    /// instead of a fresh one. In a pipeline, `init_from` on the stage names
    /// an earlier reward stage instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// Reward: the scalar head's learning rate (default: `lr`). The head
    /// starts random and reads a hidden state whose right-vs-wrong
    /// differences are small, so at an adapter's lr it barely moves in a
    /// short run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_lr: Option<f64>,
    /// Reward: the score is the head's plus `c · Σ log p(response | prompt)`
    /// under the reward model's own LM (`c` learned, from 1), so a reward
    /// model over an SFT base starts from the SFT policy's own ranking of
    /// answers instead of a random head's (see `rlhf_model::head`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub score_logprob: bool,
    /// Keep the state of the evaluation (every `eval_every` steps) with the
    /// best held-out metric, not the last one (model selection on the dev
    /// set; kept across a resume).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub select_best: bool,
}

fn one() -> usize {
    1
}
fn is_one(n: &usize) -> bool {
    *n == 1
}
fn default_batch() -> usize {
    8
}
fn default_lr() -> f64 {
    1e-4
}
fn default_clip() -> f64 {
    1.0
}

impl TrainSpec {
    /// Whether to evaluate after step `done` of `total` (every `eval_every`, and at the end).
    pub fn eval_due(&self, done: usize, total: usize) -> bool {
        (self.eval_every > 0 && done.is_multiple_of(self.eval_every)) || done == total
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-4,
            weight_decay: 0.0,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            eval_every: 0,
            gradient_checkpointing: false,
            init_from: None,
            head_lr: None,
            score_logprob: false,
            select_best: false,
        }
    }
}

fn unit() -> f64 {
    1.0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimatorSpec {
    K1,
    K3,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSpec {
    #[serde(default = "default_iterations")]
    pub iterations: usize,
    /// Prompts per iteration.
    #[serde(default = "default_rollout")]
    pub rollout_batch: usize,
    #[serde(default = "default_minibatch")]
    pub minibatch: usize,
    #[serde(default = "default_ppo_epochs")]
    pub ppo_epochs: usize,
    #[serde(default = "default_ppo_clip")]
    pub clip: f64,
    #[serde(default = "default_ppo_clip")]
    pub value_clip: f64,
    #[serde(default = "default_vf_coef")]
    pub vf_coef: f64,
    #[serde(default = "unit")]
    pub gamma: f64,
    #[serde(default = "default_lam")]
    pub lam: f64,
    #[serde(default = "default_kl")]
    pub kl_coef: f64,
    #[serde(default = "default_kl_est")]
    pub kl_estimator: KlEstimatorSpec,
    /// Adaptive KL controller target (none = fixed coefficient).
    #[serde(default)]
    pub kl_target: Option<f64>,
    #[serde(default = "default_kl_horizon")]
    pub kl_horizon: f64,
    #[serde(default = "default_new_tokens")]
    pub max_new_tokens: usize,
    #[serde(default = "unit")]
    pub temperature: f64,
    #[serde(default = "unit")]
    pub top_p: f64,
    #[serde(default)]
    pub top_k: i64,
    /// Subtracted from the score of responses that never emit EOS.
    #[serde(default)]
    pub missing_eos_penalty: Option<f64>,
    /// Scores are clipped to ±this.
    #[serde(default)]
    pub reward_clip: Option<f64>,
    #[serde(default = "yes")]
    pub whiten_advantages: bool,
    #[serde(default = "default_ppo_lr")]
    pub lr: f64,
    #[serde(default = "default_ppo_lr")]
    pub critic_lr: f64,
    #[serde(default = "default_clip")]
    pub max_grad_norm: f64,
    /// Activation checkpointing in the policy and critic updates: keep only
    /// each decoder block's input, recompute the rest in the backward (less
    /// memory for one more forward; the same gradients).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// The reward (one source); or several in `rewards`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<RewardSource>,
    /// `[[ppo.rewards]]`: reward functions with weights, summed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<WeightedReward>,
    /// A model reward scores each response as if it ended with EOS (the
    /// reward model learned on EOS-terminated answers); for responses cut
    /// at max_new_tokens, e.g. the paper's one-token answers.
    #[serde(default)]
    pub score_with_eos: bool,
    /// Batches generated ahead of the update: 0 waits for each update
    /// (on-policy); 1 generates the next batch while the trainer updates,
    /// one step off-policy (the PPO ratio is taken against the logged
    /// behaviour log-probs either way).
    #[serde(default)]
    pub rollout_ahead: usize,
    /// Completions sampled per prompt (OpenRLHF's `n_samples_per_prompt`):
    /// `rollout_batch / samples_per_prompt` distinct prompts per iteration.
    /// The copies of a prompt share its forward (generation, reference,
    /// reward, critic) and stay in one minibatch, so more samples cost
    /// little where prompts are long and responses short.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub samples_per_prompt: usize,
    /// With `samples_per_prompt` > 1: each score minus the mean score of its
    /// prompt's samples, before the KL penalty (OpenRLHF's
    /// `reinforce_baseline` shaping; GAE and the critic then work on what
    /// is left). What the reward model says about a prompt as a whole (one
    /// task's answers all score higher than another's) no longer moves the
    /// policy; only how the prompt's answers rank against each other does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_baseline: bool,
    /// Rows per forward of the passes without a graph over a rollout (the
    /// reference log-probs, reward scores, critic values), as `minibatch` is
    /// for the update; default `minibatch`. Their activations then grow with
    /// this, not with `rollout_batch`. A multiple of `samples_per_prompt`
    /// (a prompt's samples share its forward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_batch: Option<usize>,
    /// Rows generated at once (default: the whole rollout batch). The KV
    /// cache grows with it: a 7B model with full-size key/value heads holds
    /// 0.5 MiB per position, 12 GiB for 64 rows of 384. Each row samples
    /// from its own stream, so in f32 the tokens do not depend on it. A
    /// multiple of `samples_per_prompt` (or of a grpo/rloo job's
    /// `num_generations`): a prompt's samples share its prefill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_batch: Option<usize>,
}

impl PpoSpec {
    /// Rows per forward of a rollout's passes without a graph.
    pub fn forward_rows(&self) -> usize {
        self.forward_batch.unwrap_or(self.minibatch).max(1)
    }

    /// Rows per generation pass: `generate_batch`, or all `rows`.
    pub fn generate_rows(&self, rows: usize) -> usize {
        self.generate_batch.unwrap_or(rows).max(1)
    }

    /// Every reward function with its weight (`reward` alone weighs 1).
    pub fn reward_fns(&self) -> Vec<WeightedReward> {
        reward::weighted(&self.reward, &self.rewards)
    }

    /// The reward model's directory, when one of the rewards is a model
    /// (`Some(None)`: the pipeline fills it in).
    pub fn model_reward(&self) -> Option<&Option<PathBuf>> {
        let mut all = self.reward.iter().chain(self.rewards.iter().map(|w| &w.source));
        all.find_map(|r| match r {
            RewardSource::Model { path } => Some(path),
            _ => None,
        })
    }

    /// Calls `f` with each path of the rewards (under `at`).
    fn visit_paths(&mut self, at: &str, f: &mut dyn FnMut(&str, &mut PathBuf)) {
        let one = self.reward.iter_mut().map(|r| (format!("{at}ppo.reward"), r));
        let many = self.rewards.iter_mut().enumerate().map(|(i, w)| (format!("{at}ppo.rewards[{i}]"), &mut w.source));
        for (field, r) in one.chain(many) {
            match r {
                RewardSource::Model { path: Some(p) } => f(&format!("{field}.path"), p),
                RewardSource::Http { token_file: Some(p), .. } => f(&format!("{field}.token_file"), p),
                _ => {}
            }
        }
    }
}

fn default_iterations() -> usize {
    10
}
fn default_rollout() -> usize {
    8
}
fn default_minibatch() -> usize {
    4
}
fn default_ppo_epochs() -> usize {
    2
}
fn default_ppo_clip() -> f64 {
    0.2
}
fn default_vf_coef() -> f64 {
    0.1
}
fn default_lam() -> f64 {
    0.95
}
fn default_kl() -> f64 {
    0.05
}
fn default_kl_est() -> KlEstimatorSpec {
    KlEstimatorSpec::K1
}
fn default_kl_horizon() -> f64 {
    10000.0
}
fn default_new_tokens() -> usize {
    8
}
fn default_ppo_lr() -> f64 {
    1e-4
}
fn yes() -> bool {
    true
}

/// How FewCLUE accuracy is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalMode {
    /// The paper's settings: sample `max_new_tokens` (1) with top_p 0.9,
    /// temperature 0.1, one beam; the answer must match the verbaliser.
    Generate,
    /// argmax over the options' log-probabilities.
    Choice,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalTaskSpec {
    pub task: String,
    pub path: PathBuf,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub verbalizer: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    pub tasks: Vec<EvalTaskSpec>,
    #[serde(default = "default_modes")]
    pub modes: Vec<EvalMode>,
    /// Evaluate at most this many examples per task (by stride).
    #[serde(default)]
    pub max_examples: Option<usize>,
    #[serde(default = "unit_usize")]
    pub max_new_tokens: usize,
    #[serde(default = "default_eval_temp")]
    pub temperature: f64,
    #[serde(default = "default_eval_top_p")]
    pub top_p: f64,
    #[serde(default = "unit_usize")]
    pub num_beams: usize,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Models to evaluate besides the base: name → adapter directories,
    /// merged in order (e.g. `ppo = ["sft/adapter", "ppo/adapter"]`).
    #[serde(default)]
    pub adapters: BTreeMap<String, Vec<PathBuf>>,
}

fn default_modes() -> Vec<EvalMode> {
    vec![EvalMode::Choice, EvalMode::Generate]
}
fn unit_usize() -> usize {
    1
}
fn default_eval_temp() -> f64 {
    0.1
}
fn default_eval_top_p() -> f64 {
    0.9
}
fn default_eval_batch() -> usize {
    8
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Save every N steps / PPO iterations (0 = only at the end).
    #[serde(default)]
    pub every: usize,
    /// Keep the newest N checkpoints.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_keep() -> usize {
    2
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self { every: 0, keep: default_keep() }
    }
}

/// Which worker runs which role (used by the coordinator). Empty = all on one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// PPO: workers that generate the rollouts, each with a copy of the
    /// policy adapter that the trainer refreshes after every update ("" or
    /// "*": any idle worker). Empty: the trainer generates.
    #[serde(default)]
    pub rollout: Vec<String>,
    #[serde(default)]
    pub reward: Option<String>,
    #[serde(default)]
    pub critic: Option<String>,
    #[serde(default)]
    pub trainer: Option<String>,
    /// Data parallel: run the job on this many workers, each on a slice of
    /// every batch, with adapter gradients summed across them (sft,
    /// reward, pretrain, ppo, and pipelines of them; eval runs on rank 0).
    /// 1: one worker.
    #[serde(default = "one")]
    pub data_parallel: usize,
    /// How gradients are summed: `auto` (NCCL when every rank is on a GPU,
    /// else through the coordinator), `coordinator`, or `nccl`.
    #[serde(default)]
    pub collective: CollectiveSpec,
    /// Runs of the job the coordinator starts before it gives up (a worker
    /// lost mid-run, or one that dies of the job, costs one).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Fail the job if it has not finished this many seconds after it was
    /// submitted (none: no deadline).
    #[serde(default)]
    pub deadline_s: Option<u64>,
}

fn default_attempts() -> u32 {
    3
}

/// Rollout workers one job may use.
pub const MAX_ROLLOUT_WORKERS: usize = 64;

/// A placement entry that any idle worker can fill.
pub fn is_any_worker(name: &str) -> bool {
    name.is_empty() || name == "*"
}

impl Default for PlacementSpec {
    fn default() -> Self {
        Self {
            rollout: Vec::new(),
            reward: None,
            critic: None,
            trainer: None,
            data_parallel: 1,
            collective: CollectiveSpec::Auto,
            max_attempts: default_attempts(),
            deadline_s: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveSpec {
    #[default]
    Auto,
    Coordinator,
    Nccl,
}

/// One stage of a pipeline: a kind plus the sections it needs; missing
/// sections come from the pipeline's top level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    pub name: String,
    pub kind: JobKind,
    #[serde(default)]
    pub peft: Option<PeftSpec>,
    #[serde(default)]
    pub data: Option<DataSpec>,
    #[serde(default)]
    pub train: Option<TrainSpec>,
    #[serde(default)]
    pub ppo: Option<PpoSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<DpoSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpo: Option<GroupSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rloo: Option<GroupSpec>,
    #[serde(default)]
    pub eval: Option<EvalSpec>,
    /// Start from the model an earlier stage of the same kind produced
    /// (its name), e.g. a reward model trained further on other pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    /// This stage's seed instead of the job's (e.g. one PPO stage per seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl JobSpec {
    /// Reads, validates and resolves a job file the way the coordinator
    /// will see it: relative paths made absolute against the file's
    /// directory. (`rlhfctl submit` and `rlhf-worker run` both load this way.)
    pub fn load(path: &std::path::Path) -> Result<Self, JobFileError> {
        let text = std::fs::read_to_string(path).map_err(|error| JobFileError::Read { path: path.into(), error })?;
        let mut spec = Self::from_toml(&text).map_err(|error| JobFileError::Invalid { path: path.into(), error })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            Some(_) | None => PathBuf::from("."),
        };
        spec.resolve_paths(&std::fs::canonicalize(&dir).unwrap_or(dir));
        Ok(spec)
    }

    /// Parses and validates a job file's text.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: JobSpec = toml::from_str(text).map_err(|e| {
            // Some TOML syntax errors carry no message of their own.
            let msg = match e.message().trim() {
                "" => "invalid TOML here".to_string(),
                m => m.to_string(),
            };
            let field = e.span().map(|s| locate(text, s.start)).unwrap_or_else(|| "job".into());
            SpecError { field, msg }
        })?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Makes every relative path in the job absolute against `base` (the
    /// job file's directory), so the resolved spec runs from anywhere.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        self.visit_paths(&mut |_, p| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        });
    }

    /// Calls `f` with every path the job reads, and its field.
    fn visit_paths(&mut self, f: &mut dyn FnMut(&str, &mut PathBuf)) {
        if let Some(p) = &mut self.model.path {
            f("model.path", p);
        }
        if let Some(init) = &mut self.model.init {
            f("model.init.corpus", &mut init.corpus);
        }
        for (i, p) in self.model.merge_adapters.iter_mut().enumerate() {
            f(&format!("model.merge_adapters[{i}]"), p);
        }
        let mut sections = |at: &str,
                            data: &mut Option<DataSpec>,
                            train: &mut Option<TrainSpec>,
                            ppo: &mut Option<PpoSpec>,
                            eval: &mut Option<EvalSpec>| {
            if let Some(p) = train.as_mut().and_then(|t| t.init_from.as_mut()) {
                f(&format!("{at}train.init_from"), p);
            }
            if let Some(d) = data {
                d.visit_paths(&format!("{at}data"), f);
            }
            if let Some(ppo) = ppo {
                ppo.visit_paths(at, f);
            }
            if let Some(e) = eval {
                for (i, t) in e.tasks.iter_mut().enumerate() {
                    f(&format!("{at}eval.tasks[{i}].path"), &mut t.path);
                }
                for (name, ps) in e.adapters.iter_mut() {
                    for p in ps.iter_mut() {
                        f(&format!("{at}eval.adapters.{name}"), p);
                    }
                }
            }
        };
        sections("", &mut self.data, &mut self.train, &mut self.ppo, &mut self.eval);
        for (i, st) in self.stages.iter_mut().enumerate() {
            sections(&format!("stage[{i}]."), &mut st.data, &mut st.train, &mut st.ppo, &mut st.eval);
        }
    }

    /// What the coordinator does with a submitted job file's text: parse,
    /// validate, and check its paths against the readable roots `allowed`.
    /// `rlhfctl submit --dry-run` calls the same function, so a dry run
    /// refuses exactly what a submission would.
    pub fn accept_submitted(text: &str, allowed: &[PathBuf]) -> Result<Self, SpecError> {
        let spec = Self::from_toml(text)?;
        spec.check_paths(allowed)?;
        Ok(spec)
    }

    /// For a job that arrives over the network (whose relative paths would
    /// resolve against some worker's working directory): every path must be
    /// absolute, without `..`, and, when `allowed` names roots, under one.
    pub fn check_paths(&self, allowed: &[PathBuf]) -> Result<(), SpecError> {
        let mut bad = None;
        self.clone().visit_paths(&mut |field, p| {
            if bad.is_some() {
                return;
            }
            let why = if p.is_relative() {
                Some(format!(
                    "{} is relative; send absolute paths (rlhfctl submit makes them absolute against the job file)",
                    p.display()
                ))
            } else if p.components().any(|c| c == std::path::Component::ParentDir) {
                Some(format!("{} contains `..`", p.display()))
            } else if !allowed.is_empty() && !allowed.iter().any(|root| p.starts_with(root)) {
                let roots: Vec<String> = allowed.iter().map(|r| r.display().to_string()).collect();
                Some(format!("{} is outside the readable roots ({})", p.display(), roots.join(", ")))
            } else {
                None
            };
            bad = why.map(|msg| SpecError { field: field.to_string(), msg });
        });
        bad.map_or(Ok(()), Err)
    }

    /// Overrides `model.dtype` (`--dtype` of `rlhf-worker run` and
    /// `rlhfctl submit`) and validates the job again.
    pub fn override_dtype(&mut self, dtype: &str) -> Result<(), SpecError> {
        self.model.dtype = dtype.to_string();
        self.validate()
    }

    /// The single-kind job that a pipeline stage amounts to.
    pub fn stage_job(&self, stage: &StageSpec) -> JobSpec {
        JobSpec {
            version: self.version,
            kind: stage.kind,
            name: Some(stage.name.clone()),
            seed: stage.seed.unwrap_or(self.seed),
            model: self.model.clone(),
            peft: stage.peft.clone().or_else(|| self.peft.clone()),
            data: stage.data.clone().or_else(|| self.data.clone()),
            train: stage.train.clone().or_else(|| self.train.clone()),
            ppo: stage.ppo.clone().or_else(|| self.ppo.clone()),
            dpo: stage.dpo.clone().or_else(|| self.dpo.clone()),
            grpo: stage.grpo.clone().or_else(|| self.grpo.clone()),
            rloo: stage.rloo.clone().or_else(|| self.rloo.clone()),
            eval: stage.eval.clone().or_else(|| self.eval.clone()),
            checkpoint: self.checkpoint.clone(),
            placement: self.placement.clone(),
            stages: Vec::new(),
        }
    }

    /// Checks values; the error names the field path.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != 1 {
            return err("version", format!("must be 1, got {}", self.version));
        }
        if let Some(name) = &self.name {
            check_name("name", name)?;
        }
        if self.placement.max_attempts == 0 {
            return err("placement.max_attempts", "must be at least 1");
        }
        self.validate_data_parallel()?;
        self.validate_rollout()?;
        if self.kind == JobKind::Pipeline {
            if self.stages.is_empty() {
                return err("stage", "a pipeline needs at least one [[stage]]");
            }
            let mut seen = std::collections::BTreeSet::new();
            for (i, st) in self.stages.iter().enumerate() {
                let at = format!("stage[{i}]");
                check_name(&format!("{at}.name"), &st.name)?;
                if !seen.insert(st.name.as_str()) {
                    return err(format!("{at}.name"), format!("duplicate stage name {:?}", st.name));
                }
                if st.kind == JobKind::Pipeline {
                    return err(format!("{at}.kind"), "a stage cannot be a pipeline");
                }
                if st.kind == JobKind::Pretrain && i != 0 {
                    return err(format!("{at}.kind"), "pretrain can only be the first stage");
                }
                if let Some(from) = &st.init_from {
                    match self.stages[..i].iter().find(|s| &s.name == from) {
                        Some(s) if s.kind == st.kind => {}
                        Some(s) => {
                            return err(
                                format!("{at}.init_from"),
                                format!("stage {from:?} is a {} stage, this one is {}", s.kind.name(), st.kind.name()),
                            )
                        }
                        None => return err(format!("{at}.init_from"), format!("no earlier stage named {from:?}")),
                    }
                    if st.kind != JobKind::Reward {
                        return err(
                            format!("{at}.init_from"),
                            format!("only a reward stage starts from an earlier one, not {}", st.kind.name()),
                        );
                    }
                }
                let job = self.stage_job(st);
                job.validate_single(i == 0 && st.kind == JobKind::Pretrain, true)
                    .map_err(|e| SpecError { field: format!("{at}.{}", e.field), msg: e.msg })?;
            }
            return self.validate_model(self.stages[0].kind == JobKind::Pretrain);
        }
        if !self.stages.is_empty() {
            return err("stage", format!("only a pipeline has stages, this job is {}", self.kind.name()));
        }
        if let (Some(r), Some(c)) = (&self.placement.reward, &self.placement.critic) {
            if r != c {
                return err(
                    "placement.critic",
                    format!("reward and critic share one role host: both must name the same worker ({r:?} vs {c:?})"),
                );
            }
        }
        self.validate_single(self.kind == JobKind::Pretrain, false)?;
        self.validate_model(self.kind == JobKind::Pretrain)
    }

    /// Rollout workers: only for PPO, each named worker once, none of them
    /// the trainer or the reward/critic host.
    fn validate_rollout(&self) -> Result<(), SpecError> {
        let p = &self.placement;
        if p.rollout.is_empty() {
            return Ok(());
        }
        let ppo = self.kind.is_rl() || self.stages.iter().any(|s| s.kind.is_rl());
        if !ppo {
            return err(
                "placement.rollout",
                format!(
                    "only a ppo, grpo or rloo job (or a pipeline with one) has rollouts, this job is {}",
                    self.kind.name()
                ),
            );
        }
        if p.rollout.len() > MAX_ROLLOUT_WORKERS {
            return err("placement.rollout", format!("at most {MAX_ROLLOUT_WORKERS} workers, got {}", p.rollout.len()));
        }
        if self.peft.as_ref().is_some_and(|p| p.method == PeftMethod::Full) {
            return err(
                "placement.rollout",
                "rollout workers are sent the policy adapter every iteration; with peft.method = \"full\" that is the whole model (generate on the trainer instead)",
            );
        }
        let named: Vec<&str> = p.rollout.iter().map(String::as_str).filter(|n| !is_any_worker(n)).collect();
        for (i, n) in named.iter().enumerate() {
            if named[..i].contains(n) {
                return err("placement.rollout", format!("worker {n:?} is listed twice"));
            }
            let other = [("trainer", &p.trainer), ("reward", &p.reward), ("critic", &p.critic)];
            if let Some((role, _)) = other.iter().find(|(_, w)| w.as_deref() == Some(*n)) {
                return err(
                    "placement.rollout",
                    format!("worker {n:?} is also placement.{role}; a rollout worker only generates (leave it out to generate on the trainer)"),
                );
            }
        }
        Ok(())
    }

    fn validate_data_parallel(&self) -> Result<(), SpecError> {
        let n = self.placement.data_parallel;
        if n == 0 {
            return err("placement.data_parallel", "must be at least 1");
        }
        if n == 1 {
            return Ok(());
        }
        if self.kind == JobKind::Pipeline {
            // Every training stage runs on all ranks; eval stages on rank 0.
            for (i, st) in self.stages.iter().enumerate().filter(|(_, st)| st.kind != JobKind::Eval) {
                self.stage_job(st)
                    .validate_data_parallel()
                    .map_err(|e| SpecError { field: format!("stage[{i}].{}", e.field), msg: e.msg })?;
            }
            return Ok(());
        }
        if !(self.kind.is_rl()
            || matches!(self.kind, JobKind::Sft | JobKind::Reward | JobKind::Pretrain | JobKind::Dpo))
        {
            return err(
                "placement.data_parallel",
                format!(
                    "data parallel runs sft, reward, dpo, pretrain, ppo, grpo, rloo and pipeline jobs, not {}",
                    self.kind.name()
                ),
            );
        }
        if self.kind.is_rl() {
            if !self.placement.rollout.is_empty() {
                return err(
                    "placement.rollout",
                    "a data-parallel ppo job generates on every rank; drop placement.rollout",
                );
            }
            if self.placement.reward.is_some() || self.placement.critic.is_some() {
                return err(
                    "placement.critic",
                    "a data-parallel ppo job keeps reward and critic on every rank; drop placement.reward/critic",
                );
            }
            let batch = self.ppo.as_ref().map_or(0, |p| p.rollout_batch);
            if batch < n {
                return err(
                    "ppo.rollout_batch",
                    format!("must be at least placement.data_parallel ({n}) so every rank gets a row, got {batch}"),
                );
            }
            return Ok(());
        }
        let batch = self.train.as_ref().map_or(TrainSpec::default().batch_size, |t| t.batch_size);
        if batch < n {
            return err(
                "train.batch_size",
                format!("must be at least placement.data_parallel ({n}) so every rank gets a row, got {batch}"),
            );
        }
        Ok(())
    }

    fn validate_model(&self, pretrain_first: bool) -> Result<(), SpecError> {
        if !["f32", "bf16", "f16", "auto"].contains(&self.model.dtype.as_str()) {
            return err("model.dtype", format!("must be f32, bf16, f16 or auto, got {:?}", self.model.dtype));
        }
        if self.model.max_length < 2 {
            return err("model.max_length", "must be at least 2");
        }
        match (&self.model.path, &self.model.init, pretrain_first) {
            (None, None, _) => err("model.path", "required (or model.init for a pretrain job)"),
            (_, Some(_), false) => {
                err("model.init", "only a pretrain job (or a pipeline starting with one) can init a model")
            }
            (_, Some(init), true) if !["tiny", "small"].contains(&init.preset.as_str()) => {
                err("model.init.preset", format!("must be tiny or small, got {:?}", init.preset))
            }
            _ => Ok(()),
        }
    }

    /// `in_pipeline`: inputs produced by earlier stages need not be given.
    fn validate_single(&self, pretrain: bool, in_pipeline: bool) -> Result<(), SpecError> {
        let need = |opt: bool, field: &str| {
            if opt {
                Ok(())
            } else {
                err(field, format!("required for a {} job", self.kind.name()))
            }
        };
        if let Some(p) = &self.peft {
            validate_peft(p)?;
        }
        if let Some(t) = &self.train {
            validate_train(t)?;
        }
        let data = self.data.clone().unwrap_or_default();
        let mc = data.from_multiple_choice;
        match self.kind {
            JobKind::Pretrain => {
                let _ = pretrain;
                need(data.train.is_some(), "data.train")?;
            }
            JobKind::Sft | JobKind::Ppo | JobKind::Grpo | JobKind::Rloo => {
                need(self.peft.is_some(), "peft")?;
                data.validate(self.kind.name(), false)?;
            }
            JobKind::Reward | JobKind::Dpo => {
                need(self.peft.is_some(), "peft")?;
                data.validate(self.kind.name(), mc)?;
            }
            JobKind::Eval => {
                let Some(e) = &self.eval else { return err("eval", "required for an eval job") };
                validate_eval(e)?;
            }
            JobKind::Pipeline => {}
        }
        if self.kind.is_rl() {
            let Some(ppo) = &self.ppo else { return err("ppo", format!("required for a {} job", self.kind.name())) };
            validate_ppo(ppo, in_pipeline)?;
        }
        for (section, spec, kind) in [("grpo", &self.grpo, JobKind::Grpo), ("rloo", &self.rloo, JobKind::Rloo)] {
            if spec.is_some() && self.kind != kind {
                return err(
                    section,
                    format!("only a {section} job reads [{section}], this job is {}", self.kind.name()),
                );
            }
            if self.kind == kind {
                if self.ppo.as_ref().is_some_and(|p| p.samples_per_prompt != 1) {
                    return err(
                        "ppo.samples_per_prompt",
                        format!("a {section} job samples {section}.num_generations per prompt; leave this at 1"),
                    );
                }
                let batch = self.ppo.as_ref().map_or(0, |p| p.rollout_batch);
                let group = spec.clone().unwrap_or_default();
                group.validate(section, batch)?;
                let g = group.num_generations;
                if let Some(n) = self.ppo.as_ref().and_then(|p| p.generate_batch).filter(|n| !n.is_multiple_of(g)) {
                    return err(
                        "ppo.generate_batch",
                        format!("must be a multiple of {section}.num_generations ({g}), got {n}"),
                    );
                }
            }
        }
        if let Some(d) = &self.dpo {
            if self.kind != JobKind::Dpo {
                return err("dpo", format!("only a dpo job reads [dpo], this job is {}", self.kind.name()));
            }
            d.validate()?;
        }
        if self.train.as_ref().is_some_and(|t| t.init_from.is_some()) && self.kind != JobKind::Reward {
            return err(
                "train.init_from",
                format!("only a reward job starts from an earlier model, not a {} job", self.kind.name()),
            );
        }
        if let Some(task) = &data.task {
            if !TASKS.contains(&task.as_str()) {
                return err("data.task", format!("unknown task {task:?} (expected one of {})", TASKS.join(", ")));
            }
        }
        Ok(())
    }
}

/// FewCLUE tasks known to the data loaders.
pub const TASKS: [&str; 4] = ["eprstmt", "tnews", "ocnli", "bustm"];

fn validate_peft(p: &PeftSpec) -> Result<(), SpecError> {
    if matches!(p.method, PeftMethod::Lora | PeftMethod::RepAdapter) && p.r <= 0 {
        return err("peft.r", format!("must be positive, got {}", p.r));
    }
    if !(p.alpha.is_finite() && p.alpha > 0.0) {
        return err("peft.alpha", format!("must be positive, got {}", p.alpha));
    }
    if p.method == PeftMethod::RepAdapter && (p.groups <= 0 || p.r % p.groups != 0) {
        return err("peft.groups", format!("must be positive and divide r ({}), got {}", p.r, p.groups));
    }
    Ok(())
}

fn validate_train(t: &TrainSpec) -> Result<(), SpecError> {
    if t.batch_size == 0 {
        return err("train.batch_size", "must be at least 1");
    }
    if t.grad_accum == 0 {
        return err("train.grad_accum", "must be at least 1");
    }
    if !(t.lr.is_finite() && t.lr > 0.0) {
        return err("train.lr", format!("must be positive, got {}", t.lr));
    }
    if let Some(h) = t.head_lr.filter(|h| !(h.is_finite() && *h > 0.0)) {
        return err("train.head_lr", format!("must be positive, got {h}"));
    }
    if t.weight_decay < 0.0 {
        return err("train.weight_decay", "must be >= 0");
    }
    if t.max_grad_norm <= 0.0 {
        return err("train.max_grad_norm", "must be positive");
    }
    if t.epochs == 0 && t.max_steps.is_none() {
        return err("train.epochs", "must be at least 1");
    }
    Ok(())
}

fn in_unit(field: &str, v: f64, closed_low: bool) -> Result<(), SpecError> {
    let ok = if closed_low { (0.0..1.0).contains(&v) } else { v > 0.0 && v < 1.0 };
    if ok {
        Ok(())
    } else {
        err(field, format!("must be in {}0, 1), got {v}", if closed_low { "[" } else { "(" }))
    }
}

fn validate_ppo(p: &PpoSpec, in_pipeline: bool) -> Result<(), SpecError> {
    in_unit("ppo.clip", p.clip, false)?;
    if p.value_clip <= 0.0 {
        return err("ppo.value_clip", "must be positive");
    }
    if !(0.0..=1.0).contains(&p.gamma) {
        return err("ppo.gamma", format!("must be in [0, 1], got {}", p.gamma));
    }
    if !(0.0..=1.0).contains(&p.lam) {
        return err("ppo.lam", format!("must be in [0, 1], got {}", p.lam));
    }
    if p.kl_coef < 0.0 {
        return err("ppo.kl_coef", "must be >= 0");
    }
    if p.kl_target.is_some_and(|t| t <= 0.0) {
        return err("ppo.kl_target", "must be positive");
    }
    if p.iterations == 0 {
        return err("ppo.iterations", "must be at least 1");
    }
    if p.rollout_batch == 0 {
        return err("ppo.rollout_batch", "must be at least 1");
    }
    if p.minibatch == 0 || p.minibatch > p.rollout_batch {
        return err("ppo.minibatch", format!("must be in 1..={} (rollout_batch)", p.rollout_batch));
    }
    if p.ppo_epochs == 0 {
        return err("ppo.ppo_epochs", "must be at least 1");
    }
    if p.max_new_tokens == 0 {
        return err("ppo.max_new_tokens", "must be at least 1");
    }
    if p.temperature.is_nan() || p.temperature <= 0.0 {
        return err("ppo.temperature", "must be positive (PPO samples)");
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return err("ppo.top_p", format!("must be in (0, 1], got {}", p.top_p));
    }
    if p.lr <= 0.0 {
        return err("ppo.lr", "must be positive");
    }
    if p.critic_lr <= 0.0 {
        return err("ppo.critic_lr", "must be positive");
    }
    if p.rollout_ahead > 1 {
        return err("ppo.rollout_ahead", format!("must be 0 or 1, got {}", p.rollout_ahead));
    }
    let n = p.samples_per_prompt;
    if n == 0 || !p.rollout_batch.is_multiple_of(n) || !p.minibatch.is_multiple_of(n) {
        return err(
            "ppo.samples_per_prompt",
            format!(
                "must be at least 1 and divide ppo.rollout_batch ({}) and ppo.minibatch ({}), got {n}",
                p.rollout_batch, p.minibatch
            ),
        );
    }
    if let Some(f) = p.forward_batch {
        if f == 0 || !f.is_multiple_of(n) {
            return err(
                "ppo.forward_batch",
                format!("must be at least 1 and a multiple of ppo.samples_per_prompt ({n}), got {f}"),
            );
        }
    }
    if let Some(g) = p.generate_batch {
        if g == 0 || !g.is_multiple_of(n) {
            return err(
                "ppo.generate_batch",
                format!("must be at least 1 and a multiple of ppo.samples_per_prompt ({n}), got {g}"),
            );
        }
    }
    if p.group_baseline && n < 2 {
        return err(
            "ppo.group_baseline",
            "needs ppo.samples_per_prompt of 2 or more (a prompt's samples are its baseline)",
        );
    }
    reward::validate(&p.reward, &p.rewards, in_pipeline)
}

fn validate_eval(e: &EvalSpec) -> Result<(), SpecError> {
    if e.tasks.is_empty() {
        return err("eval.tasks", "needs at least one task");
    }
    for (i, t) in e.tasks.iter().enumerate() {
        if !TASKS.contains(&t.task.as_str()) {
            return err(
                format!("eval.tasks[{i}].task"),
                format!("unknown task {:?} (expected one of {})", t.task, TASKS.join(", ")),
            );
        }
    }
    if e.modes.is_empty() {
        return err("eval.modes", "needs at least one of choice, generate");
    }
    if e.num_beams != 1 {
        return err("eval.num_beams", "only 1 (the paper's setting) is supported");
    }
    if e.max_new_tokens == 0 {
        return err("eval.max_new_tokens", "must be at least 1");
    }
    if !(e.top_p > 0.0 && e.top_p <= 1.0) {
        return err("eval.top_p", format!("must be in (0, 1], got {}", e.top_p));
    }
    if e.temperature < 0.0 {
        return err("eval.temperature", "must be >= 0");
    }
    if e.batch_size == 0 {
        return err("eval.batch_size", "must be at least 1");
    }
    Ok(())
}

/// Names the TOML key path at a byte offset (best effort, for parse errors).
fn locate(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let mut table = String::new();
    for line in before.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            table = l.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    let key = text[before.rfind('\n').map_or(0, |i| i + 1)..]
        .lines()
        .next()
        .and_then(|l| l.split('=').next())
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    match (table.is_empty(), key) {
        (true, Some(k)) => format!("{k} (line {line_no})"),
        (false, Some(k)) => format!("{table}.{k} (line {line_no})"),
        (_, None) if !table.is_empty() => format!("{table} (line {line_no})"),
        _ => format!("line {line_no}"),
    }
}

#[cfg(test)]
mod tests;
