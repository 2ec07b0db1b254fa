//! `rlhf-worker bench decode`: prefill and greedy decode throughput, as
//! `scripts/bench/decode_transformers.py` measures it (prefill = one cached
//! forward over `[b, prompt_len]` keeping the last logits; decode tokens/s =
//! b·new / (generate − prefill)), for the decode loop as it runs (a static
//! cache written in place, finished rows leaving the batch) and, in the same
//! run, the plain loop it replaced (a cache grown by concatenation), with
//! milliseconds per step and the step's share of the memory-bandwidth limit:
//! the weights and cached keys/values a step must read ÷ the device's
//! measured copy bandwidth.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use super::configs::{base_params, BenchPreset};
use crate::error::{Error, Result};
use rlhf_model::fixed_step::resolve;
use rlhf_model::peft::PeftModel;
use rlhf_model::random::random_model;
use rlhf_model::{generate, generate_rows_plain, sync, GenerateOptions, KvCache, Mask, Model, Sampling, Steps};

#[derive(clap::Args, Clone, Debug)]
pub struct DecodeArgs {
    /// Hugging Face model directory.
    #[arg(long, conflicts_with = "preset", required_unless_present = "preset")]
    pub model: Option<PathBuf>,
    /// qwen-0.5b-shape or 7b-shape (random weights made on the device; the
    /// 7B shape needs about 14 GB in bf16), or tiny / small.
    #[arg(long)]
    pub preset: Option<String>,
    /// f32, bf16 or f16 (default: bf16 for 7b-shape, else f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    #[arg(long, num_args = 1.., default_values_t = [1usize, 8])]
    pub batch: Vec<usize>,
    /// Timed runs per figure (the best is kept), after one warmup.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Skip the plain loop (the figures of the loop as it runs only).
    #[arg(long)]
    pub no_plain: bool,
    /// How the steps after the prefill run, one figure each: auto, eager,
    /// fixed (the CUDA graph's fixed-shape step op by op) or graph. The
    /// first gives decode_tok_s; each later one reports ms per step and the
    /// share of the first's tokens it repeats.
    #[arg(long, num_args = 1.., default_values_t = ["auto".to_string()])]
    pub steps: Vec<String>,
    /// Also time the first --steps on a second copy of the model with its
    /// q/k/v and gate/up projections separate (as they were before models
    /// fused them at load; RLHF_FUSE_PROJECTIONS=0 does the same).
    #[arg(long)]
    pub separate: bool,
}

fn load(args: &DecodeArgs) -> Result<(PeftModel, Option<&'static str>)> {
    let device = crate::offline::parse_device(&args.device)?;
    let preset = args.preset.as_deref().map(str::parse::<BenchPreset>).transpose()?;
    let kind = match (&args.dtype, preset) {
        (Some(d), _) => crate::offline::parse_dtype(d)?,
        (None, Some(BenchPreset::SevenB)) => Kind::BFloat16,
        (None, _) => Kind::Float,
    };
    let base = match (preset, &args.model) {
        (Some(p), _) => random_model(p.config(), kind, device, 0)?,
        (None, Some(dir)) => Model::load(dir, kind, device)?,
        (None, None) => return Err(Error::InvalidArgument("bench decode: --model or --preset".into())),
    };
    Ok((PeftModel::new(base), preset.map(BenchPreset::name)))
}

/// Bytes per second of a device-to-device copy of 256 MiB (read + write),
/// the best of three: the bandwidth a memory-bound step can hope for.
fn copy_bandwidth(device: Device) -> f64 {
    let n = 64 << 20; // f32 elements
    let src = Tensor::ones([n], (Kind::Float, device));
    let mut dst = Tensor::zeros([n], (Kind::Float, device));
    let mut best = f64::MAX;
    for _ in 0..4 {
        sync(device);
        let t = Instant::now();
        dst.copy_(&src);
        sync(device);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (2 * 4 * n) as f64 / best
}

/// The share of `reference`'s tokens that `tokens` repeats before each row
/// first differs (1.0: the same tokens; in bf16 a step that sums in
/// another order may flip a near tie, and the row goes its own way after).
fn agreement(tokens: &[Vec<i64>], reference: &[Vec<i64>]) -> f64 {
    let same: usize =
        tokens.iter().zip(reference).map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count()).sum();
    same as f64 / reference.iter().map(Vec::len).sum::<usize>().max(1) as f64
}

/// Best of `runs` timings after one warmup.
fn best(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    f()?;
    (0..runs.max(1)).map(|_| f()).collect::<Result<Vec<_>>>().map(|v| v.into_iter().fold(f64::MAX, f64::min))
}

pub fn run(args: &DecodeArgs) -> Result<Value> {
    if args.prompt_len == 0 || args.new_tokens == 0 || args.batch.contains(&0) {
        return Err(Error::InvalidArgument(
            "bench decode: --prompt-len, --new-tokens and --batch must be at least 1".into(),
        ));
    }
    let modes = args
        .steps
        .iter()
        .map(|s| s.parse::<Steps>().map_err(|e| Error::InvalidArgument(format!("bench decode --steps: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    let (pm, preset) = load(args)?;
    let separate = match args.separate {
        true => {
            let (mut f, _) = load(args)?;
            f.base.separate_projections();
            Some(f)
        }
        false => None,
    };
    let m = &pm.base;
    let device = m.device;
    let (prompt_len, new_tokens) = (args.prompt_len, args.new_tokens);
    let elem = m.kind.elt_size_in_bytes() as f64;
    let weight_bytes = base_params(&m.cfg) as f64 * elem;
    let kv_per_token = (m.layers.len() as i64 * 2 * m.cfg.num_kv_heads * m.cfg.head_dim) as f64 * elem;
    let bandwidth = copy_bandwidth(device);
    let options = |steps| GenerateOptions {
        max_new_tokens: new_tokens,
        sampling: Sampling::greedy(),
        eos_ids: Vec::new(),
        pad_id: 0,
        steps,
    };
    let opts = options(modes[0]);
    let (mut prefill, mut decode, mut plain) = (Map::new(), Map::new(), Map::new());
    let (mut by_mode, mut same_tokens) = (Map::new(), Map::new());
    let (mut separate_ms, mut separate_same) = (Map::new(), Map::new());
    let (mut step_ms, mut plain_ms, mut share) = (Map::new(), Map::new(), Map::new());
    for &b in &args.batch {
        let prompts: Vec<Vec<i64>> = (0..b)
            .map(|row| {
                (0..prompt_len).map(|i| ((row * 7919 + i * 104729) % 9900) as i64 % m.cfg.vocab_size.max(1)).collect()
            })
            .collect();
        let rows: Vec<u64> = (0..b as u64).collect();
        let ids = Tensor::from_slice(&prompts.concat()).view([b as i64, prompt_len as i64]).to_device(device);
        let positions =
            Tensor::arange(prompt_len as i64, (Kind::Int64, device)).unsqueeze(0).expand([b as i64, -1], false);
        let tp = best(args.runs, || {
            let start = Instant::now();
            tch::no_grad(|| -> Result<()> {
                let mut cache = KvCache::new(m.layers.len());
                let h = m.forward(&ids, &positions, Mask::Causal, Some(&mut cache), pm.hooks())?;
                let logits = m.logits(&h.select(1, prompt_len as i64 - 1), pm.hooks());
                let _ = logits.argmax(-1, false).int64_value(&[0]);
                Ok(())
            })?;
            Ok(start.elapsed().as_secs_f64())
        })?;
        let timed = |f: &dyn Fn() -> Result<()>| {
            best(args.runs, || {
                let start = Instant::now();
                f()?;
                sync(device);
                Ok(start.elapsed().as_secs_f64())
            })
        };
        let tg = timed(&|| generate(m, pm.hooks(), &prompts, &opts).map(drop).map_err(Error::from))?;
        let key = b.to_string();
        let steps = new_tokens.saturating_sub(1).max(1) as f64;
        let first = generate(m, pm.hooks(), &prompts, &opts)?.tokens;
        for &mode in &modes[1..] {
            let o = options(mode);
            let t = timed(&|| generate(m, pm.hooks(), &prompts, &o).map(drop).map_err(Error::from))?;
            let entry = by_mode.entry(mode.name()).or_insert_with(|| json!({}));
            entry[&key] = json!((t - tp).max(1e-9) / steps * 1e3);
            let tokens = generate(m, pm.hooks(), &prompts, &o)?.tokens;
            same_tokens.entry(mode.name()).or_insert_with(|| json!({}))[&key] = json!(agreement(&tokens, &first));
        }
        if let Some(f) = &separate {
            let t = timed(&|| generate(&f.base, f.hooks(), &prompts, &opts).map(drop).map_err(Error::from))?;
            separate_ms.insert(key.clone(), json!((t - tp).max(1e-9) / steps * 1e3));
            let tokens = generate(&f.base, f.hooks(), &prompts, &opts)?.tokens;
            separate_same.insert(key.clone(), json!(agreement(&tokens, &first)));
        }
        let per_step = (tg - tp).max(1e-9) / steps;
        prefill.insert(key.clone(), json!((b * prompt_len) as f64 / tp));
        decode.insert(key.clone(), json!((b * new_tokens) as f64 / (tg - tp).max(1e-9)));
        step_ms.insert(key.clone(), json!(per_step * 1e3));
        // A step reads every weight once and the cache of every row (its
        // mean length over the decode).
        let read = weight_bytes + b as f64 * (prompt_len as f64 + new_tokens as f64 / 2.0) * kv_per_token;
        share.insert(key.clone(), json!(read / bandwidth / per_step));
        if !args.no_plain {
            let tg =
                timed(&|| generate_rows_plain(m, pm.hooks(), &prompts, &opts, &rows).map(drop).map_err(Error::from))?;
            plain.insert(key.clone(), json!((b * new_tokens) as f64 / (tg - tp).max(1e-9)));
            plain_ms.insert(key, json!((tg - tp).max(1e-9) / steps * 1e3));
        }
    }
    let mut out = json!({
        "impl": "rlhfd",
        "threads": tch::get_num_threads(),
        "device": format!("{device:?}"),
        "dtype": format!("{:?}", m.kind),
        "model": args.model.as_ref().map(|p| p.display().to_string()).or(preset.map(String::from)),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "steps": modes[0].name(),
        "steps_resolved": resolve(modes[0], device).name(),
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
        "decode_ms_per_step": step_ms,
        "bandwidth_share": share,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "notes": [
            "decode = the loop as it runs (static KV cache written in place, finished rows leave the batch); \
             plain = the loop it replaced (cache concatenated each step), same tokens",
            "decode_ms_per_step = (generate - prefill) / (new_tokens - 1)",
            "steps_ms_per_step: the same for each later --steps; steps_token_agreement: the share of the \
             first --steps' tokens each repeats before a row first differs (bf16 sums in another order may flip \
             a near tie)",
            "separate_decode_ms_per_step (--separate): the first --steps on a copy of the model with q/k/v and \
             gate/up projections separate, the prefill time of the fused one subtracted",
            "bandwidth_share = (weight bytes + the rows' cached keys and values at their mean length) \
             / copy bandwidth / step time",
        ],
    });
    if separate.is_some() {
        out["fused"] = json!(m.is_fused());
        out["separate_decode_ms_per_step"] = json!(separate_ms);
        out["separate_token_agreement"] = json!(separate_same);
    }
    if modes.len() > 1 {
        out["steps_ms_per_step"] = json!(by_mode);
        out["steps_token_agreement"] = json!(same_tokens);
    }
    if !args.no_plain {
        out["plain_decode_tok_s"] = json!(plain);
        out["plain_decode_ms_per_step"] = json!(plain_ms);
    }
    Ok(out)
}
