//! The `ppo` stage. Policy, reference, reward model and critic are views of
//! one base: the policy adapter (trainable), the base with adapters off
//! (reference), and a [`RoleHost`] holding the reward adapter + head and the
//! critic adapter + value head. Colocated, all four share one base on this
//! device; with the roles placed on another worker, the host is remote and
//! only token ids and per-token floats cross the wire.

use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf_common::spec::{JobSpec, KlEstimatorSpec, PpoSpec, RewardSource};
use serde_json::json;
use tch::{Kind, Tensor};

use super::roles::{RoleHost, RoleOp, CRITIC, POLICY};
use super::rollout::{logprobs, Batch};
use super::{apply_mask, apply_missing_eos_penalty, clip_score, gae, masked_mean, masked_whiten, penalized_rewards, policy_loss, shard, KlController, KlEstimator};
use crate::data::{Shuffler, Template};
use crate::error::{Error, Result};
use crate::fields;
use crate::dist;
use crate::model::{generate_rows, GenerateOptions, Sampling};
use crate::peft::{self, base_parameters, PeftConfig, PeftModel};
use crate::train::checkpoint::{self, Checkpoint};
use crate::train::logprobs::backprop_through_head;
use crate::train::optim::AdamW;
use crate::train::setup::{load_base, task_data, Loaded};
use crate::train::stage::{Ctx, Outcome};

/// A role host on another worker.
pub trait RemoteRoles: Send {
    /// Runs `op` there and returns its named tensors.
    fn call(&mut self, op: RoleOp) -> Result<Vec<(String, Tensor)>>;
    /// Payload bytes sent and received so far.
    fn bytes(&self) -> u64;
}

/// The trainer's view of the roles: the policy's base, and where reward and
/// critic live.
struct Parts<'r> {
    ppo: PpoSpec,
    /// Colocated: the host also carries the policy adapter.
    host: Option<RoleHost>,
    /// Remote roles: the trainer's own base for policy and reference.
    own: Option<Loaded>,
    remote: Option<&'r mut (dyn RemoteRoles + 'static)>,
}

impl Parts<'_> {
    fn policy(&self) -> Result<&Loaded> {
        self.own.as_ref().or(self.host.as_ref().map(|h| &h.l)).ok_or_else(|| Error::AdapterState("no policy model".into()))
    }

    fn policy_pm(&mut self) -> Result<&mut PeftModel> {
        match (&mut self.own, &mut self.host) {
            (Some(l), _) => Ok(&mut l.pm),
            (None, Some(h)) => Ok(&mut h.l.pm),
            (None, None) => Err(Error::AdapterState("no policy model".into())),
        }
    }

    fn call(&mut self, op: RoleOp) -> Result<Vec<(String, Tensor)>> {
        match (&mut self.host, &mut self.remote) {
            (Some(h), _) => h.serve(op, &self.ppo),
            (None, Some(r)) => r.call(op),
            (None, None) => Err(Error::AdapterState("no reward/critic host".into())),
        }
    }

    fn call_one(&mut self, op: RoleOp, name: &str) -> Result<Tensor> {
        let device = self.policy()?.pm.base.device;
        let out = self.call(op)?;
        out.into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.to_device(device))
            .ok_or_else(|| Error::InvalidArgument(format!("role reply lacks {name}")))
    }

    fn bytes(&self) -> u64 {
        self.remote.as_ref().map_or(0, |r| r.bytes())
    }
}

/// Rule rewards computed on the trainer from the decoded responses.
fn rule_scores(l: &Loaded, reward: &RewardSource, template: &Template, responses: &[Vec<i64>], gold: &[String]) -> Result<Tensor> {
    let mut s = Vec::with_capacity(responses.len());
    for (r, g) in responses.iter().zip(gold) {
        let text = l.tok.decode(r, true)?;
        s.push(match reward {
            RewardSource::Match { text: t, weight } => (text.matches(t.as_str()).count() as f64 * weight) as f32,
            _ => f32::from(u8::from(template.label_for_answer(&text) == Some(g.as_str()))),
        });
    }
    Ok(Tensor::from_slice(&s).to_device(l.pm.base.device))
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

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    run_with(job, ctx, None)
}

/// Runs PPO; with `remote`, reward and critic live on another worker.
pub fn run_with(job: &JobSpec, ctx: &mut Ctx<'_>, remote: Option<&mut (dyn RemoteRoles + 'static)>) -> Result<Outcome> {
    let ppo = job.ppo.clone().ok_or_else(|| Error::InvalidArgument("ppo: required".into()))?;
    let data = job.data.clone().unwrap_or_default();
    let train_path = data.train.clone().ok_or_else(|| Error::InvalidArgument("data.train: required".into()))?;
    let (template, examples) = task_data(&data, &train_path, data.max_examples)?;
    let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
    let mut parts = match remote {
        Some(r) => {
            r.call(RoleOp::Init { spec_toml: job.to_toml() })?;
            Parts { ppo: ppo.clone(), host: None, own: Some(load_base(job, ctx.device)?), remote: Some(r) }
        }
        None => Parts { ppo: ppo.clone(), host: Some(RoleHost::new(job, &ppo, ctx.device)?), own: None, remote: None },
    };
    {
        let pm = parts.policy_pm()?;
        let policy = peft::build(PeftConfig::from_spec(peft_spec, job.seed), &pm.base)?;
        pm.add(POLICY, policy)?;
    }
    let max_prompt = job.model.max_length.saturating_sub(ppo.max_new_tokens).max(1);
    let mut prompts = Vec::with_capacity(examples.len());
    for ex in &examples {
        let mut ids = parts.policy()?.tok.encode(&template.render(ex)?, true)?;
        if ids.len() > max_prompt {
            ids.drain(..ids.len() - max_prompt);
        }
        prompts.push(ids);
    }
    let gold: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
    if prompts.is_empty() {
        return Err(Error::InvalidArgument("data.train: no prompts".into()));
    }

    let policy_params = parts.policy()?.pm.adapter(POLICY)?.parameters();
    let trainable = policy_params.iter().map(|t| t.numel() as i64).sum::<i64>();
    let (rank, world) = (ctx.dist.rank(), ctx.dist.world());
    if world > 1 {
        if parts.remote.is_some() {
            return Err(Error::InvalidArgument("placement: a data-parallel ppo job keeps reward and critic on every rank".into()));
        }
        dist::materialize_grads(&policy_params);
        if let Some(h) = &parts.host {
            dist::materialize_grads(h.critic_params());
        }
    }
    let mut policy_opt = AdamW::new(policy_params, 0.0);
    let mut kl_ctl = match ppo.kl_target {
        Some(target) => KlController::Adaptive { coef: ppo.kl_coef, target, horizon: ppo.kl_horizon },
        None => KlController::Fixed { coef: ppo.kl_coef },
    };
    let mut shuffler = Shuffler::new(job.seed);
    let mut start = 0;
    if let Some((step, dir)) = checkpoint::latest(ctx.out) {
        checkpoint::restore_adapter(&dir.join(POLICY), parts.policy()?.pm.adapter(POLICY)?)?;
        policy_opt.load(&dir.join(format!("optimizer-{POLICY}.safetensors")))?;
        parts.call(RoleOp::Restore { dir: dir.display().to_string() })?;
        let state = checkpoint::read_state(&dir)?;
        let bad = |e: serde_json::Error| Error::Data { path: dir.join("state.json"), msg: e.to_string() };
        shuffler = serde_json::from_value(state["shuffler"].clone()).map_err(bad)?;
        kl_ctl = serde_json::from_value(state["kl_controller"].clone()).map_err(bad)?;
        start = step;
        tracing::info!(step, "resuming ppo from checkpoint");
    }

    let est = estimator(ppo.kl_estimator);
    let (pad, eos_ids, device) = {
        let l = parts.policy()?;
        (l.pad(), l.tok.eos_ids.clone(), l.pm.base.device)
    };
    let t0 = Instant::now();
    let mut last = serde_json::Map::new();
    for it in start..ppo.iterations {
        let ti = Instant::now();
        let bytes_before = parts.bytes();
        // The global batch; this rank rolls out every world-th row of it.
        let idx = shuffler.next_batch(ppo.rollout_batch, prompts.len());
        let b_all = idx.len();
        let rows = dist::shard(&(0..b_all).collect::<Vec<_>>(), rank, world);
        let batch_prompts: Vec<Vec<i64>> = rows.iter().map(|&r| prompts[idx[r]].clone()).collect();
        let batch_gold: Vec<String> = rows.iter().map(|&r| gold[idx[r]].clone()).collect();

        // 1. Rollout with the policy.
        parts.policy_pm()?.set_active(Some(POLICY))?;
        let opts = GenerateOptions {
            max_new_tokens: ppo.max_new_tokens,
            sampling: Sampling { temperature: ppo.temperature, top_p: ppo.top_p, top_k: ppo.top_k, seed: job.seed.wrapping_mul(1_000_003).wrapping_add(it as u64) },
            eos_ids: eos_ids.clone(),
            pad_id: pad,
        };
        let gen = {
            let pm = &parts.policy()?.pm;
            generate_rows(&pm.base, pm.hooks(), &batch_prompts, &opts, &rows.iter().map(|&r| r as u64).collect::<Vec<_>>())?
        };
        let t_gen = ti.elapsed().as_secs_f64();
        let batch = Batch::new(&batch_prompts, &gen.tokens, pad, device);
        let has_eos: Vec<bool> = gen.tokens.iter().map(|r| r.last().is_some_and(|t| eos_ids.contains(t))).collect();

        // 2. Old log-probs: the sampled tokens' own, from generation (as
        // TRL); reference log-probs with the adapters off.
        let t = Instant::now();
        let logp_old = batch.response_values(&gen.logprobs);
        parts.policy_pm()?.set_active(None)?;
        let ref_logp = logprobs(&parts.policy()?.pm, &batch, ppo.temperature)?;
        let t_ref = t.elapsed().as_secs_f64();
        // 3. Scores (reward role or rule) and values (critic role).
        let t = Instant::now();
        let raw_score = match &ppo.reward {
            RewardSource::Model { .. } => parts.call_one(RoleOp::Scores(batch.to(device)), "scores")?,
            rule => rule_scores(parts.policy()?, rule, &template, &gen.tokens, &batch_gold)?,
        };
        let t_reward = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let values_old = parts.call_one(RoleOp::Values(batch.to(device)), "values")?;
        let t_values = t.elapsed().as_secs_f64();

        // 4. KL-penalised rewards, GAE, whitening.
        let has_eos_t = Tensor::from_slice(&has_eos.iter().map(|&b| b as u8).collect::<Vec<_>>()).to_kind(Kind::Bool).to_device(device);
        let score = match ppo.missing_eos_penalty {
            Some(p) => apply_missing_eos_penalty(&raw_score, &has_eos_t, p),
            None => raw_score.shallow_clone(),
        };
        let score = clip_score(&score, ppo.reward_clip);
        let mask = &batch.mask;
        let (rewards, kl) = penalized_rewards(&score, &logp_old, &ref_logp, mask, kl_ctl.coef(), est);
        let (adv, returns) = gae(&rewards, &values_old, mask, ppo.gamma, ppo.lam);
        let adv = match (ppo.whiten_advantages, world) {
            (false, _) => adv,
            (true, 1) => masked_whiten(&adv, mask, true),
            (true, _) => shard::whiten_across(ctx.dist, &adv, mask)?,
        };
        let tokens_of = shard::row_tokens(ctx.dist, &rows, mask, b_all)?;

        // 5. PPO epochs over minibatches: policy here, critic on its host.
        let t = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(job.seed ^ (it as u64).wrapping_mul(0x9E37_79B9));
        let (mut pg_sum, mut vf_sum, mut cf_sum, mut ent_sum, mut gn_sum, mut approx_sum, mut n_mb) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0usize);
        for _ in 0..ppo.ppo_epochs {
            let mut order: Vec<usize> = (0..b_all).collect();
            order.shuffle(&mut rng);
            for mb in order.chunks(ppo.minibatch) {
                // This rank's rows of the minibatch; their losses weigh their share of its tokens.
                let (local, share) = shard::minibatch_part(mb, rank, world, &tokens_of);
                let sel = Tensor::from_slice(&local).to_device(device);
                let pick = |x: &Tensor| x.index_select(0, &sel);
                let sub = (!local.is_empty()).then(|| batch.select(&local));
                let mut stats = [0.0; 4];
                if let Some(sub) = &sub {
                    parts.policy_pm()?.set_active(Some(POLICY))?;
                    let pm = &parts.policy()?.pm;
                    let (old, adv) = (pick(&logp_old), pick(&adv));
                    stats = sub.train_step(pm, ppo.gradient_checkpointing, |hidden| {
                        backprop_through_head(pm, hidden, &sub.response, ppo.temperature, true, |logp_new, ent| {
                            let pg = policy_loss(logp_new, &old, &adv, &sub.mask, ppo.clip);
                            let part = &pg.loss * share;
                            let ent = ent.map_or(f64::NAN, |e| scalar(&masked_mean(e, &sub.mask)));
                            let stats = [scalar(&part), scalar(&pg.clip_frac) * share, scalar(&pg.approx_kl) * share, ent * share];
                            Ok((part, stats))
                        })
                    })?;
                }
                let (gn, stats) = policy_opt.step_across(ctx.dist, &stats, ppo.max_grad_norm, ppo.lr)?;
                let value_loss = match &mut parts.host {
                    Some(h) => {
                        let part = sub.as_ref().map(|s| (s, pick(&values_old), pick(&returns)));
                        h.critic_step_part(part.as_ref().map(|(s, v, r)| (*s, v, r)), share, &ppo, ctx.dist)?.0
                    }
                    None => {
                        let sub = sub.as_ref().ok_or_else(|| Error::AdapterState("empty minibatch".into()))?;
                        let critic = parts.call(RoleOp::CriticStep { batch: sub.to(device), values_old: pick(&values_old), returns: pick(&returns) })?;
                        critic.iter().find(|(k, _)| k == "value_loss").map_or(f64::NAN, |(_, t)| scalar(t))
                    }
                };
                vf_sum += value_loss;
                pg_sum += stats[0];
                cf_sum += stats[1];
                approx_sum += stats[2];
                ent_sum += stats[3];
                gn_sum += gn;
                n_mb += 1;
            }
        }
        let t_train = t.elapsed().as_secs_f64();

        // 6. Bookkeeping.
        // Batch-wide sums (over every rank's rows).
        let total = |t: &Tensor| scalar(&t.sum(Kind::Float));
        let g = shard::sum_across(
            ctx.dist,
            &[
                total(&raw_score),
                total(&raw_score.square()),
                total(&score),
                total(&kl),
                batch.lens.iter().sum::<usize>() as f64,
                total(&apply_mask(&adv, mask)),
                total(mask),
                batch_prompts.iter().map(Vec::len).sum::<usize>() as f64,
            ],
        )?;
        let n_rows = b_all as f64;
        let kl_seq = g[3] / n_rows;
        kl_ctl.update(kl_seq, b_all);
        let n = n_mb.max(1) as f64;
        let tokens = g[7] + g[4];
        let secs = ti.elapsed().as_secs_f64();
        let reward_mean = g[0] / n_rows;
        let rec = fields! {
            "reward_mean" => reward_mean,
            "reward_std" => if b_all > 1 { ((g[1] - n_rows * reward_mean * reward_mean).max(0.0) / (n_rows - 1.0)).sqrt() } else { 0.0 },
            "score_mean" => g[2] / n_rows,
            "kl" => kl_seq,
            "kl_coef" => kl_ctl.coef(),
            "entropy" => ent_sum / n,
            "clip_frac" => cf_sum / n,
            "approx_kl" => approx_sum / n,
            "policy_loss" => pg_sum / n,
            "value_loss" => vf_sum / n,
            "grad_norm" => gn_sum / n,
            "response_len" => g[4] / n_rows,
            "advantage_mean" => g[5] / g[6].max(1e-8),
            "tokens_per_s" => tokens / secs,
            "time_generate" => t_gen,
            "time_reference" => t_ref,
            "time_reward" => t_reward,
            "time_values" => t_values,
            "time_train" => t_train,
            "bytes_exchanged" => parts.bytes() - bytes_before,
        };
        last = rec.clone();
        ctx.metrics.log(it + 1, ppo.iterations, rec)?;
        let done = it + 1;
        if job.checkpoint.every > 0 && done % job.checkpoint.every == 0 && done < ppo.iterations && rank == 0 {
            let Parts { host, own, remote, .. } = &mut parts;
            let pm = match (own.as_ref(), host.as_ref()) {
                (Some(l), _) | (None, Some(RoleHost { l, .. })) => &l.pm,
                (None, None) => return Err(Error::AdapterState("no policy model".into())),
            };
            let ck = Checkpoint {
                adapters: vec![(POLICY, pm.adapter(POLICY)?)],
                tensors: Vec::new(),
                optimizers: vec![(POLICY, &policy_opt)],
                state: json!({ "step": done, "shuffler": shuffler, "kl_controller": kl_ctl }),
            };
            checkpoint::save_with(ctx.out, done, "", &ck, job.checkpoint.keep, &mut |dir: &Path| match (host.as_ref(), remote.as_mut()) {
                (Some(h), _) => h.checkpoint(dir),
                (None, Some(r)) => r.call(RoleOp::Checkpoint { dir: dir.display().to_string() }).map(|_| ()),
                (None, None) => Ok(()),
            })?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let dir = ctx.out.join("adapter");
    if ctx.writes() {
        let base_name = parts.policy()?.model_dir.display().to_string();
        peft::io::save(parts.policy()?.pm.adapter(POLICY)?, &dir, &base_name)?;
        parts.call(RoleOp::SaveCritic { dir: ctx.out.join(CRITIC).display().to_string() })?;
    }
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| "ppo".into()),
        kind: "ppo".into(),
        method: job.peft.as_ref().map(|p| p.method),
        adapter: Some(dir),
        trainable_params: trainable,
        base_params: base_parameters(&parts.policy()?.pm.base),
        train_seconds: secs,
        steps: ppo.iterations,
        final_metrics: last,
        ..Outcome::default()
    })
}
