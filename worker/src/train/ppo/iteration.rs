//! One PPO iteration — rollout, reference log-probs, scores, values,
//! KL-penalised rewards, GAE and the PPO epochs — over a [`Roles`] provider
//! that says where each role lives. The `ppo` stage runs it with the roles
//! colocated on one base or with reward and critic on another worker;
//! `bench ppo` times this very function, also over four separate models.

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf_common::spec::{KlEstimatorSpec, PpoSpec};
use serde_json::{Map, Value};
use tch::{Kind, Tensor};

use super::group::grpo_advantages;
use super::rollout::{logprobs, Batch};
use super::{
    apply_mask, apply_missing_eos_penalty, clip_score, gae, masked_mean, masked_whiten, penalized_rewards, policy_loss,
    shard, KlController, KlEstimator,
};
use crate::error::Result;
use crate::fields;
use crate::parallel::Collective;
use crate::train::logprobs::backprop_through_head;
use crate::train::optim::AdamW;
use rlhf_model::peft::PeftModel;
use rlhf_model::{generate_rows, sync, GenerateOptions, Generation, Hooks, Model, Sampling, Tokenizer};

/// Where the four roles of an iteration live.
pub trait Roles {
    /// The policy: its base with the policy adapter active.
    fn policy(&mut self) -> Result<&PeftModel>;
    /// The reference policy: the policy's base with adapters off, or a
    /// model of its own.
    fn reference(&mut self) -> Result<&PeftModel>;
    /// Sequence scores `[b]` from the reward model.
    fn scores(&mut self, batch: &Batch) -> Result<Tensor>;
    /// Per-token values `[b, R]` from the critic.
    fn values(&mut self, batch: &Batch) -> Result<Tensor>;
    /// One critic update on this rank's part of a minibatch (none is fine),
    /// weighing `share` of it; returns the value loss summed over ranks.
    fn critic_step(
        &mut self,
        part: Option<(&Batch, Tensor, Tensor)>,
        share: f64,
        ppo: &PpoSpec,
        dist: &mut dyn Collective,
    ) -> Result<f64>;
    /// The tokenizer, for rule rewards on decoded responses.
    fn tokenizer(&self) -> Option<&Tokenizer>;
    /// Payload bytes moved to and from other workers so far.
    fn bytes(&self) -> u64 {
        0
    }
}

/// The prompts of one iteration on this rank.
pub struct Prompts<'a> {
    /// Token ids of this rank's rows.
    pub ids: &'a [Vec<i64>],
    /// Their rows in the global batch.
    pub rows: &'a [usize],
    /// Rows in the global batch.
    pub global: usize,
}

/// The rule rewards: their weighted sum per response of this rank's rows,
/// and each rule's own scores under its metric name.
pub type RuleFn<'a> = dyn Fn(&Tokenizer, &[Vec<i64>]) -> Result<RuleScores> + 'a;

/// What a [`RuleFn`] gives: the summed scores `[b]` and each rule's own.
pub type RuleScores = (Tensor, Vec<(String, Vec<f32>)>);

/// Where scores come from: the reward role (with its weight), rules, or
/// both, summed.
pub struct Scorer<'a> {
    pub model: Option<f64>,
    pub rule: Option<&'a RuleFn<'a>>,
}

impl Scorer<'_> {
    /// The reward role alone.
    pub const MODEL: Scorer<'static> = Scorer { model: Some(1.0), rule: None };
}

/// What carries over from one iteration to the next.
pub struct PolicyState {
    pub opt: AdamW,
    pub kl: KlController,
}

impl PolicyState {
    pub fn new(policy_params: Vec<Tensor>, ppo: &PpoSpec) -> Self {
        let kl = match ppo.kl_target {
            Some(target) => KlController::Adaptive { coef: ppo.kl_coef, target, horizon: ppo.kl_horizon },
            None => KlController::Fixed { coef: ppo.kl_coef },
        };
        Self { opt: AdamW::new(policy_params, 0.0), kl }
    }
}

/// Sampling and stopping of the rollout.
pub struct Rollout {
    /// The job's seed; iteration `it` samples with a stream derived from both.
    pub seed: u64,
    pub it: usize,
    /// Generation stops at these (none: always `ppo.max_new_tokens`).
    pub eos_ids: Vec<i64>,
    pub pad: i64,
}

fn estimator(e: KlEstimatorSpec) -> KlEstimator {
    match e {
        KlEstimatorSpec::K1 => KlEstimator::K1,
        KlEstimatorSpec::K3 => KlEstimator::K3,
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.double_value(&[])
}

/// The options every rollout of iteration `it` samples with: row r of the
/// batch draws from stream r of the iteration's seed, wherever it runs.
pub fn generate_options(ppo: &PpoSpec, seed: u64, eos_ids: Vec<i64>, pad: i64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: ppo.max_new_tokens,
        sampling: Sampling { temperature: ppo.temperature, top_p: ppo.top_p, top_k: ppo.top_k, seed },
        eos_ids,
        pad_id: pad,
        steps: rlhf_model::Steps::Auto,
    }
}

impl Rollout {
    /// The sampling seed of this iteration.
    pub fn sampling_seed(&self) -> u64 {
        self.seed.wrapping_mul(1_000_003).wrapping_add(self.it as u64)
    }
}

/// Generates this rank's rows with the policy on its own base.
pub fn generate_here(
    roles: &mut dyn Roles,
    ppo: &PpoSpec,
    prompts: &Prompts<'_>,
    rollout: &Rollout,
) -> Result<Generation> {
    let opts = generate_options(ppo, rollout.sampling_seed(), rollout.eos_ids.clone(), rollout.pad);
    let pm = roles.policy()?;
    let rows: Vec<u64> = prompts.rows.iter().map(|&r| r as u64).collect();
    let gen = generate_parts(&pm.base, pm.hooks(), ppo, prompts.ids, &opts, &rows)?;
    sync(pm.base.device);
    Ok(gen)
}

/// `prompts` (batch rows `rows`) generated `ppo.generate_batch` rows at a
/// time, each part's KV cache freed before the next: the tokens all rows at
/// once would give (each row samples from its own stream).
pub fn generate_parts(
    base: &Model,
    hooks: &dyn Hooks,
    ppo: &PpoSpec,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    rows: &[u64],
) -> Result<Generation> {
    if rows.len() != prompts.len() {
        return Err(crate::Error::InvalidArgument(format!("{} row ids for {} prompts", rows.len(), prompts.len())));
    }
    let part = ppo.generate_rows(prompts.len());
    if part >= prompts.len() {
        return Ok(generate_rows(base, hooks, prompts, opts, rows)?);
    }
    let mut out = Generation::default();
    for (p, r) in prompts.chunks(part).zip(rows.chunks(part)) {
        let g = generate_rows(base, hooks, p, opts, r)?;
        out.tokens.extend(g.tokens);
        out.logprobs.extend(g.logprobs);
    }
    Ok(out)
}

/// A generated rollout and the seconds it took.
pub struct Generated {
    pub gen: Generation,
    pub secs: f64,
}

/// The rows of a global batch in a shuffled order for its minibatches:
/// groups of `per_prompt` consecutive rows (one prompt's completions) are
/// shuffled as wholes, so a minibatch that is a multiple of the group keeps
/// each prompt's rows together and runs the prompt once. With `per_prompt`
/// = 1 this is a plain shuffle of the rows (the same draws as before).
pub fn minibatch_order(rows: usize, per_prompt: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let per_prompt = per_prompt.max(1);
    let mut groups: Vec<usize> = (0..rows.div_ceil(per_prompt)).collect();
    groups.shuffle(rng);
    groups.into_iter().flat_map(|g| g * per_prompt..((g + 1) * per_prompt).min(rows)).collect()
}

/// `ppo.group_baseline`: this rank's `score` rows (global rows `rows`)
/// minus the mean score of their prompt's `per_prompt` samples (consecutive
/// global rows), taken over every rank's rows.
fn group_centred(
    dist: &mut dyn Collective,
    rows: &[usize],
    score: &Tensor,
    total: usize,
    per_prompt: usize,
) -> Result<Tensor> {
    let all = shard::gather(dist, rows, score, total)?;
    let centred = grpo_advantages(&all, per_prompt as i64, "none");
    let mine = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
    Ok(centred.index_select(0, &mine).to_device(score.device()).to_kind(score.kind()))
}

/// Runs one iteration on a generated rollout and returns its metrics
/// record (rewards, KL, losses, phase times `time_*`, bytes exchanged) and
/// this rank's raw scores, one per row (before penalties and clipping).
#[allow(clippy::too_many_arguments)]
pub fn run(
    roles: &mut dyn Roles,
    ppo: &PpoSpec,
    state: &mut PolicyState,
    prompts: &Prompts<'_>,
    generated: &Generated,
    scorer: &Scorer<'_>,
    rollout: &Rollout,
    dist: &mut dyn Collective,
) -> Result<(Map<String, Value>, Vec<f32>)> {
    let ti = Instant::now();
    let (gen, t_gen) = (&generated.gen, generated.secs);
    let bytes_before = roles.bytes();
    let (rank, world) = (dist.rank(), dist.world());
    let b_all = prompts.global;

    // 1. The rollout, generated before (here or on rollout workers).
    let device = roles.policy()?.base.device;
    let batch = Batch::new(prompts.ids, &gen.tokens, rollout.pad, device);
    let has_eos: Vec<bool> = gen.tokens.iter().map(|r| r.last().is_some_and(|t| rollout.eos_ids.contains(t))).collect();

    // 2. Old log-probs: the sampled tokens' own, from generation (as TRL);
    // reference log-probs with the adapters off.
    let t = Instant::now();
    let logp_old = batch.response_values(&gen.logprobs);
    let rows = ppo.forward_rows();
    let ref_logp = batch.by_parts(rows, |part| logprobs(roles.reference()?, part, ppo.temperature))?;
    sync(device);
    let t_ref = t.elapsed().as_secs_f64();

    // 3. Scores (reward role or rule) and values (critic role).
    let t = Instant::now();
    let (raw_score, parts) = score_rollout(roles, ppo, prompts, gen, &has_eos, scorer, rollout, &batch)?;
    sync(device);
    let t_reward = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let values_old = batch.by_parts(rows, |part| roles.values(part))?;
    sync(device);
    let t_values = t.elapsed().as_secs_f64();

    // 4. KL-penalised rewards, GAE, whitening.
    let has_eos_t =
        Tensor::from_slice(&has_eos.iter().map(|&b| b as u8).collect::<Vec<_>>()).to_kind(Kind::Bool).to_device(device);
    let score = match ppo.missing_eos_penalty {
        Some(p) => apply_missing_eos_penalty(&raw_score, &has_eos_t, p),
        None => raw_score.shallow_clone(),
    };
    let score = clip_score(&score, ppo.reward_clip);
    let score = match ppo.group_baseline {
        true => group_centred(dist, prompts.rows, &score, b_all, ppo.samples_per_prompt)?,
        false => score,
    };
    let mask = &batch.mask;
    let (rewards, kl) =
        penalized_rewards(&score, &logp_old, &ref_logp, mask, state.kl.coef(), estimator(ppo.kl_estimator));
    let (adv, returns) = gae(&rewards, &values_old, mask, ppo.gamma, ppo.lam);
    let adv = match (ppo.whiten_advantages, world) {
        (false, _) => adv,
        (true, 1) => masked_whiten(&adv, mask, true),
        (true, _) => shard::whiten_across(dist, &adv, mask)?,
    };
    let tokens_of = shard::row_tokens(dist, prompts.rows, mask, b_all)?;

    // 5. PPO epochs over minibatches: a policy step, then a critic step.
    let t = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(rollout.seed ^ (rollout.it as u64).wrapping_mul(0x9E37_79B9));
    let mut sums = MinibatchSums::default();
    for _ in 0..ppo.ppo_epochs {
        let order = minibatch_order(b_all, ppo.samples_per_prompt, &mut rng);
        for mb in order.chunks(ppo.minibatch) {
            // This rank's rows of the minibatch; their losses weigh their share of its tokens.
            let (local, share) = shard::minibatch_part(mb, rank, world, &tokens_of);
            let sel = Tensor::from_slice(&local).to_device(device);
            let pick = |x: &Tensor| x.index_select(0, &sel);
            let sub = (!local.is_empty()).then(|| batch.select(&local));
            let mut stats = [0.0; 4];
            if let Some(sub) = &sub {
                let pm = roles.policy()?;
                let (old, adv) = (pick(&logp_old), pick(&adv));
                stats = sub.train_step(pm, ppo.gradient_checkpointing, |hidden| {
                    backprop_through_head(pm, hidden, &sub.response, ppo.temperature, true, |logp_new, ent| {
                        let pg = policy_loss(logp_new, &old, &adv, &sub.mask, ppo.clip);
                        let part = &pg.loss * share;
                        let ent = ent.map_or(f64::NAN, |e| scalar(&masked_mean(e, &sub.mask)));
                        let stats =
                            [scalar(&part), scalar(&pg.clip_frac) * share, scalar(&pg.approx_kl) * share, ent * share];
                        Ok((part, stats))
                    })
                })?;
            }
            let (grad_norm, stats) = state.opt.step_across(dist, &stats, ppo.max_grad_norm, ppo.lr)?;
            let part = sub.as_ref().map(|s| (s, pick(&values_old), pick(&returns)));
            let value_loss = roles.critic_step(part, share, ppo, dist)?;
            sums.add(&stats, grad_norm, value_loss);
        }
    }
    sync(device);
    let t_train = t.elapsed().as_secs_f64();

    // 6. Batch-wide statistics (over every rank's rows).
    let total = |t: &Tensor| scalar(&t.sum(Kind::Float));
    let g = shard::sum_across(
        dist,
        &[
            total(&raw_score),
            total(&raw_score.square()),
            total(&score),
            total(&kl),
            batch.lens.iter().sum::<usize>() as f64,
            total(&apply_mask(&adv, mask)),
            total(mask),
            prompts.ids.iter().map(Vec::len).sum::<usize>() as f64,
        ],
    )?;
    let [raw, raw_sq, score_sum, kl_sum, response_tokens, adv_sum, mask_sum, prompt_tokens] = g[..] else {
        unreachable!("sum_across returns as many sums as it is given")
    };
    let n_rows = b_all as f64;
    let kl_seq = kl_sum / n_rows;
    state.kl.update(kl_seq, b_all);
    let n = sums.minibatches.max(1) as f64;
    let secs = ti.elapsed().as_secs_f64();
    let reward_mean = raw / n_rows;
    let reward_var =
        if b_all > 1 { (raw_sq - n_rows * reward_mean * reward_mean).max(0.0) / (n_rows - 1.0) } else { 0.0 };
    let raw_scores: Vec<f32> = Vec::try_from(raw_score.to_kind(Kind::Float).to_device(tch::Device::Cpu))?;
    // Each reward function's mean over every rank's rows.
    let part_sums: Vec<f64> =
        parts.iter().map(|(_, t)| t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[])).collect();
    let part_sums = shard::sum_across(dist, &part_sums)?;
    let mut record = fields! {
        "reward_mean" => reward_mean,
        "reward_std" => reward_var.sqrt(),
        "score_mean" => score_sum / n_rows,
        "kl" => kl_seq,
        "kl_coef" => state.kl.coef(),
        "entropy" => sums.entropy / n,
        "clip_frac" => sums.clip_frac / n,
        "approx_kl" => sums.approx_kl / n,
        "policy_loss" => sums.policy_loss / n,
        "value_loss" => sums.value_loss / n,
        "grad_norm" => sums.grad_norm / n,
        "response_len" => response_tokens / n_rows,
        "advantage_mean" => adv_sum / mask_sum.max(1e-8),
        "tokens_per_s" => (prompt_tokens + response_tokens) / (secs + t_gen),
        "time_generate" => t_gen,
        "time_reference" => t_ref,
        "time_reward" => t_reward,
        "time_values" => t_values,
        "time_train" => t_train,
        "bytes_exchanged" => roles.bytes() - bytes_before,
    };
    if parts.len() > 1 {
        for ((name, _), sum) in parts.iter().zip(part_sums) {
            record.insert(name.clone(), serde_json::json!(sum / n_rows));
        }
    }
    Ok((record, raw_scores))
}

/// The raw score of each row (before penalties and clipping): the reward
/// role's (weighted; with EOS appended to unfinished responses when
/// `ppo.score_with_eos`) plus the rules', and each function's own scores.
#[allow(clippy::too_many_arguments)]
pub fn score_rollout(
    roles: &mut dyn Roles,
    ppo: &PpoSpec,
    prompts: &Prompts<'_>,
    gen: &Generation,
    has_eos: &[bool],
    scorer: &Scorer<'_>,
    rollout: &Rollout,
    batch: &Batch,
) -> Result<(Tensor, Vec<(String, Tensor)>)> {
    let device = batch.ids.device();
    let mut parts: Vec<(String, Tensor)> = Vec::new();
    let mut raw_score: Option<Tensor> = None;
    if let Some(weight) = scorer.model {
        let model = if ppo.score_with_eos && !has_eos.iter().all(|&e| e) {
            // The reward model learned on EOS-terminated answers: score
            // each response as if it had ended there.
            let eos = rollout.eos_ids.first().copied().unwrap_or(rollout.pad);
            let ended: Vec<Vec<i64>> = gen
                .tokens
                .iter()
                .zip(has_eos)
                .map(|(r, &e)| if e { r.clone() } else { [r.as_slice(), &[eos]].concat() })
                .collect();
            Batch::new(prompts.ids, &ended, rollout.pad, device).by_parts(ppo.forward_rows(), |p| roles.scores(p))?
        } else {
            batch.by_parts(ppo.forward_rows(), |p| roles.scores(p))?
        };
        parts.push(("reward_model".into(), model.shallow_clone()));
        raw_score = Some(if weight == 1.0 { model } else { model * weight });
    }
    if let Some(rule) = scorer.rule {
        let tok = roles
            .tokenizer()
            .ok_or_else(|| crate::Error::InvalidArgument("ppo.reward: a rule reward needs a tokenizer".into()))?;
        let (total, each) = rule(tok, &gen.tokens)?;
        let total = total.to_device(device);
        parts.extend(each.into_iter().map(|(name, s)| (name, Tensor::from_slice(&s))));
        raw_score = Some(match raw_score {
            Some(m) => m.to_kind(Kind::Float) + total,
            None => total,
        });
    }
    let raw_score = raw_score.ok_or_else(|| crate::Error::InvalidArgument("ppo.reward: no reward function".into()))?;
    Ok((raw_score, parts))
}

/// Running sums over an iteration's minibatches (already summed over ranks).
#[derive(Default)]
struct MinibatchSums {
    policy_loss: f64,
    clip_frac: f64,
    approx_kl: f64,
    entropy: f64,
    grad_norm: f64,
    value_loss: f64,
    minibatches: usize,
}

impl MinibatchSums {
    /// `stats`: policy loss, clip fraction, approx KL, entropy.
    fn add(&mut self, stats: &[f64], grad_norm: f64, value_loss: f64) {
        self.policy_loss += stats[0];
        self.clip_frac += stats[1];
        self.approx_kl += stats[2];
        self.entropy += stats[3];
        self.grad_norm += grad_norm;
        self.value_loss += value_loss;
        self.minibatches += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minibatch_order_keeps_each_prompts_rows_together() {
        let mut a = ChaCha8Rng::seed_from_u64(7);
        let mut b = ChaCha8Rng::seed_from_u64(7);
        // One row per prompt: a plain shuffle of the rows, draw for draw.
        let mut plain: Vec<usize> = (0..16).collect();
        plain.shuffle(&mut a);
        assert_eq!(minibatch_order(16, 1, &mut b), plain);
        // Four per prompt: a permutation whose aligned runs of 4 are whole groups.
        let order = minibatch_order(16, 4, &mut ChaCha8Rng::seed_from_u64(3));
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
        for run in order.chunks(4) {
            let g = run[0] / 4;
            assert_eq!(run, [4 * g, 4 * g + 1, 4 * g + 2, 4 * g + 3]);
        }
        assert_ne!(order, (0..16).collect::<Vec<_>>(), "groups are shuffled");
    }
}
