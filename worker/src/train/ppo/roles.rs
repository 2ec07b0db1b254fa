//! The reward and critic roles as one unit, [`RoleHost`]: the base with the
//! reward adapter + head and the critic adapter + value head, and the
//! critic's optimiser. Colocated, the policy adapter sits on the same base;
//! placed on another worker, the trainer drives it with [`RoleOp`]s that
//! carry only token ids and per-token floats ([`wire`]).

use std::path::Path;

use rlhf_common::spec::{JobSpec, PpoSpec};
use rlhf_common::Role;
use tch::{Kind, Tensor};

use super::rollout::{model_scores, values, Batch};
use super::rollout_host::RolloutOp;
use super::value_loss;
use crate::error::{Error, Result};
use crate::parallel::{Collective, Single};
use crate::train::checkpoint;
use crate::train::optim::AdamW;
use crate::train::setup::{load_base, Loaded};
use rlhf_model::head::{load_reward_model, Head, REWARD_HEAD_FILE, VALUE_HEAD_FILE};
use rlhf_model::peft::{self, PeftConfig, PeftModel};

/// A trainer's handle on its job's roles hosted by other workers: the
/// reward/critic host, rollout workers, or both.
pub trait RemoteRoles: Send {
    /// Whether reward and critic are hosted elsewhere (else they are on
    /// the trainer's base and only rollout workers are remote).
    fn hosts_reward_critic(&self) -> bool;
    /// Runs `op` on the reward/critic host and returns its named tensors.
    fn call(&mut self, op: RoleOp) -> Result<Vec<(String, Tensor)>>;
    /// Rollout workers the job was given (some may be lost since).
    fn rollout_workers(&self) -> usize;
    /// Sends `op` to rollout worker `target` without waiting; returns the
    /// call to wait for.
    fn send_rollout(&mut self, target: usize, op: &RolloutOp) -> Result<u64>;
    /// Waits for a rollout call's tensors; [`Error::RolloutLost`] if its
    /// worker went away.
    fn wait_rollout(&mut self, call: u64) -> Result<Vec<(String, Tensor)>>;
    /// Payload bytes sent and received so far.
    fn bytes(&self) -> u64;
}

pub struct RoleHost {
    pub model: Loaded,
    pub value_head: Head,
    /// Present for a model reward.
    pub reward_head: Option<Head>,
    critic_opt: AdamW,
}

impl RoleHost {
    /// Loads the job's base and puts the critic (and a reward model, if the
    /// job scores with one) on it. The critic starts as a copy of the reward
    /// model (TRL's default), else as a fresh adapter and head (TRL's random
    /// value head). A copy of a reward head whose score adds `c · log p`
    /// (which a linear value head cannot carry) starts at zero instead: in
    /// the paper run such a copy gave a first value loss of 289 against
    /// rewards within 0..2, and `r − V` was the critic's noise, not the
    /// reward's. (A fresh head stays random: at zero, a batch whose rewards
    /// are all equal has nothing but rounding noise in its advantages, and
    /// whitening makes that a full-size step.)
    pub fn new(job: &JobSpec, ppo: &PpoSpec, device: tch::Device) -> Result<Self> {
        let mut model = load_base(job, device)?;
        let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
        let h = model.pm.base.cfg.hidden_size;
        let (reward_head, value_head) = match ppo.model_reward() {
            Some(path) => {
                let dir = path.as_deref().ok_or_else(|| Error::InvalidArgument("ppo.reward.path: required".into()))?;
                let head = load_reward_model(dir, &mut model.pm, Role::Reward.name())?;
                model.pm.add(Role::Critic.name(), peft::io::load(dir, &model.pm.base)?)?;
                let v = Head::load(&dir.join(REWARD_HEAD_FILE), h, device)?;
                let value = match v.lm_scale {
                    None => v.trainable(true),
                    Some(_) => Head::zeros(h, device),
                };
                (Some(head), value)
            }
            None => {
                let critic = peft::build(PeftConfig::from_spec(peft_spec, job.seed.wrapping_add(1)), &model.pm.base)?;
                model.pm.add(Role::Critic.name(), critic)?;
                (None, Head::new(h, device, job.seed.wrapping_add(2)))
            }
        };
        let mut params = model.pm.adapter(Role::Critic.name())?.parameters();
        params.extend([value_head.weight.shallow_clone(), value_head.bias.shallow_clone()]);
        Ok(Self { model, value_head, reward_head, critic_opt: AdamW::new(params, 0.0) })
    }

    pub fn model_scores(&mut self, batch: &Batch) -> Result<Tensor> {
        let head =
            self.reward_head.as_ref().ok_or_else(|| Error::InvalidArgument("this job has no reward model".into()))?;
        self.model.pm.set_active(Some(Role::Reward.name()))?;
        tch::no_grad(|| model_scores(&self.model.pm, head, batch))
    }

    pub fn values(&mut self, batch: &Batch) -> Result<Tensor> {
        self.model.pm.set_active(Some(Role::Critic.name()))?;
        tch::no_grad(|| values(&self.model.pm, &self.value_head, batch))
    }

    /// One critic update on a minibatch: `vf_coef · clipped value loss`.
    /// Returns (value loss, value clip fraction).
    pub fn critic_step(
        &mut self,
        sub: &Batch,
        values_old: &Tensor,
        returns: &Tensor,
        ppo: &PpoSpec,
    ) -> Result<(f64, f64)> {
        self.critic_step_part(Some((sub, values_old, returns)), 1.0, ppo, &mut Single)
    }

    /// The critic parameters (adapter and value head).
    pub fn critic_params(&self) -> &[Tensor] {
        self.critic_opt.params()
    }

    /// [`critic_step`](Self::critic_step) as one data-parallel rank: this
    /// rank's rows of the minibatch (none is fine) weigh `share` of it; the
    /// gradients and statistics are summed over ranks before the update.
    pub fn critic_step_part(
        &mut self,
        part: Option<(&Batch, &Tensor, &Tensor)>,
        share: f64,
        ppo: &PpoSpec,
        dist: &mut dyn Collective,
    ) -> Result<(f64, f64)> {
        self.model.pm.set_active(Some(Role::Critic.name()))?;
        critic_update(&self.model.pm, &self.value_head, &mut self.critic_opt, part, share, ppo, dist)
    }

    /// Writes the critic (adapter + value head) to `dir`.
    pub fn save_critic(&self, dir: &Path, base_name: &str) -> Result<()> {
        peft::io::save(self.model.pm.adapter(Role::Critic.name())?, dir, base_name)?;
        Ok(self.value_head.save(&dir.join(VALUE_HEAD_FILE))?)
    }

    /// Critic state for a checkpoint directory (adapter, head, optimiser).
    pub fn checkpoint(&self, dir: &Path) -> Result<()> {
        self.save_critic(&dir.join(Role::Critic.name()), "")?;
        self.critic_opt.save(&dir.join(format!("optimizer-{}.safetensors", Role::Critic)))
    }

    pub fn restore(&mut self, dir: &Path) -> Result<()> {
        checkpoint::restore_adapter(&dir.join(Role::Critic.name()), self.model.pm.adapter(Role::Critic.name())?)?;
        // Checkpoints written before the value head had its own name keep it
        // under the reward head's.
        let mut file = dir.join(Role::Critic.name()).join(VALUE_HEAD_FILE);
        if !file.exists() {
            file = dir.join(Role::Critic.name()).join(REWARD_HEAD_FILE);
        }
        let head = Head::load(&file, self.model.pm.base.cfg.hidden_size, self.model.pm.base.device)?;
        tch::no_grad(|| -> Result<()> {
            self.value_head.weight.shallow_clone().f_copy_(&head.weight)?;
            self.value_head.bias.shallow_clone().f_copy_(&head.bias)?;
            Ok(())
        })?;
        self.critic_opt.load(&dir.join(format!("optimizer-{}.safetensors", Role::Critic)))
    }

    /// Serves one remote operation.
    pub fn serve(&mut self, op: RoleOp, ppo: &PpoSpec) -> Result<Vec<(String, Tensor)>> {
        let device = self.model.pm.base.device;
        Ok(match op {
            RoleOp::Init { .. } => Vec::new(),
            RoleOp::Scores(b) => vec![("scores".into(), self.model_scores(&b.to(device))?)],
            RoleOp::Values(b) => vec![("values".into(), self.values(&b.to(device))?)],
            RoleOp::CriticStep { batch, values_old, returns } => {
                let (loss, frac) = self.critic_step(
                    &batch.to(device),
                    &values_old.to_device(device),
                    &returns.to_device(device),
                    ppo,
                )?;
                vec![("value_loss".into(), Tensor::from(loss)), ("clip_frac".into(), Tensor::from(frac))]
            }
            RoleOp::SaveCritic { dir } => {
                self.save_critic(Path::new(&dir), "")?;
                Vec::new()
            }
            RoleOp::Checkpoint { dir } => {
                self.checkpoint(Path::new(&dir))?;
                Vec::new()
            }
            RoleOp::Restore { dir } => {
                self.restore(Path::new(&dir))?;
                Vec::new()
            }
        })
    }
}

/// One critic update, `vf_coef · clipped value loss`, with the critic's
/// adapter active on `pm`: this rank's rows of the minibatch (none is fine)
/// weigh `share` of it; gradients and statistics are summed over ranks
/// before the step. Returns (value loss, value clip fraction).
pub fn critic_update(
    pm: &PeftModel,
    head: &Head,
    opt: &mut AdamW,
    part: Option<(&Batch, &Tensor, &Tensor)>,
    share: f64,
    ppo: &PpoSpec,
    dist: &mut dyn Collective,
) -> Result<(f64, f64)> {
    let (mut loss, mut frac) = (0.0, 0.0);
    if let Some((sub, values_old, returns)) = part {
        (loss, frac) = sub.train_step(pm, ppo.gradient_checkpointing, |hidden| {
            let vf = value_loss(&head.forward(hidden), values_old, returns, &sub.mask, ppo.value_clip);
            let scaled = &vf.loss * share;
            Ok((&scaled * ppo.vf_coef, (scaled.double_value(&[]), vf.clip_frac.double_value(&[]) * share)))
        })?;
    }
    let (_, summed) = opt.step_across(dist, &[loss, frac], ppo.max_grad_norm, ppo.critic_lr)?;
    Ok((summed[0], summed[1]))
}

/// What a trainer asks of a remote role host.
pub enum RoleOp {
    /// (Re)builds the host for this resolved PPO job (a pipeline's PPO stage
    /// is only known once the earlier stages have run).
    Init {
        spec_toml: String,
    },
    Scores(Batch),
    Values(Batch),
    CriticStep {
        batch: Batch,
        values_old: Tensor,
        returns: Tensor,
    },
    SaveCritic {
        dir: String,
    },
    Checkpoint {
        dir: String,
    },
    Restore {
        dir: String,
    },
}

impl Batch {
    pub fn to(&self, device: tch::Device) -> Batch {
        Batch {
            ids: self.ids.to_device(device),
            attn: self.attn.to_device(device),
            response: self.response.to_device(device),
            mask: self.mask.to_device(device),
            prompt_width: self.prompt_width,
            lens: self.lens.clone(),
            prompt_of: self.prompt_of.clone(),
        }
    }
}

/// Role operations as named CPU tensors (what crosses the wire).
pub mod wire {
    pub use rlhf_proto::RoleOp as WireOp;

    use super::*;

    fn lens_tensor(b: &Batch) -> Tensor {
        Tensor::from_slice(&b.lens.iter().map(|&n| n as i64).collect::<Vec<_>>())
    }

    fn batch_tensors(b: &Batch) -> Vec<(String, Tensor)> {
        let cpu = |t: &Tensor| t.to_device(tch::Device::Cpu);
        vec![
            ("ids".into(), cpu(&b.ids)),
            ("attn".into(), cpu(&b.attn)),
            ("response".into(), cpu(&b.response)),
            ("mask".into(), cpu(&b.mask)),
            ("prompt_width".into(), Tensor::from(b.prompt_width)),
            ("lens".into(), lens_tensor(b)),
        ]
    }

    fn take(ts: &mut Vec<(String, Tensor)>, name: &str) -> Result<Tensor> {
        let i = ts
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| Error::InvalidArgument(format!("role call: tensor {name} missing")))?;
        Ok(ts.swap_remove(i).1)
    }

    fn batch_from(ts: &mut Vec<(String, Tensor)>) -> Result<Batch> {
        let lens: Vec<i64> = Vec::try_from(&take(ts, "lens")?)?;
        let ids = take(ts, "ids")?;
        let prompt_width = take(ts, "prompt_width")?.int64_value(&[]);
        if ids.dim() != 2 || !(0..=ids.size()[1]).contains(&prompt_width) {
            return Err(Error::InvalidArgument(format!(
                "role call: prompt_width {prompt_width} for ids of shape {:?}",
                ids.size()
            )));
        }
        // Rows with the same prompt ids (and padding) share its forward.
        let prompts: Vec<i64> = Vec::try_from(&ids.narrow(1, 0, prompt_width).contiguous().view([-1]))?;
        let width = prompt_width.max(1) as usize;
        let rows: Vec<&[i64]> = match prompt_width {
            0 => vec![&[][..]; ids.size()[0] as usize],
            _ => prompts.chunks(width).collect(),
        };
        let mut first = std::collections::HashMap::new();
        let prompt_of = rows.iter().enumerate().map(|(i, r)| *first.entry(*r).or_insert(i)).collect();
        Ok(Batch {
            ids,
            attn: take(ts, "attn")?,
            response: take(ts, "response")?,
            mask: take(ts, "mask")?.to_kind(Kind::Float),
            prompt_width,
            lens: lens.into_iter().map(|n| n as usize).collect(),
            prompt_of,
        })
    }

    /// (op, path argument, tensors)
    pub fn encode(op: &RoleOp) -> (WireOp, String, Vec<(String, Tensor)>) {
        match op {
            RoleOp::Scores(b) => (WireOp::Scores, String::new(), batch_tensors(b)),
            RoleOp::Values(b) => (WireOp::Values, String::new(), batch_tensors(b)),
            RoleOp::CriticStep { batch, values_old, returns } => {
                let mut t = batch_tensors(batch);
                t.push(("values_old".into(), values_old.to_device(tch::Device::Cpu)));
                t.push(("returns".into(), returns.to_device(tch::Device::Cpu)));
                (WireOp::CriticStep, String::new(), t)
            }
            RoleOp::Init { spec_toml } => (WireOp::Init, spec_toml.clone(), Vec::new()),
            RoleOp::SaveCritic { dir } => (WireOp::SaveCritic, dir.clone(), Vec::new()),
            RoleOp::Checkpoint { dir } => (WireOp::Checkpoint, dir.clone(), Vec::new()),
            RoleOp::Restore { dir } => (WireOp::Restore, dir.clone(), Vec::new()),
        }
    }

    /// A RoleCall's `op` number, `path` and tensors as a [`RoleOp`].
    pub fn decode(op: i32, path: String, mut ts: Vec<(String, Tensor)>) -> Result<RoleOp> {
        let kind = WireOp::try_from(op).unwrap_or(WireOp::Unspecified);
        Ok(match kind {
            WireOp::Scores => RoleOp::Scores(batch_from(&mut ts)?),
            WireOp::Values => RoleOp::Values(batch_from(&mut ts)?),
            WireOp::CriticStep => {
                let values_old = take(&mut ts, "values_old")?;
                let returns = take(&mut ts, "returns")?;
                RoleOp::CriticStep { batch: batch_from(&mut ts)?, values_old, returns }
            }
            WireOp::Init => RoleOp::Init { spec_toml: path },
            WireOp::SaveCritic => RoleOp::SaveCritic { dir: path },
            WireOp::Checkpoint => RoleOp::Checkpoint { dir: path },
            WireOp::Restore => RoleOp::Restore { dir: path },
            WireOp::Generate => return Err(Error::InvalidArgument("generate is for rollout workers".into())),
            WireOp::Unspecified => return Err(Error::InvalidArgument(format!("unknown role op {op}"))),
        })
    }
}
