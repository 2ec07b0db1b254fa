//! PPO losses (TRL's formulas): the clipped policy surrogate, the clipped value loss, the
//! policy entropy, and the sequence-score adjustments applied before the KL penalty.
//!
//! Shapes are `[b, t]` over response tokens unless stated; `mask` is 1.0 on valid tokens and every
//! mean over tokens is [`masked_mean`] over the whole minibatch (token-level averaging, as TRL).
//! Statistics (`clip_frac`, `approx_kl`) are computed without gradient.

use tch::{Kind, Tensor};

use super::gae::{assert_same_shape, masked_mean};

/// Output of [`policy_loss`]; every field is a scalar tensor.
#[derive(Debug)]
pub struct PolicyLossOut {
    /// The clipped surrogate loss to minimise (carries gradient to `logp_new`).
    pub loss: Tensor,
    /// Fraction of valid tokens where the clipped term was the larger one (no gradient).
    pub clip_frac: Tensor,
    /// `0.5 * masked_mean((logp_new - logp_old)^2)` (no gradient).
    pub approx_kl: Tensor,
}

/// Clipped PPO policy loss:
///
/// ```text
/// ratio     = exp(logp_new - logp_old)
/// pg1       = -A * ratio
/// pg2       = -A * clamp(ratio, 1 - clip, 1 + clip)
/// loss      = masked_mean(max(pg1, pg2), mask)
/// clip_frac = masked_mean([pg2 > pg1], mask)
/// approx_kl = 0.5 * masked_mean((logp_new - logp_old)^2, mask)
/// ```
///
/// `approx_kl` is the masked mean as in TRL's original `PPOTrainer.loss` (TRL's later trainer
/// takes an unmasked mean over padded positions that hold equal dummy log-probs). The log-ratio is
/// zeroed on padding before `exp`, so padded log-probs may hold anything.
pub fn policy_loss(
    logp_new: &Tensor,
    logp_old: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> PolicyLossOut {
    assert_same_shape("policy_loss logp_new/logp_old", logp_new, logp_old);
    assert_same_shape("policy_loss logp_new/advantages", logp_new, advantages);
    assert_same_shape("policy_loss logp_new/mask", logp_new, mask);
    let log_ratio = (logp_new - logp_old).masked_fill(&mask.eq(0.0), 0.0);
    let ratio = log_ratio.exp();
    let pg1 = -advantages * &ratio;
    let pg2 = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip);
    let loss = masked_mean(&pg1.maximum(&pg2), mask);
    let (clip_frac, approx_kl) = tch::no_grad(|| {
        let clipped = pg2.gt_tensor(&pg1).to_kind(mask.kind());
        (masked_mean(&clipped, mask), masked_mean(&log_ratio.square(), mask) * 0.5)
    });
    PolicyLossOut { loss, clip_frac, approx_kl }
}

/// Output of [`value_loss`]; every field is a scalar tensor.
#[derive(Debug)]
pub struct ValueLossOut {
    /// The clipped value loss to minimise (carries gradient to `values_new`).
    pub loss: Tensor,
    /// Fraction of valid tokens where the clipped error was the larger one (no gradient).
    pub clip_frac: Tensor,
}

/// Clipped value loss:
///
/// ```text
/// v_clip    = clamp(v_new, v_old - clip_value, v_old + clip_value)
/// loss      = 0.5 * masked_mean(max((v_new - R)^2, (v_clip - R)^2), mask)
/// clip_frac = masked_mean([(v_clip - R)^2 > (v_new - R)^2], mask)
/// ```
///
/// with `R` the GAE returns. The clamp is `torch.clamp` (gradient flows where
/// `v_old - c <= v_new <= v_old + c`).
pub fn value_loss(
    values_new: &Tensor,
    values_old: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip_value: f64,
) -> ValueLossOut {
    assert_same_shape("value_loss values_new/values_old", values_new, values_old);
    assert_same_shape("value_loss values_new/returns", values_new, returns);
    assert_same_shape("value_loss values_new/mask", values_new, mask);
    let lo = values_old - clip_value;
    let hi = values_old + clip_value;
    let clipped = values_new.clamp_tensor(Some(&lo), Some(&hi));
    let err1 = (values_new - returns).square();
    let err2 = (clipped - returns).square();
    let loss = masked_mean(&err1.maximum(&err2), mask) * 0.5;
    let clip_frac = tch::no_grad(|| masked_mean(&err2.gt_tensor(&err1).to_kind(mask.kind()), mask));
    ValueLossOut { loss, clip_frac }
}

/// Per-token entropy of the categorical distributions given by `logits` `[.., V]`:
/// `H = logsumexp(l) - sum(softmax(l) * l) = -sum(p * log p)`, shape `logits.shape[..-1]`.
///
/// Computed in f32 (or f64 for f64 logits) whatever the logits' dtype; `-inf` logits (banned
/// tokens) contribute 0.
pub fn entropy_per_token(logits: &Tensor) -> Tensor {
    let kind = if logits.kind() == Kind::Double { Kind::Double } else { Kind::Float };
    let logp = logits.log_softmax(-1, kind);
    let p = logp.exp();
    // 0 * -inf would be NaN; a finite floor makes it 0 and is exact for every p > 0 in range.
    let floor = if kind == Kind::Double { f64::MIN } else { f32::MIN as f64 };
    -(p * logp.clamp_min(floor)).sum_dim_intlist(-1, false, kind)
}

/// Mean policy entropy over valid tokens: `masked_mean(H(logits[b, t, :]), mask)` with `H` from
/// [`entropy_per_token`]; `logits` is `[b, t, V]`, `mask` `[b, t]`.
pub fn entropy_from_logits(logits: &Tensor, mask: &Tensor) -> Tensor {
    let h = entropy_per_token(logits);
    assert_same_shape("entropy_from_logits logits[..-1]/mask", &h, mask);
    masked_mean(&h, &mask.to_kind(h.kind()))
}

/// Missing-EOS penalty (TRL's `missing_eos_penalty`): `score - penalty * [!has_eos]`, so a
/// response that was cut at the length limit without an EOS token scores `penalty` lower.
/// `score` is `[b]` float, `has_eos` is `[b]` bool.
pub fn apply_missing_eos_penalty(score: &Tensor, has_eos: &Tensor, penalty: f64) -> Tensor {
    assert_same_shape("apply_missing_eos_penalty", score, has_eos);
    let missing = has_eos.to_kind(Kind::Bool).logical_not().to_kind(score.kind());
    score - missing * penalty
}

/// Reward clipping (TRL's `score_clip`): `clamp(score, -clip, clip)` when `clip` is set,
/// otherwise the score unchanged.
pub fn clip_score(score: &Tensor, clip: Option<f64>) -> Tensor {
    match clip {
        Some(c) => score.clamp(-c, c),
        None => score.shallow_clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn scalar(x: &Tensor) -> f64 {
        x.double_value(&[])
    }

    #[test]
    fn policy_loss_without_update_is_minus_mean_advantage() {
        tch::manual_seed(5);
        let logp = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let adv = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let mask = Tensor::from_slice(&[1.0f32, 1., 1., 1., 1., 1., 0., 0., 1., 0., 0., 0.]).reshape([3, 4]);
        let out = policy_loss(&logp, &logp, &adv, &mask, 0.2);
        assert!((scalar(&out.loss) + scalar(&masked_mean(&adv, &mask))).abs() < 1e-6);
        assert_eq!(scalar(&out.clip_frac), 0.0);
        assert_eq!(scalar(&out.approx_kl), 0.0);
    }

    #[test]
    fn policy_loss_clips_and_ignores_padding() {
        // One token, A = 1, ratio = e^1 > 1.2: clipped, loss = -1.2, no gradient.
        let new = Tensor::from_slice(&[0.0f32, f32::NAN]).reshape([1, 2]).set_requires_grad(true);
        let old = Tensor::from_slice(&[-1.0f32, 0.0]).reshape([1, 2]);
        let adv = Tensor::from_slice(&[1.0f32, 0.0]).reshape([1, 2]);
        let mask = Tensor::from_slice(&[1.0f32, 0.0]).reshape([1, 2]);
        let out = policy_loss(&new, &old, &adv, &mask, 0.2);
        assert!((scalar(&out.loss) + 1.2).abs() < 1e-6);
        assert_eq!(scalar(&out.clip_frac), 1.0);
        assert!((scalar(&out.approx_kl) - 0.5).abs() < 1e-6);
        out.loss.backward();
        assert_eq!(new.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
    }

    #[test]
    fn value_loss_clips() {
        let v_new = Tensor::from_slice(&[1.0f32, 0.05]).reshape([1, 2]);
        let v_old = Tensor::from_slice(&[0.0f32, 0.0]).reshape([1, 2]);
        let ret = Tensor::from_slice(&[0.0f32, 1.0]).reshape([1, 2]);
        let mask = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
        let out = value_loss(&v_new, &v_old, &ret, &mask, 0.2);
        // Token 0: err1 = 1, clipped 0.2 -> err2 = 0.04, max 1. Token 1: in range, err = 0.9025.
        assert!((scalar(&out.loss) - 0.5 * (1.0 + 0.9025) / 2.0).abs() < 1e-6);
        assert_eq!(scalar(&out.clip_frac), 0.0);
        let v_new = Tensor::from_slice(&[-1.0f32, 0.0]).reshape([1, 2]);
        let ret = Tensor::from_slice(&[-2.0f32, 0.0]).reshape([1, 2]);
        // Token 0: err1 = 1, clipped -0.2 -> err2 = 3.24 > 1: counted as clipped.
        let out = value_loss(&v_new, &v_old, &ret, &mask, 0.2);
        assert!((scalar(&out.clip_frac) - 0.5).abs() < 1e-6);
        assert!((scalar(&out.loss) - 0.5 * 3.24 / 2.0).abs() < 1e-6);
    }

    #[test]
    fn entropy_of_uniform_and_banned_tokens() {
        let v = 8;
        let logits = Tensor::zeros([2, 3, v], (Kind::Float, Device::Cpu));
        let mask = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        assert!((scalar(&entropy_from_logits(&logits, &mask)) - (v as f64).ln()).abs() < 1e-6);
        // Half the vocabulary banned: entropy ln(v/2), not NaN; bf16 logits work too.
        let banned = Tensor::arange(v, (Kind::Int64, Device::Cpu)).ge(v / 2).reshape([1, 1, v]);
        let logits = logits.masked_fill(&banned, f64::NEG_INFINITY).to_kind(Kind::BFloat16);
        assert!((scalar(&entropy_from_logits(&logits, &mask)) - ((v / 2) as f64).ln()).abs() < 1e-6);
    }

    #[test]
    fn eos_penalty_and_score_clip() {
        let score = Tensor::from_slice(&[1.0f32, -7.0, 3.0]);
        let has_eos = Tensor::from_slice(&[true, false, false]);
        let s = apply_missing_eos_penalty(&score, &has_eos, 1.5);
        assert_eq!(Vec::<f32>::try_from(&s).unwrap(), vec![1.0, -8.5, 1.5]);
        let c = clip_score(&s, Some(2.0));
        assert_eq!(Vec::<f32>::try_from(&c).unwrap(), vec![1.0, -2.0, 1.5]);
        assert_eq!(Vec::<f32>::try_from(&clip_score(&s, None)).unwrap(), vec![1.0, -8.5, 1.5]);
    }
}
