//! What a stage is given and what it hands back.

use std::path::{Path, PathBuf};

use rlhf_common::spec::PeftMethod;
use serde::{Deserialize, Serialize};
use tch::Device;

use super::metrics::Metrics;
use crate::parallel::Collective;

/// Where a stage runs and writes.
pub struct Ctx<'a> {
    pub out: &'a Path,
    pub device: Device,
    pub metrics: &'a mut Metrics,
    /// The job's other data-parallel ranks ([`crate::parallel::Single`] alone).
    pub dist: &'a mut dyn Collective,
}

impl Ctx<'_> {
    /// Rank 0 writes the job's files (adapters, checkpoints, outcome);
    /// the other ranks only read them.
    pub fn writes(&self) -> bool {
        self.dist.rank() == 0
    }
}

/// One evaluation number: a model variant on a task in a mode.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Accuracy {
    pub model: String,
    pub task: String,
    pub mode: String,
    pub accuracy: f64,
    pub n: usize,
}

/// What a finished stage produced (also written as `outcome.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub stage: String,
    pub kind: String,
    pub method: Option<PeftMethod>,
    /// A trained adapter directory (sft, ppo policy).
    pub adapter: Option<PathBuf>,
    /// A reward model directory (adapter + head).
    pub reward_model: Option<PathBuf>,
    /// A full model directory (pretrain).
    pub model: Option<PathBuf>,
    pub trainable_params: i64,
    pub base_params: i64,
    pub train_seconds: f64,
    pub steps: usize,
    /// Last value of the stage's headline metrics.
    pub final_metrics: serde_json::Map<String, serde_json::Value>,
    pub accuracies: Vec<Accuracy>,
    /// An eval's per-example predictions (`predictions.jsonl`).
    #[serde(default)]
    pub predictions: Option<PathBuf>,
    /// The stage's wall time: loading, training, held-out evals, saving.
    #[serde(default)]
    pub wall_seconds: f64,
}

impl Outcome {
    pub fn write(&self, dir: &Path) -> crate::Result<()> {
        let path = dir.join("outcome.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| crate::Error::InvalidArgument(e.to_string()))?;
        std::fs::write(&path, text).map_err(|e| crate::Error::Io { path, source: e })
    }
}
