//! The offline tools behind `rlhf-worker logits | generate`:
//! the parity surface against transformers.

use std::path::{Path, PathBuf};

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use rlhf_model::peft::{self, PeftModel};
use rlhf_model::{self, generate, GenerateOptions, Model, Sampling, Tokenizer};

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
        steps: rlhf_model::Steps::Auto,
    };
    let out = generate(&pm.base, pm.hooks(), &[ids], &opts)?;
    let new = out.tokens.into_iter().next().unwrap_or_default();
    let text = tok.decode(&new, true)?;
    Ok(json!({ "tokens": new, "text": text }))
}

pub use rlhf_model::{parse_device, parse_dtype};
