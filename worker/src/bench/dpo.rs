//! `rlhf-worker bench dpo`: DPO optimizer steps on seeded preference pairs
//! of fixed lengths, timed per phase, with each configuration's peak memory,
//! against the real TRL 1.12.0 `DPOTrainer` in the same run.
//!
//! Every rlhfd configuration times [`dpo::timed_step`], the step the `dpo`
//! stage takes: each pair's reference log-probs with the adapter off (one
//! pair per forward, as the stage computes them once per pair), then the
//! policy's forward/backward over every pair and the AdamW step, on ONE base
//! with a policy adapter (`lora`, `ssf`, `repadapter`). `trl` runs
//! `scripts/bench/dpo_trl.py` (embedded): a peft LoRA policy whose reference
//! is the adapter disabled, computed in each step, with the same pairs,
//! dtype, threads and seed. Each configuration runs in a child process of
//! its own (this binary's hidden `bench dpo-one`, or TRL's python), so its
//! peak memory is its own (see [`Meter`]). One warmup step, then
//! `iterations` timed ones; figures are means.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use rlhf_common::spec::DpoSpec;
use rlhf_common::Role;
use serde_json::{json, Map, Value};
use tch::{Device, Kind};

use super::common::{
    config_rows, device_name, dtype_name, finish_child, load_base, memory_note, model_args, model_fields, pad_of,
    parse_configs, print_report, ratio, resolve_device_kind, resolve_source, write_script, Meter,
};
use super::configs::{BenchPreset, Source, Variant};
use super::ppo::{adapter_config, private_exe, prompt_ids, python, run_child};
use super::temp_dir;
use crate::error::{Error, Result};
use crate::train::optim::AdamW;
use crate::train::stages::dpo;
use crate::train::stages::reward::Encoded;
use rlhf_model::peft::{self, PeftModel};
use rlhf_model::Config;

const TRL_SCRIPT: &str = include_str!("../../../scripts/bench/dpo_trl.py");

// The settings the TRL script uses too.
const LR: f64 = 1e-4;
const BETA: f64 = 0.1;
const MAX_GRAD_NORM: f64 = 1.0;
/// The chosen and rejected ids are `prompt_ids` with the bench seed xor these.
const CHOSEN_SALT: u64 = 1 << 60;
const REJECTED_SALT: u64 = 2 << 60;

/// The phases of one step, in order.
pub const PHASES: [&str; 2] = ["reference", "train"];

/// `bench dpo` (and its hidden per-configuration child `bench dpo-one`).
#[derive(clap::Args, Clone, Debug)]
pub struct DpoArgs {
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
    /// Timed steps per configuration, after one warmup step.
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Preference pairs per step.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens of each side of a pair (prompt + response).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Prompt tokens of each pair (default: a quarter of --seq-len).
    #[arg(long)]
    pub prompt_len: Option<usize>,
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
    /// (`train.gradient_checkpointing`); TRL runs without it.
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
    seq_len: usize,
    prompt_len: usize,
    device: Device,
    kind: Kind,
    seed: u64,
    variants: Vec<Variant>,
    recompute: bool,
}

impl Plan {
    fn resolve(args: &DpoArgs) -> Result<Self> {
        let (source, cfg) = resolve_source(&args.model, &args.preset)?;
        // (pairs, seq_len, iterations)
        let (batch, seq_len, iterations) = match &source {
            Source::Dir(_) => (8, 128, 2),
            Source::Preset(BenchPreset::Tiny) => (2, 32, 2),
            Source::Preset(BenchPreset::Small) => (4, 128, 2),
            Source::Preset(BenchPreset::Qwen05B) => (8, 128, 2),
            Source::Preset(BenchPreset::SevenB) => (8, 512, 2),
        };
        let (device, kind) = resolve_device_kind(&source, &args.device, args.dtype.as_deref())?;
        let seq_len = args.seq_len.unwrap_or(seq_len);
        let plan = Plan {
            source,
            iterations: args.iterations.unwrap_or(iterations),
            batch: args.batch.unwrap_or(batch),
            seq_len,
            prompt_len: args.prompt_len.unwrap_or(seq_len / 4),
            device,
            kind,
            seed: args.seed,
            variants: parse_configs("dpo", &args.configs)?,
            recompute: args.grad_checkpoint,
            cfg,
        };
        plan.validate()?;
        Ok(plan)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        for (name, v) in [("--iterations", self.iterations), ("--batch", self.batch), ("--prompt-len", self.prompt_len)]
        {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.seq_len <= self.prompt_len {
            return bad(format!(
                "--seq-len ({}) must exceed --prompt-len ({}): each side needs a response",
                self.seq_len, self.prompt_len
            ));
        }
        if self.seq_len as i64 > self.cfg.max_position_embeddings {
            return bad(format!(
                "--seq-len {} exceeds the model's max_position_embeddings ({})",
                self.seq_len, self.cfg.max_position_embeddings
            ));
        }
        Ok(())
    }

    fn argv(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, value) in [
            ("--iterations", self.iterations.to_string()),
            ("--batch", self.batch.to_string()),
            ("--seq-len", self.seq_len.to_string()),
            ("--prompt-len", self.prompt_len.to_string()),
            ("--device", device_name(self.device)),
            ("--dtype", dtype_name(self.kind).to_string()),
            ("--seed", self.seed.to_string()),
        ] {
            v.push(flag.to_string());
            v.push(value);
        }
        v
    }

    /// Step `it`'s pairs: a prompt and two responses of `seq_len − prompt_len` tokens.
    fn pairs(&self, it: usize) -> Vec<Encoded> {
        let pad = pad_of(&self.cfg);
        let vocab = self.cfg.vocab_size;
        let response = self.seq_len - self.prompt_len;
        let prompts = prompt_ids(self.seed, it, self.batch, self.prompt_len, vocab, pad);
        let chosen = prompt_ids(self.seed ^ CHOSEN_SALT, it, self.batch, response, vocab, pad);
        let rejected = prompt_ids(self.seed ^ REJECTED_SALT, it, self.batch, response, vocab, pad);
        prompts
            .into_iter()
            .zip(chosen.into_iter().zip(rejected))
            .map(|(p, (c, r))| Encoded {
                chosen_start: p.len(),
                rejected_start: p.len(),
                chosen: [p.as_slice(), &c].concat(),
                rejected: [p.as_slice(), &r].concat(),
                margin: 0.0,
                task: None,
                format: 0,
            })
            .collect()
    }
}

/// Runs `bench dpo`: the table, or with `--json` the report as one JSON line.
pub fn main(args: &DpoArgs) -> Result<()> {
    print_report(&run(args)?, args.json, table);
    Ok(())
}

/// Runs every configuration in its own child process; returns the report.
pub fn run(args: &DpoArgs) -> Result<Value> {
    let plan = Plan::resolve(args)?;
    let t0 = Instant::now();
    let threads = tch::get_num_threads();
    let work = temp_dir("rlhf-bench-dpo")?;
    let (rust_source, py_source) = model_args(&plan.source, &plan.cfg, plan.seed, &work.path().join("model"))?;
    let exe = private_exe(work.path())?;
    let mut configs = Map::new();
    for &variant in &plan.variants {
        let (program, mut argv) = match variant {
            Variant::Trl => {
                let script = write_script(work.path(), "dpo_trl.py", TRL_SCRIPT)?;
                let mut v = vec![script.display().to_string()];
                v.extend(py_source.iter().cloned());
                v.extend(["--threads".into(), threads.to_string()]);
                (python(), v)
            }
            _ => {
                let mut v = vec!["--threads".into(), threads.to_string(), "bench".into(), "dpo-one".into()];
                v.extend(["--config".into(), variant.name().into()]);
                v.extend(rust_source.iter().cloned());
                if plan.recompute {
                    v.push("--grad-checkpoint".into());
                }
                (exe.clone(), v)
            }
        };
        argv.extend(plan.argv());
        tracing::info!(config = variant.name(), "bench dpo: running");
        let started = Instant::now();
        let result = finish_child("dpo", variant.name(), run_child(&program, &argv), started.elapsed().as_secs_f64());
        configs.insert(variant.name().into(), result);
    }
    let notes = vec![
        "one iteration = one optimizer step on batch pairs (loss sigmoid, beta 0.1), each side prompt_len + \
         (seq_len - prompt_len) tokens"
            .to_string(),
        "phases: reference = the pairs' log-probs with the adapter off (rlhfd: one pair per forward, computed once \
         per pair as the stage does; TRL: one batched forward inside its loss); train = the policy's forward and \
         backward over chosen and rejected of every pair, the loss and the optimizer step"
            .to_string(),
        "tokens_per_s = 2 * batch * seq_len / s_per_iter".to_string(),
        memory_note(plan.device),
    ];
    let (model, shape) = model_fields(&plan.source, &plan.cfg);
    Ok(json!({
        "bench": "dpo",
        "model": model,
        "shape": shape,
        "device": device_name(plan.device),
        "dtype": dtype_name(plan.kind),
        "threads": threads,
        "batch": plan.batch,
        "seq_len": plan.seq_len,
        "prompt_len": plan.prompt_len,
        "iterations": plan.iterations,
        "warmup_iterations": 1,
        "seed": plan.seed,
        "gradient_checkpointing": plan.recompute,
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
        "DPO benchmark, {} ({:.1}M params): {} {}, {} threads; {} pairs per step, each side {} tokens ({} prompt); \
         {} timed steps after 1 warmup\n",
        r["model"].as_str().unwrap_or("?"),
        r["shape"]["params"].as_f64().unwrap_or(0.0) / 1e6,
        r["device"].as_str().unwrap_or("?"),
        r["dtype"].as_str().unwrap_or("?"),
        r["threads"],
        r["batch"],
        r["seq_len"],
        r["prompt_len"],
        r["iterations"],
    );
    s.push_str(&config_rows(r, &PHASES));
    let show = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.3}"));
    let _ = writeln!(s, "\ntime_ratio_vs_trl   = {} (lora s/iter / trl s/iter)", show(&r["time_ratio_vs_trl"]));
    let _ = writeln!(s, "memory_ratio_vs_trl = {} (lora peak / trl peak)", show(&r["memory_ratio_vs_trl"]));
    s
}

/// Runs one configuration (`bench dpo-one --config NAME`); returns its JSON line.
pub fn run_one(args: &DpoArgs, config: &str) -> Result<Value> {
    let plan = Plan::resolve(args)?;
    let variant: Variant = config.parse()?;
    let Some(method) = variant.shared_method() else {
        return Err(Error::InvalidArgument(format!("--config {config}: dpo-one runs lora, ssf or repadapter")));
    };
    let meter = Meter::start(plan.device)?;
    let t = Instant::now();
    let spec: DpoSpec = serde_json::from_value(json!({ "beta": BETA, "loss_type": "sigmoid" }))
        .map_err(|e| Error::InvalidArgument(format!("bench dpo settings: {e}")))?;
    let mut pm = PeftModel::new(load_base(&plan.source, &plan.cfg, plan.kind, plan.device, plan.seed)?);
    pm.add(Role::Policy.name(), peft::build(adapter_config(method, plan.seed), &pm.base)?)?;
    pm.set_active(Some(Role::Policy.name()))?;
    let params = pm.adapter(Role::Policy.name())?.parameters();
    let trainable: i64 = params.iter().map(|t| t.numel() as i64).sum();
    let mut opt = AdamW::new(params, 0.0);
    rlhf_model::sync(plan.device);
    let setup_s = t.elapsed().as_secs_f64();
    let pad = pad_of(&plan.cfg);
    let mut times = Vec::with_capacity(plan.iterations + 1);
    let mut loss = f64::NAN;
    for it in 0..=plan.iterations {
        let pairs = plan.pairs(it);
        let (t_ref, t_train, l) =
            dpo::timed_step(&pm, &mut opt, &pairs, &spec, pad, (LR, MAX_GRAD_NORM, plan.recompute))?;
        times.push([t_ref, t_train]);
        loss = l;
    }
    let timed = &times[1..];
    let mean = |k: usize| timed.iter().map(|r| r[k]).sum::<f64>() / timed.len() as f64;
    let s_per_iter = mean(0) + mean(1);
    let (peak, source) = meter.peak();
    Ok(json!({
        "config": variant.name(),
        "method": format!("{method:?}").to_lowercase(),
        "models_loaded": 1,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "iterations": timed.len(),
        "s_per_iter": s_per_iter,
        "phases": { "reference": mean(0), "train": mean(1) },
        "tokens_per_s": (2 * plan.batch * plan.seq_len) as f64 / s_per_iter,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "gpu_process_bytes": meter.process_bytes(),
        "last_metrics": { "loss": loss },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> DpoArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: DpoArgs,
        }
        Cli::parse_from(std::iter::once("x").chain(extra.iter().copied())).a
    }

    #[test]
    fn args_resolve_and_name_the_flag_at_fault() {
        let p = Plan::resolve(&args(&["--preset", "tiny"])).unwrap();
        assert_eq!((p.batch, p.seq_len, p.prompt_len), (2, 32, 8));
        let e =
            Plan::resolve(&args(&["--preset", "tiny", "--seq-len", "8", "--prompt-len", "8"])).unwrap_err().to_string();
        assert!(e.contains("--seq-len (8) must exceed --prompt-len (8)"), "{e}");
        let pairs = p.pairs(0);
        assert_eq!(pairs.len(), 2);
        assert!(pairs.iter().all(|e| e.chosen.len() == 32 && e.rejected.len() == 32 && e.chosen_start == 8));
        assert_eq!(pairs[0].chosen[..8], pairs[0].rejected[..8], "one prompt per pair");
        assert_ne!(pairs[0].chosen[8..], pairs[0].rejected[8..]);
    }

    #[test]
    fn one_lora_configuration_runs_and_its_loss_falls_on_repeated_pairs() {
        let a = args(&["--preset", "tiny", "--iterations", "1"]);
        let r = run_one(&a, "lora").unwrap();
        assert_eq!(r["iterations"], 1);
        assert!(r["phases"]["reference"].as_f64().unwrap() > 0.0, "{r}");
        // The same pairs stepped on again: the DPO loss falls from ln 2.
        let plan = Plan::resolve(&a).unwrap();
        let mut pm = PeftModel::new(load_base(&plan.source, &plan.cfg, plan.kind, plan.device, 0).unwrap());
        pm.add("policy", peft::build(adapter_config(rlhf_model::peft::Method::Lora, 0), &pm.base).unwrap()).unwrap();
        pm.set_active(Some("policy")).unwrap();
        let mut opt = AdamW::new(pm.adapter("policy").unwrap().parameters(), 0.0);
        let spec: DpoSpec = serde_json::from_value(json!({ "beta": 0.5 })).unwrap();
        let pairs = plan.pairs(0);
        let losses: Vec<f64> = (0..6)
            .map(|_| dpo::timed_step(&pm, &mut opt, &pairs, &spec, pad_of(&plan.cfg), (1e-2, 1.0, false)).unwrap().2)
            .collect();
        assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-4, "{losses:?}");
        assert!(losses[5] < losses[0] - 0.05, "{losses:?}");
    }
}
