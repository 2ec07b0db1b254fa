//! The `ppo` stage on one device: policy, reference, reward model and critic
//! are four views of ONE base — policy and critic adapters (trainable), the
//! reward adapter, and the base itself (adapters off) as the reference.

use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf_common::spec::{JobSpec, KlEstimatorSpec, PpoSpec, RewardSource};
use serde_json::json;
use tch::{Kind, Tensor};

use super::rollout::{logprobs, model_scores, values, Batch};
use super::{apply_missing_eos_penalty, clip_score, entropy_from_logits, gae, masked_mean, masked_whiten, penalized_rewards, policy_loss, value_loss, KlController, KlEstimator};
use crate::data::{Shuffler, Template};
use crate::error::{Error, Result};
use crate::fields;
use crate::model::{generate, GenerateOptions, Sampling};
use crate::peft::{self, base_parameters, PeftConfig, PeftModel};
use crate::train::checkpoint::{self, Checkpoint};
use crate::train::optim::AdamW;
use crate::train::reward::{load_reward_model, Head, HEAD_FILE};
use crate::train::setup::{load_base, task_data, Loaded};
use crate::train::stage::{Ctx, Outcome};

pub const POLICY: &str = "policy";
pub const CRITIC: &str = "critic";
pub const REWARD: &str = "reward";

/// Where scores come from.
pub enum Scorer {
    Model(Head),
    Label(Template),
    Match { text: String, weight: f64 },
}

/// The four roles on one base.
pub struct Roles {
    pub l: Loaded,
    pub value_head: Head,
    pub scorer: Scorer,
}

impl Roles {
    /// Sets up policy, critic and reward on the job's base.
    pub fn new(job: &JobSpec, ppo: &PpoSpec, template: &Template, device: tch::Device) -> Result<Self> {
        let mut l = load_base(job, device)?;
        let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
        let policy = peft::build(PeftConfig::from_spec(peft_spec, job.seed), &l.pm.base)?;
        l.pm.add(POLICY, policy)?;
        let h = l.pm.base.cfg.hidden_size;
        let (scorer, value_head) = match &ppo.reward {
            RewardSource::Model { path } => {
                let dir = path.as_deref().ok_or_else(|| Error::InvalidArgument("ppo.reward.path: required".into()))?;
                let head = load_reward_model(dir, &mut l.pm, REWARD)?;
                // The critic starts as a copy of the reward model (TRL's default).
                let critic = peft::io::load(dir, &l.pm.base)?;
                l.pm.add(CRITIC, critic)?;
                let value_head = Head::load(&dir.join(HEAD_FILE), h, device)?;
                let value_head = Head { weight: value_head.weight.set_requires_grad(true), bias: value_head.bias.set_requires_grad(true) };
                (Scorer::Model(head), value_head)
            }
            other => {
                let critic = peft::build(PeftConfig::from_spec(peft_spec, job.seed.wrapping_add(1)), &l.pm.base)?;
                l.pm.add(CRITIC, critic)?;
                let scorer = match other {
                    RewardSource::Match { text, weight } => Scorer::Match { text: text.clone(), weight: *weight },
                    _ => Scorer::Label(template.clone()),
                };
                (scorer, Head::new(h, device, job.seed.wrapping_add(2)))
            }
        };
        Ok(Self { l, value_head, scorer })
    }

    pub fn pm(&self) -> &PeftModel {
        &self.l.pm
    }

    /// Scores `[b]` of the responses (decoded for rule rewards).
    pub fn scores(&mut self, batch: &Batch, responses: &[Vec<i64>], gold: &[String]) -> Result<Tensor> {
        let device = self.l.pm.base.device;
        match &self.scorer {
            Scorer::Model(head) => {
                self.l.pm.set_active(Some(REWARD))?;
                tch::no_grad(|| model_scores(&self.l.pm, head, batch))
            }
            Scorer::Label(t) => {
                let mut s = Vec::with_capacity(responses.len());
                for (r, g) in responses.iter().zip(gold) {
                    let text = self.l.tok.decode(r, true)?;
                    s.push(if t.label_for_answer(&text) == Some(g.as_str()) { 1f32 } else { 0.0 });
                }
                Ok(Tensor::from_slice(&s).to_device(device))
            }
            Scorer::Match { text, weight } => {
                let mut s = Vec::with_capacity(responses.len());
                for r in responses {
                    let decoded = self.l.tok.decode(r, true)?;
                    s.push((decoded.matches(text.as_str()).count() as f64 * weight) as f32);
                }
                Ok(Tensor::from_slice(&s).to_device(device))
            }
        }
    }
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
    let ppo = job.ppo.clone().ok_or_else(|| Error::InvalidArgument("ppo: required".into()))?;
    let data = job.data.clone().unwrap_or_default();
    let train_path = data.train.clone().ok_or_else(|| Error::InvalidArgument("data.train: required".into()))?;
    let (template, examples) = task_data(&data, &train_path, data.max_examples)?;
    let mut roles = Roles::new(job, &ppo, &template, ctx.device)?;
    let max_prompt = job.model.max_length.saturating_sub(ppo.max_new_tokens).max(1);
    let mut prompts = Vec::with_capacity(examples.len());
    for ex in &examples {
        let mut ids = roles.l.tok.encode(&template.render(ex)?, true)?;
        if ids.len() > max_prompt {
            ids.drain(..ids.len() - max_prompt);
        }
        prompts.push(ids);
    }
    let gold: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
    if prompts.is_empty() {
        return Err(Error::InvalidArgument("data.train: no prompts".into()));
    }

    let policy_params = roles.pm().adapter(POLICY)?.parameters();
    let mut critic_params = roles.pm().adapter(CRITIC)?.parameters();
    critic_params.extend([roles.value_head.weight.shallow_clone(), roles.value_head.bias.shallow_clone()]);
    let trainable = policy_params.iter().map(|t| t.numel() as i64).sum::<i64>();
    let mut policy_opt = AdamW::new(policy_params, 0.0);
    let mut critic_opt = AdamW::new(critic_params, 0.0);
    let mut kl_ctl = match ppo.kl_target {
        Some(target) => KlController::Adaptive { coef: ppo.kl_coef, target, horizon: ppo.kl_horizon },
        None => KlController::Fixed { coef: ppo.kl_coef },
    };
    let mut shuffler = Shuffler::new(job.seed);
    let mut start = 0;
    if let Some((step, dir)) = checkpoint::latest(ctx.out) {
        checkpoint::restore_adapter(&dir.join(POLICY), roles.pm().adapter(POLICY)?)?;
        checkpoint::restore_adapter(&dir.join(CRITIC), roles.pm().adapter(CRITIC)?)?;
        checkpoint::restore_tensors(&dir, &[("value_head.weight", &roles.value_head.weight), ("value_head.bias", &roles.value_head.bias)])?;
        policy_opt.load(&dir.join(format!("optimizer-{POLICY}.safetensors")))?;
        critic_opt.load(&dir.join(format!("optimizer-{CRITIC}.safetensors")))?;
        let state = checkpoint::read_state(&dir)?;
        let bad = |e: serde_json::Error| Error::Data { path: dir.join("state.json"), msg: e.to_string() };
        shuffler = serde_json::from_value(state["shuffler"].clone()).map_err(bad)?;
        kl_ctl = serde_json::from_value(state["kl_controller"].clone()).map_err(bad)?;
        start = step;
        tracing::info!(step, "resuming ppo from checkpoint");
    }

    let est = estimator(ppo.kl_estimator);
    let pad = roles.l.pad();
    let eos_ids = roles.l.tok.eos_ids.clone();
    let t0 = Instant::now();
    let mut last = serde_json::Map::new();
    for it in start..ppo.iterations {
        let ti = Instant::now();
        let idx = shuffler.next_batch(ppo.rollout_batch, prompts.len());
        let batch_prompts: Vec<Vec<i64>> = idx.iter().map(|&i| prompts[i].clone()).collect();
        let batch_gold: Vec<String> = idx.iter().map(|&i| gold[i].clone()).collect();

        // 1. Rollout with the policy.
        roles.l.pm.set_active(Some(POLICY))?;
        let opts = GenerateOptions {
            max_new_tokens: ppo.max_new_tokens,
            sampling: Sampling { temperature: ppo.temperature, top_p: ppo.top_p, top_k: ppo.top_k, seed: job.seed.wrapping_mul(1_000_003).wrapping_add(it as u64) },
            eos_ids: eos_ids.clone(),
            pad_id: pad,
        };
        let gen = generate(&roles.l.pm.base, roles.l.pm.hooks(), &batch_prompts, &opts)?;
        let t_gen = ti.elapsed().as_secs_f64();
        let batch = Batch::new(&batch_prompts, &gen.tokens, pad, ctx.device);
        let has_eos: Vec<bool> = gen.tokens.iter().map(|r| r.last().is_some_and(|t| eos_ids.contains(t))).collect();

        // 2. Old log-probs (policy), reference log-probs (adapters off), values, scores.
        let t = Instant::now();
        let logp_old = tch::no_grad(|| logprobs(roles.pm(), &batch, ppo.temperature))?.0;
        roles.l.pm.set_active(None)?;
        let ref_logp = tch::no_grad(|| logprobs(roles.pm(), &batch, ppo.temperature))?.0;
        let t_ref = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let raw_score = roles.scores(&batch, &gen.tokens, &batch_gold)?;
        let t_reward = t.elapsed().as_secs_f64();
        let t = Instant::now();
        roles.l.pm.set_active(Some(CRITIC))?;
        let values_old = tch::no_grad(|| values(roles.pm(), &roles.value_head, &batch))?;
        let t_values = t.elapsed().as_secs_f64();

        // 3. KL-penalised rewards, GAE, whitening.
        let has_eos_t = Tensor::from_slice(&has_eos.iter().map(|&b| b as u8).collect::<Vec<_>>()).to_kind(Kind::Bool).to_device(ctx.device);
        let score = match ppo.missing_eos_penalty {
            Some(p) => apply_missing_eos_penalty(&raw_score, &has_eos_t, p),
            None => raw_score.shallow_clone(),
        };
        let score = clip_score(&score, ppo.reward_clip);
        let mask = &batch.mask;
        let (rewards, kl) = penalized_rewards(&score, &logp_old, &ref_logp, mask, kl_ctl.coef(), est);
        let (adv, returns) = gae(&rewards, &values_old, mask, ppo.gamma, ppo.lam);
        let adv = if ppo.whiten_advantages { masked_whiten(&adv, mask, true) } else { adv };

        // 4. PPO epochs over minibatches.
        let t = Instant::now();
        let b = batch.rows();
        let mut rng = ChaCha8Rng::seed_from_u64(job.seed ^ (it as u64).wrapping_mul(0x9E37_79B9));
        let (mut pg_sum, mut vf_sum, mut cf_sum, mut ent_sum, mut gn_sum, mut approx_sum, mut n_mb) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0usize);
        for _ in 0..ppo.ppo_epochs {
            let mut order: Vec<i64> = (0..b).collect();
            order.shuffle(&mut rng);
            for mb in order.chunks(ppo.minibatch) {
                let sub = batch.select(mb);
                let sel = Tensor::from_slice(mb).to_device(ctx.device);
                let pick = |x: &Tensor| x.index_select(0, &sel);
                roles.l.pm.set_active(Some(POLICY))?;
                let (logp_new, logits) = logprobs(roles.pm(), &sub, ppo.temperature)?;
                let pg = policy_loss(&logp_new, &pick(&logp_old), &pick(&adv), &sub.mask, ppo.clip);
                roles.l.pm.set_active(Some(CRITIC))?;
                let v_new = values(roles.pm(), &roles.value_head, &sub)?;
                let vf = value_loss(&v_new, &pick(&values_old), &pick(&returns), &sub.mask, ppo.value_clip);
                let loss = &pg.loss + &vf.loss * ppo.vf_coef;
                loss.backward();
                let gn = policy_opt.clip_grad_norm(ppo.max_grad_norm);
                critic_opt.clip_grad_norm(ppo.max_grad_norm);
                policy_opt.step(ppo.lr);
                critic_opt.step(ppo.critic_lr);
                policy_opt.zero_grad();
                critic_opt.zero_grad();
                ent_sum += tch::no_grad(|| scalar(&entropy_from_logits(&logits, &sub.mask)));
                pg_sum += scalar(&pg.loss);
                vf_sum += scalar(&vf.loss);
                cf_sum += scalar(&pg.clip_frac);
                approx_sum += scalar(&pg.approx_kl);
                gn_sum += gn;
                n_mb += 1;
            }
        }
        let t_train = t.elapsed().as_secs_f64();

        // 5. Bookkeeping.
        let kl_seq = scalar(&kl.sum_dim_intlist(1, false, Kind::Float).mean(Kind::Float));
        kl_ctl.update(kl_seq, b as usize);
        let n = n_mb.max(1) as f64;
        let tokens: usize = batch_prompts.iter().map(Vec::len).sum::<usize>() + batch.lens.iter().sum::<usize>();
        let secs = ti.elapsed().as_secs_f64();
        let rec = fields! {
            "reward_mean" => scalar(&raw_score.mean(Kind::Float)),
            "reward_std" => if b > 1 { scalar(&raw_score.std(true)) } else { 0.0 },
            "score_mean" => scalar(&score.mean(Kind::Float)),
            "kl" => kl_seq,
            "kl_coef" => kl_ctl.coef(),
            "entropy" => ent_sum / n,
            "clip_frac" => cf_sum / n,
            "approx_kl" => approx_sum / n,
            "policy_loss" => pg_sum / n,
            "value_loss" => vf_sum / n,
            "grad_norm" => gn_sum / n,
            "response_len" => batch.lens.iter().sum::<usize>() as f64 / b as f64,
            "advantage_mean" => scalar(&masked_mean(&adv, mask)),
            "tokens_per_s" => tokens as f64 / secs,
            "time_generate" => t_gen,
            "time_reference" => t_ref,
            "time_reward" => t_reward,
            "time_values" => t_values,
            "time_train" => t_train,
        };
        last = rec.clone();
        ctx.metrics.log(it + 1, ppo.iterations, rec)?;
        let done = it + 1;
        if job.checkpoint.every > 0 && done % job.checkpoint.every == 0 && done < ppo.iterations {
            save_checkpoint(ctx.out, done, &roles, &policy_opt, &critic_opt, &shuffler, &kl_ctl, job.checkpoint.keep)?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let dir = ctx.out.join("adapter");
    let base_name = roles.l.model_dir.display().to_string();
    peft::io::save(roles.pm().adapter(POLICY)?, &dir, &base_name)?;
    let critic_dir = ctx.out.join("critic");
    peft::io::save(roles.pm().adapter(CRITIC)?, &critic_dir, &base_name)?;
    roles.value_head.save(&critic_dir.join(HEAD_FILE))?;
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| "ppo".into()),
        kind: "ppo".into(),
        method: job.peft.as_ref().map(|p| p.method),
        adapter: Some(dir),
        trainable_params: trainable,
        base_params: base_parameters(&roles.l.pm.base),
        train_seconds: secs,
        steps: ppo.iterations,
        final_metrics: last,
        ..Outcome::default()
    })
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(out: &Path, step: usize, roles: &Roles, p: &AdamW, c: &AdamW, shuffler: &Shuffler, kl: &KlController, keep: usize) -> Result<()> {
    let pm = roles.pm();
    let ck = Checkpoint {
        adapters: vec![(POLICY, pm.adapter(POLICY)?), (CRITIC, pm.adapter(CRITIC)?)],
        tensors: vec![
            ("value_head.weight".into(), roles.value_head.weight.shallow_clone()),
            ("value_head.bias".into(), roles.value_head.bias.shallow_clone()),
        ],
        optimizers: vec![(POLICY, p), (CRITIC, c)],
        state: json!({ "step": step, "shuffler": shuffler, "kl_controller": kl }),
    };
    checkpoint::save(out, step, "", &ck, keep)?;
    Ok(())
}
