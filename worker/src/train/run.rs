//! `rlhf-worker run JOB.toml`: one job, or a pipeline of stages, in a
//! directory: `job.toml` (resolved), `metrics.jsonl`, the stage outputs
//! (`adapter/`, `reward_model/`, `model/`, `checkpoints/`), `outcome.json`
//! and, for eval and pipeline jobs, `report.md`.

use std::path::{Path, PathBuf};

use rlhf_common::spec::{JobKind, JobSpec, RewardSource, StageSpec};
use tch::Device;

use super::metrics::{Metrics, Observer};
use super::ppo::roles::RemoteRoles;
use super::stage::{Ctx, Outcome};
use super::stages::{dpo, eval, pretrain, reward, sft};
use super::{ppo, report};
use crate::error::{Error, Result};
use crate::parallel::{Collective, Single};

/// Runs one single-kind job into `out`.
pub fn run_stage(job: &JobSpec, out: &Path, device: Device, metrics: &mut Metrics) -> Result<Outcome> {
    run_stage_with(job, out, device, metrics, None, &mut Single)
}

fn run_stage_with(
    job: &JobSpec,
    out: &Path,
    device: Device,
    metrics: &mut Metrics,
    roles: Option<&mut (dyn RemoteRoles + 'static)>,
    dist: &mut dyn Collective,
) -> Result<Outcome> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    metrics.set_tag("stage", job.name.clone().unwrap_or_else(|| job.kind.name().to_string()));
    let mut ctx = Ctx { out, device, metrics, dist };
    let t0 = std::time::Instant::now();
    let mut outcome = match job.kind {
        JobKind::Pretrain => pretrain::run(job, &mut ctx)?,
        JobKind::Sft => sft::run(job, &mut ctx)?,
        JobKind::Reward => reward::run(job, &mut ctx)?,
        JobKind::Dpo => dpo::run(job, &mut ctx)?,
        JobKind::Ppo | JobKind::Grpo | JobKind::Rloo => ppo::trainer::run_with(job, &mut ctx, roles)?,
        JobKind::Eval => eval::run(job, &mut ctx)?,
        JobKind::Pipeline => return Err(Error::InvalidArgument("kind: a pipeline is not a stage".into())),
    };
    outcome.wall_seconds = t0.elapsed().as_secs_f64();
    if ctx.writes() {
        outcome.write(out)?;
    }
    Ok(outcome)
}

/// What earlier pipeline stages produced, for later ones to consume.
#[derive(Default)]
struct Produced {
    model: Option<PathBuf>,
    /// Every SFT stage: name, adapter, held-out accuracy (NaN if none).
    sft: Vec<(String, PathBuf, f64)>,
    /// Every reward stage: name, reward model; the last one scores PPO.
    reward_models: Vec<(String, PathBuf)>,
    /// Every policy stage (PPO, DPO): name, adapter (over the best SFT model).
    ppo: Vec<(String, PathBuf)>,
}

impl Produced {
    fn take(&mut self, o: &Outcome, kind: JobKind) {
        match kind {
            JobKind::Pretrain => self.model = o.model.clone(),
            JobKind::Sft => {
                let acc = o.final_metrics.get("eval_accuracy").and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
                self.sft.extend(o.adapter.clone().map(|a| (o.stage.clone(), a, acc)));
            }
            JobKind::Reward => self.reward_models.extend(o.reward_model.clone().map(|m| (o.stage.clone(), m))),
            JobKind::Ppo | JobKind::Grpo | JobKind::Rloo | JobKind::Dpo => {
                self.ppo.extend(o.adapter.clone().map(|a| (o.stage.clone(), a)))
            }
            JobKind::Eval | JobKind::Pipeline => {}
        }
    }

    /// The SFT adapter later stages build on: the one with the best
    /// held-out accuracy (the paper picks the best method on dev); the last
    /// one when none was evaluated.
    fn best_sft(&self) -> Option<&(String, PathBuf, f64)> {
        let mut best = self.sft.last()?;
        for s in &self.sft {
            if s.2 > best.2 || (best.2.is_nan() && !s.2.is_nan()) {
                best = s;
            }
        }
        Some(best)
    }

    /// Wires a stage's inputs: the pretrained model, the best SFT adapter
    /// merged under reward and PPO (so the reference policy is the SFT
    /// model), an earlier reward model to start from (`init_from`), the
    /// last reward model for PPO, and every trained stage for eval.
    fn wire(&self, stage: &StageSpec, job: &mut JobSpec) {
        if let Some(m) = &self.model {
            job.model.path = Some(m.clone());
            job.model.init = None;
        }
        let sft: Vec<PathBuf> = self.best_sft().map(|s| s.1.clone()).into_iter().collect();
        match job.kind {
            JobKind::Reward | JobKind::Ppo | JobKind::Grpo | JobKind::Rloo | JobKind::Dpo => {
                if let Some((name, _, acc)) = self.best_sft() {
                    tracing::info!(stage = %stage.name, sft = %name, dev_accuracy = acc, "merging the best SFT adapter under the stage");
                }
                job.model.merge_adapters.extend(sft.iter().cloned())
            }
            _ => {}
        }
        if let Some(from) = &stage.init_from {
            if let Some((_, dir)) = self.reward_models.iter().find(|(n, _)| n == from) {
                job.train.get_or_insert_with(Default::default).init_from = Some(dir.clone());
            }
        }
        if let (Some(ppo), Some((_, rm))) = (&mut job.ppo, self.reward_models.last()) {
            let sources = ppo.reward.iter_mut().chain(ppo.rewards.iter_mut().map(|w| &mut w.source));
            for r in sources {
                if let RewardSource::Model { path: path @ None } = r {
                    *path = Some(rm.clone());
                }
            }
        }
        if let Some(eval) = &mut job.eval {
            for (name, adapter, _) in &self.sft {
                eval.adapters.entry(name.clone()).or_insert_with(|| vec![adapter.clone()]);
            }
            for (name, p) in &self.ppo {
                eval.adapters.entry(name.clone()).or_insert_with(|| [sft.clone(), vec![p.clone()]].concat());
            }
        }
    }
}

/// Hands the memory a finished stage freed back to the system. An allocator
/// keeps freed memory for reuse, so without this a pipeline's process grows
/// by what each stage peaked at: the paper's cpu preset was OOM-killed at
/// 24 GiB in its fourth SFT stage (full fine-tuning, which alone peaks at
/// ~19 GiB in f32) after three PEFT stages. rlhf-worker allocates with
/// mimalloc ([`crate::alloc`]); glibc's heap is trimmed too, for whatever
/// it still serves.
fn return_freed_memory() {
    crate::alloc::release_freed();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How a run is followed, and what it runs with besides its job file.
#[derive(Default)]
pub struct RunOptions {
    pub observer: Observer,
    /// A PPO job's reward and critic roles on another worker.
    pub roles: Option<Box<dyn RemoteRoles>>,
    /// This worker is one rank of a data-parallel job.
    pub collective: Option<Box<dyn Collective>>,
}

/// Runs `job` (any kind) into `out`. A pipeline runs its stages into
/// `out/stages/<name>`; a stage that already finished (its `outcome.json`
/// exists) is not run again, so a restarted pipeline resumes.
pub fn run_job(job: &JobSpec, out: &Path, device: Device) -> Result<Vec<Outcome>> {
    run_job_with(job, out, device, RunOptions::default())
}

/// [`run_job`] with an observer, remote roles or a collective. As rank
/// r > 0 of a data-parallel job (`opts.collective`), it reads checkpoints
/// from `out` but writes only its own `metrics-rank<r>.jsonl` there.
pub fn run_job_with(job: &JobSpec, out: &Path, device: Device, opts: RunOptions) -> Result<Vec<Outcome>> {
    let RunOptions { observer, mut roles, collective } = opts;
    let mut dist: Box<dyn Collective> = collective.unwrap_or_else(|| Box::new(Single));
    if dist.world() > 1 && job.kind == JobKind::Eval {
        return Err(Error::InvalidArgument(format!(
            "placement.data_parallel: a {} job runs on one worker",
            job.kind.name()
        )));
    }
    let rank = dist.rank();
    if job.placement.data_parallel > 1 && dist.world() == 1 {
        tracing::info!(
            ranks = job.placement.data_parallel,
            "placement.data_parallel asks the coordinator for ranks; running as one"
        );
    }
    let has_ppo = job.kind.is_rl() || job.stages.iter().any(|s| s.kind.is_rl());
    if roles.is_some() && !has_ppo {
        return Err(Error::InvalidArgument(format!(
            "remote reward/critic roles need a ppo stage; this {} job has none",
            job.kind.name()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let metrics_file = if rank == 0 {
        let job_file = out.join("job.toml");
        std::fs::write(&job_file, job.to_toml()).map_err(|e| Error::io(&job_file, e))?;
        out.join("metrics.jsonl")
    } else {
        out.join(format!("metrics-rank{rank}.jsonl"))
    };
    let mut metrics = Metrics::open(&metrics_file)?.with_observer(observer);
    let outcomes = if job.kind == JobKind::Pipeline {
        let mut produced = Produced::default();
        let mut outcomes = Vec::new();
        for stage in &job.stages {
            let mut sj = job.stage_job(stage);
            produced.wire(stage, &mut sj);
            let dir = out.join("stages").join(&stage.name);
            let done = dir.join("outcome.json");
            let outcome =
                match std::fs::read_to_string(&done).ok().and_then(|t| serde_json::from_str::<Outcome>(&t).ok()) {
                    Some(o) => o,
                    // Data parallel: rank 0 evaluates, the other ranks wait for it.
                    None if stage.kind == JobKind::Eval && rank > 0 => Outcome::default(),
                    None => {
                        tracing::info!(stage = %stage.name, kind = stage.kind.name(), "stage starting");
                        let r = if stage.kind.is_rl() { roles.as_deref_mut() } else { None };
                        let o = run_stage_with(&sj, &dir, device, &mut metrics, r, dist.as_mut())?;
                        return_freed_memory();
                        o
                    }
                };
            if dist.world() > 1 {
                // Rank 0 has written this stage's files before any rank reads them.
                dist.gather(Vec::new())?;
            }
            produced.take(&outcome, stage.kind);
            outcomes.push(outcome);
        }
        outcomes
    } else {
        vec![run_stage_with(job, out, device, &mut metrics, roles.as_deref_mut(), dist.as_mut())?]
    };
    if matches!(job.kind, JobKind::Eval | JobKind::Pipeline) && rank == 0 {
        let title = job.name.clone().unwrap_or_else(|| format!("rlhfd {} report", job.kind.name()));
        let path = out.join("report.md");
        std::fs::write(&path, report::markdown(&title, &outcomes)).map_err(|e| Error::io(&path, e))?;
    }
    Ok(outcomes)
}
