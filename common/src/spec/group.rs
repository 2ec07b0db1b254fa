//! `[grpo]` / `[rloo]`: the options of the group-sampling RL stages, as
//! TRL 1.12's `GRPOConfig` / `RLOOConfig` name them. The rollout itself
//! (iterations, rollout_batch = completions per iteration, max_new_tokens,
//! sampling, lr, reward functions) is `[ppo]`'s. Errors name the field
//! (`grpo.num_generations`).

use serde::{Deserialize, Serialize};

use super::{err, SpecError};

/// GRPO's loss aggregations.
pub const GRPO_LOSSES: [&str; 3] = ["grpo", "dr_grpo", "dapo"];
/// GRPO's reward scalings.
pub const SCALE_REWARDS: [&str; 3] = ["group", "batch", "none"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Completions sampled per prompt (a group); must divide `ppo.rollout_batch`.
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    /// The KL coefficient (default: GRPO 0.0, RLOO 0.05). GRPO: `β · k3`
    /// per token in the loss, and with β = 0 no reference pass at all;
    /// RLOO: `β · Σ (log π_old − log π_ref)` subtracted from the reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// Lower clip of the ratio (`1 − epsilon`).
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Upper clip (`1 + epsilon_high`; default `epsilon`; DAPO's clip-higher: 0.28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// GRPO: `grpo` (per-sequence token mean, then the batch mean),
    /// `dr_grpo` (token sum / (rows × max_new_tokens)), `dapo` (token sum /
    /// the batch's tokens; TRL 1.12's default).
    #[serde(default = "default_loss")]
    pub loss_type: String,
    /// GRPO: advantages divided by the std of the `group`, the `batch`, or `none`.
    #[serde(default = "default_scale")]
    pub scale_rewards: String,
    /// Completions without EOS (cut at max_new_tokens) leave the loss.
    #[serde(default)]
    pub mask_truncated_completions: bool,
    /// RLOO: normalize advantages over the batch.
    #[serde(default)]
    pub normalize_advantages: bool,
    /// GRPO: the KL term times the importance ratio (TRL 1.12's default:
    /// the unbiased reverse-KL gradient of DeepSeek-V3.2).
    #[serde(default = "yes")]
    pub use_bias_correction_kl: bool,
}

fn yes() -> bool {
    true
}

fn default_generations() -> usize {
    4
}
fn default_epsilon() -> f64 {
    0.2
}
fn default_loss() -> String {
    "dapo".into()
}
fn default_scale() -> String {
    "group".into()
}

impl Default for GroupSpec {
    fn default() -> Self {
        Self {
            num_generations: default_generations(),
            beta: None,
            epsilon: default_epsilon(),
            epsilon_high: None,
            loss_type: default_loss(),
            scale_rewards: default_scale(),
            mask_truncated_completions: false,
            normalize_advantages: false,
            use_bias_correction_kl: true,
        }
    }
}

impl GroupSpec {
    /// β with the kind's default (`rloo`: 0.05, as TRL; else 0).
    pub fn beta_for(&self, rloo: bool) -> f64 {
        self.beta.unwrap_or(if rloo { 0.05 } else { 0.0 })
    }

    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }

    /// `section` is `grpo` or `rloo`; `rollout_batch` is `ppo.rollout_batch`.
    pub fn validate(&self, section: &str, rollout_batch: usize) -> Result<(), SpecError> {
        let f = |k: &str| format!("{section}.{k}");
        if self.num_generations < 2 {
            return err(f("num_generations"), format!("must be at least 2 (a group), got {}", self.num_generations));
        }
        if !rollout_batch.is_multiple_of(self.num_generations) {
            return err(
                f("num_generations"),
                format!(
                    "must divide ppo.rollout_batch ({rollout_batch}, the completions per iteration), got {}",
                    self.num_generations
                ),
            );
        }
        if let Some(b) = self.beta.filter(|b| !(b.is_finite() && *b >= 0.0)) {
            return err(f("beta"), format!("must be 0 or positive, got {b}"));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0 && self.epsilon < 1.0) {
            return err(f("epsilon"), format!("must be in (0, 1), got {}", self.epsilon));
        }
        if let Some(e) = self.epsilon_high.filter(|e| !(e.is_finite() && *e > 0.0)) {
            return err(f("epsilon_high"), format!("must be positive, got {e}"));
        }
        if !GRPO_LOSSES.contains(&self.loss_type.as_str()) {
            return err(f("loss_type"), format!("must be one of {}, got {:?}", GRPO_LOSSES.join(", "), self.loss_type));
        }
        if !SCALE_REWARDS.contains(&self.scale_rewards.as_str()) {
            return err(
                f("scale_rewards"),
                format!("must be one of {}, got {:?}", SCALE_REWARDS.join(", "), self.scale_rewards),
            );
        }
        Ok(())
    }
}
