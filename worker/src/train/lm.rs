//! The supervised loop shared by `pretrain` and `sft`: next-token loss on
//! marked tokens, AdamW with warmup + cosine, gradient accumulation and
//! clipping, checkpoints every N steps, and resume from the newest one.
//! Data parallel: each rank takes every world-th row of each batch and the
//! ranks sum their gradients before the step (see [`crate::parallel`]).

use std::time::Instant;

use rlhf_common::spec::{CheckpointSpec, TrainSpec};
use serde_json::json;
use tch::{Kind, Tensor};

use super::checkpoint::{self, Checkpoint};
use super::logprobs::backprop_through_head;
use super::optim::{AdamW, Schedule};
use super::recompute;
use super::setup::lm_targets;
use super::stage::Ctx;
use crate::data::Shuffler;
use crate::error::{Error, Result};
use crate::fields;
use crate::parallel;
use rlhf_model::batch::{positions, right_padded};
use rlhf_model::peft::PeftModel;
use rlhf_model::Mask;

/// A token sequence and which of its tokens are targets (1) or context (0).
pub struct Sample {
    pub ids: Vec<i64>,
    pub targets: Vec<i64>,
}

/// Trains the active adapter of `pm` named `adapter`. `eval` is called every
/// `train.eval_every` steps and at the end; its number is logged as `eval_accuracy`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    ctx: &mut Ctx<'_>,
    pm: &PeftModel,
    adapter: &str,
    samples: &[Sample],
    train: &TrainSpec,
    ck: &CheckpointSpec,
    seed: u64,
    pad: i64,
    eval: &mut dyn FnMut(&PeftModel) -> Result<f64>,
) -> Result<(usize, f64)> {
    if samples.is_empty() {
        return Err(Error::InvalidArgument("data.train: no training examples".into()));
    }
    let per_step = train.batch_size * train.grad_accum;
    let epoch_steps = samples.len().div_ceil(per_step).max(1);
    let total = train.max_steps.unwrap_or(train.epochs * epoch_steps);
    let sched = Schedule { base_lr: train.lr, warmup: train.warmup_steps, total };
    let params = pm.adapter(adapter)?.parameters();
    let mut opt = AdamW::new(params, train.weight_decay);
    let mut shuffler = Shuffler::new(seed);
    let mut start_step = 0;
    if let Some((step, dir)) = checkpoint::latest(ctx.out) {
        checkpoint::restore_adapter(&dir.join(adapter), pm.adapter(adapter)?)?;
        opt.load(&dir.join(format!("optimizer-{adapter}.safetensors")))?;
        let state = checkpoint::read_state(&dir)?;
        shuffler = serde_json::from_value(state["shuffler"].clone())
            .map_err(|e| Error::Data { path: dir.join("state.json"), msg: e.to_string() })?;
        start_step = step;
        tracing::info!(step, dir = %dir.display(), "resuming from checkpoint");
    }
    let device = pm.base.device;
    let (rank, world) = (ctx.dist.rank(), ctx.dist.world());
    if world > 1 {
        parallel::materialize_grads(opt.params());
    }
    // Targets a row contributes to the loss (the first token predicts nothing).
    let n_targets = |i: &usize| samples[*i].targets.iter().skip(1).filter(|&&t| t != 0).count();
    let t0 = Instant::now();
    for step in start_step..total {
        let ts = Instant::now();
        let mut loss_sum = 0.0;
        let mut tokens = 0i64;
        for _ in 0..train.grad_accum {
            let idx = shuffler.next_batch(train.batch_size, samples.len());
            tokens += idx.iter().map(|&i| samples[i].ids.len() as i64).sum::<i64>();
            // This rank's rows; its mean loss is weighted by its share of the
            // batch's targets, so the ranks' losses add up to the batch mean.
            let all_targets: usize = idx.iter().map(n_targets).sum();
            let idx = parallel::shard(&idx, rank, world);
            let ids: Vec<Vec<i64>> = idx.iter().map(|&i| samples[i].ids.clone()).collect();
            let tg: Vec<Vec<i64>> = idx.iter().map(|&i| samples[i].targets.clone()).collect();
            let (ids_t, _) = right_padded(&ids, pad, device);
            let (tg_t, _) = right_padded(&tg, 0, device);
            let scale = |n: i64| {
                let share = if world > 1 { n as f64 / all_targets.max(1) as f64 } else { 1.0 };
                share / train.grad_accum as f64
            };
            loss_sum += backward_lm_loss(pm, &ids_t, &tg_t, train.gradient_checkpointing, scale)?;
        }
        let lr = sched.lr(step);
        let (grad_norm, summed) = opt.step_across(ctx.dist, &[loss_sum], train.max_grad_norm, lr)?;
        let loss_sum = summed[0];
        let done = step + 1;
        let mut rec = fields! {
            "loss" => loss_sum,
            "lr" => lr,
            "grad_norm" => grad_norm,
            "tokens_per_s" => tokens as f64 / ts.elapsed().as_secs_f64(),
        };
        if train.eval_due(done, total) && rank == 0 {
            let acc = tch::no_grad(|| eval(pm))?;
            rec.insert("eval_accuracy".into(), json!(acc));
        }
        ctx.metrics.log(done, total, rec)?;
        if ck.every > 0 && done % ck.every == 0 && done < total && ctx.writes() {
            let a = pm.adapter(adapter)?;
            let state = json!({ "step": done, "shuffler": shuffler });
            let c = Checkpoint {
                adapters: vec![(adapter, a)],
                tensors: Vec::new(),
                optimizers: vec![(adapter, &opt)],
                state,
            };
            checkpoint::save(ctx.out, done, "", &c, ck.keep)?;
        }
    }
    Ok((total, t0.elapsed().as_secs_f64()))
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
