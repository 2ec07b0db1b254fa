//! The decode step at a fixed shape, what a CUDA graph records: after the
//! prefill, every step feeds `[rows, 1]` tokens from the same buffers,
//! writes its keys and values at a position held in a tensor
//! ([`KvCache::set_slot`]) and attends to every position of the static
//! cache under a `[rows, 1, 1, positions]` mask that gains a column per
//! step. Inputs are updated in place, so the step's kernels and addresses
//! never change: on a CUDA device it is recorded once and replayed
//! ([`Steps::Graph`]), elsewhere it runs op by op ([`Steps::Fixed`], which
//! CI checks against the eager loop).
//!
//! A graph's shape cannot shrink: finished rows decode padding (as the
//! plain loop's do) until half the batch has finished; then the live rows
//! move to the front of the cache and the step is recorded again at the
//! smaller shape.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use super::cache::KvCache;
use super::cuda_graph::{self, CudaGraph};
use super::hooks::Hooks;
use super::llama::{Mask, Model};
use super::options::{GenerateOptions, Generation, Rows, Steps};
use crate::error::{Error, Result};

/// Set once a capture has failed under [`Steps::Auto`]: later generations
/// use the eager loop.
static GRAPHS_FAILED: AtomicBool = AtomicBool::new(false);

/// Set once a replay on new inputs has matched the step run op by op (the
/// check runs once per process: it catches an input the graph does not see).
static UPDATES_CHECKED: AtomicBool = AtomicBool::new(false);

/// How the steps after the prefill run, `Auto` resolved for `device`:
/// graphs on a CUDA device when this build has them, unless
/// `RLHF_CUDA_GRAPHS=0` or a capture has failed in this process.
pub fn resolve(steps: Steps, device: Device) -> Steps {
    static ENV_OFF: OnceLock<bool> = OnceLock::new();
    let off = *ENV_OFF.get_or_init(|| std::env::var("RLHF_CUDA_GRAPHS").is_ok_and(|v| v == "0"));
    match steps {
        Steps::Auto if device.is_cuda() && cuda_graph::COMPILED && !off && !GRAPHS_FAILED.load(Ordering::Relaxed) => {
            Steps::Graph
        }
        Steps::Auto => Steps::Eager,
        s => s,
    }
}

/// The decode state after the prefill's token: each row's next input
/// token and position `[rows, 1]`, the key mask `[rows, filled]` (its last
/// column the position this step writes), the rows' outputs, finished
/// flags and sampling streams ([`Rows`]), and the output so far.
pub(crate) struct AfterPrefill {
    pub ids: Tensor,
    pub positions: Tensor,
    pub key_mask: Tensor,
    pub rows: Rows,
    pub out: Generation,
}

/// Decodes steps 1.. of `opts.max_new_tokens` at a fixed shape into the
/// static `cache` (made large enough first), recorded as a CUDA graph when
/// `steps` is [`Steps::Graph`] (`auto`: on a failed capture, or a first
/// replay on new inputs that differs from the step op by op, warn and go on
/// op by op; otherwise the failure is the error; other errors, such as
/// running out of memory, are errors either way).
pub(crate) fn decode(
    model: &Model,
    hooks: &dyn Hooks,
    opts: &GenerateOptions,
    cache: &mut KvCache,
    steps: Steps,
    auto: bool,
    state: AfterPrefill,
) -> Result<Generation> {
    let (rows, filled) = (state.key_mask.size()[0], state.key_mask.size()[1]);
    // The last step writes position filled - 2 + max_new_tokens and then
    // unmasks the next one.
    cache.reserve(rows, filled - 1 + opts.max_new_tokens as i64);
    let slot = Tensor::from_slice(&[filled - 1]).to_device(model.device);
    cache.set_slot(Some(slot.shallow_clone()));
    let out = run(model, hooks, opts, cache, steps == Steps::Graph, auto, slot, state);
    cache.set_slot(None);
    out
}

#[allow(clippy::too_many_arguments)]
fn run(
    model: &Model,
    hooks: &dyn Hooks,
    opts: &GenerateOptions,
    cache: &mut KvCache,
    mut graphs: bool,
    auto: bool,
    mut slot: Tensor,
    state: AfterPrefill,
) -> Result<Generation> {
    let device = model.device;
    let AfterPrefill { mut ids, mut positions, key_mask, rows: mut state, mut out } = state;
    let (rows, filled) = (key_mask.size()[0], key_mask.size()[1]);
    let capacity = cache.positions();
    let mask = Tensor::zeros([rows, capacity], (Kind::Bool, device));
    mask.narrow(1, 0, filled).copy_(&key_mask.ne(0));
    let mut mask = mask.view([rows, 1, 1, capacity]);
    let pad = Tensor::from(opts.pad_id).to_device(device);
    let mut graph: Option<(CudaGraph, Tensor)> = None;
    for _ in 1..opts.max_new_tokens {
        let mut step = || -> Result<Tensor> {
            let hidden = model.forward(&ids, &positions, Mask::Explicit(&mask), Some(&mut *cache), hooks)?;
            Ok(model.logits(&hidden.select(1, 0), hooks))
        };
        let (logits, failed) = match (&graph, graphs) {
            (Some((g, logits)), _) if UPDATES_CHECKED.load(Ordering::Relaxed) => {
                g.replay()?;
                (logits.shallow_clone(), None)
            }
            (Some((g, logits)), _) => {
                // The first replay on new inputs, against the step op by
                // op (which rewrites the same cache position).
                g.replay()?;
                let replayed = logits.copy();
                let eager = step()?;
                let checked = close(&replayed, &eager, "a replay on the next step's inputs");
                UPDATES_CHECKED.store(checked.is_ok(), Ordering::Relaxed);
                (eager, checked.err())
            }
            (None, true) => match captured(device, &mut step) {
                Ok((g, logits, eager)) => {
                    graph = Some((g, logits));
                    (eager, None)
                }
                // The step writes the same keys and values again.
                Err(e @ Error::CudaGraph(_)) => (step()?, Some(e)),
                Err(e) => return Err(e),
            },
            (None, false) => (step()?, None),
        };
        if let Some(e) = failed {
            if !auto {
                return Err(e);
            }
            GRAPHS_FAILED.store(true, Ordering::Relaxed);
            tracing::warn!("decoding without CUDA graphs from now on: {e}");
            (graph, graphs) = (None, false);
        }
        let (next, all_done) = state.step(&logits, opts, &pad, &mut out)?;
        if all_done {
            break;
        }
        // The next step's inputs, in place: its tokens, positions, and the
        // position it writes, which its own query may see.
        ids.copy_(&next.unsqueeze(1));
        let _ = positions.f_add_scalar_(1)?;
        let _ = slot.f_add_scalar_(1)?;
        let _ = mask.f_index_fill_(3, &slot, 1)?;
        // Once half the rows have finished they leave: the rest move to the
        // front of the cache and the step is recorded again at the smaller
        // shape (a capture costs a few steps' host time, so it waits for
        // half; at most log2(rows) of them per generation).
        let keep = state.unfinished();
        if keep.len() * 2 <= state.live.len() {
            let index = Tensor::from_slice(&keep).to_device(device);
            cache.select_rows(&index);
            ids = ids.index_select(0, &index);
            positions = positions.index_select(0, &index);
            mask = mask.index_select(0, &index);
            state.keep(&keep);
            graph = None;
        }
    }
    Ok(out)
}

/// A graph of `step`: run once on the graph's stream (the warm-up, whose
/// logits this step uses), recorded, replayed once and checked against the
/// warm-up (the same inputs, so the same logits to rounding; the replay
/// rewrites the same cache position). Returns the graph, the logits
/// tensor its replays rewrite, and the warm-up's logits.
fn captured(device: Device, step: &mut dyn FnMut() -> Result<Tensor>) -> Result<(CudaGraph, Tensor, Tensor)> {
    let Device::Cuda(index) = device else {
        return Err(Error::CudaGraph(format!("CUDA graphs need a CUDA device, not {device:?}")));
    };
    let mut graph = CudaGraph::new(index)?;
    let (eager, logits) = graph.capture(&mut *step)?;
    graph.replay()?;
    close(&logits, &eager, "the replayed step")?;
    Ok((graph, logits, eager))
}

/// Whether `replayed` logits equal the `eager` ones to bf16 rounding (1% of
/// the largest logit); a `CudaGraph` error naming `what` if not.
fn close(replayed: &Tensor, eager: &Tensor, what: &str) -> Result<()> {
    let diff = (replayed.to_kind(Kind::Float) - eager.to_kind(Kind::Float)).abs().max().double_value(&[]);
    let scale = eager.abs().max().to_kind(Kind::Float).double_value(&[]).max(1.0);
    // NaN fails too.
    if diff.is_nan() || diff > 1e-2 * scale {
        return Err(Error::CudaGraph(format!(
            "{what}: logits differ from the step run op by op by {diff} (largest logit {scale})"
        )));
    }
    Ok(())
}
