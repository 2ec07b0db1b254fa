//! The `ppo` stage. Policy, reference, reward model and critic are views of
//! one base: the policy adapter (trainable), the base with adapters off
//! (reference), and a [`RoleHost`] holding the reward adapter + head and the
//! critic adapter + value head. Colocated, all four share one base on this
//! device; with the roles placed on another worker, the host is remote and
//! only token ids and per-token floats cross the wire. Rollout workers, when
//! the job has them, generate each batch with a copy of the policy adapter
//! ([`generation`](super::generation)).

use std::path::Path;
use std::time::Instant;

use rlhf_common::spec::{JobKind, JobSpec, PpoSpec, RewardSource};
use rlhf_common::Role;
use serde_json::json;
use tch::Tensor;

use super::generation::{Rollouts, Ticket, Trainer};
use super::group_iteration::{self, Group};
use super::iteration::{self, PolicyState, Prompts, Roles, Rollout, Scorer};
use super::prompts::{held_out_scores, PromptSet};
use super::rewards::{Response, Rules};
use super::roles::{RemoteRoles, RoleHost, RoleOp};
use super::rollout::Batch;
use super::rollout_host::RolloutOp;
use crate::data::Shuffler;
use crate::error::{Error, Result};
use crate::parallel::{self, Collective};
use crate::train::checkpoint::{self, Checkpoint};
use crate::train::setup::{load_base, Loaded};
use crate::train::stage::{Ctx, Outcome};
use rlhf_model::peft::{self, base_parameters, Adapter, PeftConfig, PeftModel};
use rlhf_model::{GenerateOptions, Sampling, Tokenizer};

/// Where the trainer's roles live.
// One per job: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Parts<'r> {
    /// Policy, reference, reward and critic on this worker's one base (the
    /// host carries the policy adapter too); rollout workers, if any, reached
    /// through `rollout`.
    Colocated { host: RoleHost, ppo: PpoSpec, rollout: Option<&'r mut (dyn RemoteRoles + 'static)> },
    /// Policy and reference on this worker's base; reward and critic on
    /// another worker (and rollout workers, if any, through the same handle).
    Remote { own: Loaded, remote: &'r mut (dyn RemoteRoles + 'static) },
}

impl Trainer for Parts<'_> {
    fn remote(&mut self) -> Option<&mut (dyn RemoteRoles + 'static)> {
        match self {
            Parts::Colocated { rollout, .. } => rollout.as_deref_mut(),
            Parts::Remote { remote, .. } => Some(&mut **remote),
        }
    }

    fn policy_adapter(&self) -> Result<&dyn Adapter> {
        Ok(self.loaded().pm.adapter(Role::Policy.name())?)
    }
}

impl Parts<'_> {
    fn loaded(&self) -> &Loaded {
        match self {
            Parts::Colocated { host, .. } => &host.model,
            Parts::Remote { own, .. } => own,
        }
    }

    fn pm_mut(&mut self) -> &mut PeftModel {
        match self {
            Parts::Colocated { host, .. } => &mut host.model.pm,
            Parts::Remote { own, .. } => &mut own.pm,
        }
    }

    /// Runs `op` on the reward/critic host, wherever it is.
    fn call(&mut self, op: RoleOp) -> Result<Vec<(String, Tensor)>> {
        match self {
            Parts::Colocated { host, ppo, .. } => host.serve(op, ppo),
            Parts::Remote { remote, .. } => remote.call(op),
        }
    }

    fn call_one(&mut self, op: RoleOp, name: &str) -> Result<Tensor> {
        let device = self.loaded().pm.base.device;
        let out = self.call(op)?;
        out.into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.to_device(device))
            .ok_or_else(|| Error::InvalidArgument(format!("role reply lacks {name}")))
    }
}

impl Roles for Parts<'_> {
    fn policy(&mut self) -> Result<&PeftModel> {
        let pm = self.pm_mut();
        pm.set_active(Some(Role::Policy.name()))?;
        Ok(pm)
    }

    fn reference(&mut self) -> Result<&PeftModel> {
        let pm = self.pm_mut();
        pm.set_active(None)?;
        Ok(pm)
    }

    fn scores(&mut self, batch: &Batch) -> Result<Tensor> {
        match self {
            Parts::Colocated { host, .. } => host.model_scores(batch),
            Parts::Remote { .. } => self.call_one(RoleOp::Scores(batch.to(tch::Device::Cpu)), "scores"),
        }
    }

    fn values(&mut self, batch: &Batch) -> Result<Tensor> {
        match self {
            Parts::Colocated { host, .. } => host.values(batch),
            Parts::Remote { .. } => self.call_one(RoleOp::Values(batch.to(tch::Device::Cpu)), "values"),
        }
    }

    fn critic_step(
        &mut self,
        part: Option<(&Batch, Tensor, Tensor)>,
        share: f64,
        ppo: &PpoSpec,
        dist: &mut dyn Collective,
    ) -> Result<f64> {
        match self {
            Parts::Colocated { host, .. } => {
                Ok(host.critic_step_part(part.as_ref().map(|(s, v, r)| (*s, v, r)), share, ppo, dist)?.0)
            }
            Parts::Remote { .. } => {
                let (sub, values_old, returns) =
                    part.ok_or_else(|| Error::InvalidArgument("empty minibatch".into()))?;
                let out = self.call(RoleOp::CriticStep { batch: sub.to(tch::Device::Cpu), values_old, returns })?;
                Ok(out.iter().find(|(k, _)| k == "value_loss").map_or(f64::NAN, |(_, t)| t.double_value(&[])))
            }
        }
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        Some(&self.loaded().tok)
    }

    fn bytes(&self) -> u64 {
        match self {
            Parts::Colocated { rollout, .. } => rollout.as_ref().map_or(0, |r| r.bytes()),
            Parts::Remote { remote, .. } => remote.bytes(),
        }
    }
}

/// What the sampled answers are, for seeing reward hacking: the share that
/// is a valid answer of the task (`valid_share`) and correct
/// (`sample_accuracy`), and the mean raw score of the correct and of the
/// other responses (`score_correct`, `score_wrong`; NaN when there are
/// none), over every rank's rows.
fn answer_stats(
    labels: &[(bool, bool)],
    scores: &[f32],
    dist: &mut dyn Collective,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut sums = [0f64; 5]; // rows, valid, correct, score of the correct, score of the others
    for (&(valid, correct), &s) in labels.iter().zip(scores) {
        sums[0] += 1.0;
        sums[1] += f64::from(u8::from(valid));
        if correct {
            sums[2] += 1.0;
            sums[3] += f64::from(s);
        } else {
            sums[4] += f64::from(s);
        }
    }
    let g = crate::train::ppo::shard::sum_across(dist, &sums)?;
    let (n, valid, correct) = (g[0].max(1.0), g[1], g[2]);
    let mean = |sum: f64, count: f64| if count > 0.0 { sum / count } else { f64::NAN };
    Ok(crate::fields! {
        "valid_share" => valid / n,
        "sample_accuracy" => correct / n,
        "score_correct" => mean(g[3], correct),
        "score_wrong" => mean(g[4], g[0] - correct),
    })
}

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    run_with(job, ctx, None)
}

/// Runs PPO; with `remote`, reward and critic live on another worker.
pub fn run_with(job: &JobSpec, ctx: &mut Ctx<'_>, remote: Option<&mut (dyn RemoteRoles + 'static)>) -> Result<Outcome> {
    let ppo = job.ppo.clone().ok_or_else(|| Error::InvalidArgument("ppo: required".into()))?;
    // GRPO / RLOO: groups of completions per prompt, no critic.
    let group_spec = match job.kind {
        JobKind::Grpo => Some((job.grpo.clone().unwrap_or_default(), false)),
        JobKind::Rloo => Some((job.rloo.clone().unwrap_or_default(), true)),
        _ => None,
    };
    let per_prompt = group_spec.as_ref().map_or(ppo.samples_per_prompt, |(s, _)| s.num_generations);
    let data = job.data.clone().unwrap_or_default();
    let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
    let (rank, world) = (ctx.dist.rank(), ctx.dist.world());
    let mut parts = match remote {
        Some(_) if world > 1 => {
            return Err(Error::InvalidArgument(
                "placement: a data-parallel ppo job keeps reward, critic and rollout on every rank".into(),
            ));
        }
        Some(remote) => {
            // Every rollout worker loads the base at once; a lost one is
            // skipped when the first batch is shared out.
            let init = RolloutOp::Init { spec_toml: job.to_toml() };
            let calls: Vec<u64> =
                (0..remote.rollout_workers()).map(|t| remote.send_rollout(t, &init)).collect::<Result<_>>()?;
            for call in calls {
                match remote.wait_rollout(call) {
                    Ok(_) | Err(Error::RolloutLost { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
            if remote.hosts_reward_critic() {
                remote.call(RoleOp::Init { spec_toml: job.to_toml() })?;
                Parts::Remote { own: load_base(job, ctx.device)?, remote }
            } else {
                Parts::Colocated {
                    host: RoleHost::new(job, &ppo, ctx.device)?,
                    ppo: ppo.clone(),
                    rollout: Some(remote),
                }
            }
        }
        None => Parts::Colocated { host: RoleHost::new(job, &ppo, ctx.device)?, ppo: ppo.clone(), rollout: None },
    };
    {
        let pm = parts.pm_mut();
        let policy = peft::build(PeftConfig::from_spec(peft_spec, job.seed), &pm.base)?;
        pm.add(Role::Policy.name(), policy)?;
    }
    let max_prompt = job.model.max_length.saturating_sub(ppo.max_new_tokens).max(1);
    let set = PromptSet::load(&data, parts.loaded(), max_prompt)?;
    let prompts = &set.ids;
    let reward_fns = ppo.reward_fns();
    let rules = Rules::new(&reward_fns)?;
    if rules.needs_labels() && !set.all_labelled() {
        return Err(Error::InvalidArgument(
            "ppo.reward: a label reward needs FewCLUE prompts (data with a task); use an exact reward for files with an answer column".into(),
        ));
    }
    let model_weight = reward_fns.iter().find(|w| matches!(w.source, RewardSource::Model { .. })).map(|w| w.weight);

    let policy_params = parts.loaded().pm.adapter(Role::Policy.name())?.parameters();
    let trainable = policy_params.iter().map(|t| t.numel() as i64).sum::<i64>();
    if world > 1 {
        parallel::materialize_grads(&policy_params);
        if let Parts::Colocated { host, .. } = &parts {
            parallel::materialize_grads(host.critic_params());
        }
    }
    let mut state = PolicyState::new(policy_params, &ppo);
    let mut shuffler = Shuffler::new(job.seed);
    let mut start = 0;
    if let Some((step, dir)) = checkpoint::latest(ctx.out) {
        checkpoint::restore_adapter(&dir.join(Role::Policy.name()), parts.loaded().pm.adapter(Role::Policy.name())?)?;
        state.opt.load(&dir.join(format!("optimizer-{}.safetensors", Role::Policy)))?;
        parts.call(RoleOp::Restore { dir: dir.display().to_string() })?;
        let st = checkpoint::read_state(&dir)?;
        let bad = |e: serde_json::Error| Error::Data { path: dir.join("state.json"), msg: e.to_string() };
        shuffler = serde_json::from_value(st["shuffler"].clone()).map_err(bad)?;
        state.kl = serde_json::from_value(st["kl_controller"].clone()).map_err(bad)?;
        start = step;
        tracing::info!(step, "resuming ppo from checkpoint");
    }

    let (pad, eos_ids) = (parts.loaded().pad(), parts.loaded().tok.eos_ids.clone());
    // Held-out rule rewards of a greedy policy, before and after (rank 0;
    // the before is kept in held_out.jsonl across a resume).
    let held_out = match rank {
        0 => PromptSet::held_out(&data, parts.loaded(), max_prompt)?,
        _ => None,
    };
    let greedy = GenerateOptions {
        max_new_tokens: ppo.max_new_tokens,
        sampling: Sampling::greedy(),
        eos_ids: eos_ids.clone(),
        pad_id: pad,
        steps: rlhf_model::Steps::Auto,
    };
    let (writes, held_out_file) = (ctx.writes(), ctx.out.join("held_out.jsonl"));
    let held_out_eval = |parts: &mut Parts<'_>, step: usize| -> Result<serde_json::Map<String, serde_json::Value>> {
        let Some(h) = &held_out else { return Ok(Default::default()) };
        parts.pm_mut().set_active(Some(Role::Policy.name()))?;
        let l = parts.loaded();
        let mut m = tch::no_grad(|| held_out_scores(&l.pm, &l.tok, h, &rules, &greedy))?;
        m.insert("step".into(), json!(step));
        if writes {
            crate::train::metrics::append_jsonl(&held_out_file, &m)?;
        }
        Ok(m)
    };
    if start == 0 {
        held_out_eval(&mut parts, 0)?;
    }
    // Iteration `it`'s batch: the global batch's indices and this rank's
    // rows of it (every world-th).
    let plan = |shuffler: &mut Shuffler, it: usize| {
        let idx: Vec<usize> = shuffler
            .next_batch(ppo.rollout_batch / per_prompt, prompts.len())
            .into_iter()
            .flat_map(|i| std::iter::repeat_n(i, per_prompt))
            .collect();
        let rows = parallel::shard(&(0..idx.len()).collect::<Vec<_>>(), rank, world);
        let ids: Vec<Vec<i64>> = rows.iter().map(|&r| prompts[idx[r]].clone()).collect();
        let rollout = Rollout { seed: job.seed, it, eos_ids: eos_ids.clone(), pad };
        Planned { idx, rows, ids, rollout }
    };
    let mut rollouts = Rollouts::new(&mut parts);
    // With rollout_ahead: the next batch, generating while this one trains,
    // and the shuffler as it was before drawing it (what a checkpoint keeps).
    let mut ahead: Option<(Planned, Ticket, Shuffler)> = None;
    let t0 = Instant::now();
    let mut last = serde_json::Map::new();
    for it in start..ppo.iterations {
        let bytes_before = parts.bytes();
        let (p, ticket) = match ahead.take() {
            Some((p, ticket, _)) => (p, ticket),
            None => {
                let p = plan(&mut shuffler, it);
                let ticket = rollouts.start(&mut parts, &ppo, &p.prompts(), &p.rollout)?;
                (p, ticket)
            }
        };
        let generated = rollouts.finish(&mut parts, &ppo, ticket, &p.rollout)?;
        if ppo.rollout_ahead > 0 && it + 1 < ppo.iterations {
            let before = shuffler.clone();
            let next = plan(&mut shuffler, it + 1);
            let ticket = rollouts.start(&mut parts, &ppo, &next.prompts(), &next.rollout)?;
            ahead = Some((next, ticket, before));
        }
        let rule = |tok: &Tokenizer, responses: &[Vec<i64>]| -> Result<iteration::RuleScores> {
            let texts = responses.iter().map(|r| tok.decode(r, true)).collect::<std::result::Result<Vec<_>, _>>()?;
            let rs: Vec<Response<'_>> = p
                .rows
                .iter()
                .zip(&texts)
                .zip(responses)
                .map(|((&r, text), ids)| {
                    let i = p.idx[r];
                    Response { text, tokens: ids.len(), label_correct: set.label_correct(i, text), row: &set.rows[i] }
                })
                .collect();
            let (total, each) = rules.score(&rs)?;
            Ok((Tensor::from_slice(&total), each))
        };
        let scorer = Scorer { model: model_weight, rule: (!rules.is_empty()).then_some(&rule as &iteration::RuleFn) };
        let (mut rec, scores) = match &group_spec {
            Some((spec, rloo)) => {
                let group = Group { spec, rloo: *rloo };
                let prompts = p.prompts();
                group_iteration::run(
                    &mut parts, &ppo, &group, &mut state, &prompts, &generated, &scorer, &p.rollout, ctx.dist,
                )?
            }
            None => {
                iteration::run(&mut parts, &ppo, &mut state, &p.prompts(), &generated, &scorer, &p.rollout, ctx.dist)?
            }
        };
        if set.all_labelled() {
            let tok = &parts.loaded().tok;
            let labels = p
                .rows
                .iter()
                .zip(&generated.gen.tokens)
                .map(|(&r, ids)| {
                    let (k, g) = set.gold[p.idx[r]].as_ref().expect("all labelled");
                    let label = set.sets[*k].template.label_for_answer(&tok.decode(ids, true)?);
                    Ok((label.is_some(), label == Some(g.as_str())))
                })
                .collect::<Result<Vec<_>>>()?;
            rec.extend(answer_stats(&labels, &scores, ctx.dist)?);
        }
        rec.insert("bytes_exchanged".into(), json!(parts.bytes() - bytes_before));
        if parts.remote().is_some_and(|r| r.rollout_workers() > 0) {
            rec.insert("bytes_adapter_sync".into(), json!(rollouts.take_adapter_bytes()));
            rec.insert("rollout_workers".into(), json!(rollouts.live()));
        }
        last = rec.clone();
        ctx.metrics.log(it + 1, ppo.iterations, rec)?;
        let done = it + 1;
        if job.checkpoint.every > 0 && done % job.checkpoint.every == 0 && done < ppo.iterations && rank == 0 {
            // A batch generated ahead is not kept: a resume draws it again.
            let kept = ahead.as_ref().map_or(&shuffler, |(_, _, before)| before);
            let st = json!({ "step": done, "shuffler": kept, "kl_controller": state.kl });
            save_checkpoint(&mut parts, ctx.out, done, &state, st, job.checkpoint.keep)?;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let end = held_out_eval(&mut parts, ppo.iterations)?;
    for (k, v) in end {
        if k != "step" {
            last.insert(k, v);
        }
    }
    let dir = ctx.out.join("adapter");
    if ctx.writes() {
        let base_name = parts.loaded().model_dir.display().to_string();
        peft::io::save(parts.loaded().pm.adapter(Role::Policy.name())?, &dir, &base_name)?;
        parts.call(RoleOp::SaveCritic { dir: ctx.out.join(Role::Critic.name()).display().to_string() })?;
    }
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| job.kind.name().into()),
        kind: job.kind.name().into(),
        method: job.peft.as_ref().map(|p| p.method),
        adapter: Some(dir),
        trainable_params: trainable,
        base_params: base_parameters(&parts.loaded().pm.base),
        train_seconds: secs,
        steps: ppo.iterations,
        final_metrics: last,
        ..Outcome::default()
    })
}

/// One iteration's batch on this rank.
struct Planned {
    /// Indices into the prompts of the global batch.
    idx: Vec<usize>,
    /// This rank's rows of it, and their prompt ids.
    rows: Vec<usize>,
    ids: Vec<Vec<i64>>,
    rollout: Rollout,
}

impl Planned {
    fn prompts(&self) -> Prompts<'_> {
        Prompts { ids: &self.ids, rows: &self.rows, global: self.idx.len() }
    }
}

/// Policy adapter and optimizer, then the critic's state wherever it lives.
fn save_checkpoint(
    parts: &mut Parts<'_>,
    out: &Path,
    step: usize,
    state: &PolicyState,
    st: serde_json::Value,
    keep: usize,
) -> Result<()> {
    match parts {
        Parts::Colocated { host, .. } => {
            let ck = Checkpoint {
                adapters: vec![(Role::Policy.name(), host.model.pm.adapter(Role::Policy.name())?)],
                tensors: Vec::new(),
                optimizers: vec![(Role::Policy.name(), &state.opt)],
                state: st,
            };
            checkpoint::save_with(out, step, "", &ck, keep, &mut |dir: &Path| host.checkpoint(dir)).map(|_| ())
        }
        Parts::Remote { own, remote } => {
            let ck = Checkpoint {
                adapters: vec![(Role::Policy.name(), own.pm.adapter(Role::Policy.name())?)],
                tensors: Vec::new(),
                optimizers: vec![(Role::Policy.name(), &state.opt)],
                state: st,
            };
            checkpoint::save_with(out, step, "", &ck, keep, &mut |dir: &Path| {
                remote.call(RoleOp::Checkpoint { dir: dir.display().to_string() }).map(|_| ())
            })
            .map(|_| ())
        }
    }
}
