//! What the multi-process benches (`bench ppo`, `bench grpo`, `bench dpo`)
//! share: where a child's base weights come from (a model directory, or a
//! preset written once by the parent so that the Python baseline reads the
//! very same weights), loading them in a child, the child's peak-memory
//! reading, the embedded Python baselines and the ratio of two figures.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use super::configs::{BenchPreset, Source, Variant};
use super::{gpu_used_mib, peak_rss_bytes, GpuUsage};
use crate::error::{Error, Result};
use rlhf_model::init::random_weights;
use rlhf_model::random::random_model;
use rlhf_model::save::{write_config, write_generation_config, write_safetensors};
use rlhf_model::{sync, Config, Model};

/// The module every Python baseline imports (seeded ids, an ids-only
/// tokenizer for models without one), written next to the script.
const PY_COMMON: &str = include_str!("../../../scripts/bench/bench_common.py");

/// Writes `script` (an embedded baseline) and its shared module into `dir`;
/// returns the script's path.
pub(crate) fn write_script(dir: &Path, name: &str, script: &str) -> Result<PathBuf> {
    let common = dir.join("bench_common.py");
    std::fs::write(&common, PY_COMMON).map_err(|e| Error::io(&common, e))?;
    let path = dir.join(name);
    std::fs::write(&path, script).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// The model arguments of the rlhfd children and of the Python baseline:
/// a model directory as it is; a small preset's random weights written to
/// `dir` (both sides load the same file); the 7B shape made by each child
/// (Python gets only its config.json and random weights).
pub(crate) fn model_args(source: &Source, cfg: &Config, seed: u64, dir: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let d = dir.display().to_string();
    Ok(match source {
        Source::Dir(m) => {
            let m = m.display().to_string();
            (vec!["--model".into(), m.clone()], vec!["--model".into(), m])
        }
        Source::Preset(p @ (BenchPreset::SevenB | BenchPreset::Qwen05B)) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            write_config(cfg, &dir.join("config.json"))?;
            (vec!["--preset".into(), p.name().into()], vec!["--model".into(), d, "--random-init".into()])
        }
        Source::Preset(_) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            write_safetensors(&random_weights(cfg, seed)?, &dir.join("model.safetensors"))?;
            write_generation_config(cfg, &dir.join("generation_config.json"))?;
            write_config(cfg, &dir.join("config.json"))?;
            (vec!["--model".into(), d.clone()], vec!["--model".into(), d])
        }
    })
}

/// The base model of a child, from `source`.
pub(crate) fn load_base(source: &Source, cfg: &Config, kind: Kind, device: Device, seed: u64) -> Result<Model> {
    Ok(match source {
        Source::Dir(d) => Model::load(d, kind, device)?,
        Source::Preset(BenchPreset::SevenB | BenchPreset::Qwen05B) => random_model(cfg.clone(), kind, device, seed)?,
        // The same weights the parent writes for the Python baseline.
        Source::Preset(_) => Model::from_tensors(cfg.clone(), random_weights(cfg, seed)?, kind, device)?,
    })
}

/// A child's peak memory: the peak RSS on CPU; on CUDA what nvidia-smi
/// says the process holds at the end (torch's caching allocator keeps its
/// peak reservation), or the whole device's use less a reading at start.
pub(crate) struct Meter {
    device: Device,
    start: Option<GpuUsage>,
}

impl Meter {
    /// Creates the CUDA context first, so that a whole-device reading taken
    /// now leaves only what the configuration allocates.
    pub(crate) fn start(device: Device) -> Result<Self> {
        let start = match device {
            Device::Cuda(i) => {
                let _ = Tensor::f_zeros([1], (Kind::Float, device))?;
                sync(device);
                gpu_used_mib(i)
            }
            _ => None,
        };
        Ok(Self { device, start })
    }

    /// Bytes (if known) and what the figure is. On CUDA: the caching
    /// allocator's peak reservation, the figure the Python baselines report
    /// (`torch.cuda.max_memory_reserved`), so both sides leave out the CUDA
    /// context ([`Meter::process_bytes`] has it); nvidia-smi where the
    /// statistics are not compiled in.
    pub(crate) fn peak(&self) -> (Option<f64>, &'static str) {
        const MIB: f64 = 1024.0 * 1024.0;
        match self.device {
            Device::Cuda(i) if rlhf_model::cuda_stats::peak_reserved(i).is_some() => (
                rlhf_model::cuda_stats::peak_reserved(i).map(|b| b as f64),
                "torch's CUDA caching allocator: peak reserved (as torch.cuda.max_memory_reserved; no CUDA context)",
            ),
            Device::Cuda(i) => match (self.start, gpu_used_mib(i)) {
                (_, Some(GpuUsage::Process(mib))) => (Some(mib * MIB), "nvidia-smi: this process's GPU memory at exit"),
                (Some(GpuUsage::Device(a)), Some(GpuUsage::Device(b))) => {
                    (Some((b - a).max(0.0) * MIB), "nvidia-smi: GPU memory used at exit minus at start")
                }
                _ => (None, "unavailable: nvidia-smi did not answer (tch has no allocator statistics)"),
            },
            _ => (peak_rss_bytes().map(|b| b as f64), "VmHWM"),
        }
    }
}

impl Meter {
    /// On CUDA, what nvidia-smi says this process holds now (the caching
    /// allocator's reservation plus the CUDA context and libraries), so the
    /// context is `process_bytes − peak` at the end of a run.
    pub(crate) fn process_bytes(&self) -> Option<f64> {
        match self.device {
            Device::Cuda(i) => match gpu_used_mib(i) {
                Some(GpuUsage::Process(mib)) => Some(mib * 1024.0 * 1024.0),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The pad id the benches use: the config's, else its first eos, else 0.
pub(crate) fn pad_of(cfg: &Config) -> i64 {
    cfg.pad_token_id.or(cfg.eos_token_ids.first().copied()).unwrap_or(0)
}

/// `configs[a][key] / configs[b][key]`, or null when either is missing.
pub(crate) fn ratio(configs: &Map<String, Value>, a: &str, b: &str, key: &str) -> Value {
    match (configs.get(a).and_then(|c| c[key].as_f64()), configs.get(b).and_then(|c| c[key].as_f64())) {
        (Some(x), Some(y)) if y > 0.0 => json!(x / y),
        _ => Value::Null,
    }
}

/// Adds `wall_s` and `peak_memory_mib` to a child's result and logs it.
pub(crate) fn finish_child(bench: &str, name: &str, mut result: Value, wall: f64) -> Value {
    if let Value::Object(m) = &mut result {
        m.insert("wall_s".into(), json!(wall));
        if let Some(b) = m.get("peak_memory_bytes").and_then(Value::as_f64) {
            m.insert("peak_memory_mib".into(), json!(b / (1024.0 * 1024.0)));
        }
    }
    match result.get("error") {
        Some(e) => tracing::warn!(bench, config = name, error = %e, "configuration failed"),
        None => tracing::info!(
            bench,
            config = name,
            s_per_iter = result["s_per_iter"].as_f64().unwrap_or(f64::NAN),
            peak_mib = result["peak_memory_mib"].as_f64().unwrap_or(f64::NAN),
            wall_s = wall,
            "configuration done"
        ),
    }
    result
}

/// The model a bench runs on: `--model DIR`, else `--preset` (default small).
pub(crate) fn resolve_source(model: &Option<PathBuf>, preset: &Option<String>) -> Result<(Source, Config)> {
    Ok(match (model, preset) {
        (Some(dir), _) => (Source::Dir(dir.clone()), Config::from_dir(dir)?),
        (None, Some(p)) => {
            let p: BenchPreset = p.parse()?;
            (Source::Preset(p), p.config())
        }
        (None, None) => (Source::Preset(BenchPreset::Small), BenchPreset::Small.config()),
    })
}

/// `--device` and `--dtype` (default bf16 for the 7B shape, which needs CUDA; else f32).
pub(crate) fn resolve_device_kind(source: &Source, device: &str, dtype: Option<&str>) -> Result<(Device, Kind)> {
    let device = rlhf_model::parse_device(device)?;
    let seven_b = matches!(source, Source::Preset(BenchPreset::SevenB));
    if seven_b && device == Device::Cpu {
        return Err(Error::InvalidArgument("--preset 7b-shape needs --device cuda[:N]".into()));
    }
    Ok((device, rlhf_model::parse_dtype(dtype.unwrap_or(if seven_b { "bf16" } else { "f32" }))?))
}

/// `--configs` of `bench grpo|dpo` (default lora,trl): PEFT methods on the
/// shared base and TRL; `naive` is `bench ppo`'s alone.
pub(crate) fn parse_configs(bench: &str, configs: &[String]) -> Result<Vec<Variant>> {
    if configs.is_empty() {
        return Ok(vec![Variant::Lora, Variant::Trl]);
    }
    let mut v = configs.iter().map(|c| c.parse()).collect::<Result<Vec<Variant>>>()?;
    v.dedup();
    if v.contains(&Variant::Naive) {
        return Err(Error::InvalidArgument(format!(
            "--configs: naive is bench ppo's (four model copies); bench {bench} has lora, ssf, repadapter, trl"
        )));
    }
    Ok(v)
}

pub(crate) fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "f32",
    }
}

pub(crate) fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// The report's `model` and `shape` fields.
pub(crate) fn model_fields(source: &Source, c: &Config) -> (Value, Value) {
    let label = match source {
        Source::Dir(d) => d.display().to_string(),
        Source::Preset(p) => format!("preset {}", p.name()),
    };
    let shape = json!({
        "hidden": c.hidden_size, "layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
        "intermediate": c.intermediate_size, "vocab": c.vocab_size, "params": super::configs::base_params(c),
    });
    (json!(label), shape)
}

/// What a peak-memory figure is, on `device`.
pub(crate) fn memory_note(device: Device) -> String {
    match device {
        Device::Cpu => "peak memory on CPU: the child's peak RSS (VmHWM; trl: ru_maxrss)".into(),
        _ => "peak memory on CUDA: rlhfd = device memory the child held at exit per nvidia-smi (the caching \
              allocator's peak reservation plus the CUDA context), trl = torch.cuda.max_memory_reserved (no context)"
            .into(),
    }
}

/// Prints a report: the table, or with `json` the table on stderr and the
/// report as the last stdout line.
pub(crate) fn print_report(report: &Value, json: bool, table: fn(&Value) -> String) {
    if json {
        eprint!("{}", table(report));
        println!("{report}");
    } else {
        print!("{}", table(report));
    }
}

/// The per-configuration rows of a bench report's table, phases in columns.
pub(crate) fn config_rows(r: &Value, phases: &[&str]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "| config | models | trainable | peak MiB | s/iter | {} | tokens/s |", phases.join(" | "));
    let _ = writeln!(s, "|---|---:|---:|---:|---:|{}---:|", "---:|".repeat(phases.len()));
    let empty = Map::new();
    for (name, c) in r["configs"].as_object().unwrap_or(&empty) {
        if let Some(e) = c.get("error") {
            let e: String = e.as_str().unwrap_or("").chars().take(160).collect();
            let what = if e.starts_with("skipped") { "" } else { "failed: " };
            let _ = writeln!(s, "| {name} | {what}{} |", e.replace('|', "/"));
            continue;
        }
        let f = |v: &Value, digits: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.digits$}"));
        let cols: Vec<String> = phases.iter().map(|p| f(&c["phases"][*p], 3)).collect();
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} | {} |",
            c["models_loaded"],
            c["trainable_params"].as_f64().map_or("-".into(), |p| format!("{:.2}M", p / 1e6)),
            f(&c["peak_memory_mib"], 0),
            f(&c["s_per_iter"], 3),
            cols.join(" | "),
            f(&c["tokens_per_s"], 1)
        );
    }
    s
}
