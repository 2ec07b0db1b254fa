//! One PPO rollout batch and what each role computes on it. Every function
//! takes the shared base with the role's adapter made active, so a role can
//! run wherever its adapter lives.
//!
//! Layout: prompts left-padded to `P`, responses right-padded to `R`, so
//! response token `j` of every row sits at position `P + j` and is predicted
//! by the hidden state at `P + j − 1`.
//!
//! Rows that share a prompt (GRPO's and RLOO's groups of completions) share
//! its forward: each distinct prompt runs once, its keys and values and
//! hidden states are copied to its rows, and only the responses run per row
//! (see [`Batch::hidden`]). The prompt's share of the work falls from
//! `rows` to `distinct prompts`, with and without a graph.

use tch::{Device, Tensor};

use crate::error::Result;
use crate::train::logprobs::token_logprobs;
use crate::train::recompute::backward;
use rlhf_model::generate::{attention_mask, positions_from_mask};
use rlhf_model::head::Head;
use rlhf_model::peft::PeftModel;
use rlhf_model::Mask;

/// Token ids of one rollout, with everything the forward passes need.
pub struct Batch {
    /// `[b, P + R]`
    pub ids: Tensor,
    /// `[b, P + R]`, 1 on real tokens.
    pub attn: Tensor,
    /// `[b, R]` response token ids.
    pub response: Tensor,
    /// `[b, R]` float, 1 on response tokens.
    pub mask: Tensor,
    pub prompt_width: i64,
    /// Response lengths (including any EOS).
    pub lens: Vec<usize>,
    /// Per row, a key that rows with the same prompt share (the index of
    /// the first such row of the batch it was made for).
    pub prompt_of: Vec<usize>,
}

impl Batch {
    pub fn new(prompts: &[Vec<i64>], responses: &[Vec<i64>], pad: i64, device: Device) -> Self {
        let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let r = responses.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let (mut ids, mut attn, mut resp, mut mask) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (pr, rs) in prompts.iter().zip(responses) {
            let lp = p - pr.len();
            let rp = r - rs.len();
            ids.extend(
                std::iter::repeat_n(pad, lp)
                    .chain(pr.iter().copied())
                    .chain(rs.iter().copied())
                    .chain(std::iter::repeat_n(pad, rp)),
            );
            attn.extend(
                std::iter::repeat_n(0i64, lp)
                    .chain(std::iter::repeat_n(1, pr.len() + rs.len()))
                    .chain(std::iter::repeat_n(0, rp)),
            );
            resp.extend(rs.iter().copied().chain(std::iter::repeat_n(pad, rp)));
            mask.extend(std::iter::repeat_n(1f32, rs.len()).chain(std::iter::repeat_n(0.0, rp)));
        }
        let b = prompts.len() as i64;
        let (p, r) = (p as i64, r as i64);
        let mut first = std::collections::HashMap::new();
        let prompt_of = prompts.iter().enumerate().map(|(i, pr)| *first.entry(pr.as_slice()).or_insert(i)).collect();
        Self {
            ids: Tensor::from_slice(&ids).view([b, p + r]).to_device(device),
            attn: Tensor::from_slice(&attn).view([b, p + r]).to_device(device),
            response: Tensor::from_slice(&resp).view([b, r]).to_device(device),
            mask: Tensor::from_slice(&mask).view([b, r]).to_device(device),
            prompt_width: p,
            lens: responses.iter().map(Vec::len).collect(),
            prompt_of,
        }
    }

    pub fn rows(&self) -> i64 {
        self.ids.size()[0]
    }

    /// The sub-batch of rows `idx`.
    pub fn select(&self, idx: &[i64]) -> Batch {
        let i = Tensor::from_slice(idx).to_device(self.ids.device());
        Batch {
            ids: self.ids.index_select(0, &i),
            attn: self.attn.index_select(0, &i),
            response: self.response.index_select(0, &i),
            mask: self.mask.index_select(0, &i),
            prompt_width: self.prompt_width,
            lens: idx.iter().map(|&k| self.lens[k as usize]).collect(),
            prompt_of: idx.iter().map(|&k| self.prompt_of[k as usize]).collect(),
        }
    }

    /// `f` over consecutive parts of at most `rows` rows, its outputs
    /// (`[part, …]`) joined in order: only one part's activations exist at a
    /// time (`ppo.forward_batch`).
    pub fn by_parts(&self, rows: usize, mut f: impl FnMut(&Batch) -> Result<Tensor>) -> Result<Tensor> {
        let (n, rows) = (self.rows(), rows.max(1) as i64);
        if n <= rows {
            return f(self);
        }
        let parts = (0..n)
            .step_by(rows as usize)
            .map(|s| f(&self.select(&(s..(s + rows).min(n)).collect::<Vec<i64>>())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0))
    }

    /// Per-token values of each row's response (e.g. the log-probs that
    /// generation returns) as `[b, R]`, zero on padding.
    pub fn response_values(&self, rows: &[Vec<f32>]) -> Tensor {
        let r = self.mask.size()[1] as usize;
        let flat: Vec<f32> =
            rows.iter().flat_map(|v| v.iter().copied().chain(std::iter::repeat(0.0)).take(r)).collect();
        Tensor::from_slice(&flat).view([rows.len() as i64, r as i64]).to_device(self.mask.device())
    }

    /// Positions and the attention mask of a forward over `ids`.
    pub fn forward_inputs(&self) -> (Tensor, Tensor) {
        (positions_from_mask(&self.attn), attention_mask(&self.attn, self.ids.size()[1]))
    }

    /// Of hidden states over the whole rows, `[b, R, h]` at the positions
    /// that predict response tokens.
    pub fn response_part(&self, hidden: &Tensor) -> Tensor {
        let r = self.ids.size()[1] - self.prompt_width;
        hidden.narrow(1, self.prompt_width - 1, r)
    }

    /// Hidden states `[b, R, h]` at the positions that predict response tokens.
    pub fn response_hidden(&self, pm: &PeftModel) -> Result<Tensor> {
        Ok(self.response_part(&self.hidden(pm)?))
    }

    /// The first row of each distinct prompt, and each row's index among
    /// them; `None` when every row's prompt is its own.
    fn distinct_prompts(&self) -> Option<(Vec<i64>, Vec<i64>)> {
        if self.prompt_width == 0 {
            return None;
        }
        rlhf_model::batch::distinct_rows(&self.prompt_of)
    }

    /// Hidden states `[b, P + R, h]` of rows that share prompts: each
    /// distinct prompt's forward once (keys and values kept), copied to its
    /// rows, then every row's response against them. Equal to the plain
    /// forward up to the order of floating-point sums.
    fn shared_prompt_hidden(&self, pm: &PeftModel, firsts: &[i64], slot: &[i64]) -> Result<Tensor> {
        let device = self.ids.device();
        let (p, total) = (self.prompt_width, self.ids.size()[1]);
        let firsts = Tensor::from_slice(firsts).to_device(device);
        let prompt_attn = self.attn.narrow(1, 0, p).index_select(0, &firsts);
        let prompt_ids = self.ids.narrow(1, 0, p).index_select(0, &firsts);
        let mut cache = rlhf_model::cache::KvCache::new(pm.base.layers.len());
        let prompt_mask = attention_mask(&prompt_attn, p);
        let h_prompt = pm.forward(
            &prompt_ids,
            &positions_from_mask(&prompt_attn),
            Mask::Explicit(&prompt_mask),
            Some(&mut cache),
        )?;
        let slot = Tensor::from_slice(slot).to_device(device);
        cache.select_rows(&slot);
        let r = total - p;
        let positions = positions_from_mask(&self.attn).narrow(1, p, r);
        let mask = attention_mask(&self.attn, r);
        let h_response = pm.forward(&self.ids.narrow(1, p, r), &positions, Mask::Explicit(&mask), Some(&mut cache))?;
        Ok(Tensor::cat(&[h_prompt.index_select(0, &slot), h_response], 1))
    }

    /// Runs `head` on the response hidden states and backpropagates its
    /// loss, with activation checkpointing when `recompute` (see
    /// [`crate::train::recompute`]); returns `head`'s other output.
    pub fn train_step<T>(
        &self,
        pm: &PeftModel,
        recompute: bool,
        head: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
    ) -> Result<T> {
        if let (false, Some((firsts, slot))) = (recompute, self.distinct_prompts()) {
            let (loss, out) = head(&self.response_part(&self.shared_prompt_hidden(pm, &firsts, &slot)?))?;
            loss.backward();
            return Ok(out);
        }
        let (pos, m) = self.forward_inputs();
        backward(pm, (&self.ids, &pos, &Mask::Explicit(&m)), recompute, |hidden| head(&self.response_part(hidden)))
    }

    /// Hidden states `[b, P + R, h]` of the whole rows.
    pub fn hidden(&self, pm: &PeftModel) -> Result<Tensor> {
        if let Some((firsts, slot)) = self.distinct_prompts() {
            return self.shared_prompt_hidden(pm, &firsts, &slot);
        }
        let (pos, m) = self.forward_inputs();
        Ok(pm.forward(&self.ids, &pos, Mask::Explicit(&m), None)?)
    }

    /// Of hidden states over the whole rows, `[b, h]` at each row's last real token.
    pub fn last_of(&self, hidden: &Tensor) -> Tensor {
        let last: Vec<i64> = self.lens.iter().map(|&n| self.prompt_width + n as i64 - 1).collect();
        rlhf_model::batch::hidden_at(hidden, &last)
    }
}

/// Log-probabilities `[b, R]` of the response tokens under the active
/// adapter at `temperature` (no graph; the LM head runs in chunks).
pub fn logprobs(pm: &PeftModel, batch: &Batch, temperature: f64) -> Result<Tensor> {
    Ok(token_logprobs(pm, &batch.response_hidden(pm)?, &batch.response, temperature, false).0)
}

/// Per-token values `[b, R]` from the critic's adapter (active) and head.
pub fn values(pm: &PeftModel, head: &Head, batch: &Batch) -> Result<Tensor> {
    Ok(head.forward(&batch.response_hidden(pm)?))
}

/// Sequence scores `[b]` from the reward adapter (active) and head (with
/// its log-prob term: the response's log-prob under the reward adapter).
pub fn model_scores(pm: &PeftModel, head: &Head, batch: &Batch) -> Result<Tensor> {
    let hidden = batch.hidden(pm)?;
    let r = head.forward(&batch.last_of(&hidden));
    Ok(match &head.lm_scale {
        Some(c) => {
            let logp = token_logprobs(pm, &batch.response_part(&hidden), &batch.response, 1.0, false).0;
            r + c * (logp * &batch.mask).sum_dim_intlist([1i64].as_slice(), false, tch::Kind::Float)
        }
        None => r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// `ppo.forward_batch`: the reference log-probs of a rollout taken two
    /// rows at a time (prompts shared by samples and not) equal the
    /// whole-batch pass up to float rounding.
    #[test]
    fn passes_by_parts_equal_the_whole_batch() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-qwen2");
        let pm = PeftModel::new(rlhf_model::Model::load(&dir, Kind::Float, Device::Cpu).unwrap());
        let prompts: Vec<Vec<i64>> =
            vec![vec![5, 6, 7], vec![5, 6, 7], vec![9, 10], vec![9, 10], vec![11], vec![12, 13, 14, 15]];
        let responses: Vec<Vec<i64>> =
            vec![vec![20, 21], vec![22], vec![23, 24, 25], vec![26, 27], vec![28], vec![29, 30]];
        let batch = Batch::new(&prompts, &responses, 0, Device::Cpu);
        let whole = tch::no_grad(|| logprobs(&pm, &batch, 1.0)).unwrap();
        for rows in [1, 2, 4, 6] {
            let parts = tch::no_grad(|| batch.by_parts(rows, |p| logprobs(&pm, p, 1.0))).unwrap();
            assert_eq!(parts.size(), whole.size());
            let diff = (&parts - &whole).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{rows} rows per part: {diff}");
        }
    }
}
