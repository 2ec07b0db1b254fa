//! rlhf-worker: the per-device side of rlhfd. A LLaMA-family decoder in tch,
//! PEFT adapters that share one frozen base, and the offline tools.

pub mod bench;
pub mod data;
pub mod dist;
pub mod error;
pub mod serve;
pub mod tools;
pub mod train;

pub use error::{Error, Result};
