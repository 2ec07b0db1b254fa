//! Next-token loss on marked tokens, the [`Objective`] of `pretrain` and
//! `sft` (the loop is [`super::supervised`]). Data parallel: each rank takes
//! every world-th row of a batch, weighted by its share of the targets.

use tch::{Kind, Tensor};

use super::logprobs::backprop_through_head;
use super::recompute;
use super::setup::lm_targets;
use super::supervised::Objective;
use crate::error::Result;
use crate::parallel;
use rlhf_model::batch::{positions, right_padded};
use rlhf_model::peft::PeftModel;
use rlhf_model::Mask;

/// A token sequence and which of its tokens are targets (1) or context (0).
pub struct Sample {
    pub ids: Vec<i64>,
    pub targets: Vec<i64>,
}

/// A held-out metric of the model being trained.
pub type HeldOut<'a> = dyn FnMut(&PeftModel) -> Result<f64> + 'a;

/// Next-token loss on the marked tokens of `samples`, with an optional
/// held-out metric (logged as `eval_accuracy`).
pub struct LmObjective<'a> {
    pub samples: &'a [Sample],
    pub pad: i64,
    /// Activation checkpointing (`train.gradient_checkpointing`).
    pub recompute: bool,
    pub eval: Option<&'a mut HeldOut<'a>>,
}

impl Objective for LmObjective<'_> {
    fn rows(&self) -> usize {
        self.samples.len()
    }

    fn stats(&self) -> &'static [&'static str] {
        &["loss"]
    }

    fn backward(
        &mut self,
        pm: &PeftModel,
        batch: &[usize],
        rank: usize,
        world: usize,
        accum: usize,
    ) -> Result<(Vec<f64>, usize)> {
        let samples = self.samples;
        // Targets a row contributes to the loss (the first token predicts nothing).
        let n_targets = |i: &usize| samples[*i].targets.iter().skip(1).filter(|&&t| t != 0).count();
        let tokens = batch.iter().map(|&i| samples[i].ids.len()).sum();
        // This rank's rows; its mean loss is weighted by its share of the
        // batch's targets, so the ranks' losses add up to the batch mean.
        let all_targets: usize = batch.iter().map(n_targets).sum();
        let idx = parallel::shard(batch, rank, world);
        let ids: Vec<Vec<i64>> = idx.iter().map(|&i| samples[i].ids.clone()).collect();
        let tg: Vec<Vec<i64>> = idx.iter().map(|&i| samples[i].targets.clone()).collect();
        let device = pm.base.device;
        let (ids_t, _) = right_padded(&ids, self.pad, device);
        let (tg_t, _) = right_padded(&tg, 0, device);
        let scale = |n: i64| {
            let share = if world > 1 { n as f64 / all_targets.max(1) as f64 } else { 1.0 };
            share / accum as f64
        };
        Ok((vec![backward_lm_loss(pm, &ids_t, &tg_t, self.recompute, scale)?], tokens))
    }

    fn eval(&mut self, pm: &PeftModel) -> Result<Vec<(&'static str, f64)>> {
        match &mut self.eval {
            Some(f) => Ok(vec![("eval_accuracy", f(pm)?)]),
            None => Ok(Vec::new()),
        }
    }
}

/// Backpropagates the mean next-token cross-entropy over the targets of
/// `target_mask` (`[b, T]`; see [`lm_targets`]) times `scale(targets)`, with
/// activation checkpointing when `recompute`; returns the scaled loss.
pub fn backward_lm_loss(
    pm: &PeftModel,
    ids: &Tensor,
    target_mask: &Tensor,
    recompute: bool,
    scale: impl FnOnce(i64) -> f64,
) -> Result<f64> {
    let pos = positions(ids);
    recompute::backward(pm, (ids, &pos, &Mask::Causal), recompute, |hidden| {
        let (h, targets) = lm_targets(ids, target_mask, hidden)?;
        let factor = scale(targets.size()[0]);
        backprop_through_head(pm, &h, &targets, 1.0, false, |logp, _| {
            let part = -logp.mean(Kind::Float) * factor;
            let value = part.double_value(&[]);
            Ok((part, value))
        })
    })
}
