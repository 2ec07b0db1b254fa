//! PPO: rollout, KL-penalised rewards, GAE, clipped policy and value losses.

pub mod gae;
pub mod generation;
pub mod group;
pub mod group_iteration;
pub mod iteration;
pub mod kl;
pub mod loss;
pub mod prompts;
pub mod rewards;
pub mod roles;
pub mod rollout;
pub mod rollout_host;
pub mod shard;
pub mod trainer;

pub use gae::{apply_mask, gae, masked_mean, masked_var, masked_whiten};
pub use kl::{kl_per_token, penalized_rewards, KlController, KlEstimator};
pub use loss::{
    apply_missing_eos_penalty, clip_score, entropy_from_logits, entropy_per_token, policy_loss, value_loss,
    PolicyLossOut, ValueLossOut,
};
