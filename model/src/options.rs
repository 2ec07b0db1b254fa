//! What a generation is asked for ([`GenerateOptions`], [`Steps`]) and
//! gives back ([`Generation`]), and how a decode step's tokens are
//! sampled and recorded ([`Rows`]): shared by the eager loop (`generate.rs`) and the fixed-shape
//! step (`fixed_step.rs`).

use tch::{Kind, Tensor};

use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::sampling::{sample_rows, Sampling};

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

/// The decode state both loops share: where each batch row's output goes,
/// which outputs have finished, one sampling stream per batch row.
pub(crate) struct Rows {
    /// The output row of each batch row (rows leave as they finish).
    pub live: Vec<usize>,
    /// Per output row.
    pub done: Vec<bool>,
    /// Per batch row.
    pub rngs: Vec<ChaCha8Rng>,
}

impl Rows {
    /// Samples the next token of every batch row from `logits` (`pad` for
    /// rows already finished), appends each unfinished row's token and
    /// log-prob to `out` and marks the rows that emitted an end token.
    /// Returns the tokens `[rows]` and whether every row has finished.
    pub fn step(
        &mut self,
        logits: &Tensor,
        opts: &GenerateOptions,
        pad: &Tensor,
        out: &mut Generation,
    ) -> Result<(Tensor, bool)> {
        let (next, logp) = sample_rows(logits, &opts.sampling, &mut self.rngs);
        let finished = Tensor::from_slice(&self.live.iter().map(|&i| self.done[i] as u8).collect::<Vec<_>>())
            .to_device(next.device())
            .to_kind(Kind::Bool);
        let next = next.where_self(&finished.logical_not(), pad);
        let next_v: Vec<i64> = Vec::try_from(&next.to_device(tch::Device::Cpu))?;
        let logp_v: Vec<f32> = Vec::try_from(&logp.to_device(tch::Device::Cpu).to_kind(Kind::Float))?;
        for (j, &i) in self.live.iter().enumerate() {
            if self.done[i] {
                continue;
            }
            out.tokens[i].push(next_v[j]);
            out.logprobs[i].push(logp_v[j]);
            if opts.eos_ids.contains(&next_v[j]) {
                self.done[i] = true;
            }
        }
        Ok((next, self.done.iter().all(|&d| d)))
    }

    /// The batch rows still decoding.
    pub fn unfinished(&self) -> Vec<i64> {
        (0..self.live.len() as i64).filter(|&j| !self.done[self.live[j as usize]]).collect()
    }

    /// Keeps only batch rows `keep` (in order), with their streams.
    pub fn keep(&mut self, keep: &[i64]) {
        let mut streams: Vec<Option<ChaCha8Rng>> = std::mem::take(&mut self.rngs).into_iter().map(Some).collect();
        self.rngs = keep.iter().map(|&j| streams[j as usize].take().expect("a stream per row")).collect();
        self.live = keep.iter().map(|&j| self.live[j as usize]).collect();
    }
}
