//! Masked statistics and generalised advantage estimation (GAE) over response tokens.
//!
//! Every tensor here is `[b, t]` over the response tokens of a batch, with `mask` 1.0 on valid
//! tokens and 0.0 after EOS / on padding. The formulas are TRL's (`masked_mean`, `masked_var`,
//! `masked_whiten`, the GAE loop of its PPO trainer); `scripts/ppo_reference.py` recomputes them
//! in plain PyTorch and `worker/tests/ppo_math.rs` checks this module against it.

use tch::{Kind, Tensor};

/// Epsilon inside the square root of [`masked_whiten`] (TRL's value).
pub const WHITEN_EPS: f64 = 1e-8;

/// Panics with a readable message when two tensors that must align do not.
pub(crate) fn assert_same_shape(what: &str, a: &Tensor, b: &Tensor) {
    let (sa, sb) = (a.size(), b.size());
    assert!(sa == sb, "{what}: shapes differ: {sa:?} vs {sb:?}");
}

/// `x * mask` with masked-out entries set to exactly 0, even where `x` is inf or NaN (a plain
/// product would give NaN there). Gradients to masked-out entries are 0.
pub fn apply_mask(x: &Tensor, mask: &Tensor) -> Tensor {
    (x * mask).masked_fill(&mask.eq(0.0), 0.0)
}

/// Masked mean over all elements: `sum(x * mask) / sum(mask)`.
///
/// Differs from TRL only in degenerate cases: for an all-zero mask TRL divides 0 by 0 (NaN), this
/// returns 0 so that an empty minibatch cannot poison a loss (the denominator is
/// `max(sum(mask), 1e-8)`, exactly `sum(mask)` for a 0/1 mask with a valid token); and masked-out
/// entries of `x` may hold anything, inf and NaN included (see [`apply_mask`]).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    assert_same_shape("masked_mean", x, mask);
    apply_mask(x, mask).sum(x.kind()) / mask.sum(x.kind()).clamp_min(1e-8)
}

/// Masked variance about the masked mean `m`:
/// `v = masked_mean((x - m)^2, mask)`, times the Bessel correction `n / (n - 1)` with
/// `n = sum(mask)` when `unbiased` (TRL's default, used by [`masked_whiten`]).
///
/// Where TRL raises (n = 0) or divides by zero (n = 1), the correction is skipped, so a single
/// valid token has variance 0 rather than NaN.
pub fn masked_var(x: &Tensor, mask: &Tensor, unbiased: bool) -> Tensor {
    let mean = masked_mean(x, mask);
    let centered = x - &mean;
    let var = masked_mean(&(&centered * &centered), mask);
    if !unbiased {
        return var;
    }
    let n = mask.sum(x.kind());
    let corr = (&n / (&n - 1.0)).where_scalarother(&n.gt(1.0), 1.0);
    var * corr
}

/// Whitening with masked statistics (TRL's `masked_whiten`):
/// `(x - m) * rsqrt(v + 1e-8)` with `m = masked_mean(x, mask)` and
/// `v = masked_var(x, mask, unbiased = true)` (Bessel-corrected, as TRL).
/// With `shift_mean = false` the mean is added back: `(x - m) * rsqrt(v + 1e-8) + m`
/// (TRL's `whiten_rewards`).
///
/// Every element is transformed, masked or not; callers that need zeros past the mask (TRL zeroes
/// whitened advantages on padding) multiply by `mask` afterwards.
pub fn masked_whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Tensor {
    let mean = masked_mean(x, mask);
    let var = masked_var(x, mask, true);
    let whitened = (x - &mean) * (var + WHITEN_EPS).rsqrt();
    if shift_mean {
        whitened
    } else {
        whitened + mean
    }
}

/// Generalised advantage estimation, vectorised over the batch: returns `(advantages, returns)`,
/// both `[b, t]`.
///
/// As TRL's `compute_advantages`, rewards and values are first multiplied by `mask` (here with
/// [`apply_mask`], so padding may even hold NaN): a value past a row's last valid token counts as
/// 0, so the episode ends there and the last valid token bootstraps from nothing. Then, with
/// `V[t] = 0` for `t >= T`:
///
/// ```text
/// delta[t] = r[t] + gamma * V[t+1] - V[t]
/// A[t]     = delta[t] + gamma * lam * A[t+1]        (A[T] = 0)
/// returns  = A + V                                   (masked V)
/// ```
///
/// `delta` is computed for the whole tensor at once; the recurrence runs over the `t` columns in
/// reverse, one batched op per step. Advantages and returns past the mask are 0. The advantages
/// are NOT whitened: TRL computes `returns` first and then whitens the advantages with
/// `masked_whiten(adv, mask, true)`; callers do the same (and zero them past the mask if needed).
pub fn gae(rewards: &Tensor, values: &Tensor, mask: &Tensor, gamma: f64, lam: f64) -> (Tensor, Tensor) {
    assert_same_shape("gae rewards/values", rewards, values);
    assert_same_shape("gae rewards/mask", rewards, mask);
    let size = rewards.size();
    assert!(size.len() == 2, "gae: expected [b, t] tensors, got {size:?}");
    let t_len = size[1];
    if t_len == 0 {
        return (values.zeros_like(), values.zeros_like());
    }
    let values = apply_mask(values, mask);
    let rewards = apply_mask(rewards, mask);
    // V[t+1], with V[T] = 0.
    let next_values = Tensor::cat(&[values.narrow(1, 1, t_len - 1), values.narrow(1, 0, 1).zeros_like()], 1);
    let deltas = rewards + next_values * gamma - &values;
    let mut last = deltas.select(1, 0).zeros_like();
    let mut columns = Vec::with_capacity(t_len as usize);
    for t in (0..t_len).rev() {
        last = deltas.select(1, t) + last * (gamma * lam);
        columns.push(last.shallow_clone());
    }
    columns.reverse();
    let advantages = Tensor::stack(&columns, 1);
    let returns = &advantages + &values;
    (advantages, returns)
}

/// Plain scalar reference for [`gae`] (one row at a time, `f64`), used by tests to check the
/// vectorised version. Same formula: rewards and values multiplied by the mask, `V[T] = 0`,
/// `delta[t] = r[t] + gamma V[t+1] - V[t]`, `A[t] = delta[t] + gamma lam A[t+1]`,
/// `returns = A + V`. Rows are `[b][t]`; all three inputs must have the same shape.
pub fn gae_loop(
    rewards: &[Vec<f64>],
    values: &[Vec<f64>],
    mask: &[Vec<f64>],
    gamma: f64,
    lam: f64,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut returns = Vec::with_capacity(rewards.len());
    for ((r, v), m) in rewards.iter().zip(values).zip(mask) {
        let n = r.len();
        assert!(v.len() == n && m.len() == n, "gae_loop: ragged row");
        let mut adv = vec![0.0; n];
        let mut last = 0.0;
        for t in (0..n).rev() {
            let next_value = if t + 1 < n { v[t + 1] * m[t + 1] } else { 0.0 };
            let delta = r[t] * m[t] + gamma * next_value - v[t] * m[t];
            last = delta + gamma * lam * last;
            adv[t] = last;
        }
        let ret = adv.iter().zip(v).zip(m).map(|((a, v), m)| a + v * m).collect();
        advantages.push(adv);
        returns.push(ret);
    }
    (advantages, returns)
}

/// Converts a `[b, t]` tensor to rows of `f64` (for tests and debugging).
pub fn to_rows(x: &Tensor) -> Vec<Vec<f64>> {
    let x = x.to_kind(Kind::Double).to_device(tch::Device::Cpu).contiguous();
    let size = x.size();
    assert!(size.len() == 2, "to_rows: expected [b, t], got {size:?}");
    (0..size[0]).map(|i| Vec::<f64>::try_from(&x.get(i)).expect("double row")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A ragged 0/1 mask: row i keeps its first `lens[i]` tokens.
    fn ragged_mask(lens: &[i64], t: i64, kind: Kind) -> Tensor {
        let idx = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let lens = Tensor::from_slice(lens).unsqueeze(1);
        idx.lt_tensor(&lens).to_kind(kind)
    }

    fn max_abs_diff_rows(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
        a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    fn check_against_loop(kind: Kind, tol: f64) {
        tch::manual_seed(7);
        let lens = [9, 4, 1, 0, 7, 9];
        let (b, t) = (lens.len() as i64, 9);
        for &(gamma, lam) in &[(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)] {
            let rewards = Tensor::randn([b, t], (kind, Device::Cpu));
            let values = Tensor::randn([b, t], (kind, Device::Cpu));
            let mask = ragged_mask(&lens, t, kind);
            let (adv, ret) = gae(&rewards, &values, &mask, gamma, lam);
            let (adv_ref, ret_ref) = gae_loop(&to_rows(&rewards), &to_rows(&values), &to_rows(&mask), gamma, lam);
            let da = max_abs_diff_rows(&to_rows(&adv), &adv_ref);
            let dr = max_abs_diff_rows(&to_rows(&ret), &ret_ref);
            assert!(da < tol, "{kind:?} gamma={gamma} lam={lam}: advantages differ by {da}");
            assert!(dr < tol, "{kind:?} gamma={gamma} lam={lam}: returns differ by {dr}");
        }
    }

    #[test]
    fn vectorised_gae_equals_loop_f64() {
        check_against_loop(Kind::Double, 1e-9);
    }

    #[test]
    fn vectorised_gae_equals_loop_f32() {
        check_against_loop(Kind::Float, 1e-6);
    }

    #[test]
    fn gae_is_zero_past_mask_and_ignores_padding_values() {
        let mask = ragged_mask(&[3, 1], 5, Kind::Float);
        let rewards = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        let values = Tensor::randn([2, 5], (Kind::Float, Device::Cpu));
        let (adv, ret) = gae(&rewards, &values, &mask, 1.0, 0.95);
        let pad = mask.ones_like() - &mask;
        assert_eq!((&adv * &pad).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!((&ret * &pad).abs().sum(Kind::Float).double_value(&[]), 0.0);
        // Garbage in padded positions, NaN included, changes nothing.
        let noisy_r = &rewards + &pad * 100.0;
        let noisy_v = values.masked_fill(&pad.gt(0.0), f64::NAN);
        let (adv2, ret2) = gae(&noisy_r, &noisy_v, &mask, 1.0, 0.95);
        assert_eq!((&adv - adv2).abs().max().double_value(&[]), 0.0);
        assert_eq!((&ret - ret2).abs().max().double_value(&[]), 0.0);
    }

    #[test]
    fn single_step_gae_is_reward_minus_value() {
        // One valid token: A = r - V, returns = r.
        let r = Tensor::from_slice(&[2.0f32, 0.0]).reshape([1, 2]);
        let v = Tensor::from_slice(&[0.5f32, 9.0]).reshape([1, 2]);
        let m = Tensor::from_slice(&[1.0f32, 0.0]).reshape([1, 2]);
        let (adv, ret) = gae(&r, &v, &m, 0.9, 0.8);
        assert_eq!(to_rows(&adv), vec![vec![1.5, 0.0]]);
        assert_eq!(to_rows(&ret), vec![vec![2.0, 0.0]]);
    }

    #[test]
    fn masked_stats_handle_empty_and_single_token_masks() {
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).reshape([1, 3]);
        let empty = x.zeros_like();
        assert_eq!(masked_mean(&x, &empty).double_value(&[]), 0.0);
        let one = Tensor::from_slice(&[0.0f32, 1.0, 0.0]).reshape([1, 3]);
        assert_eq!(masked_var(&x, &one, true).double_value(&[]), 0.0);
        assert!(masked_whiten(&x, &one, true).isfinite().all().int64_value(&[]) == 1);
        let full = x.ones_like();
        // Unbiased variance of 1, 2, 3 is 1; biased is 2/3.
        assert!((masked_var(&x, &full, true).double_value(&[]) - 1.0).abs() < 1e-6);
        assert!((masked_var(&x, &full, false).double_value(&[]) - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn whiten_has_zero_mean_unit_variance_on_mask() {
        tch::manual_seed(3);
        let x = Tensor::randn([4, 6], (Kind::Float, Device::Cpu)) * 3.0 + 1.5;
        let mask = ragged_mask(&[6, 2, 5, 3], 6, Kind::Float);
        let w = masked_whiten(&x, &mask, true);
        assert!(masked_mean(&w, &mask).double_value(&[]).abs() < 1e-5);
        assert!((masked_var(&w, &mask, true).double_value(&[]) - 1.0).abs() < 1e-5);
        let w2 = masked_whiten(&x, &mask, false);
        let m = masked_mean(&x, &mask);
        assert!((w2 - w - m).abs().max().double_value(&[]) < 1e-6);
    }
}
