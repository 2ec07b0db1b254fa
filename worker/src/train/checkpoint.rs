//! Checkpoints under `DIR/checkpoints/step-N/`: adapters (PEFT layout),
//! extra tensors (heads), optimiser moments, and a JSON state (step, data
//! position, RNG seeds). Written to a temp dir, every file fsynced, then a
//! `manifest.json` with each file's size and checksum written last, the
//! dir renamed into place and its parent fsynced. A resume takes the newest
//! checkpoint whose files match its manifest, so a torn or corrupted one
//! falls back to the one before; the newest `keep` are kept.

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
    write_manifest(&tmp)?;
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    sync_dir(&root)?;
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

/// The newest checkpoint whose files match its manifest, if any (one
/// written before manifests existed counts when it has its state.json).
pub fn latest(out: &Path) -> Option<(usize, PathBuf)> {
    let mut all = list(out);
    all.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    all.into_iter().find(|(step, p)| match verify(p) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(step, error = %e, "skipping a damaged checkpoint; trying the one before");
            false
        }
    })
}

const MANIFEST: &str = "manifest.json";

/// FNV-1a (64 bit) of a file's bytes: catches torn and corrupted files.
fn checksum(path: &Path) -> Result<(u64, String)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    Ok((bytes.len() as u64, format!("{h:016x}")))
}

/// Every file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        for e in std::fs::read_dir(&here).map_err(|e| Error::io(&here, e))? {
            let e = e.map_err(|e| Error::io(&here, e))?;
            let r = rel.join(e.file_name());
            if e.file_type().map_err(|err| Error::io(e.path(), err))?.is_dir() {
                stack.push(r);
            } else if r != Path::new(MANIFEST) {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// Fsyncs every file (and directory) of `dir`, then writes and fsyncs the
/// manifest of their sizes and checksums.
fn write_manifest(dir: &Path) -> Result<()> {
    let mut entries = serde_json::Map::new();
    for rel in files(dir)? {
        let p = dir.join(&rel);
        std::fs::File::open(&p).and_then(|f| f.sync_all()).map_err(|e| Error::io(&p, e))?;
        if let Some(parent) = p.parent() {
            sync_dir(parent)?;
        }
        let (bytes, sum) = checksum(&p)?;
        entries.insert(rel.display().to_string(), serde_json::json!({ "bytes": bytes, "fnv1a64": sum }));
    }
    let m = dir.join(MANIFEST);
    let text = serde_json::json!({ "files": entries }).to_string();
    let mut f = std::fs::File::create(&m).map_err(|e| Error::io(&m, e))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| Error::io(&m, e))?;
    f.sync_all().map_err(|e| Error::io(&m, e))?;
    sync_dir(dir)
}

/// Whether a checkpoint's files are those its manifest lists.
pub fn verify(dir: &Path) -> Result<()> {
    let m = dir.join(MANIFEST);
    let bad = |msg: String| Error::Data { path: dir.to_path_buf(), msg };
    if !m.exists() {
        return if dir.join("state.json").exists() { Ok(()) } else { Err(bad("no manifest.json".into())) };
    }
    let text = std::fs::read_to_string(&m).map_err(|e| Error::io(&m, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("manifest.json: {e}")))?;
    let listed = v["files"].as_object().ok_or_else(|| bad("manifest.json: no files".into()))?;
    for (rel, want) in listed {
        let p = dir.join(rel);
        let (bytes, sum) = checksum(&p).map_err(|_| bad(format!("{rel} is missing")))?;
        if Some(bytes) != want["bytes"].as_u64() || Some(sum.as_str()) != want["fnv1a64"].as_str() {
            return Err(bad(format!("{rel} does not match the manifest (torn or corrupted)")));
        }
    }
    Ok(())
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
