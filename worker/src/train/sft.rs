//! `sft`: the policy adapter learns the verbalised answer of each FewCLUE
//! prompt; the loss covers response tokens only.

use rlhf_common::spec::JobSpec;

use super::eval::{choice_accuracy, TaskEval};
use super::lm::{self, Sample};
use super::setup::{encode_pair, load_base, task_data};
use super::stage::{Ctx, Outcome};
use crate::error::{Error, Result};
use crate::peft::{self, base_parameters, PeftConfig};

pub const ADAPTER: &str = "policy";

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let mut l = load_base(job, ctx.device)?;
    let data = job.data.clone().unwrap_or_default();
    let train_path = data.train.clone().ok_or_else(|| Error::InvalidArgument("data.train: required".into()))?;
    let (template, examples) = task_data(&data, &train_path, data.max_examples)?;
    let max_len = job.model.max_length;
    let eos = l.eos();
    let mut samples = Vec::with_capacity(examples.len());
    for ex in &examples {
        let (p, r) = encode_pair(&l.tok, &template.render(ex)?, template.answer(&ex.label)?, Some(eos), max_len)?;
        let targets = std::iter::repeat_n(0, p.len()).chain(std::iter::repeat_n(1, r.len())).collect();
        samples.push(Sample { ids: [p, r].concat(), targets });
    }
    let held_out = match &data.eval {
        Some(path) => Some(TaskEval::new(&l.tok, &template, &task_data(&data, path, data.max_eval_examples)?.1, max_len)?),
        None => None,
    };
    let peft_spec = job.peft.as_ref().ok_or_else(|| Error::InvalidArgument("peft: required".into()))?;
    let adapter = peft::build(PeftConfig::from_spec(peft_spec, job.seed), &l.pm.base)?;
    let trainable = adapter.num_parameters();
    l.pm.add(ADAPTER, adapter)?;
    l.pm.set_active(Some(ADAPTER))?;
    let pad = l.pad();
    let train = job.train.clone().unwrap_or_default();
    let mut eval = |pm: &crate::peft::PeftModel| match &held_out {
        Some(te) => choice_accuracy(pm, &l.tok, te, 16, pad),
        None => Ok(f64::NAN),
    };
    let (steps, secs) = lm::train(ctx, &l.pm, ADAPTER, &samples, &train, &job.checkpoint, job.seed, pad, &mut eval)?;
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
        ..Outcome::default()
    })
}
