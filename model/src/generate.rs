//! Batched incremental generation with left padding and a KV cache.

use tch::{Kind, Tensor};

use super::cache::{CacheShape, KvCache};
use super::fixed_step::AfterPrefill;
use super::hooks::Hooks;
use super::llama::{Mask, Model};
use super::options::Rows;
pub use super::options::{GenerateOptions, Generation, Steps};
use super::sampling::row_streams;
use crate::error::{Error, Result};

/// Positions `[b, t]` counting only real tokens (pads get 1, as transformers does).
pub fn positions_from_mask(mask: &Tensor) -> Tensor {
    let pos = mask.cumsum(-1, Kind::Int64) - 1;
    pos.masked_fill(&mask.eq(0), 1)
}

/// Boolean attention mask `[b, 1, t, T]` for the last `t` of `T` positions:
/// causal, no padded keys, and every query may see itself (so fully padded
/// rows never produce NaN).
pub fn attention_mask(key_mask: &Tensor, t: i64) -> Tensor {
    let total = key_mask.size()[1];
    let device = key_mask.device();
    let q = Tensor::arange_start(total - t, total, (Kind::Int64, device)).unsqueeze(1);
    let k = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
    let causal = k.le_tensor(&q); // [t, T]
    let diag = k.eq_tensor(&q);
    let keys = key_mask.ne(0).unsqueeze(1); // [b, 1, T]
    causal.unsqueeze(0).logical_and(&keys).logical_or(&diag.unsqueeze(0)).unsqueeze(1)
}

/// Generates up to `max_new_tokens` for each prompt.
pub fn generate(model: &Model, hooks: &dyn Hooks, prompts: &[Vec<i64>], opts: &GenerateOptions) -> Result<Generation> {
    let rows: Vec<u64> = (0..prompts.len() as u64).collect();
    generate_rows(model, hooks, prompts, opts, &rows)
}

/// [`generate`] where prompt i is row `rows[i]` of a larger batch: row r
/// samples from stream r of the seed, so a slice of a batch gets the tokens
/// the whole batch would.
pub fn generate_rows(
    model: &Model,
    hooks: &dyn Hooks,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    rows: &[u64],
) -> Result<Generation> {
    // A static cache of this batch's size, freed after.
    generate_rows_in(model, hooks, prompts, opts, rows, &mut KvCache::default())
}

/// [`generate_rows`] into `cache` (emptied first; made static at this
/// batch's size if it is not): a static cache that a worker keeps across
/// iterations is allocated once, and grows if a batch needs more rows or
/// positions than it has.
pub fn generate_rows_in(
    model: &Model,
    hooks: &dyn Hooks,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    rows: &[u64],
    cache: &mut KvCache,
) -> Result<Generation> {
    let Some(longest) = check(model, prompts, opts, rows)? else {
        return Ok(Generation::default());
    };
    if !cache.is_static() {
        *cache = KvCache::with_capacity(cache_shape(model, prompts.len(), longest + opts.max_new_tokens));
    }
    tch::no_grad(|| generate_inner(model, hooks, prompts, opts, rows, cache, Decode::default()))
}

/// [`generate_rows`] as the decode loop ran before the static cache: keys
/// and values concatenated every step, every row decoded to the end. The
/// same tokens (see `decode_tests.rs`); kept to measure the fast path
/// against (`rlhf-worker bench decode`).
pub fn generate_rows_plain(
    model: &Model,
    hooks: &dyn Hooks,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    rows: &[u64],
) -> Result<Generation> {
    if check(model, prompts, opts, rows)?.is_none() {
        return Ok(Generation::default());
    }
    let mut cache = KvCache::new(model.layers.len());
    tch::no_grad(|| {
        generate_inner(
            model,
            hooks,
            prompts,
            opts,
            rows,
            &mut cache,
            Decode { drop_finished_at: 2.0, ..Decode::default() },
        )
    })
}

/// Rejects what generation cannot run; the longest prompt's length, or
/// `None` when there are no prompts.
fn check(model: &Model, prompts: &[Vec<i64>], opts: &GenerateOptions, rows: &[u64]) -> Result<Option<usize>> {
    if rows.len() != prompts.len() {
        return Err(Error::InvalidArgument(format!("{} row ids for {} prompts", rows.len(), prompts.len())));
    }
    if prompts.is_empty() {
        return Ok(None);
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::InvalidArgument(format!("prompt {i} is empty")));
    }
    for p in prompts {
        model.check_tokens(p)?;
    }
    opts.sampling.validate().map_err(Error::InvalidArgument)?;
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest + opts.max_new_tokens > model.cfg.max_position_embeddings as usize {
        return Err(Error::InvalidArgument(format!(
            "prompt ({longest} tokens) + max_new_tokens ({}) exceeds max_position_embeddings ({})",
            opts.max_new_tokens, model.cfg.max_position_embeddings
        )));
    }
    Ok(Some(longest))
}

/// The static cache for `rows` sequences of up to `positions` tokens.
pub fn cache_shape(model: &Model, rows: usize, positions: usize) -> CacheShape {
    CacheShape {
        layers: model.layers.len(),
        rows: rows as i64,
        positions: positions as i64,
        kv_heads: model.cfg.num_kv_heads,
        head_dim: model.cfg.head_dim,
        kind: model.kind,
        device: model.device,
    }
}

/// How the decode loop runs; the default is the fast path, the other
/// settings exist to test it against the plain one.
#[derive(Clone, Copy, Debug)]
struct Decode {
    /// Rows that finished leave the batch once they are at least this share
    /// of it (1.0 or more: never; they then decode padding to the end).
    drop_finished_at: f64,
    /// `Steps::Auto` tries a CUDA graph on any device, so a test on a CPU
    /// sees the capture fail and the decode go on without it.
    graphs_anywhere: bool,
}

impl Default for Decode {
    fn default() -> Self {
        // A drop copies the live rows' cache once (about one step's reading
        // of it), so it waits until a quarter of the batch is idle.
        Self { drop_finished_at: 0.25, graphs_anywhere: false }
    }
}

fn generate_inner(
    model: &Model,
    hooks: &dyn Hooks,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    rows: &[u64],
    cache: &mut KvCache,
    decode: Decode,
) -> Result<Generation> {
    let b = prompts.len();
    let device = model.device;
    // A growing cache (the plain loop) is always decoded op by op.
    let steps = match (cache.is_static(), opts.steps) {
        // A growing cache (the plain loop) is always decoded op by op.
        (false, _) => Steps::Eager,
        (true, Steps::Auto) if decode.graphs_anywhere => Steps::Graph,
        (true, s) => crate::fixed_step::resolve(s, device),
    };
    let padded = prompts.iter().any(|p| p.len() != prompts[0].len());
    let (ids, mut key_mask) = crate::batch::left_padded(prompts, opts.pad_id, device);
    let mut positions = positions_from_mask(&key_mask);
    cache.reset();
    let pad = Tensor::from(opts.pad_id).to_device(device);
    let mut out = Generation { tokens: vec![Vec::new(); b], logprobs: vec![Vec::new(); b] };
    let mut state = Rows { live: (0..b).collect(), done: vec![false; b], rngs: row_streams(opts.sampling.seed, rows) };
    let shared = crate::batch::distinct_rows(prompts).map(|(firsts, slot)| {
        (Tensor::from_slice(&firsts).to_device(device), Tensor::from_slice(&slot).to_device(device))
    });
    let mut step_ids = ids;
    for step in 0..opts.max_new_tokens {
        let t = step_ids.size()[1];
        let explicit = if padded { Some(attention_mask(&key_mask, t)) } else { None };
        let mask = match (&explicit, step) {
            (Some(m), _) => Mask::Explicit(m),
            (None, 0) => Mask::Causal,
            (None, _) => Mask::None,
        };
        let hidden = match (step, &shared) {
            // Rows with the same prompt (a group of samples) share its prefill.
            (0, Some((firsts, slot))) => {
                let pick = |t: &Tensor| t.index_select(0, firsts);
                let mask = explicit.as_ref().map(pick);
                let mask = mask.as_ref().map_or(Mask::Causal, Mask::Explicit);
                let hidden = model.forward(&pick(&step_ids), &pick(&positions), mask, Some(&mut *cache), hooks)?;
                cache.select_rows(slot);
                hidden.index_select(0, slot)
            }
            _ => model.forward(&step_ids, &positions, mask, Some(&mut *cache), hooks)?,
        };
        let last = hidden.select(1, t - 1);
        let logits = model.logits(&last, hooks);
        let (next, all_done) = state.step(&logits, opts, &pad, &mut out)?;
        if all_done {
            break;
        }
        let rows_now = state.live.len() as i64;
        step_ids = next.unsqueeze(1);
        positions = positions.select(1, positions.size()[1] - 1).unsqueeze(1) + 1;
        key_mask = Tensor::cat(&[key_mask, Tensor::ones([rows_now, 1], (Kind::Int64, device))], 1);
        if step == 0 && steps != Steps::Eager {
            let after = AfterPrefill { ids: step_ids, positions, key_mask, rows: state, out };
            return crate::fixed_step::decode(model, hooks, opts, cache, steps, opts.steps == Steps::Auto, after);
        }
        // Finished rows leave the batch: the rest keep their cache, position,
        // padding and sampling stream, so their tokens do not change.
        let keep = state.unfinished();
        let idle = state.live.len() - keep.len();
        if idle > 0 && idle as f64 >= decode.drop_finished_at * rows_now as f64 {
            let index = Tensor::from_slice(&keep).to_device(device);
            cache.select_rows(&index);
            step_ids = step_ids.index_select(0, &index);
            positions = positions.index_select(0, &index);
            key_mask = key_mask.index_select(0, &index);
            state.keep(&keep);
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod decode_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_skip_left_padding() {
        let (_, mask) = crate::batch::left_padded(&[vec![5, 6, 7], vec![8]], 0, tch::Device::Cpu);
        let pos = positions_from_mask(&mask);
        assert_eq!(Vec::<i64>::try_from(&pos.view([-1])).unwrap(), vec![0, 1, 2, 1, 1, 0]);
        let m = attention_mask(&mask, 3);
        // second row, last query: sees only its own real token.
        let row: Vec<bool> = Vec::try_from(&m.get(1).get(0).get(2)).unwrap();
        assert_eq!(row, vec![false, false, true]);
    }
}
