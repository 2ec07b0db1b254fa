//! What a generation is asked for ([`GenerateOptions`], [`Steps`]) and
//! gives back ([`Generation`]), and how a decode step's tokens are
//! recorded: shared by the eager loop (`generate.rs`) and the fixed-shape
//! step (`fixed_step.rs`).

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::sampling::Sampling;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// A row stops after producing one of these (kept in its output).
    pub eos_ids: Vec<i64>,
    /// Fills the left padding and finished rows.
    pub pad_id: i64,
    /// How the steps after the prefill run.
    pub steps: Steps,
}

/// How the decode steps after the prefill run. Every choice gives the same
/// tokens in f32, with log-probs equal to rounding; in bf16 the fixed-shape
/// step's sums over more (masked) positions may flip a near tie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Steps {
    /// `Graph` on a CUDA device where this build has CUDA graphs (a
    /// capture that fails is reported once and the process goes on with
    /// `Eager`; `RLHF_CUDA_GRAPHS=0` turns graphs off), `Eager` elsewhere.
    #[default]
    Auto,
    /// Op by op, the cache's filled part attended, finished rows leaving
    /// the batch once a quarter of it is idle.
    Eager,
    /// The fixed-shape step a CUDA graph records, run op by op (see
    /// `fixed_step.rs`): how CI checks the graph's step without a GPU.
    Fixed,
    /// The fixed-shape step recorded once as a CUDA graph and replayed,
    /// sampling right after each replay; an error where graphs are not
    /// available.
    Graph,
}

impl std::str::FromStr for Steps {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Steps::Auto),
            "eager" => Ok(Steps::Eager),
            "fixed" => Ok(Steps::Fixed),
            "graph" => Ok(Steps::Graph),
            _ => Err(format!("steps must be auto, eager, fixed or graph, got {s:?}")),
        }
    }
}

impl Steps {
    pub fn name(self) -> &'static str {
        match self {
            Steps::Auto => "auto",
            Steps::Eager => "eager",
            Steps::Fixed => "fixed",
            Steps::Graph => "graph",
        }
    }
}

/// New tokens per prompt (up to and including an eos), with the
/// log-probability of each under the sampling distribution.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    pub tokens: Vec<Vec<i64>>,
    pub logprobs: Vec<Vec<f32>>,
}

/// Appends a step's tokens and log-probs to the rows of `live` (the
/// output row of each batch row) that have not finished, marks those that
/// emitted an end token; whether every row has finished.
pub(crate) fn record(
    out: &mut Generation,
    done: &mut [bool],
    live: &[usize],
    next: &Tensor,
    logp: &Tensor,
    eos_ids: &[i64],
) -> Result<bool> {
    let next_v: Vec<i64> = Vec::try_from(&next.to_device(tch::Device::Cpu))?;
    let logp_v: Vec<f32> = Vec::try_from(&logp.to_device(tch::Device::Cpu).to_kind(Kind::Float))?;
    for (j, &i) in live.iter().enumerate() {
        if done[i] {
            continue;
        }
        out.tokens[i].push(next_v[j]);
        out.logprobs[i].push(logp_v[j]);
        if eos_ids.contains(&next_v[j]) {
            done[i] = true;
        }
    }
    Ok(done.iter().all(|&d| d))
}
