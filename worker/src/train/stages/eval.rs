//! The `eval` job: FewCLUE accuracy of the base and of each named adapter
//! stack, per task and mode (the paper's Tables 4–5).

use std::time::Instant;

use rlhf_common::spec::{EvalMode, JobSpec};

use std::io::Write as _;

use crate::error::{Error, Result};
use crate::fields;
use crate::train::accuracy::{accuracy, score, GenSettings, Prediction, TaskEval};
use crate::train::setup::{load_base, task_set};
use crate::train::stage::{Accuracy, Ctx, Outcome};
use rlhf_model::peft;

/// Per-example predictions of an eval job, in its output directory.
pub const PREDICTIONS: &str = "predictions.jsonl";

pub fn run(job: &JobSpec, ctx: &mut Ctx<'_>) -> Result<Outcome> {
    let spec = job.eval.clone().ok_or_else(|| Error::InvalidArgument("eval: required".into()))?;
    let mut l = load_base(job, ctx.device)?;
    let pad = l.pad();
    let mut tasks = Vec::new();
    for t in &spec.tasks {
        let set = task_set(
            Some(&t.task),
            "eval.tasks.task",
            t.template.clone(),
            t.verbalizer.clone(),
            &t.path,
            spec.max_examples,
        )?;
        tasks.push((t.task.clone(), TaskEval::new(&l.tok, &set.template, &set.examples, job.model.max_length)?));
    }
    let mut variants: Vec<(String, Vec<std::path::PathBuf>)> = vec![("base".into(), Vec::new())];
    variants.extend(spec.adapters.iter().map(|(k, v)| (k.clone(), v.clone())));
    let settings = GenSettings {
        max_new_tokens: spec.max_new_tokens,
        temperature: spec.temperature,
        top_p: spec.top_p,
        seed: job.seed,
    };
    let total = variants.len() * tasks.len() * spec.modes.len();
    // Every example of every model and task, so any cell of the report can
    // be audited: {"model", "task", "example": {id, prompt (text),
    // prompt_ids, option_ids, gold, gold_option, choice, option_logprobs,
    // generated, generate}}.
    std::fs::create_dir_all(ctx.out).map_err(|e| Error::io(ctx.out, e))?;
    let predictions_path = ctx.out.join(PREDICTIONS);
    let mut predictions =
        std::io::BufWriter::new(std::fs::File::create(&predictions_path).map_err(|e| Error::io(&predictions_path, e))?);
    let mut accuracies = Vec::new();
    let t0 = Instant::now();
    for (vi, (name, dirs)) in variants.iter().enumerate() {
        // Each model starts from a freshly loaded base: unmerging a bf16
        // merge does not give the base back bit for bit, and the next model
        // must not inherit that drift. (The weights are mapped, so a reload
        // costs little.)
        if vi > 0 && !variants[vi - 1].1.is_empty() {
            l = load_base(job, ctx.device)?;
        }
        for (i, d) in dirs.iter().enumerate() {
            let a = peft::io::load(d, &l.pm.base)?;
            let key = format!("{name}-{i}");
            l.pm.add(&key, a)?;
            l.pm.merge(&key)?;
        }
        l.pm.set_active(None)?;
        for (task, te) in &tasks {
            // One pass scores both modes (see `accuracy::score`).
            let t = Instant::now();
            let generate = spec.modes.contains(&EvalMode::Generate).then_some(&settings);
            let preds = score(&l.pm, &l.tok, te, generate, spec.batch_size, pad)?;
            let seconds = t.elapsed().as_secs_f64();
            for p in &preds {
                let mut example = serde_json::json!(p);
                example["prompt"] = serde_json::json!(l.tok.decode(&p.prompt_ids, false)?);
                let line = serde_json::json!({ "model": name, "task": task, "example": example });
                writeln!(predictions, "{line}").map_err(|e| Error::io(&predictions_path, e))?;
            }
            for mode in &spec.modes {
                let (acc, mode_name) = match mode {
                    EvalMode::Choice => (accuracy(&preds, Prediction::choice_correct), "choice"),
                    EvalMode::Generate => (accuracy(&preds, Prediction::generate_correct), "generate"),
                };
                accuracies.push(Accuracy {
                    model: name.clone(),
                    task: task.clone(),
                    mode: mode_name.into(),
                    accuracy: acc,
                    n: te.len(),
                });
                let rec = fields! { "model" => name, "task" => task, "mode" => mode_name, "accuracy" => acc, "n" => te.len(), "seconds" => seconds };
                ctx.metrics.log(accuracies.len(), total, rec)?;
            }
        }
    }
    predictions.flush().map_err(|e| Error::io(&predictions_path, e))?;
    Ok(Outcome {
        stage: job.name.clone().unwrap_or_else(|| "eval".into()),
        kind: "eval".into(),
        train_seconds: t0.elapsed().as_secs_f64(),
        accuracies,
        predictions: Some(predictions_path),
        ..Outcome::default()
    })
}
