#!/usr/bin/env python3
"""Reference numbers for the PPO math in worker/src/train/ppo/ (gae.rs, kl.rs, loss.rs).

Run by hand (NOT in CI) with a Python that has torch and safetensors; the output is committed
and checked by worker/tests/ppo_math.rs:

    python scripts/ppo_reference.py [OUT]   # default: worker/tests/fixtures/ppo_reference.safetensors

Everything is deterministic (CPU, a seeded torch.Generator, float32 like a real PPO step; the KL
controller in float64). The formulas are TRL's PPO formulas, re-implemented here in plain torch
(TRL is not a dependency), written the way TRL writes them: row loops and the reversed GAE loop,
so they are independent of the vectorised Rust code.

Inputs (B = 4 rows, T = 6 response tokens, V = 7 vocabulary; row lengths 6, 4, 1, 3, so the
masks are ragged; padded positions hold large garbage values to show that they are ignored):

  in.mask         f32 [B, T]     1 on valid response tokens
  in.score        f32 [B]        reward-model scores
  in.has_eos      bool [B]       whether the response contains EOS
  in.logp         f32 [B, T]     rollout (old) policy log-probs of the sampled tokens
  in.ref_logp     f32 [B, T]     reference log-probs
  in.logp_new     f32 [B, T]     log-probs after a policy update
  in.values       f32 [B, T]     rollout critic values
  in.values_new   f32 [B, T]     critic values after an update
  in.x            f32 [B, T]     a tensor to whiten
  in.logits       f32 [B, T, V]  policy logits (for the entropy)
  in.kl_obs       f64 [K]        observed KLs fed to the adaptive controller, one per update
  in.kl_n_steps   i64 [K]        samples per update
  param.*         f64 [1]        scalars (kl_coef, gammas, lams, clips, controller settings)

Outputs (out.*), all computed from the inputs above:

  whiten.shift / whiten.noshift          masked_whiten(x, mask, shift_mean=True/False)
  var.unbiased / var.biased / mean       masked_var / masked_mean of x
  score_adj                              clip(score - penalty*[!has_eos], -clip, clip)
  kl.k1 / kl.k3, rewards.k1 / rewards.k3 penalised rewards from score_adj (kl_coef 0.05)
  gae{1,2}.adv / .ret / .adv_white       GAE on rewards.k1 and values for (gamma, lam) =
                                         (1, 0.95) and (0.9, 0.8); adv_white = masked_whiten(adv)
  pg.loss / pg.clip_frac / pg.approx_kl  policy loss with advantages gae1.adv_white, clip 0.2
  vf.loss / vf.clip_frac                 value loss with returns gae1.ret, clip 0.2
  entropy                                masked mean of the per-token entropy of in.logits
  kl_ctl.coef                            f64 [K] adaptive coefficient after each update
"""

import os
import sys

import torch
from safetensors.torch import save_file

B, T, V = 4, 6, 7
LENGTHS = [6, 4, 1, 3]
GARBAGE = 50.0

KL_COEF = 0.05
GAMMA_LAM = [(1.0, 0.95), (0.9, 0.8)]
CLIP = 0.2
CLIP_VALUE = 0.2
EOS_PENALTY = 1.0
SCORE_CLIP = 3.0
KL_INIT, KL_TARGET, KL_HORIZON = 0.2, 6.0, 10000.0
KL_OBS = [10.0, 3.0, 6.3, 5.9, 0.0]
KL_N_STEPS = [256, 256, 128, 64, 512]


# ---- TRL's formulas, plain torch -------------------------------------------------------------


def masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def masked_var(values, mask, unbiased=True):
    mean = masked_mean(values, mask)
    centered = values - mean
    variance = masked_mean(centered**2, mask)
    if unbiased:
        n = mask.sum()
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(values, mask, shift_mean=True):
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def kl_estimate(logp, ref_logp, est):
    logr = ref_logp - logp
    return -logr if est == "k1" else (logr.exp() - 1) - logr


def penalized_rewards(score, logp, ref_logp, mask, kl_coef, est):
    """Score at each row's last non-masked token, -kl_coef * kl on every valid token."""
    rewards, kls = [], []
    for s, lp, rlp, m in zip(score, logp, ref_logp, mask):
        kl = kl_estimate(lp, rlp, est) * m
        reward = -kl_coef * kl
        last = m.nonzero()[-1]
        reward[last] += s
        rewards.append(reward)
        kls.append(kl)
    return torch.stack(rewards), torch.stack(kls)


def compute_advantages(values, rewards, mask, gamma, lam):
    """TRL's compute_advantages minus the final whitening (kept separate here)."""
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    return advantages, returns


def policy_loss(logp_new, logp_old, advantages, mask, clip):
    ratio = torch.exp(logp_new - logp_old)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    clip_frac = masked_mean(torch.gt(pg_losses2, pg_losses).float(), mask)
    approx_kl = 0.5 * masked_mean((logp_new - logp_old) ** 2, mask)
    return loss, clip_frac, approx_kl


def value_loss(vpred, values, returns, mask, clip_value):
    vpredclipped = torch.clamp(vpred, values - clip_value, values + clip_value)
    vf_losses1 = (vpred - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    clip_frac = masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)
    return loss, clip_frac


def entropy_from_logits(logits):
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


class AdaptiveKLController:
    def __init__(self, init_kl_coef, target, horizon):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current, n_steps):
        proportional_error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


# ---- fixture ---------------------------------------------------------------------------------


def with_garbage(x, mask):
    """Fill padded positions with a large finite value: results must not depend on them."""
    return torch.where(mask > 0, x, torch.full_like(x, GARBAGE))


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "worker", "tests", "fixtures", "ppo_reference.safetensors"
    )
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(20240607)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * scale

    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).float()
    score = torch.tensor([2.5, -4.0, 0.7, 3.9], dtype=torch.float32)
    has_eos = torch.tensor([True, False, True, False])
    logp = with_garbage(-randn(B, T).abs() - 0.1, mask)
    ref_logp = with_garbage(logp - randn(B, T, scale=0.3), mask)
    # Some tokens move far enough for the ratio to be clipped, some stay inside.
    logp_new = with_garbage(logp + randn(B, T, scale=0.25), mask)
    values = with_garbage(randn(B, T), mask)
    values_new = with_garbage(values + randn(B, T, scale=0.3), mask)
    x = with_garbage(randn(B, T, scale=2.0) + 0.7, mask)
    logits = randn(B, T, V, scale=2.0)

    tensors = {
        "in.mask": mask,
        "in.score": score,
        "in.has_eos": has_eos,
        "in.logp": logp,
        "in.ref_logp": ref_logp,
        "in.logp_new": logp_new,
        "in.values": values,
        "in.values_new": values_new,
        "in.x": x,
        "in.logits": logits,
        "in.kl_obs": torch.tensor(KL_OBS, dtype=torch.float64),
        "in.kl_n_steps": torch.tensor(KL_N_STEPS, dtype=torch.int64),
    }
    params = {
        "kl_coef": KL_COEF,
        "gamma1": GAMMA_LAM[0][0],
        "lam1": GAMMA_LAM[0][1],
        "gamma2": GAMMA_LAM[1][0],
        "lam2": GAMMA_LAM[1][1],
        "clip": CLIP,
        "clip_value": CLIP_VALUE,
        "eos_penalty": EOS_PENALTY,
        "score_clip": SCORE_CLIP,
        "kl_init": KL_INIT,
        "kl_target": KL_TARGET,
        "kl_horizon": KL_HORIZON,
    }
    for k, v in params.items():
        tensors[f"param.{k}"] = torch.tensor([v], dtype=torch.float64)

    out = {}
    out["whiten.shift"] = masked_whiten(x, mask, shift_mean=True)
    out["whiten.noshift"] = masked_whiten(x, mask, shift_mean=False)
    out["var.unbiased"] = masked_var(x, mask, unbiased=True)
    out["var.biased"] = masked_var(x, mask, unbiased=False)
    out["mean"] = masked_mean(x, mask)

    score_adj = score.clone()
    score_adj[~has_eos] -= EOS_PENALTY
    score_adj = torch.clip(score_adj, -SCORE_CLIP, SCORE_CLIP)
    out["score_adj"] = score_adj

    for est in ("k1", "k3"):
        rewards, kl = penalized_rewards(score_adj, logp, ref_logp, mask, KL_COEF, est)
        out[f"rewards.{est}"] = rewards
        out[f"kl.{est}"] = kl

    for i, (gamma, lam) in enumerate(GAMMA_LAM, start=1):
        adv, ret = compute_advantages(values, out["rewards.k1"], mask, gamma, lam)
        out[f"gae{i}.adv"] = adv
        out[f"gae{i}.ret"] = ret
        out[f"gae{i}.adv_white"] = masked_whiten(adv, mask)

    loss, clip_frac, approx_kl = policy_loss(logp_new, logp, out["gae1.adv_white"], mask, CLIP)
    out["pg.loss"], out["pg.clip_frac"], out["pg.approx_kl"] = loss, clip_frac, approx_kl
    loss, clip_frac = value_loss(values_new, values, out["gae1.ret"], mask, CLIP_VALUE)
    out["vf.loss"], out["vf.clip_frac"] = loss, clip_frac
    out["entropy"] = masked_mean(entropy_from_logits(logits), mask)

    ctl = AdaptiveKLController(KL_INIT, KL_TARGET, KL_HORIZON)
    coefs = []
    for kl_obs, n in zip(KL_OBS, KL_N_STEPS):
        ctl.update(kl_obs, n)
        coefs.append(ctl.value)
    out["kl_ctl.coef"] = torch.tensor(coefs, dtype=torch.float64)

    # The fixture must exercise both sides of every clip.
    assert 0.0 < float(out["pg.clip_frac"]) < 1.0, out["pg.clip_frac"]
    assert 0.0 < float(out["vf.clip_frac"]) < 1.0, out["vf.clip_frac"]

    for k, v in out.items():
        tensors[f"out.{k}"] = v.contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_path, metadata={"generator": "scripts/ppo_reference.py"})
    print(f"wrote {len(tensors)} tensors to {os.path.normpath(out_path)}")
    for k in ("pg.loss", "pg.clip_frac", "pg.approx_kl", "vf.loss", "vf.clip_frac", "entropy", "var.unbiased"):
        print(f"  {k} = {float(out[k]):.6f}")
    print(f"  kl_ctl.coef = {coefs}")


if __name__ == "__main__":
    main()
