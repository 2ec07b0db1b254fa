//! `rlhf-worker`: the worker daemon (`serve`), the one-process job runner
//! (`run JOB.toml`), the benchmarks (`bench`) and the offline tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use rlhf_model::Sampling;
use rlhf_worker::offline::{self, ModelArgs, Prompt};

#[derive(Parser)]
#[command(
    name = "rlhf-worker",
    version,
    about = "rlhfd worker: the per-device daemon (serve) and model tools (run, bench, ...)"
)]
struct Cli {
    /// Intra-op threads for torch (default: torch's choice).
    #[arg(long, global = true, env = "RLHF_THREADS")]
    threads: Option<i32>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ModelOpts {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Merge the adapter into the base weights before running.
    #[arg(long)]
    merge: bool,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl ModelOpts {
    fn resolve(&self) -> Result<ModelArgs> {
        Ok(ModelArgs {
            model: self.model.clone(),
            adapter: self.adapter.clone(),
            merge: self.merge,
            dtype: offline::parse_dtype(&self.dtype)?,
            device: offline::parse_device(&self.device)?,
        })
    }
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits of a token sequence: tensor "logits", [seq, vocab], f32.
    Logits {
        #[command(flatten)]
        model: ModelOpts,
        /// Comma-separated token ids.
        #[arg(long)]
        tokens: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Generate; the last stdout line is {"tokens": [...], "text": "..."}.
    Generate {
        #[command(flatten)]
        model: ModelOpts,
        /// Comma-separated prompt token ids.
        #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
        tokens: Option<String>,
        /// Prompt text (tokenised with the model's tokenizer).
        #[arg(long)]
        prompt: Option<String>,
        #[arg(long)]
        max_new_tokens: usize,
        /// Pick the most likely token (the default without --temperature).
        #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
        greedy: bool,
        #[arg(long)]
        temperature: Option<f64>,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        top_k: i64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Run a job file (pretrain, sft, reward, ppo, eval or pipeline).
    Run {
        /// The job file (TOML).
        job: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Output directory (default runs/<job name or kind>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// f32, bf16 or f16: overrides the job's model.dtype (bf16 keeps the
        /// frozen base in bf16, adapters, heads and optimizer state in f32).
        #[arg(long)]
        dtype: Option<String>,
    },
    /// Write the preference pairs a reward job trains and is scored on, as
    /// TRL's explicit-prompt preference rows ({"prompt", "chosen",
    /// "rejected", "task", "format"}, JSON lines): train.jsonl, eval.jsonl,
    /// test.jsonl, bare.jsonl and bare_test.jsonl in --out (empty sets are
    /// not written). For running another trainer on the very same pairs.
    Pairs {
        /// A reward job file (or a pipeline: its stage --stage).
        job: PathBuf,
        #[arg(long)]
        stage: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// The token ids and loss mask of each row of a dataset in TRL's
    /// formats, through the model's chat template: one JSON line
    /// {"ids": [...], "loss_mask": [...]} per row (preference rows:
    /// {"chosen": {...}, "rejected": {...}}; prompt-only rows: the prompt
    /// with the generation prompt, nothing trained).
    Render {
        /// Hugging Face model directory (its tokenizer and chat template).
        #[arg(long)]
        model: PathBuf,
        /// JSON lines (or a JSON array) in one of TRL's dataset formats.
        #[arg(long)]
        data: PathBuf,
        /// Print at most this many rows (all are checked).
        #[arg(long)]
        limit: Option<usize>,
        /// language_modeling, prompt_only, prompt_completion or preference
        /// (default: from the columns).
        #[arg(long)]
        format: Option<String>,
        /// A Jinja chat template file instead of the model's own.
        #[arg(long)]
        chat_template: Option<PathBuf>,
    },
    /// What `model.dtype = "auto"` picks on this machine for a model, and why.
    Dtype {
        #[arg(long)]
        model: PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The worker daemon: register with a coordinator and run its tasks.
    Serve {
        /// Coordinator URL.
        #[arg(long, env = "RLHF_COORDINATOR", default_value = "http://127.0.0.1:50051")]
        coordinator: String,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Name shown by `rlhfctl workers` and used by `[placement]`.
        #[arg(long)]
        name: Option<String>,
        /// Heartbeat interval.
        #[arg(long, env = "RLHF_HEARTBEAT_MS", default_value_t = 1000)]
        heartbeat_ms: u64,
        /// The worker token: a file holding it (the coordinator's
        /// <data-dir>/worker.token), read at every connect.
        #[arg(long, env = "RLHF_WORKER_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// CA certificate (PEM) an https:// coordinator's certificate chains to.
        #[arg(long, env = "RLHF_TLS_CA")]
        tls_ca: Option<PathBuf>,
    },
    /// Make a small LLaMA model directory with a tokenizer trained on a corpus.
    InitModel {
        /// tiny or small.
        #[arg(long, default_value = "tiny")]
        preset: String,
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Prefill and greedy-decode tokens/s and ms per step, the loop as it runs
    /// and the plain one it replaced; the last stdout line is JSON.
    Decode {
        #[command(flatten)]
        args: rlhf_worker::bench::decode::DecodeArgs,
    },
    /// PPO iterations at fixed lengths: shared-base lora/ssf/repadapter vs naive
    /// RLHF (four models) vs the real TRL PPOTrainer, each configuration in its own
    /// process; a table, or with --json one JSON object as the last stdout line.
    Ppo {
        #[command(flatten)]
        args: rlhf_worker::bench::ppo::PpoArgs,
    },
    /// GRPO iterations (prompts × generations, reward model, dapo loss, beta 0):
    /// shared-base lora/ssf/repadapter vs the real TRL GRPOTrainer, each in its
    /// own process; a table, or with --json one JSON object as the last stdout line.
    Grpo {
        #[command(flatten)]
        args: rlhf_worker::bench::grpo::GrpoArgs,
    },
    /// DPO steps on seeded pairs (reference adapter-off pass, policy forward and
    /// backward, AdamW): shared-base lora/ssf/repadapter vs the real TRL
    /// DPOTrainer, each in its own process; a table, or with --json one JSON line.
    Dpo {
        #[command(flatten)]
        args: rlhf_worker::bench::dpo::DpoArgs,
    },
    /// LoRA SFT steps (forward, loss, backward, AdamW) in each of --dtypes,
    /// in one process: s/step and the speedup over the first dtype.
    Sft {
        #[command(flatten)]
        args: rlhf_worker::bench::sft::SftArgs,
    },
    /// NCCL all-reduce on one GPU (a one-rank group, through cudarc's run-time
    /// loading): checks the sum, reports ms and GB/s; the last line is JSON.
    Allreduce {
        /// cuda or cuda:N.
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// f32 megabytes per call (LoRA r=8 on all linears of a 0.5B model: ~18).
        #[arg(long, default_value_t = 18.0)]
        megabytes: f64,
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// One configuration of `bench ppo`, run by it in a child process.
    #[command(hide = true)]
    PpoOne {
        #[command(flatten)]
        args: rlhf_worker::bench::ppo::PpoArgs,
        #[arg(long)]
        config: String,
    },
    /// One configuration of `bench grpo`, run by it in a child process.
    #[command(hide = true)]
    GrpoOne {
        #[command(flatten)]
        args: rlhf_worker::bench::grpo::GrpoArgs,
        #[arg(long)]
        config: String,
    },
    /// One configuration of `bench dpo`, run by it in a child process.
    #[command(hide = true)]
    DpoOne {
        #[command(flatten)]
        args: rlhf_worker::bench::dpo::DpoArgs,
        #[arg(long)]
        config: String,
    },
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        tch::set_num_threads(n);
    }
    match cli.command {
        Command::Logits { model, tokens, out } => {
            let args = model.resolve()?;
            let tokens = offline::parse_tokens(&tokens)?;
            offline::logits(&args, &tokens, &out).with_context(|| format!("logits of {}", args.model.display()))?;
        }
        Command::Generate { model, tokens, prompt, max_new_tokens, greedy, temperature, top_p, top_k, seed } => {
            let args = model.resolve()?;
            let prompt = match (tokens, prompt) {
                (Some(t), _) => Prompt::Tokens(offline::parse_tokens(&t)?),
                (None, Some(p)) => Prompt::Text(p),
                (None, None) => anyhow::bail!("give --tokens or --prompt"),
            };
            let sampling = match (greedy, temperature) {
                (true, _) | (false, None) => Sampling { seed, ..Sampling::greedy() },
                (false, Some(t)) => Sampling { temperature: t, top_p, top_k, seed },
            };
            let line = offline::generate_line(&args, &prompt, max_new_tokens, sampling)
                .with_context(|| format!("generate with {}", args.model.display()))?;
            println!("{line}");
        }
        Command::Run { job, device, out, dtype } => {
            let mut spec = rlhf_common::JobSpec::load(&job)?;
            if let Some(d) = dtype {
                spec.override_dtype(&d).map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
            }
            let device = offline::parse_device(&device)?;
            let out = out.unwrap_or_else(|| {
                PathBuf::from("runs").join(spec.name.clone().unwrap_or_else(|| spec.kind.name().into()))
            });
            let outcomes = rlhf_worker::train::run::run_job(&spec, &out, device)
                .with_context(|| format!("job {}", job.display()))?;
            let report = out.join("report.md");
            if report.exists() {
                println!("{}", std::fs::read_to_string(&report).unwrap_or_default());
            }
            let summary: Vec<_> = outcomes
                .iter()
                .map(|o| serde_json::json!({"stage": o.stage, "steps": o.steps, "seconds": o.train_seconds}))
                .collect();
            println!("{}", serde_json::json!({ "out": out, "stages": summary }));
        }
        Command::Dtype { model, device } => {
            let device = offline::parse_device(&device)?;
            let (kind, why) = rlhf_worker::train::setup::auto_dtype_for(&model, device, false)
                .with_context(|| format!("model {}", model.display()))?;
            let name = match kind {
                tch::Kind::BFloat16 => "bf16",
                tch::Kind::Half => "f16",
                _ => "f32",
            };
            println!("{}", serde_json::json!({ "dtype": name, "why": why }));
        }
        Command::Render { model, data, limit, format, chat_template } => {
            use rlhf_worker::data::formats::Format;
            let format = match format.as_deref() {
                None => None,
                Some(f) => Some(Format::parse(f).with_context(|| {
                    format!("--format: unknown format {f:?} (expected one of {})", Format::NAMES.join(", "))
                })?),
            };
            let lines = rlhf_worker::data::render::render_file(&model, &data, format, chat_template.as_deref(), limit)?;
            for line in lines {
                println!("{line}");
            }
        }
        Command::Pairs { job, stage, out } => {
            let spec = rlhf_common::JobSpec::load(&job)?;
            let spec = match &stage {
                Some(name) => {
                    let st = spec.stages.iter().find(|s| &s.name == name);
                    spec.stage_job(st.with_context(|| format!("--stage: no stage {name:?} in {}", job.display()))?)
                }
                None => spec,
            };
            let written = rlhf_worker::train::stages::reward::write_pairs(&spec, &out)
                .with_context(|| format!("pairs of {}", job.display()))?;
            println!("{}", serde_json::json!(written));
        }
        Command::Serve { coordinator, device, name, heartbeat_ms, token_file, tls_ca } => {
            let dev = offline::parse_device(&device)?;
            let name = name.unwrap_or_else(|| format!("{}-{}", device.replace(':', ""), std::process::id()));
            rlhf_worker::serve::serve(rlhf_worker::serve::Options {
                coordinator,
                device: dev,
                device_name: device,
                name,
                heartbeat: std::time::Duration::from_millis(heartbeat_ms.max(50)),
                token_file,
                tls_ca,
            })?;
        }
        Command::InitModel { preset, corpus, out, seed } => {
            let preset: rlhf_model::init::Preset = preset.parse()?;
            rlhf_model::init::init_model(preset, &corpus, &out, seed)
                .with_context(|| format!("init-model into {}", out.display()))?;
            println!("{}", out.display());
        }
        Command::Bench { what: Bench::Decode { args } } => {
            println!("{}", rlhf_worker::bench::decode::run(&args).context("bench decode")?);
        }
        Command::Bench { what: Bench::Allreduce { device, megabytes, runs } } => {
            let device = offline::parse_device(&device)?;
            println!(
                "{}",
                rlhf_worker::parallel::nccl::self_check(device, megabytes, runs).context("bench allreduce")?
            );
        }
        Command::Bench { what: Bench::Ppo { args } } => {
            rlhf_worker::bench::ppo::main(&args).context("bench ppo")?;
        }
        Command::Bench { what: Bench::Grpo { args } } => {
            rlhf_worker::bench::grpo::main(&args).context("bench grpo")?;
        }
        Command::Bench { what: Bench::Dpo { args } } => {
            rlhf_worker::bench::dpo::main(&args).context("bench dpo")?;
        }
        Command::Bench { what: Bench::GrpoOne { args, config } } => {
            let line = rlhf_worker::bench::grpo::run_one(&args, &config)
                .with_context(|| format!("bench grpo-one --config {config}"))?;
            println!("{line}");
        }
        Command::Bench { what: Bench::DpoOne { args, config } } => {
            let line = rlhf_worker::bench::dpo::run_one(&args, &config)
                .with_context(|| format!("bench dpo-one --config {config}"))?;
            println!("{line}");
        }
        Command::Bench { what: Bench::Sft { args } } => {
            rlhf_worker::bench::sft::main(&args).context("bench sft")?;
        }
        Command::Bench { what: Bench::PpoOne { args, config } } => {
            let line = rlhf_worker::bench::ppo::run_one(&args, &config)
                .with_context(|| format!("bench ppo-one --config {config}"))?;
            println!("{line}");
        }
    }
    Ok(())
}

/// mimalloc for the whole process: with its `override` feature it also
/// serves libtorch's `posix_memalign` (every CPU tensor). See
/// [`rlhf_worker::alloc`] for why and how it is tuned.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    rlhf_worker::alloc::tune();
    rlhf_common::unset_empty_rlhf_env();
    rlhf_common::init_tracing();
    // Torch reports some malformed inputs by panicking: say so and exit 1.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()));
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        eprintln!("internal error: panicked at {at}: {}", msg.unwrap_or_default());
    }));
    let cli = Cli::parse();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli)))
        .unwrap_or_else(|_| Err(anyhow::anyhow!("internal error (see the log above)")));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
