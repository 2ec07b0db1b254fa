//! Training stages: optimiser and schedule, pretrain, SFT, reward model,
//! PPO, eval, and the pipeline runner that chains them.

pub mod checkpoint;
pub mod eval;
pub mod evaluate;
pub mod lm;
pub mod logprobs;
pub mod metrics;
pub mod optim;
pub mod ppo;
pub mod pretrain;
pub mod recompute;
pub mod report;
pub mod reward;
pub mod run;
pub mod setup;
pub mod sft;
pub mod stage;
