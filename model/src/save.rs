//! Writes a Hugging Face model directory that both `Model::load` and
//! transformers' `AutoModelForCausalLM` / `AutoTokenizer` read:
//! `config.json`, `model.safetensors`, `generation_config.json` and,
//! given a tokenizer, `tokenizer.json` + `tokenizer_config.json`.
//!
//! Every file is written under a temporary name, synced and renamed into
//! place, so a crash never leaves a half-written file. A directory that does
//! not exist yet (or is empty) is built whole in a sibling staging directory
//! and renamed at the end; into an existing directory, `config.json` is
//! written last, so a directory without it is never mistaken for a model.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, View};
use serde_json::{json, Map, Value};
use tch::{Device, Kind, Tensor};

use super::config::{Arch, Config, RopeScaling};
use super::layers::Linear;
use super::llama::{Layer, Model};
use crate::error::{Error, Result};

/// Writes `config.json` for `cfg` with `torch_dtype` float32.
pub fn write_config(cfg: &Config, path: &Path) -> Result<()> {
    write_config_as(cfg, Kind::Float, path)
}

/// Writes `config.json` for `cfg`, declaring the weights' dtype `kind`.
pub fn write_config_as(cfg: &Config, kind: Kind, path: &Path) -> Result<()> {
    let value = config_json(cfg, kind)?;
    write_json(&value, path)
}

/// Writes `generation_config.json` with the config's bos/eos/pad ids.
pub fn write_generation_config(cfg: &Config, path: &Path) -> Result<()> {
    let mut m = Map::new();
    insert_ids(&mut m, cfg);
    write_json(&Value::Object(m), path)
}

/// Files that travel with a `tokenizer.json` when it is copied.
const TOKENIZER_COMPANIONS: [&str; 4] =
    ["tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"];

/// Copies `tokenizer_json` to `dir/tokenizer.json` (unless it already is
/// that file), together with the `tokenizer_config.json`, special-token map
/// and chat template beside it, verbatim. Without a `tokenizer_config.json`
/// beside it, one is written by [`write_tokenizer_config`].
pub fn write_tokenizer_files(cfg: &Config, tokenizer_json: &Path, dir: &Path) -> Result<()> {
    copy_atomic(tokenizer_json, &dir.join("tokenizer.json"))?;
    let src_dir = tokenizer_json.parent().unwrap_or(Path::new("."));
    for name in TOKENIZER_COMPANIONS {
        let src = src_dir.join(name);
        if src.is_file() {
            copy_atomic(&src, &dir.join(name))?;
        }
    }
    if !src_dir.join("tokenizer_config.json").is_file() {
        write_tokenizer_config(cfg, tokenizer_json, &dir.join("tokenizer_config.json"))?;
    }
    Ok(())
}

/// Writes a `tokenizer_config.json` for `tokenizer_json`: the bos/eos/pad
/// token strings of the config's ids, `tokenizer_class`
/// (`PreTrainedTokenizerFast`) and `model_max_length`.
pub fn write_tokenizer_config(cfg: &Config, tokenizer_json: &Path, path: &Path) -> Result<()> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer_json)
        .map_err(|e| Error::Tokenizer { path: tokenizer_json.to_path_buf(), msg: e.to_string() })?;
    let token = |id: Option<i64>| id.and_then(|i| u32::try_from(i).ok()).and_then(|i| tok.id_to_token(i));
    let mut tc = Map::new();
    let entries = [
        ("bos_token", token(cfg.bos_token_id)),
        ("eos_token", token(cfg.eos_token_ids.first().copied())),
        ("pad_token", token(cfg.pad_token_id)),
    ];
    for (key, value) in entries {
        if let Some(s) = value {
            tc.insert(key.into(), Value::String(s));
        }
    }
    tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    tc.insert("model_max_length".into(), json!(cfg.max_position_embeddings));
    tc.insert("clean_up_tokenization_spaces".into(), json!(false));
    write_json(&Value::Object(tc), path)
}

/// Saves `model` as a Hugging Face directory: every tensor under its HF name
/// in the model's dtype (no `lm_head.weight` when tied), plus the configs and,
/// given one, the tokenizer.
///
/// Biases that merging an adapter created (SSF, RepAdapter) are kept: the
/// config declares them (`attention_bias`, `mlp_bias`; a Qwen2 model with an
/// output or MLP bias is written as the equivalent LLaMA) and absent sibling
/// biases are written as zeros. A Qwen3 model stays Qwen3 (its q/k norms
/// have no place in a LLaMA): attention biases become `attention_bias`, an
/// MLP bias is an error. A merged logit bias (`lm_head_bias`) has no place
/// in any of these architectures and is an error too.
pub fn save_model(model: &Model, dir: &Path, tokenizer_json: Option<&Path>) -> Result<()> {
    if model.lm_head_bias.is_some() {
        return Err(Error::InvalidArgument(format!(
            "cannot save to {}: the model has a merged logit bias (lm_head_bias), which a llama/qwen2/qwen3 \
             checkpoint cannot hold; unmerge the adapter first",
            dir.display()
        )));
    }
    let cfg = saved_config(model).map_err(|msg| {
        Error::InvalidArgument(format!("cannot save to {}: {msg}; unmerge the adapter first", dir.display()))
    })?;
    let tensors = model_tensors(model, &cfg)?;
    write_dir(dir, |d| {
        write_safetensors(&tensors, &d.join("model.safetensors"))?;
        if let Some(t) = tokenizer_json {
            write_tokenizer_files(&cfg, t, d)?;
        }
        write_generation_config(&cfg, &d.join("generation_config.json"))?;
        write_config_as(&cfg, model.kind, &d.join("config.json"))
    })
}

/// Writes named tensors (any device, any layout) to a safetensors file with
/// `{"format": "pt"}` metadata, atomically.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.f_to_device(Device::Cpu)?.f_contiguous()?;
        let dtype = dtype_of(t.kind()).ok_or_else(|| Error::Weights {
            path: path.to_path_buf(),
            msg: format!("tensor {name}: dtype {:?} cannot be saved", t.kind()),
        })?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        views.push((name.as_str(), CpuView { t, shape, dtype }));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    with_temp(path, |tmp| {
        safetensors::serialize_to_file(views.iter().map(|(n, v)| (*n, v)), Some(meta), tmp)
            .map_err(|e| Error::Weights { path: path.to_path_buf(), msg: format!("cannot write safetensors: {e}") })?;
        let f = fs::File::open(tmp).map_err(|e| Error::io(tmp, e))?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// Builds the directory `out` through `fill`, which gets the directory to
/// write into. A new or empty `out` is staged beside it and renamed whole;
/// an existing one is written in place (`fill` should write `config.json`
/// last).
pub(crate) fn write_dir(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let fresh = match fs::read_dir(out) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(Error::io(out, e)),
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    let (true, Some(name)) = (fresh, name) else {
        fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        return fill(out);
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let staging = parent.join(format!(".{name}.staging-{}-{}", std::process::id(), next_id()));
    fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = fill(&staging).and_then(|()| {
        if out.exists() {
            fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        fs::rename(&staging, out).map_err(|e| Error::io(out, e))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// The config that describes what `model` holds now, or why no config can.
fn saved_config(model: &Model) -> std::result::Result<Config, String> {
    let mut cfg = model.cfg.clone();
    cfg.tie_word_embeddings = model.lm_head.is_none();
    let has_bias = |pick: &dyn Fn(&Layer) -> Vec<&Linear>| {
        model.layers.iter().any(|l| pick(l).iter().any(|lin| lin.bias.is_some()))
    };
    let qkv = has_bias(&|l| vec![&l.self_attn.q_proj, &l.self_attn.k_proj, &l.self_attn.v_proj]);
    let o = has_bias(&|l| vec![&l.self_attn.o_proj]);
    let mlp = has_bias(&|l| vec![&l.mlp.gate_proj, &l.mlp.up_proj, &l.mlp.down_proj]);
    if cfg.arch == Arch::Qwen3 {
        if mlp {
            return Err("the model has MLP biases (from a merged adapter), which a qwen3 checkpoint cannot hold".into());
        }
        // Qwen3's `attention_bias` covers q, k, v and o together.
        let attn = qkv || o;
        (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) = (attn, attn, false);
    } else if cfg.arch == Arch::Qwen2 && !o && !mlp {
        (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) = (true, false, false);
    } else {
        // LLaMA's `attention_bias` covers q, k, v and o together; Qwen2
        // always has q/k/v biases.
        let attn = qkv || o || cfg.arch == Arch::Qwen2;
        cfg.arch = Arch::Llama;
        (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) = (attn, attn, mlp);
    }
    Ok(cfg)
}

/// Every tensor under its HF name; biases the config declares but a layer
/// lacks are zeros.
fn model_tensors(model: &Model, cfg: &Config) -> Result<Vec<(String, Tensor)>> {
    let mut out = vec![("model.embed_tokens.weight".to_string(), model.embed_tokens.shallow_clone())];
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        let linears = [
            ("self_attn.q_proj", &layer.self_attn.q_proj, cfg.qkv_bias),
            ("self_attn.k_proj", &layer.self_attn.k_proj, cfg.qkv_bias),
            ("self_attn.v_proj", &layer.self_attn.v_proj, cfg.qkv_bias),
            ("self_attn.o_proj", &layer.self_attn.o_proj, cfg.o_bias),
            ("mlp.gate_proj", &layer.mlp.gate_proj, cfg.mlp_bias),
            ("mlp.up_proj", &layer.mlp.up_proj, cfg.mlp_bias),
            ("mlp.down_proj", &layer.mlp.down_proj, cfg.mlp_bias),
        ];
        out.push((format!("{p}.input_layernorm.weight"), layer.input_layernorm.weight.shallow_clone()));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            layer.post_attention_layernorm.weight.shallow_clone(),
        ));
        for norm in [&layer.self_attn.q_norm, &layer.self_attn.k_norm].into_iter().flatten() {
            out.push((format!("{}.weight", norm.site.module_name()), norm.weight.shallow_clone()));
        }
        for (name, lin, bias) in linears {
            out.push((format!("{p}.{name}.weight"), lin.weight.shallow_clone()));
            match (&lin.bias, bias) {
                (Some(b), _) => out.push((format!("{p}.{name}.bias"), b.shallow_clone())),
                (None, true) => out.push((
                    format!("{p}.{name}.bias"),
                    Tensor::f_zeros([lin.out_dim()], (lin.weight.kind(), lin.weight.device()))?,
                )),
                (None, false) => {}
            }
        }
    }
    out.push(("model.norm.weight".to_string(), model.norm.weight.shallow_clone()));
    if let Some(head) = &model.lm_head {
        out.push(("lm_head.weight".to_string(), head.weight.shallow_clone()));
    }
    Ok(out)
}

fn config_json(cfg: &Config, kind: Kind) -> Result<Value> {
    let bad = |msg: &str| Err(Error::InvalidArgument(format!("{} config: {msg}", cfg.arch.model_type())));
    match cfg.arch {
        Arch::Llama | Arch::Qwen3 if cfg.qkv_bias != cfg.o_bias => {
            return bad("q/k/v and o biases must be all present or all absent (attention_bias)");
        }
        Arch::Qwen3 if cfg.mlp_bias => return bad("qwen3 has no MLP biases; such a model cannot be saved as qwen3"),
        Arch::Qwen2 if !cfg.qkv_bias || cfg.o_bias || cfg.mlp_bias => {
            return bad("qwen2 has q/k/v biases only; save such a model as llama");
        }
        _ => {}
    }
    if cfg.qk_norm != (cfg.arch == Arch::Qwen3) {
        return bad("q/k norms (q_norm, k_norm) exist in qwen3 models only");
    }
    let dtype = match kind {
        Kind::Float => "float32",
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        other => return Err(Error::InvalidArgument(format!("config: dtype {other:?} cannot be declared"))),
    };
    let mut m = Map::new();
    m.insert("architectures".into(), json!([cfg.arch.class()]));
    m.insert("model_type".into(), json!(cfg.arch.model_type()));
    m.insert("vocab_size".into(), json!(cfg.vocab_size));
    m.insert("hidden_size".into(), json!(cfg.hidden_size));
    m.insert("intermediate_size".into(), json!(cfg.intermediate_size));
    m.insert("num_hidden_layers".into(), json!(cfg.num_layers));
    m.insert("num_attention_heads".into(), json!(cfg.num_heads));
    m.insert("num_key_value_heads".into(), json!(cfg.num_kv_heads));
    m.insert("head_dim".into(), json!(cfg.head_dim));
    m.insert("hidden_act".into(), json!("silu"));
    m.insert("max_position_embeddings".into(), json!(cfg.max_position_embeddings));
    m.insert("rms_norm_eps".into(), json!(cfg.rms_norm_eps));
    // transformers < 5 reads `rope_theta` and `rope_scaling`, 5 reads
    // `rope_parameters` (or `rope_scaling` first, where given: the same dict,
    // its theta from `rope_theta`).
    m.insert("rope_theta".into(), json!(cfg.rope_theta));
    let mut rope = Map::new();
    rope.insert("rope_type".into(), json!(cfg.rope_scaling.as_ref().map_or("default", RopeScaling::rope_type)));
    match cfg.rope_scaling {
        None => {}
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            rope.insert("factor".into(), json!(factor));
            rope.insert("low_freq_factor".into(), json!(low_freq_factor));
            rope.insert("high_freq_factor".into(), json!(high_freq_factor));
            rope.insert("original_max_position_embeddings".into(), json!(original_max_position_embeddings));
            m.insert("rope_scaling".into(), Value::Object(rope.clone()));
        }
    }
    rope.insert("rope_theta".into(), json!(cfg.rope_theta));
    m.insert("rope_parameters".into(), Value::Object(rope));
    m.insert("tie_word_embeddings".into(), json!(cfg.tie_word_embeddings));
    match cfg.arch {
        Arch::Llama => {
            m.insert("attention_bias".into(), json!(cfg.qkv_bias));
            m.insert("mlp_bias".into(), json!(cfg.mlp_bias));
        }
        Arch::Qwen2 => {
            m.insert("use_sliding_window".into(), json!(false));
        }
        Arch::Qwen3 => {
            m.insert("attention_bias".into(), json!(cfg.qkv_bias));
            m.insert("use_sliding_window".into(), json!(false));
        }
    }
    m.insert("attention_dropout".into(), json!(0.0));
    m.insert("initializer_range".into(), json!(0.02));
    m.insert("use_cache".into(), json!(true));
    insert_ids(&mut m, cfg);
    // transformers < 5 reads `torch_dtype`, 5 reads `dtype`.
    m.insert("torch_dtype".into(), json!(dtype));
    m.insert("dtype".into(), json!(dtype));
    Ok(Value::Object(m))
}

fn insert_ids(m: &mut Map<String, Value>, cfg: &Config) {
    if let Some(id) = cfg.bos_token_id {
        m.insert("bos_token_id".into(), json!(id));
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            m.insert("eos_token_id".into(), json!(one));
        }
        many => {
            m.insert("eos_token_id".into(), json!(many));
        }
    }
    if let Some(id) = cfg.pad_token_id {
        m.insert("pad_token_id".into(), json!(id));
    }
}

fn write_json(value: &Value, path: &Path) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::InvalidArgument(format!("{}: cannot serialize: {e}", path.display())))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Writes `bytes` to a temporary sibling of `path`, syncs it, renames it.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    with_temp(path, |tmp| {
        let mut f = fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
        f.sync_all().map_err(|e| Error::io(tmp, e))
    })
}

/// Runs `write` on a temporary sibling of `path` and renames it into place;
/// removes the temporary file if anything fails.
fn with_temp(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{}", std::process::id(), next_id()));
    let result = write(&tmp).and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Copies `src` to `dest` through a temporary file; nothing to do when
/// they are the same file.
fn copy_atomic(src: &Path, dest: &Path) -> Result<()> {
    if same_file(src, dest) {
        return Ok(());
    }
    let bytes = fs::read(src).map_err(|e| Error::io(src, e))?;
    write_atomic(dest, &bytes)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        _ => return None,
    })
}

/// A contiguous CPU tensor whose bytes safetensors reads in place.
struct CpuView {
    t: Tensor,
    shape: Vec<usize>,
    dtype: Dtype,
}

impl View for &CpuView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let len = self.data_len();
        if len == 0 {
            return Cow::Borrowed(&[]);
        }
        // SAFETY: `t` is a contiguous CPU tensor that `self` keeps alive and
        // nothing writes while it is serialized; `data_ptr` includes the
        // storage offset, and `len` is exactly its element bytes.
        Cow::Borrowed(unsafe { std::slice::from_raw_parts(self.t.data_ptr() as *const u8, len) })
    }

    fn data_len(&self) -> usize {
        self.t.numel() * self.t.kind().elt_size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_from_dir() {
        let qwen2 = r#"{"model_type":"qwen2","vocab_size":100,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"tie_word_embeddings":true,
            "rope_theta":1000000.0,"rms_norm_eps":1e-5,"bos_token_id":3,"eos_token_id":[5,6],"pad_token_id":5}"#;
        let qwen3 = qwen2.replace("qwen2", "qwen3").replace(r#""tie_word_embeddings":true"#, r#""head_dim":32"#);
        let llama3 = qwen2.replace("qwen2", "llama").replace(
            r#""rope_theta":1000000.0"#,
            r#""rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
                "original_max_position_embeddings":64},"rope_theta":500000.0"#,
        );
        for text in [qwen2, &qwen3, &llama3] {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join("config.json"), text).expect("write");
            let cfg = Config::from_dir(dir.path()).expect("parse");
            let out = tempfile::tempdir().expect("tempdir");
            write_config(&cfg, &out.path().join("config.json")).expect("write config");
            let back = Config::from_dir(out.path()).expect("reparse");
            assert_eq!(format!("{cfg:?}"), format!("{back:?}"));
            // transformers 5 reads rope_parameters alone; it must say the same.
            let mut v: Value =
                serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).expect("read"))
                    .expect("json");
            let obj = v.as_object_mut().expect("object");
            obj.remove("rope_scaling");
            obj.remove("rope_theta");
            std::fs::write(out.path().join("config.json"), v.to_string()).expect("write");
            let back = Config::from_dir(out.path()).expect("reparse rope_parameters only");
            assert_eq!(format!("{cfg:?}"), format!("{back:?}"));
        }
    }

    #[test]
    fn llama_with_split_attention_bias_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2}"#;
        std::fs::write(dir.path().join("config.json"), text).expect("write");
        let mut cfg = Config::from_dir(dir.path()).expect("parse");
        cfg.qkv_bias = true;
        let err = write_config(&cfg, &dir.path().join("out.json")).expect_err("must fail");
        assert!(err.to_string().contains("attention_bias"), "{err}");
        assert!(!dir.path().join("out.json").exists());
    }

    #[test]
    fn failed_staged_write_leaves_nothing() {
        let parent = tempfile::tempdir().expect("tempdir");
        let out = parent.path().join("model");
        let r = write_dir(&out, |d| {
            write_atomic(&d.join("a.txt"), b"x")?;
            Err(Error::InvalidArgument("boom".into()))
        });
        assert!(r.is_err());
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(parent.path()).expect("read").count(), 0);
    }
}
