//! `sft`: the policy adapter learns the verbalised answer of each FewCLUE
//! prompt; the loss covers response tokens only.

use rlhf_common::spec::JobSpec;
use rlhf_common::Role;

use crate::error::{Error, Result};
use crate::train::accuracy::{choice_accuracy, TaskEval};
use crate::train::lm::{LmObjective, Sample};
use crate::train::setup::{encode_pair, load_base, task_sets, Split};
use crate::train::stage::{Ctx, Outcome};
use crate::train::supervised::{self, Trainable};
use rlhf_model::peft::{self, base_parameters, PeftConfig};

pub const ADAPTER: &str = Role::Policy.name();

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let mut l = load_base(job, ctx.device)?;
    let data = job.data.clone().unwrap_or_default();
    let sets = task_sets(&data, Split::Train)?;
    let max_len = job.model.max_length;
    let eos = l.eos();
    let mut samples = Vec::new();
    for set in &sets {
        for ex in &set.examples {
            let (p, r) =
                encode_pair(&l.tok, &set.template.render(ex)?, set.template.answer(&ex.label)?, Some(eos), max_len)?;
            let targets = std::iter::repeat_n(0, p.len()).chain(std::iter::repeat_n(1, r.len())).collect();
            samples.push(Sample { ids: [p, r].concat(), targets });
        }
    }
    let held_out = task_sets(&data, Split::Eval)?
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
    // Held-out choice accuracy, averaged over the tasks (model selection).
    let mut last = f64::NAN;
    let mut eval = |pm: &rlhf_model::peft::PeftModel| {
        if held_out.is_empty() {
            return Ok(f64::NAN);
        }
        let mut sum = 0.0;
        for te in &held_out {
            sum += choice_accuracy(pm, &l.tok, te, 16, pad)?;
        }
        last = sum / held_out.len() as f64;
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
