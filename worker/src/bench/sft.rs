//! `rlhf-worker bench sft`: LoRA SFT steps on a model directory — the
//! forward, the lean LM-head loss, the backward and the AdamW step that an
//! `sft` job takes ([`backward_lm_loss`]) — for each dtype in a child
//! process of its own (a later dtype would otherwise reuse the heap the
//! earlier one grew, and fault in fewer pages), one after the other in one
//! invocation. Token ids are seeded and random; every position after the
//! first is a target.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::ppo::{private_exe, run_child};
use super::temp_dir;
use crate::error::{Error, Result};
use crate::parallel::Single;
use crate::train::lm::backward_lm_loss;
use crate::train::optim::AdamW;
use rlhf_model::peft::{self, Method, PeftConfig, PeftModel};
use rlhf_model::{parse_device, parse_dtype, sync, Model};

/// `bench sft`.
#[derive(clap::Args, Clone, Debug)]
pub struct SftArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub batch: i64,
    /// Tokens per row.
    #[arg(long, default_value_t = 128)]
    pub seq: i64,
    /// Timed steps per dtype, after one warmup step.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Comma-separated dtypes, each timed in turn.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    pub dtypes: Vec<String>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object as the last stdout line.
    #[arg(long)]
    pub json: bool,
}

/// Seconds per step of LoRA (r 8, every linear) SFT in `dtype`.
fn time_steps(args: &SftArgs, dtype: &str, device: Device) -> Result<Value> {
    let kind = parse_dtype(dtype)?;
    let mut pm = PeftModel::new(Model::load(&args.model, kind, device)?);
    let mut cfg = PeftConfig::new(Method::Lora);
    cfg.seed = args.seed;
    cfg.target_modules = vec!["all-linear".into()];
    let adapter = peft::build(cfg, &pm.base)?;
    let mut opt = AdamW::new(adapter.parameters(), 0.0);
    pm.add("sft", adapter)?;
    pm.set_active(Some("sft"))?;
    let vocab = pm.base.cfg.vocab_size;
    tch::manual_seed(args.seed as i64);
    let ids = Tensor::randint(vocab, [args.batch, args.seq], (Kind::Int64, device));
    let targets = Tensor::ones([args.batch, args.seq], (Kind::Int64, device));
    let mut times = Vec::with_capacity(args.steps);
    let mut losses = Vec::with_capacity(args.steps + 1);
    for step in 0..=args.steps {
        let t = Instant::now();
        losses.push(backward_lm_loss(&pm, &ids, &targets, false, |_| 1.0)?);
        opt.step_across(&mut Single, &[], 1.0, 1e-4)?;
        sync(device);
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let s_per_step = times.iter().sum::<f64>() / times.len().max(1) as f64;
    Ok(json!({
        "dtype": dtype,
        "s_per_step": s_per_step,
        "tokens_per_s": (args.batch * args.seq) as f64 / s_per_step,
        "losses": losses,
    }))
}

/// Runs `bench sft`: one row per dtype, and the first dtype's time over
/// each other's (`speedup`).
pub fn main(args: &SftArgs) -> Result<()> {
    if args.dtypes.is_empty() || args.steps == 0 {
        return Err(Error::InvalidArgument("--dtypes and --steps must not be empty".into()));
    }
    let device = parse_device(&args.device)?;
    if let [dtype] = args.dtypes.as_slice() {
        // A child (or a single dtype): time it here.
        let row = time_steps(args, dtype, device)?;
        println!("{row}");
        return Ok(());
    }
    let work = temp_dir("rlhf-bench-sft")?;
    let exe = private_exe(work.path())?;
    let mut rows = Vec::with_capacity(args.dtypes.len());
    for d in &args.dtypes {
        let argv: Vec<String> = [
            "--threads",
            &tch::get_num_threads().to_string(),
            "bench",
            "sft",
            "--model",
            &args.model.display().to_string(),
            "--batch",
            &args.batch.to_string(),
            "--seq",
            &args.seq.to_string(),
            "--steps",
            &args.steps.to_string(),
            "--dtypes",
            d,
            "--device",
            &args.device,
            "--seed",
            &args.seed.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let row = run_child(&exe, &argv);
        if let Some(e) = row.get("error") {
            return Err(Error::InvalidArgument(format!("bench sft --dtypes {d}: {e}")));
        }
        rows.push(row);
    }
    let first = rows[0]["s_per_step"].as_f64().unwrap_or(f64::NAN);
    eprintln!(
        "SFT step, {}: LoRA r 8 on every linear, batch {} x {} tokens, {} thread(s), {} timed steps after 1 warmup",
        args.model.display(),
        args.batch,
        args.seq,
        tch::get_num_threads(),
        args.steps
    );
    eprintln!("| dtype | s/step | tokens/s | speedup vs {} |\n|---|---:|---:|---:|", args.dtypes[0]);
    for r in &rows {
        let s = r["s_per_step"].as_f64().unwrap_or(f64::NAN);
        eprintln!(
            "| {} | {s:.3} | {:.1} | {:.2} |",
            r["dtype"].as_str().unwrap_or("?"),
            r["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            first / s
        );
    }
    if args.json {
        println!(
            "{}",
            json!({ "bench": "sft", "model": args.model, "batch": args.batch, "seq": args.seq, "threads": tch::get_num_threads(), "rows": rows })
        );
    }
    Ok(())
}
