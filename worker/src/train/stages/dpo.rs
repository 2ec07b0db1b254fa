//! `dpo`: the policy adapter learns from preference pairs directly (no
//! reward model, no sampling), against the reference policy = the same
//! base with the adapter off (the SFT model merged under it in a
//! pipeline), so no second model copy exists. Losses as TRL 1.12's
//! `DPOTrainer` computes them, on summed response log-probs
//! `Δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))`:
//! `sigmoid` `−(1−ε) log σ(βΔ) − ε log σ(−βΔ)`, `hinge` `relu(1 − βΔ)`,
//! `ipo` `(Δ̄ − 1/(2β))²` with per-token averaged log-ratios. Each pair's
//! reference log-probs are computed once, with its block of 8 pairs of
//! about its length, when the first of them is drawn; chosen and rejected share their
//! prompt's forward. Logged:
//! TRL's `rewards/{chosen,rejected,margins,accuracies}` (as
//! `rewards_chosen` …), held-out reward accuracy as `accuracy`.
//! Data: the pairs a reward job reads ([`reward::pairs_of`]).

use std::time::Instant;

use rlhf_common::spec::{DpoSpec, JobSpec};
use rlhf_common::Role;
use tch::{Device, Kind, Tensor};

use super::reward::{self, accuracies, balanced_rows, encode, encode_within, Encoded};
use crate::error::{Error, Result};
use crate::fields;
use crate::parallel;
use crate::train::logprobs::backprop_through_head;
use crate::train::optim::AdamW;
use crate::train::ppo::rollout::{logprobs, Batch};
use crate::train::setup::load_base;
use crate::train::stage::{Ctx, Outcome};
use crate::train::supervised::{self, Objective, Trainable};
use rlhf_model::peft::{self, base_parameters, PeftConfig, PeftModel};
use rlhf_model::sync;

pub const ADAPTER: &str = Role::Policy.name();

/// Chosen and rejected of each pair as rows (chosen, rejected, chosen, …)
/// of a rollout-layout batch: the pair's two rows share its prompt, so the
/// prompt's forward runs once for both ([`Batch::hidden`]). A response whose
/// prompt is empty gives its first token to the prompt (nothing predicts it).
fn pair_batch(pairs: &[&Encoded], pad: i64, device: Device) -> Batch {
    let mut prompts = Vec::with_capacity(2 * pairs.len());
    let mut responses = Vec::with_capacity(2 * pairs.len());
    for e in pairs {
        for (seq, start) in [(&e.chosen, e.chosen_start), (&e.rejected, e.rejected_start)] {
            let start = start.max(1).min(seq.len());
            prompts.push(seq[..start].to_vec());
            responses.push(seq[start..].to_vec());
        }
    }
    Batch::new(&prompts, &responses, pad, device)
}

/// Summed response log-probs `[2n]` of a pair batch's rows, from per-token ones.
fn summed(logp: &Tensor, batch: &Batch) -> Tensor {
    (logp * &batch.mask).sum_dim_intlist(1, false, Kind::Float)
}

/// Summed response log-probs `[2n]` of pairs (chosen, rejected, chosen, …)
/// with the active adapter of `pm`, without a graph.
fn pair_logps(pm: &PeftModel, pairs: &[&Encoded], pad: i64) -> Result<Tensor> {
    let batch = pair_batch(pairs, pad, pm.base.device);
    tch::no_grad(|| Ok(summed(&logprobs(pm, &batch, 1.0)?, &batch)))
}

/// Response lengths `[n]` of one side of each pair.
fn lengths(pairs: &[&Encoded], chosen: bool) -> Tensor {
    let n: Vec<f32> = pairs
        .iter()
        .map(|e| if chosen { e.chosen.len() - e.chosen_start } else { e.rejected.len() - e.rejected_start })
        .map(|n| n.max(1) as f32)
        .collect();
    Tensor::from_slice(&n)
}

/// What DPO computes on a batch of pairs: per-pair losses `[n]` and the
/// implicit rewards `β · (log π − log π_ref)` of each side `[n]`.
pub struct PairLoss {
    pub loss: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

/// TRL's DPO loss of `spec.loss_type` from policy and reference log-probs
/// (`[n]` each side) and the response lengths (for `ipo`).
pub fn dpo_loss(
    spec: &DpoSpec,
    policy: (&Tensor, &Tensor),
    reference: (&Tensor, &Tensor),
    lens: (&Tensor, &Tensor),
) -> PairLoss {
    let chosen = policy.0 - reference.0;
    let rejected = policy.1 - reference.1;
    let beta = spec.beta;
    let delta = &chosen - &rejected;
    let loss = match spec.loss_type.as_str() {
        "hinge" => (-(&delta * beta) + 1.0).relu(),
        "ipo" => {
            let d = &chosen / lens.0 - &rejected / lens.1;
            (d - 1.0 / (2.0 * beta)).square()
        }
        _ => {
            let e = spec.label_smoothing;
            let l = -(&delta * beta).log_sigmoid() * (1.0 - e);
            if e > 0.0 {
                l - (&delta * -beta).log_sigmoid() * e
            } else {
                l
            }
        }
    };
    PairLoss { loss, chosen_rewards: chosen.detach() * beta, rejected_rewards: rejected.detach() * beta }
}

/// Backpropagates the mean DPO loss of pairs `(prompt, chosen, rejected)`
/// (token ids) through the path a training step takes, the active adapter
/// of `pm` as the policy and the adapter off as the reference; returns the
/// loss (for the TRL parity test).
pub fn batch_backward(
    pm: &PeftModel,
    pairs: &[(Vec<i64>, Vec<i64>, Vec<i64>)],
    spec: &DpoSpec,
    pad: i64,
    recompute: bool,
) -> Result<f64> {
    let enc: Vec<Encoded> = pairs
        .iter()
        .map(|(p, c, r)| Encoded {
            chosen: [p.as_slice(), c].concat(),
            rejected: [p.as_slice(), r].concat(),
            chosen_start: p.len(),
            rejected_start: p.len(),
            margin: 0.0,
            task: None,
            format: 0,
        })
        .collect();
    let rows: Vec<usize> = (0..enc.len()).collect();
    let mut objective = DpoObjective::new(&enc, &rows, &[], spec, pad, recompute);
    Ok(objective.backward(pm, &rows, 0, 1, 1)?.0[0])
}

struct DpoObjective<'a> {
    pairs: &'a [Encoded],
    /// Training draws: indices into `pairs`.
    rows: &'a [usize],
    held_out: &'a [Encoded],
    spec: &'a DpoSpec,
    pad: i64,
    /// Reference log-probs (chosen, rejected) of each training pair, once computed.
    reference: Vec<Option<(f32, f32)>>,
    held_out_reference: Option<Tensor>,
    /// Activation checkpointing in the policy's backward (`train.gradient_checkpointing`).
    recompute: bool,
    /// The pairs whose reference log-probs are computed together, and each pair's block.
    blocks: Vec<Vec<usize>>,
    block_of: Vec<usize>,
}

/// Pairs per reference forward.
const REFERENCE_BLOCK: usize = 8;

/// Reference (adapter off) log-probs `[2n]` of `pairs`, [`REFERENCE_BLOCK`]
/// pairs per forward. Training pairs go in fixed blocks of pairs of about
/// one length ([`DpoObjective::reference_of`]): a pair's values then do not
/// depend on which pairs it was drawn with (padding changes the kernels'
/// shapes and so the last bits), a resumed run reproduces an uninterrupted
/// one exactly, and a block wastes little on padding.
fn reference_logps(pm: &PeftModel, pairs: &[&Encoded], pad: i64) -> Result<Tensor> {
    tch::no_grad(|| {
        pm.without_adapter(|| {
            let parts = pairs.chunks(REFERENCE_BLOCK).map(|c| pair_logps(pm, c, pad)).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0))
        })
    })
}

/// `[2n]` (chosen, rejected, …) as `([n], [n])`.
fn sides(t: &Tensor) -> (Tensor, Tensor) {
    let v = t.view([-1, 2]);
    (v.select(1, 0), v.select(1, 1))
}

impl<'a> DpoObjective<'a> {
    fn new(
        pairs: &'a [Encoded],
        rows: &'a [usize],
        held_out: &'a [Encoded],
        spec: &'a DpoSpec,
        pad: i64,
        recompute: bool,
    ) -> Self {
        let reference = vec![None; pairs.len()];
        // Blocks of REFERENCE_BLOCK pairs in order of length (then index).
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by_key(|&i| (pairs[i].chosen.len().max(pairs[i].rejected.len()), i));
        let blocks: Vec<Vec<usize>> = order.chunks(REFERENCE_BLOCK).map(<[usize]>::to_vec).collect();
        let mut block_of = vec![0; pairs.len()];
        for (b, members) in blocks.iter().enumerate() {
            members.iter().for_each(|&i| block_of[i] = b);
        }
        Self { pairs, rows, held_out, spec, pad, reference, held_out_reference: None, recompute, blocks, block_of }
    }

    fn reference_of(&mut self, pm: &PeftModel, idx: &[usize]) -> Result<(Tensor, Tensor)> {
        // The blocks that hold a missing pair, whole.
        let blocks: std::collections::BTreeSet<usize> =
            idx.iter().filter(|&&i| self.reference[i].is_none()).map(|&i| self.block_of[i]).collect();
        for block in blocks {
            let members = &self.blocks[block];
            let pairs: Vec<&Encoded> = members.iter().map(|&i| &self.pairs[i]).collect();
            let r: Vec<f32> = Vec::try_from(&reference_logps(pm, &pairs, self.pad)?.to_device(tch::Device::Cpu))?;
            for (k, &i) in members.iter().enumerate() {
                self.reference[i] = Some((r[2 * k], r[2 * k + 1]));
            }
        }
        let device = pm.base.device;
        let side = |f: fn(&(f32, f32)) -> f32| {
            let v: Vec<f32> = idx.iter().map(|&i| self.reference[i].as_ref().map_or(0.0, f)).collect();
            Tensor::from_slice(&v).to_device(device)
        };
        Ok((side(|r| r.0), side(|r| r.1)))
    }
}

/// One optimizer step on `pairs` as the stage takes it: their reference
/// log-probs (adapter off, in blocks of pairs), then the policy's
/// forward/backward over all of them and the AdamW step; for `bench dpo`.
/// Returns the seconds of the reference pass, of the rest, and the loss.
pub(crate) fn timed_step(
    pm: &PeftModel,
    opt: &mut AdamW,
    pairs: &[Encoded],
    spec: &DpoSpec,
    pad: i64,
    (lr, max_grad_norm, recompute): (f64, f64, bool),
) -> Result<(f64, f64, f64)> {
    let rows: Vec<usize> = (0..pairs.len()).collect();
    let mut objective = DpoObjective::new(pairs, &rows, &[], spec, pad, recompute);
    let t = Instant::now();
    let _ = objective.reference_of(pm, &rows)?;
    sync(pm.base.device);
    let t_ref = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (stats, _) = objective.backward(pm, &rows, 0, 1, 1)?;
    opt.step_across(&mut parallel::Single, &stats, max_grad_norm, lr)?;
    sync(pm.base.device);
    Ok((t_ref, t.elapsed().as_secs_f64(), stats[0]))
}

impl Objective for DpoObjective<'_> {
    fn rows(&self) -> usize {
        self.rows.len()
    }

    fn stats(&self) -> &'static [&'static str] {
        &["loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies"]
    }

    fn backward(
        &mut self,
        pm: &PeftModel,
        batch: &[usize],
        rank: usize,
        world: usize,
        accum: usize,
    ) -> Result<(Vec<f64>, usize)> {
        let share = 1.0 / (batch.len() * accum) as f64;
        let idx: Vec<usize> = parallel::shard(batch, rank, world).into_iter().map(|i| self.rows[i]).collect();
        if idx.is_empty() {
            return Ok((vec![0.0; 5], 0));
        }
        let reference = self.reference_of(pm, &idx)?;
        let pairs: Vec<&Encoded> = idx.iter().map(|&i| &self.pairs[i]).collect();
        let device = pm.base.device;
        let batch = pair_batch(&pairs, self.pad, device);
        let lens = (lengths(&pairs, true).to_device(device), lengths(&pairs, false).to_device(device));
        let spec = self.spec;
        // The LM head runs in chunks with its own backward (no vocabulary-wide
        // logits kept), the trunk through the graph or recomputed.
        let stats = batch.train_step(pm, self.recompute, |hidden| {
            backprop_through_head(pm, hidden, &batch.response, 1.0, false, |logp, _| {
                let (pc, pr) = sides(&summed(logp, &batch));
                let out = dpo_loss(spec, (&pc, &pr), (&reference.0, &reference.1), (&lens.0, &lens.1));
                let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]) * share;
                let margins = &out.chosen_rewards - &out.rejected_rewards;
                let stats = vec![
                    sum(&out.loss.detach()),
                    sum(&out.chosen_rewards),
                    sum(&out.rejected_rewards),
                    sum(&margins),
                    sum(&margins.gt(0.0).to_kind(Kind::Float)),
                ];
                Ok((out.loss.sum(Kind::Float) * share, stats))
            })
        })?;
        let tokens = pairs.iter().map(|e| e.chosen.len() + e.rejected.len()).sum();
        Ok((stats, tokens))
    }

    fn eval(&mut self, pm: &PeftModel) -> Result<Vec<(&'static str, f64)>> {
        if self.held_out.is_empty() {
            return Ok(Vec::new());
        }
        let (won, _) = held_out(pm, self.held_out, &mut self.held_out_reference, self.spec.beta, self.pad)?;
        Ok(vec![("accuracy", won.iter().filter(|&&w| w).count() as f64 / won.len() as f64)])
    }
}

/// Whether each held-out pair's implicit reward ranks chosen above
/// rejected, and the mean margin `β · Δ`. The reference log-probs are
/// computed on the first call and kept in `reference`.
fn held_out(
    pm: &PeftModel,
    pairs: &[Encoded],
    reference: &mut Option<Tensor>,
    beta: f64,
    pad: i64,
) -> Result<(Vec<bool>, f64)> {
    let all: Vec<&Encoded> = pairs.iter().collect();
    if reference.is_none() {
        *reference = Some(reference_logps(pm, &all, pad)?);
    }
    let policy = tch::no_grad(|| -> Result<Tensor> {
        let parts = all.chunks(8).map(|c| pair_logps(pm, c, pad)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0))
    })?;
    let (pc, pr) = sides(&policy);
    let (rc, rr) = sides(reference.as_ref().expect("set above"));
    let margin = ((pc - rc) - (pr - rr)) * beta;
    let won: Vec<bool> = Vec::<f32>::try_from(&margin.to_device(tch::Device::Cpu))?.iter().map(|&m| m > 0.0).collect();
    Ok((won, margin.mean(Kind::Double).double_value(&[])))
}

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let mut l = load_base(job, ctx.device)?;
    let spec = job.dpo.clone().unwrap_or_default();
    let p = reward::pairs_of(job)?;
    let max_len = job.model.max_length;
    let data = job.data.clone().unwrap_or_default();
    let cap = data.max_pair_tokens;
    let train_enc = encode_within(&l, &p.train, max_len, cap)?;
    let eval_enc = encode_within(&l, &p.held_out, max_len, cap)?;
    let test_enc = encode(&l, &p.test, max_len)?;
    if train_enc.is_empty() {
        return Err(Error::InvalidArgument("data.train: no preference pairs".into()));
    }
    let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
    let adapter = peft::build(PeftConfig::from_spec(peft_spec, job.seed), &l.pm.base)?;
    let trainable = adapter.num_parameters();
    l.pm.add(ADAPTER, adapter)?;
    l.pm.set_active(Some(ADAPTER))?;
    let pad = l.pad();
    let tags: Vec<(Option<&str>, u8)> = train_enc.iter().map(|e| (e.task.as_deref(), e.format)).collect();
    let rows = balanced_rows(&tags);
    tracing::info!(
        pairs = train_enc.len(),
        of = p.train.len(),
        held_out = eval_enc.len(),
        of_held_out = p.held_out.len(),
        rows = rows.len(),
        loss = %spec.loss_type,
        "dpo pairs (within data.max_pair_tokens)"
    );
    let train = job.train.clone().unwrap_or_default();
    let mut objective = DpoObjective::new(&train_enc, &rows, &eval_enc, &spec, pad, train.gradient_checkpointing);
    let what = Trainable { adapter: ADAPTER, extra: Vec::new() };
    let (steps, secs) = supervised::train(ctx, &l.pm, &what, &mut objective, &train, &job.checkpoint, job.seed)?;
    let mut final_metrics = fields! { "eval_pairs" => eval_enc.len() };
    let dir = ctx.out.join("adapter");
    if ctx.writes() {
        peft::io::save(l.pm.adapter(ADAPTER)?, &dir, &l.model_dir.display().to_string())?;
        let mut test_reference = None;
        for (prefix, pairs, reference) in [
            ("accuracy", &eval_enc, &mut objective.held_out_reference),
            ("test_accuracy", &test_enc, &mut test_reference),
        ] {
            if !pairs.is_empty() {
                let (won, margin) = tch::no_grad(|| held_out(&l.pm, pairs, reference, spec.beta, pad))?;
                final_metrics.extend(accuracies(prefix, pairs, &won));
                final_metrics.insert(format!("{prefix}_margin"), margin.into());
            }
        }
    }
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| "dpo".into()),
        kind: "dpo".into(),
        method: Some(peft_spec.method),
        adapter: Some(dir),
        trainable_params: trainable,
        base_params: base_parameters(&l.pm.base),
        train_seconds: secs,
        steps,
        final_metrics,
        ..Outcome::default()
    })
}
