//! The offline tools behind `rlhf-worker logits | generate | bench decode`:
//! the parity surface against transformers.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use rlhf_model::peft::{self, PeftModel};
use rlhf_model::{self, generate, GenerateOptions, KvCache, Mask, Model, Sampling, Tokenizer};

/// Where the model comes from and how to run it.
#[derive(Clone, Debug)]
pub struct ModelArgs {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub merge: bool,
    pub dtype: Kind,
    pub device: Device,
}

/// The name the loaded adapter gets on the base.
pub const ADAPTER: &str = "adapter";

/// Loads the base and, if given, the adapter (active, optionally merged).
pub fn load(args: &ModelArgs) -> Result<PeftModel> {
    let base = Model::load(&args.model, args.dtype, args.device)?;
    let mut pm = PeftModel::new(base);
    if let Some(dir) = &args.adapter {
        let adapter = peft::io::load(dir, &pm.base)?;
        pm.add(ADAPTER, adapter)?;
        pm.set_active(Some(ADAPTER))?;
        if args.merge {
            pm.merge(ADAPTER)?;
        }
    } else if args.merge {
        return Err(Error::InvalidArgument("--merge needs --adapter".into()));
    }
    Ok(pm)
}

/// Parses `1,2,3`.
pub fn parse_tokens(s: &str) -> Result<Vec<i64>> {
    let ids: Result<Vec<i64>> = s
        .split(',')
        .map(|t| {
            t.trim().parse::<i64>().map_err(|_| Error::InvalidArgument(format!("--tokens: {t:?} is not an integer")))
        })
        .collect();
    let ids = ids?;
    if ids.is_empty() {
        return Err(Error::InvalidArgument("--tokens is empty".into()));
    }
    Ok(ids)
}

/// Writes `logits` `[seq, vocab]` (f32) of `tokens` to a safetensors file.
pub fn logits(args: &ModelArgs, tokens: &[i64], out: &Path) -> Result<()> {
    let pm = load(args)?;
    pm.base.check_tokens(tokens)?;
    let ids = Tensor::from_slice(tokens).unsqueeze(0).to_device(args.device);
    let logits = tch::no_grad(|| pm.logits(&ids))?;
    let logits = logits.squeeze_dim(0).to_kind(Kind::Float).to_device(Device::Cpu);
    Tensor::write_safetensors(&[("logits", &logits)], out)?;
    Ok(())
}

/// Prompt given as token ids or as text.
pub enum Prompt {
    Tokens(Vec<i64>),
    Text(String),
}

/// Generates and returns the JSON line `{"tokens": [...], "text": "..."}`.
pub fn generate_line(
    args: &ModelArgs,
    prompt: &Prompt,
    max_new_tokens: usize,
    sampling: Sampling,
) -> Result<serde_json::Value> {
    let pm = load(args)?;
    let tok = Tokenizer::load(&args.model, &pm.base.cfg)?;
    let ids = match prompt {
        Prompt::Tokens(t) => t.clone(),
        Prompt::Text(s) => tok.encode(s, true)?,
    };
    let opts = GenerateOptions {
        max_new_tokens,
        sampling,
        eos_ids: tok.eos_ids.clone(),
        pad_id: tok.pad_id.or(tok.eos_ids.first().copied()).unwrap_or(0),
    };
    let out = generate(&pm.base, pm.hooks(), &[ids], &opts)?;
    let new = out.tokens.into_iter().next().unwrap_or_default();
    let text = tok.decode(&new, true)?;
    Ok(json!({ "tokens": new, "text": text }))
}

/// Prefill and greedy-decode throughput, as `scripts/bench/decode_transformers.py`
/// measures it: prefill = one cached forward over `[b, prompt_len]` keeping
/// the last logits; decode tokens/s = b·new / (generate − prefill).
pub fn bench_decode(
    args: &ModelArgs,
    prompt_len: usize,
    new_tokens: usize,
    batches: &[usize],
    runs: usize,
) -> Result<serde_json::Value> {
    let pm = load(args)?;
    let m = &pm.base;
    let mut prefill = serde_json::Map::new();
    let mut decode = serde_json::Map::new();
    for &b in batches {
        let prompts: Vec<Vec<i64>> = (0..b)
            .map(|row| {
                (0..prompt_len)
                    .map(|i| 100 + ((row * 7919 + i * 104729) % 9900) as i64 % (m.cfg.vocab_size - 100).max(1))
                    .collect()
            })
            .collect();
        let ids: Vec<i64> = prompts.concat();
        let ids = Tensor::from_slice(&ids).view([b as i64, prompt_len as i64]).to_device(m.device);
        let positions =
            Tensor::arange(prompt_len as i64, (Kind::Int64, m.device)).unsqueeze(0).expand([b as i64, -1], false);
        let time_prefill = || -> Result<f64> {
            let start = Instant::now();
            tch::no_grad(|| -> Result<()> {
                let mut cache = KvCache::new(m.layers.len());
                let h = m.forward(&ids, &positions, Mask::Causal, Some(&mut cache), pm.hooks())?;
                let logits = m.logits(&h.select(1, prompt_len as i64 - 1), pm.hooks());
                let _ = logits.argmax(-1, false).int64_value(&[0]);
                Ok(())
            })?;
            Ok(start.elapsed().as_secs_f64())
        };
        let opts = GenerateOptions {
            max_new_tokens: new_tokens,
            sampling: Sampling::greedy(),
            eos_ids: Vec::new(),
            pad_id: 0,
        };
        let time_generate = || -> Result<f64> {
            let start = Instant::now();
            generate(m, pm.hooks(), &prompts, &opts)?;
            Ok(start.elapsed().as_secs_f64())
        };
        time_prefill()?;
        let tp =
            (0..runs.max(1)).map(|_| time_prefill()).collect::<Result<Vec<_>>>()?.into_iter().fold(f64::MAX, f64::min);
        time_generate()?;
        let tg =
            (0..runs.max(1)).map(|_| time_generate()).collect::<Result<Vec<_>>>()?.into_iter().fold(f64::MAX, f64::min);
        prefill.insert(b.to_string(), json!((b * prompt_len) as f64 / tp));
        decode.insert(b.to_string(), json!((b * new_tokens) as f64 / (tg - tp).max(1e-9)));
    }
    Ok(json!({
        "impl": "rlhfd",
        "threads": tch::get_num_threads(),
        "dtype": format!("{:?}", args.dtype),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "prefill_tok_s": prefill,
        "decode_tok_s": decode,
    }))
}

pub use rlhf_model::{parse_device, parse_dtype};
