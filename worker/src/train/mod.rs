//! Training stages: optimiser and schedule, pretrain, SFT, reward model,
//! PPO, eval, and the pipeline runner that chains them.

pub mod accuracy;
pub mod checkpoint;
pub mod lm;
pub mod logprobs;
pub mod metrics;
pub mod optim;
pub mod ppo;
pub mod recompute;
pub mod report;
pub mod rows;
pub mod run;
pub mod setup;
pub mod stage;
pub mod stages;
pub mod supervised;
pub mod tfevents;
