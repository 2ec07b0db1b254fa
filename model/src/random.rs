//! Models built in memory rather than loaded from a directory: a [`Model`]
//! from named tensors, and random weights drawn directly on the device (the
//! `7b-shape` benchmark preset: nothing is written or downloaded, and the
//! weights never pass through host memory).

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use super::config::{Arch, Config};
use super::hooks::Norm;
use super::init::{Fill, INIT_STD};
use super::layers::{Linear, RmsNorm};
use super::llama::{Attention, Layer, Mlp, Model};
use crate::error::{Error, Result};

/// What errors name as the "file" of in-memory tensors.
const ORIGIN: &str = "<in-memory tensors>";

impl Model {
    /// Builds a model from tensors under their Hugging Face names (the names
    /// [`random_weights`](super::init::random_weights) and
    /// [`random_tensors`] use), converted to `kind` on `device`. Every tensor
    /// the config implies must be present with its shape; extra ones are an
    /// error too, so a misspelt name cannot go unnoticed.
    pub fn from_tensors(cfg: Config, tensors: Vec<(String, Tensor)>, kind: Kind, device: Device) -> Result<Self> {
        let mut map: HashMap<String, Tensor> = tensors.into_iter().collect();
        let mut take = |name: &str, shape: &[i64]| -> Result<Tensor> {
            let t = map
                .remove(name)
                .ok_or_else(|| Error::MissingTensor { path: PathBuf::from(ORIGIN), name: name.to_string() })?;
            if t.size() != shape {
                return Err(Error::Shape {
                    path: PathBuf::from(ORIGIN),
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    found: t.size(),
                });
            }
            if t.kind() == kind && t.device() == device {
                return Ok(t);
            }
            Ok(t.f_to_device(device)?.f_to_kind(kind)?)
        };
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        let embed_tokens = take("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers as usize);
        for li in 0..cfg.num_layers as usize {
            let p = format!("model.layers.{li}");
            let mut lin = |name: &str, in_dim: i64, out_dim: i64, bias: bool| -> Result<Linear> {
                let weight = take(&format!("{p}.{name}.weight"), &[out_dim, in_dim])?;
                let bias = if bias { Some(take(&format!("{p}.{name}.bias"), &[out_dim])?) } else { None };
                Ok(Linear { weight, bias })
            };
            let q_proj = lin("self_attn.q_proj", h, q_dim, cfg.qkv_bias)?;
            let k_proj = lin("self_attn.k_proj", h, kv_dim, cfg.qkv_bias)?;
            let v_proj = lin("self_attn.v_proj", h, kv_dim, cfg.qkv_bias)?;
            let o_proj = lin("self_attn.o_proj", q_dim, h, cfg.o_bias)?;
            let mlp = Mlp {
                gate_proj: lin("mlp.gate_proj", h, i, cfg.mlp_bias)?,
                up_proj: lin("mlp.up_proj", h, i, cfg.mlp_bias)?,
                down_proj: lin("mlp.down_proj", i, h, cfg.mlp_bias)?,
                gate_up: None,
            };
            let mut head_norm = |name: &str, site: Norm| -> Result<Option<RmsNorm>> {
                if !cfg.qk_norm {
                    return Ok(None);
                }
                let weight = take(&format!("{p}.self_attn.{name}.weight"), &[cfg.head_dim])?;
                Ok(Some(RmsNorm { weight, eps: cfg.rms_norm_eps, site }))
            };
            let q_norm = head_norm("q_norm", Norm::QNorm(li))?;
            let k_norm = head_norm("k_norm", Norm::KNorm(li))?;
            let self_attn = Attention { q_proj, k_proj, v_proj, o_proj, q_norm, k_norm, qkv: None };
            let input_layernorm = RmsNorm {
                weight: take(&format!("{p}.input_layernorm.weight"), &[h])?,
                eps: cfg.rms_norm_eps,
                site: Norm::Input(li),
            };
            let post_attention_layernorm = RmsNorm {
                weight: take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                eps: cfg.rms_norm_eps,
                site: Norm::PostAttention(li),
            };
            layers.push(Layer { input_layernorm, self_attn, post_attention_layernorm, mlp });
        }
        let norm = RmsNorm { weight: take("model.norm.weight", &[h])?, eps: cfg.rms_norm_eps, site: Norm::Final };
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear { weight: take("lm_head.weight", &[cfg.vocab_size, h])?, bias: None })
        };
        if let Some(extra) = map.keys().min() {
            return Err(Error::Weights {
                path: PathBuf::from(ORIGIN),
                msg: format!("tensor {extra} is not part of the model ({} unused)", map.len()),
            });
        }
        Ok(Self::from_parts(cfg, embed_tokens, layers, norm, lm_head, kind, device))
    }
}

/// Random weights for `cfg`, made directly in `kind` on `device` by torch's
/// generator seeded with `seed`: every matrix normal with std [`INIT_STD`],
/// biases zero, norm weights one. Unlike
/// [`random_weights`](super::init::random_weights) (a CPU ChaCha stream, for
/// model directories), this is meant for large shapes: nothing is drawn on
/// the host, and the values depend on the device's generator.
pub fn random_tensors(cfg: &Config, kind: Kind, device: Device, seed: u64) -> Result<Vec<(String, Tensor)>> {
    match device {
        Device::Cuda(_) => tch::Cuda::manual_seed_all(seed),
        _ => tch::manual_seed(seed as i64),
    }
    super::init::layout(cfg)
        .into_iter()
        .map(|(name, shape, fill)| {
            let t = match fill {
                Fill::Normal => Tensor::f_empty(shape.as_slice(), (kind, device))?.f_normal_(0.0, INIT_STD)?,
                Fill::Ones => Tensor::f_ones(shape.as_slice(), (kind, device))?,
                Fill::Zeros => Tensor::f_zeros(shape.as_slice(), (kind, device))?,
            };
            Ok((name, t))
        })
        .collect()
}

/// A model of shape `cfg` with [`random_tensors`] weights.
pub fn random_model(cfg: Config, kind: Kind, device: Device, seed: u64) -> Result<Model> {
    let tensors = random_tensors(&cfg, kind, device, seed)?;
    Model::from_tensors(cfg, tensors, kind, device)
}

/// The shape of LLaMA-2-7B (hidden 4096, 32 layers, 32 heads, no GQA,
/// intermediate 11008, vocabulary 32000, untied head): about 6.7B parameters.
pub fn llama2_7b_config() -> Config {
    Config {
        arch: Arch::Llama,
        vocab_size: 32000,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_layers: 32,
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        pad_token_id: Some(0),
    }
}

/// Qwen2.5-0.5B's shape (Qwen2: q/k/v biases, 2 kv heads, tied embeddings).
pub fn qwen2_0_5b_config() -> Config {
    Config {
        arch: Arch::Qwen2,
        vocab_size: 151936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_layers: 24,
        num_heads: 14,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        rope_scaling: None,
        max_position_embeddings: 32768,
        tie_word_embeddings: true,
        qkv_bias: true,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        bos_token_id: None,
        eos_token_ids: vec![151643],
        pad_token_id: Some(151643),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::{random_weights, Preset};
    use crate::{Mask, NoHooks};

    fn logits(m: &Model, ids: &[i64]) -> Tensor {
        let ids = Tensor::from_slice(ids).unsqueeze(0);
        let pos = Tensor::arange(ids.size()[1], (Kind::Int64, Device::Cpu)).unsqueeze(0);
        let h = m.forward(&ids, &pos, Mask::Causal, None, &NoHooks).expect("forward");
        m.logits(&h, &NoHooks)
    }

    #[test]
    fn from_tensors_equals_loading_the_same_weights() {
        let cfg = Preset::Tiny.config(300, 1, 0);
        let dir = tempfile::tempdir().expect("tempdir");
        let w = random_weights(&cfg, 3).expect("weights");
        crate::save::write_safetensors(&w, &dir.path().join("model.safetensors")).expect("save");
        crate::save::write_config(&cfg, &dir.path().join("config.json")).expect("config");
        let loaded = Model::load(dir.path(), Kind::Float, Device::Cpu).expect("load");
        let built = Model::from_tensors(cfg, w, Kind::Float, Device::Cpu).expect("from_tensors");
        let ids = [5, 17, 2, 250, 9];
        assert!(logits(&loaded, &ids).allclose(&logits(&built, &ids), 1e-6, 1e-6, false));
    }

    #[test]
    fn missing_wrong_and_extra_tensors_are_named() {
        let cfg = Preset::Tiny.config(300, 1, 0);
        let mut w = random_weights(&cfg, 3).expect("weights");
        w.retain(|(n, _)| n != "model.norm.weight");
        let err = Model::from_tensors(cfg.clone(), w, Kind::Float, Device::Cpu).err().expect("missing");
        assert!(err.to_string().contains("model.norm.weight"), "{err}");

        let mut w = random_weights(&cfg, 3).expect("weights");
        w[0].1 = Tensor::zeros([3, 3], (Kind::Float, Device::Cpu));
        let err = Model::from_tensors(cfg.clone(), w, Kind::Float, Device::Cpu).err().expect("shape");
        assert!(err.to_string().contains("model.embed_tokens.weight"), "{err}");

        let mut w = random_weights(&cfg, 3).expect("weights");
        w.push(("model.extra".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu))));
        let err = Model::from_tensors(cfg, w, Kind::Float, Device::Cpu).err().expect("extra");
        assert!(err.to_string().contains("model.extra"), "{err}");
    }

    #[test]
    fn random_model_has_the_shape_and_scale() {
        let cfg = Preset::Tiny.config(300, 1, 0);
        let m = random_model(cfg.clone(), Kind::Float, Device::Cpu, 5).expect("model");
        assert_eq!(m.embed_tokens.size(), vec![300, 64]);
        assert_eq!(m.layers.len(), cfg.num_layers as usize);
        let std = m.layers[0].mlp.up_proj.weight.std(true).double_value(&[]);
        assert!((std - INIT_STD).abs() < 0.002, "std {std}");
        let again = random_model(cfg, Kind::Float, Device::Cpu, 5).expect("model");
        assert!(m.embed_tokens.equal(&again.embed_tokens), "seeded");
        assert_eq!(llama2_7b_config().head_dim * llama2_7b_config().num_heads, 4096);
    }
}
