//! Memory-mapped safetensors, single-file or sharded with an index.
//!
//! Tensors whose dtype and device already match are views straight into a
//! private (copy-on-write) mapping, so loading makes no second copy of the
//! weights in RAM, and merging an adapter in place only dirties the pages it
//! touches.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{MmapMut, MmapOptions};
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

struct Shard {
    path: PathBuf,
    map: Arc<MmapMut>,
    data_start: usize,
}

/// Every tensor of a checkpoint directory (or a single file), by name.
pub struct WeightFiles {
    shards: Vec<Shard>,
    index: HashMap<String, (usize, TensorInfo)>,
    /// What to name in errors: the directory or file the user pointed at.
    origin: PathBuf,
    /// Views into the maps handed out by `get_mapped`.
    views: std::sync::atomic::AtomicUsize,
}

impl WeightFiles {
    /// Opens `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`, inside `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            return Self::open_files(dir, &[single]);
        }
        if !index.exists() {
            return Err(Error::Weights {
                path: dir.to_path_buf(),
                msg: "no model.safetensors or model.safetensors.index.json".into(),
            });
        }
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let bad = |msg: String| Error::Weights { path: index.clone(), msg };
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map =
            json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no weight_map object".into()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let file = file.as_str().ok_or_else(|| bad("weight_map values must be file names".into()))?;
            let path = dir.join(file);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        Self::open_files(dir, &files)
    }

    /// Opens one safetensors file.
    pub fn open_file(path: &Path) -> Result<Self> {
        Self::open_files(path, &[path.to_path_buf()])
    }

    fn open_files(origin: &Path, files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: a private copy-on-write mapping; the file may change on
            // disk underneath us only if someone rewrites a checkpoint while we
            // load it, which a checkpoint directory's owner does not do.
            let map = unsafe { MmapOptions::new().map_copy(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::Weights {
                path: path.clone(),
                msg: format!("not a valid safetensors file (truncated or corrupt): {e}"),
            })?;
            for (name, info) in meta.tensors() {
                index.insert(name, (i, info.clone()));
            }
            shards.push(Shard { path: path.clone(), map: Arc::new(map), data_start: 8 + header_len });
        }
        Ok(Self { shards, index, origin: origin.to_path_buf(), views: Default::default() })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<i64>> {
        self.index.get(name).map(|(_, info)| info.shape.iter().map(|&d| d as i64).collect())
    }

    /// Loads `name`, checks its shape, converts to `kind` on `device`. The
    /// result owns its memory (safe to keep after `self` is dropped).
    pub fn get(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let t = self.get_mapped(name, shape, kind, device)?;
        Ok(if t.data_ptr() as usize >= self.lowest() && t.data_ptr() as usize <= self.highest() { t.copy() } else { t })
    }

    /// Like [`get`](Self::get), but a tensor whose dtype and device already
    /// match is a view into the memory map: no copy, and valid only while
    /// `self` lives. The model keeps its `WeightFiles` for exactly this.
    pub(crate) fn get_mapped(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let (shard, info) = self
            .index
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: self.origin.clone(), name: name.to_string() })?;
        let shard = &self.shards[*shard];
        let found: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        if found != shape {
            return Err(Error::Shape {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found,
            });
        }
        let stored = kind_of(info.dtype).ok_or_else(|| Error::Weights {
            path: shard.path.clone(),
            msg: format!("tensor {name}: unsupported dtype {:?}", info.dtype),
        })?;
        let view = self.view(shard, info, stored)?;
        if stored == kind && device == Device::Cpu {
            self.views.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(view);
        }
        let copy = view.f_to_device(device)?.f_to_kind(kind)?;
        Self::release(shard, info);
        Ok(copy)
    }

    /// Drops the mapped pages that hold only `info`'s bytes once a copy of
    /// the tensor is made (a converted or moved weight), so that loading a
    /// model in another dtype does not keep the file's pages resident beside
    /// the copies (f32 from a bf16 file: 2.5 GB of copies plus 1.3 GB of
    /// pages for Qwen2.5-0.5B). Pages shared with a neighbouring tensor stay.
    fn release(shard: &Shard, info: &TensorInfo) {
        // A multiple of every common page size (4, 16, 64 KiB).
        const ALIGN: usize = 1 << 16;
        let base = shard.map.as_ptr() as usize;
        let (start, end) = info.data_offsets;
        let lo = (base + shard.data_start + start).next_multiple_of(ALIGN);
        let hi = (base + shard.data_start + end) / ALIGN * ALIGN;
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the map and inside this tensor's
            // bytes, which nothing references: the tensor was just copied,
            // and no view of it was handed out (views are only handed out
            // when the dtype and device match, and then nothing is copied).
            // The map is private and these pages were only read, so if they
            // are touched again they are read back from the file unchanged.
            let _ = unsafe { shard.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo - base, hi - lo) };
        }
    }

    /// Drops the mapped pages that hold only tensor `name`'s bytes, once the
    /// view of it that [`WeightFiles::get_mapped`] handed out has been
    /// copied and dropped, before anything wrote to it (a projection fused
    /// at load). The caller guarantees both; an unknown name does nothing.
    pub(crate) fn release_copied(&self, name: &str) {
        if let Some((shard, info)) = self.index.get(name) {
            Self::release(&self.shards[*shard], info);
        }
    }

    /// Whether any tensor handed out views the maps (else the maps may go:
    /// converted or moved weights hold copies, and mapped pages that were
    /// read to make them would still count in the resident set).
    pub(crate) fn has_views(&self) -> bool {
        self.views.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    fn lowest(&self) -> usize {
        self.shards.iter().map(|s| s.map.as_ptr() as usize).min().unwrap_or(0)
    }

    fn highest(&self) -> usize {
        self.shards.iter().map(|s| s.map.as_ptr() as usize + s.map.len()).max().unwrap_or(0)
    }

    /// Loads `name` with whatever shape and dtype it has, as a CPU copy.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let (shard, info) = self
            .index
            .get(name)
            .ok_or_else(|| Error::MissingTensor { path: self.origin.clone(), name: name.to_string() })?;
        let shard = &self.shards[*shard];
        let stored = kind_of(info.dtype).ok_or_else(|| Error::Weights {
            path: shard.path.clone(),
            msg: format!("tensor {name}: unsupported dtype {:?}", info.dtype),
        })?;
        Ok(self.view(shard, info, stored)?.copy())
    }

    fn view(&self, shard: &Shard, info: &TensorInfo, kind: Kind) -> Result<Tensor> {
        let (start, end) = info.data_offsets;
        let bytes = shard
            .map
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| Error::Weights { path: shard.path.clone(), msg: "tensor data out of bounds".into() })?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let mut strides = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape[i + 1];
        }
        // SAFETY: `bytes` lies inside a mapping kept alive by `self.shards`;
        // `get` and `get_any` copy out of it, and only `get_mapped` hands out
        // the view itself, to a model that also holds this `WeightFiles`.
        let t = unsafe { Tensor::f_from_blob(bytes.as_ptr(), &shape, &strides, kind, Device::Cpu)? };
        // Files whose header is not padded to 8 bytes leave data misaligned:
        // hand out an aligned copy rather than a view then.
        if !(bytes.as_ptr() as usize).is_multiple_of(kind.elt_size_in_bytes()) {
            return Ok(t.copy());
        }
        Ok(t)
    }
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}
