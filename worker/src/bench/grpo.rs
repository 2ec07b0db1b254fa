//! `rlhf-worker bench grpo`: GRPO iterations at fixed prompt and response
//! lengths, timed per phase, with each configuration's peak memory, against
//! the real TRL 1.12.0 `GRPOTrainer` in the same run.
//!
//! Every rlhfd configuration times [`group_iteration::run`], the very
//! iteration the `grpo` stage runs (sampling `generations` completions of
//! each prompt, rewards, group advantages, the `dapo` loss with β = 0 and so
//! no reference pass, one optimizer step per minibatch), on ONE base with a
//! policy adapter and a frozen reward adapter + scalar head (`lora`, `ssf`,
//! `repadapter`). `trl` runs `scripts/bench/grpo_trl.py` (embedded): a peft
//! LoRA policy and a separate reward model (a second copy of the base), the
//! same prompt ids, shapes, dtype, threads and seed. Each configuration runs
//! in a child process of its own (this binary's hidden `bench grpo-one`, or
//! TRL's python), so its peak memory is its own (see [`Meter`]). Generation
//! never stops early: every completion is exactly `response_len` tokens.
//! One warmup iteration, then `iterations` timed ones; figures are means.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use rlhf_common::spec::{GroupSpec, PpoSpec};
use rlhf_common::Role;
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use super::common::{
    config_rows, device_name, dtype_name, finish_child, load_base, memory_note, model_args, model_fields, pad_of,
    parse_configs, print_report, ratio, resolve_device_kind, resolve_source, write_script, Meter,
};
use super::configs::{BenchPreset, Source, Variant};
use super::ppo::{adapter_config, private_exe, prompt_ids, python, run_child};
use super::temp_dir;
use crate::error::{Error, Result};
use crate::parallel::{Collective, Single};
use crate::train::ppo::group_iteration::{self, Group};
use crate::train::ppo::iteration::{self, Generated, PolicyState, Prompts, Rollout, Scorer};
use crate::train::ppo::rollout::{model_scores, Batch};
use rlhf_model::head::Head;
use rlhf_model::peft::{self, PeftModel};
use rlhf_model::{Config, Tokenizer};

const TRL_SCRIPT: &str = include_str!("../../../scripts/bench/grpo_trl.py");

// The settings the TRL script uses too.
const LR: f64 = 1e-4;
const TEMPERATURE: f64 = 1.0;
const EPSILON: f64 = 0.2;
const MAX_GRAD_NORM: f64 = 1.0;

/// The phases of one iteration, in order.
pub const PHASES: [&str; 4] = ["generate", "reference", "reward", "train"];

/// `bench grpo` (and its hidden per-configuration child `bench grpo-one`).
#[derive(clap::Args, Clone, Debug)]
pub struct GrpoArgs {
    /// Hugging Face model directory (default: --preset small).
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// tiny, small, qwen-0.5b-shape or 7b-shape: random weights made by the
    /// bench (7b-shape only on --device cuda).
    #[arg(long)]
    pub preset: Option<String>,
    /// Print one JSON object as the last stdout line (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Timed iterations per configuration, after one warmup iteration.
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Prompts per iteration.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Completions per prompt (`grpo.num_generations`).
    #[arg(long, default_value_t = 4)]
    pub generations: usize,
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// New tokens per completion (generation never stops early).
    #[arg(long)]
    pub response_len: Option<usize>,
    /// Completions per optimizer step (default: all of an iteration's).
    #[arg(long)]
    pub minibatch: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 or bf16 (default: bf16 for 7b-shape, else f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Comma-separated: lora, ssf, repadapter, trl (default: lora,trl).
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Activation checkpointing in the rlhfd policy update
    /// (`ppo.gradient_checkpointing`); TRL runs without it.
    #[arg(long)]
    pub grad_checkpoint: bool,
}

/// Resolved, validated arguments.
#[derive(Clone, Debug)]
struct Plan {
    source: Source,
    cfg: Config,
    iterations: usize,
    batch: usize,
    generations: usize,
    prompt_len: usize,
    response_len: usize,
    minibatch: usize,
    device: Device,
    kind: Kind,
    seed: u64,
    variants: Vec<Variant>,
    recompute: bool,
}

impl Plan {
    fn resolve(args: &GrpoArgs) -> Result<Self> {
        let (source, cfg) = resolve_source(&args.model, &args.preset)?;
        // (prompts, prompt_len, response_len, iterations)
        let (batch, prompt_len, response_len, iterations) = match &source {
            Source::Dir(_) => (8, 32, 32, 2),
            Source::Preset(BenchPreset::Tiny) => (2, 16, 8, 2),
            Source::Preset(BenchPreset::Small) => (4, 32, 32, 2),
            Source::Preset(BenchPreset::Qwen05B) => (8, 32, 32, 2),
            Source::Preset(BenchPreset::SevenB) => (8, 128, 128, 2),
        };
        let (device, kind) = resolve_device_kind(&source, &args.device, args.dtype.as_deref())?;
        let batch = args.batch.unwrap_or(batch);
        let plan = Plan {
            source,
            iterations: args.iterations.unwrap_or(iterations),
            batch,
            generations: args.generations,
            prompt_len: args.prompt_len.unwrap_or(prompt_len),
            response_len: args.response_len.unwrap_or(response_len),
            minibatch: args.minibatch.unwrap_or(batch * args.generations),
            device,
            kind,
            seed: args.seed,
            variants: parse_configs("grpo", &args.configs)?,
            recompute: args.grad_checkpoint,
            cfg,
        };
        plan.validate()?;
        Ok(plan)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        for (name, v) in [
            ("--iterations", self.iterations),
            ("--batch", self.batch),
            ("--prompt-len", self.prompt_len),
            ("--response-len", self.response_len),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.generations < 2 {
            return bad(format!("--generations must be at least 2 (a group's advantages), got {}", self.generations));
        }
        let rows = self.rows();
        if self.minibatch == 0 || !rows.is_multiple_of(self.minibatch) {
            return bad(format!("--minibatch must divide --batch × --generations = {rows}, got {}", self.minibatch));
        }
        let total = (self.prompt_len + self.response_len) as i64;
        if total > self.cfg.max_position_embeddings {
            return bad(format!(
                "--prompt-len + --response-len = {total} exceeds the model's max_position_embeddings ({})",
                self.cfg.max_position_embeddings
            ));
        }
        Ok(())
    }

    /// Completions per iteration.
    fn rows(&self) -> usize {
        self.batch * self.generations
    }

    fn argv(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, value) in [
            ("--iterations", self.iterations.to_string()),
            ("--batch", self.batch.to_string()),
            ("--generations", self.generations.to_string()),
            ("--prompt-len", self.prompt_len.to_string()),
            ("--response-len", self.response_len.to_string()),
            ("--minibatch", self.minibatch.to_string()),
            ("--device", device_name(self.device)),
            ("--dtype", dtype_name(self.kind).to_string()),
            ("--seed", self.seed.to_string()),
        ] {
            v.push(flag.to_string());
            v.push(value);
        }
        v
    }
}

/// Runs `bench grpo`: the table, or with `--json` the report as one JSON line.
pub fn main(args: &GrpoArgs) -> Result<()> {
    print_report(&run(args)?, args.json, table);
    Ok(())
}

/// Runs every configuration in its own child process; returns the report.
pub fn run(args: &GrpoArgs) -> Result<Value> {
    let plan = Plan::resolve(args)?;
    let t0 = Instant::now();
    let threads = tch::get_num_threads();
    let work = temp_dir("rlhf-bench-grpo")?;
    let (rust_source, py_source) = model_args(&plan.source, &plan.cfg, plan.seed, &work.path().join("model"))?;
    let exe = private_exe(work.path())?;
    let mut configs = Map::new();
    for &variant in &plan.variants {
        let (program, mut argv) = match variant {
            Variant::Trl => {
                let script = write_script(work.path(), "grpo_trl.py", TRL_SCRIPT)?;
                let mut v = vec![script.display().to_string()];
                v.extend(py_source.iter().cloned());
                v.extend(["--threads".into(), threads.to_string()]);
                (python(), v)
            }
            _ => {
                let mut v = vec!["--threads".into(), threads.to_string(), "bench".into(), "grpo-one".into()];
                v.extend(["--config".into(), variant.name().into()]);
                v.extend(rust_source.iter().cloned());
                if plan.recompute {
                    v.push("--grad-checkpoint".into());
                }
                (exe.clone(), v)
            }
        };
        argv.extend(plan.argv());
        tracing::info!(config = variant.name(), "bench grpo: running");
        let started = Instant::now();
        let result = finish_child("grpo", variant.name(), run_child(&program, &argv), started.elapsed().as_secs_f64());
        configs.insert(variant.name().into(), result);
    }
    let mut notes = vec![
        "one iteration = batch prompts × generations completions of exactly response_len tokens, their rewards, \
         group advantages and one optimizer step per minibatch (loss dapo, beta 0: no reference pass on either side)"
            .to_string(),
        "phases: generate = sampling (rlhfd keeps the sampling log-probs as the old ones; TRL needs none with one \
         step per generation); reward = the reward model's forward (rlhfd: a reward adapter on the shared base; TRL: \
         a separate reward model reading its re-tokenized text); train = the rest (TRL: the iteration less the \
         other phases)"
            .to_string(),
        "tokens_per_s = batch * generations * (prompt_len + response_len) / s_per_iter".to_string(),
    ];
    notes.push(memory_note(plan.device));
    let (model, shape) = model_fields(&plan.source, &plan.cfg);
    Ok(json!({
        "bench": "grpo",
        "model": model,
        "shape": shape,
        "device": device_name(plan.device),
        "dtype": dtype_name(plan.kind),
        "threads": threads,
        "batch": plan.batch,
        "generations": plan.generations,
        "prompt_len": plan.prompt_len,
        "response_len": plan.response_len,
        "minibatch": plan.minibatch,
        "iterations": plan.iterations,
        "warmup_iterations": 1,
        "gradient_checkpointing": plan.recompute,
        "seed": plan.seed,
        "configs": configs,
        "time_ratio_vs_trl": ratio(&configs, "lora", "trl", "s_per_iter"),
        "memory_ratio_vs_trl": ratio(&configs, "lora", "trl", "peak_memory_bytes"),
        "wall_s": t0.elapsed().as_secs_f64(),
        "notes": notes,
    }))
}

/// The report as a Markdown table with a header and the two ratios.
pub fn table(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "GRPO benchmark, {} ({:.1}M params): {} {}, {} threads; {} prompts × {} completions of ({} prompt + {} \
         response) tokens, minibatch {}; {} timed iterations after 1 warmup\n",
        r["model"].as_str().unwrap_or("?"),
        r["shape"]["params"].as_f64().unwrap_or(0.0) / 1e6,
        r["device"].as_str().unwrap_or("?"),
        r["dtype"].as_str().unwrap_or("?"),
        r["threads"],
        r["batch"],
        r["generations"],
        r["prompt_len"],
        r["response_len"],
        r["minibatch"],
        r["iterations"],
    );
    s.push_str(&config_rows(r, &PHASES));
    let show = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.3}"));
    let _ = writeln!(s, "\ntime_ratio_vs_trl   = {} (lora s/iter / trl s/iter)", show(&r["time_ratio_vs_trl"]));
    let _ = writeln!(s, "memory_ratio_vs_trl = {} (lora peak / trl peak)", show(&r["memory_ratio_vs_trl"]));
    s
}

/// The roles GRPO uses, on one base: the policy adapter, the reference
/// (adapters off; unused at β = 0), and a frozen reward adapter + head.
struct GroupRoles {
    pm: PeftModel,
    reward_head: Head,
}

impl iteration::Roles for GroupRoles {
    fn policy(&mut self) -> Result<&PeftModel> {
        self.pm.set_active(Some(Role::Policy.name()))?;
        Ok(&self.pm)
    }

    fn reference(&mut self) -> Result<&PeftModel> {
        self.pm.set_active(None)?;
        Ok(&self.pm)
    }

    fn scores(&mut self, batch: &Batch) -> Result<Tensor> {
        self.pm.set_active(Some(Role::Reward.name()))?;
        tch::no_grad(|| model_scores(&self.pm, &self.reward_head, batch))
    }

    fn values(&mut self, _: &Batch) -> Result<Tensor> {
        Err(Error::InvalidArgument("GRPO has no critic".into()))
    }

    fn critic_step(
        &mut self,
        _: Option<(&Batch, Tensor, Tensor)>,
        _: f64,
        _: &PpoSpec,
        _: &mut dyn Collective,
    ) -> Result<f64> {
        Err(Error::InvalidArgument("GRPO has no critic".into()))
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        None
    }
}

/// Runs one configuration (`bench grpo-one --config NAME`); returns its JSON line.
pub fn run_one(args: &GrpoArgs, config: &str) -> Result<Value> {
    let plan = Plan::resolve(args)?;
    let variant: Variant = config.parse()?;
    let Some(method) = variant.shared_method() else {
        return Err(Error::InvalidArgument(format!("--config {config}: grpo-one runs lora, ssf or repadapter")));
    };
    let meter = Meter::start(plan.device)?;
    let t = Instant::now();
    let rows = plan.rows();
    let ppo: PpoSpec = serde_json::from_value(json!({
        "iterations": plan.iterations + 1,
        "rollout_batch": rows,
        "minibatch": plan.minibatch,
        "ppo_epochs": 1,
        "max_new_tokens": plan.response_len,
        "temperature": TEMPERATURE,
        "lr": LR,
        "max_grad_norm": MAX_GRAD_NORM,
        "gradient_checkpointing": plan.recompute,
        "reward": { "kind": "model" },
    }))
    .map_err(|e| Error::InvalidArgument(format!("bench grpo settings: {e}")))?;
    let spec: GroupSpec = serde_json::from_value(json!({
        "num_generations": plan.generations, "beta": 0.0, "epsilon": EPSILON, "loss_type": "dapo",
    }))
    .map_err(|e| Error::InvalidArgument(format!("bench grpo settings: {e}")))?;
    let mut pm = PeftModel::new(load_base(&plan.source, &plan.cfg, plan.kind, plan.device, plan.seed)?);
    pm.add(Role::Policy.name(), peft::build(adapter_config(method, plan.seed), &pm.base)?)?;
    pm.add(Role::Reward.name(), peft::build(adapter_config(method, plan.seed.wrapping_add(1)), &pm.base)?)?;
    let policy_params = pm.adapter(Role::Policy.name())?.parameters();
    let trainable: i64 = policy_params.iter().map(|t| t.numel() as i64).sum();
    let reward_head = Head::new(plan.cfg.hidden_size, plan.device, plan.seed.wrapping_add(3)).trainable(false);
    let mut roles = GroupRoles { pm, reward_head };
    let mut state = PolicyState::new(policy_params, &ppo);
    let group = Group { spec: &spec, rloo: false };
    rlhf_model::sync(plan.device);
    let setup_s = t.elapsed().as_secs_f64();
    let pad = pad_of(&plan.cfg);
    let all_rows: Vec<usize> = (0..rows).collect();
    let mut times = Vec::with_capacity(plan.iterations + 1);
    let mut last = Value::Null;
    for it in 0..=plan.iterations {
        let prompts = prompt_ids(plan.seed, it, plan.batch, plan.prompt_len, plan.cfg.vocab_size, pad);
        // Each prompt's completions are consecutive rows, as the stage lays them out.
        let ids: Vec<Vec<i64>> =
            prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), plan.generations)).collect();
        let prompts = Prompts { ids: &ids, rows: &all_rows, global: rows };
        let rollout = Rollout { seed: plan.seed, it, eos_ids: Vec::new(), pad };
        rlhf_model::sync(plan.device);
        let ti = Instant::now();
        let gen = iteration::generate_here(&mut roles, &ppo, &prompts, &rollout)?;
        let generated = Generated { gen, secs: ti.elapsed().as_secs_f64() };
        let (rec, _) = group_iteration::run(
            &mut roles,
            &ppo,
            &group,
            &mut state,
            &prompts,
            &generated,
            &Scorer::MODEL,
            &rollout,
            &mut Single,
        )?;
        let total = ti.elapsed().as_secs_f64();
        let len = rec["response_len"].as_f64().unwrap_or(f64::NAN);
        if len != plan.response_len as f64 {
            return Err(Error::InvalidArgument(format!("completions averaged {len} of {} tokens", plan.response_len)));
        }
        let mut row: BTreeMap<&str, f64> =
            PHASES.iter().map(|&p| (p, rec[&format!("time_{p}")].as_f64().unwrap_or(0.0))).collect();
        row.insert("total", total);
        times.push(row);
        last = json!({ "reward_mean": rec["reward_mean"], "reward_std": rec["reward_std"], "policy_loss": rec["policy_loss"] });
    }
    let timed = &times[1..];
    let mean = |k: &str| timed.iter().map(|r| r[k]).sum::<f64>() / timed.len() as f64;
    let s_per_iter = mean("total");
    let (peak, source) = meter.peak();
    Ok(json!({
        "config": variant.name(),
        "method": format!("{method:?}").to_lowercase(),
        "models_loaded": 1,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "iterations": timed.len(),
        "s_per_iter": s_per_iter,
        "phases": PHASES.iter().map(|p| (p.to_string(), json!(mean(p)))).collect::<Map<String, Value>>(),
        "tokens_per_s": (rows * (plan.prompt_len + plan.response_len)) as f64 / s_per_iter,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "gpu_process_bytes": meter.process_bytes(),
        "last_metrics": last,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> GrpoArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: GrpoArgs,
        }
        Cli::parse_from(std::iter::once("x").chain(extra.iter().copied())).a
    }

    #[test]
    fn args_resolve_and_name_the_flag_at_fault() {
        let p = Plan::resolve(&args(&["--preset", "tiny"])).unwrap();
        assert_eq!((p.batch, p.generations, p.minibatch, p.variants.len()), (2, 4, 8, 2));
        let e = Plan::resolve(&args(&["--preset", "tiny", "--minibatch", "3"])).unwrap_err().to_string();
        assert!(e.contains("--minibatch must divide --batch × --generations = 8"), "{e}");
        let e = Plan::resolve(&args(&["--preset", "tiny", "--generations", "1"])).unwrap_err().to_string();
        assert!(e.contains("--generations"), "{e}");
        let e = Plan::resolve(&args(&["--preset", "tiny", "--configs", "naive"])).unwrap_err().to_string();
        assert!(e.contains("naive is bench ppo's"), "{e}");
    }

    #[test]
    fn one_lora_configuration_runs_on_cpu() {
        let a = args(&["--preset", "tiny", "--iterations", "1", "--prompt-len", "6", "--response-len", "4"]);
        let r = run_one(&a, "lora").unwrap();
        assert_eq!(r["iterations"], 1);
        assert!(r["s_per_iter"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["phases"]["reference"].as_f64().unwrap() < 1e-3, "beta 0 takes no reference pass: {r}");
        assert!(r["peak_memory_bytes"].as_f64().unwrap() > 0.0, "{r}");
    }
}
