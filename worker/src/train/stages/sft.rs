//! `sft`: the policy adapter learns the verbalised answer of each FewCLUE
//! prompt, and the completions / assistant turns of files in TRL's formats
//! (through the model's chat template); the loss covers response tokens
//! only.

use rlhf_common::spec::JobSpec;
use rlhf_common::Role;

use crate::data::render::Renderer;
use crate::error::{Error, Result};
use crate::train::accuracy::{choice_accuracy, TaskEval};
use crate::train::lm::{LmObjective, Sample};
use crate::train::rows;
use crate::train::setup::{encode_pair, load_base, task_sets_of, Split};
use crate::train::stage::{Ctx, Outcome};
use crate::train::supervised::{self, Trainable};
use rlhf_model::peft::{self, base_parameters, PeftConfig};

pub const ADAPTER: &str = Role::Policy.name();

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let mut l = load_base(job, ctx.device)?;
    let data = job.data.clone().unwrap_or_default();
    let sets = task_sets_of(&data, Split::Train, true)?;
    let max_len = job.model.max_length;
    let eos = l.eos();
    let chat = rows::chat_template(&data, &l)?;
    let renderer = Renderer::new(&l.tok, chat.as_ref())?;
    let (mut samples, _) = rows::sft_samples(&rows::datasets(&data, Split::Train)?, &renderer, max_len)?;
    let (held_out_rows, _) = rows::sft_samples(&rows::datasets(&data, Split::Eval)?, &renderer, max_len)?;
    for set in &sets {
        for ex in &set.examples {
            let (p, r) =
                encode_pair(&l.tok, &set.template.render(ex)?, set.template.answer(&ex.label)?, Some(eos), max_len)?;
            let targets = std::iter::repeat_n(0, p.len()).chain(std::iter::repeat_n(1, r.len())).collect();
            samples.push(Sample { ids: [p, r].concat(), targets });
        }
    }
    if samples.is_empty() {
        return Err(Error::InvalidArgument("data: no training rows".into()));
    }
    let held_out = task_sets_of(&data, Split::Eval, true)?
        .iter()
        .map(|set| TaskEval::new(&l.tok, &set.template, &set.examples, max_len))
        .collect::<Result<Vec<_>>>()?;
    let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
    let adapter = peft::build(PeftConfig::from_spec(peft_spec, job.seed), &l.pm.base)?;
    let trainable = adapter.num_parameters();
    l.pm.add(ADAPTER, adapter)?;
    l.pm.set_active(Some(ADAPTER))?;
    let pad = l.pad();
    let train = job.train.clone().unwrap_or_default();
    // Held-out accuracy, averaged over the sources (model selection):
    // choice accuracy of each FewCLUE task, next-token accuracy on the
    // trained tokens of the TRL-format files.
    let mut last = f64::NAN;
    let mut eval = |pm: &rlhf_model::peft::PeftModel| {
        let mut scores = Vec::new();
        for te in &held_out {
            scores.push(choice_accuracy(pm, &l.tok, te, 16, pad)?);
        }
        if !held_out_rows.is_empty() {
            scores.push(rows::token_accuracy(pm, &held_out_rows, pad, 8)?);
        }
        if scores.is_empty() {
            return Ok(f64::NAN);
        }
        last = scores.iter().sum::<f64>() / scores.len() as f64;
        Ok(last)
    };
    let mut objective =
        LmObjective { samples: &samples, pad, recompute: train.gradient_checkpointing, eval: Some(&mut eval) };
    let what = Trainable { adapter: ADAPTER, extra: Vec::new() };
    let (steps, secs) = supervised::train(ctx, &l.pm, &what, &mut objective, &train, &job.checkpoint, job.seed)?;
    let mut final_metrics = serde_json::Map::new();
    if last.is_finite() {
        final_metrics.insert("eval_accuracy".into(), serde_json::json!(last));
    }
    let dir = ctx.out.join("adapter");
    if ctx.writes() {
        peft::io::save(l.pm.adapter(ADAPTER)?, &dir, &l.model_dir.display().to_string())?;
    }
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| "sft".into()),
        kind: "sft".into(),
        method: Some(peft_spec.method),
        adapter: Some(dir),
        trainable_params: trainable,
        base_params: base_parameters(&l.pm.base),
        train_seconds: secs,
        steps,
        final_metrics,
        ..Outcome::default()
    })
}
