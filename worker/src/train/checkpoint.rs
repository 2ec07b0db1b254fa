//! Checkpoints under `DIR/checkpoints/step-N/`: adapters (PEFT layout),
//! extra tensors (heads), optimiser moments, and a JSON state (step, data
//! position, RNG seeds). Written to a temp dir and renamed, so a crash never
//! leaves a half checkpoint; the newest `keep` are kept.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tch::Tensor;

use super::optim::AdamW;
use crate::error::{Error, Result};
use rlhf_model::peft::{self, Adapter};

pub struct Checkpoint<'a> {
    pub adapters: Vec<(&'a str, &'a dyn Adapter)>,
    pub tensors: Vec<(String, Tensor)>,
    pub optimizers: Vec<(&'a str, &'a AdamW)>,
    pub state: Value,
}

fn root(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Writes `step-N` and prunes old ones.
pub fn save(out: &Path, step: usize, base_model: &str, ck: &Checkpoint<'_>, keep: usize) -> Result<PathBuf> {
    save_with(out, step, base_model, ck, keep, &mut |_| Ok(()))
}

/// [`save`], letting `extra` add files to the checkpoint before it is published.
pub fn save_with(
    out: &Path,
    step: usize,
    base_model: &str,
    ck: &Checkpoint<'_>,
    keep: usize,
    extra: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let root = root(out);
    let tmp = root.join(format!(".tmp-step-{step}"));
    let dst = root.join(format!("step-{step}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    for (name, a) in &ck.adapters {
        peft::io::save(*a, &tmp.join(name), base_model)?;
    }
    if !ck.tensors.is_empty() {
        let cpu: Vec<(String, Tensor)> =
            ck.tensors.iter().map(|(k, t)| (k.clone(), t.detach().to_device(tch::Device::Cpu))).collect();
        Tensor::write_safetensors(&cpu, tmp.join("tensors.safetensors"))?;
    }
    for (name, o) in &ck.optimizers {
        o.save(&tmp.join(format!("optimizer-{name}.safetensors")))?;
    }
    extra(&tmp)?;
    let state = tmp.join("state.json");
    std::fs::write(&state, ck.state.to_string()).map_err(|e| Error::io(&state, e))?;
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    let mut all = list(out);
    all.sort();
    while all.len() > keep.max(1) {
        let (_, p) = all.remove(0);
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(dst)
}

fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(root(out)) else { return Vec::new() };
    rd.filter_map(|e| {
        let p = e.ok()?.path();
        let step = p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()?;
        Some((step, p))
    })
    .collect()
}

/// The newest complete checkpoint, if any.
pub fn latest(out: &Path) -> Option<(usize, PathBuf)> {
    list(out).into_iter().filter(|(_, p)| p.join("state.json").exists()).max_by_key(|(s, _)| *s)
}

/// The JSON state of a checkpoint.
pub fn read_state(dir: &Path) -> Result<Value> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Data { path: p, msg: e.to_string() })
}

/// Copies the tensors of a saved adapter into a live one.
pub fn restore_adapter(dir: &Path, into: &dyn Adapter) -> Result<()> {
    let files = rlhf_model::WeightFiles::open_file(&dir.join(peft::io::WEIGHTS_FILE))?;
    tch::no_grad(|| -> Result<()> {
        for (name, t) in into.tensors() {
            let stored = files.get(&name, &t.size(), tch::Kind::Float, t.device())?;
            t.shallow_clone().f_copy_(&stored)?;
        }
        Ok(())
    })
}

/// Copies named tensors from `tensors.safetensors` into live ones.
pub fn restore_tensors(dir: &Path, into: &[(&str, &Tensor)]) -> Result<()> {
    let files = rlhf_model::WeightFiles::open_file(&dir.join("tensors.safetensors"))?;
    tch::no_grad(|| -> Result<()> {
        for (name, t) in into {
            let stored = files.get(name, &t.size(), tch::Kind::Float, t.device())?;
            t.shallow_clone().f_copy_(&stored)?;
        }
        Ok(())
    })
}
