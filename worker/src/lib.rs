//! rlhf-worker: the per-device side of rlhfd. The training stages (on the
//! model crate, `rlhf-model`), task data, data parallel, the worker daemon
//! and the offline tools.

pub mod alloc;
pub mod bench;
pub mod data;
pub mod error;
pub mod offline;
pub mod parallel;
pub mod serve;
pub mod train;

pub use error::{Error, Result};
