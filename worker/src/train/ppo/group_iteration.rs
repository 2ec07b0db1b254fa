//! One GRPO or RLOO iteration over the same [`Roles`] PPO uses, on a
//! rollout whose rows come in groups of `num_generations` completions of
//! one prompt (consecutive rows of the global batch): rewards (every reward
//! function of the job), group advantages, then policy steps over
//! minibatches. No critic and no values; GRPO takes no reference pass at
//! all when β = 0, RLOO subtracts `β · Σ (log π_old − log π_ref)` from the
//! reward. The math is [`super::group`].

use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlhf_common::spec::{GroupSpec, PpoSpec};
use serde_json::{Map, Value};
use tch::{Kind, Tensor};

use super::group::{grpo_advantages, grpo_loss, rloo_advantages, rloo_loss, Clip};
use super::iteration::{score_rollout, Generated, PolicyState, Prompts, Roles, Rollout, Scorer};
use super::rollout::{logprobs, Batch};
use super::shard::{gather, sum_across};
use crate::error::Result;
use crate::fields;
use crate::parallel::Collective;
use crate::train::logprobs::backprop_through_head;
use rlhf_model::sync;

/// GRPO or RLOO, with its options.
pub struct Group<'a> {
    pub spec: &'a GroupSpec,
    pub rloo: bool,
}

/// Runs one iteration; returns its metrics record and this rank's raw scores.
#[allow(clippy::too_many_arguments)]
pub fn run(
    roles: &mut dyn Roles,
    ppo: &PpoSpec,
    group: &Group<'_>,
    state: &mut PolicyState,
    prompts: &Prompts<'_>,
    generated: &Generated,
    scorer: &Scorer<'_>,
    rollout: &Rollout,
    dist: &mut dyn Collective,
) -> Result<(Map<String, Value>, Vec<f32>)> {
    let ti = Instant::now();
    let (gen, t_gen) = (&generated.gen, generated.secs);
    let (rank, world) = (dist.rank(), dist.world());
    let b_all = prompts.global;
    let g = group.spec.num_generations as i64;
    let beta = group.spec.beta_for(group.rloo);
    let clip = Clip { low: group.spec.epsilon, high: group.spec.epsilon_high() };

    let device = roles.policy()?.base.device;
    let batch = Batch::new(prompts.ids, &gen.tokens, rollout.pad, device);
    let has_eos: Vec<bool> = gen.tokens.iter().map(|r| r.last().is_some_and(|t| rollout.eos_ids.contains(t))).collect();
    let logp_old = batch.response_values(&gen.logprobs);
    let t = Instant::now();
    let ref_logp = match beta != 0.0 {
        true => Some(batch.by_parts(ppo.forward_rows(), |part| logprobs(roles.reference()?, part, ppo.temperature))?),
        false => None,
    };
    sync(device);
    let t_ref = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let (raw_score, parts) = score_rollout(roles, ppo, prompts, gen, &has_eos, scorer, rollout, &batch)?;
    sync(device);
    let t_reward = t.elapsed().as_secs_f64();

    // Rewards of the whole batch (groups may span ranks), advantages, and
    // this rank's rows of them.
    let score = raw_score.to_kind(Kind::Float).to_device(tch::Device::Cpu);
    let kl_rows = match (&ref_logp, group.rloo) {
        (Some(r), true) => {
            ((&logp_old - r) * &batch.mask).sum_dim_intlist(1, false, Kind::Float).to_device(tch::Device::Cpu)
        }
        _ => Tensor::zeros([prompts.ids.len() as i64], (Kind::Float, tch::Device::Cpu)),
    };
    let reward = score - &kl_rows * beta;
    let all = gather(dist, prompts.rows, &reward, b_all)?;
    let adv_all = match group.rloo {
        true => rloo_advantages(&all, g, group.spec.normalize_advantages),
        false => grpo_advantages(&all, g, &group.spec.scale_rewards),
    };
    let mine = Tensor::from_slice(&prompts.rows.iter().map(|&r| r as i64).collect::<Vec<_>>());
    let adv = adv_all.index_select(0, &mine).to_device(device);
    let mask = match group.spec.mask_truncated_completions {
        true => {
            let ended = has_eos.iter().map(|&e| e as u8 as f32).collect::<Vec<_>>();
            &batch.mask * Tensor::from_slice(&ended).to_device(device).unsqueeze(1)
        }
        false => batch.mask.shallow_clone(),
    };
    let row_tokens = gather(dist, prompts.rows, &mask.sum_dim_intlist(1, false, Kind::Float), b_all)?;
    let row_tokens: Vec<f32> = Vec::try_from(&row_tokens)?;
    let all_tokens: f64 = row_tokens.iter().map(|&x| f64::from(x)).sum();

    // Policy steps over minibatches of the global batch.
    let t = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(rollout.seed ^ (rollout.it as u64).wrapping_mul(0x9E37_79B9));
    let (mut loss_sum, mut clipped_sum, mut kl_sum, mut grad_sum, mut steps) = (0.0, 0.0, 0.0, 0.0, 0usize);
    for _ in 0..ppo.ppo_epochs {
        let mut order: Vec<usize> = (0..b_all).collect();
        order.shuffle(&mut rng);
        for mb in order.chunks(ppo.minibatch) {
            let local: Vec<i64> = mb.iter().filter(|&&p| p % world == rank).map(|&p| (p / world) as i64).collect();
            // The minibatch's denominator, the same on every rank.
            let denom = match (group.rloo, group.spec.loss_type.as_str()) {
                (true, _) | (false, "grpo") => mb.len() as f64,
                (false, "dr_grpo") => (mb.len() * ppo.max_new_tokens) as f64,
                // dapo: the generation batch's tokens, scaled to one minibatch (as TRL
                // scales num_items_in_batch by accumulation / steps per generation).
                _ => (all_tokens * mb.len() as f64 / b_all as f64).max(1.0),
            };
            let mut stats = [0.0; 3];
            if !local.is_empty() {
                let sub = batch.select(&local);
                let sel = Tensor::from_slice(&local).to_device(device);
                let pick = |x: &Tensor| x.index_select(0, &sel);
                let (old, a, m) = (pick(&logp_old), pick(&adv), pick(&mask));
                let reference = ref_logp.as_ref().map(pick);
                let pm = roles.policy()?;
                stats = sub.train_step(pm, ppo.gradient_checkpointing, |hidden| {
                    backprop_through_head(pm, hidden, &sub.response, ppo.temperature, false, |logp_new, _| {
                        let out = match group.rloo {
                            true => rloo_loss(logp_new, &old, &a, &m, clip, denom),
                            false => grpo_loss(
                                logp_new,
                                &old,
                                reference.as_ref(),
                                &a,
                                &m,
                                clip,
                                beta,
                                group.spec.use_bias_correction_kl,
                                &group.spec.loss_type,
                                denom,
                            ),
                        };
                        let stats = [out.loss.double_value(&[]), out.clipped, out.kl];
                        Ok((out.loss, stats))
                    })
                })?;
            }
            let (grad_norm, summed) = state.opt.step_across(dist, &stats, ppo.max_grad_norm, ppo.lr)?;
            loss_sum += summed[0];
            clipped_sum += summed[1];
            kl_sum += summed[2];
            grad_sum += grad_norm;
            steps += 1;
        }
    }
    sync(device);
    let t_train = t.elapsed().as_secs_f64();

    let n = b_all as f64;
    let all_v: Vec<f32> = Vec::try_from(&all)?;
    let mean = all_v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let std = (all_v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0)).sqrt();
    let groups = all.view([-1, g]);
    let zero_std = groups.std_dim(1, true, false).le(1e-6).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    let raw_all = gather(dist, prompts.rows, &raw_score, b_all)?;
    let kl_all = gather(dist, prompts.rows, &kl_rows, b_all)?;
    let resp_tokens = sum_across(dist, &[batch.lens.iter().sum::<usize>() as f64])?[0];
    let part_sums: Vec<f64> =
        parts.iter().map(|(_, t)| t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[])).collect();
    let part_sums = sum_across(dist, &part_sums)?;
    let epochs = ppo.ppo_epochs.max(1) as f64;
    let per_step = steps.max(1) as f64;
    let mut record = fields! {
        "reward_mean" => raw_all.mean(Kind::Double).double_value(&[]),
        "reward_std" => std,
        "score_mean" => mean,
        "frac_reward_zero_std" => zero_std,
        "kl" => match (group.rloo, beta != 0.0) {
            (true, true) => kl_all.sum(Kind::Double).double_value(&[]) / n,
            (false, true) => kl_sum / (all_tokens.max(1.0) * epochs),
            _ => f64::NAN,
        },
        "policy_loss" => loss_sum / per_step,
        "clip_ratio" => clipped_sum / (if group.rloo { n } else { all_tokens.max(1.0) } * epochs),
        "grad_norm" => grad_sum / per_step,
        "response_len" => resp_tokens / n,
        "time_generate" => t_gen,
        "time_reference" => t_ref,
        "time_reward" => t_reward,
        "time_train" => t_train,
        "tokens_per_s" => resp_tokens / (ti.elapsed().as_secs_f64() + t_gen),
    };
    if parts.len() > 1 {
        for ((name, _), sum) in parts.iter().zip(part_sums) {
            record.insert(name.clone(), serde_json::json!(sum / n));
        }
    }
    let raw_scores: Vec<f32> = Vec::try_from(raw_score.to_kind(Kind::Float).to_device(tch::Device::Cpu))?;
    Ok((record, raw_scores))
}
