//! Activation checkpointing for training forwards: the forward keeps only
//! the input of each decoder block; the backward rebuilds one block's
//! activations at a time and backpropagates through it. Activation memory
//! drops from every block's intermediates to one block's plus the block
//! inputs, for one extra forward. Gradients equal those of the plain
//! forward (the same ops on the same inputs).

use tch::{Kind, Tensor};

use crate::error::Result;
use rlhf_model::peft::PeftModel;
use rlhf_model::Mask;

/// Backpropagates `head(hidden).0` where `hidden = pm.forward(ids, …)`, and
/// returns `head`'s other output. Gradients accumulate into the active
/// adapter's parameters (and whatever else `head` touches) as
/// `head(pm.forward(..)).0.backward()` would.
pub fn backward_checkpointed<T>(
    pm: &PeftModel,
    ids: &Tensor,
    positions: &Tensor,
    mask: &Mask<'_>,
    head: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
) -> Result<T> {
    let (m, hooks) = (&pm.base, pm.hooks());
    let rope = m.rope_tables(positions);
    let rope = (&rope.0, &rope.1);
    // Forward without a graph, keeping each block's input.
    let mut inputs = Vec::with_capacity(m.layers.len() + 1);
    tch::no_grad(|| -> Result<()> {
        let mut x = m.embed(ids, hooks)?;
        for li in 0..m.layers.len() {
            let next = m.block(li, &x, rope, mask, None, hooks)?;
            inputs.push(x);
            x = next;
        }
        inputs.push(x);
        Ok(())
    })?;
    // The head on the final norm, then the blocks from the top down.
    let top = inputs.pop().expect("the last block's output").set_requires_grad(true);
    let (loss, out) = head(&m.final_norm(&top, hooks))?;
    loss.backward();
    let mut grad = top.grad();
    for li in (0..m.layers.len()).rev() {
        let x = inputs.pop().expect("block input").set_requires_grad(true);
        let y = m.block(li, &x, rope, mask, None, hooks)?;
        pull(&y, &grad);
        grad = x.grad();
    }
    // Trainable embeddings (a full adapter's) get theirs too.
    let x0 = m.embed(ids, hooks)?;
    if x0.requires_grad() {
        pull(&x0, &grad);
    }
    Ok(out)
}

/// Backpropagates `head(hidden).0` for `hidden = pm.forward(ids, …)`, with
/// activation checkpointing when `recompute`, else through the plain graph.
pub fn backward<T>(
    pm: &PeftModel,
    (ids, positions, mask): (&Tensor, &Tensor, &Mask<'_>),
    recompute: bool,
    head: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
) -> Result<T> {
    if recompute {
        return backward_checkpointed(pm, ids, positions, mask, head);
    }
    let (loss, out) = head(&pm.forward(ids, positions, *mask, None)?)?;
    loss.backward();
    Ok(out)
}

/// Backpropagates `grad` (the gradient of the loss w.r.t. `y`) through `y`'s graph.
fn pull(y: &Tensor, grad: &Tensor) {
    if grad.defined() && y.requires_grad() {
        (y * grad).sum(Kind::Float).backward();
    }
}
