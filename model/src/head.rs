//! The scalar head `r = w·h + b` of reward models and critics, on a hidden
//! state, and the reward model as saved by a reward stage: an adapter
//! directory with the head beside it.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::batch::{hidden_at, positions, right_padded};
use crate::error::Result;
use crate::peft::{self, PeftModel};
use crate::{Mask, WeightFiles};

/// The head's file in a reward model directory.
pub const REWARD_HEAD_FILE: &str = "reward_head.safetensors";
/// A critic's value head, beside its adapter.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";

/// The scalar head `r = w·h + b` on a hidden state.
pub struct Head {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Head {
    pub fn new(hidden: i64, device: Device, seed: u64) -> Self {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let weight =
            peft::normal(&[1, hidden], 1.0 / ((hidden + 1) as f64).sqrt(), &mut rng, device).set_requires_grad(true);
        Self { weight, bias: Tensor::zeros([1], (Kind::Float, device)).set_requires_grad(true) }
    }

    pub fn forward(&self, h: &Tensor) -> Tensor {
        h.to_kind(Kind::Float).linear(&self.weight, Some(&self.bias)).squeeze_dim(-1)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu);
        Tensor::write_safetensors(&[("weight", cpu(&self.weight)), ("bias", cpu(&self.bias))], path)?;
        Ok(())
    }

    pub fn load(path: &Path, hidden: i64, device: Device) -> Result<Self> {
        let f = WeightFiles::open_file(path)?;
        Ok(Self {
            weight: f.get("weight", &[1, hidden], Kind::Float, device)?,
            bias: f.get("bias", &[1], Kind::Float, device)?,
        })
    }
}

/// Scores of whole sequences (right-padded batch) at their last token, with
/// the active adapter of `pm`.
pub fn score(pm: &PeftModel, head: &Head, seqs: &[Vec<i64>], pad: i64) -> Result<Tensor> {
    let (ids, _) = right_padded(seqs, pad, pm.base.device);
    let hidden = pm.forward(&ids, &positions(&ids), Mask::Causal, None)?;
    let last: Vec<i64> = seqs.iter().map(|s| s.len() as i64 - 1).collect();
    Ok(head.forward(&hidden_at(&hidden, &last)))
}

/// Loads a reward model directory onto `pm` as adapter `name`; returns its head.
pub fn load_reward_model(dir: &Path, pm: &mut PeftModel, name: &str) -> Result<Head> {
    let adapter = peft::io::load(dir, &pm.base)?;
    pm.add(name, adapter)?;
    Head::load(&dir.join(REWARD_HEAD_FILE), pm.base.cfg.hidden_size, pm.base.device)
}
