//! `pretrain`: causal LM on raw text with every weight trainable, so a tiny
//! demo base knows something before SFT. Optionally makes the model first
//! (`[model.init]`). Writes a normal Hugging Face directory to `DIR/model`.

use std::path::PathBuf;

use rlhf_common::spec::JobSpec;

use crate::error::{Error, Result};
use crate::train::lm::{LmObjective, Sample};
use crate::train::setup::load_base;
use crate::train::stage::{Ctx, Outcome};
use crate::train::supervised::{self, Trainable};
use rlhf_model::init::{init_model, Preset};
use rlhf_model::peft::{self, base_parameters, Method, PeftConfig};
use rlhf_model::save::save_model;

pub const ADAPTER: &str = "full";

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let mut job = job.clone();
    if let Some(init) = &job.model.init {
        let preset: Preset = init.preset.parse()?;
        let dir = ctx.out.join("init");
        if ctx.writes() {
            init_model(preset, &init.corpus, &dir, job.seed)?;
        }
        if ctx.dist.world() > 1 {
            ctx.dist.gather(Vec::new())?; // rank 0 has made it before the others load it
        }
        job.model.path = Some(dir);
    }
    let mut l = load_base(&job, ctx.device)?;
    let data = job.data.clone().unwrap_or_default();
    let corpus: PathBuf = data.train.clone().ok_or_else(|| Error::InvalidArgument("data.train: required".into()))?;
    let text = std::fs::read_to_string(&corpus).map_err(|e| Error::io(&corpus, e))?;
    // Documents are lines; they are joined with EOS and cut into blocks.
    let block = job.model.max_length.min(l.pm.base.cfg.max_position_embeddings as usize);
    let eos = l.eos();
    let mut stream = Vec::new();
    for line in text.lines().filter(|s| !s.trim().is_empty()) {
        stream.extend(l.tok.encode(line, false)?);
        stream.push(eos);
    }
    let samples: Vec<Sample> = stream
        .chunks(block)
        .filter(|c| c.len() >= 2)
        .map(|c| Sample { ids: c.to_vec(), targets: vec![1; c.len()] })
        .collect();
    if samples.is_empty() {
        return Err(Error::Data { path: corpus, msg: "no text to train on".into() });
    }
    let adapter = peft::build(PeftConfig { seed: job.seed, ..PeftConfig::new(Method::Full) }, &l.pm.base)?;
    let trainable = adapter.num_parameters();
    l.pm.add(ADAPTER, adapter)?;
    l.pm.set_active(Some(ADAPTER))?;
    let pad = l.pad();
    let train = job.train.clone().unwrap_or_default();
    let mut objective = LmObjective { samples: &samples, pad, recompute: train.gradient_checkpointing, eval: None };
    let what = Trainable { adapter: ADAPTER, extra: Vec::new() };
    let (steps, secs) = supervised::train(ctx, &l.pm, &what, &mut objective, &train, &job.checkpoint, job.seed)?;
    let dir = ctx.out.join("model");
    if ctx.writes() {
        l.pm.merge(ADAPTER)?;
        save_model(&l.pm.base, &dir, Some(&l.model_dir.join("tokenizer.json")))?;
    }
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| "pretrain".into()),
        kind: "pretrain".into(),
        method: Some(Method::Full),
        model: Some(dir),
        trainable_params: trainable,
        base_params: base_parameters(&l.pm.base),
        train_seconds: secs,
        steps,
        ..Outcome::default()
    })
}
