//! The `eval` job: FewCLUE accuracy of the base and of each named adapter
//! stack, per task and mode (the paper's Tables 4–5).

use std::time::Instant;

use rlhf_common::spec::{EvalMode, JobSpec};

use super::eval::{choice_accuracy, generate_accuracy, GenSettings, TaskEval};
use super::setup::{load_base, task_data};
use super::stage::{Accuracy, Ctx, Outcome};
use crate::error::{Error, Result};
use crate::fields;
use crate::peft;

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let spec = job.eval.clone().ok_or_else(|| Error::InvalidArgument("eval: required".into()))?;
    let mut l = load_base(job, ctx.device)?;
    let pad = l.pad();
    let mut tasks = Vec::new();
    for t in &spec.tasks {
        let data = rlhf_common::spec::DataSpec {
            task: Some(t.task.clone()),
            template: t.template.clone(),
            verbalizer: t.verbalizer.clone(),
            ..Default::default()
        };
        let (template, examples) = task_data(&data, &t.path, spec.max_examples)?;
        tasks.push((t.task.clone(), TaskEval::new(&l.tok, &template, &examples, job.model.max_length)?));
    }
    let mut variants: Vec<(String, Vec<std::path::PathBuf>)> = vec![("base".into(), Vec::new())];
    variants.extend(spec.adapters.iter().map(|(k, v)| (k.clone(), v.clone())));
    let settings = GenSettings { max_new_tokens: spec.max_new_tokens, temperature: spec.temperature, top_p: spec.top_p, seed: job.seed };
    let total = variants.len() * tasks.len() * spec.modes.len();
    let mut accuracies = Vec::new();
    let t0 = Instant::now();
    for (name, dirs) in &variants {
        let mut merged = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            let a = peft::io::load(d, &l.pm.base)?;
            let key = format!("{name}-{i}");
            l.pm.add(&key, a)?;
            l.pm.merge(&key)?;
            merged.push(key);
        }
        l.pm.set_active(None)?;
        for (task, te) in &tasks {
            for mode in &spec.modes {
                let t = Instant::now();
                let (acc, mode_name) = match mode {
                    EvalMode::Choice => (choice_accuracy(&l.pm, te, spec.batch_size, pad)?, "choice"),
                    EvalMode::Generate => (generate_accuracy(&l.pm, &l.tok, te, &settings, spec.batch_size)?, "generate"),
                };
                accuracies.push(Accuracy { model: name.clone(), task: task.clone(), mode: mode_name.into(), accuracy: acc, n: te.len() });
                let rec = fields! { "model" => name, "task" => task, "mode" => mode_name, "accuracy" => acc, "n" => te.len(), "seconds" => t.elapsed().as_secs_f64() };
                ctx.metrics.log(accuracies.len(), total, rec)?;
            }
        }
        for key in merged.iter().rev() {
            l.pm.remove(key)?;
        }
    }
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| "eval".into()),
        kind: "eval".into(),
        train_seconds: t0.elapsed().as_secs_f64(),
        accuracies,
        ..Outcome::default()
    })
}
