//! The stages a job or pipeline runs, one module each: `pretrain`, `sft`,
//! `reward`, `dpo` and `eval` (PPO, larger, is `train::ppo`). Each exposes
//! `run(job, ctx) -> Outcome`.

pub mod dpo;
pub mod eval;
pub mod pretrain;
pub mod reward;
pub mod sft;
