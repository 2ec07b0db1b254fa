//! The rollout role on its own worker: the job's base with a copy of the
//! policy adapter, generating for the trainer. Every `generate` call carries
//! the policy adapter's tensors (LoRA A/B, SSF scale/shift, RepAdapter
//! weights), so the copy is the policy the batch is meant to sample from;
//! prompt ids go in, response ids and their log-probs come out. Row `r`
//! samples from stream `r` of the seed, so any split of a batch over
//! workers yields the tokens one worker would.

use rlhf_common::spec::{JobSpec, PpoSpec};
use rlhf_common::Role;
use tch::Tensor;

use super::iteration::{generate_options, generate_parts};
use crate::error::{Error, Result};
use crate::train::setup::{load_base, Loaded};
use rlhf_model::peft::{self, Adapter, PeftConfig};
use rlhf_model::Generation;

/// What a trainer asks of a rollout worker.
pub enum RolloutOp {
    /// (Re)builds the host for this resolved PPO job.
    Init {
        spec_toml: String,
    },
    Generate(GenerateRequest),
}

/// One share of a rollout batch.
pub struct GenerateRequest {
    pub prompts: Vec<Vec<i64>>,
    /// Each prompt's row in the whole batch (its sampling stream).
    pub rows: Vec<u64>,
    /// The iteration's sampling seed.
    pub seed: u64,
    /// The policy adapter's tensors, by name (empty: keep the current ones).
    pub adapter: Vec<(String, Tensor)>,
}

pub struct RolloutHost {
    model: Loaded,
    ppo: PpoSpec,
}

impl RolloutHost {
    /// Loads the job's base and puts a policy adapter on it (its tensors
    /// arrive with the first batch).
    pub fn new(job: &JobSpec, device: tch::Device) -> Result<Self> {
        let ppo = job.ppo.clone().ok_or_else(|| Error::InvalidArgument("ppo: required".into()))?;
        let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
        let mut model = load_base(job, device)?;
        let policy = peft::build(PeftConfig::from_spec(peft_spec, job.seed), &model.pm.base)?;
        model.pm.add(Role::Policy.name(), policy)?;
        Ok(Self { model, ppo })
    }

    pub fn generate(&mut self, req: &GenerateRequest) -> Result<Generation> {
        if !req.adapter.is_empty() {
            load_tensors(self.model.pm.adapter(Role::Policy.name())?, &req.adapter)?;
        }
        let pm = &mut self.model.pm;
        pm.set_active(Some(Role::Policy.name()))?;
        let (eos, pad) = (self.model.tok.eos_ids.clone(), self.model.pad());
        let opts = generate_options(&self.ppo, req.seed, eos, pad);
        let pm = &self.model.pm;
        tch::no_grad(|| generate_parts(&pm.base, pm.hooks(), &self.ppo, &req.prompts, &opts, &req.rows))
    }
}

/// Copies `tensors` into the adapter's own, every one of which must be
/// there with its shape.
pub fn load_tensors(adapter: &dyn Adapter, tensors: &[(String, Tensor)]) -> Result<()> {
    let own = adapter.tensors();
    if own.len() != tensors.len() {
        return Err(Error::InvalidArgument(format!(
            "rollout: {} adapter tensors sent, the policy adapter has {}",
            tensors.len(),
            own.len()
        )));
    }
    tch::no_grad(|| -> Result<()> {
        for (name, t) in own {
            let (_, src) = tensors
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| Error::InvalidArgument(format!("rollout: adapter tensor {name} missing")))?;
            if src.size() != t.size() {
                return Err(Error::InvalidArgument(format!(
                    "rollout: adapter tensor {name} has shape {:?}, expected {:?}",
                    src.size(),
                    t.size()
                )));
            }
            t.shallow_clone().f_copy_(src)?;
        }
        Ok(())
    })
}

/// Rollout operations as named CPU tensors (what crosses the wire).
pub mod wire {
    use super::*;

    /// Names of adapter tensors on the wire start with this.
    pub const ADAPTER_PREFIX: &str = "adapter/";

    fn flat(rows: &[Vec<i64>]) -> (Tensor, Tensor) {
        let ids: Vec<i64> = rows.iter().flatten().copied().collect();
        let lens: Vec<i64> = rows.iter().map(|r| r.len() as i64).collect();
        (Tensor::from_slice(&ids), Tensor::from_slice(&lens))
    }

    fn unflat<T: Copy>(values: &[T], lens: &[i64], what: &str) -> Result<Vec<Vec<T>>> {
        let total: i64 = lens.iter().sum();
        if lens.iter().any(|&n| n < 0) || total as usize != values.len() {
            return Err(Error::InvalidArgument(format!(
                "rollout: {what}: lengths sum to {total}, {} values",
                values.len()
            )));
        }
        let mut out = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &n in lens {
            out.push(values[at..at + n as usize].to_vec());
            at += n as usize;
        }
        Ok(out)
    }

    fn take(ts: &mut Vec<(String, Tensor)>, name: &str) -> Result<Tensor> {
        let i = ts
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| Error::InvalidArgument(format!("rollout call: tensor {name} missing")))?;
        Ok(ts.swap_remove(i).1)
    }

    /// The adapter's tensors as they travel (CPU, f32, prefixed names).
    pub fn adapter_tensors(adapter: &dyn Adapter) -> Vec<(String, Tensor)> {
        adapter
            .tensors()
            .into_iter()
            .map(|(n, t)| (format!("{ADAPTER_PREFIX}{n}"), t.detach().to_device(tch::Device::Cpu)))
            .collect()
    }

    pub fn encode(req: &GenerateRequest) -> Vec<(String, Tensor)> {
        let (ids, lens) = flat(&req.prompts);
        let rows: Vec<i64> = req.rows.iter().map(|&r| r as i64).collect();
        let mut t = vec![
            ("prompt_ids".into(), ids),
            ("prompt_lens".into(), lens),
            ("rows".into(), Tensor::from_slice(&rows)),
            ("seed".into(), Tensor::from_slice(&[req.seed as i64])),
        ];
        t.extend(req.adapter.iter().map(|(n, x)| (n.clone(), x.shallow_clone())));
        t
    }

    pub fn decode(mut ts: Vec<(String, Tensor)>) -> Result<GenerateRequest> {
        let ids: Vec<i64> = Vec::try_from(&take(&mut ts, "prompt_ids")?)?;
        let lens: Vec<i64> = Vec::try_from(&take(&mut ts, "prompt_lens")?)?;
        let rows: Vec<i64> = Vec::try_from(&take(&mut ts, "rows")?)?;
        let seed: Vec<i64> = Vec::try_from(&take(&mut ts, "seed")?)?;
        let prompts = unflat(&ids, &lens, "prompts")?;
        if rows.len() != prompts.len() {
            return Err(Error::InvalidArgument(format!("rollout: {} rows for {} prompts", rows.len(), prompts.len())));
        }
        let adapter =
            ts.into_iter().filter_map(|(n, t)| n.strip_prefix(ADAPTER_PREFIX).map(|s| (s.to_string(), t))).collect();
        Ok(GenerateRequest {
            prompts,
            rows: rows.into_iter().map(|r| r as u64).collect(),
            seed: seed.first().copied().unwrap_or(0) as u64,
            adapter,
        })
    }

    pub fn encode_reply(g: &Generation) -> Vec<(String, Tensor)> {
        let (ids, lens) = flat(&g.tokens);
        let lp: Vec<f32> = g.logprobs.iter().flatten().copied().collect();
        vec![("response_ids".into(), ids), ("response_lens".into(), lens), ("logprobs".into(), Tensor::from_slice(&lp))]
    }

    pub fn decode_reply(mut ts: Vec<(String, Tensor)>) -> Result<Generation> {
        let ids: Vec<i64> = Vec::try_from(&take(&mut ts, "response_ids")?)?;
        let lens: Vec<i64> = Vec::try_from(&take(&mut ts, "response_lens")?)?;
        let lp: Vec<f32> = Vec::try_from(&take(&mut ts, "logprobs")?.to_kind(tch::Kind::Float))?;
        Ok(Generation { tokens: unflat(&ids, &lens, "responses")?, logprobs: unflat(&lp, &lens, "log-probs")? })
    }
}
