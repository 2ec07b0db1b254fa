//! `rlhfctl submit --dry-run`: the checks a submission meets, without a
//! coordinator. The job file is loaded and written back as `submit` sends
//! it, accepted by [`JobSpec::accept_submitted`] (the coordinator's own
//! parse, validation and path check), its placement checked against the
//! workers that will be there (`--workers`), and the plan printed: one line
//! per stage with its kind, method and steps.

use anyhow::{bail, Result};
use rlhf_common::spec::StageSpec;
use rlhf_common::{JobKind, JobSpec};
use serde_json::{json, Value};

use crate::placement;

/// One stage of the plan.
pub struct Step {
    pub name: String,
    pub kind: &'static str,
    pub method: Option<String>,
    /// Optimizer steps, PPO iterations, or eval examples per task (None: all).
    pub steps: Option<usize>,
    /// What `steps` counts, with its batch.
    pub unit: String,
}

fn step_of(job: &JobSpec) -> Step {
    let method = job.peft.as_ref().map(|p| format!("{:?}", p.method).to_lowercase());
    let (steps, unit, method) = match job.kind {
        k if k.is_rl() => {
            let p = job.ppo.as_ref();
            let batch = p.map_or(0, |p| p.rollout_batch);
            let n = p.map_or(1, |p| p.samples_per_prompt);
            let unit = if k == JobKind::Ppo && n == 1 {
                format!("iterations × {batch} prompts")
            } else if k == JobKind::Ppo {
                format!("iterations × {} prompts × {n} samples", batch / n)
            } else {
                let g = job.grpo.as_ref().or(job.rloo.as_ref()).cloned().unwrap_or_default().num_generations.max(1);
                format!("iterations × {} prompts × {g} samples", batch / g)
            };
            (p.map(|p| p.iterations), unit, method)
        }
        JobKind::Eval => {
            let e = job.eval.as_ref();
            let tasks = e.map_or(0, |e| e.tasks.len());
            let modes: Vec<String> =
                e.map(|e| e.modes.iter().map(|m| format!("{m:?}").to_lowercase()).collect()).unwrap_or_default();
            (e.and_then(|e| e.max_examples), format!("examples × {tasks} tasks ({})", modes.join(", ")), None)
        }
        _ => {
            let t = job.train.clone().unwrap_or_default();
            let unit = match t.max_steps {
                Some(_) => format!("steps × {}", t.batch_size),
                None => format!("epochs ({}) × {}", t.epochs, t.batch_size),
            };
            (t.max_steps, unit, method)
        }
    };
    Step {
        name: job.name.clone().unwrap_or_else(|| job.kind.name().into()),
        kind: job.kind.name(),
        method,
        steps,
        unit,
    }
}

/// The stages a job runs, in order.
pub fn plan(spec: &JobSpec) -> Vec<Step> {
    if spec.kind == JobKind::Pipeline {
        spec.stages.iter().map(|s: &StageSpec| step_of(&spec.stage_job(s))).collect()
    } else {
        vec![step_of(spec)]
    }
}

/// Accepts `spec` as the coordinator would (its TOML as sent, the readable
/// roots `allow_read`), and fails when the placement cannot be met by
/// `workers` (when given). Returns the accepted spec.
pub fn check(spec: &JobSpec, allow_read: &[std::path::PathBuf], workers: Option<&[String]>) -> Result<JobSpec> {
    let text = spec.to_toml();
    if text.is_empty() {
        bail!("the job could not be written back as TOML");
    }
    let accepted = JobSpec::accept_submitted(&text, allow_read)?;
    if let Some(w) = workers {
        let problems = placement::placement_warnings(&accepted, w);
        if !problems.is_empty() {
            bail!("placement cannot be met by workers {}: {}", w.join(", "), problems.join("; "));
        }
    }
    Ok(accepted)
}

pub fn render(spec: &JobSpec, steps: &[Step]) -> String {
    let name = spec.name.clone().unwrap_or_else(|| spec.kind.name().into());
    let mut out = format!(
        "dry run: {} job {name:?} is valid as the coordinator checks it; {} stage(s), model.dtype = {}\n",
        spec.kind.name(),
        steps.len(),
        spec.model.dtype
    );
    for (i, s) in steps.iter().enumerate() {
        let n = s.steps.map_or_else(|| "all".to_string(), |n| n.to_string());
        let method = s.method.as_deref().map(|m| format!(" ({m})")).unwrap_or_default();
        out += &format!("  {:>2}. {:<14} {:<8}{method:<13} {n} {}\n", i + 1, s.name, s.kind, s.unit);
    }
    out
}

pub fn json(spec: &JobSpec, steps: &[Step]) -> Value {
    json!({
        "name": spec.name,
        "kind": spec.kind.name(),
        "dtype": spec.model.dtype,
        "stages": steps.iter().map(|s| json!({
            "name": s.name, "kind": s.kind, "method": s.method, "steps": s.steps, "unit": s.unit,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE: &str = r#"
version = 1
kind = "pipeline"
name = "p-1"
[model]
path = "/m"
[peft]
method = "lora"
[[stage]]
name = "sft"
kind = "sft"
data = { task = "eprstmt", train = "/d/train.json" }
train = { max_steps = 12, batch_size = 4 }
[[stage]]
name = "ppo"
kind = "ppo"
data = { task = "eprstmt", train = "/d/train.json" }
ppo = { iterations = 5, rollout_batch = 8, minibatch = 4, reward = { kind = "label" } }
"#;

    #[test]
    fn plans_each_stage_and_refuses_what_the_coordinator_refuses() {
        let spec = JobSpec::from_toml(PIPELINE).unwrap();
        let steps = plan(&spec);
        let got: Vec<(&str, Option<usize>)> = steps.iter().map(|s| (s.kind, s.steps)).collect();
        assert_eq!(got, vec![("sft", Some(12)), ("ppo", Some(5))]);
        assert!(render(&spec, &steps).contains("12 steps × 4"));
        assert!(check(&spec, &[], Some(&["cpu-0".into()])).is_ok());
        // Outside the readable roots, as the coordinator's --allow-read says.
        let e = check(&spec, &["/elsewhere".into()], None).unwrap_err().to_string();
        assert!(e.contains("outside the readable roots"), "{e}");
        // A trainer that will not be there.
        let mut named = spec.clone();
        named.placement.trainer = Some("gpu-7".into());
        let e = check(&named, &[], Some(&["cpu-0".into()])).unwrap_err().to_string();
        assert!(e.contains("placement.trainer names worker \"gpu-7\""), "{e}");
    }
}
