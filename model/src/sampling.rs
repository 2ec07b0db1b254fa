//! Next-token choice: greedy, or temperature with top-k / top-p, drawn from
//! a seeded ChaCha stream so the same seed gives the same tokens on any
//! device.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// How to pick the next token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 keeps every token.
    pub top_k: i64,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.top_k < 0 {
            return Err(format!("top_k must be >= 0, got {}", self.top_k));
        }
        Ok(())
    }
}

/// One sampling stream per row: stream `r` of `seed` for row id `r`, so a
/// row draws the same numbers whatever other rows share its batch.
pub fn row_streams(seed: u64, rows: &[u64]) -> Vec<ChaCha8Rng> {
    rows.iter()
        .map(|&r| {
            let mut g = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
            g.set_stream(r);
            g
        })
        .collect()
}

/// Picks one token per row of `logits` `[b, vocab]`. Returns the tokens `[b]`
/// and their log-probabilities `[b]` under the temperature-scaled
/// distribution before top-k/top-p filtering (what PPO's ratio uses).
pub fn sample(logits: &Tensor, s: &Sampling, rng: &mut ChaCha8Rng) -> (Tensor, Tensor) {
    sample_with(logits, s, &mut |_| rng.gen::<f32>())
}

/// [`sample`] with one stream per row, so a row's tokens do not depend on
/// which other rows share its batch (data-parallel ranks sample the rows
/// of one global batch apart and must pick what one worker would).
pub fn sample_rows(logits: &Tensor, s: &Sampling, rngs: &mut [ChaCha8Rng]) -> (Tensor, Tensor) {
    sample_with(logits, s, &mut |i| rngs[i].gen::<f32>())
}

fn sample_with(logits: &Tensor, s: &Sampling, draw: &mut dyn FnMut(usize) -> f32) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    if s.is_greedy() {
        let tokens = logits.argmax(-1, false);
        let logp = logits.log_softmax(-1, Kind::Float).gather(1, &tokens.unsqueeze(1), false).squeeze_dim(1);
        return (tokens, logp);
    }
    let scaled = logits / s.temperature;
    let logp_all = scaled.log_softmax(-1, Kind::Float);
    let (sorted, order) = logp_all.exp().sort(-1, true);
    let vocab = sorted.size()[1];
    let preceding = sorted.cumsum(-1, Kind::Float) - &sorted;
    let mut drop = preceding.gt(s.top_p);
    if s.top_k > 0 && s.top_k < vocab {
        let rank = Tensor::arange(vocab, (Kind::Int64, sorted.device())).unsqueeze(0);
        drop = drop.logical_or(&rank.ge(s.top_k));
    }
    let kept = sorted.masked_fill(&drop, 0.0);
    let cum = kept.cumsum(-1, Kind::Float);
    let total = cum.select(1, vocab - 1);
    let b = cum.size()[0];
    let u: Vec<f32> = (0..b as usize).map(draw).collect();
    let u = Tensor::from_slice(&u).to_device(cum.device()) * total;
    let pos = cum.lt_tensor(&u.unsqueeze(1)).sum_dim_intlist(-1, false, Kind::Int64).clamp_max(vocab - 1);
    let tokens = order.gather(1, &pos.unsqueeze(1), false).squeeze_dim(1);
    let logp = logp_all.gather(1, &tokens.unsqueeze(1), false).squeeze_dim(1);
    (tokens, logp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let logits = Tensor::from_slice(&[0.1f32, 2.0, 0.5, -1.0, 1.9, 0.0]).view([2, 3]);
        let s = Sampling { temperature: 0.7, top_p: 1.0, top_k: 1, seed: 0 };
        let (t, _) = sample(&logits, &s, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(Vec::<i64>::try_from(&t).unwrap(), vec![1, 1]);
        let s = Sampling { temperature: 1.0, top_p: 1.0, top_k: 0, seed: 0 };
        let big = Tensor::randn([4, 50], (Kind::Float, tch::Device::Cpu));
        let a = sample(&big, &s, &mut ChaCha8Rng::seed_from_u64(7)).0;
        let b = sample(&big, &s, &mut ChaCha8Rng::seed_from_u64(7)).0;
        assert!(a.equal(&b));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // probabilities ~ [0.7, 0.2, 0.1]: top_p 0.5 keeps only token 0.
        let logits = Tensor::from_slice(&[0.7f32, 0.2, 0.1]).log().view([1, 3]);
        let s = Sampling { temperature: 1.0, top_p: 0.5, top_k: 0, seed: 0 };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..50 {
            let (t, lp) = sample(&logits, &s, &mut rng);
            assert_eq!(t.int64_value(&[0]), 0);
            assert!((lp.double_value(&[0]) - 0.7f64.ln()).abs() < 1e-5);
        }
    }
}
