//! The math of the group-sampling stages, as TRL 1.12 writes it: GRPO's
//! and RLOO's advantages from the rewards of `g` completions per prompt
//! (consecutive rows), GRPO's clipped per-token loss with clip-higher and
//! the k3 KL, its three aggregations, and RLOO's sequence-level loss.
//! Losses are returned as sums over the given rows divided by a
//! denominator the caller computes for the whole minibatch, so the parts
//! of data-parallel ranks add up to the loss one worker would take.

use tch::{Kind, Tensor};

/// Stabiliser of the std divisions (TRL's 1e-4).
const STD_EPS: f64 = 1e-4;

/// GRPO advantages `[n]`: reward minus its group's mean, divided by the
/// (Bessel-corrected) std of the group (`"group"`), of the whole batch
/// (`"batch"`), or not (`"none"`).
pub fn grpo_advantages(rewards: &Tensor, g: i64, scale: &str) -> Tensor {
    let r = rewards.to_kind(Kind::Float).view([-1, g]);
    let centered = (&r - r.mean_dim(1, true, Kind::Float)).view([-1]);
    match scale {
        "group" => centered / (r.std_dim(1, true, true).expand_as(&r).reshape([-1]) + STD_EPS),
        "batch" => centered / (rewards.to_kind(Kind::Float).std(true) + STD_EPS),
        _ => centered,
    }
}

/// RLOO advantages `[n]`: reward minus the mean of the other `g − 1`
/// rewards of its group, optionally normalized over the batch.
pub fn rloo_advantages(rewards: &Tensor, g: i64, normalize: bool) -> Tensor {
    let r = rewards.to_kind(Kind::Float).view([-1, g]);
    let baseline = (r.sum_dim_intlist(1, true, Kind::Float) - &r) / (g - 1) as f64;
    let adv = (r - baseline).view([-1]);
    if normalize {
        (&adv - adv.mean(Kind::Float)) / (adv.std(true) + STD_EPS)
    } else {
        adv
    }
}

/// The clipping of GRPO and RLOO.
#[derive(Clone, Copy, Debug)]
pub struct Clip {
    pub low: f64,
    pub high: f64,
}

/// What a loss gives: the loss part (with a graph), and sums over the rows'
/// valid tokens (sequences for RLOO) of clipped ratios and of the k3 KL.
pub struct GroupLossOut {
    pub loss: Tensor,
    pub clipped: f64,
    pub kl: f64,
}

/// GRPO's loss on rows `logp` `[b, T]` (with a graph), `old` and
/// `reference` `[b, T]`, advantages `[b]`, `mask` `[b, T]`:
/// `−min(ρA, clip(ρ, 1−ε, 1+ε_high)A) + β·k3` per token (`k3·ρ` with
/// `bias_correction`, TRL's default), aggregated as
/// `loss_type`: `grpo` Σ_rows mean_tokens, `dr_grpo` and `dapo` Σ tokens;
/// divided by `denom` (the minibatch's rows, rows × max_new_tokens, or its
/// token normaliser).
#[allow(clippy::too_many_arguments)]
pub fn grpo_loss(
    logp: &Tensor,
    old: &Tensor,
    reference: Option<&Tensor>,
    adv: &Tensor,
    mask: &Tensor,
    clip: Clip,
    beta: f64,
    bias_correction: bool,
    loss_type: &str,
    denom: f64,
) -> GroupLossOut {
    let coef_1 = (logp - old).exp();
    let coef_2 = coef_1.clamp(1.0 - clip.low, 1.0 + clip.high);
    let a = adv.unsqueeze(1);
    let clipped_loss = -(&coef_1 * &a).minimum(&(&coef_2 * &a));
    let (per_token, kl) = match (reference, beta != 0.0) {
        (Some(r), true) => {
            let d = r - logp;
            let k3 = d.exp() - &d - 1.0;
            let k3 = if bias_correction { k3 * &coef_1 } else { k3 };
            let kl = tch::no_grad(|| (&k3 * mask).sum(Kind::Double).double_value(&[]));
            (clipped_loss + k3 * beta, kl)
        }
        _ => (clipped_loss, 0.0),
    };
    let masked = &per_token * mask;
    let loss = match loss_type {
        "grpo" => (masked.sum_dim_intlist(1, false, Kind::Float)
            / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0))
        .sum(Kind::Float),
        _ => masked.sum(Kind::Float),
    } / denom;
    let clipped = tch::no_grad(|| {
        let low = coef_1.lt(1.0 - clip.low).logical_and(&a.lt(0.0).expand_as(&coef_1));
        let high = coef_1.gt(1.0 + clip.high).logical_and(&a.gt(0.0).expand_as(&coef_1));
        (low.logical_or(&high).to_kind(Kind::Float) * mask).sum(Kind::Double).double_value(&[])
    });
    GroupLossOut { loss, clipped, kl }
}

/// RLOO's loss on rows: the sequence log-probs `Σ_t logp·mask` against the
/// old ones, `−min(ρA, clip(ρ)A)` per sequence, summed and divided by
/// `denom` (the minibatch's rows).
pub fn rloo_loss(logp: &Tensor, old: &Tensor, adv: &Tensor, mask: &Tensor, clip: Clip, denom: f64) -> GroupLossOut {
    let seq = (logp * mask).sum_dim_intlist(1, false, Kind::Float);
    let seq_old = (old * mask).sum_dim_intlist(1, false, Kind::Float);
    let coef_1 = (seq - seq_old).exp();
    let coef_2 = coef_1.clamp(1.0 - clip.low, 1.0 + clip.high);
    let loss = -(&coef_1 * adv).minimum(&(&coef_2 * adv)).sum(Kind::Float) / denom;
    let clipped = tch::no_grad(|| {
        let low = coef_1.lt(1.0 - clip.low).logical_and(&adv.lt(0.0));
        let high = coef_1.gt(1.0 + clip.high).logical_and(&adv.gt(0.0));
        low.logical_or(&high).to_kind(Kind::Float).sum(Kind::Double).double_value(&[])
    });
    GroupLossOut { loss, clipped, kl: 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(t: &Tensor) -> Vec<f32> {
        Vec::try_from(t).unwrap()
    }

    #[test]
    fn advantages_are_trls() {
        let r = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0, 2.0, 2.0]);
        // Groups of 3: [1, 0, 0] (mean 1/3, std 0.57735), [1, 2, 2] (mean 5/3, std 0.57735).
        let s = 0.57735027 + 1e-4;
        let want = [2.0 / 3.0 / s, -1.0 / 3.0 / s, -1.0 / 3.0 / s, -2.0 / 3.0 / s, 1.0 / 3.0 / s, 1.0 / 3.0 / s];
        for (g, w) in v(&grpo_advantages(&r, 3, "group")).iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        assert_eq!(
            v(&grpo_advantages(&r, 3, "none")).iter().map(|x| (x * 3.0).round()).collect::<Vec<_>>(),
            [2.0, -1.0, -1.0, -2.0, 1.0, 1.0]
        );
        // A group whose rewards are equal has zero advantages, not NaN.
        let flat = grpo_advantages(&Tensor::from_slice(&[1.0f32, 1.0]), 2, "group");
        assert_eq!(v(&flat), [0.0, 0.0]);
        // RLOO: r − mean of the others: [1 − 0, 0 − 0.5, 0 − 0.5, 1 − 2, 2 − 1.5, 2 − 1.5].
        assert_eq!(v(&rloo_advantages(&r, 3, false)), [1.0, -0.5, -0.5, -1.0, 0.5, 0.5]);
    }
}
