//! Adapter directories in the Hugging Face PEFT layout:
//! `adapter_config.json` + `adapter_model.safetensors`. LoRA uses PEFT's own
//! keys and config fields, so adapters move between rlhfd and `peft` both
//! ways; SSF, RepAdapter and full deltas use the same two files with their
//! own `peft_type`.

use std::path::Path;

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::{build, Adapter, Method, PeftConfig};
use crate::error::{Error, Result};
use crate::{Model, WeightFiles};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Writes `adapter` to `dir` (created if missing).
pub fn save(adapter: &dyn Adapter, dir: &Path, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = adapter.config();
    let mut targets = cfg.target_modules.clone();
    if cfg.method == Method::Lora {
        targets = cfg.projections()?.iter().map(|p| p.name().to_string()).collect();
    }
    let mut config = json!({
        "peft_type": cfg.method.peft_type(),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "inference_mode": true,
        "r": cfg.r,
        "target_modules": targets,
    });
    match cfg.method {
        Method::Lora => {
            config["lora_alpha"] = json!(cfg.alpha);
            config["lora_dropout"] = json!(0.0);
            config["bias"] = json!("none");
            config["fan_in_fan_out"] = json!(false);
            config["use_rslora"] = json!(false);
            config["use_dora"] = json!(false);
        }
        Method::RepAdapter => config["groups"] = json!(cfg.groups),
        Method::Ssf | Method::Full => {}
    }
    let path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    let tensors: Vec<(String, Tensor)> =
        adapter.tensors().into_iter().map(|(k, t)| (k, t.detach().to_device(tch::Device::Cpu).contiguous())).collect();
    Tensor::write_safetensors(&tensors, dir.join(WEIGHTS_FILE))?;
    Ok(())
}

/// Reads `adapter_config.json` into a [`PeftConfig`].
pub fn read_config(dir: &Path) -> Result<PeftConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let bad = |msg: String| Error::Adapter { path: path.clone(), msg };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str).ok_or_else(|| bad("no peft_type".into()))?;
    let method = Method::from_peft_type(peft_type)
        .ok_or_else(|| bad(format!("peft_type {peft_type:?} is not one of LORA, SSF, REPADAPTER, FULL")))?;
    let mut cfg = PeftConfig::new(method);
    if let Some(r) = v.get("r").and_then(Value::as_i64) {
        cfg.r = r;
    }
    if let Some(a) = v.get("lora_alpha").and_then(Value::as_f64) {
        cfg.alpha = a;
    }
    if let Some(g) = v.get("groups").and_then(Value::as_i64) {
        cfg.groups = g;
    }
    cfg.target_modules = match v.get("target_modules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(String::from).ok_or_else(|| bad("target_modules must be strings".into())))
            .collect::<Result<_>>()?,
        Some(other) => return Err(bad(format!("target_modules {other}: only a list of module names is supported"))),
    };
    if method == Method::Lora {
        for (flag, what) in [("use_dora", "DoRA"), ("use_rslora", "rsLoRA")] {
            if v.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(bad(format!("{what} adapters are not supported")));
            }
        }
        for field in ["rank_pattern", "alpha_pattern"] {
            if v.get(field).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
                return Err(bad(format!("{field} is not supported")));
            }
        }
        for flag in ["fan_in_fan_out", "lora_bias"] {
            if v.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(bad(format!("{flag} adapters are not supported")));
            }
        }
        for field in ["layers_to_transform", "modules_to_save"] {
            if v.get(field).is_some_and(|f| !f.is_null()) {
                return Err(bad(format!("{field} is not supported")));
            }
        }
    }
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    Ok(cfg)
}

/// Loads an adapter directory for `model`: every tensor the model's modules
/// need must be present with the right shape, and nothing else.
pub fn load(dir: &Path, model: &Model) -> Result<Box<dyn Adapter>> {
    let cfg = read_config(dir)?;
    let adapter = build(cfg, model)?;
    let path = dir.join(WEIGHTS_FILE);
    let files = WeightFiles::open_file(&path)?;
    let mut wanted = std::collections::HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for (name, t) in adapter.tensors() {
            let stored = files.get(&name, &t.size(), Kind::Float, t.device())?;
            let mut t = t.shallow_clone();
            t.f_copy_(&stored)?;
            wanted.insert(name);
        }
        Ok(())
    })?;
    if let Some(extra) = files.names().find(|n| !wanted.contains(*n)) {
        return Err(Error::Adapter {
            path,
            msg: format!("tensor {extra} matches no module of this model (adapter for another model?)"),
        });
    }
    Ok(adapter)
}
