//! The scalar head `r = w·h + b` of reward models and critics, on a hidden
//! state, and the reward model as saved by a reward stage: an adapter
//! directory with the head beside it.
//!
//! A reward model's head may also read its own LM: `r = w·h + b + c ·
//! Σ log p(y | x)` over the response tokens `y` (`lm_scale` = `c`). Over an
//! SFT base this starts the reward model at the SFT policy's own ranking of
//! answers — on FewCLUE the policy's letter log-probs order right above
//! wrong in 68% of pairs where a fresh `w·h` head is at chance — and the
//! pairwise loss trains it from there.

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
    /// `c` `[1]` of the log-prob term, when the head has one.
    pub lm_scale: Option<Tensor>,
}

impl Head {
    pub fn new(hidden: i64, device: Device, seed: u64) -> Self {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let weight =
            peft::normal(&[1, hidden], 1.0 / ((hidden + 1) as f64).sqrt(), &mut rng, device).set_requires_grad(true);
        Self { weight, bias: Tensor::zeros([1], (Kind::Float, device)).set_requires_grad(true), lm_scale: None }
    }

    /// A trainable head that reads 0 everywhere (weight and bias zero): a
    /// critic that starts with no opinion, so the first advantages are the
    /// rewards themselves (whitened), not a random head's noise.
    pub fn zeros(hidden: i64, device: Device) -> Self {
        let z = |n: i64| Tensor::zeros([n], (Kind::Float, device));
        Self {
            weight: z(hidden).unsqueeze(0).set_requires_grad(true),
            bias: z(1).set_requires_grad(true),
            lm_scale: None,
        }
    }

    /// This head with a log-prob term (`c` = 1, trainable).
    pub fn with_logprob(mut self) -> Self {
        self.lm_scale = Some(Tensor::ones([1], (Kind::Float, self.bias.device())).set_requires_grad(true));
        self
    }

    /// The same head with its tensors trainable or not (a copy of the
    /// values when `trainable`, so a critic started from it trains apart).
    pub fn trainable(&self, trainable: bool) -> Self {
        let t = |x: &Tensor| x.detach().copy().set_requires_grad(trainable);
        Self { weight: t(&self.weight), bias: t(&self.bias), lm_scale: self.lm_scale.as_ref().map(t) }
    }

    /// The named tensors to train (and checkpoint).
    pub fn tensors(&self) -> Vec<(&'static str, Tensor)> {
        let mut v = vec![("head.weight", self.weight.shallow_clone()), ("head.bias", self.bias.shallow_clone())];
        if let Some(c) = &self.lm_scale {
            v.push(("head.lm_scale", c.shallow_clone()));
        }
        v
    }

    pub fn forward(&self, h: &Tensor) -> Tensor {
        h.to_kind(Kind::Float).linear(&self.weight, Some(&self.bias)).squeeze_dim(-1)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu);
        let mut named = vec![("weight", cpu(&self.weight)), ("bias", cpu(&self.bias))];
        if let Some(c) = &self.lm_scale {
            named.push(("lm_scale", cpu(c)));
        }
        Tensor::write_safetensors(&named, path)?;
        Ok(())
    }

    pub fn load(path: &Path, hidden: i64, device: Device) -> Result<Self> {
        let f = WeightFiles::open_file(path)?;
        Ok(Self {
            weight: f.get("weight", &[1, hidden], Kind::Float, device)?,
            bias: f.get("bias", &[1], Kind::Float, device)?,
            lm_scale: match f.contains("lm_scale") {
                true => Some(f.get("lm_scale", &[1], Kind::Float, device)?),
                false => None,
            },
        })
    }
}

/// Scores of whole sequences (right-padded batch) at their last token, with
/// the active adapter of `pm`; `starts[i]` is where row `i`'s response
/// begins (read by a head with a log-prob term).
pub fn score(pm: &PeftModel, head: &Head, seqs: &[Vec<i64>], starts: &[usize], pad: i64) -> Result<Tensor> {
    let (ids, _) = right_padded(seqs, pad, pm.base.device);
    let hidden = pm.forward(&ids, &positions(&ids), Mask::Causal, None)?;
    let last: Vec<i64> = seqs.iter().map(|s| s.len() as i64 - 1).collect();
    let r = head.forward(&hidden_at(&hidden, &last));
    Ok(match &head.lm_scale {
        Some(c) => r + c * response_logprob(pm, &hidden, seqs, starts),
        None => r,
    })
}

/// `Σ log p(s[t] | s[..t])` over `t ≥ starts[i]` of each row `i`, from the
/// hidden states `[b, T, h]` of the right-padded rows `seqs` (logits only at
/// those positions).
pub fn response_logprob(pm: &PeftModel, hidden: &Tensor, seqs: &[Vec<i64>], starts: &[usize]) -> Tensor {
    let (t, h) = (hidden.size()[1], hidden.size()[2]);
    let (mut at, mut targets, mut rows) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in seqs.iter().enumerate() {
        for (p, &token) in s.iter().enumerate().skip(starts.get(i).copied().unwrap_or(s.len()).max(1)) {
            at.push(i as i64 * t + p as i64 - 1);
            targets.push(token);
            rows.push(i as i64);
        }
    }
    let targets = Tensor::from_slice(&targets).to_device(hidden.device());
    summed_logprobs(pm, &hidden.reshape([-1, h]), &at, &targets, &rows, seqs.len())
}

/// `Σ log p` per row, with a graph: entry `k` adds the log-prob of
/// `targets[k]` under the hidden state `flat[at[k]]` (`flat` `[N, h]`) to row
/// `rows[k]` of `n` (the LM head runs only at `at`).
pub fn summed_logprobs(pm: &PeftModel, flat: &Tensor, at: &[i64], targets: &Tensor, rows: &[i64], n: usize) -> Tensor {
    let device = flat.device();
    let out = Tensor::zeros([n as i64], (Kind::Float, device));
    if at.is_empty() {
        return out;
    }
    let idx = |v: &[i64]| Tensor::from_slice(v).to_device(device);
    let logits = pm.base.logits(&flat.index_select(0, &idx(at)), pm.hooks()).to_kind(Kind::Float);
    let logp = logits.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1) - logits.logsumexp([-1], false);
    out.index_add(0, &idx(rows), &logp)
}

/// Loads a reward model directory onto `pm` as adapter `name`; returns its head.
pub fn load_reward_model(dir: &Path, pm: &mut PeftModel, name: &str) -> Result<Head> {
    let adapter = peft::io::load(dir, &pm.base)?;
    pm.add(name, adapter)?;
    Head::load(&dir.join(REWARD_HEAD_FILE), pm.base.cfg.hidden_size, pm.base.device)
}
