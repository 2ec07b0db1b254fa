//! KL penalty against the reference model: per-token estimators, KL-penalised per-token rewards,
//! and the fixed / adaptive KL coefficient controllers (TRL's formulas).
//!
//! Shapes are `[b, t]` over response tokens unless stated; `mask` is 1.0 on valid tokens.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::gae::assert_same_shape;

/// Per-token estimator of KL(policy || reference) from log-probabilities of the sampled tokens
/// (J. Schulman, "Approximating KL divergence"; TRL's `kl_estimator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `k1 = logp - ref_logp`: unbiased, high variance, can be negative per token.
    #[default]
    K1,
    /// `k3 = (r - 1) - log r` with `r = exp(ref_logp - logp)`: unbiased, lower variance, >= 0.
    K3,
}

/// Per-token KL estimate, unmasked, same shape as the inputs:
/// k1: `logp - ref_logp`; k3: `(exp(ref_logp - logp) - 1) - (ref_logp - logp)`.
pub fn kl_per_token(logp: &Tensor, ref_logp: &Tensor, est: KlEstimator) -> Tensor {
    assert_same_shape("kl_per_token", logp, ref_logp);
    match est {
        KlEstimator::K1 => logp - ref_logp,
        KlEstimator::K3 => {
            let log_r = ref_logp - logp;
            (log_r.exp() - 1.0) - log_r
        }
    }
}

/// KL-penalised per-token rewards (TRL style). Returns `(rewards, kl)`, both `[b, t]`:
///
/// ```text
/// kl[i, t]      = kl_per_token(logp, ref_logp, est)[i, t] * mask[i, t]
/// rewards[i, t] = -kl_coef * kl[i, t] + score[i] * [t == last valid token of row i]
/// ```
///
/// `score` is `[b]` (the reward model's sequence score, after any missing-EOS penalty and
/// clipping). The "last valid token" is the largest `t` with `mask[i, t] > 0`; a row with no valid
/// token gets no score. Padded positions are zero in both outputs whatever `logp` / `ref_logp`
/// hold there (even inf or NaN).
pub fn penalized_rewards(
    score: &Tensor,
    logp: &Tensor,
    ref_logp: &Tensor,
    mask: &Tensor,
    kl_coef: f64,
    est: KlEstimator,
) -> (Tensor, Tensor) {
    assert_same_shape("penalized_rewards logp/mask", logp, mask);
    let size = mask.size();
    assert!(size.len() == 2, "penalized_rewards: expected [b, t] tensors, got {size:?}");
    let score_size = score.size();
    assert!(score_size == [size[0]], "penalized_rewards: score must be [{}], got {score_size:?}", size[0]);
    let valid = mask.gt(0.0);
    let kl = kl_per_token(logp, ref_logp, est).masked_fill(&valid.logical_not(), 0.0);
    // 1 + t on valid tokens, 0 elsewhere; its argmax is the last valid index.
    let pos = Tensor::arange(size[1], (Kind::Int64, mask.device())).unsqueeze(0) + 1;
    let last = (pos * valid.to_kind(Kind::Int64)).argmax(1, true);
    let any_valid = valid.any_dim(1, true).to_kind(logp.kind());
    let at_last = logp.zeros_like().scatter(1, &last, &any_valid);
    let rewards = &kl * (-kl_coef) + at_last * score.to_kind(logp.kind()).unsqueeze(1);
    (rewards, kl)
}

/// Controller of the KL coefficient `beta` in `rewards = score - beta * KL`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum KlController {
    /// `beta` stays at `coef`.
    Fixed { coef: f64 },
    /// Ziegler et al. 2019 / TRL's `AdaptiveKLController`: `coef` is the current `beta`, moved
    /// towards the KL `target` with time constant `horizon` (in samples).
    Adaptive { coef: f64, target: f64, horizon: f64 },
}

impl KlController {
    /// The current coefficient `beta`.
    pub fn coef(&self) -> f64 {
        match *self {
            KlController::Fixed { coef } | KlController::Adaptive { coef, .. } => coef,
        }
    }

    /// After a batch of `n_steps` samples whose observed KL is `current_kl` (TRL: the mean over
    /// sequences of the summed per-token KL, and the batch size):
    ///
    /// ```text
    /// e     = clip(current_kl / target - 1, -0.2, 0.2)
    /// coef *= 1 + e * n_steps / horizon
    /// ```
    ///
    /// `Fixed` does nothing. A non-finite `current_kl` leaves `coef` unchanged (TRL would turn it
    /// into NaN).
    pub fn update(&mut self, current_kl: f64, n_steps: usize) {
        match self {
            KlController::Fixed { .. } => {}
            KlController::Adaptive { coef, target, horizon } => {
                if !current_kl.is_finite() {
                    return;
                }
                let error = (current_kl / *target - 1.0).clamp(-0.2, 0.2);
                *coef *= 1.0 + error * n_steps as f64 / *horizon;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn rows(x: &Tensor) -> Vec<Vec<f64>> {
        super::super::gae::to_rows(x)
    }

    #[test]
    fn estimators_are_zero_when_policies_agree_and_k3_is_nonnegative() {
        tch::manual_seed(1);
        let a = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([3, 4], (Kind::Float, Device::Cpu));
        for est in [KlEstimator::K1, KlEstimator::K3] {
            assert_eq!(kl_per_token(&a, &a, est).abs().max().double_value(&[]), 0.0);
        }
        assert!(kl_per_token(&a, &b, KlEstimator::K3).min().double_value(&[]) >= 0.0);
        let k1 = kl_per_token(&a, &b, KlEstimator::K1);
        assert_eq!((k1 - (&a - &b)).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn score_lands_on_last_valid_token() {
        let mask = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]).reshape([2, 5]);
        let logp = Tensor::full([2, 5], f64::NEG_INFINITY, (Kind::Float, Device::Cpu));
        let logp = logp.masked_fill(&mask.gt(0.0), -1.0);
        let ref_logp = logp.masked_fill(&mask.gt(0.0), -1.5);
        let score = Tensor::from_slice(&[2.0f32, 7.0]);
        let (rewards, kl) = penalized_rewards(&score, &logp, &ref_logp, &mask, 0.1, KlEstimator::K1);
        let r = rows(&rewards);
        let k = rows(&kl);
        for t in 0..5 {
            assert!((k[0][t] - 0.5).abs() < 1e-6);
            let want = -0.05 + if t == 4 { 2.0 } else { 0.0 };
            assert!((r[0][t] - want).abs() < 1e-6, "row 0 t {t}: {}", r[0][t]);
        }
        // The empty row gets neither penalty nor score, and no NaN from the -inf padding.
        assert_eq!(r[1], vec![0.0; 5]);
        assert_eq!(k[1], vec![0.0; 5]);
    }

    #[test]
    fn estimator_serde_is_lowercase() {
        assert_eq!(serde_json::to_string(&KlEstimator::K3).unwrap(), "\"k3\"");
        let e: KlEstimator = serde_json::from_str("\"k1\"").unwrap();
        assert_eq!(e, KlEstimator::K1);
    }

    #[test]
    fn adaptive_controller_follows_trl() {
        let mut c = KlController::Adaptive { coef: 0.2, target: 6.0, horizon: 10000.0 };
        // KL far above target: error clipped to +0.2.
        c.update(60.0, 256);
        assert!((c.coef() - 0.2 * (1.0 + 0.2 * 256.0 / 10000.0)).abs() < 1e-15);
        // KL at target/2: error -0.5, clipped to -0.2.
        let before = c.coef();
        c.update(3.0, 256);
        assert!((c.coef() - before * (1.0 - 0.2 * 256.0 / 10000.0)).abs() < 1e-15);
        // Small error is proportional.
        let before = c.coef();
        c.update(6.6, 100);
        assert!((c.coef() - before * (1.0 + 0.1 * 100.0 / 10000.0)).abs() < 1e-15);
        let before = c.coef();
        c.update(f64::NAN, 100);
        assert_eq!(c.coef(), before);
        let mut f = KlController::Fixed { coef: 0.05 };
        f.update(100.0, 64);
        assert_eq!(f.coef(), 0.05);
    }
}
