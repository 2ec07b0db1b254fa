//! What a bench runs: its configurations ([`Variant`]), the model shapes it
//! can make by itself ([`BenchPreset`]), where a configuration's base
//! weights come from ([`Source`]) and a model's parameter count.

use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};
use rlhf_model::init::Preset;
use rlhf_model::peft::Method;
use rlhf_model::random::{llama2_7b_config, qwen2_0_5b_config};
use rlhf_model::Config;

/// A configuration of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    Lora,
    Ssf,
    RepAdapter,
    Naive,
    Trl,
}

impl Variant {
    pub const ALL: [Variant; 5] = [Variant::Lora, Variant::Ssf, Variant::RepAdapter, Variant::Naive, Variant::Trl];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Lora => "lora",
            Variant::Ssf => "ssf",
            Variant::RepAdapter => "repadapter",
            Variant::Naive => "naive",
            Variant::Trl => "trl",
        }
    }

    /// The adapter method of a shared-base configuration.
    pub(crate) fn shared_method(self) -> Option<Method> {
        match self {
            Variant::Lora => Some(Method::Lora),
            Variant::Ssf => Some(Method::Ssf),
            Variant::RepAdapter => Some(Method::RepAdapter),
            Variant::Naive | Variant::Trl => None,
        }
    }
}

impl FromStr for Variant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Variant::ALL.into_iter().find(|v| v.name() == s.trim()).ok_or_else(|| {
            Error::InvalidArgument(format!("--configs: unknown {s:?} (expected lora, ssf, repadapter, naive, trl)"))
        })
    }
}

/// Model shapes the bench can make by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchPreset {
    /// `Preset::Tiny`'s shape, vocabulary 2000.
    Tiny,
    /// hidden 768, 6 layers, 12 heads (4 kv), intermediate 2048, vocabulary
    /// 8000 (44M parameters, 176 MB in f32): `Preset::Small` made wide
    /// enough that weights and optimizer state, not libtorch's own ~370 MB
    /// or the activations, decide the memory figures, and still a few
    /// minutes for every configuration on 2 CPU cores.
    Small,
    /// LLaMA-2-7B's shape, random bf16 weights made on the GPU.
    SevenB,
    /// Qwen2.5-0.5B's shape (vocabulary 151936), random weights made by each
    /// child (the Python baseline gets its config.json and random weights):
    /// a real model's shape where the weights cannot be fetched (the GPU machine).
    Qwen05B,
}

impl BenchPreset {
    pub fn name(self) -> &'static str {
        match self {
            BenchPreset::Tiny => "tiny",
            BenchPreset::Small => "small",
            BenchPreset::SevenB => "7b-shape",
            BenchPreset::Qwen05B => "qwen-0.5b-shape",
        }
    }

    pub fn config(self) -> Config {
        match self {
            BenchPreset::Tiny => Preset::Tiny.config(2000, 1, 0),
            BenchPreset::Small => {
                let mut c = Preset::Small.config(8000, 1, 0);
                (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size) = (768, 6, 12, 4, 2048);
                c.head_dim = c.hidden_size / c.num_heads;
                c
            }
            BenchPreset::SevenB => llama2_7b_config(),
            BenchPreset::Qwen05B => qwen2_0_5b_config(),
        }
    }

    /// `bench ppo`'s defaults: (batch, prompt_len, response_len, iterations)
    pub(crate) fn ppo_shape(self) -> (usize, usize, usize, usize) {
        match self {
            BenchPreset::Tiny => (4, 32, 16, 2),
            BenchPreset::Small => (4, 64, 32, 3),
            BenchPreset::SevenB => (8, 256, 128, 2),
            BenchPreset::Qwen05B => (8, 32, 32, 2),
        }
    }
}

impl FromStr for BenchPreset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(BenchPreset::Tiny),
            "small" => Ok(BenchPreset::Small),
            "7b-shape" | "7b" => Ok(BenchPreset::SevenB),
            "qwen-0.5b-shape" => Ok(BenchPreset::Qwen05B),
            other => Err(Error::InvalidArgument(format!(
                "--preset {other:?}: expected tiny, small, qwen-0.5b-shape or 7b-shape"
            ))),
        }
    }
}

/// Where the base weights come from.
#[derive(Clone, Debug)]
pub enum Source {
    Dir(PathBuf),
    Preset(BenchPreset),
}

/// Number of scalars in a model of shape `cfg`.
pub fn base_params(cfg: &Config) -> i64 {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let bias = |on: bool, n: i64| if on { n } else { 0 };
    let attn = h * q + bias(cfg.qkv_bias, q) + 2 * (h * kv + bias(cfg.qkv_bias, kv)) + q * h + bias(cfg.o_bias, h);
    let mlp = 3 * h * i + bias(cfg.mlp_bias, 2 * i + h);
    let head = if cfg.tie_word_embeddings { 0 } else { cfg.vocab_size * h };
    cfg.vocab_size * h + cfg.num_layers * (attn + mlp + 2 * h) + h + head
}
