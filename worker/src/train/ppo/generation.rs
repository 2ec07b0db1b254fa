//! Where a PPO batch is generated: by the trainer with its own policy
//! adapter, or split over the job's rollout workers, each sent the policy
//! adapter's tensors with its share. A share whose worker is lost goes to
//! another live rollout worker with the same tensors, or, when none is
//! left, to the trainer. [`Rollouts::start`] returns at once for remote
//! shares, so with `ppo.rollout_ahead = 1` the next batch is generated
//! while the trainer updates.

use std::collections::VecDeque;
use std::ops::Range;
use std::time::Instant;

use rlhf_common::spec::PpoSpec;
use tch::Tensor;

use super::iteration::{generate_here, Generated, Prompts, Roles, Rollout};
use super::roles::RemoteRoles;
use super::rollout_host::{wire, GenerateRequest, RolloutOp};
use crate::error::{Error, Result};
use rlhf_model::peft::Adapter;
use rlhf_model::Generation;

/// What a trainer offers the rollout: its roles (to generate here), the
/// policy adapter (to send) and its handle on rollout workers, if any.
pub trait Trainer: Roles {
    fn remote(&mut self) -> Option<&mut (dyn RemoteRoles + 'static)>;
    fn policy_adapter(&self) -> Result<&dyn Adapter>;
}

/// A batch on its way.
pub enum Ticket {
    Here(Generated),
    Remote {
        /// The whole batch, with the adapter tensors it was sent with.
        req: GenerateRequest,
        shares: Vec<Share>,
        /// Seconds the trainer spent sending it.
        sending: f64,
    },
}

/// One rollout worker's part of a batch (`call` None: left to the trainer,
/// no rollout worker being left).
pub struct Share {
    target: usize,
    call: Option<u64>,
    rows: Range<usize>,
}

/// The job's rollout workers, as the trainer sees them.
pub struct Rollouts {
    alive: Vec<bool>,
    /// Adapter payload bytes sent since [`take_adapter_bytes`](Self::take_adapter_bytes).
    adapter_bytes: u64,
}

/// `n` rows in `k` contiguous, balanced ranges.
fn split(n: usize, k: usize) -> Vec<Range<usize>> {
    (0..k).map(|i| (i * n / k)..((i + 1) * n / k)).filter(|r| !r.is_empty()).collect()
}

fn tensor_bytes(ts: &[(String, Tensor)]) -> u64 {
    ts.iter().map(|(_, t)| t.numel() as u64 * 4).sum()
}

impl Rollouts {
    pub fn new<P: Trainer>(parts: &mut P) -> Self {
        let n = parts.remote().map_or(0, |r| r.rollout_workers());
        Self { alive: vec![true; n], adapter_bytes: 0 }
    }

    /// Rollout workers still alive.
    pub fn live(&self) -> usize {
        self.alive.iter().filter(|&&a| a).count()
    }

    /// Adapter bytes sent since the last call.
    pub fn take_adapter_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.adapter_bytes)
    }

    /// Starts generating `prompts`: on the rollout workers (returns once
    /// every share is sent) or, with none alive, here (returns when done).
    pub fn start<P: Trainer>(
        &mut self,
        parts: &mut P,
        ppo: &PpoSpec,
        prompts: &Prompts<'_>,
        rollout: &Rollout,
    ) -> Result<Ticket> {
        let live: Vec<usize> = (0..self.alive.len()).filter(|&t| self.alive[t]).collect();
        if live.is_empty() || parts.remote().is_none() {
            let t0 = Instant::now();
            let gen = generate_here(parts, ppo, prompts, rollout)?;
            return Ok(Ticket::Here(Generated { gen, secs: t0.elapsed().as_secs_f64() }));
        }
        let t0 = Instant::now();
        let adapter = wire::adapter_tensors(parts.policy_adapter()?);
        let req = GenerateRequest {
            prompts: prompts.ids.to_vec(),
            rows: prompts.rows.iter().map(|&r| r as u64).collect(),
            seed: rollout.sampling_seed(),
            adapter,
        };
        let mut shares = Vec::new();
        for (rows, &target) in split(req.prompts.len(), live.len()).into_iter().zip(&live) {
            shares.push(self.send(parts, target, &req, rows)?);
        }
        Ok(Ticket::Remote { req, shares, sending: t0.elapsed().as_secs_f64() })
    }

    /// Sends rows `rows` of `req` to `target`, or, if it is lost, to the
    /// next live rollout worker; with none left, the share is the trainer's.
    fn send<P: Trainer>(
        &mut self,
        parts: &mut P,
        target: usize,
        req: &GenerateRequest,
        rows: Range<usize>,
    ) -> Result<Share> {
        let remote = parts.remote().ok_or_else(|| Error::InvalidArgument("no rollout workers".into()))?;
        let mut target = target;
        loop {
            let share = GenerateRequest {
                prompts: req.prompts[rows.clone()].to_vec(),
                rows: req.rows[rows.clone()].to_vec(),
                seed: req.seed,
                adapter: req.adapter.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect(),
            };
            match remote.send_rollout(target, &RolloutOp::Generate(share)) {
                Ok(call) => {
                    self.adapter_bytes += tensor_bytes(&req.adapter);
                    return Ok(Share { target, call: Some(call), rows });
                }
                Err(Error::RolloutLost { .. }) => {
                    self.alive[target] = false;
                    match (0..self.alive.len()).find(|&t| self.alive[t]) {
                        Some(next) => target = next,
                        None => return Ok(Share { target, call: None, rows }),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for a batch; a lost worker's share is generated again. Its
    /// `secs` are the trainer's: sending plus waiting (a batch generated
    /// ahead costs only what was left of it).
    pub fn finish<P: Trainer>(
        &mut self,
        parts: &mut P,
        ppo: &PpoSpec,
        ticket: Ticket,
        rollout: &Rollout,
    ) -> Result<Generated> {
        let (req, shares, sending) = match ticket {
            Ticket::Here(g) => return Ok(g),
            Ticket::Remote { req, shares, sending } => (req, shares, sending),
        };
        let t0 = Instant::now();
        let n = req.prompts.len();
        let mut gen = Generation { tokens: vec![Vec::new(); n], logprobs: vec![Vec::new(); n] };
        let mut queue: VecDeque<Share> = shares.into();
        while let Some(share) = queue.pop_front() {
            let remote = parts.remote().ok_or_else(|| Error::InvalidArgument("no rollout workers".into()))?;
            let waited = match share.call {
                Some(call) => remote.wait_rollout(call),
                None => Err(Error::RolloutLost { target: share.target, msg: "no rollout worker left".into() }),
            };
            let part = match waited {
                Ok(ts) => wire::decode_reply(ts)?,
                Err(Error::RolloutLost { target, msg }) => {
                    tracing::warn!(target, %msg, rows = ?share.rows, "rollout worker lost; generating its share again");
                    self.alive[target] = false;
                    match (0..self.alive.len()).find(|&t| self.alive[t]) {
                        Some(next) => {
                            queue.push_back(self.send(parts, next, &req, share.rows)?);
                            continue;
                        }
                        None => {
                            tracing::warn!("no rollout worker left; the trainer generates");
                            let rows: Vec<usize> = req.rows[share.rows.clone()].iter().map(|&r| r as usize).collect();
                            let here = Prompts { ids: &req.prompts[share.rows.clone()], rows: &rows, global: n };
                            generate_here(parts, ppo, &here, rollout)?
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            if part.tokens.len() != share.rows.len() {
                return Err(Error::RoleHost(format!(
                    "rollout worker {} returned {} rows for {}",
                    share.target,
                    part.tokens.len(),
                    share.rows.len()
                )));
            }
            for (k, (t, l)) in share.rows.zip(part.tokens.into_iter().zip(part.logprobs)) {
                gen.tokens[k] = t;
                gen.logprobs[k] = l;
            }
        }
        Ok(Generated { gen, secs: sending + t0.elapsed().as_secs_f64() })
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_covers_every_row_once() {
        for n in 0..12 {
            for k in 1..5 {
                let parts = split(n, k);
                let flat: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(flat, (0..n).collect::<Vec<_>>());
                assert!(parts.len() <= k);
            }
        }
    }
}
