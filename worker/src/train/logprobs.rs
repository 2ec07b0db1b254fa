//! Log-probabilities of chosen tokens through the LM head, a few rows at a
//! time, so that `[rows, vocab]` logits in f32 never exist for more than one
//! chunk (the idea of Liger-Kernel's fused linear cross-entropy).
//!
//! Without gradients ([`token_logprobs`]) each chunk's logits are dropped as
//! soon as its log-probs (and entropies) are taken. With gradients
//! ([`backprop_through_head`]) each chunk's pass also takes, per row, the
//! gradient of that row's log-prob with respect to its hidden state (a
//! frozen head maps row i to logp_i alone); the loss is then taken on the
//! detached log-probs, and `∂loss/∂hidden = ∂loss/∂logp · (∂logp/∂hidden)`
//! is handed on to the trunk as the surrogate `Σ hidden · ∂loss/∂hidden`,
//! whose backward gives every trunk parameter the gradient the plain loss
//! would. A trainable head (the `full` method) needs its own gradient, so
//! then each chunk goes through the head a second time with the per-token
//! loss gradients. Either way the peak is one chunk's logits.

use tch::{Kind, Tensor};

use super::ppo::entropy_per_token;
use crate::error::Result;
use rlhf_model::peft::PeftModel;

/// f32 logits per chunk: rows × vocab ≤ this many elements (64 MiB).
const CHUNK_ELEMENTS: i64 = 1 << 24;

/// Rows per chunk for this model's vocabulary.
fn chunk_rows(pm: &PeftModel) -> i64 {
    (CHUNK_ELEMENTS / pm.base.cfg.vocab_size.max(1)).max(1)
}

/// `(start, len)` of consecutive chunks of at most `step` rows out of `n`.
fn spans(n: i64, step: i64) -> impl Iterator<Item = (i64, i64)> {
    let step = step.max(1);
    (0..n).step_by(step as usize).map(move |s| (s, step.min(n - s)))
}

/// Per-token log-probs (and entropies) of one chunk: `hidden` `[c, h]`,
/// `targets` `[c]`.
fn chunk(
    pm: &PeftModel,
    hidden: &Tensor,
    targets: &Tensor,
    temperature: f64,
    entropy: bool,
) -> (Tensor, Option<Tensor>) {
    let logits = pm.base.logits(hidden, pm.hooks()).to_kind(Kind::Float);
    let logits = if temperature == 1.0 { logits } else { logits / temperature };
    let chosen = logits.gather(1, &targets.unsqueeze(1), false).squeeze_dim(1);
    let logp = chosen - logits.logsumexp([-1], false);
    let ent = entropy.then(|| tch::no_grad(|| entropy_per_token(&logits)));
    (logp, ent)
}

/// `hidden` `[.., h]` and `targets` `[..]` as `[n, h]` and `[n]`.
fn flat(hidden: &Tensor, targets: &Tensor) -> (Tensor, Tensor) {
    let h = *hidden.size().last().unwrap_or(&0);
    (hidden.reshape([-1, h]), targets.reshape([-1]))
}

/// Log-probs of `targets` `[..]` at temperature `temperature` from hidden
/// states `hidden` `[.., h]` (shape of `targets`), with per-token entropies
/// when `entropy`; no graph is kept.
pub fn token_logprobs(
    pm: &PeftModel,
    hidden: &Tensor,
    targets: &Tensor,
    temperature: f64,
    entropy: bool,
) -> (Tensor, Option<Tensor>) {
    token_logprobs_in(pm, hidden, targets, temperature, entropy, chunk_rows(pm))
}

/// [`token_logprobs`] with `step` rows per chunk.
pub fn token_logprobs_in(
    pm: &PeftModel,
    hidden: &Tensor,
    targets: &Tensor,
    temperature: f64,
    entropy: bool,
    step: i64,
) -> (Tensor, Option<Tensor>) {
    tch::no_grad(|| {
        let shape = targets.size();
        let (h, t) = flat(hidden, targets);
        let n = t.size()[0];
        let (mut logps, mut ents) = (Vec::new(), Vec::new());
        for (s, c) in spans(n, step) {
            let (lp, e) = chunk(pm, &h.narrow(0, s, c), &t.narrow(0, s, c), temperature, entropy);
            logps.push(lp);
            ents.extend(e);
        }
        let join = |v: Vec<Tensor>| -> Tensor {
            if v.is_empty() {
                Tensor::zeros(shape.as_slice(), (Kind::Float, hidden.device()))
            } else {
                Tensor::cat(&v, 0).view(shape.as_slice())
            }
        };
        (join(logps), entropy.then(|| join(ents)))
    })
}

/// Takes `loss(logp, entropy)` of the log-probs of `targets` under `hidden`
/// (as [`token_logprobs`]), backpropagates it through the LM head chunk by
/// chunk (gradients reach any trainable head tensor), and returns the
/// surrogate whose backward carries the rest into the trunk, with `loss`'s
/// other output. The surrogate's value is not the loss.
pub fn backprop_through_head<T>(
    pm: &PeftModel,
    hidden: &Tensor,
    targets: &Tensor,
    temperature: f64,
    entropy: bool,
    loss: impl FnOnce(&Tensor, Option<&Tensor>) -> Result<(Tensor, T)>,
) -> Result<(Tensor, T)> {
    backprop_through_head_in(pm, hidden, targets, temperature, entropy, chunk_rows(pm), loss)
}

/// [`backprop_through_head`] with `step` rows per chunk.
pub fn backprop_through_head_in<T>(
    pm: &PeftModel,
    hidden: &Tensor,
    targets: &Tensor,
    temperature: f64,
    entropy: bool,
    step: i64,
    loss: impl FnOnce(&Tensor, Option<&Tensor>) -> Result<(Tensor, T)>,
) -> Result<(Tensor, T)> {
    let shape = targets.size();
    let (h, t) = flat(&hidden.detach(), targets);
    let n = t.size()[0];
    // A frozen head (every PEFT method but `full`) maps row i of `hidden`
    // to logp_i alone, so ∂logp_i/∂hidden_i (an h-vector per row) taken in
    // the same pass as logp_i gives ∂loss/∂hidden = ∂loss/∂logp · J without
    // a second pass. A trainable head needs its own gradient: two passes.
    let head_trains = pm.base.logits(&h.narrow(0, 0, n.min(1)), pm.hooks()).requires_grad();
    let (logp, ent, jac) = if head_trains || n == 0 {
        let (lp, e) = token_logprobs_in(pm, &h, &t, temperature, entropy, step);
        (lp.reshape([-1]), e.map(|e| e.reshape([-1])), None)
    } else {
        let (mut logps, mut ents, mut jacs) = (Vec::new(), Vec::new(), Vec::new());
        for (s, c) in spans(n, step) {
            let rows = h.narrow(0, s, c).detach().set_requires_grad(true);
            let (lp, e) = chunk(pm, &rows, &t.narrow(0, s, c), temperature, entropy);
            lp.sum(Kind::Float).backward();
            jacs.push(rows.grad());
            logps.push(lp.detach());
            ents.extend(e.map(|e| e.detach()));
        }
        let ent = entropy.then(|| Tensor::cat(&ents, 0));
        (Tensor::cat(&logps, 0), ent, Some(Tensor::cat(&jacs, 0)))
    };
    let logp = logp.view(shape.as_slice()).set_requires_grad(true);
    let ent = ent.map(|e| e.view(shape.as_slice()));
    let (l, out) = loss(&logp, ent.as_ref())?;
    if l.requires_grad() {
        l.backward();
    }
    let g = logp.grad();
    if !g.defined() || !hidden.requires_grad() {
        // Nothing upstream to train: a leaf whose backward is harmless.
        return Ok((Tensor::zeros([], (Kind::Float, hidden.device())).set_requires_grad(true), out));
    }
    let g = g.reshape([-1, 1]);
    let grad = match jac {
        Some(j) => j * g,
        None => {
            let rows = h.detach().set_requires_grad(true);
            for (s, c) in spans(n, step) {
                let (lp, _) = chunk(pm, &rows.narrow(0, s, c), &t.narrow(0, s, c), temperature, false);
                (lp * g.narrow(0, s, c).squeeze_dim(1)).sum(Kind::Float).backward();
            }
            rows.grad()
        }
    };
    let grad = grad.view(hidden.size().as_slice()).to_kind(hidden.kind());
    Ok(((hidden * grad).sum(Kind::Float), out))
}
