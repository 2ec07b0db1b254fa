//! The one supervised loop of pretrain, SFT and reward: AdamW with warmup +
//! cosine, gradient accumulation and clipping, a held-out metric every
//! `train.eval_every` steps, checkpoints every `checkpoint.every` steps
//! (adapter, extra tensors such as a reward head, optimiser moments, data
//! position) and resume from the newest one. What is trained on is an
//! [`Objective`]: next-token loss ([`super::lm`]) or the pairwise ranking
//! loss (`stages::reward`). Data parallel: each objective takes its rank's
//! rows of a batch and the ranks sum gradients and statistics before the
//! step (see [`crate::parallel`]).

use std::time::Instant;

use rlhf_common::spec::{CheckpointSpec, TrainSpec};
use serde_json::json;
use tch::Tensor;

use super::checkpoint::{self, Checkpoint};
use super::optim::{AdamW, Schedule};
use super::stage::Ctx;
use crate::data::Shuffler;
use crate::error::{Error, Result};
use crate::fields;
use crate::parallel;
use rlhf_model::peft::PeftModel;

/// What a supervised stage learns from.
pub trait Objective {
    /// Training rows (batches are drawn from `0..rows()`).
    fn rows(&self) -> usize;

    /// Names of the statistics [`backward`](Self::backward) returns, as
    /// logged; the first is the loss.
    fn stats(&self) -> &'static [&'static str];

    /// Backpropagates this rank's share of the micro-batch `batch` (row
    /// indices of the whole batch; the objective takes its rows with
    /// [`parallel::shard`]) divided by `accum`. Returns the statistics (this
    /// rank's part of the batch's, so that the ranks' parts add up) and the
    /// batch's tokens.
    fn backward(
        &mut self,
        pm: &PeftModel,
        batch: &[usize],
        rank: usize,
        world: usize,
        accum: usize,
    ) -> Result<(Vec<f64>, usize)>;

    /// The held-out metrics' names and values, if the stage has any; the
    /// first is the one `train.select_best` compares.
    fn eval(&mut self, pm: &PeftModel) -> Result<Vec<(&'static str, f64)>>;
}

/// What is trained: the adapter `adapter` of the model, and `extra` named
/// tensors (a reward head), all checkpointed.
pub struct Trainable<'a> {
    pub adapter: &'a str,
    pub extra: Vec<(&'static str, Tensor)>,
}

/// Trains `what` on `objective`; returns the steps and training seconds.
pub fn train(
    ctx: &mut Ctx<'_>,
    pm: &PeftModel,
    what: &Trainable<'_>,
    objective: &mut dyn Objective,
    train: &TrainSpec,
    ck: &CheckpointSpec,
    seed: u64,
) -> Result<(usize, f64)> {
    let rows = objective.rows();
    if rows == 0 {
        return Err(Error::InvalidArgument("data.train: no training examples".into()));
    }
    let per_step = train.batch_size * train.grad_accum;
    let total = train.max_steps.unwrap_or(train.epochs * rows.div_ceil(per_step).max(1));
    let sched = Schedule { base_lr: train.lr, warmup: train.warmup_steps, total };
    let adapter = what.adapter;
    let mut params = pm.adapter(adapter)?.parameters();
    let adapter_params = params.len();
    params.extend(what.extra.iter().map(|(_, t)| t.shallow_clone()));
    let mut opt = AdamW::new(params, train.weight_decay);
    // The extra tensors (a reward head) at `train.head_lr`, when given.
    if let Some(h) = train.head_lr {
        opt.scale_lr_from(adapter_params, h / train.lr);
    }
    let mut shuffler = Shuffler::new(seed);
    let mut start_step = 0;
    // `train.select_best`: the best evaluation so far (step, metric) and a
    // copy of every trained tensor then.
    let mut best: Option<(usize, f64, Vec<Tensor>)> = None;
    if let Some((step, dir)) = checkpoint::latest(ctx.out) {
        checkpoint::restore_adapter(&dir.join(adapter), pm.adapter(adapter)?)?;
        if !what.extra.is_empty() {
            let extra: Vec<(&str, &Tensor)> = what.extra.iter().map(|(k, t)| (*k, t)).collect();
            checkpoint::restore_tensors(&dir, &extra)?;
        }
        opt.load(&dir.join(format!("optimizer-{adapter}.safetensors")))?;
        let state = checkpoint::read_state(&dir)?;
        shuffler = serde_json::from_value(state["shuffler"].clone())
            .map_err(|e| Error::Data { path: dir.join("state.json"), msg: e.to_string() })?;
        start_step = step;
        if let (Some(at), Some(value)) = (state["best_step"].as_u64(), state["best"].as_f64()) {
            let copies: Vec<Tensor> = opt.params().iter().map(|t| t.detach().copy()).collect();
            let names: Vec<String> = (0..copies.len()).map(best_name).collect();
            let into: Vec<(&str, &Tensor)> = names.iter().map(String::as_str).zip(&copies).collect();
            checkpoint::restore_tensors(&dir, &into)?;
            best = Some((at as usize, value, copies));
        }
        tracing::info!(step, dir = %dir.display(), "resuming from checkpoint");
    }
    let (rank, world) = (ctx.dist.rank(), ctx.dist.world());
    if world > 1 {
        parallel::materialize_grads(opt.params());
    }
    let names = objective.stats();
    let t0 = Instant::now();
    for step in start_step..total {
        let ts = Instant::now();
        let mut sums = vec![0.0; names.len()];
        let mut tokens = 0usize;
        for _ in 0..train.grad_accum {
            let batch = shuffler.next_batch(train.batch_size, rows);
            let (stats, n) = objective.backward(pm, &batch, rank, world, train.grad_accum)?;
            sums.iter_mut().zip(stats).for_each(|(s, v)| *s += v);
            tokens += n;
        }
        let lr = sched.lr(step);
        let (grad_norm, sums) = opt.step_across(ctx.dist, &sums, train.max_grad_norm, lr)?;
        let done = step + 1;
        let mut rec = serde_json::Map::new();
        rec.extend(names.iter().zip(&sums).map(|(k, v)| (k.to_string(), json!(v))));
        rec.extend(fields! {
            "lr" => lr,
            "grad_norm" => grad_norm,
            "tokens_per_s" => tokens as f64 / ts.elapsed().as_secs_f64(),
        });
        if train.eval_due(done, total) && rank == 0 {
            let metrics = tch::no_grad(|| objective.eval(pm))?;
            rec.extend(metrics.iter().map(|(name, value)| (name.to_string(), json!(value))));
            if let Some(&(_, value)) = metrics.first() {
                if train.select_best && best.as_ref().is_none_or(|b| value > b.1) {
                    best = Some((done, value, opt.params().iter().map(|t| t.detach().copy()).collect()));
                }
            }
        }
        ctx.metrics.log(done, total, rec)?;
        if ck.every > 0 && done % ck.every == 0 && done < total && ctx.writes() {
            let mut tensors: Vec<(String, Tensor)> =
                what.extra.iter().map(|(k, t)| (k.to_string(), t.shallow_clone())).collect();
            let mut state = json!({ "step": done, "shuffler": shuffler });
            if let Some((at, value, copies)) = &best {
                tensors.extend(copies.iter().enumerate().map(|(i, t)| (best_name(i), t.shallow_clone())));
                state["best_step"] = json!(at);
                state["best"] = json!(value);
            }
            let c = Checkpoint {
                adapters: vec![(adapter, pm.adapter(adapter)?)],
                tensors,
                optimizers: vec![(adapter, &opt)],
                state,
            };
            checkpoint::save(ctx.out, done, "", &c, ck.keep)?;
        }
    }
    if let Some((at, value, copies)) = best.filter(|b| b.0 < total) {
        tch::no_grad(|| -> Result<()> {
            for (p, c) in opt.params().iter().zip(&copies) {
                p.shallow_clone().f_copy_(c)?;
            }
            Ok(())
        })?;
        tracing::info!(step = at, metric = value, "train.select_best: keeping the best evaluation's state");
        ctx.metrics.log(total, total, fields! { "selected_step" => at, "selected_metric" => value })?;
    }
    Ok((total, t0.elapsed().as_secs_f64()))
}

/// A checkpoint's name for the `i`th trained tensor of the best state.
fn best_name(i: usize) -> String {
    format!("best.{i}")
}
