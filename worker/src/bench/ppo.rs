//! `rlhf-worker bench ppo`: PPO iterations at fixed prompt and response
//! lengths, timed per phase, with the peak memory of each configuration.
//!
//! Every rlhfd configuration times [`iteration::run`], the very iteration
//! the `ppo` stage runs (per-row sampling streams, reference log-probs,
//! reward and values, KL-penalised rewards, GAE, whitening, per minibatch a
//! policy step then a critic step at `critic_lr`, `step_across`), over a
//! [`iteration::Roles`] provider built here:
//! - `lora`, `ssf`, `repadapter`: the worker's design — ONE base model with a
//!   policy, a critic and a reward adapter of that method, the reference being
//!   the base with adapters off, plus scalar reward and value heads; the
//!   critic starts as a copy of the reward model, as in the trainer.
//! - `naive`: RLHF without PEFT — four separate copies of the base: policy
//!   (`full` adapter, AdamW), reference, reward (+ head), critic (`full`
//!   adapter + value head, AdamW).
//! - `trl`: `scripts/bench/ppo_trl.py` (embedded in this binary), the real
//!   TRL 1.12.0 `trl.experimental.ppo.PPOTrainer` with a peft LoRA policy
//!   (reference = adapter disabled, a separate reward model and a separate
//!   FULL value model), run by the project venv's python (see [`python`]);
//!   `scripts/setup-bench.sh` installs its pinned packages.
//!
//! Each configuration runs in a child process of its own (this binary's
//! hidden `bench ppo-one`, or TRL's python), so its peak memory is its own: on CPU
//! the child's peak RSS (`VmHWM`, `ru_maxrss` for TRL); on CUDA the
//! device memory the child holds at the end according to `nvidia-smi` (torch's
//! caching allocator keeps its peak reservation; tch has no API for
//! torch's allocator statistics), `torch.cuda.max_memory_reserved` for TRL.
//!
//! Prompts are seeded random token ids (the same in Rust and in the TRL script), and
//! generation is forced to exactly `response_len` new tokens (no EOS stop).
//! Every configuration runs one warmup iteration, then `iterations` timed
//! ones; the figures are means over the timed ones.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rlhf_common::spec::PpoSpec;
use rlhf_common::Role;
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use super::common::{config_rows, finish_child, load_base, model_args, pad_of, ratio, write_script, Meter};
pub use super::configs::{base_params, BenchPreset, Source, Variant};
use super::temp_dir;
use crate::error::{Error, Result};
use crate::parallel::{Collective, Single};
use crate::train::optim::AdamW;
use crate::train::ppo::iteration::{self, Generated, PolicyState, Prompts, Rollout, Scorer};
use crate::train::ppo::roles::critic_update;
use crate::train::ppo::rollout::{model_scores, values, Batch};
use rlhf_model::head::Head;
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_model::{parse_device, parse_dtype, sync, Config, Model, Tokenizer};

/// The TRL baseline, embedded so the binary always runs its own version.
const TRL_SCRIPT: &str = include_str!("../../../scripts/bench/ppo_trl.py");

// The PPO hyperparameters (the job-file defaults where they matter for cost;
// the TRL script uses the same values).
const KL_COEF: f64 = 0.05;
const GAMMA: f64 = 1.0;
const LAM: f64 = 0.95;
const CLIP: f64 = 0.2;
const VALUE_CLIP: f64 = 0.2;
const VF_COEF: f64 = 0.1;
const LR: f64 = 1e-4;
const MAX_GRAD_NORM: f64 = 1.0;
const TEMPERATURE: f64 = 1.0;
/// LoRA shape of the shared-base `lora` config and of TRL (PEFT's default targets).
const LORA_R: i64 = 8;
const LORA_ALPHA: f64 = 16.0;
const LORA_TARGETS: &str = "q_proj,v_proj";
/// Prompt ids are drawn from `[FIRST_ID, vocab)`, clear of the special tokens.
const FIRST_ID: i64 = 3;

/// The phases of one iteration, in order.
pub const PHASES: [&str; 5] = ["generate", "reference", "reward", "values", "train"];

/// `bench ppo` (and its hidden per-configuration child `bench ppo-one`).
#[derive(clap::Args, Clone, Debug)]
pub struct PpoArgs {
    /// Hugging Face model directory (default: --preset small).
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// tiny, small or 7b-shape: random weights made by the bench (7b-shape
    /// only on --device cuda).
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
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// New tokens per prompt (generation never stops early).
    #[arg(long)]
    pub response_len: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub ppo_epochs: usize,
    /// Rows per PPO minibatch (default: --batch).
    #[arg(long)]
    pub minibatch: Option<usize>,
    /// Rows generated at once (`ppo.generate_batch`; default: --batch).
    #[arg(long)]
    pub generate_batch: Option<usize>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 or bf16 (default: bf16 for 7b-shape, else f32).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Comma-separated: lora, ssf, repadapter, naive, trl (default: all of
    /// them; lora,naive for 7b-shape).
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Activation checkpointing in the policy and critic updates of the
    /// rlhfd configurations (`ppo.gradient_checkpointing`); TRL runs
    /// without it (transformers would turn its KV cache off for generation).
    #[arg(long)]
    pub grad_checkpoint: bool,
}

/// Resolved, validated arguments.
#[derive(Clone, Debug)]
pub struct Plan {
    pub source: Source,
    pub cfg: Config,
    pub iterations: usize,
    pub batch: usize,
    pub prompt_len: usize,
    pub response_len: usize,
    pub ppo_epochs: usize,
    pub minibatch: usize,
    pub generate_batch: usize,
    pub device: Device,
    pub kind: Kind,
    pub seed: u64,
    pub variants: Vec<Variant>,
    pub recompute: bool,
}

impl Plan {
    pub fn resolve(args: &PpoArgs) -> Result<Self> {
        let source = match (&args.model, &args.preset) {
            (Some(dir), _) => Source::Dir(dir.clone()),
            (None, Some(p)) => Source::Preset(p.parse()?),
            (None, None) => Source::Preset(BenchPreset::Small),
        };
        let (cfg, (batch, prompt_len, response_len, iterations)) = match &source {
            Source::Dir(dir) => (Config::from_dir(dir)?, (4, 64, 32, 3)),
            Source::Preset(p) => (p.config(), p.ppo_shape()),
        };
        let device = parse_device(&args.device)?;
        let seven_b = matches!(source, Source::Preset(BenchPreset::SevenB));
        if seven_b && device == Device::Cpu {
            return Err(Error::InvalidArgument(
                "--preset 7b-shape needs --device cuda[:N]: a 7B model (13 GB in bf16, several times that to train) is not \
                 sensible on a CPU"
                    .into(),
            ));
        }
        let kind = parse_dtype(args.dtype.as_deref().unwrap_or(if seven_b { "bf16" } else { "f32" }))?;
        let batch = args.batch.unwrap_or(batch);
        let plan = Plan {
            source,
            iterations: args.iterations.unwrap_or(iterations),
            batch,
            prompt_len: args.prompt_len.unwrap_or(prompt_len),
            response_len: args.response_len.unwrap_or(response_len),
            ppo_epochs: args.ppo_epochs,
            minibatch: args.minibatch.unwrap_or(batch),
            generate_batch: args.generate_batch.unwrap_or(batch),
            device,
            kind,
            seed: args.seed,
            recompute: args.grad_checkpoint,
            variants: if args.configs.is_empty() {
                if seven_b {
                    vec![Variant::Lora, Variant::Naive]
                } else {
                    Variant::ALL.to_vec()
                }
            } else {
                let mut v = args.configs.iter().map(|c| c.parse()).collect::<Result<Vec<Variant>>>()?;
                v.dedup();
                v
            },
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
            ("--ppo-epochs", self.ppo_epochs),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        if self.minibatch == 0 || self.minibatch > self.batch {
            return bad(format!("--minibatch must be in 1..={} (--batch), got {}", self.batch, self.minibatch));
        }
        if self.generate_batch == 0 {
            return bad("--generate-batch must be positive".into());
        }
        let total = (self.prompt_len + self.response_len) as i64;
        if total > self.cfg.max_position_embeddings {
            return bad(format!(
                "--prompt-len + --response-len = {total} exceeds the model's max_position_embeddings ({})",
                self.cfg.max_position_embeddings
            ));
        }
        if self.cfg.vocab_size <= FIRST_ID {
            return bad(format!("vocabulary of {} tokens is too small for the bench", self.cfg.vocab_size));
        }
        Ok(())
    }

    fn pad(&self) -> i64 {
        pad_of(&self.cfg)
    }

    fn tokens_per_iter(&self) -> usize {
        self.batch * (self.prompt_len + self.response_len)
    }

    fn dtype_name(&self) -> &'static str {
        match self.kind {
            Kind::BFloat16 => "bf16",
            Kind::Half => "f16",
            _ => "f32",
        }
    }

    fn device_name(&self) -> String {
        match self.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        }
    }

    fn label(&self) -> String {
        match &self.source {
            Source::Dir(d) => d.display().to_string(),
            Source::Preset(p) => format!("preset {}", p.name()),
        }
    }
}

/// The seeded prompt ids of iteration `it`: `[batch][len]` in `[FIRST_ID,
/// vocab)`, an id equal to `pad` replaced by `pad - 1` (TRL
/// masks pad ids). The TRL script computes the same ids.
pub fn prompt_ids(seed: u64, it: usize, batch: usize, len: usize, vocab: i64, pad: i64) -> Vec<Vec<i64>> {
    let span = (vocab - FIRST_ID) as u64;
    let id = |row: u64, col: u64| FIRST_ID + (splitmix64(seed ^ ((it as u64) << 40) ^ (row << 20) ^ col) % span) as i64;
    (0..batch as u64)
        .map(|row| (0..len as u64).map(|col| id(row, col)).map(|t| if t == pad { pad - 1 } else { t }).collect())
        .collect()
}

/// The python of the TRL baseline: `$RLHF_PY`, else the venv that
/// `scripts/setup.sh` makes (`$RLHF_VENV`, `~/.cache/rlhfd/venv`, `./.venv`),
/// else `python3` (the script then names the fix if trl is missing).
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("RLHF_PY") {
        return PathBuf::from(p);
    }
    let venvs = [
        std::env::var_os("RLHF_VENV").map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/rlhfd/venv")),
        Some(PathBuf::from(".venv")),
    ];
    venvs.into_iter().flatten().map(|v| v.join("bin/python")).find(|p| p.is_file()).unwrap_or_else(|| "python3".into())
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// The parent: one child per configuration, then the report.
// ---------------------------------------------------------------------------

/// Runs `bench ppo` and prints the table, or with `--json` the report as one
/// JSON line.
pub fn main(args: &PpoArgs) -> Result<()> {
    let report = run(args)?;
    if args.json {
        eprint!("{}", table(&report));
        println!("{report}");
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// Runs every configuration in its own child process and returns the report.
pub fn run(args: &PpoArgs) -> Result<Value> {
    let plan = Plan::resolve(args)?;
    let t0 = Instant::now();
    let threads = tch::get_num_threads();
    let work = temp_dir("rlhf-bench-ppo")?;
    let (rust_source, py_source) = model_args(&plan.source, &plan.cfg, plan.seed, &work.path().join("model"))?;
    let common = |v: &mut Vec<String>| {
        for (flag, value) in [
            ("--iterations", plan.iterations.to_string()),
            ("--batch", plan.batch.to_string()),
            ("--prompt-len", plan.prompt_len.to_string()),
            ("--response-len", plan.response_len.to_string()),
            ("--ppo-epochs", plan.ppo_epochs.to_string()),
            ("--minibatch", plan.minibatch.to_string()),
            ("--device", plan.device_name()),
            ("--dtype", plan.dtype_name().to_string()),
            ("--seed", plan.seed.to_string()),
        ] {
            v.push(flag.into());
            v.push(value);
        }
    };
    let exe = private_exe(work.path())?;
    let mut configs = Map::new();
    for &variant in &plan.variants {
        let (program, argv) = if variant == Variant::Trl {
            let script = write_script(work.path(), "ppo_trl.py", TRL_SCRIPT)?;
            let mut v = vec![script.display().to_string()];
            v.extend(py_source.iter().cloned());
            common(&mut v);
            for (flag, value) in [
                ("--threads", threads.to_string()),
                ("--lora-r", LORA_R.to_string()),
                ("--lora-alpha", LORA_ALPHA.to_string()),
                ("--lora-targets", LORA_TARGETS.to_string()),
            ] {
                v.push(flag.into());
                v.push(value);
            }
            (python(), v)
        } else {
            let mut v: Vec<String> = vec![
                "--threads".into(),
                threads.to_string(),
                "bench".into(),
                "ppo-one".into(),
                "--config".into(),
                variant.name().into(),
            ];
            v.extend(rust_source.iter().cloned());
            common(&mut v);
            if plan.recompute {
                v.push("--grad-checkpoint".into());
            }
            (exe.clone(), v)
        };
        if let Some(reason) = (variant == Variant::Naive).then(|| naive_does_not_fit(&plan)).flatten() {
            tracing::warn!(config = variant.name(), reason = %reason, "bench ppo: skipped");
            configs.insert(variant.name().into(), json!({ "error": reason }));
            continue;
        }
        tracing::info!(config = variant.name(), "bench ppo: running");
        let started = Instant::now();
        let result = finish_child("ppo", variant.name(), run_child(&program, &argv), started.elapsed().as_secs_f64());
        configs.insert(variant.name().into(), result);
    }
    let memory_ratio = ratio(&configs, "lora", "naive", "peak_memory_bytes");
    let time_ratio = ratio(&configs, "lora", "trl", "s_per_iter");
    let c = &plan.cfg;
    let mut notes = vec![
        "phases: generate = sampling response_len tokens with the policy (both take the old log-probs from the \
         generation scores); reference = the reference log-probs (adapters off); reward, values = one forward \
         each; train = KL-penalised rewards, GAE and the PPO epochs (TRL: measured as the iteration less the other \
         phases, so it includes TRL's per-iteration gc.collect)"
            .to_string(),
        "trl layout (trl.experimental.ppo.PPOTrainer with peft_config): LoRA policy, reference = adapter disabled, separate reward \
         model and separate FULL value model trained with AdamW; no grad clipping"
            .to_string(),
        "tokens_per_s = batch * (prompt_len + response_len) / s_per_iter".to_string(),
    ];
    if plan.device != Device::Cpu {
        notes.push(
            "peak memory on CUDA: rlhfd = device memory the child held at exit per nvidia-smi (the caching \
             allocator's peak reservation plus the CUDA context), trl = torch.cuda.max_memory_reserved"
                .into(),
        );
    } else {
        notes.push("peak memory on CPU: the child's peak RSS (VmHWM; trl: ru_maxrss)".into());
    }
    Ok(json!({
        "bench": "ppo",
        "model": plan.label(),
        "shape": {
            "hidden": c.hidden_size, "layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
            "intermediate": c.intermediate_size, "vocab": c.vocab_size, "params": base_params(c),
        },
        "device": plan.device_name(),
        "dtype": plan.dtype_name(),
        "threads": threads,
        "batch": plan.batch,
        "prompt_len": plan.prompt_len,
        "response_len": plan.response_len,
        "iterations": plan.iterations,
        "warmup_iterations": 1,
        "ppo_epochs": plan.ppo_epochs,
        "minibatch": plan.minibatch,
        "generate_batch": plan.generate_batch,
        "gradient_checkpointing": plan.recompute,
        "seed": plan.seed,
        "configs": configs,
        "memory_ratio_vs_naive": memory_ratio,
        "time_ratio_vs_trl": time_ratio,
        "wall_s": t0.elapsed().as_secs_f64(),
        "notes": notes,
    }))
}

/// Why the naive configuration cannot run on this CPU machine, if it
/// cannot: four copies of the base, plus a policy and a critic trained in
/// full, each with an f32 delta, its gradient and two AdamW moments (16 bytes
/// a parameter), must fit in the memory available now.
fn naive_does_not_fit(plan: &Plan) -> Option<String> {
    if plan.device != Device::Cpu {
        return None;
    }
    let params = base_params(&plan.cfg) as f64;
    let need = params * (4.0 * plan.kind.elt_size_in_bytes() as f64 + 2.0 * 16.0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available = super::parse_kib_field(&meminfo, "MemAvailable:")? as f64 * 1024.0;
    let gib = |b: f64| b / (1u64 << 30) as f64;
    (need > available).then(|| {
        format!(
            "skipped: naive RLHF needs about {:.1} GiB (4 copies of the base, 2 models trained in full with f32 \
             gradients and AdamW state), {:.1} GiB available",
            gib(need),
            gib(available)
        )
    })
}

/// A link to (or copy of) this executable in `dir`, so that every child runs
/// the same binary as the parent even if the file is rebuilt meanwhile.
pub(crate) fn private_exe(dir: &Path) -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("the current executable", e))?;
    let private = dir.join("rlhf-worker");
    if std::fs::hard_link(&exe, &private).is_err() {
        std::fs::copy(&exe, &private).map_err(|e| Error::io(&exe, e))?;
    }
    Ok(private)
}

/// Runs one child and returns the JSON object of its last stdout line, or
/// `{"error": ...}` naming what went wrong (a failed configuration — say,
/// out of memory — does not stop the others).
pub(crate) fn run_child(program: &Path, argv: &[String]) -> Value {
    let out = match Command::new(program).args(argv).output() {
        Ok(o) => o,
        Err(e) => return json!({ "error": format!("cannot run {}: {e}", program.display()) }),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = program.file_name().map_or_else(|| program.display().to_string(), |n| n.to_string_lossy().into_owned());
    if !out.status.success() {
        return json!({ "error": format!("{name} exited with {}: {}", out.status, failure_summary(&stderr)) });
    }
    match stdout.lines().rev().find(|l| !l.trim().is_empty()).map(serde_json::from_str::<Value>) {
        Some(Ok(v @ Value::Object(_))) => v,
        _ => json!({ "error": format!("{name} printed no JSON line: {}", failure_summary(&stdout)) }),
    }
}

/// The telling part of a failed child's output: the line that names the
/// failure (out of memory, a panic, an error, a Python exception), without
/// libtorch's C++ backtrace, at most 400 characters.
fn failure_summary(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let pick = ["out of memory", "Error:", "error:", "panicked", "Error"]
        .iter()
        .find_map(|needle| lines.iter().rev().find(|l| l.contains(needle)))
        .or(lines.last())
        .copied()
        .unwrap_or("no output");
    let pick = pick.split("\\nException raised from").next().unwrap_or(pick);
    let pick = pick.split(" (https://").next().unwrap_or(pick);
    let mut s: String = pick.chars().take(400).collect();
    if s.len() < pick.len() {
        s.push('…');
    }
    s
}

/// The report as a Markdown table with a header and the two ratios.
pub fn table(r: &Value) -> String {
    let mut s = String::new();
    let sh = &r["shape"];
    let _ = writeln!(
        s,
        "PPO benchmark, {}: hidden {}, {} layers, {} heads ({} kv), intermediate {}, vocab {} ({:.1}M params)",
        r["model"].as_str().unwrap_or("?"),
        sh["hidden"],
        sh["layers"],
        sh["heads"],
        sh["kv_heads"],
        sh["intermediate"],
        sh["vocab"],
        sh["params"].as_f64().unwrap_or(0.0) / 1e6
    );
    let _ = writeln!(
        s,
        "{} {}, {} threads; batch {} x ({} prompt + {} response) tokens; {} timed iterations after 1 warmup; {} PPO epoch(s), minibatch {}{}\n",
        r["device"].as_str().unwrap_or("?"),
        r["dtype"].as_str().unwrap_or("?"),
        r["threads"],
        r["batch"],
        r["prompt_len"],
        r["response_len"],
        r["iterations"],
        r["ppo_epochs"],
        r["minibatch"],
        if r["gradient_checkpointing"].as_bool() == Some(true) { "; activation checkpointing (rlhfd configs)" } else { "" }
    );
    s.push_str(&config_rows(r, &PHASES));
    let show = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.3}"));
    let _ = writeln!(
        s,
        "\nmemory_ratio_vs_naive = {} (shared-base lora peak / naive peak)",
        show(&r["memory_ratio_vs_naive"])
    );
    let _ = writeln!(s, "time_ratio_vs_trl     = {} (lora s/iter / trl s/iter)", show(&r["time_ratio_vs_trl"]));
    s
}

// ---------------------------------------------------------------------------
// The child: one configuration.
// ---------------------------------------------------------------------------

/// The four roles: views of one base, or four separate models.
enum Views {
    Shared(Box<PeftModel>),
    Naive(Box<Separate>),
}

/// The four models of naive RLHF.
struct Separate {
    policy: PeftModel,
    reference: PeftModel,
    reward: PeftModel,
    critic: PeftModel,
}

impl Views {
    fn view(&mut self, role: Option<Role>) -> Result<&PeftModel> {
        match self {
            Views::Shared(pm) => {
                pm.set_active(role.map(Role::name))?;
                Ok(pm)
            }
            Views::Naive(m) => Ok(match role {
                Some(Role::Policy) => &m.policy,
                Some(Role::Critic) => &m.critic,
                Some(_) => &m.reward,
                None => &m.reference,
            }),
        }
    }
}

/// The bench's roles for [`iteration::run`]: the reward model is a random
/// (frozen) adapter + head, and the critic starts as a copy of it, as the
/// trainer's critic starts from the trained reward model.
struct BenchRoles {
    views: Views,
    reward_head: Head,
    value_head: Head,
    critic_opt: AdamW,
    models: usize,
}

impl iteration::Roles for BenchRoles {
    fn policy(&mut self) -> Result<&PeftModel> {
        self.views.view(Some(Role::Policy))
    }

    fn reference(&mut self) -> Result<&PeftModel> {
        self.views.view(None)
    }

    fn scores(&mut self, batch: &Batch) -> Result<Tensor> {
        let pm = self.views.view(Some(Role::Reward))?;
        tch::no_grad(|| model_scores(pm, &self.reward_head, batch))
    }

    fn values(&mut self, batch: &Batch) -> Result<Tensor> {
        let pm = self.views.view(Some(Role::Critic))?;
        tch::no_grad(|| values(pm, &self.value_head, batch))
    }

    fn critic_step(
        &mut self,
        part: Option<(&Batch, Tensor, Tensor)>,
        share: f64,
        ppo: &PpoSpec,
        dist: &mut dyn Collective,
    ) -> Result<f64> {
        let pm = self.views.view(Some(Role::Critic))?;
        let part = part.as_ref().map(|(s, v, r)| (*s, v, r));
        Ok(critic_update(pm, &self.value_head, &mut self.critic_opt, part, share, ppo, dist)?.0)
    }

    fn tokenizer(&self) -> Option<&Tokenizer> {
        None
    }
}

fn load_plan_base(plan: &Plan) -> Result<Model> {
    load_base(&plan.source, &plan.cfg, plan.kind, plan.device, plan.seed)
}

pub(crate) fn adapter_config(method: Method, seed: u64) -> PeftConfig {
    let mut c = PeftConfig::new(method);
    c.seed = seed;
    if method == Method::Lora {
        c.r = LORA_R;
        c.alpha = LORA_ALPHA;
        c.target_modules = LORA_TARGETS.split(',').map(String::from).collect();
    }
    c
}

/// The job-file PPO settings of the bench: its shapes, and the
/// hyperparameters the TRL script uses too.
fn ppo_spec(plan: &Plan) -> Result<PpoSpec> {
    serde_json::from_value(json!({
        "iterations": plan.iterations + 1,
        "rollout_batch": plan.batch,
        "minibatch": plan.minibatch,
        "generate_batch": plan.generate_batch,
        "ppo_epochs": plan.ppo_epochs,
        "max_new_tokens": plan.response_len,
        "temperature": TEMPERATURE,
        "kl_coef": KL_COEF,
        "kl_estimator": "k1",
        "gamma": GAMMA,
        "lam": LAM,
        "clip": CLIP,
        "value_clip": VALUE_CLIP,
        "vf_coef": VF_COEF,
        "lr": LR,
        "critic_lr": LR,
        "max_grad_norm": MAX_GRAD_NORM,
        "gradient_checkpointing": plan.recompute,
        "reward": { "kind": "model" },
    }))
    .map_err(|e| Error::InvalidArgument(format!("bench ppo settings: {e}")))
}

/// The roles of `variant` and the policy's trainable state; also the
/// trainable parameter count (policy and critic).
fn roles(variant: Variant, plan: &Plan, ppo: &PpoSpec) -> Result<(BenchRoles, PolicyState, i64)> {
    let h = plan.cfg.hidden_size;
    let seed = plan.seed;
    let (mut views, models) = match variant.shared_method() {
        Some(method) => {
            let mut pm = PeftModel::new(load_plan_base(plan)?);
            // The critic starts as a copy of the reward model: the same init.
            for (name, s) in [
                (Role::Policy.name(), seed),
                (Role::Reward.name(), seed.wrapping_add(1)),
                (Role::Critic.name(), seed.wrapping_add(1)),
            ] {
                pm.add(name, peft::build(adapter_config(method, s), &pm.base)?)?;
            }
            (Views::Shared(Box::new(pm)), 1)
        }
        None => {
            let with_full = |name: &str, s: u64| -> Result<PeftModel> {
                let mut pm = PeftModel::new(load_plan_base(plan)?);
                pm.add(name, peft::build(adapter_config(Method::Full, s), &pm.base)?)?;
                pm.set_active(Some(name))?;
                Ok(pm)
            };
            let policy = with_full(Role::Policy.name(), seed)?;
            let reference = PeftModel::new(load_plan_base(plan)?);
            let reward = PeftModel::new(load_plan_base(plan)?);
            let critic = with_full(Role::Critic.name(), seed.wrapping_add(1))?;
            (Views::Naive(Box::new(Separate { policy, reference, reward, critic })), 4)
        }
    };
    let reward_head = Head::new(h, plan.device, seed.wrapping_add(3)).trainable(false);
    let value_head = Head::new(h, plan.device, seed.wrapping_add(3));
    let policy_params = views.view(Some(Role::Policy))?.adapter(Role::Policy.name())?.parameters();
    let mut critic_params = views.view(Some(Role::Critic))?.adapter(Role::Critic.name())?.parameters();
    critic_params.extend([value_head.weight.shallow_clone(), value_head.bias.shallow_clone()]);
    let trainable = policy_params.iter().chain(&critic_params).map(|t| t.numel() as i64).sum();
    let state = PolicyState::new(policy_params, ppo);
    let roles = BenchRoles { views, reward_head, value_head, critic_opt: AdamW::new(critic_params, 0.0), models };
    Ok((roles, state, trainable))
}

/// Runs one configuration (`bench ppo-one --config NAME`) and returns its
/// JSON line.
pub fn run_one(args: &PpoArgs, config: &str) -> Result<Value> {
    let plan = Plan::resolve(args)?;
    let variant: Variant = config.parse()?;
    if variant == Variant::Trl {
        return Err(Error::InvalidArgument("--config trl runs in python, not in ppo-one".into()));
    }
    let meter = Meter::start(plan.device)?;
    let t = Instant::now();
    let ppo = ppo_spec(&plan)?;
    let (mut roles, mut state, trainable) = roles(variant, &plan, &ppo)?;
    sync(plan.device);
    let setup_s = t.elapsed().as_secs_f64();
    let mut rows = Vec::with_capacity(plan.iterations + 1);
    let mut last = Value::Null;
    let batch_rows: Vec<usize> = (0..plan.batch).collect();
    for it in 0..=plan.iterations {
        let ids = prompt_ids(plan.seed, it, plan.batch, plan.prompt_len, plan.cfg.vocab_size, plan.pad());
        let prompts = Prompts { ids: &ids, rows: &batch_rows, global: plan.batch };
        // No stop token: every response is exactly response_len tokens.
        let rollout = Rollout { seed: plan.seed, it, eos_ids: Vec::new(), pad: plan.pad() };
        sync(plan.device);
        let ti = Instant::now();
        let t_gen = Instant::now();
        let gen = iteration::generate_here(&mut roles, &ppo, &prompts, &rollout)?;
        let generated = Generated { gen, secs: t_gen.elapsed().as_secs_f64() };
        let (rec, _) =
            iteration::run(&mut roles, &ppo, &mut state, &prompts, &generated, &Scorer::MODEL, &rollout, &mut Single)?;
        let total = ti.elapsed().as_secs_f64();
        let len = rec["response_len"].as_f64().unwrap_or(f64::NAN);
        if len != plan.response_len as f64 {
            return Err(Error::InvalidArgument(format!("responses averaged {len} of {} tokens", plan.response_len)));
        }
        let mut times: BTreeMap<&'static str, f64> =
            PHASES.iter().map(|&p| (p, rec[&format!("time_{p}")].as_f64().unwrap_or(f64::NAN))).collect();
        times.insert("total", total);
        tracing::debug!(config = config, it, total, "iteration");
        rows.push(times);
        last = json!({ "policy_loss": rec["policy_loss"], "value_loss": rec["value_loss"], "entropy": rec["entropy"], "kl": rec["kl"], "reward_mean": rec["reward_mean"] });
    }
    let timed = &rows[1..];
    let mean = |k: &str| timed.iter().map(|r| r[k]).sum::<f64>() / timed.len() as f64;
    let s_per_iter = mean("total");
    let phases: Map<String, Value> = PHASES.iter().map(|p| (p.to_string(), json!(mean(p)))).collect();
    let (peak, source) = meter.peak();
    Ok(json!({
        "config": variant.name(),
        "method": match variant.shared_method() { Some(m) => format!("{m:?}").to_lowercase(), None => "full".into() },
        "models_loaded": roles.models,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "iterations": timed.len(),
        "s_per_iter": s_per_iter,
        "phases": phases,
        "tokens_per_s": plan.tokens_per_iter() as f64 / s_per_iter,
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "gpu_process_bytes": meter.process_bytes(),
        "last_metrics": last,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_ids_are_seeded_and_in_range() {
        let a = prompt_ids(0, 1, 3, 50, 300, 0);
        assert_eq!(a, prompt_ids(0, 1, 3, 50, 300, 0));
        assert_ne!(a, prompt_ids(0, 2, 3, 50, 300, 0));
        assert_eq!(a.len(), 3);
        assert!(a.iter().flatten().all(|&t| (FIRST_ID..300).contains(&t)));
        // Pinned: scripts/bench/ppo_trl.py computes the same ids.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(prompt_ids(7, 2, 2, 3, 8000, 0), vec![vec![5418, 2853, 7440], vec![92, 5720, 6330]]);
        // An id equal to the pad id becomes pad - 1, as TRL's script does.
        assert_eq!(prompt_ids(7, 2, 2, 3, 8000, 2853)[0], vec![5418, 2852, 7440]);
    }

    #[test]
    fn failure_summary_keeps_the_cause_and_drops_the_backtrace() {
        let panic = "thread 'main' panicked at x.rs:1:2:\ncalled `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. \
                     Tried to allocate 172.00 MiB. See documentation (https://docs.pytorch.org/x)\\nException raised from malloc\\nframe #0: ...\")\n\
                     stack backtrace:\n   0: rust_begin_unwind\n";
        let s = failure_summary(panic);
        assert!(s.contains("CUDA out of memory. Tried to allocate 172.00 MiB"), "{s}");
        assert!(!s.contains("frame #0") && !s.contains("https://"), "{s}");
        let py = "Traceback (most recent call last):\n  File \"x.py\", line 1\nModuleNotFoundError: No module named 'peft'\n";
        assert_eq!(failure_summary(py), "ModuleNotFoundError: No module named 'peft'");
        assert_eq!(failure_summary(""), "no output");
        assert!(failure_summary(&"x".repeat(1000)).chars().count() <= 401);
    }

    #[test]
    fn base_params_counts_every_tensor() {
        for p in [BenchPreset::Tiny, BenchPreset::Small] {
            let cfg = p.config();
            let n: i64 =
                rlhf_model::init::random_weights(&cfg, 0).expect("weights").iter().map(|(_, t)| t.numel() as i64).sum();
            assert_eq!(base_params(&cfg), n, "{p:?}");
        }
        assert!((base_params(&rlhf_model::random::llama2_7b_config()) - 6_738_415_616).abs() == 0);
    }

    #[test]
    fn args_resolve_with_preset_defaults_and_refuse_7b_on_cpu() {
        let args = PpoArgs {
            model: None,
            preset: Some("tiny".into()),
            json: false,
            iterations: None,
            batch: Some(2),
            prompt_len: None,
            response_len: None,
            ppo_epochs: 1,
            minibatch: None,
            generate_batch: None,
            device: "cpu".into(),
            dtype: None,
            configs: vec!["lora".into(), "naive".into()],
            seed: 0,
            grad_checkpoint: false,
        };
        let plan = Plan::resolve(&args).expect("plan");
        assert_eq!((plan.batch, plan.minibatch, plan.kind), (2, 2, Kind::Float));
        assert_eq!(plan.variants, vec![Variant::Lora, Variant::Naive]);
        let err = Plan::resolve(&PpoArgs { preset: Some("7b-shape".into()), ..args.clone() }).expect_err("cpu 7b");
        assert!(err.to_string().contains("--device cuda"), "{err}");
        let err = Plan::resolve(&PpoArgs { configs: vec!["qlora".into()], ..args.clone() }).expect_err("bad config");
        assert!(err.to_string().contains("qlora"), "{err}");
        let err = Plan::resolve(&PpoArgs { minibatch: Some(3), ..args.clone() }).expect_err("minibatch");
        assert!(err.to_string().contains("--minibatch"), "{err}");
        let err = Plan::resolve(&PpoArgs { generate_batch: Some(0), ..args }).expect_err("generate batch");
        assert!(err.to_string().contains("--generate-batch"), "{err}");
    }

    #[test]
    fn one_shared_and_one_naive_iteration_run_on_cpu() {
        let args = PpoArgs {
            model: None,
            preset: Some("tiny".into()),
            json: false,
            iterations: Some(1),
            batch: Some(2),
            prompt_len: Some(6),
            response_len: Some(4),
            ppo_epochs: 1,
            minibatch: None,
            generate_batch: Some(1),
            device: "cpu".into(),
            dtype: None,
            configs: vec![],
            seed: 1,
            grad_checkpoint: false,
        };
        let plain = run_one(&args, "lora").expect("run_one");
        let recomputed = run_one(&PpoArgs { grad_checkpoint: true, ..args.clone() }, "lora").expect("run_one");
        assert_eq!(
            plain["last_metrics"], recomputed["last_metrics"],
            "activation checkpointing changes nothing but memory"
        );
        for config in ["lora", "naive"] {
            let v = run_one(&args, config).expect("run_one");
            assert_eq!(v["config"], config);
            assert!(v["s_per_iter"].as_f64().is_some_and(|s| s > 0.0), "{v}");
            assert!(v["last_metrics"]["policy_loss"].as_f64().is_some_and(f64::is_finite), "{v}");
            assert_eq!(v["models_loaded"], if config == "naive" { 4 } else { 1 });
        }
    }
}
